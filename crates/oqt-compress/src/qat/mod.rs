//! The zeroth-order QAT run: batches drawn deterministically from the training
//! tokens, SPSA steps ([`crate::qat::zeroqat`]) on a [`QatModel`], held-out
//! evaluation every N steps, checkpoints every N steps (and on interruption)
//! from which a resumed run continues bit-identically — the batches, like the
//! SPSA directions, are functions of `(seed, step)`.

pub mod data;
pub mod job;
pub mod model;
pub mod zeroqat;

use crate::distill::{WindowTargets, teacher_targets};
use crate::qat::model::{Distill, QatModel, Trainable};
use crate::qat::zeroqat::{SpsaConfig, SpsaStep, ZoTrainable, spsa_step};
use oqt_core::{CoreError, Result};
use oqt_model::llama::Llama;
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QatOptions {
    pub spsa: SpsaConfig,
    pub steps: u64,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Evaluate held-out perplexity every N steps (0: only at the end).
    pub eval_every: u64,
    /// Held-out windows per evaluation.
    pub eval_windows: usize,
    /// Save a checkpoint every N steps (0: only at the end or on interruption).
    pub checkpoint_every: u64,
    pub trainable: Trainable,
    /// Weight `w` of the distillation term (0: next-token cross-entropy only).
    #[serde(default)]
    pub distill_weight: f32,
    /// Teacher tokens kept per position for distillation.
    #[serde(default = "default_top_k")]
    pub distill_top_k: usize,
    /// End on the weights of the lowest held-out perplexity evaluated (the
    /// start's included) instead of the last step's. Does not change the
    /// training path: the checkpoints still hold the last step's weights.
    #[serde(default)]
    pub keep_best: bool,
}

fn default_top_k() -> usize {
    32
}

/// The float teacher's targets for each step's batch, by step.
pub type TeacherTargets = BTreeMap<u64, Vec<WindowTargets>>;

/// The teacher's targets for every batch of steps `from..opts.steps` (the
/// batches are functions of `(seed, step)`, so a resumed run recomputes the
/// same ones). Compute them before building the student and drop the teacher.
pub fn precompute_teacher(
    teacher: &Llama,
    data: &TrainTokens,
    opts: &QatOptions,
    from: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<TeacherTargets> {
    let mut out = BTreeMap::new();
    for step in from..opts.steps {
        let windows = batch_windows(&data.train, opts.spsa.seed, step, opts.batch, opts.seq_len);
        let targets = windows
            .iter()
            .map(|w| teacher_targets(teacher, w, opts.distill_top_k))
            .collect::<Result<Vec<_>>>()?;
        out.insert(step, targets);
        progress(step + 1 - from, opts.steps - from);
    }
    Ok(out)
}

fn distill_for<'a>(teacher: Option<&'a TeacherTargets>, opts: &QatOptions, step: u64) -> Result<Option<Distill<'a>>> {
    match teacher {
        None => Ok(None),
        Some(t) => {
            let targets = t
                .get(&step)
                .ok_or_else(|| CoreError::Other(format!("no distillation targets for step {step}")))?;
            Ok(Some(Distill {
                targets,
                weight: opts.distill_weight,
                hidden: None,
            }))
        }
    }
}

/// Training tokens and the held-out tail used for evaluation.
pub struct TrainTokens {
    pub train: Vec<u32>,
    pub held_out: Vec<u32>,
}

impl TrainTokens {
    /// The last `held_out_fraction` of `tokens` is held out.
    pub fn split(tokens: Vec<u32>, held_out_fraction: f64) -> Self {
        let cut = tokens.len() - (tokens.len() as f64 * held_out_fraction) as usize;
        let mut train = tokens;
        let held_out = train.split_off(cut);
        Self { train, held_out }
    }

    /// Training needs at least one window of `seq_len` tokens (and its next token).
    fn check_window(&self, seq_len: usize) -> Result<()> {
        if self.train.len() < seq_len + 1 {
            return Err(CoreError::Other(format!(
                "training text has {} tokens, fewer than one window of {seq_len}",
                self.train.len()
            )));
        }
        Ok(())
    }
}

pub use oqt_core::zo::batch_windows;

