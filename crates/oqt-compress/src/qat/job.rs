//! One QAT run from start to bundle: load the start (a PTQ bundle or the
//! float model), the training text, the static grids and the distillation
//! targets, train (zeroth- or first-order, with checkpoints and resume), and
//! write the trained bundle. `oqt qat` and the pipeline's `qat` step both call
//! [`run`]; the caller supplies progress and interruption through a
//! [`QatObserver`].

use crate::qat::model::{FreezeLinears, QatModel, Trainable};
use crate::qat::zeroqat::{LrSchedule, SpsaConfig};
use crate::qat::{
    BestEval, CheckpointState, QatObserver, QatOptions, QatOutcome, TeacherTargets, TrainTokens,
    default_checkpoint_dir, precompute_teacher, read_checkpoint_state, restore_checkpoint, train_first_order,
    train_zeroth_order,
};
use oqt_core::bundle::{Bundle, InputRecord};
use oqt_core::quant::{ActMode, QatStep, Recipe};
use oqt_core::{CoreError, LoadedModel, Result};
use std::path::{Path, PathBuf};

/// What to train and where the result goes.
pub struct QatJob<'a> {
    pub recipe: &'a Recipe,
    pub options: &'a QatStep,
    /// The float model's file or directory, and how the user named it (recorded
    /// in checkpoints: a resume must continue from the same start).
    pub model_path: &'a Path,
    pub model_label: &'a str,
    /// Start from this bundle's weights instead of the float model's.
    pub from: Option<&'a Path>,
    pub output: &'a Path,
    /// Default: the output path with `.ckpt`.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint (zeroth-order only).
    pub resume: Option<&'a Path>,
    pub created_by: &'a str,
}

/// What a finished run reports.
pub struct QatReport {
    pub outcome: QatOutcome,
    /// `zeroqat`, `zeroqat-lightweight`, `qat-first-order`, …
    pub method: &'static str,
    pub checkpoint_dir: PathBuf,
    /// When the run was interrupted (Ctrl-C): nothing written but the checkpoint.
    pub interrupted: bool,
}

fn err(msg: String) -> CoreError {
    CoreError::Other(msg)
}

/// The CPU device training runs on (autodiff for first-order runs).
pub(crate) fn device(autodiff: bool) -> Result<burn::tensor::Device> {
    oqt_model::select_device(oqt_model::DeviceKind::Cpu, autodiff)
        .map_err(|e| err(format!("selecting the CPU device: {e}")))
}

/// The trainer's options from a step's: defaults filled in (the learning
/// rate by trainable set, the gradient clip by ε).
pub fn qat_options(s: &QatStep) -> Result<QatOptions> {
    let problems = s.problems(|f| f.to_string());
    if let Some(p) = problems.first() {
        return Err(err(p.clone()));
    }
    let schedule = match s.schedule.as_str() {
        "linear" => LrSchedule::Linear,
        "cosine" => LrSchedule::Cosine,
        _ => LrSchedule::Constant,
    };
    Ok(QatOptions {
        spsa: SpsaConfig {
            eps: s.eps,
            lr: s.lr.unwrap_or(if s.lightweight { 1e-4 } else { 1e-5 }),
            schedule,
            weight_decay: s.weight_decay,
            n_spsa: s.n_spsa,
            grad_clip: s.grad_clip.unwrap_or(0.2 / s.eps),
            seed: s.seed,
        },
        steps: s.steps,
        batch: s.batch,
        seq_len: s.seq_len,
        eval_every: s.eval_every,
        eval_windows: s.eval_windows,
        checkpoint_every: s.checkpoint_every,
        trainable: if s.lightweight {
            Trainable::Lightweight
        } else {
            Trainable::Full
        },
        distill_weight: s.distill,
        distill_top_k: s.distill_top_k,
        keep_best: s.keep_best,
    })
}

