//! `oqt qat --zeroth-order`: fine-tune a quantized model with forward passes
//! only (SPSA), then write the result as a bundle the runtime runs.

use super::load;
use crate::output::print_json;
use anyhow::{Context, bail};
use clap::Args;
use oqt_compress::qat::{
    CheckpointState, QatObserver, QatOptions, TrainTokens, default_checkpoint_dir, read_checkpoint_state,
    restore_checkpoint, train_zeroth_order,
};
use oqt_compress::qat_model::{QatModel, Trainable};
use oqt_compress::zeroqat::{LrSchedule, SpsaConfig, SpsaStep};
use oqt_core::bundle::{Bundle, InputRecord};
use oqt_core::tensorboard::TbWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args, Debug)]
#[command(after_help = "Example (lightweight: RMSNorm gains only, a few minutes on 2 cores):
  oqt qat --zeroth-order --recipe w4a8-dyn smollm2-135m --dataset tinyshakespeare \\
      --steps 200 --lightweight --tensorboard runs/zo --output exports/zo.oqt
  # Ctrl-C saves a checkpoint; continue with --resume exports/zo.ckpt")]
pub struct QatArgs {
    /// The float model (alias, GGUF, HF directory or hub id).
    pub model: String,
    /// Forward-only training (SPSA with the seed trick). Required for now: the
    /// first-order STE baseline is not implemented yet.
    #[arg(long)]
    pub zeroth_order: bool,
    /// Quantization recipe whose fake quantizers are trained through (dynamic or
    /// float activations: w4a8-dyn, w4a16, gguf-q4_0, …).
    #[arg(long)]
    pub recipe: String,
    /// Start from this bundle's weights (a PTQ result) instead of the float model's.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Training text: a dataset name (training role) or a text file.
    #[arg(long, default_value = "tinyshakespeare")]
    pub dataset: String,
    /// Fraction of the text held out for evaluation (its tail).
    #[arg(long, default_value_t = 0.1)]
    pub held_out: f64,
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Train only the RMSNorm gains (see `oqt_compress::qat_model`).
    #[arg(long)]
    pub lightweight: bool,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Perturbation size ε.
    #[arg(long, default_value_t = 1e-2)]
    pub eps: f32,
    /// Directions averaged per step.
    #[arg(long, default_value_t = 1)]
    pub n_spsa: u32,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out evaluation every N steps (0: only at the start and the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 8)]
    pub eval_windows: usize,
    /// Checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Checkpoint directory (default: the output path with `.ckpt`).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue a run from its checkpoint (same options; bit-identical to not stopping).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write TensorBoard scalars (loss, lr, projected gradient, held-out perplexity) here.
    #[arg(long)]
    pub tensorboard: Option<PathBuf>,
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

struct Reporter {
    pb: indicatif::ProgressBar,
    tb: Option<TbWriter>,
    stop: Arc<AtomicBool>,
}

