//! `oqt finetune --lora`: train a LoRA adapter on a frozen quantized base and
//! write it as PEFT files (and a llama.cpp GGUF adapter).

use super::qat::{Reporter, TrainingArgs, print_interrupted};
use crate::output::print_json;
use anyhow::{Context, bail};
use clap::Args;
use oqt_compress::lora::{AdapterStart, LoraJob};
use oqt_core::lora::LoraModule;
use std::path::PathBuf;

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
    /// Train a LoRA adapter (the only fine-tuning `finetune` does; full-weight
    /// training is `oqt qat`).
    #[arg(long, default_value_t = true)]
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
    if !a.lora {
        bail!("only LoRA fine-tuning is offered here (--lora); full-weight training is `oqt qat`");
    }
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
