//! DKM (Cho et al. 2022, "Differentiable k-means clustering layer"), in the
//! naive form and in eDKM's uniquified form (Cho et al. 2023).
//!
//! One DKM forward on a flat weight `w` (`N` values) from centroids `c`
//! (`K`): `iterations` times, the soft assignment
//! `A = softmax(−(w − c)² / τ)` over the centroids (`[N, K]`) and the
//! centroid update `c ← Aᵀw / Aᵀ1`; then, with the final centroids,
//! `A` once more and `ŵ = A·c`. Gradients reach `w` (through `A` and through
//! the centroid updates) and the starting centroids.
//!
//! **Naive** keeps every `[N, K]` tensor of every iteration for the backward
//! pass: for a 576 × 1536 linear and K = 16, 14 M values per tensor.
//!
//! **Uniquified** (eDKM): a weight stored in 16 bits takes at most 65,536
//! values, and every row of `A` depends only on its weight's value. So the
//! iterations run on the table of distinct values `u` (`[U, K]`, `U ≤ 65,536`)
//! with each value counted as often as it occurs, and `ŵ` is the table looked
//! up through a per-weight index. The gradient is the naive one, regrouped:
//! a weight's own path `∂ŵ/∂w` is a per-value table `J` multiplied by that
//! weight's upstream gradient, and the path through the centroids reaches
//! each weight through the mean of its value group (`u` = the group's mean of
//! `w`, which equals every member). The tests check both against each other.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

/// DKM's soft-assignment temperature and centroid iterations.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DkmOptions {
    /// τ of `softmax(−(w − c)² / τ)`, on the weights' own scale.
    pub tau: f32,
    /// Centroid updates per forward.
    pub iterations: usize,
}

impl Default for DkmOptions {
    fn default() -> Self {
        Self {
            tau: 1e-4,
            iterations: 3,
        }
    }
}

/// `[N, 1]` weights against `[K]` centroids: the `[N, K]` soft assignment.
fn attention(w: Tensor<2>, c: Tensor<1>, tau: f32) -> Tensor<2> {
    let d = (w - c.unsqueeze_dim::<2>(0)).powi_scalar(2);
    softmax(d.div_scalar(-tau), 1)
}

/// Naive DKM on `w` (`[N]`) from `c0` (`[K]`): `(ŵ, final centroids)`.
pub fn dkm_naive(w: Tensor<1>, c0: Tensor<1>, opts: &DkmOptions) -> (Tensor<1>, Tensor<1>) {
    let [n] = w.dims();
    let [k] = c0.dims();
    let w2 = w.reshape([n, 1]);
    let mut c = c0;
    for _ in 0..opts.iterations {
        let a = attention(w2.clone(), c, opts.tau);
        let num = a.clone().transpose().matmul(w2.clone()).reshape([k]);
        let den = a.sum_dim(0).reshape([k]).clamp_min(1e-30);
        c = num / den;
    }
    let a = attention(w2, c.clone(), opts.tau);
    (a.matmul(c.clone().reshape([k, 1])).reshape([n]), c)
}

/// A weight's distinct values: `values[index[i]] == w[i]`, `counts` per value.
#[derive(Debug, Clone, PartialEq)]
pub struct Uniquified {
    pub values: Vec<f32>,
    pub index: Vec<u32>,
    pub counts: Vec<f32>,
}

/// The distinct values of `w` (exact equality; sorted).
pub fn uniquify(w: &[f32]) -> Uniquified {
    let mut order: Vec<u32> = (0..w.len() as u32).collect();
    order.sort_by(|&a, &b| w[a as usize].total_cmp(&w[b as usize]));
    let mut values: Vec<f32> = Vec::new();
    let mut counts: Vec<f32> = Vec::new();
    let mut index = vec![0u32; w.len()];
    for i in order {
        let v = w[i as usize];
        if values.last().is_none_or(|&last| last.to_bits() != v.to_bits()) {
            values.push(v);
            counts.push(0.0);
        }
        *counts.last_mut().expect("pushed") += 1.0;
        index[i as usize] = (values.len() - 1) as u32;
    }
    Uniquified { values, index, counts }
}

