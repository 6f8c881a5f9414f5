//! `oqt finetune --lora`: train a LoRA adapter on a frozen quantized base and
//! write it as PEFT files (and a llama.cpp GGUF adapter).

use super::qat::{Reporter, TrainingArgs, print_interrupted};
use crate::output::print_json;
use anyhow::{Context, bail};
use clap::Args;
use oqt_compress::lora::{AdapterStart, LoraJob};
use oqt_core::lora::LoraModule;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(
    after_help = "Example (first-order, rank 8 on q and v, a w4a8-dyn base; see BENCHMARKS.md):
  oqt quantize --recipe w4a8-dyn smollm2-135m --no-eval --output exports/base.oqt
  oqt finetune --lora --rank 8 --alpha 16 --targets q,v exports/base.oqt \\
      --steps 200 --seq-len 256 --output exports/shakespeare-lora --gguf exports/shakespeare-lora.gguf
  oqt eval --bundle exports/base.oqt --adapter exports/shakespeare-lora --dataset tinyshakespeare
  # on-device style, forward passes only: add --zeroth-order (checkpoints, --resume)"
)]
pub struct FinetuneArgs {
    /// The base: a quantized bundle (its integers stay frozen), or a float
    /// model (alias, GGUF, HF directory) with --recipe to freeze it on.
    pub base: String,
    /// Train a LoRA adapter: what `finetune` does (and the default);
    /// full-weight training is `oqt qat`.
    #[arg(long)]
    pub lora: bool,
    /// Adapter rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA α: the update is scaled by α / r.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Linears to adapt: a comma list of q, k, v, o, gate, up, down (or PEFT's
    /// q_proj, …), or `all`.
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Continue training this PEFT adapter instead of starting a fresh one
    /// (rank, α and targets come from it).
    #[arg(long, conflicts_with_all = ["rank", "alpha", "targets"])]
    pub init_adapter: Option<PathBuf>,
    /// With a float base: the recipe whose weight grid and activation
    /// quantizers the base is frozen on (e.g. w4a8-dyn).
    #[arg(long)]
    pub recipe: Option<String>,
    /// Forward passes only (SPSA on the adapter): inference memory.
    #[arg(long)]
    pub zeroth_order: bool,
    /// What computes the forward passes: `burn` (training's fake-quant model)
    /// or `runtime` (the runtime's own integer kernels, no Burn on the path —
    /// what an app embedding only the runtime runs on a device; zeroth-order
    /// only, the base a bundle or GGUF the runtime loads).
    #[arg(long, default_value = "burn", value_parser = ["burn", "runtime"])]
    pub engine: String,
    #[command(flatten)]
    pub training: TrainingArgs,
    /// The adapter directory to write (PEFT: adapter_config.json, adapter_model.safetensors).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also write the adapter as a llama.cpp GGUF LoRA (for `llama-cli --lora`
    /// on `oqt export --format gguf` of the base).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let step = a.training.step(a.zeroth_order, 0.0, 32);
    if let Some(p) = step.problems(|f| format!("--{}", f.replace('_', "-"))).first() {
        bail!("{p}");
    }
    let modules = LoraModule::parse_list(&a.targets).map_err(|e| anyhow::anyhow!("--targets: {e}"))?;
    let recipe = a.recipe.as_deref().map(oqt_core::quant::load_recipe).transpose()?;
    let base_path = {
        let p = PathBuf::from(&a.base);
        if p.exists() {
            p
        } else {
            oqt_hub::resolve_model(&a.base)
                .with_context(|| format!("resolving model `{}`", a.base))?
                .path
        }
    };
    let adapter = match &a.init_adapter {
        Some(dir) => AdapterStart::From(dir),
        None => AdapterStart::Fresh {
            rank: a.rank,
            alpha: a.alpha,
            modules: &modules,
        },
    };
    let job = LoraJob {
        base: &base_path,
        base_label: &a.base,
        recipe: recipe.as_ref(),
        adapter,
        options: &step,
        output: &a.output,
        gguf: a.gguf.as_deref(),
        checkpoint_dir: a.training.checkpoint_dir.clone(),
        resume: a.training.resume.as_deref(),
    };
    if a.engine == "runtime" {
        return run_in_runtime(&a, &step, &base_path, &job.adapter);
    }
    let mut reporter = Reporter::new(a.zeroth_order, a.training.tensorboard.as_deref())?;
    let t0 = std::time::Instant::now();
    let report = oqt_compress::lora::run(&job, &mut reporter)?;
    drop(reporter);
    let outcome = &report.outcome;
    if report.interrupted {
        print_interrupted(outcome.next_step, &report.checkpoint_dir);
        return Ok(());
    }
    let first = outcome.evals.first().map(|e| e.1);
    let last = outcome
        .best
        .map(|b| b.held_out_perplexity)
        .or(outcome.evals.last().map(|e| e.1));
    if a.json {
        return print_json(&serde_json::json!({
            "output": a.output,
            "gguf": a.gguf,
            "method": report.method,
            "rank": report.rank,
            "targets": report.modules.iter().map(|m| m.peft_name()).collect::<Vec<_>>(),
            "trainable_params": report.trainable,
            "steps": outcome.next_step,
            "held_out_perplexity": outcome.evals,
            "held_out_loss": outcome.evals.iter().map(|(s, p)| (*s, p.ln())).collect::<Vec<_>>(),
            "train_loss": outcome.steps.iter().map(|s| (s.step, (s.loss_plus + s.loss_minus) / 2.0)).collect::<Vec<_>>(),
            "kept": outcome.best,
            "wall_s": t0.elapsed().as_secs_f64(),
            "peak_rss_mib": oqt_core::sys::peak_rss_mib(),
        }));
    }
    println!(
        "wrote {} ({} trainable values, rank {}) after {} steps ({:.0} s); held-out loss {} → {}",
        a.output.display(),
        report.trainable,
        report.rank,
        outcome.next_step,
        t0.elapsed().as_secs_f64(),
        first.map_or("-".into(), |v| format!("{:.4}", v.ln())),
        last.map_or("-".into(), |v| format!("{:.4}", v.ln()))
    );
    if let Some(g) = &a.gguf {
        println!("wrote {} (llama.cpp: --lora {})", g.display(), g.display());
    }
    Ok(())
}