impl QatObserver for Reporter {
    fn on_step(&mut self, s: &SpsaStep, tokens_per_s: f64) {
        let loss = (s.loss_plus + s.loss_minus) / 2.0;
        self.pb.set_position(s.step + 1);
        self.pb.set_message(format!("loss {loss:.4}, {tokens_per_s:.0} tok/s"));
        tracing::info!(
            step = s.step,
            loss,
            g = s.projected_grad,
            lr = s.lr,
            tokens_per_s,
            "step"
        );
        if let Some(tb) = &mut self.tb {
            let _ = tb.scalar("train/loss", s.step, loss);
            let _ = tb.scalar("train/lr", s.step, s.lr as f32);
            let _ = tb.scalar("train/projected_grad", s.step, s.projected_grad);
            let _ = tb.scalar("train/tokens_per_s", s.step, tokens_per_s as f32);
        }
    }
    fn on_eval(&mut self, step: u64, ppl: f64) {
        let line = format!("step {step}: held-out perplexity {ppl:.4}");
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
        if let Some(tb) = &mut self.tb {
            let _ = tb.scalar("eval/held_out_perplexity", step, ppl as f32);
        }
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        tracing::info!(step, dir = %dir.display(), "checkpoint saved");
    }
    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

pub fn run(a: QatArgs) -> anyhow::Result<()> {
    if !a.zeroth_order {
        bail!("first-order QAT (STE + backprop) is not implemented yet; pass --zeroth-order");
    }
    let recipe = oqt_core::quant::load_recipe(&a.recipe)?;
    let schedule = match a.schedule.as_str() {
        "constant" => LrSchedule::Constant,
        "linear" => LrSchedule::Linear,
        "cosine" => LrSchedule::Cosine,
        other => bail!("--schedule: expected constant, linear or cosine, found `{other}`"),
    };
    let mut options = QatOptions {
        spsa: SpsaConfig {
            eps: a.eps,
            lr: a.lr,
            schedule,
            weight_decay: a.weight_decay,
            n_spsa: a.n_spsa,
            grad_clip: 0.2 / a.eps,
            seed: a.seed,
        },
        steps: a.steps,
        batch: a.batch,
        seq_len: a.seq_len,
        eval_every: a.eval_every,
        eval_windows: a.eval_windows,
        checkpoint_every: a.checkpoint_every,
        trainable: if a.lightweight {
            Trainable::Lightweight
        } else {
            Trainable::Full
        },
    };
    let start = a.from.as_ref().map_or(a.model.clone(), |b| b.display().to_string());
    let mut start_step = 0;
    if let Some(r) = &a.resume {
        let saved = read_checkpoint_state(r).with_context(|| format!("reading checkpoint {}", r.display()))?;
        if saved.recipe != recipe.name || saved.start != start {
            bail!(
                "{}: checkpoint of recipe `{}` from `{}`, not `{}` from `{start}`",
                r.display(),
                saved.recipe,
                saved.start,
                recipe.name
            );
        }
        // The saved options win: a resume continues the same run.
        start_step = saved.next_step;
        options = QatOptions {
            steps: a.steps.max(saved.options.steps),
            ..saved.options
        };
    }

    let mut model = load(&a.model)?;
    if let Some(b) = &a.from {
        let bundle = Bundle::open(b)?;
        model.weights = bundle.dequantized_weights()?;
    }
    // Names and storage types only: the weights themselves move into the Burn model.
    let source_types: std::collections::BTreeMap<String, String> = model
        .weights
        .names()
        .map(|n| (n.clone(), model.weights.source_type(n).unwrap_or("f32").to_string()))
        .collect();
    let data = oqt_core::datasets::resolve(&a.dataset)?;
    if data.is_eval_set() {
        bail!("--dataset {}: an evaluation set cannot be trained on", data.name);
    }
    let tokens = model
        .tokenizer
        .encode(&data.read_text()?, false)
        .with_context(|| format!("tokenizing {}", data.name))?;
    let tokens = TrainTokens::split(tokens, a.held_out);

    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)?;
    let llama = oqt_model::llama_from_weights(&model.config, std::mem::take(&mut model.weights), &device);
    let mut qat = QatModel::new(llama, recipe.spec.clone(), options.trainable)?;
    if let Some(r) = &a.resume {
        restore_checkpoint(r, &mut qat)?;
    }
    let ckpt_dir = a
        .resume
        .clone()
        .or(a.checkpoint_dir.clone())
        .unwrap_or_else(|| default_checkpoint_dir(&a.output));
    let state = CheckpointState {
        next_step: start_step,
        options: options.clone(),
        recipe: recipe.name.clone(),
        start: start.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let pb = crate::output::bar(options.steps, "zeroqat");
    pb.set_position(start_step);
    let mut reporter = Reporter {
        pb,
        tb: a.tensorboard.as_deref().map(TbWriter::create).transpose()?,
        stop,
    };
    let t0 = std::time::Instant::now();
    let outcome = train_zeroth_order(
        &mut qat,
        &tokens,
        &options,
        start_step,
        Some((&ckpt_dir, &state)),
        &mut reporter,
    )?;
    reporter.pb.finish_and_clear();
    if outcome.interrupted {
        eprintln!(
            "interrupted at step {}; checkpoint saved to {} — continue with --resume {}",
            outcome.next_step,
            ckpt_dir.display(),
            ckpt_dir.display()
        );
        return Ok(());
    }

    // The trained latent weights on the recipe's grid: what the fake quantizers computed.
    model.weights = qat.float_weights(&source_types);
    drop(qat);
    let mut writer = oqt_compress::rtn::quantize_rtn(
        &model,
        &recipe,
        oqt_compress::rtn::RtnOptions { clip_search: false },
        None,
        concat!("oqt ", env!("CARGO_PKG_VERSION")),
        |_, _| {},
    )?;
    let m = writer.manifest_mut();
    m.method = Some(
        if a.lightweight {
            "zeroqat-lightweight"
        } else {
            "zeroqat"
        }
        .into(),
    );
    m.inputs.push(InputRecord {
        role: "training".into(),
        path: data.path.display().to_string(),
        sha256: oqt_core::datasets::sha256_file(&data.path)?,
    });
    if let Some(b) = &a.from {
        m.inputs.push(InputRecord {
            role: "start".into(),
            path: b.display().to_string(),
            sha256: oqt_core::datasets::sha256_file(b)?,
        });
    }
    m.training = Some(serde_json::json!({
        "method": if a.lightweight { "zeroqat-lightweight" } else { "zeroqat" },
        "options": options,
        "steps_run": outcome.next_step,
        "held_out_perplexity": outcome.evals,
        "dataset": data.name,
    }));
    writer.write(&a.output)?;
    let first = outcome.evals.first().map(|e| e.1);
    let last = outcome.evals.last().map(|e| e.1);
    if a.json {
        return print_json(&serde_json::json!({
            "output": a.output,
            "steps": outcome.next_step,
            "held_out_perplexity": outcome.evals,
            "wall_s": t0.elapsed().as_secs_f64(),
            "peak_rss_mib": oqt_core::sys::peak_rss_mib(),
        }));
    }
    println!(
        "wrote {} after {} steps ({:.0} s); held-out perplexity {} → {}",
        a.output.display(),
        outcome.next_step,
        t0.elapsed().as_secs_f64(),
        first.map_or("-".into(), |v| format!("{v:.4}")),
        last.map_or("-".into(), |v| format!("{v:.4}"))
    );
    Ok(())
}
