//! `oqt qat --zeroth-order`: fine-tune a quantized model with forward passes
//! only (SPSA), then write the result as a bundle the runtime runs.

use super::load;
use crate::output::print_json;
use anyhow::{Context, bail};
use clap::Args;
use oqt_compress::qat::{
    CheckpointState, QatObserver, QatOptions, TrainTokens, default_checkpoint_dir, precompute_teacher,
    read_checkpoint_state, restore_checkpoint, train_first_order, train_zeroth_order,
};
use oqt_compress::qat_model::{FreezeLinears, QatModel, Trainable};
use oqt_compress::zeroqat::{LrSchedule, SpsaConfig, SpsaStep};
use oqt_core::bundle::{Bundle, InputRecord};
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
    /// with the decoder weights' integers frozen (see `oqt_compress::qat_model`).
    #[arg(long)]
    pub lightweight: bool,
    /// Learning rate. Default: 1e-4 with --lightweight (a few hundred
    /// thousand quantizer-facing values; from the static `w4a8` MobileQuant
    /// bundle 1e-4 lowers held-out Tiny Shakespeare 12% and WikiText-2 below
    /// the start, 2e-4 overshoots out of domain), 1e-5 for full QAT (every
    /// latent weight).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Add logit distillation from the float model with this weight:
    /// loss = (1 − w)·cross-entropy + w·KL(teacher ‖ student). The teacher's
    /// top-k targets for every batch are computed before training and the
    /// teacher dropped, so memory stays at inference size.
    #[arg(long, default_value_t = 0.0)]
    pub distill: f32,
    /// Teacher tokens kept per position for --distill.
    #[arg(long, default_value_t = 32)]
    pub distill_top_k: usize,
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
    /// Continue a run from its checkpoint (same options; bit-identical to not stopping).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write TensorBoard scalars (loss, lr, projected gradient, held-out perplexity) here.
    #[arg(long)]
    pub tensorboard: Option<PathBuf>,
    /// Where to write the trained bundle (the runtime runs it like a PTQ bundle).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print one JSON object (held-out curve, timing, peak memory) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