/// The recipe a start bundle was planned with, when it is `recipe` under a
/// mixed-precision plan (its provenance holds the planned spec).
fn planned_recipe(bundle: &Bundle, recipe: &Recipe) -> Result<Option<Recipe>> {
    if bundle.manifest.provenance.mixed_precision.is_none() || bundle.manifest.recipe_name() != Some(&recipe.name) {
        return Ok(None);
    }
    let stored = bundle.manifest.provenance.recipe.clone().expect("named above");
    let planned: Recipe = serde_json::from_value(stored).map_err(|e| {
        err(format!(
            "{}: provenance.recipe: not a recipe ({e})",
            bundle.path.display()
        ))
    })?;
    let problems = planned.spec.problems();
    if !problems.is_empty() {
        return Err(err(format!(
            "{}: provenance.recipe: {}",
            bundle.path.display(),
            problems.join("; ")
        )));
    }
    Ok(Some(planned))
}

/// The training text of `s` (a dataset, text file or instruction JSONL)
/// tokenized by `tokenizer`, its tail held out.
pub fn training_tokens(
    tokenizer: &oqt_core::tokenizer::Tokenizer,
    s: &QatStep,
) -> Result<(oqt_core::datasets::ResolvedDataset, TrainTokens)> {
    let data = oqt_core::datasets::resolve(&s.dataset)?;
    if data.is_eval_set() {
        return Err(err(format!(
            "--dataset {}: an evaluation set cannot be trained on",
            data.name
        )));
    }
    let tokens = if crate::qat::data::is_jsonl(&data.path) {
        crate::qat::data::jsonl_tokens(tokenizer, &data.path, s.prompt_template.as_deref())?
    } else {
        if s.prompt_template.is_some() {
            return Err(err(format!(
                "--prompt-template applies to .jsonl instruction data, not {}",
                data.path.display()
            )));
        }
        tokenizer.encode(&data.read_text()?, false)?
    };
    let tokens = TrainTokens::split(tokens, s.held_out);
    Ok((data, tokens))
}

/// Where a run starts: its first step, the best evaluation so far and the
/// options it runs with.
pub struct Resumed {
    pub next_step: u64,
    pub best: Option<BestEval>,
    pub options: QatOptions,
}

/// A fresh run with `options`, or the checkpoint `resume` continued (after
/// `check` accepts what it was a run of). Only zeroth-order runs resume.
pub fn resume_run(
    resume: Option<&Path>,
    options: QatOptions,
    zeroth_order: bool,
    check: impl FnOnce(&Path, &CheckpointState) -> Result<()>,
) -> Result<Resumed> {
    let Some(r) = resume else {
        return Ok(Resumed {
            next_step: 0,
            best: None,
            options,
        });
    };
    if !zeroth_order {
        return Err(err(
            "--resume: first-order runs do not checkpoint (their AdamW moments are not saved); only --zeroth-order runs resume"
                .into(),
        ));
    }
    let saved = read_checkpoint_state(r)?;
    check(r, &saved)?;
    // The saved options win: a resume continues the same run. Keeping
    // the best does not change its path, so a resume may turn it on (the
    // best is then taken over the evaluations from here on).
    Ok(Resumed {
        next_step: saved.next_step,
        best: saved.best,
        options: QatOptions {
            steps: options.steps.max(saved.options.steps),
            keep_best: saved.options.keep_best || options.keep_best,
            ..saved.options
        },
    })
}

/// Train `qat` zeroth-order (checkpointing into `checkpoint.0` from
/// `checkpoint.1`) or first-order, under a progress phase named `phase`. An
/// interrupted first-order run is an error: it keeps no checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn train(
    mut qat: QatModel,
    tokens: &TrainTokens,
    options: &QatOptions,
    zeroth_order: bool,
    checkpoint: (&Path, &CheckpointState),
    teacher: Option<&TeacherTargets>,
    hidden: Option<&crate::distill::hidden::HiddenTeacher>,
    phase: &str,
    observer: &mut dyn QatObserver,
) -> Result<(QatModel, QatOutcome)> {
    if zeroth_order && hidden.is_some() {
        return Err(err(
            "hidden-state matching trains first-order only: drop --hidden-weight or --zeroth-order".into(),
        ));
    }
    observer.phase(phase, options.steps);
    observer.advance(checkpoint.1.next_step);
    let (qat, outcome) = if zeroth_order {
        let outcome = train_zeroth_order(
            &mut qat,
            tokens,
            options,
            checkpoint.1.next_step,
            Some(checkpoint),
            teacher,
            observer,
        )?;
        (qat, outcome)
    } else {
        train_first_order(qat, tokens, options, teacher, hidden, observer)?
    };
    observer.phase("", 0);
    if outcome.interrupted && !zeroth_order {
        return Err(err(format!(
            "interrupted at step {}: first-order runs keep no checkpoint, nothing written",
            outcome.next_step
        )));
    }
    Ok((qat, outcome))
}