/// Perplexity of `model` on the first `windows` non-overlapping windows of `tokens`.
pub fn held_out_perplexity(
    model: &QatModel,
    tokens: &[u32],
    seq_len: usize,
    windows: usize,
    batch: usize,
) -> Result<f64> {
    let all = oqt_core::zo::held_out_windows(tokens, seq_len, windows)?;
    let mut total = 0f64;
    for chunk in all.chunks(batch.max(1)) {
        total += model.loss(chunk)? as f64 * chunk.len() as f64;
    }
    Ok((total / all.len() as f64).exp())
}

/// What a run reports as it goes.
pub trait QatObserver {
    fn on_step(&mut self, step: &SpsaStep, tokens_per_s: f64);
    fn on_eval(&mut self, step: u64, held_out_ppl: f64);
    fn on_checkpoint(&mut self, step: u64, dir: &Path);
    /// Stop at the next step boundary (Ctrl-C), saving a checkpoint.
    fn interrupted(&self) -> bool;
    /// A phase of the run begins (`calibrating`, `teacher targets`, the
    /// training itself) with `total` units of work; `""` ends the last one.
    fn phase(&mut self, _name: &str, _total: u64) {}
    /// Units of the current phase done.
    fn advance(&mut self, _done: u64) {}
}

/// The lowest held-out perplexity a run has evaluated, and after which step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestEval {
    pub step: u64,
    pub held_out_perplexity: f64,
}

impl BestEval {
    /// Whether `ppl` beats `best` (a first finite evaluation always does).
    fn improved_by(best: Option<Self>, ppl: f64) -> bool {
        ppl.is_finite() && best.is_none_or(|b| ppl < b.held_out_perplexity)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct QatOutcome {
    /// Steps completed (the next step to run).
    pub next_step: u64,
    pub interrupted: bool,
    pub steps: Vec<SpsaStep>,
    /// `(step, held-out perplexity)`.
    pub evals: Vec<(u64, f64)>,
    /// With `keep_best`: the evaluation whose weights the model ends on
    /// (counting evaluations before a resume, from the checkpoint).
    pub best: Option<BestEval>,
}

impl QatOutcome {
    fn starting_at(step: u64) -> Self {
        Self {
            next_step: step,
            interrupted: false,
            steps: Vec::new(),
            evals: Vec::new(),
            best: None,
        }
    }

    /// The last evaluation, if it beats the best so far (`keep_best` runs).
    fn new_best(&self, opts: &QatOptions) -> Option<BestEval> {
        let &(step, ppl) = self.evals.last()?;
        (opts.keep_best && step == self.next_step && BestEval::improved_by(self.best, ppl)).then_some(BestEval {
            step,
            held_out_perplexity: ppl,
        })
    }

    /// Whether the step just completed is an evaluation step.
    fn eval_due(&self, opts: &QatOptions) -> bool {
        opts.eval_every > 0 && self.next_step.is_multiple_of(opts.eval_every)
    }

    /// Held-out perplexity at `next_step`: reported and recorded.
    fn evaluate(
        &mut self,
        model: &QatModel,
        data: &TrainTokens,
        opts: &QatOptions,
        obs: &mut dyn QatObserver,
    ) -> Result<()> {
        let ppl = held_out_perplexity(model, &data.held_out, opts.seq_len, opts.eval_windows, opts.batch)?;
        obs.on_eval(self.next_step, ppl);
        self.evals.push((self.next_step, ppl));
        Ok(())
    }

    /// A run always ends on an evaluation of its final weights.
    fn evaluate_last(
        &mut self,
        model: &QatModel,
        data: &TrainTokens,
        opts: &QatOptions,
        obs: &mut dyn QatObserver,
    ) -> Result<()> {
        if self.evals.last().is_some_and(|(s, _)| *s == self.next_step) {
            return Ok(());
        }
        self.evaluate(model, data, opts, obs)
    }
}

/// Checkpoint: the trainable tensors and the next step, plus the options they
/// were trained with (a resume must use the same ones to be bit-identical).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub next_step: u64,
    pub options: QatOptions,
    /// Recipe name and model the run started from, for the resumer to check.
    pub recipe: String,
    pub start: String,
    /// With `keep_best`: the best evaluation so far, whose weights are in
    /// [`best_weights_dir`] of the checkpoint.
    #[serde(default)]
    pub best: Option<BestEval>,
}

/// Where a `keep_best` run keeps the best weights so far: beside its
/// checkpoint (`run.ckpt` → `run.best`), on disk, so memory stays at
/// inference size. Same format as a checkpoint.
pub fn best_weights_dir(checkpoint: &Path) -> PathBuf {
    checkpoint.with_extension("best")
}

const STATE_FILE: &str = "state.json";
const TENSORS_FILE: &str = "tensors.safetensors";

/// One trainable tensor of a checkpoint, read from the model only when the
/// writer reaches it: the file is streamed tensor by tensor, so saving costs
/// one tensor of memory, not a second copy of the trainable weights.
struct CheckpointTensor<'a> {
    model: &'a QatModel,
    index: usize,
    shape: [usize; 1],
}

