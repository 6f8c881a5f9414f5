//! FoldGPT's block gates: which blocks to remove, learned. Every decoder
//! block's residual contribution is scaled by a gate, `x ← x + g_l·(block(x) − x)`,
//! and the objective is the folded model's KL to the full model's top-k
//! next-token distribution on calibration text.
//!
//! The budget is exact: the gates stand at a hard point — 1 for the kept
//! blocks, 0 for the removed ones, the folded model itself — and their
//! gradient there says, for every block, what adding it back (a removed one)
//! or taking it out (a kept one) would do *in the current folded model*: how
//! blocks stand in for each other once some are gone, which a one-shot score
//! such as Block Influence cannot see. A first trial at training the gates
//! by top-k straight-through (the logits moved by that gradient, the hard set
//! re-chosen every step) wandered: the per-batch gradient is noisy and every
//! step reordered the blocks (BENCHMARKS.md, "Depth"). So the gradient
//! proposes and held-out text decides: from Block Influence's set, each
//! round swaps the removed blocks the gradient most wants back with the kept
//! ones it misses least, evaluates the proposals' exact KL on validation
//! windows the gradient never saw, and takes the best swap while it lowers
//! the KL. Every set evaluated is reported.

use crate::distill::{WindowTargets, kl_to_targets, teacher_targets};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};
use oqt_core::{CoreError, Result};
use oqt_model::NoHooks;
use oqt_model::llama::Llama;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct GateOptions {
    /// Swap rounds at most (each: one gate gradient, `proposals²` evaluations).
    pub rounds: usize,
    /// Blocks proposed on each side of a swap per round.
    pub proposals: usize,
    /// Training windows each gate gradient averages over.
    pub grad_windows: usize,
    /// Teacher tokens kept per position.
    pub top_k: usize,
}

impl Default for GateOptions {
    fn default() -> Self {
        Self {
            rounds: 8,
            proposals: 3,
            grad_windows: 4,
            top_k: 32,
        }
    }
}

/// A set of removed blocks evaluated and its validation KL.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub removed: Vec<usize>,
    pub validation_kl: f64,
    /// The round that proposed it (0: Block Influence's set).
    pub round: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateOutcome {
    /// The chosen blocks to remove (the best candidate), sorted.
    pub removed: Vec<usize>,
    /// The last round's gate gradient `∂KL/∂g_l` at the chosen set.
    pub gate_gradient: Vec<f64>,
    /// Validation KL of the accepted set after each round (the start first).
    pub accepted_kl: Vec<f64>,
    pub candidates: Vec<Candidate>,
}

/// The `remove` blocks of lowest influence, sorted.
pub fn lowest(scores: &[f64], remove: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut r = order[..remove].to_vec();
    r.sort_unstable();
    r
}

fn hard_gates(n: usize, removed: &[usize]) -> Vec<f32> {
    (0..n).map(|l| if removed.contains(&l) { 0.0 } else { 1.0 }).collect()
}

/// The KL to `targets` of the model with each block's contribution scaled
/// by `gates` (`[n_layers]`, on `model`'s device).
fn gated_kl(model: &Llama, windows: &[Vec<u32>], targets: &[WindowTargets], gates: Tensor<1>) -> Result<Tensor<1>> {
    let (b, s) = (windows.len(), windows[0].len());
    let device = model.device();
    let ids: Vec<i64> = windows.iter().flatten().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let pos = model.positions(s, &device);
    let mut x = model.embed_with(tokens, &NoHooks);
    for l in 0..model.n_layers() {
        let g = gates.clone().narrow(0, l, 1).reshape([1, 1, 1]);
        let y = model.layer_with(l, x.clone(), &pos, &NoHooks);
        x = x.clone() + (y - x) * g;
    }
    let d = x.dims()[2];
    let hidden = model.final_norm(x.slice([0..b, 0..s - 1, 0..d]));
    kl_to_targets(log_softmax(model.logits(hidden), 2), targets)
}

