//! `oqt qat --zeroth-order`: fine-tune a quantized model with forward passes
//! only (SPSA), then write the result as a bundle the runtime runs.

use crate::output::print_json;
use anyhow::{Context, bail};
use clap::Args;
use oqt_compress::qat::QatObserver;
use oqt_compress::qat::job::{self as qat_job, QatJob};
use oqt_compress::qat::zeroqat::SpsaStep;
use oqt_core::quant::QatStep;
use oqt_core::tensorboard::TbWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args, Debug)]
#[command(
    after_help = "Example (lightweight: norm gains, channel scales and ranges; 1 h 30 min at 1 thread,
held-out Tiny Shakespeare -9.9% and WikiText-2 -1.0% on SmolLM2-135M, see BENCHMARKS.md):
  oqt quantize --recipe w4a8-dyn smollm2-135m --no-eval --output exports/rtn.oqt
  oqt qat --zeroth-order --recipe w4a8-dyn smollm2-135m --from exports/rtn.oqt \\
      --lightweight --distill 0.5 --lr 1e-3 --n-spsa 8 --schedule cosine --batch 2 --steps 150 \\
      --seq-len 128 --tensorboard runs/zo --output exports/zo.oqt
  # Ctrl-C saves a checkpoint; continue with --resume exports/zo.ckpt"
)]
pub struct QatArgs {
    /// The float model (alias, GGUF, HF directory or hub id).
    pub model: String,
    /// Forward-only training (SPSA with the seed trick): memory of inference.
    /// Without it: the first-order baseline (straight-through gradients,
    /// backprop, AdamW) on the same loss, quantizers and trainable set.
    #[arg(long)]
    pub zeroth_order: bool,
    /// Quantization recipe whose fake quantizers are trained through (w4a8-dyn,
    /// w4a8, gguf-q4_0, …). Static recipes (w4a8, w8a8) start from the `--from`
    /// bundle's activation grids, or calibrate as the recipe says.
    #[arg(long)]
    pub recipe: String,
    /// Start from this bundle's weights (a PTQ result) instead of the float model's.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Add logit distillation from the float model with this weight:
    /// loss = (1 − w)·cross-entropy + w·KL(teacher ‖ student). The teacher's
    /// top-k targets for every batch are computed before training and the
    /// teacher dropped, so memory stays at inference size.
    #[arg(long, default_value_t = 0.0)]
    pub distill: f32,
    /// Teacher tokens kept per position for --distill.
    #[arg(long, default_value_t = 32)]
    pub distill_top_k: usize,
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Where to write the trained bundle (the runtime runs it like a PTQ bundle).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print one JSON object (held-out curve, timing, peak memory) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Training options shared by `oqt qat` and `oqt distill` (one schema: a
/// recipe's `qat` step).
#[derive(Args, Debug)]
pub struct TrainingArgs {
    /// Training text: a dataset name (training role), a text file, or
    /// instruction data as a `.jsonl` file (`text`, `messages`, or
    /// prompt/instruction + response/output per line).
    #[arg(long, default_value = "tinyshakespeare")]
    pub dataset: String,
    /// How a JSONL prompt/response pair becomes text: `{prompt}` and
    /// `{response}` are replaced (default: the model's chat template).
    #[arg(long)]
    pub prompt_template: Option<String>,
    /// Fraction of the text held out for evaluation (its tail).
    #[arg(long, default_value_t = 0.1)]
    pub held_out: f64,
    /// Optimizer steps in all (with --resume: the total, counting the steps
    /// already taken).
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Train only the quantizer-facing parameters — RMSNorm gains, each
    /// decoder linear's output-channel scales and static activation ranges —
    /// with the decoder weights' integers frozen (see `oqt_compress::qat::model`).
    #[arg(long)]
    pub lightweight: bool,
    /// Learning rate. Default: 1e-4 with --lightweight (a few hundred
    /// thousand quantizer-facing values; from the static `w4a8` MobileQuant
    /// bundle 1e-4 lowers held-out Tiny Shakespeare 12% and WikiText-2 below
    /// the start, 2e-4 overshoots out of domain), 1e-5 for full QAT (every
    /// latent weight).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Perturbation size ε.
    #[arg(long, default_value_t = 1e-2)]
    pub eps: f32,
    /// Directions averaged per step.
    #[arg(long, default_value_t = 1)]
    pub n_spsa: u32,
    /// Clamp each projected gradient to ±this (default: MeZO's 0.2/ε, which at
    /// larger ε clips the typical directional derivative)
    #[arg(long)]
    pub grad_clip: Option<f32>,
    /// Decoupled weight decay λ (zeroth-order: each step multiplies every trained
    /// value by 1 − lr·λ; first-order: AdamW's, activation ranges not decayed).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// constant, linear or cosine.
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    /// Training windows per step (each a random slice of the training text).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per training and held-out window.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Seeds the batches and the SPSA directions: the same seed and options
    /// give the same weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Held-out evaluation every N steps and at the start (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out windows (of --seq-len tokens, from the held-out tail's start) per evaluation.
    #[arg(long, default_value_t = 8)]
    pub eval_windows: usize,
    /// Checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Checkpoint directory (default: the output path with `.ckpt`).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write the weights of the lowest held-out perplexity evaluated (every
    /// --eval-every steps, the start's included) instead of the last step's.
    /// Zeroth-order runs keep them on disk beside the checkpoint (`.best`), so
    /// memory stays at inference size; the checkpoint keeps the last step's
    /// for --resume. The manifest records which step was kept.
    #[arg(long)]
    pub keep_best: bool,
    /// Which decoder layers train: `all`, `last:N` (the tail) or a list such
    /// as `20,21,22`. The final norm always trains.
    #[arg(long, default_value = "all")]
    pub train: String,
    /// Continue a run from its checkpoint (same options; bit-identical to not stopping).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write TensorBoard scalars (loss, lr, projected gradient, held-out perplexity) here.
    #[arg(long)]
    pub tensorboard: Option<PathBuf>,
}

/// Progress bars, logs, TensorBoard scalars and Ctrl-C for a QAT run (also
/// the pipeline's `qat` step).
pub struct Reporter {
    pb: Option<indicatif::ProgressBar>,
    /// First-order steps have no projected gradient to log.
    zeroth_order: bool,
    tb: Option<TbWriter>,
    stop: Arc<AtomicBool>,
}

impl Reporter {
    /// A reporter that stops the run at the next step on Ctrl-C.
    pub fn new(zeroth_order: bool, tensorboard: Option<&Path>) -> anyhow::Result<Self> {
        // One handler per process, shared by every run in it (a pipeline's steps).
        static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
        let stop = STOP
            .get_or_init(|| {
                let stop = Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
                    tracing::warn!("Ctrl-C will not checkpoint: {e}");
                }
                stop
            })
            .clone();
        Ok(Self {
            pb: None,
            zeroth_order,
            tb: tensorboard.map(TbWriter::create).transpose()?,
            stop,
        })
    }

    /// The Ctrl-C flag (set when the run should stop at the next step).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn println(&self, line: String) {
        match &self.pb {
            Some(pb) if !pb.is_hidden() => pb.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl QatObserver for Reporter {
    fn on_step(&mut self, s: &SpsaStep, tokens_per_s: f64) {
        let loss = (s.loss_plus + s.loss_minus) / 2.0;
        if let Some(pb) = &self.pb {
            pb.set_position(s.step + 1);
            pb.set_message(format!("loss {loss:.4}, {tokens_per_s:.0} tok/s"));
        }
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
            if self.zeroth_order {
                let _ = tb.scalar("train/projected_grad", s.step, s.projected_grad);
            }
            let _ = tb.scalar("train/tokens_per_s", s.step, tokens_per_s as f32);
            if let Some(rss) = oqt_core::sys::rss_mib() {
                let _ = tb.scalar("train/rss_mib", s.step, rss as f32);
            }
        }
    }
    fn on_eval(&mut self, step: u64, ppl: f64) {
        self.println(format!("step {step}: held-out perplexity {ppl:.4}"));
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
    fn phase(&mut self, name: &str, total: u64) {
        if let Some(pb) = self.pb.take() {
            pb.finish_and_clear();
        }
        if !name.is_empty() {
            self.pb = Some(crate::output::bar(total, name));
        }
    }
    fn advance(&mut self, done: u64) {
        if let Some(pb) = &self.pb {
            pb.set_position(done);
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(pb) = self.pb.take() {
            pb.finish_and_clear();
        }
    }
}

impl TrainingArgs {
    /// The options as a recipe's `qat` step holds them (one schema, one validation).
    pub fn step(&self, zeroth_order: bool, distill: f32, distill_top_k: usize) -> QatStep {
        QatStep {
            zeroth_order,
            dataset: self.dataset.clone(),
            prompt_template: self.prompt_template.clone(),
            held_out: self.held_out,
            steps: self.steps,
            lightweight: self.lightweight,
            lr: self.lr,
            distill,
            distill_top_k,
            eps: self.eps,
            n_spsa: self.n_spsa,
            grad_clip: self.grad_clip,
            weight_decay: self.weight_decay,
            schedule: self.schedule.clone(),
            batch: self.batch,
            seq_len: self.seq_len,
            seed: self.seed,
            eval_every: self.eval_every,
            eval_windows: self.eval_windows,
            checkpoint_every: self.checkpoint_every,
            keep_best: self.keep_best,
            train: self.train.clone(),
        }
    }
}

/// Where an interrupted run left its checkpoint, and how to continue.
pub fn print_interrupted(next_step: u64, checkpoint: &Path) {
    eprintln!(
        "interrupted at step {next_step}; checkpoint saved to {} — continue with --resume {}",
        checkpoint.display(),
        checkpoint.display()
    );
}

pub fn run(a: QatArgs) -> anyhow::Result<()> {
    let step = a.training.step(a.zeroth_order, a.distill, a.distill_top_k);
    if let Some(p) = step.problems(|f| format!("--{}", f.replace('_', "-"))).first() {
        bail!("{p}");
    }
    let recipe = oqt_core::quant::load_recipe(&a.recipe)?;
    let resolved = oqt_hub::resolve_model(&a.model).with_context(|| format!("resolving model `{}`", a.model))?;
    let created_by = concat!("oqt ", env!("CARGO_PKG_VERSION"));
    let job = QatJob {
        recipe: &recipe,
        options: &step,
        model_path: &resolved.path,
        model_label: &a.model,
        from: a.from.as_deref(),
        output: &a.output,
        checkpoint_dir: a.training.checkpoint_dir.clone(),
        resume: a.training.resume.as_deref(),
        created_by,
    };
    let mut reporter = Reporter::new(a.zeroth_order, a.training.tensorboard.as_deref())?;
    let t0 = std::time::Instant::now();
    let report = qat_job::run(&job, &mut reporter)?;
    drop(reporter);
    let outcome = &report.outcome;
    if report.interrupted {
        print_interrupted(outcome.next_step, &report.checkpoint_dir);
        return Ok(());
    }
    let first = outcome.evals.first().map(|e| e.1);
    // What the bundle holds: the kept best's perplexity, or the last step's.
    let last = outcome
        .best
        .map(|b| b.held_out_perplexity)
        .or(outcome.evals.last().map(|e| e.1));
    if a.json {
        return print_json(&serde_json::json!({
            "output": a.output,
            "steps": outcome.next_step,
            "held_out_perplexity": outcome.evals,
            "kept": outcome.best,
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
    if let Some(b) = outcome.best.filter(|b| b.step != outcome.next_step) {
        println!("kept the weights after step {} (--keep-best)", b.step);
    }
    Ok(())
}
