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

/// A weight's rows in groups of `group_rows`, each group's distinct values
/// (eDKM's uniquification per table): `values`/`counts` are `[groups, u_max]`
/// (padding entries count 0), `index` maps each weight to its group's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedUnique {
    pub groups: usize,
    pub u_max: usize,
    pub values: Vec<f32>,
    pub counts: Vec<f32>,
    pub index: Vec<i64>,
}

/// [`uniquify`] per group of `group_rows` rows of `w` (`[rows, cols]`).
pub fn uniquify_groups(w: &[f32], cols: usize, group_rows: usize) -> GroupedUnique {
    let parts: Vec<Uniquified> = w.chunks(group_rows * cols).map(uniquify).collect();
    let u_max = parts.iter().map(|p| p.values.len()).max().unwrap_or(0);
    let groups = parts.len();
    let mut values = vec![0f32; groups * u_max];
    let mut counts = vec![0f32; groups * u_max];
    let mut index = Vec::with_capacity(w.len());
    for (g, p) in parts.iter().enumerate() {
        values[g * u_max..g * u_max + p.values.len()].copy_from_slice(&p.values);
        counts[g * u_max..g * u_max + p.counts.len()].copy_from_slice(&p.counts);
        index.extend(p.index.iter().map(|&i| (g * u_max) as i64 + i as i64));
    }
    GroupedUnique {
        groups,
        u_max,
        values,
        counts,
        index,
    }
}

/// Uniquified DKM with one table per group of rows: `w` `[N]` (row-major,
/// the values of `gu`), starting centroids `c0` `[groups, K]`; returns `ŵ`
/// and the centroids. Per group it is [`dkm_uniquified`], all groups at once.
pub fn dkm_grouped(w: Tensor<1>, gu: &GroupedUnique, c0: Tensor<2>, opts: &DkmOptions) -> (Tensor<1>, Tensor<2>) {
    let device = w.device();
    let [groups, k] = c0.dims();
    assert_eq!(groups, gu.groups, "one centroid row per group");
    let (g, u) = (groups, gu.u_max);
    let idx = Tensor::<1, Int>::from_data(TensorData::new(gu.index.clone(), [gu.index.len()]), &device);
    let counts = tensor1(&gu.counts, &device);
    let u_tracked =
        Tensor::<1>::zeros([g * u], &device).select_assign(0, idx.clone(), w.clone(), IndexingUpdateOp::Add)
            / counts.clone().clamp_min(1.0);
    let u3 = u_tracked.reshape([g, u, 1]);
    let cnt3 = counts.reshape([g, u, 1]);
    let assign = |x: Tensor<3>, c: Tensor<2>| {
        let d = (x - c.reshape([g, 1, k])).powi_scalar(2);
        softmax(d.div_scalar(-opts.tau), 2)
    };
    let mut c = c0;
    for _ in 0..opts.iterations {
        let a = assign(u3.clone(), c) * cnt3.clone();
        let num = (a.clone() * u3.clone()).sum_dim(1).reshape([g, k]);
        let den = a.sum_dim(1).reshape([g, k]).clamp_min(1e-30);
        c = num / den;
    }
    let u_fixed = tensor1(&gu.values, &device).reshape([g, u, 1]);
    let a = assign(u_fixed.clone(), c.clone());
    let c3 = c.clone().reshape([g, 1, k]);
    let table = (a.clone() * c3.clone()).sum_dim(2).reshape([g * u]);
    let a = a.detach();
    let cd = c3.detach();
    let s = (u_fixed - cd.clone()).mul_scalar(-2.0 / opts.tau);
    let as_ = a * s;
    let jac = (as_.clone() * cd).sum_dim(2).reshape([g * u]) - table.clone().detach() * as_.sum_dim(2).reshape([g * u]);
    let own = jac.select(0, idx.clone()) * (w.clone() - w.detach());
    (table.select(0, idx) + own, c)
}