struct Reporter {
    pb: indicatif::ProgressBar,
    /// First-order steps have no projected gradient to log.
    zeroth_order: bool,
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
            if self.zeroth_order {
                let _ = tb.scalar("train/projected_grad", s.step, s.projected_grad);
            }
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
    if !a.zeroth_order && a.resume.is_some() {
        bail!(
            "--resume: first-order runs do not checkpoint (their AdamW moments are not saved); only --zeroth-order runs resume"
        );
    }
    if let Some(c) = a.grad_clip
        && !(c > 0.0 && c.is_finite())
    {
        bail!("--grad-clip must be a positive number, found {c}");
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
            lr: a.lr.unwrap_or(if a.lightweight { 1e-4 } else { 1e-5 }),
            schedule,
            weight_decay: a.weight_decay,
            n_spsa: a.n_spsa,
            grad_clip: a.grad_clip.unwrap_or(0.2 / a.eps),
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
        distill_weight: a.distill,
        distill_top_k: a.distill_top_k,
        keep_best: a.keep_best,
    };
    if !(0.0..=1.0).contains(&a.distill) {
        bail!("--distill: expected a weight in [0, 1], found {}", a.distill);
    }
    let start = a.from.as_ref().map_or(a.model.clone(), |b| b.display().to_string());
    let mut start_step = 0;
    let mut best = None;
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
        // The saved options win: a resume continues the same run. Keeping
        // the best does not change its path, so a resume may turn it on (the
        // best is then taken over the evaluations from here on).
        start_step = saved.next_step;
        best = saved.best;
        options = QatOptions {
            steps: a.steps.max(saved.options.steps),
            keep_best: saved.options.keep_best || a.keep_best,
            ..saved.options
        };
    }

    // The float weights are read only when something needs them: the start
    // (no --from), a calibration (static recipe, no --from) or the teacher.
    let float_needed = a.from.is_none() || options.distill_weight > 0.0;
    let (mut model, source_types) = if float_needed {
        let model = load(&a.model)?;
        // Names and storage types only: the weights themselves move into the Burn model.
        let types = model.weights.source_types();
        (model, types)
    } else {
        super::load_meta(&a.model)?
    };
    let static_grids = recipe.spec.activations.mode == oqt_core::quant::ActMode::Static;
    let data = oqt_core::datasets::resolve(&a.dataset)?;
    if data.is_eval_set() {
        bail!("--dataset {}: an evaluation set cannot be trained on", data.name);
    }
    let tokens = if oqt_compress::qat_data::is_jsonl(&data.path) {
        oqt_compress::qat_data::jsonl_tokens(&model.tokenizer, &data.path, a.prompt_template.as_deref())?
    } else {
        if a.prompt_template.is_some() {
            bail!(
                "--prompt-template applies to .jsonl instruction data, not {}",
                data.path.display()
            );
        }
        model
            .tokenizer
            .encode(&data.read_text()?, false)
            .with_context(|| format!("tokenizing {}", data.name))?
    };
    let tokens = TrainTokens::split(tokens, a.held_out);

    // Static recipes: the starting activation grids and where they came from.
    let mut grids = None;
    let bundle = a.from.as_ref().map(Bundle::open).transpose()?;
    let start_record = match &a.from {
        Some(b) => Some(InputRecord {
            role: "start".into(),
            path: b.display().to_string(),
            sha256: oqt_core::datasets::sha256_file(b)?,
        }),
        None => None,
    };
    if let (Some(b), Some(bundle)) = (&a.from, &bundle) {
        if static_grids {
            if bundle.site_grids()?.is_none() {
                bail!(
                    "--from {}: recipe `{}` has static activation grids but the bundle has none (it was made with `{}`); start from a {} bundle",
                    b.display(),
                    recipe.name,
                    bundle.manifest.recipe.as_ref().map_or("no recipe", |r| r.name.as_str()),
                    recipe.name
                );
            }
            grids = Some((
                bundle.manifest.act_grids.clone(),
                start_record.clone().expect("--from given"),
            ));
        }
    } else if static_grids {
        let pb = crate::output::bar(recipe.calibration.samples as u64, "calibrating");
        let c = oqt_compress::calibrate::calibrate_model(&model, &recipe.spec, &recipe.calibration, |d, _| {
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        grids = Some((c.grids, c.input));
    }

    // Distillation targets from the float model, computed before the student
    // exists; one copy of the weights is held at a time.
    let teacher = if options.distill_weight > 0.0 {
        let cpu = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)?;
        let teacher = oqt_model::llama_from_weights(&model.config, std::mem::take(&mut model.weights), &cpu);
        let pb = crate::output::bar(options.steps - start_step, "teacher targets");
        let t = precompute_teacher(&teacher, &tokens, &options, start_step, |d, _| pb.set_position(d))?;
        pb.finish_and_clear();
        Some(t)
    } else {
        None
    };
    // A PTQ start may have split outlier channels (wider MLPs than the float
    // model, which only the teacher above runs): the student takes its widths.
    if let Some(b) = &bundle {
        model.config.layer_intermediate_sizes = b.manifest.config.layer_intermediate_sizes.clone();
    }
    // The starting weights: the PTQ bundle's, or the float model's. A
    // lightweight run stores each decoder linear on its grid as it is read.
    let source_path = a.from.clone().unwrap_or_else(|| model.path.clone());
    let mut freeze = a
        .lightweight
        .then(|| FreezeLinears::new(&recipe.spec, &model.config, &source_path));
    let mut start_weights = oqt_core::weights::ModelWeights::default();
    let mut gather = |name: &str, t: oqt_core::weights::TensorF32, source: String| match &mut freeze {
        Some(f) => f.add(name, t, source),
        None => {
            start_weights.insert(name.to_string(), t, source);
            Ok(())
        }
    };
    match &bundle {
        Some(b) => {
            model.weights = Default::default();
            b.for_each_dequantized(&mut gather)?;
        }
        None => {
            let float = match teacher {
                Some(_) => load(&a.model)?.weights,
                None => std::mem::take(&mut model.weights),
            };
            for (n, t, source) in float.into_tensors() {
                gather(&n, t, source)?;
            }
        }
    }
    drop(bundle);
    let frozen = match freeze {
        Some(f) => {
            let (weights, frozen) = f.finish()?;
            start_weights = weights;
            Some(frozen)
        }
        None => {
            start_weights.validate(&model.config, &source_path)?;
            None
        }
    };
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, !a.zeroth_order)?;
    let llama = oqt_model::llama_from_weights(&model.config, start_weights, &device);
    let grids_ref = grids.as_ref().map(|(g, _)| g);
    let mut qat = match frozen {
        Some(frozen) => QatModel::new_frozen(llama, recipe.spec.clone(), frozen, grids_ref)?,
        None => QatModel::new(llama, recipe.spec.clone(), grids_ref)?,
    };
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
        best,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let pb = crate::output::bar(
        options.steps,
        if a.zeroth_order { "zeroqat" } else { "qat (first-order)" },
    );
    pb.set_position(start_step);
    let mut reporter = Reporter {
        pb,
        zeroth_order: a.zeroth_order,
        tb: a.tensorboard.as_deref().map(TbWriter::create).transpose()?,
        stop,
    };
    let t0 = std::time::Instant::now();
    let (qat, outcome) = if a.zeroth_order {
        let outcome = train_zeroth_order(
            &mut qat,
            &tokens,
            &options,
            start_step,
            Some((&ckpt_dir, &state)),
            teacher.as_ref(),
            &mut reporter,
        )?;
        (qat, outcome)
    } else {
        train_first_order(qat, &tokens, &options, teacher.as_ref(), &mut reporter)?
    };
    drop(teacher);
    reporter.pb.finish_and_clear();
    if outcome.interrupted && !a.zeroth_order {
        bail!(
            "interrupted at step {}: first-order runs keep no checkpoint, nothing written",
            outcome.next_step
        );
    }
    if outcome.interrupted {
        eprintln!(
            "interrupted at step {}; checkpoint saved to {} — continue with --resume {}",
            outcome.next_step,
            ckpt_dir.display(),
            ckpt_dir.display()
        );
        return Ok(());
    }

    // The trained latent weights on the recipe's grid (what the fake quantizers
    // computed), the frozen integers as they were, the trained activation grids.
    let method = match (a.zeroth_order, a.lightweight) {
        (true, false) => "zeroqat",
        (true, true) => "zeroqat-lightweight",
        (false, false) => "qat-first-order",
        (false, true) => "qat-first-order-lightweight",
    };
    let trained = qat.into_trained(&source_types);
    model.weights = trained.weights;
    let calibrated = match (trained.act_grids, grids) {
        (Some(g), Some((_, input))) => Some(oqt_compress::rtn::Calibrated { grids: g, input }),
        _ => None,
    };
    // A static run's grids came from the start bundle: assemble records it once already.
    let start_in_grids = calibrated.as_ref().is_some_and(|c| c.input.role == "start");
    let mut writer = oqt_compress::rtn::assemble(
        &model,
        oqt_compress::rtn::Prepared {
            weights: &model.weights,
            quantized: trained.quantized,
            method: method.into(),
        },
        &recipe,
        oqt_compress::rtn::RtnOptions { clip_search: false },
        calibrated,
        concat!("oqt ", env!("CARGO_PKG_VERSION")),
        |_, _| {},
    )?;
    let m = writer.manifest_mut();
    m.inputs.push(InputRecord {
        role: "training".into(),
        path: data.path.display().to_string(),
        sha256: oqt_core::datasets::sha256_file(&data.path)?,
    });
    if let Some(r) = start_record.filter(|_| !start_in_grids) {
        m.inputs.push(r);
    }
    m.training = Some(serde_json::json!({
        "method": method,
        "options": options,
        "steps_run": outcome.next_step,
        "held_out_perplexity": outcome.evals,
        "kept": outcome.best,
        "dataset": data.name,
    }));
    writer.write(&a.output)?;
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