/// Uniquified DKM (eDKM) on `w` (`[N]`, whose values are `uq`'s) from `c0`:
/// the same `(ŵ, centroids)` and gradients as [`dkm_naive`], with `[U, K]`
/// tensors in place of `[N, K]`.
pub fn dkm_uniquified(w: Tensor<1>, uq: &Uniquified, c0: Tensor<1>, opts: &DkmOptions) -> (Tensor<1>, Tensor<1>) {
    let device = w.device();
    let [k] = c0.dims();
    let u_len = uq.values.len();
    let idx = Tensor::<1, Int>::from_data(
        TensorData::new(uq.index.iter().map(|&i| i as i64).collect::<Vec<_>>(), [uq.index.len()]),
        &device,
    );
    let counts = tensor1(&uq.counts, &device);
    // The value table as the group means of `w`: what carries the centroid path's gradient.
    let u_tracked =
        Tensor::<1>::zeros([u_len], &device).select_assign(0, idx.clone(), w.clone(), IndexingUpdateOp::Add)
            / counts.clone();
    let u2 = u_tracked.reshape([u_len, 1]);
    let cnt2 = counts.reshape([u_len, 1]);
    let mut c = c0;
    for _ in 0..opts.iterations {
        let a = attention(u2.clone(), c, opts.tau) * cnt2.clone();
        let num = a.clone().transpose().matmul(u2.clone()).reshape([k]);
        let den = a.sum_dim(0).reshape([k]).clamp_min(1e-30);
        c = num / den;
    }
    // The output table: the values fixed, the centroids tracked.
    let u_fixed = tensor1(&uq.values, &device).reshape([u_len, 1]);
    let a = attention(u_fixed.clone(), c.clone(), opts.tau);
    let table = a.clone().matmul(c.clone().reshape([k, 1])).reshape([u_len]);
    // ∂ŵ/∂u per value at these centroids: Σ_k a_k c_k s_k − ŵ Σ_k a_k s_k, s_k = −2(u − c_k)/τ.
    let a = a.detach();
    let cd = c.clone().detach().unsqueeze_dim::<2>(0);
    let s = (u_fixed - cd.clone()).mul_scalar(-2.0 / opts.tau);
    let as_ = a.clone() * s;
    let jac = (as_.clone() * cd).sum_dim(1).reshape([u_len]) - table.clone().detach() * as_.sum_dim(1).reshape([u_len]);
    // Forward: the table's value (w − w.detach() is zero); backward: each weight's own J·g.
    let own = jac.select(0, idx.clone()) * (w.clone() - w.detach());
    (table.select(0, idx) + own, c)
}

fn tensor1(v: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::inputs::to_vec;

    /// f16-valued weights with many repeats, and centroids spread over them.
    fn fixture() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let w: Vec<f32> = (0..600)
            .map(|i| half::f16::from_f32(((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.2).to_f32())
            .collect();
        let c0 = vec![-0.09, -0.04, 0.0, 0.05, 0.08];
        // An upstream gradient that differs between weights of the same value.
        let g: Vec<f32> = (0..600).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
        (w, c0, g)
    }

    fn run(uniquified: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (w, c0, g) = fixture();
        let device = Device::flex().autodiff();
        let wt = tensor1(&w, &device).require_grad();
        let ct = tensor1(&c0, &device).require_grad();
        let opts = DkmOptions {
            tau: 2e-4,
            iterations: 3,
        };
        let (w_hat, c) = if uniquified {
            dkm_uniquified(wt.clone(), &uniquify(&w), ct.clone(), &opts)
        } else {
            dkm_naive(wt.clone(), ct.clone(), &opts)
        };
        let loss = (w_hat.clone() * tensor1(&g, &device)).sum();
        let grads = loss.backward();
        (
            to_vec(w_hat.detach()),
            to_vec(c.detach()),
            to_vec(wt.grad(&grads).expect("w tracked")),
            to_vec(ct.grad(&grads).expect("c tracked")),
        )
    }

    #[test]
    fn uniquified_dkm_equals_naive_dkm_forward_and_backward() {
        let (w, _, _) = fixture();
        let uq = uniquify(&w);
        assert!(uq.values.len() < w.len() / 4, "{} distinct", uq.values.len());
        assert!(uq.index.iter().zip(&w).all(|(&i, &v)| uq.values[i as usize] == v));
        let naive = run(false);
        let unique = run(true);
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-4 * scale + 1e-7,
                    "{what}: {x} vs {y} (scale {scale})"
                );
            }
        };
        close(&naive.0, &unique.0, "ŵ");
        close(&naive.1, &unique.1, "centroids");
        close(&naive.2, &unique.2, "∂L/∂w");
        close(&naive.3, &unique.3, "∂L/∂c");
        // The soft assignment does something: ŵ is near the centroids, not w.
        assert!(naive.0.iter().zip(&w).any(|(a, b)| (a - b).abs() > 1e-3));
        assert!(naive.2.iter().any(|g| g.abs() > 1e-3));
    }
}
