//! Fine-tuning inside the runtime: zeroth-order LoRA driven by the runtime's
//! own integer forward passes, no Burn on the path — an app that embeds only
//! the runtime can adapt the model on the device. The adapter's factors are
//! the only float state; each SPSA step perturbs them along a direction
//! regenerated from `(seed, step)` ([`oqt_core::zo`], the optimizer Burn's
//! zeroth-order runs use), costs two forward passes per probe, and needs no
//! more memory than inference plus the adapter. Given the same seed, data and
//! options it takes the steps the Burn zeroth-order LoRA run takes, on the
//! runtime's forward instead of training's fake-quant one.

use crate::model::RuntimeModel;
use oqt_core::lora::{LoraAdapter, LoraModule};
use oqt_core::scoring::CausalLm;
use oqt_core::zo::{SpsaConfig, SpsaStep, ZoTrainable, batch_windows, spsa_step};
use oqt_core::{CoreError, Result};

/// A LoRA adapter trained on a runtime model: its factors in the order of
/// Burn's LoRA runs (each adapted linear's `A` then `B`, linears by layer and module).
pub struct RuntimeLora<'a> {
    pub model: &'a RuntimeModel,
    pub adapter: LoraAdapter,
    keys: Vec<(usize, LoraModule)>,
}

impl<'a> RuntimeLora<'a> {
    /// `adapter` on `model` (checked: an adapter for another model is refused, naming `path`).
    pub fn new(model: &'a RuntimeModel, adapter: LoraAdapter, path: &std::path::Path) -> Result<Self> {
        model.check_adapter(&adapter, path)?;
        let keys = adapter.pairs.keys().copied().collect();
        Ok(Self { model, adapter, keys })
    }

    /// Mean next-token cross-entropy over `windows`, each scored on its own
    /// (the objective of Burn's zeroth-order runs).
    pub fn loss(&self, windows: &[Vec<u32>]) -> Result<f32> {
        if windows.is_empty() {
            return Err(CoreError::Other("a training batch needs at least one window".into()));
        }
        let lm = self.model.with_adapter(Some(&self.adapter));
        let mut total = 0f64;
        for w in windows {
            let nll = lm.score_window(w, 0)?.nll;
            total += nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
        }
        Ok((total / windows.len() as f64) as f32)
    }

    /// Held-out perplexity on the first `windows` non-overlapping `seq_len` windows of `tokens`.
    pub fn held_out_perplexity(&self, tokens: &[u32], seq_len: usize, windows: usize) -> Result<f64> {
        let all = oqt_core::zo::held_out_windows(tokens, seq_len, windows)?;
        Ok((self.loss(&all)? as f64).exp())
    }
}

impl ZoTrainable for RuntimeLora<'_> {
    fn tensor_sizes(&self) -> Vec<usize> {
        self.keys
            .iter()
            .flat_map(|k| {
                let p = &self.adapter.pairs[k];
                [p.a.len(), p.b.len()]
            })
            .collect()
    }

    fn update(&mut self, i: usize, a: f32, b: f32, z: &[f32]) {
        let p = self
            .adapter
            .pairs
            .get_mut(&self.keys[i / 2])
            .expect("the adapter's own key");
        let t = if i.is_multiple_of(2) { &mut p.a } else { &mut p.b };
        // As Burn's update computes it: (θ·a) + (z·b), a = 0 replacing θ.
        for (t, &z) in t.iter_mut().zip(z) {
            *t = if a == 0.0 { 0.0 } else { *t * a } + z * b;
        }
    }
}

/// What a run does: the SPSA options, the batches and the evaluations.
#[derive(Debug, Clone)]
pub struct ZoOptions {
    pub spsa: SpsaConfig,
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    /// Held-out evaluation every N steps, at the start and at the end (0: only at the end).
    pub eval_every: u64,
    pub eval_windows: usize,
}

/// Steps `steps.start..steps.end` (within `0..opts.steps`, which the
/// learning-rate schedule spans) of zeroth-order LoRA on `train`, evaluating
/// on `held_out` at the start of a run, every `eval_every` steps and after
/// its last step; `on_step` and `on_eval` report as the run goes, and
/// `interrupted` stops it at a step boundary. A run may be taken in pieces
/// (a checkpoint after each): the pieces take the steps one whole run takes.
/// Returns the next step and the `(step, held-out perplexity)` evaluations.
#[allow(clippy::too_many_arguments)]
pub fn train_zeroth_order(
    lora: &mut RuntimeLora<'_>,
    train: &[u32],
    held_out: &[u32],
    opts: &ZoOptions,
    steps: std::ops::Range<u64>,
    on_step: &mut dyn FnMut(&SpsaStep, f64),
    on_eval: &mut dyn FnMut(u64, f64),
    interrupted: &dyn Fn() -> bool,
) -> Result<(u64, Vec<(u64, f64)>)> {
    let (start, end) = (steps.start, steps.end.min(opts.steps));
    if train.len() < opts.seq_len + 1 {
        return Err(CoreError::Other(format!(
            "training text has {} tokens, fewer than one window of {}",
            train.len(),
            opts.seq_len
        )));
    }
    let mut evals = Vec::new();
    let mut eval = |lora: &RuntimeLora<'_>, step: u64, evals: &mut Vec<(u64, f64)>| -> Result<()> {
        let ppl = lora.held_out_perplexity(held_out, opts.seq_len, opts.eval_windows)?;
        on_eval(step, ppl);
        evals.push((step, ppl));
        Ok(())
    };
    if start == 0 && opts.eval_every > 0 {
        eval(lora, 0, &mut evals)?;
    }
    let mut next = start;
    for step in start..end {
        if interrupted() {
            return Ok((next, evals));
        }
        let windows = batch_windows(train, opts.spsa.seed, step, opts.batch, opts.seq_len);
        let t0 = std::time::Instant::now();
        let s = spsa_step(lora, &opts.spsa, step, opts.steps, &mut |m: &RuntimeLora<'_>| {
            m.loss(&windows)
        })?;
        let tokens = (2 * opts.spsa.n_spsa.max(1) as usize * opts.batch * opts.seq_len) as f64;
        on_step(&s, tokens / t0.elapsed().as_secs_f64());
        next = step + 1;
        if opts.eval_every > 0 && next.is_multiple_of(opts.eval_every) {
            eval(lora, next, &mut evals)?;
        }
    }
    if next == opts.steps && evals.last().is_none_or(|(s, _)| *s != next) {
        eval(lora, next, &mut evals)?;
    }
    Ok((next, evals))
}