/// Naive DKM with one table per group of rows, all groups at once: `w`
/// `[N]` row-major in `groups` equal spans, `c0` `[groups, K]`. The
/// `[groups, N / groups, K]` soft assignments of every iteration are kept for
/// the backward pass (`oqt cluster --method dkm`: the paper's DKM, whose
/// memory eDKM's uniquified form removes).
pub fn dkm_naive_grouped(w: Tensor<1>, c0: Tensor<2>, opts: &DkmOptions) -> (Tensor<1>, Tensor<2>) {
    let [n] = w.dims();
    let [g, k] = c0.dims();
    assert!(g > 0 && n.is_multiple_of(g), "{n} weights do not split into {g} groups");
    let w3 = w.reshape([g, n / g, 1]);
    let assign = |c: Tensor<2>| {
        let d = (w3.clone() - c.reshape([g, 1, k])).powi_scalar(2);
        softmax(d.div_scalar(-opts.tau), 2)
    };
    let mut c = c0;
    for _ in 0..opts.iterations {
        let a = assign(c);
        let num = (a.clone() * w3.clone()).sum_dim(1).reshape([g, k]);
        let den = a.sum_dim(1).reshape([g, k]).clamp_min(1e-30);
        c = num / den;
    }
    let a = assign(c.clone());
    ((a * c.clone().reshape([g, 1, k])).sum_dim(2).reshape([n]), c)
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

    #[test]
    fn grouped_dkm_is_per_group_dkm_all_at_once() {
        let (w, c0, g) = fixture();
        // 600 weights as [12, 50], tables per 4 rows: three groups, each its own centroids.
        let (cols, group_rows) = (50, 4);
        let device = Device::flex().autodiff();
        let opts = DkmOptions {
            tau: 2e-4,
            iterations: 3,
        };
        let shifted: Vec<f32> = (0..3)
            .flat_map(|j| c0.iter().map(move |c| c + 0.01 * j as f32))
            .collect();
        let wt = tensor1(&w, &device).require_grad();
        let ct = Tensor::<2>::from_data(TensorData::new(shifted.clone(), [3, c0.len()]), &device).require_grad();
        let gu = uniquify_groups(&w, cols, group_rows);
        assert_eq!(gu.groups, 3);
        let (w_hat, c) = dkm_grouped(wt.clone(), &gu, ct.clone(), &opts);
        let grads = (w_hat.clone() * tensor1(&g, &device)).sum().backward();
        let (w_hat, c, gw) = (
            to_vec(w_hat.detach()),
            to_vec(c.detach()),
            to_vec(wt.grad(&grads).unwrap()),
        );
        let k = c0.len();
        for grp in 0..3 {
            let span = grp * group_rows * cols..(grp + 1) * group_rows * cols;
            let wg = tensor1(&w[span.clone()], &device).require_grad();
            let cg = tensor1(&shifted[grp * k..(grp + 1) * k], &device).require_grad();
            let (hat, cc) = dkm_uniquified(wg.clone(), &uniquify(&w[span.clone()]), cg, &opts);
            let grads = (hat.clone() * tensor1(&g[span.clone()], &device)).sum().backward();
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "group {grp} {what}: {x} vs {y}"
                    );
                }
            };
            close(&w_hat[span.clone()], &to_vec(hat.detach()), "ŵ");
            close(&c[grp * k..(grp + 1) * k], &to_vec(cc.detach()), "centroids");
            close(&gw[span.clone()], &to_vec(wg.grad(&grads).unwrap()), "∂L/∂w");
        }
        // The naive grouped form (`--method dkm`): the same ŵ, centroids and
        // both gradients as the uniquified one.
        let wn = tensor1(&w, &device).require_grad();
        let cn = Tensor::<2>::from_data(TensorData::new(shifted.clone(), [3, k]), &device).require_grad();
        let (hat_n, c_n) = dkm_naive_grouped(wn.clone(), cn.clone(), &opts);
        let grads_n = (hat_n.clone() * tensor1(&g, &device)).sum().backward();
        let grads = {
            let wt = tensor1(&w, &device).require_grad();
            let ct = Tensor::<2>::from_data(TensorData::new(shifted.clone(), [3, k]), &device).require_grad();
            let (hat, _) = dkm_grouped(wt.clone(), &gu, ct.clone(), &opts);
            let gr = (hat * tensor1(&g, &device)).sum().backward();
            (to_vec(wt.grad(&gr).unwrap()), to_vec(ct.grad(&gr).unwrap()))
        };
        let close = |a: &[f32], b: &[f32], what: &str| {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + scale), "naive {what}: {x} vs {y}");
            }
        };
        close(&to_vec(hat_n.detach()), &w_hat, "ŵ");
        close(&to_vec(c_n.detach()), &c, "centroids");
        close(&to_vec(wn.grad(&grads_n).unwrap()), &grads.0, "∂L/∂w");
        close(&to_vec(cn.grad(&grads_n).unwrap()), &grads.1, "∂L/∂c");
    }
}
