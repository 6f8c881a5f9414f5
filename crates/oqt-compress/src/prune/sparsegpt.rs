//! SparseGPT (Frantar & Alistarh 2023): prune one linear weight column by
//! column and push every pruned weight's error onto the columns not yet
//! visited, with the same Optimal-Brain-Surgeon update as GPTQ (a pruned
//! weight is "quantized" to zero).
//!
//! For `W` `[rows, cols]` and `H = XᵀX` of the layer's calibration inputs,
//! with `U` the upper Cholesky factor of `(H + λI)⁻¹`:
//! * columns are visited in blocks of `block_size` (128); at a block's start
//!   the unstructured mask of the whole block is chosen: the
//!   `⌊sparsity · rows · block⌋` weights with the lowest `w² / U[c,c]²` (the
//!   OBS saliency) among all of its rows and columns, so rows may differ in
//!   sparsity while the layer meets it exactly (the reference's adaptive mask
//!   selection); N:M masks are chosen every `m` columns when the sweep reaches
//!   them, by the same saliency, `m − n` per block of `m` in each row;
//! * column `i`: the pruned weights become 0, the error `e = w_i / U[i,i]` of
//!   each pruned one updates columns `j > i` by `−e · U[i,j]` (eagerly inside
//!   the block, once per block for the rest);
//! * inputs that never fire get a zero weight column and `H[i,i] = 1`; λ is
//!   `damp_percent` (1%) of the mean diagonal, retried ×10 (as in GPTQ).

use super::mask::Pattern;
use crate::ptq::gptq::damped_inverse_cholesky;
use crate::stats::inputs::to_vec;
use oqt_core::CoreError;
use rayon::prelude::*;

/// SparseGPT's options (the reference's defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SparseGptOptions {
    /// Diagonal damping as a fraction of the mean diagonal of `H` (0.01).
    pub damp_percent: f64,
    /// Columns per mask-selection and lazy-update block (128).
    pub block_size: usize,
}

impl Default for SparseGptOptions {
    fn default() -> Self {
        Self {
            damp_percent: 0.01,
            block_size: 128,
        }
    }
}

fn bad(msg: String) -> CoreError {
    CoreError::Other(format!("SparseGPT: {msg}"))
}

/// The factor SparseGPT sweeps with, computed once per layer input (q, k
/// and v share theirs): `U` with `UᵀU = (H + λI)⁻¹` and the inputs that never fire.
pub struct HessianFactor {
    cols: usize,
    u: Vec<f64>,
    dead: Vec<bool>,
}

impl HessianFactor {
    /// From `h` (`cols × cols`, any positive multiple of `XᵀX`), damped by
    /// `damp_percent` of its mean diagonal (×10 up to three times if needed).
    pub fn new(h: &[f64], cols: usize, damp_percent: f64) -> Result<Self, CoreError> {
        if h.len() != cols * cols {
            return Err(bad(format!("Hessian has {} values, expected {cols} × {cols}", h.len())));
        }
        if h.iter().any(|v| !v.is_finite()) {
            return Err(bad("Hessian has non-finite entries".into()));
        }
        let diag: Vec<f64> = (0..cols).map(|i| h[i * cols + i]).collect();
        if diag.iter().all(|&d| d == 0.0) {
            return Err(bad(
                "Hessian is all zero: no calibration input reached this layer".into()
            ));
        }
        let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
        let diag: Vec<f64> = diag.iter().map(|&d| if d == 0.0 { 1.0 } else { d }).collect();
        let hp = |i: usize, j: usize| if i == j { diag[i] } else { h[i * cols + j] };
        let mean_diag = diag.iter().sum::<f64>() / cols as f64;
        let u = damped_inverse_cholesky(cols, hp, mean_diag, damp_percent).map_err(bad)?;
        Ok(Self { cols, u, dead })
    }
}