impl safetensors::View for CheckpointTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let values = self.model.tensor_values(self.index);
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.shape[0] * 4
    }
}

/// Write `state` and `model`'s trainable tensors to `dir`, replacing it atomically
/// (written beside it, then renamed).
pub fn save_checkpoint(dir: &Path, state: &CheckpointState, model: &QatModel) -> Result<()> {
    oqt_core::fs::write_dir_atomically(dir, |tmp| {
        let views = model
            .tensor_names()
            .into_iter()
            .zip(model.tensor_sizes())
            .enumerate()
            .map(|(index, (name, size))| {
                (
                    name,
                    CheckpointTensor {
                        model,
                        index,
                        shape: [size],
                    },
                )
            });
        let tensors = tmp.join(TENSORS_FILE);
        safetensors::serialize_to_file(views, None, &tensors)
            .map_err(|e| CoreError::Other(format!("{}: {e}", tensors.display())))?;
        let state_path = tmp.join(STATE_FILE);
        std::fs::write(&state_path, serde_json::to_string_pretty(state).expect("serializable"))
            .map_err(|e| CoreError::io(&state_path, e))
    })
}

/// Read a checkpoint's state (to rebuild the run) without its tensors.
pub fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| CoreError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| CoreError::Malformed {
        path: p,
        format: "checkpoint state",
        reason: e.to_string(),
    })
}

