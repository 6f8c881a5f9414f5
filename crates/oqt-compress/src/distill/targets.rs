//! Logit distillation targets for quantization-aware training: the float
//! teacher's top-k next-token log-probabilities (renormalized over the k),
//! computed once for every training batch before training starts, so the
//! teacher is dropped before the student is built and a zeroth-order run keeps
//! its inference-sized memory. The student's loss adds
//! `KL(teacher_k ‖ student)` over those k tokens ([`crate::qat::model::QatModel::loss`]).
//!
//! Top-k rather than the whole distribution: SmolLM2's vocabulary is 49,152
//! tokens and a teacher's mass sits in a few dozen of them; k = 32 keeps
//! 32 × 12 bytes a position.

use burn::tensor::{Int, Tensor, TensorData};
use oqt_core::{CoreError, Result};
use oqt_model::llama::Llama;

/// One window's targets: for each of its `positions` predicted tokens, the
/// teacher's `k` most likely tokens and their log-probabilities (renormalized).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowTargets {
    pub positions: usize,
    pub k: usize,
    /// `[positions, k]`, row-major.
    pub tokens: Vec<i64>,
    /// `[positions, k]`, `log p` with `Σ_k p = 1` per position.
    pub log_probs: Vec<f32>,
}

/// The teacher's targets for `window` (the float model, no quantizers).
pub fn teacher_targets(teacher: &Llama, window: &[u32], k: usize) -> Result<WindowTargets> {
    let s = window.len();
    if s < 2 || k == 0 {
        return Err(CoreError::Other(format!(
            "distillation needs windows of at least 2 tokens and k ≥ 1 (found {s} tokens, k = {k})"
        )));
    }
    let hidden = teacher.forward_hidden(teacher.tokens_tensor(window), None);
    let d = hidden.dims()[2];
    let logits = teacher.logits(hidden.slice([0..1, 0..s - 1, 0..d]));
    let vocab = logits.dims()[2];
    let k = k.min(vocab);
    let values = crate::stats::inputs::to_vec(logits);
    let mut out = WindowTargets {
        positions: s - 1,
        k,
        tokens: Vec::with_capacity((s - 1) * k),
        log_probs: Vec::with_capacity((s - 1) * k),
    };
    let mut order: Vec<usize> = Vec::with_capacity(vocab);
    for row in values.chunks_exact(vocab) {
        order.clear();
        order.extend(0..vocab);
        // Largest k first (ties: lower token id), then in descending order.
        let by_logit = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
        order.select_nth_unstable_by(k - 1, by_logit);
        let top = &mut order[..k];
        top.sort_unstable_by(by_logit);
        let max = row[top[0]];
        let lse = max + top.iter().map(|&i| (row[i] - max).exp()).sum::<f32>().ln();
        for &i in top.iter() {
            out.tokens.push(i as i64);
            out.log_probs.push(row[i] - lse);
        }
    }
    Ok(out)
}

/// `KL(teacher_k ‖ student)` summed over each position's k teacher tokens and
/// averaged over positions, from the student's log-probabilities `lp`
/// (`[windows, positions, vocab]`, on the graph when it trains).
pub fn kl_to_targets(lp: Tensor<3>, targets: &[WindowTargets]) -> Result<Tensor<1>> {
    let [b, s, _] = lp.dims();
    let k = targets.first().map_or(0, |t| t.k);
    if targets.len() != b || targets.iter().any(|t| t.positions != s || t.k != k) {
        return Err(CoreError::Other(format!(
            "distillation targets do not match the batch ({b} windows of {s} positions expected)"
        )));
    }
    let device = lp.device();
    let idx: Vec<i64> = targets.iter().flat_map(|t| t.tokens.iter().copied()).collect();
    let lt: Vec<f32> = targets.iter().flat_map(|t| t.log_probs.iter().copied()).collect();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(idx, [b, s, k]), &device);
    let lt = Tensor::<3>::from_data(TensorData::new(lt, [b, s, k]), &device);
    let ls = lp.gather(2, idx);
    Ok((lt.clone().exp() * (lt - ls)).sum_dim(2).mean())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use burn::tensor::activation::log_softmax;
    use oqt_core::testing::{random_weights, tiny_config};

    #[test]
    fn targets_are_the_teachers_top_k_renormalized() {
        let cfg = tiny_config();
        let teacher = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 4), &Device::flex());
        let window: Vec<u32> = (0..12).map(|i| (i * 5 % 50) as u32 + 3).collect();
        let t = teacher_targets(&teacher, &window, 4).unwrap();
        assert_eq!((t.positions, t.k, t.tokens.len()), (11, 4, 44));
        // Against the full log-softmax: same ranking, same differences.
        let full = crate::stats::inputs::to_vec(log_softmax(teacher.forward(teacher.tokens_tensor(&window), None), 2));
        let v = cfg.vocab_size;
        for p in 0..11 {
            let row = &full[p * v..(p + 1) * v];
            let mut best: Vec<usize> = (0..v).collect();
            best.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
            let got: Vec<usize> = t.tokens[p * 4..p * 4 + 4].iter().map(|&i| i as usize).collect();
            assert_eq!(got, best[..4].to_vec(), "position {p}");
            let mass: f32 = t.log_probs[p * 4..p * 4 + 4].iter().map(|l| l.exp()).sum();
            assert!((mass - 1.0).abs() < 1e-5);
            let (a, b) = (t.log_probs[p * 4] - t.log_probs[p * 4 + 1], row[got[0]] - row[got[1]]);
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
