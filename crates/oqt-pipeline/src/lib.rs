//! oqt-pipeline: a recipe's `[[steps]]`, run in order.
//!
//! Each step reads the bundle the step before it wrote (the first reads the
//! float model) and writes its own into the run directory (`OUTPUT.run/` by
//! default): `step-1-quantize.oqt`, `step-2-qat.oqt`, … After each finished
//! step the run's state (`state.json`: the recipe, the model, every finished
//! step with its bundle's sha256) is written atomically, so a run killed at
//! any point resumes after its last finished step (`resume`), and a `qat`
//! step killed mid-way resumes from its own checkpoint. The last step's
//! bundle is then copied to the output.
//!
//! Steps share what they can: the float model is loaded once, a `quantize`
//! step after `prune` steps starts from the last one's (float, sparse)
//! bundle and keeps its zeros, and a `qat` step trains from the previous bundle's
//! integer weights and calibrated activation grids (no second calibration).
//! Methods register as step kinds in [`run_step`]; nothing here prints or
//! parses arguments.

mod state;

use oqt_compress::distill::job::DistillJob;
use oqt_compress::fold::gates::GateOptions;
use oqt_compress::fold::job::{FoldBudget, FoldOptions};
use oqt_compress::ptq::{Method, Progress, PtqOptions};
use oqt_compress::qat::QatObserver;
use oqt_compress::qat::job::QatJob;
use oqt_core::quant::{QatStep, QuantizeStep, Recipe, Step};
use oqt_core::{CoreError, LoadedModel, Result};
pub use state::{FinishedStep, RunState};
use std::path::{Path, PathBuf};

/// What to run and where.
pub struct PipelineJob<'a> {
    pub recipe: &'a Recipe,
    /// The float model's file or directory, and how the user named it.
    pub model_path: &'a Path,
    pub model_label: &'a str,
    /// Where the final bundle goes.
    pub output: &'a Path,
    /// Step bundles and the run's state (default: [`default_run_dir`]).
    pub run_dir: PathBuf,
    /// Continue a run whose state is in `run_dir` (refused if its recipe or
    /// model differ); without it an existing state is refused, never overwritten.
    pub resume: bool,
    /// Stop after this many steps (the output is not written; `resume` continues).
    pub stop_after: Option<usize>,
    pub created_by: &'a str,
}

/// `exports/m.oqt` → `exports/m.oqt.run`.
pub fn default_run_dir(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".run");
    PathBuf::from(s)
}