/// A runtime run's checkpoint: the adapter (PEFT files) and where to go on.
#[derive(serde::Serialize, serde::Deserialize)]
struct RuntimeCheckpoint {
    next_step: u64,
    base: String,
    options: oqt_compress::qat::QatOptions,
}

const RUNTIME_STATE: &str = "runtime-state.json";

fn save_runtime_checkpoint(
    dir: &Path,
    adapter: &oqt_core::lora::LoraAdapter,
    state: &RuntimeCheckpoint,
) -> anyhow::Result<()> {
    // The adapter and the state in one atomic write: a crash leaves the previous checkpoint whole.
    oqt_core::fs::write_dir_atomically(dir, |tmp| {
        adapter.write_peft_files(tmp)?;
        let p = tmp.join(RUNTIME_STATE);
        std::fs::write(&p, serde_json::to_string_pretty(state).expect("serializable"))
            .map_err(|e| oqt_core::CoreError::io(&p, e))
    })?;
    Ok(())
}

/// `--engine runtime`: zeroth-order LoRA on the runtime's own forward passes.
fn run_in_runtime(
    a: &FinetuneArgs,
    step: &oqt_core::quant::QatStep,
    base: &Path,
    start: &AdapterStart<'_>,
) -> anyhow::Result<()> {
    use oqt_compress::qat::QatObserver;
    if !a.zeroth_order {
        bail!("--engine runtime trains zeroth-order only (the runtime has no backward pass): add --zeroth-order");
    }
    if a.recipe.is_some() {
        bail!("--engine runtime runs a quantized bundle or GGUF as it stands: drop --recipe");
    }
    if a.training.keep_best || a.training.train != "all" {
        bail!("--engine runtime: --keep-best and --train are offered by the burn engine only");
    }
    if step.lightweight {
        bail!("--lightweight does not apply to LoRA: only the adapter trains");
    }
    let (rt, name) = super::load_runtime(base)?;
    let (_, tokens) = oqt_compress::qat::job::training_tokens(&rt.tokenizer, step)?;
    let mut options = oqt_compress::lora::lora_options(step)?;
    // A resumed run goes on checkpointing where it was resumed from.
    let ckpt_dir = a
        .training
        .resume
        .clone()
        .or_else(|| a.training.checkpoint_dir.clone())
        .unwrap_or_else(|| oqt_compress::qat::default_checkpoint_dir(&a.output));
    let (adapter, next_step, source) = match (&a.training.resume, start) {
        (Some(r), _) => {
            let p = r.join(RUNTIME_STATE);
            let saved: RuntimeCheckpoint =
                serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)
                    .with_context(|| format!("{}: not a runtime LoRA checkpoint", p.display()))?;
            if saved.base != a.base {
                bail!(
                    "{}: checkpoint of a run on `{}`, not `{}`",
                    r.display(),
                    saved.base,
                    a.base
                );
            }
            options = oqt_compress::qat::QatOptions {
                steps: options.steps.max(saved.options.steps),
                ..saved.options
            };
            (
                oqt_core::lora::LoraAdapter::read_peft(r)?,
                saved.next_step,
                r.join(oqt_core::lora::PEFT_WEIGHTS_FILE),
            )
        }
        (None, AdapterStart::From(dir)) => (
            oqt_core::lora::LoraAdapter::read_peft(dir)?,
            0,
            dir.join(oqt_core::lora::PEFT_WEIGHTS_FILE),
        ),
        (None, AdapterStart::Fresh { rank, alpha, modules }) => (
            oqt_core::lora::LoraAdapter::init(&rt.config, *rank, *alpha, modules, step.seed, &name)
                .map_err(anyhow::Error::msg)?,
            0,
            a.output.clone(),
        ),
    };
    let mut lora = oqt_runtime::finetune::RuntimeLora::new(&rt, adapter, &source)?;
    let trainable: usize = oqt_core::zo::ZoTrainable::tensor_sizes(&lora).iter().sum();
    let zo = oqt_runtime::finetune::ZoOptions {
        spsa: options.spsa.clone(),
        steps: options.steps,
        batch: options.batch,
        seq_len: options.seq_len,
        eval_every: options.eval_every,
        eval_windows: options.eval_windows,
    };
    let reporter = std::cell::RefCell::new(Reporter::new(true, a.training.tensorboard.as_deref())?);
    reporter
        .borrow_mut()
        .phase("lora (zeroth-order, runtime)", options.steps);
    reporter.borrow_mut().advance(next_step);
    let t0 = std::time::Instant::now();
    let mut losses = Vec::new();
    let state = |next_step| RuntimeCheckpoint {
        next_step,
        base: a.base.clone(),
        options: options.clone(),
    };
    // Checkpoints every N steps need the adapter mid-run: train in pieces
    // (the schedule spans the whole run, so the pieces take its steps).
    let every = if options.checkpoint_every > 0 {
        options.checkpoint_every
    } else {
        u64::MAX
    };
    let mut at = next_step;
    let mut evals = Vec::new();
    let interrupted = {
        let stop = reporter.borrow().stop_flag();
        move || stop.load(std::sync::atomic::Ordering::SeqCst)
    };
    loop {
        let until = at.saturating_add(every - at % every).min(options.steps);
        let (next, e) = oqt_runtime::finetune::train_zeroth_order(
            &mut lora,
            &tokens.train,
            &tokens.held_out,
            &zo,
            at..until,
            &mut |s, tps| {
                losses.push((s.step, (s.loss_plus + s.loss_minus) / 2.0));
                reporter.borrow_mut().on_step(s, tps)
            },
            &mut |s, p| reporter.borrow_mut().on_eval(s, p),
            &interrupted,
        )?;
        evals.extend(e);
        at = next;
        save_runtime_checkpoint(&ckpt_dir, &lora.adapter, &state(at))?;
        if at >= options.steps || interrupted() {
            break;
        }
    }
    drop(reporter);
    if at < options.steps {
        print_interrupted(at, &ckpt_dir);
        return Ok(());
    }
    if let Some(g) = &a.gguf {
        lora.adapter.write_gguf(&rt.config, g)?;
    }
    lora.adapter.write_peft(&a.output)?;
    if a.json {
        return print_json(&serde_json::json!({
            "output": a.output,
            "gguf": a.gguf,
            "method": "lora-zeroth-order-runtime",
            "rank": lora.adapter.rank,
            "targets": lora.adapter.modules.iter().map(|m| m.peft_name()).collect::<Vec<_>>(),
            "trainable_params": trainable,
            "steps": at,
            "held_out_perplexity": evals,
            "held_out_loss": evals.iter().map(|(s, p)| (*s, p.ln())).collect::<Vec<_>>(),
            "train_loss": losses,
            "wall_s": t0.elapsed().as_secs_f64(),
            "peak_rss_mib": oqt_core::sys::peak_rss_mib(),
        }));
    }
    println!(
        "wrote {} ({} trainable values) after {} steps on the runtime ({:.0} s); held-out loss {} → {}",
        a.output.display(),
        trainable,
        at,
        t0.elapsed().as_secs_f64(),
        evals.first().map_or("-".into(), |e| format!("{:.4}", e.1.ln())),
        evals.last().map_or("-".into(), |e| format!("{:.4}", e.1.ln()))
    );
    Ok(())
}