/// Train as `job` says and write the bundle (unless interrupted).
pub fn run(job: &QatJob<'_>, observer: &mut dyn QatObserver) -> Result<QatReport> {
    let s = job.options;
    let bundle = job.from.map(Bundle::open).transpose()?;
    if let Some(b) = &bundle
        && let Some(name) = b
            .manifest
            .deployment
            .tensors
            .iter()
            .find_map(|(n, e)| matches!(e, oqt_core::encoding::TensorEncoding::Lut { .. }).then_some(n))
    {
        return Err(CoreError::Other(format!(
            "{}: tensor `{name}` is palettized (lut); QAT trains integer grids, not palettes — start from the float model or a quantized bundle",
            b.path.display()
        )));
    }
    if let Some(b) = &bundle
        && let Some(name) = b.first_shared()
    {
        return Err(CoreError::Other(format!(
            "{}: `{name}` shares another block's weights; QAT of shared blocks is not supported yet — train before sharing",
            b.path.display()
        )));
    }
    // A start bundle made under a size budget carries its planned recipe (the
    // per-layer grids the plan chose): train on those grids.
    let planned = bundle
        .as_ref()
        .map(|b| planned_recipe(b, job.recipe))
        .transpose()?
        .flatten();
    let plan_record = planned
        .as_ref()
        .and(bundle.as_ref())
        .and_then(|b| b.manifest.provenance.mixed_precision.clone());
    let recipe = planned.as_ref().unwrap_or(job.recipe);
    let start = job
        .from
        .map_or(job.model_label.to_string(), |b| b.display().to_string());
    let Resumed {
        next_step: start_step,
        best,
        options,
    } = resume_run(job.resume, qat_options(s)?, s.zeroth_order, |r, saved| {
        if saved.recipe != recipe.name || saved.start != start {
            return Err(err(format!(
                "{}: checkpoint of recipe `{}` from `{}`, not `{}` from `{start}`",
                r.display(),
                saved.recipe,
                saved.start,
                recipe.name
            )));
        }
        Ok(())
    })?;

    // The float weights are read only when something needs them: the start
    // (no start bundle), a calibration (static recipe, no start bundle) or the teacher.
    let float_needed = job.from.is_none() || options.distill_weight > 0.0;
    let (mut model, source_types): (LoadedModel, _) = if float_needed {
        let model = oqt_core::load_model(job.model_path)?;
        if let Some(name) = model.sharing.keys().next() {
            return Err(CoreError::Other(format!(
                "{}: `{name}` shares another block's weights; QAT of shared blocks is not supported yet — train before sharing",
                job.model_path.display()
            )));
        }
        // Names and storage types only: the weights themselves move into the Burn model.
        let types = model.weights.source_types();
        (model, types)
    } else {
        oqt_core::load::load_model_meta(job.model_path)?
    };
    let static_grids = recipe.spec.activations.mode == ActMode::Static;
    let (data, tokens) = training_tokens(&model.tokenizer, s)?;

    // Static recipes: the starting activation grids and where they came from.
    let mut grids = None;
    let start_record = job.from.map(|b| InputRecord::of_file("start", b)).transpose()?;
    if let (Some(b), Some(bundle)) = (job.from, &bundle) {
        if static_grids {
            if bundle.site_grids()?.is_none() {
                return Err(err(format!(
                    "--from {}: recipe `{}` has static activation grids but the bundle has none (it was made with `{}`); start from a {} bundle",
                    b.display(),
                    recipe.name,
                    bundle.manifest.recipe_name().unwrap_or("no recipe"),
                    recipe.name
                )));
            }
            grids = Some((
                bundle.manifest.deployment.act_grids.clone(),
                start_record.clone().expect("start bundle given"),
            ));
        }
    } else if static_grids {
        observer.phase("calibrating", recipe.calibration.samples as u64);
        let c = crate::stats::calibrate::calibrate_model(&model, &recipe.spec, &recipe.calibration, |d, _| {
            observer.advance(d as u64)
        })?;
        grids = Some((c.grids, c.input));
    }

    // Distillation targets from the float model, computed before the student
    // exists; one copy of the weights is held at a time.
    let teacher = if options.distill_weight > 0.0 {
        let cpu = device(false)?;
        let teacher = oqt_model::llama_from_weights(&model.config, std::mem::take(&mut model.weights), &cpu);
        observer.phase("teacher targets", options.steps - start_step);
        let t = precompute_teacher(&teacher, &tokens, &options, start_step, |d, _| observer.advance(d))?;
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
    let source_path = job.from.map_or_else(|| model.path.clone(), Path::to_path_buf);
    let mut freeze = s
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
                Some(_) => oqt_core::load_model(job.model_path)?.weights,
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
    let device = device(!s.zeroth_order)?;
    let llama = oqt_model::llama_from_weights(&model.config, start_weights, &device);
    let grids_ref = grids.as_ref().map(|(g, _)| g);
    let mut qat = match frozen {
        Some(frozen) => QatModel::new_frozen(llama, recipe.spec.clone(), frozen, grids_ref)?,
        None => QatModel::new(llama, recipe.spec.clone(), grids_ref)?,
    };
    let layers = s.train_layers(model.config.num_layers, |f| f.to_string())?;
    if layers.len() < model.config.num_layers {
        qat.train_only_layers(&layers)?;
    }
    if let Some(r) = job.resume {
        restore_checkpoint(r, &mut qat)?;
    }
    let ckpt_dir = job
        .resume
        .map(Path::to_path_buf)
        .or(job.checkpoint_dir.clone())
        .unwrap_or_else(|| default_checkpoint_dir(job.output));
    let state = CheckpointState {
        next_step: start_step,
        options: options.clone(),
        recipe: recipe.name.clone(),
        start: start.clone(),
        best,
    };
    let phase = if s.zeroth_order { "zeroqat" } else { "qat (first-order)" };
    let (qat, outcome) = train(
        qat,
        &tokens,
        &options,
        s.zeroth_order,
        (&ckpt_dir, &state),
        teacher.as_ref(),
        None,
        phase,
        observer,
    )?;
    drop(teacher);
    let method = match (s.zeroth_order, s.lightweight) {
        (true, false) => "zeroqat",
        (true, true) => "zeroqat-lightweight",
        (false, false) => "qat-first-order",
        (false, true) => "qat-first-order-lightweight",
    };
    if outcome.interrupted {
        return Ok(QatReport {
            outcome,
            method,
            checkpoint_dir: ckpt_dir,
            interrupted: true,
        });
    }

    // The trained latent weights on the recipe's grid (what the fake quantizers
    // computed), the frozen integers as they were, the trained activation grids.
    let trained = qat.into_trained(&source_types);
    model.weights = trained.weights;
    let calibrated = match (trained.act_grids, grids) {
        (Some(g), Some((_, input))) => Some(crate::ptq::rtn::Calibrated { grids: g, input }),
        _ => None,
    };
    // A static run's grids came from the start bundle: assemble records it once already.
    let start_in_grids = calibrated.as_ref().is_some_and(|c| c.input.role == "start");
    let mut writer = crate::ptq::rtn::assemble(
        &model,
        crate::ptq::rtn::Prepared {
            weights: &model.weights,
            quantized: trained.quantized,
            method: method.into(),
        },
        recipe,
        crate::ptq::rtn::RtnOptions { clip_search: false },
        calibrated,
        job.created_by,
        |_, _| {},
    )?;
    let m = writer.manifest_mut();
    m.inputs.push(InputRecord::of_file("training", &data.path)?);
    if let Some(r) = start_record.filter(|_| !start_in_grids) {
        m.inputs.push(r);
    }
    m.provenance.mixed_precision = plan_record;
    m.provenance.training = Some(serde_json::json!({
        "method": method,
        "options": options,
        "steps_run": outcome.next_step,
        "held_out_perplexity": outcome.evals,
        "kept": outcome.best,
        "dataset": data.name,
    }));
    writer.write(job.output)?;
    Ok(QatReport {
        outcome,
        method,
        checkpoint_dir: ckpt_dir,
        interrupted: false,
    })
}