/// `w` (`[rows, cols]` row-major) pruned to `pattern` with weight
/// reconstruction from `h` (`cols × cols`, any positive multiple of `XᵀX`):
/// the updated weights (exact zeros where pruned) and the mask (`true` = kept).
pub fn sparsegpt_prune(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    pattern: Pattern,
    opts: &SparseGptOptions,
) -> Result<(Vec<f32>, Vec<bool>), CoreError> {
    let factor = HessianFactor::new(h, cols, opts.damp_percent)?;
    sparsegpt_prune_factored(w, rows, &factor, pattern, opts.block_size)
}

/// [`sparsegpt_prune`] with the Hessian already factored.
pub fn sparsegpt_prune_factored(
    w: &[f32],
    rows: usize,
    factor: &HessianFactor,
    pattern: Pattern,
    block_size: usize,
) -> Result<(Vec<f32>, Vec<bool>), CoreError> {
    let (cols, u, dead) = (factor.cols, &factor.u, &factor.dead);
    if w.len() != rows * cols {
        return Err(bad(format!("weight has {} values, expected {rows} × {cols}", w.len())));
    }
    if let Some(p) = pattern.problems(cols) {
        return Err(bad(p));
    }
    if block_size == 0 {
        return Err(bad("block_size must be positive".into()));
    }
    if let Pattern::NOfM { m, .. } = pattern
        && !block_size.min(cols).is_multiple_of(m)
    {
        return Err(bad(format!(
            "block_size {block_size} must hold whole N:M blocks of {m}"
        )));
    }
    let mut ws: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for row in ws.chunks_exact_mut(cols) {
        for (v, _) in row.iter_mut().zip(dead).filter(|(_, d)| **d) {
            *v = 0.0;
        }
    }
    let mut keep = vec![true; rows * cols];
    let bs = block_size.min(cols);
    let saliency = |v: f64, c: usize| v * v / (u[c * cols + c] * u[c * cols + c]);
    for b0 in (0..cols).step_by(bs) {
        let b1 = (b0 + bs).min(cols);
        let width = b1 - b0;
        if let Pattern::Unstructured { sparsity } = pattern {
            // The block's lowest saliencies over every row (ties: later column, then later row, first).
            let mut idx: Vec<(f64, usize)> = (0..rows * width)
                .map(|k| {
                    let (r, c) = (k / width, b0 + k % width);
                    (saliency(ws[r * cols + c], c), k)
                })
                .collect();
            let drop = (idx.len() as f64 * sparsity as f64 + 1e-4).floor() as usize;
            idx.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
            for &(_, k) in &idx[..drop] {
                keep[(k / width) * cols + b0 + k % width] = false;
            }
        }
        ws.par_chunks_mut(cols)
            .zip(keep.par_chunks_mut(cols))
            .for_each(|(row, kept)| sweep_row_block(row, kept, u, cols, b0, b1, pattern, &saliency));
    }
    let out = ws
        .iter()
        .zip(&keep)
        .map(|(&v, &k)| if k { v as f32 } else { 0.0 })
        .collect();
    Ok((out, keep))
}

/// One row through the columns `b0..b1`: choose N:M masks as they come, zero
/// the pruned weights and spread their errors over the rest of the row.
#[allow(clippy::too_many_arguments)]
fn sweep_row_block(
    row: &mut [f64],
    kept: &mut [bool],
    u: &[f64],
    cols: usize,
    b0: usize,
    b1: usize,
    pattern: Pattern,
    saliency: &(dyn Fn(f64, usize) -> f64 + Sync),
) {
    let mut err = vec![0f64; b1 - b0];
    for i in b0..b1 {
        if let Pattern::NOfM { n, m } = pattern
            && (i - b0).is_multiple_of(m)
        {
            let mut order: Vec<usize> = (i..i + m).collect();
            order.sort_by(|&a, &b| saliency(row[a], a).total_cmp(&saliency(row[b], b)).then(b.cmp(&a)));
            for &j in &order[..m - n] {
                kept[j] = false;
            }
        }
        if kept[i] {
            continue;
        }
        let ui = &u[i * cols..(i + 1) * cols];
        let e = row[i] / ui[i];
        err[i - b0] = e;
        row[i] = 0.0;
        for j in i + 1..b1 {
            row[j] -= e * ui[j];
        }
    }
    // The block's errors reach the later columns once.
    for (k, &e) in err.iter().enumerate().filter(|(_, e)| **e != 0.0) {
        let ui = &u[(b0 + k) * cols..(b0 + k + 1) * cols];
        for j in b1..cols {
            row[j] -= e * ui[j];
        }
    }
}