/// Put a checkpoint's tensors into `model` (same trainable set required).
pub fn restore_checkpoint(dir: &Path, model: &mut QatModel) -> Result<()> {
    let p = dir.join(TENSORS_FILE);
    // Mapped, not read: resuming holds the model plus one tensor at a time.
    let file = std::fs::File::open(&p).map_err(|e| CoreError::io(&p, e))?;
    // SAFETY: the checkpoint is only read; oqt replaces checkpoints by renaming
    // a new directory into place, never by rewriting this file.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CoreError::io(&p, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| CoreError::Malformed {
        path: p.clone(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    let sizes = model.tensor_sizes();
    for (i, name) in model.tensor_names().into_iter().enumerate() {
        let t = st.tensor(&name).map_err(|_| CoreError::Missing {
            path: p.clone(),
            what: "checkpoint tensor",
            name: name.clone(),
        })?;
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.len() != sizes[i] {
            return Err(CoreError::BadField {
                path: p.clone(),
                field: name,
                expected: format!("{} values", sizes[i]),
                found: values.len().to_string(),
            });
        }
        model.set_tensor(i, &values);
    }
    Ok(())
}

/// Run steps `start_step..opts.steps`; checkpoints go to `checkpoint` (if any).
/// With `opts.keep_best` the best evaluated weights are saved to
/// [`best_weights_dir`] of the checkpoint (which is then required) and the
/// model ends on them; the last checkpoint keeps the last step's weights.
pub fn train_zeroth_order(
    model: &mut QatModel,
    data: &TrainTokens,
    opts: &QatOptions,
    start_step: u64,
    checkpoint: Option<(&Path, &CheckpointState)>,
    teacher: Option<&TeacherTargets>,
    obs: &mut dyn QatObserver,
) -> Result<QatOutcome> {
    data.check_window(opts.seq_len)?;
    let best_dir = match (opts.keep_best, checkpoint) {
        (false, _) => None,
        (true, Some((dir, _))) => Some(best_weights_dir(dir)),
        (true, None) => {
            return Err(CoreError::Other(
                "keep_best needs a checkpoint directory: the best weights are kept beside it".into(),
            ));
        }
    };
    let mut out = QatOutcome::starting_at(start_step);
    out.best = checkpoint.and_then(|(_, s)| s.best).filter(|_| opts.keep_best);
    let state_at = |next: u64, best: Option<BestEval>| {
        checkpoint.map(|(dir, state)| {
            (
                dir,
                CheckpointState {
                    next_step: next,
                    best,
                    ..state.clone()
                },
            )
        })
    };
    let save = |model: &QatModel, next: u64, best: Option<BestEval>, obs: &mut dyn QatObserver| -> Result<()> {
        if let Some((dir, state)) = state_at(next, best) {
            save_checkpoint(dir, &state, model)?;
            obs.on_checkpoint(next, dir);
        }
        Ok(())
    };
    // After each evaluation: a new best's weights go to the best directory.
    let keep = |model: &QatModel, out: &mut QatOutcome| -> Result<()> {
        if let (Some(best), Some(dir)) = (out.new_best(opts), &best_dir) {
            let (_, state) = state_at(best.step, Some(best)).expect("keep_best has a checkpoint");
            save_checkpoint(dir, &state, model)?;
            out.best = Some(best);
        }
        Ok(())
    };
    if start_step == 0 && opts.eval_every > 0 {
        out.evaluate(model, data, opts, obs)?;
        keep(model, &mut out)?;
    }
    for step in start_step..opts.steps {
        if obs.interrupted() {
            out.interrupted = true;
            save(model, step, out.best, obs)?;
            return Ok(out);
        }
        let windows = batch_windows(&data.train, opts.spsa.seed, step, opts.batch, opts.seq_len);
        let t0 = std::time::Instant::now();
        let distill = distill_for(teacher, opts, step)?;
        let s = spsa_step(model, &opts.spsa, step, opts.steps, &mut |m: &QatModel| {
            m.objective(&windows, distill)
        })?;
        // Two forward passes per probe.
        let tokens = (2 * opts.spsa.n_spsa.max(1) as usize * opts.batch * opts.seq_len) as f64;
        obs.on_step(&s, tokens / t0.elapsed().as_secs_f64());
        out.steps.push(s);
        out.next_step = step + 1;
        if out.eval_due(opts) {
            out.evaluate(model, data, opts, obs)?;
            keep(model, &mut out)?;
        }
        if opts.checkpoint_every > 0 && out.next_step.is_multiple_of(opts.checkpoint_every) {
            save(model, out.next_step, out.best, obs)?;
        }
    }
    out.evaluate_last(model, data, opts, obs)?;
    keep(model, &mut out)?;
    // The checkpoint continues the training path; the model ends on the best.
    save(model, out.next_step, out.best, obs)?;
    if let (Some(best), Some(dir)) = (out.best, &best_dir)
        && best.step != out.next_step
    {
        restore_checkpoint(dir, model)?;
    }
    Ok(out)
}

/// First-order QAT, the baseline ZeroQAT is compared with: the same batches
/// (from `(seed, step)`), loss, fake quantizers and trainable set, with
/// gradients by backpropagation (straight-through rounding) and AdamW at
/// `opts.spsa.lr` / `schedule` / `weight_decay` (ε and n-SPSA do not apply).
/// `model` must live on an autodiff device. Its memory is the model plus
/// gradients, two AdamW moments per trainable value and the activations of
/// the whole batch kept for the backward pass. No checkpoints (the AdamW
/// moments are not saved): an interrupted run stops without a result.
/// Steps are reported with `loss_plus = loss_minus =` the batch loss and a
/// projected gradient of 0. With `opts.keep_best` the best evaluated
/// trainable tensors are copied in memory (first-order memory is several
/// times inference's already) and the model ends on them.
/// With `hidden`, each step also matches the student's block outputs to the
/// teacher's ([`crate::distill::hidden`]).
pub fn train_first_order(
    mut model: QatModel,
    data: &TrainTokens,
    opts: &QatOptions,
    teacher: Option<&TeacherTargets>,
    hidden: Option<&crate::distill::hidden::HiddenTeacher>,
    obs: &mut dyn QatObserver,
) -> Result<(QatModel, QatOutcome)> {
    data.check_window(opts.seq_len)?;
    let mut out = QatOutcome::starting_at(0);
    let mut best_values: Option<Vec<Vec<f32>>> = None;
    let mut keep = |model: &QatModel, out: &mut QatOutcome| {
        if let Some(best) = out.new_best(opts) {
            best_values = Some(
                (0..model.tensor_sizes().len())
                    .map(|i| model.tensor_values(i))
                    .collect(),
            );
            out.best = Some(best);
        }
    };
    if opts.eval_every > 0 {
        out.evaluate(&model, data, opts, obs)?;
        keep(&model, &mut out);
    }
    let mut adam = crate::qat::model::FirstOrder::new(opts.spsa.weight_decay);
    for step in 0..opts.steps {
        if obs.interrupted() {
            out.interrupted = true;
            return Ok((model, out));
        }
        let windows = batch_windows(&data.train, opts.spsa.seed, step, opts.batch, opts.seq_len);
        let t0 = std::time::Instant::now();
        let lr = opts.spsa.schedule.at(opts.spsa.lr, step, opts.steps);
        let states = match hidden {
            Some(h) => h.targets(&windows, &model.device())?,
            None => Vec::new(),
        };
        let distill = distill_for(teacher, opts, step)?.map(|d| Distill {
            hidden: hidden.map(|h| crate::qat::model::HiddenMatch {
                states: &states,
                weight: h.weight,
            }),
            ..d
        });
        let (next, loss) = model.first_order_step(&windows, distill, lr, &mut adam)?;
        model = next;
        let s = SpsaStep {
            step,
            loss_plus: loss,
            loss_minus: loss,
            projected_grad: 0.0,
            lr,
        };
        obs.on_step(&s, (opts.batch * opts.seq_len) as f64 / t0.elapsed().as_secs_f64());
        out.steps.push(s);
        out.next_step = step + 1;
        if out.eval_due(opts) {
            out.evaluate(&model, data, opts, obs)?;
            keep(&model, &mut out);
        }
    }
    out.evaluate_last(&model, data, opts, obs)?;
    keep(&model, &mut out);
    if let (Some(best), Some(values)) = (out.best, best_values)
        && best.step != out.next_step
    {
        for (i, v) in values.iter().enumerate() {
            model.set_tensor(i, v);
        }
    }
    Ok((model, out))
}

/// Where checkpoints go by default: beside the output bundle.
pub fn default_checkpoint_dir(output: &Path) -> PathBuf {
    output.with_extension("ckpt")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use oqt_core::quant::builtin_recipe;
    use oqt_core::testing::{random_weights, tiny_config};

    fn model() -> QatModel {
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 8), &Device::flex());
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        QatModel::new(llama, spec, None).unwrap()
    }

    struct Quiet {
        stop_at: Option<u64>,
        seen: u64,
    }
    impl QatObserver for Quiet {
        fn on_step(&mut self, s: &SpsaStep, _: f64) {
            self.seen = s.step + 1;
        }
        fn on_eval(&mut self, _: u64, _: f64) {}
        fn on_checkpoint(&mut self, _: u64, _: &Path) {}
        fn interrupted(&self) -> bool {
            self.stop_at.is_some_and(|s| self.seen >= s)
        }
    }

    fn options() -> QatOptions {
        QatOptions {
            spsa: SpsaConfig {
                eps: 1e-2,
                lr: 1e-3,
                grad_clip: 20.0,
                seed: 9,
                ..Default::default()
            },
            steps: 8,
            batch: 2,
            seq_len: 16,
            eval_every: 4,
            eval_windows: 2,
            checkpoint_every: 3,
            trainable: Trainable::Full,
            distill_weight: 0.0,
            distill_top_k: 32,
            keep_best: false,
        }
    }

    fn tokens() -> TrainTokens {
        TrainTokens::split((0..400u32).map(|i| (i * 37 % 250) + 3).collect(), 0.2)
    }

    /// The checkpoint state of a run of `opts` that has not started.
    fn start_state(opts: &QatOptions) -> CheckpointState {
        CheckpointState {
            next_step: 0,
            options: opts.clone(),
            recipe: "w4a8-dyn".into(),
            start: "tiny".into(),
            best: None,
        }
    }

    fn assert_same_weights(a: &QatModel, b: &QatModel, what: &str) {
        for i in 0..a.tensor_sizes().len() {
            let (x, y) = (a.tensor_values(i), b.tensor_values(i));
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "tensor {i} differs: {what}"
            );
        }
    }

    /// A first-order (autodiff) student of the tiny model.
    fn first_order_model() -> QatModel {
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 8), &Device::flex().autodiff());
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        QatModel::new(llama, spec, None).unwrap()
    }

    /// The resume contract, on a synthetic model: interrupt (as Ctrl-C
    /// does), resume from the checkpoint, end on the uninterrupted run's weights.
    #[test]
    fn an_interrupted_and_resumed_run_ends_on_the_same_weights() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, data) = (options(), tokens());
        let state = start_state(&opts);
        let mut straight = model();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        train_zeroth_order(&mut straight, &data, &opts, 0, None, None, &mut quiet).unwrap();

        let ckpt = dir.path().join("run.ckpt");
        let mut first = model();
        let mut stopper = Quiet {
            stop_at: Some(5),
            seen: 0,
        };
        let o = train_zeroth_order(&mut first, &data, &opts, 0, Some((&ckpt, &state)), None, &mut stopper).unwrap();
        assert!(o.interrupted && o.next_step == 5);
        drop(first);

        let saved = read_checkpoint_state(&ckpt).unwrap();
        assert_eq!(saved.next_step, 5);
        let mut resumed = model();
        restore_checkpoint(&ckpt, &mut resumed).unwrap();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        train_zeroth_order(
            &mut resumed,
            &data,
            &saved.options,
            saved.next_step,
            Some((&ckpt, &state)),
            None,
            &mut quiet,
        )
        .unwrap();
        assert_same_weights(&straight, &resumed, "after resume");
    }

    #[test]
    fn first_order_training_lowers_the_loss_on_the_same_batches() {
        let model = first_order_model();
        let opts = QatOptions {
            spsa: SpsaConfig {
                lr: 3e-3,
                ..options().spsa
            },
            steps: 12,
            eval_every: 0,
            ..options()
        };
        let data = tokens();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        let (_, out) = train_first_order(model, &data, &opts, None, None, &mut quiet).unwrap();
        let first: f32 = out.steps[..3].iter().map(|s| s.loss_plus).sum();
        let last: f32 = out.steps[9..].iter().map(|s| s.loss_plus).sum();
        assert!(last < first - 0.03, "loss {first} → {last} (sums of 3 steps)");
        assert_eq!(out.evals.len(), 1, "held-out perplexity at the end");
    }

    /// Options under which held-out perplexity first falls, then rises above
    /// its best (a rate too large for the tiny model), so the best is not the last.
    fn overshooting() -> QatOptions {
        QatOptions {
            spsa: SpsaConfig {
                lr: 3e-2,
                ..options().spsa
            },
            steps: 12,
            eval_every: 2,
            keep_best: true,
            ..options()
        }
    }

    /// `keep_best`: the model ends on the weights of the lowest held-out
    /// evaluation, not the last step's, and the checkpoint keeps the last
    /// step's for a resume.
    #[test]
    fn keep_best_ends_on_the_lowest_held_out_weights() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, data) = (overshooting(), tokens());
        let ckpt = dir.path().join("run.ckpt");
        let state = start_state(&opts);
        let mut m = model();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        let out = train_zeroth_order(&mut m, &data, &opts, 0, Some((&ckpt, &state)), None, &mut quiet).unwrap();
        let best = out.best.expect("a best evaluation");
        let lowest = out.evals.iter().map(|e| e.1).fold(f64::INFINITY, f64::min);
        assert_eq!(best.held_out_perplexity, lowest);
        let last = out.evals.last().unwrap();
        assert!(
            best.step != last.0 && best.step > 0 && last.1 > lowest,
            "the test needs a best in the middle of the run: {:?}",
            out.evals
        );
        let ppl = held_out_perplexity(&m, &data.held_out, opts.seq_len, opts.eval_windows, opts.batch).unwrap();
        assert_eq!(ppl, lowest, "the model holds the best weights");

        // Without keep_best the same run ends on the last step's weights,
        // which the checkpoint holds.
        let mut plain = model();
        let no_keep = QatOptions {
            keep_best: false,
            ..opts.clone()
        };
        let out = train_zeroth_order(&mut plain, &data, &no_keep, 0, None, None, &mut quiet).unwrap();
        assert!(out.best.is_none());
        let mut from_ckpt = model();
        restore_checkpoint(&ckpt, &mut from_ckpt).unwrap();
        assert_same_weights(&plain, &from_ckpt, "the checkpoint holds the last step");
        let saved = read_checkpoint_state(&ckpt).unwrap();
        assert_eq!((saved.next_step, saved.best), (opts.steps, Some(best)));
        // And the best directory holds what the model ended on.
        let mut from_best = model();
        restore_checkpoint(&best_weights_dir(&ckpt), &mut from_best).unwrap();
        assert_same_weights(&m, &from_best, "the best directory holds the best");
    }

    /// A `keep_best` run stopped before its best and resumed still ends on
    /// the uninterrupted run's best; one stopped after it remembers it.
    #[test]
    fn keep_best_survives_a_resume() {
        let (opts, data) = (overshooting(), tokens());
        let straight_dir = tempfile::tempdir().unwrap();
        let state = start_state(&opts);
        let straight_ckpt = straight_dir.path().join("run.ckpt");
        let mut straight = model();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        let want = train_zeroth_order(
            &mut straight,
            &data,
            &opts,
            0,
            Some((&straight_ckpt, &state)),
            None,
            &mut quiet,
        )
        .unwrap()
        .best
        .unwrap();
        for stop_at in [1, 11] {
            let dir = tempfile::tempdir().unwrap();
            let ckpt = dir.path().join("run.ckpt");
            let mut first = model();
            let mut stopper = Quiet {
                stop_at: Some(stop_at),
                seen: 0,
            };
            let o = train_zeroth_order(&mut first, &data, &opts, 0, Some((&ckpt, &state)), None, &mut stopper).unwrap();
            assert!(o.interrupted && o.next_step == stop_at);
            let saved = read_checkpoint_state(&ckpt).unwrap();
            let mut resumed = model();
            restore_checkpoint(&ckpt, &mut resumed).unwrap();
            let got = train_zeroth_order(
                &mut resumed,
                &data,
                &saved.options,
                saved.next_step,
                Some((&ckpt, &saved)),
                None,
                &mut quiet,
            )
            .unwrap()
            .best;
            assert_eq!(got, Some(want), "stopped at {stop_at}");
            assert_same_weights(&straight, &resumed, &format!("resumed from step {stop_at}"));
        }
    }

    #[test]
    fn keep_best_without_a_checkpoint_directory_is_refused() {
        let mut m = model();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        let e = train_zeroth_order(&mut m, &tokens(), &overshooting(), 0, None, None, &mut quiet).unwrap_err();
        assert!(e.to_string().contains("checkpoint directory"), "{e}");
    }

    #[test]
    fn first_order_keep_best_ends_on_the_lowest_held_out_weights() {
        let opts = QatOptions {
            spsa: SpsaConfig {
                lr: 0.3,
                ..options().spsa
            },
            ..overshooting()
        };
        let data = tokens();
        let mut quiet = Quiet { stop_at: None, seen: 0 };
        let (m, out) = train_first_order(first_order_model(), &data, &opts, None, None, &mut quiet).unwrap();
        let best = out.best.expect("a best evaluation");
        let lowest = out.evals.iter().map(|e| e.1).fold(f64::INFINITY, f64::min);
        let last = out.evals.last().unwrap();
        assert!(
            best.held_out_perplexity == lowest && best.step != last.0 && last.1 > lowest,
            "the test needs a best before the end: {:?}",
            out.evals
        );
        let ppl = held_out_perplexity(&m, &data.held_out, opts.seq_len, opts.eval_windows, opts.batch).unwrap();
        assert_eq!(ppl, lowest, "the model holds the best weights");
    }

    #[test]
    fn batches_are_a_function_of_seed_and_step() {
        let t: Vec<u32> = (0..100).collect();
        assert_eq!(batch_windows(&t, 1, 7, 3, 10), batch_windows(&t, 1, 7, 3, 10));
        assert_ne!(batch_windows(&t, 1, 7, 3, 10), batch_windows(&t, 1, 8, 3, 10));
        assert!(batch_windows(&t, 1, 7, 3, 10).iter().all(|w| w.len() == 10));
    }
}