/// Where a run reports: step boundaries, and the progress of each step's method.
pub trait PipelineObserver {
    /// Step `index` (0-based) of `total` begins, or is taken from the run's state (`resumed`).
    fn step_started(&mut self, index: usize, total: usize, step: &Step, resumed: bool);
    fn step_finished(&mut self, index: usize, record: &FinishedStep);
    /// Progress of a `quantize` step.
    fn ptq(&mut self) -> &mut dyn Progress;
    /// Progress, logging and interruption of a `qat` step.
    fn qat(&mut self, step: &QatStep) -> &mut dyn QatObserver;
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineReport {
    pub run_dir: PathBuf,
    /// Every finished step, resumed ones included.
    pub steps: Vec<FinishedStep>,
    /// The final bundle, when every step finished.
    pub output: Option<PathBuf>,
    /// Stopped by `stop_after` or an interruption before the last step.
    pub stopped: bool,
}

fn err(msg: String) -> CoreError {
    CoreError::Other(msg)
}

/// Run `job`'s recipe.
pub fn run(job: &PipelineJob<'_>, observer: &mut dyn PipelineObserver) -> Result<PipelineReport> {
    let steps = job.recipe.pipeline();
    let total = steps.len();
    std::fs::create_dir_all(&job.run_dir).map_err(|e| CoreError::io(&job.run_dir, e))?;
    let recipe_json = serde_json::to_value(job.recipe).map_err(|e| err(format!("recipe: {e}")))?;
    let mut state = match RunState::read(&job.run_dir)? {
        Some(s) if job.resume => {
            s.check_same_run(&job.run_dir, &recipe_json, job.model_label)?;
            s.check_bundles(&job.run_dir)?;
            s
        }
        Some(s) if !s.finished.is_empty() => {
            return Err(err(format!(
                "{}: a run of recipe `{}` is there with {} finished step(s); resume it (--resume) or remove the directory",
                job.run_dir.display(),
                s.recipe.get("name").and_then(|n| n.as_str()).unwrap_or("?"),
                s.finished.len()
            )));
        }
        _ => RunState::new(recipe_json, job.model_label),
    };
    if state.finished.len() > total {
        return Err(err(format!(
            "{}: the run's state has {} finished steps, the recipe {total}",
            job.run_dir.display(),
            state.finished.len()
        )));
    }
    let mut float: Option<LoadedModel> = None;
    let mut previous: Option<PathBuf> = state.finished.last().map(|f| job.run_dir.join(&f.bundle));
    for (i, step) in steps.iter().enumerate() {
        if let Some(done) = state.finished.get(i) {
            observer.step_started(i, total, step, true);
            observer.step_finished(i, done);
            continue;
        }
        if job.stop_after.is_some_and(|n| i >= n) {
            return Ok(PipelineReport {
                run_dir: job.run_dir.clone(),
                steps: state.finished,
                output: None,
                stopped: true,
            });
        }
        observer.step_started(i, total, step, false);
        let bundle_name = format!("step-{}-{}.oqt", i + 1, step.kind());
        let bundle = job.run_dir.join(&bundle_name);
        let t0 = std::time::Instant::now();
        let outcome = run_step(job, step, i, previous.as_deref(), &bundle, &mut float, observer)?;
        if outcome == StepOutcome::Interrupted {
            return Ok(PipelineReport {
                run_dir: job.run_dir.clone(),
                steps: state.finished,
                output: None,
                stopped: true,
            });
        }
        let record = FinishedStep {
            kind: step.kind().to_string(),
            bundle: bundle_name,
            sha256: oqt_core::datasets::sha256_file(&bundle)?,
            seconds: t0.elapsed().as_secs_f64(),
        };
        state.finished.push(record.clone());
        state.write(&job.run_dir)?;
        observer.step_finished(i, &record);
        previous = Some(bundle);
    }
    let last = previous.ok_or_else(|| err("the recipe has no steps".into()))?;
    copy_atomic(&last, job.output)?;
    Ok(PipelineReport {
        run_dir: job.run_dir.clone(),
        steps: state.finished,
        output: Some(job.output.to_path_buf()),
        stopped: false,
    })
}

#[derive(Debug, PartialEq)]
enum StepOutcome {
    Written,
    Interrupted,
}

impl StepOutcome {
    fn of(interrupted: bool) -> Self {
        if interrupted { Self::Interrupted } else { Self::Written }
    }
}

/// A training step's checkpoint directory beside its bundle, and whether the
/// step resumes from it (a zeroth-order step killed mid-way continues).
fn step_checkpoint(output: &Path, q: &QatStep, kind: &str) -> (PathBuf, bool) {
    let ckpt = output.with_extension("ckpt");
    let resumes = q.zeroth_order && oqt_compress::qat::read_checkpoint_state(&ckpt).is_ok();
    if resumes {
        tracing::info!(checkpoint = %ckpt.display(), "resuming the {kind} step from its checkpoint");
    }
    (ckpt, resumes)
}

/// The step registry: each kind's method, from its input to its bundle.
fn run_step(
    job: &PipelineJob<'_>,
    step: &Step,
    index: usize,
    input: Option<&Path>,
    output: &Path,
    float: &mut Option<LoadedModel>,
    observer: &mut dyn PipelineObserver,
) -> Result<StepOutcome> {
    match step {
        Step::Prune(p) => {
            let mut pruned = None;
            let model = start_model(job, input, float, &mut pruned)?;
            let opts = oqt_compress::prune::PruneOptions::from_step(p, |f| format!("steps[{index}].{f}"))?;
            let outcome = oqt_compress::prune::prune_to_bundle(
                model,
                &opts,
                &job.recipe.calibration,
                job.created_by,
                observer.ptq(),
            )?;
            outcome.writer.write(output)?;
            Ok(StepOutcome::Written)
        }
        Step::Fold(f) => {
            let mut loaded = None;
            let model = start_model(job, input, float, &mut loaded)?;
            let budget = match (f.remove, f.budget) {
                (Some(n), _) => FoldBudget::Blocks(n),
                (None, Some(b)) => FoldBudget::Fraction(b),
                (None, None) if f.share > 0 => FoldBudget::Blocks(0),
                (None, None) => {
                    return Err(err(format!(
                        "steps[{index}]: a fold step needs `remove`, `budget` or `share`"
                    )));
                }
            };
            let opts = FoldOptions {
                method: f
                    .method
                    .parse()
                    .map_err(|e| err(format!("steps[{index}].method: {e}")))?,
                budget,
                gates: GateOptions {
                    rounds: f.gate_rounds,
                    proposals: f.gate_proposals,
                    grad_windows: f.gate_windows,
                    ..GateOptions::default()
                },
                share: f.share,
            };
            let outcome = oqt_compress::fold::job::fold_to_bundle(
                model,
                &opts,
                &job.recipe.calibration,
                job.created_by,
                observer.ptq(),
            )
            .map_err(|e| err(format!("steps[{index}]: {e}")))?;
            outcome.writer.write(output)?;
            Ok(StepOutcome::Written)
        }
        Step::Distill(q) => {
            let student = input.ok_or_else(|| {
                err(format!(
                    "steps[{index}]: a `distill` step trains the previous step's bundle; put a `fold` or `quantize` step before it"
                ))
            })?;
            let (ckpt, resumes) = step_checkpoint(output, q, "distill");
            let resume = resumes.then_some(ckpt.as_path());
            let name = |f: &str| format!("steps[{index}].{f}");
            let distill = DistillJob {
                hidden: None,
                // A recipe's distill step computes its targets each run (no cache root here yet).
                targets_cache: None,
                teacher: job.model_path,
                student,
                training: q,
                option_name: &name,
                output,
                checkpoint_dir: Some(ckpt.clone()),
                resume,
                created_by: job.created_by,
            };
            let report = oqt_compress::distill::job::run(&distill, observer.qat(q))?;
            Ok(StepOutcome::of(report.interrupted))
        }
        Step::Cluster(c) => {
            let mut pruned = None;
            let model = start_model(job, input, float, &mut pruned)?;
            let run = oqt_compress::cluster::ClusterRun {
                device: None,
                checkpoint: None,
                resume: false,
                observer: &mut oqt_compress::cluster::edkm::Quiet,
            };
            let (writer, _) =
                oqt_compress::cluster::cluster_to_bundle(model, job.recipe, c, job.created_by, observer.ptq(), run)
                    .map_err(|e| err(format!("steps[{index}]: {e}")))?;
            writer.write(output)?;
            Ok(StepOutcome::Written)
        }
        Step::Quantize(q) => {
            let mut pruned = None;
            let model = start_model(job, input, float, &mut pruned)?;
            quantize(job.recipe, q, index, model, output, job.created_by, observer.ptq())?;
            Ok(StepOutcome::Written)
        }
        Step::Lora(l) => {
            let from = input.ok_or_else(|| {
                err(format!(
                    "steps[{index}]: a `lora` step trains an adapter on a quantized bundle; put a `quantize` step before it"
                ))
            })?;
            let modules = oqt_core::lora::LoraModule::parse_list(&l.targets)
                .map_err(|e| err(format!("steps[{index}].targets: {e}")))?;
            let adapter_dir = output.with_extension("adapter");
            let (ckpt, resumes) = step_checkpoint(output, &l.training, "lora");
            let label = from.display().to_string();
            let lora = oqt_compress::lora::LoraJob {
                base: from,
                base_label: &label,
                recipe: None,
                adapter: oqt_compress::lora::AdapterStart::Fresh {
                    rank: l.rank,
                    alpha: l.alpha,
                    modules: &modules,
                },
                options: &l.training,
                output: &adapter_dir,
                gguf: None,
                checkpoint_dir: Some(ckpt.clone()),
                resume: resumes.then_some(ckpt.as_path()),
            };
            let report = oqt_compress::lora::run(&lora, observer.qat(&l.training))?;
            if report.interrupted {
                return Ok(StepOutcome::Interrupted);
            }
            let adapter = oqt_core::lora::LoraAdapter::read_peft(&adapter_dir)?;
            let weights = adapter_dir.join(oqt_core::lora::PEFT_WEIGHTS_FILE);
            oqt_compress::lora::merge(from, &adapter, &weights, output, job.created_by)?;
            Ok(StepOutcome::Written)
        }
        Step::Qat(q) => {
            let from = input.ok_or_else(|| {
                err(format!(
                    "steps[{index}]: a `qat` step trains a quantized bundle; put a `quantize` step before it"
                ))
            })?;
            let (ckpt, resumes) = step_checkpoint(output, q, "qat");
            let resume = resumes.then_some(ckpt.as_path());
            let qat = QatJob {
                recipe: job.recipe,
                options: q,
                model_path: job.model_path,
                model_label: job.model_label,
                from: Some(from),
                output,
                checkpoint_dir: Some(ckpt.clone()),
                resume,
                created_by: job.created_by,
            };
            let report = oqt_compress::qat::job::run(&qat, observer.qat(q))?;
            Ok(StepOutcome::of(report.interrupted))
        }
    }
}

/// The float model, loaded once for every step that starts from it.
fn float_model<'a>(job: &PipelineJob<'_>, float: &'a mut Option<LoadedModel>) -> Result<&'a LoadedModel> {
    if float.is_none() {
        *float = Some(oqt_core::load_model(job.model_path)?);
    }
    Ok(float.as_ref().expect("loaded above"))
}

/// What a `prune` or `quantize` step starts from: the previous step's (float,
/// pruned) bundle, loaded into `loaded`, or the float model when it is first.
fn start_model<'a>(
    job: &PipelineJob<'_>,
    input: Option<&Path>,
    float: &'a mut Option<LoadedModel>,
    loaded: &'a mut Option<LoadedModel>,
) -> Result<&'a LoadedModel> {
    match input {
        Some(from) => Ok(loaded.insert(oqt_core::load_model(from)?)),
        None => float_model(job, float),
    }
}

/// A `quantize` step: the recipe's grids by `q.method` (the recipe's default
/// method when absent), options as `oqt quantize` defaults them.
fn quantize(
    recipe: &Recipe,
    q: &QuantizeStep,
    index: usize,
    model: &LoadedModel,
    output: &Path,
    created_by: &str,
    progress: &mut dyn Progress,
) -> Result<()> {
    let name = q.method.as_deref().unwrap_or(&recipe.default_method);
    let method: Method = name.parse().map_err(|e| err(format!("steps[{index}].method: {e}")))?;
    let mut opts = PtqOptions::for_recipe(recipe);
    opts.rtn.clip_search = q.clip_search;
    let outcome = oqt_compress::ptq::quantize(model, recipe, method, &opts, created_by, progress)?;
    outcome.writer.write(output)
}

/// Copy `from` to `to` through a temporary file and a rename: `to` is either
/// the old file or the whole new one.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    }
    let mut tmp = to.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::copy(from, &tmp).map_err(|e| CoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, to).map_err(|e| CoreError::io(to, e))
}