/// The folded model's KL on `windows` (one at a time, no graph).
fn removal_kl(model: &Llama, removed: &[usize], windows: &[Vec<u32>], targets: &[WindowTargets]) -> Result<f64> {
    let n = model.n_layers();
    let device = model.device();
    let gates = hard_gates(n, removed);
    let mut total = 0.0;
    for (w, t) in windows.iter().zip(targets) {
        let g = Tensor::<1>::from_data(TensorData::new(gates.clone(), [n]), &device);
        let kl = gated_kl(model, std::slice::from_ref(w), std::slice::from_ref(t), g)?;
        total += crate::stats::inputs::to_vec(kl)[0] as f64;
    }
    Ok(total / windows.len() as f64)
}

/// `∂KL/∂g_l` for every block at the hard gates of `removed`, averaged over `windows`.
fn gate_gradient(
    model: &Llama,
    removed: &[usize],
    windows: &[Vec<u32>],
    targets: &[WindowTargets],
) -> Result<Vec<f64>> {
    let n = model.n_layers();
    let device = model.device();
    let mut sum = vec![0f64; n];
    // One window at a time: the vocabulary-wide logits of one window are the largest buffer.
    for (w, t) in windows.iter().zip(targets) {
        let gates = Tensor::<1>::from_data(TensorData::new(hard_gates(n, removed), [n]), &device).require_grad();
        let kl = gated_kl(model, std::slice::from_ref(w), std::slice::from_ref(t), gates.clone())?;
        let grads = kl.backward();
        let g = gates
            .grad(&grads)
            .ok_or_else(|| CoreError::Other("block gates: no gradient reached the gates".into()))?;
        for (s, v) in sum.iter_mut().zip(crate::stats::inputs::to_vec(g)) {
            *s += v as f64 / windows.len() as f64;
        }
    }
    Ok(sum)
}