/// `tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)`: the layer's relative output error
/// on the inputs whose Gram matrix is `h`.
pub fn relative_output_error(w: &[f32], pruned: &[f32], cols: usize, h: &[f64]) -> f64 {
    use burn::tensor::{Tensor, TensorData};
    let device = burn::tensor::Device::flex();
    let rows = w.len() / cols;
    let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    let h = Tensor::<2>::from_data(TensorData::new(h32, [cols, cols]), &device);
    let quad = |d: Vec<f32>| -> f64 {
        let d = Tensor::<2>::from_data(TensorData::new(d, [rows, cols]), &device);
        let v: f32 = to_vec((d.clone().matmul(h.clone()) * d).sum())[0];
        v as f64
    };
    let diff: Vec<f32> = w.iter().zip(pruned).map(|(a, b)| a - b).collect();
    let den = quad(w.to_vec());
    if den > 0.0 { quad(diff) / den } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::pseudo_random;

    /// `XᵀX` of `n` pseudo-random rows with correlated neighbours and a few
    /// loud channels (the structure OBS updates exploit).
    fn gram(n: usize, cols: usize, seed: u64) -> Vec<f64> {
        let z = pseudo_random(n * cols, seed, 1.0);
        let mut h = vec![0f64; cols * cols];
        for r in z.chunks_exact(cols) {
            let x: Vec<f64> = (0..cols)
                .map(|i| {
                    (r[i] as f64 + r[(i + 1) % cols] as f64 + r[(i + 2) % cols] as f64)
                        * if i % 7 == 0 { 5.0 } else { 1.0 }
                })
                .collect();
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[i] * x[j];
                }
            }
        }
        h
    }

    #[test]
    fn reconstruction_beats_dropping_the_same_weights() {
        let (rows, cols) = (16, 64);
        let w = pseudo_random(rows * cols, 3, 1.0);
        let h = gram(256, cols, 4);
        for pattern in [Pattern::Unstructured { sparsity: 0.5 }, Pattern::NOfM { n: 2, m: 4 }] {
            let opts = SparseGptOptions {
                block_size: 32,
                ..Default::default()
            };
            let (p, keep) = sparsegpt_prune(&w, rows, cols, &h, pattern, &opts).unwrap();
            assert_eq!(keep.iter().filter(|k| !**k).count(), rows * cols / 2, "{pattern}");
            assert!(p.iter().zip(&keep).all(|(v, k)| *k || *v == 0.0));
            if let Pattern::NOfM { .. } = pattern {
                for block in keep.chunks_exact(4) {
                    assert_eq!(block.iter().filter(|k| **k).count(), 2);
                }
            }
            // The same mask on the original weights, no update: worse.
            let mut masked = w.clone();
            super::super::mask::apply_mask(&mut masked, &keep);
            let (e_sgpt, e_mask) = (
                relative_output_error(&w, &p, cols, &h),
                relative_output_error(&w, &masked, cols, &h),
            );
            assert!(e_sgpt < 0.9 * e_mask, "{pattern}: {e_sgpt} vs {e_mask}");
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let h = gram(64, 8, 1);
        let w = pseudo_random(16, 1, 1.0);
        let e = sparsegpt_prune(&w, 2, 8, &h, Pattern::NOfM { n: 2, m: 3 }, &Default::default()).unwrap_err();
        assert!(e.to_string().contains("do not divide"), "{e}");
        let e = sparsegpt_prune(
            &w,
            2,
            8,
            &vec![0.0; 64],
            Pattern::Unstructured { sparsity: 0.5 },
            &Default::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("all zero"), "{e}");
    }
}
