//! Block weight sharing (FoldGPT's group sharing, in groups of two): a block
//! keeps its norms and uses the block before it's seven linears, each output
//! row scaled by its own least-squares factor ([`fit_row_scales`]). Which
//! pairs share is decided by the KL each tie alone causes on validation
//! windows, pairs disjoint, the cheapest first.

use crate::distill::targets::{WindowTargets, kl_to_targets, teacher_targets};
use oqt_core::sharing::{SharedWeight, fit_row_scales};
use oqt_core::weights::{ModelWeights, names};
use oqt_core::{CoreError, LlamaConfig, Result};
use oqt_model::Llama;
use serde::Serialize;
use std::collections::BTreeMap;

/// The linears a shared block takes from its source (norms stay its own).
pub const SHARED_LINEARS: [&str; 7] = [
    names::Q,
    names::K,
    names::V,
    names::O,
    names::GATE,
    names::UP,
    names::DOWN,
];

/// A block that uses another block's linears.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SharedBlock {
    /// The block, by its index in the folded model.
    pub block: usize,
    /// The block whose linears it uses (the one before it).
    pub source: usize,
    /// KL to the unshared model on the validation windows with this tie alone.
    pub validation_kl: f64,
}

/// Tie block `target`'s linears to block `source`'s: the shared weights
/// (for the bundle) and `weights` updated to the dense values they stand for.
pub fn tie_block(weights: &mut ModelWeights, source: usize, target: usize) -> Result<BTreeMap<String, SharedWeight>> {
    let mut shared = BTreeMap::new();
    for suffix in SHARED_LINEARS {
        let (of, name) = (names::layer(source, suffix), names::layer(target, suffix));
        let missing = |n: &str| CoreError::Other(format!("sharing block {target} with block {source}: no tensor {n}"));
        let src = weights.get(&of).ok_or_else(|| missing(&of))?.clone();
        let dst = weights.get(&name).ok_or_else(|| missing(&name))?;
        if src.shape != dst.shape || src.shape.len() != 2 {
            return Err(CoreError::Other(format!(
                "{name} {:?} cannot share {of} {:?}: shapes differ",
                dst.shape, src.shape
            )));
        }
        let w = SharedWeight {
            of: of.clone(),
            row_scales: fit_row_scales(&src.data, &dst.data, src.shape[1]),
        };
        let dense = oqt_core::TensorF32::new(src.shape.clone(), w.expand(&src.data));
        let source_type = weights.source_type(&name).unwrap_or("F32").to_string();
        weights.insert(name.clone(), dense, source_type);
        shared.insert(name, w);
    }
    Ok(shared)
}

/// Parameters a shared block no longer stores: its linears, less their row scales.
pub fn shared_params_saved(cfg: &LlamaConfig, block: usize) -> usize {
    let (h, q, kv, m) = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size_of(block),
    );
    let weights = h * (q + 2 * kv) + q * h + 3 * h * m;
    let scales = q + 2 * kv + h + 2 * m + h;
    weights - scales
}

/// Choose `count` disjoint pairs (block `b` sharing block `b − 1`) of the
/// model `weights` of `cfg`: each candidate tie is scored alone by the KL it
/// causes on `windows` (top-`top_k` targets of the unshared model), and the
/// cheapest disjoint ones are taken.
pub fn choose_shared(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    windows: &[Vec<u32>],
    count: usize,
    top_k: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<SharedBlock>> {
    let n = cfg.num_layers;
    if count == 0 {
        return Ok(Vec::new());
    }
    if 2 * count > n {
        return Err(CoreError::Other(format!(
            "sharing {count} blocks needs {} blocks in disjoint pairs; the model has {n}",
            2 * count
        )));
    }
    for l in 1..n {
        if cfg.intermediate_size_of(l) != cfg.intermediate_size_of(l - 1) {
            return Err(CoreError::Other(format!(
                "blocks {} and {l} have different MLP widths: they cannot share weights",
                l - 1
            )));
        }
    }
    let device = burn::tensor::Device::flex();
    let reference = oqt_model::llama_from_weights(cfg, weights.clone(), &device);
    let targets: Vec<WindowTargets> = windows
        .iter()
        .map(|w| teacher_targets(&reference, w, top_k))
        .collect::<Result<_>>()?;
    drop(reference);
    let mut scored = Vec::with_capacity(n - 1);
    for block in 1..n {
        let mut tied = weights.clone();
        tie_block(&mut tied, block - 1, block)?;
        let model = oqt_model::llama_from_weights(cfg, tied, &device);
        scored.push(SharedBlock {
            block,
            source: block - 1,
            validation_kl: mean_kl(&model, windows, &targets)?,
        });
        progress(block, n - 1);
    }
    scored.sort_by(|a, b| a.validation_kl.total_cmp(&b.validation_kl));
    let mut used = vec![false; n];
    let mut chosen = Vec::with_capacity(count);
    for s in scored {
        if chosen.len() == count {
            break;
        }
        if !used[s.block] && !used[s.source] {
            used[s.block] = true;
            used[s.source] = true;
            chosen.push(s);
        }
    }
    chosen.sort_by_key(|s| s.block);
    Ok(chosen)
}

/// The model's KL to `targets` on `windows`, averaged over windows.
fn mean_kl(model: &Llama, windows: &[Vec<u32>], targets: &[WindowTargets]) -> Result<f64> {
    let mut total = 0.0;
    for (w, t) in windows.iter().zip(targets) {
        let s = w.len();
        let hidden = model.forward_hidden(model.tokens_tensor(w), None);
        let d = hidden.dims()[2];
        let logits = model.logits(hidden.slice([0..1, 0..s - 1, 0..d]));
        let lp = burn::tensor::activation::log_softmax(logits, 2);
        let kl = kl_to_targets(lp, std::slice::from_ref(t))?;
        total += crate::stats::inputs::to_vec(kl)[0] as f64;
    }
    Ok(total / windows.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tied_block_is_its_source_row_scaled() {
        let cfg = oqt_core::testing::tiny_config();
        let mut w = oqt_core::testing::random_weights(&cfg, 3);
        let shared = tie_block(&mut w, 0, 1).unwrap();
        assert_eq!(shared.len(), 7);
        let q = &shared[&names::layer(1, names::Q)];
        assert_eq!(q.of, names::layer(0, names::Q));
        let src = w.get(&names::layer(0, names::Q)).unwrap();
        let dst = w.get(&names::layer(1, names::Q)).unwrap();
        assert_eq!(dst.data, q.expand(&src.data));
        assert!(tie_block(&mut w, 0, 9).is_err());
    }
}