/// Choose which `remove` blocks of `model` to drop. `model` must live on an
/// autodiff device (only the gates take gradients); `influence` (one value
/// per block) gives the starting set; the last quarter of `windows` (at least
/// one) validates, the rest give the gradients.
pub fn learn_removal(
    model: &Llama,
    windows: &[Vec<u32>],
    influence: &[f64],
    remove: usize,
    opts: &GateOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<GateOutcome> {
    let n = model.n_layers();
    crate::fold::remove::check_removal(&(0..remove).collect::<Vec<_>>(), n)?;
    if influence.len() != n {
        return Err(CoreError::Other(format!(
            "gate seeds: {} values for {n} blocks",
            influence.len()
        )));
    }
    if windows.len() < 2 || opts.grad_windows == 0 || opts.proposals == 0 {
        return Err(CoreError::Other(format!(
            "block gates need at least 2 calibration windows and ≥ 1 gradient window and proposal (found {} windows)",
            windows.len()
        )));
    }
    let device = model.device();
    if !device.is_autodiff() {
        return Err(CoreError::Other("block gates train on an autodiff device".into()));
    }
    let frozen = burn::module::Module::no_grad(model.clone());
    let inference = burn::module::Module::valid(&frozen);
    let n_val = (windows.len() / 4).max(1);
    let (train, val) = windows.split_at(windows.len() - n_val);
    let targets = |ws: &[Vec<u32>]| -> Result<Vec<WindowTargets>> {
        ws.iter().map(|w| teacher_targets(&inference, w, opts.top_k)).collect()
    };
    let (train_t, val_t) = (targets(train)?, targets(val)?);

    let mut removed = lowest(influence, remove);
    let mut best = removal_kl(&inference, &removed, val, &val_t)?;
    let mut candidates = vec![Candidate {
        removed: removed.clone(),
        validation_kl: best,
        round: 0,
    }];
    let mut accepted_kl = vec![best];
    let mut gradient = vec![0.0; n];
    for round in 1..=opts.rounds {
        // A different slice of the training windows each round.
        let k = opts.grad_windows.min(train.len());
        let idx: Vec<usize> = (0..k).map(|i| ((round - 1) * k + i) % train.len()).collect();
        let ws: Vec<Vec<u32>> = idx.iter().map(|&i| train[i].clone()).collect();
        let ts: Vec<WindowTargets> = idx.iter().map(|&i| train_t[i].clone()).collect();
        gradient = gate_gradient(&frozen, &removed, &ws, &ts)?;
        // Adding removed block a back changes KL by ≈ ∂KL/∂g_a (most negative: most wanted);
        // taking kept block b out by ≈ −∂KL/∂g_b (most positive gradient: least missed).
        let mut wanted: Vec<usize> = removed.clone();
        wanted.sort_by(|&a, &b| gradient[a].total_cmp(&gradient[b]));
        let mut spare: Vec<usize> = (0..n).filter(|l| !removed.contains(l)).collect();
        spare.sort_by(|&a, &b| gradient[b].total_cmp(&gradient[a]));
        let mut round_best: Option<(f64, Vec<usize>)> = None;
        for &a in wanted.iter().take(opts.proposals) {
            for &b in spare.iter().take(opts.proposals) {
                let mut set: Vec<usize> = removed.iter().map(|&r| if r == a { b } else { r }).collect();
                set.sort_unstable();
                if candidates.iter().any(|c| c.removed == set) {
                    continue;
                }
                let kl = removal_kl(&inference, &set, val, &val_t)?;
                candidates.push(Candidate {
                    removed: set.clone(),
                    validation_kl: kl,
                    round,
                });
                if round_best.as_ref().is_none_or(|(k, _)| kl < *k) {
                    round_best = Some((kl, set));
                }
            }
        }
        progress(round, opts.rounds);
        match round_best {
            Some((kl, set)) if kl < best => {
                tracing::info!(round, kl, ?set, "block gates: swap accepted");
                best = kl;
                removed = set;
                accepted_kl.push(kl);
            }
            _ => break,
        }
    }
    Ok(GateOutcome {
        removed,
        gate_gradient: gradient,
        accepted_kl,
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use oqt_core::testing::{random_weights, tiny_config};
    use oqt_model::hooks::Proj;

    /// Of three blocks, one writes nothing (its o and down projections are
    /// zero): removing it leaves the output unchanged, and the gates — started
    /// from removing another block — find it; the gradient of a gate whose
    /// block writes nothing is zero.
    #[test]
    fn gates_remove_the_block_that_does_nothing() {
        let cfg = oqt_core::LlamaConfig {
            num_layers: 3,
            ..tiny_config()
        };
        let device = Device::flex().autodiff();
        let mut model = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 9), &device);
        for p in [Proj::O, Proj::Down] {
            let len = model.decoder_linear(1, p).weight.val().dims().iter().product::<usize>();
            oqt_model::set_decoder_weight(&mut model, 1, p, &vec![0.0; len]);
        }
        let windows: Vec<Vec<u32>> = (0..8)
            .map(|s| (0..24).map(|i| ((i * 11 + s * 7) % 290) as u32 + 3).collect())
            .collect();
        // Influences that rank block 0 lowest: the first folded model removes block 0.
        let seeds = [0.0, 0.5, 1.0];
        let opts = GateOptions {
            rounds: 3,
            proposals: 2,
            grad_windows: 2,
            top_k: 8,
        };
        let out = learn_removal(&model, &windows, &seeds, 1, &opts, |_, _| {}).unwrap();
        assert_eq!(out.candidates[0].removed, vec![0]);
        assert_eq!(out.removed, vec![1], "{out:?}");
        assert_eq!(out.gate_gradient[1], 0.0, "{out:?}");
        // The top-k KL of the full model itself is the floor (the renormalized
        // targets leave the mass outside the top k): removing block 1 reaches it.
        let n_val = windows.len() / 4;
        let val = &windows[windows.len() - n_val..];
        let inference = burn::module::Module::valid(&model);
        let val_t: Vec<WindowTargets> = val.iter().map(|w| teacher_targets(&inference, w, 8).unwrap()).collect();
        let floor = removal_kl(&inference, &[], val, &val_t).unwrap();
        let best = out.candidates.iter().find(|c| c.removed == vec![1]).unwrap();
        assert!((best.validation_kl - floor).abs() < 1e-4, "{floor} {out:?}");
        assert!(out.candidates[0].validation_kl > floor + 0.1, "{floor} {out:?}");
        assert!(learn_removal(&model, &windows, &seeds, 3, &opts, |_, _| {}).is_err());
    }
}
