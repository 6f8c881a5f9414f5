//! GPTQ (Frantar et al. 2022): quantize one linear weight column by column,
//! compensating every column's rounding error on the columns not yet quantized
//! so that the layer's *output* on calibration inputs moves as little as
//! possible (Optimal Brain Surgeon with a fixed column order).
//!
//! For a weight `W` (`[rows, cols]`, rows = output channels) and inputs `X`
//! (`[n, cols]`), the objective is `‖X Wᵀ − X Ŵᵀ‖²`, whose Hessian in every row
//! is `H = 2 XᵀX` (collected by [`crate::stats::hessian::HessianAccumulator`]). With `U` the upper
//! Cholesky factor of `H⁻¹` (`UᵀU = H⁻¹`), column `i` is rounded and the error
//! `(w_i − ŵ_i) / U[i,i]` is pushed onto columns `j > i` with weights `U[i,j]`.
//!
//! Choices, following the reference implementation unless noted:
//! * Inputs that never fire (`H[i,i] = 0`) get `H[i,i] = 1` and a zero weight column.
//! * Damping adds `damp_percent · mean(diag H)` to the diagonal; when the
//!   Cholesky factorization still fails, it is retried with 10× more damping
//!   (three times) before giving up with an error.
//! * `U` is computed as `J·L̃⁻¹·J`, where `J` reverses the index order and
//!   `L̃` is the lower Cholesky factor of `J·H·J`. This is the same matrix as
//!   the reference's `cholesky(cholesky_inverse(cholesky(H)), upper=True)`
//!   (a Cholesky factor is unique) with one factorization and one triangular
//!   inverse instead of two factorizations and a full inverse, and it cannot
//!   fail on a second factorization of a badly conditioned `H⁻¹`.
//! * Columns are swept in blocks of `block_size`; inside a block errors are
//!   applied eagerly, to later columns lazily once per block (a rank-`block`
//!   update). This only reorders the arithmetic: the result does not depend on
//!   the block size beyond floating-point rounding.
//! * Grids are exactly those of [`quantize_weight`]: same layout, same
//!   [`group_params`] and [`quantize_value`], so the integer weight exports
//!   through the bundle writer unchanged (`(q − zp) · scale`). Per-channel and
//!   per-tensor scales come from the original weights (`clip = 1`). Per-group
//!   scales come from the group's current, error-updated weights when the sweep
//!   reaches the group's first column (the reference's `static_groups = false`).
//!   The reference reads those weights as they were at the start of the current
//!   block; here they include every earlier column's error, so the result is
//!   independent of the block size.
//! * `act_order` sweeps columns by descending `H[i,i]`. Per-group grids must
//!   keep groups of consecutive original columns, so with `act_order` their
//!   scales are fixed up front from the (dead-column-zeroed) original weights
//!   (the reference's `static_groups = true`).
//! * Rows are independent given `U`: chunks of rows are swept in parallel.

use crate::ptq::{MethodInput, MethodOutput, Progress};
use crate::stats::inputs::{Gather, group_index};
use nalgebra::{Cholesky, DMatrix};
use oqt_core::CoreError;
use oqt_core::quant::weights::{group_params, quantize_value};
use oqt_core::quant::{Granularity, QuantizedWeight, WeightSpec, dequantize_weight, quantize_weight};
use oqt_core::weights::TensorF32;
use oqt_model::Proj;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// GPTQ on every decoder linear, with Hessians of the float model's inputs.
///
/// Static 8-bit inputs carry rounding noise of variance `scale²/12` on every
/// channel, which GPTQ's float-input Hessian does not see: its error
/// compensation then loads weight onto quiet channels where the noise is
/// amplified. The expected Hessian of the noisy input, `XᵀX + n·σ²·I`, keeps
/// it honest (without it GPTQ is worse than RTN on SmolLM2 w4a8). Activation
/// grids are then calibrated on the model GPTQ produced.
pub(crate) fn quantize_model(input: &MethodInput, progress: &mut dyn Progress) -> oqt_core::Result<MethodOutput> {
    let gather = Gather {
        sample_rows_per_window: 0,
        gram: true,
        gram_unit_rows: input.opts.gptq.unit_token_rows,
    };
    let stats = input.input_stats(gather, progress)?;
    let model = input.model;
    let spec = &input.recipe.spec;
    let noise = if input.is_static() {
        Some(input.calibrate(
            &input.float_llama(&model.weights),
            "calibrating (input noise)",
            progress,
        )?)
    } else {
        None
    };
    progress.phase("GPTQ", model.config.num_layers * Proj::PER_LAYER.len());
    let mut weights = model.weights.clone();
    let mut quantized = BTreeMap::new();
    let mut done = 0;
    for (l, groups) in stats.iter().enumerate() {
        for p in Proj::PER_LAYER {
            let name = p.weight_name(l);
            let t = model.weights.get(&name).expect("validated");
            let g = &groups[group_index(p).expect("decoder linear")];
            let mut h = g.gram.clone().expect("gathered");
            let (rows, cols) = (t.shape[0], t.shape[1]);
            if let Some(grid) = noise.as_ref().and_then(|n| n.get(&p.input_site().key(l)))
                && grid.bits == 8
            {
                let add = g.tokens as f64 * (grid.scale as f64).powi(2) / 12.0;
                for i in 0..cols {
                    h[i * cols + i] += add;
                }
            }
            let qw = gptq_quantize(&t.data, rows, cols, &h, &spec.weights_for(&name), &input.opts.gptq)
                .map_err(|e| CoreError::Other(format!("{name}: {e}")))?;
            if tracing::enabled!(tracing::Level::DEBUG) {
                let rtn = quantize_weight(&t.data, rows, cols, &spec.weights_for(&name), 1.0);
                let ratio = output_error(&t.data, &qw, &h) / output_error(&t.data, &rtn, &h);
                tracing::debug!(%name, ratio, "GPTQ proxy error vs RTN");
            }
            *weights.get_mut(&name).expect("validated") = TensorF32::new(t.shape.clone(), dequantize_weight(&qw));
            quantized.insert(name, qw);
            done += 1;
            progress.set(done);
        }
    }
    Ok(MethodOutput {
        weights: Some(weights),
        quantized,
        ..MethodOutput::default()
    })
}

#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    /// Diagonal damping as a fraction of the mean diagonal of `H` (0.01).
    pub damp_percent: f64,
    /// Columns per lazy-update block (128).
    pub block_size: usize,
    /// Quantize columns in order of decreasing `H[i,i]` (false).
    pub act_order: bool,
    /// The Hessian over unit-length token rows, `Σ x xᵀ / ‖x‖²` (true), not
    /// the paper's `XᵀX`: on SmolLM2 the raw Hessian is dominated by the few
    /// tokens of huge norm and GPTQ loses to RTN (BENCHMARKS.md, issue 37).
    pub unit_token_rows: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            damp_percent: 0.01,
            block_size: 128,
            act_order: false,
            unit_token_rows: true,
        }
    }
}

fn bad(msg: String) -> CoreError {
    CoreError::Other(format!("GPTQ: {msg}"))
}

/// Quantize `w` (row-major `[rows, cols]`, rows = output channels, cols = input
/// features) on `spec`'s grid with GPTQ using Hessian `h` (`cols × cols`,
/// row-major; any positive multiple of `XᵀX`). The result has exactly the
/// layout of [`quantize_weight`]: same scale / zero-point arrays, same rounding.
pub fn gptq_quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    spec: &WeightSpec,
    opts: &GptqOptions,
) -> Result<QuantizedWeight, CoreError> {
    if w.len() != rows * cols {
        return Err(bad(format!("weight has {} values, not {rows} × {cols}", w.len())));
    }
    if h.len() != cols * cols {
        return Err(bad(format!("Hessian has {} values, not {cols} × {cols}", h.len())));
    }
    if opts.block_size == 0 {
        return Err(bad("block_size must be positive".into()));
    }
    if !(opts.damp_percent.is_finite() && opts.damp_percent >= 0.0) {
        return Err(bad(format!("damp_percent must be ≥ 0, found {}", opts.damp_percent)));
    }
    if spec.granularity == Granularity::PerGroup(0) {
        return Err(bad("group size must be positive".into()));
    }
    if h.iter().any(|v| !v.is_finite()) {
        return Err(bad("Hessian has non-finite entries".into()));
    }
    if rows == 0 || cols == 0 {
        return Err(bad(format!("empty weight ({rows} × {cols})")));
    }
    let diag: Vec<f64> = (0..cols).map(|i| h[i * cols + i]).collect();
    if diag.iter().all(|&d| d == 0.0) {
        return Err(bad(
            "Hessian is all zero: no calibration input reached this layer".into()
        ));
    }

    // Dead inputs: the weight never matters, so zero it and make H invertible there.
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    let mut wz: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for row in wz.chunks_exact_mut(cols) {
        for (v, _) in row.iter_mut().zip(&dead).filter(|(_, d)| **d) {
            *v = 0.0;
        }
    }
    let diag: Vec<f64> = diag.iter().map(|&d| if d == 0.0 { 1.0 } else { d }).collect();

    // Sweep order: `perm[p]` is the original column quantized at step `p`.
    let mut perm: Vec<usize> = (0..cols).collect();
    if opts.act_order {
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    }
    let hp = |a: usize, b: usize| -> f64 {
        let (i, j) = (perm[a], perm[b]);
        if i == j { diag[i] } else { h[i * cols + j] }
    };
    let mean_diag = diag.iter().sum::<f64>() / cols as f64;
    let u = damped_inverse_cholesky(cols, hp, mean_diag, opts.damp_percent).map_err(bad)?;

    // Grid parameters per (row, group); per-tensor is expanded to every row.
    // LPBQ sweeps on its blocks with the fixed scales `m_b · s_row` taken from
    // the original weights (like static groups), and expands `q4 · m_b` after.
    let lpbq = spec.granularity.lpbq_block();
    if let Some(b) = lpbq
        && !cols.is_multiple_of(b)
    {
        return Err(bad(format!(
            "LPBQ blocks of {b} do not divide the {cols} input columns"
        )));
    }
    let group = lpbq.unwrap_or_else(|| spec.group_len(cols));
    let groups_per_row = cols.div_ceil(group);
    let dynamic_groups = matches!(spec.granularity, Granularity::PerGroup(_)) && !opts.act_order;
    let (mut scales, mut zps) = (vec![1f32; rows * groups_per_row], vec![0i32; rows * groups_per_row]);
    let mut lpbq_init = None;
    if lpbq.is_some() {
        let wf: Vec<f32> = wz.iter().map(|&v| v as f32).collect();
        let init = quantize_weight(&wf, rows, cols, spec, 1.0);
        let m = init.multipliers.as_deref().expect("LPBQ weights carry multipliers");
        for (k, s) in scales.iter_mut().enumerate() {
            *s = init.scales[k / groups_per_row] * m[k] as f32;
        }
        lpbq_init = Some(init);
    } else if !dynamic_groups {
        let init = if matches!(spec.granularity, Granularity::PerGroup(_)) {
            // Static groups (act_order): from the weights with dead columns zeroed.
            let wf: Vec<f32> = wz.iter().map(|&v| v as f32).collect();
            quantize_weight(&wf, rows, cols, spec, 1.0)
        } else {
            quantize_weight(w, rows, cols, spec, 1.0)
        };
        let n = init.scales.len();
        for (k, (s, z)) in scales.iter_mut().zip(zps.iter_mut()).enumerate() {
            // Per-tensor: one entry for all rows.
            *s = init.scales[k % n];
            *z = init.zero_points.as_ref().map_or(0, |zp| zp[k % n]);
        }
    }

    // The sweep works on columns in sweep order.
    let mut ws = vec![0f64; rows * cols];
    for (dst, src) in ws.chunks_exact_mut(cols).zip(wz.chunks_exact(cols)) {
        for (d, &c) in dst.iter_mut().zip(&perm) {
            *d = src[c];
        }
    }
    let sweep = Sweep {
        u: &u,
        cols,
        block: opts.block_size.min(cols),
        group,
        groups_per_row,
        perm: &perm,
        dynamic_groups,
        spec,
    };
    let mut q = vec![0i8; rows * cols];
    let chunk_rows = rows.div_ceil(rayon::current_num_threads() * 4).clamp(1, 64);
    ws.par_chunks_mut(chunk_rows * cols)
        .zip(q.par_chunks_mut(chunk_rows * cols))
        .zip(scales.par_chunks_mut(chunk_rows * groups_per_row))
        .zip(zps.par_chunks_mut(chunk_rows * groups_per_row))
        .for_each(|(((wc, qc), sc), zc)| sweep.run(wc, qc, sc, zc));

    if let Some(init) = lpbq_init {
        let m = init.multipliers.as_deref().expect("LPBQ weights carry multipliers");
        for (k, v) in q.iter_mut().enumerate() {
            *v = (*v as i32 * m[k / group] as i32) as i8;
        }
        return Ok(QuantizedWeight { q, ..init });
    }
    if spec.granularity == Granularity::PerTensor {
        scales.truncate(1);
        zps.truncate(1);
    }
    Ok(QuantizedWeight {
        rows,
        cols,
        group,
        q,
        scales,
        zero_points: (!spec.symmetric).then_some(zps),
        spec: *spec,
        multipliers: None,
    })
}

/// `Σ_r (w_r − ŵ_r) H (w_r − ŵ_r)ᵀ`: with `H = XᵀX` this is `‖X Wᵀ − X Ŵᵀ‖²`,
/// the error GPTQ minimizes; with [`crate::stats::hessian::HessianAccumulator::hessian`] (`2/n · XᵀX`)
/// it is twice the mean over calibration rows.
pub fn output_error(w: &[f32], qw: &QuantizedWeight, h: &[f64]) -> f64 {
    let (rows, cols) = (qw.rows, qw.cols);
    assert_eq!(w.len(), rows * cols, "weight shape differs from the quantized weight");
    assert_eq!(h.len(), cols * cols, "Hessian is not {cols} × {cols}");
    let deq = dequantize_weight(qw);
    (0..rows)
        .into_par_iter()
        .map(|r| {
            let d: Vec<f64> = (0..cols)
                .map(|c| w[r * cols + c] as f64 - deq[r * cols + c] as f64)
                .collect();
            h.chunks_exact(cols)
                .zip(&d)
                .map(|(hrow, &di)| di * hrow.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>())
                .sum::<f64>()
        })
        .sum()
}

/// [`inverse_cholesky_upper`] with damping `damp_percent × mean_diag`,
/// retried with 10× more (three times) when `H` is not positive definite;
/// `Err` says so (GPTQ and SparseGPT share it).
pub(crate) fn damped_inverse_cholesky(
    n: usize,
    hp: impl Fn(usize, usize) -> f64 + Copy,
    mean_diag: f64,
    damp_percent: f64,
) -> Result<Vec<f64>, String> {
    let mut frac = damp_percent;
    for attempt in 0..4 {
        if attempt > 0 {
            frac = if frac > 0.0 { frac * 10.0 } else { 0.01 };
        }
        if let Some(u) = inverse_cholesky_upper(n, hp, frac * mean_diag) {
            return Ok(u);
        }
    }
    Err(format!(
        "Hessian ({n} × {n}) is not positive definite even with damping {frac:.3e} × its mean diagonal"
    ))
}

/// Upper-triangular `U` (row-major `n × n`) with `UᵀU = (H + damp·I)⁻¹`, where
/// `hp(i, j)` reads `H`; `None` when `H + damp·I` is not positive definite.
///
/// With `J` the index reversal and `J(H + damp·I)J = L̃L̃ᵀ`, `H + damp·I = VVᵀ`
/// for the upper-triangular `V = JL̃J`, so its inverse is `(V⁻¹)ᵀV⁻¹` and
/// `U = V⁻¹ = J L̃⁻¹ J`.
fn inverse_cholesky_upper(n: usize, hp: impl Fn(usize, usize) -> f64, damp: f64) -> Option<Vec<f64>> {
    let m = DMatrix::from_fn(n, n, |i, j| hp(n - 1 - i, n - 1 - j) + if i == j { damp } else { 0.0 });
    // nalgebra reads the lower triangle only; L̃ is column-major, lower.
    let l = Cholesky::new(m)?.unpack();
    let l = l.as_slice();
    // Column c of L̃⁻¹ solves L̃x = e_c; it is zero above row c, so each
    // column is an independent forward substitution over rows c..n. Columns
    // are solved RHS_PER_TASK at a time so that each column of L̃ read from
    // memory serves all of them.
    const RHS_PER_TASK: usize = 8;
    let inv_cols: Vec<Vec<f64>> = (0..n.div_ceil(RHS_PER_TASK))
        .into_par_iter()
        .flat_map_iter(|t| {
            let c0 = t * RHS_PER_TASK;
            let mut xs: Vec<Vec<f64>> = (c0..(c0 + RHS_PER_TASK).min(n))
                .map(|c| {
                    let mut x = vec![0f64; n - c];
                    x[0] = 1.0;
                    x
                })
                .collect();
            for k in c0..n {
                let col = &l[k * n..(k + 1) * n];
                for (c, x) in (c0..=k).zip(xs.iter_mut()) {
                    let xk = x[k - c] / col[k];
                    x[k - c] = xk;
                    for (xi, &lik) in x[k - c + 1..].iter_mut().zip(&col[k + 1..]) {
                        *xi -= xk * lik;
                    }
                }
            }
            xs
        })
        .collect();
    // (L̃⁻¹)[k][c] lands at U[n−1−k][n−1−c].
    let mut u = vec![0f64; n * n];
    for (c, x) in inv_cols.iter().enumerate() {
        let j = n - 1 - c;
        for (off, &v) in x.iter().enumerate() {
            u[(j - off) * n + j] = v;
        }
    }
    let ok = (0..n).all(|i| {
        let d = u[i * n + i];
        d.is_finite() && d > 0.0
    }) && u.iter().all(|v| v.is_finite());
    ok.then_some(u)
}

/// The column sweep over a chunk of rows; everything but the rows is shared.
struct Sweep<'a> {
    /// Upper Cholesky factor of the damped inverse Hessian, in sweep order.
    u: &'a [f64],
    cols: usize,
    block: usize,
    /// Columns per scale and scales per row, as in [`quantize_weight`].
    group: usize,
    groups_per_row: usize,
    perm: &'a [usize],
    /// Per-group grids chosen during the sweep from the current weights.
    dynamic_groups: bool,
    spec: &'a WeightSpec,
}

/// Columns of the lazy update processed together, so that the block's rows of
/// `U` for them (`block × TILE` f64) stay in L2 while every row is updated.
const TILE: usize = 256;

impl Sweep<'_> {
    /// `w`: `[rc, cols]` in sweep order (updated in place); `q`: `[rc, cols]` in
    /// original order; `scales`/`zps`: `[rc, groups_per_row]`.
    fn run(&self, w: &mut [f64], q: &mut [i8], scales: &mut [f32], zps: &mut [i32]) {
        let (cols, u, bs) = (self.cols, self.u, self.block);
        let rc = w.len() / cols;
        // err[r * bs + k]: scaled error of the block's k-th column in row r.
        let mut err = vec![0f64; rc * bs];
        let mut buf = Vec::with_capacity(self.group);
        for b0 in (0..cols).step_by(bs) {
            let b1 = (b0 + bs).min(cols);
            for i in b0..b1 {
                let ui = &u[i * cols..(i + 1) * cols];
                if self.dynamic_groups && i.is_multiple_of(self.group) {
                    let g1 = (i + self.group).min(cols);
                    for r in 0..rc {
                        let row = &w[r * cols..(r + 1) * cols];
                        buf.clear();
                        buf.extend(row[i..g1.min(b1)].iter().map(|&v| v as f32));
                        // Columns past the block still miss this block's errors so far.
                        for j in b1..g1 {
                            let pending: f64 = (b0..i).map(|k| err[r * bs + k - b0] * u[k * cols + j]).sum();
                            buf.push((row[j] - pending) as f32);
                        }
                        let (s, z) = group_params(buf.iter().copied(), self.spec, 1.0);
                        // Quantize against the scale as stored (f16 for llama.cpp grids).
                        scales[r * self.groups_per_row + i / self.group] = self.spec.stored_scale(s);
                        zps[r * self.groups_per_row + i / self.group] = z;
                    }
                }
                let orig = self.perm[i];
                let gi = orig / self.group;
                for r in 0..rc {
                    let row = &mut w[r * cols..(r + 1) * cols];
                    let (s, z) = (scales[r * self.groups_per_row + gi], zps[r * self.groups_per_row + gi]);
                    let qv = quantize_value(row[i] as f32, s, z, self.spec);
                    q[r * cols + orig] = qv;
                    let deq = ((qv as i32 - z) as f32 * s) as f64;
                    let e = (row[i] - deq) / ui[i];
                    err[r * bs + i - b0] = e;
                    for (v, &uij) in row[i + 1..b1].iter_mut().zip(&ui[i + 1..b1]) {
                        *v -= e * uij;
                    }
                }
            }
            if b1 < cols {
                self.lazy_update(w, &err, b0, b1);
            }
        }
    }

    /// `W[:, b1..] −= Err[:, block] · U[b0..b1, b1..]`.
    fn lazy_update(&self, w: &mut [f64], err: &[f64], b0: usize, b1: usize) {
        let (cols, u, bs) = (self.cols, self.u, self.block);
        let nb = b1 - b0;
        for t0 in (b1..cols).step_by(TILE) {
            let t1 = (t0 + TILE).min(cols);
            let urow = |k: usize| &u[(b0 + k) * cols + t0..(b0 + k) * cols + t1];
            for (r, row) in w.chunks_exact_mut(cols).enumerate() {
                let dst = &mut row[t0..t1];
                let e = &err[r * bs..r * bs + nb];
                // Four block rows per pass: a quarter of the loads and stores of `dst`.
                let mut k = 0;
                while k + 4 <= nb {
                    let (e0, e1, e2, e3) = (e[k], e[k + 1], e[k + 2], e[k + 3]);
                    let it = dst
                        .iter_mut()
                        .zip(urow(k))
                        .zip(urow(k + 1))
                        .zip(urow(k + 2))
                        .zip(urow(k + 3));
                    for ((((d, a), b), c), f) in it {
                        *d -= e0 * a + e1 * b + e2 * c + e3 * f;
                    }
                    k += 4;
                }
                for (kk, &ek) in e.iter().enumerate().skip(k) {
                    for (d, a) in dst.iter_mut().zip(urow(kk)) {
                        *d -= ek * a;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::hessian::HessianAccumulator;
    use oqt_core::testing::pseudo_random;

    fn spec(bits: u8, granularity: Granularity, symmetric: bool) -> WeightSpec {
        WeightSpec::new(bits, granularity, symmetric)
    }

    fn identity(n: usize) -> Vec<f64> {
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            h[i * n + i] = 1.0;
        }
        h
    }

    /// `X = Z·M`: `n` rows of `cols` strongly correlated inputs.
    fn correlated_inputs(n: usize, cols: usize, seed: u64) -> Vec<f32> {
        let z = pseudo_random(n * cols, seed, 1.0);
        let m = pseudo_random(cols * cols, seed + 1, 1.0);
        let mut x = vec![0f32; n * cols];
        for r in 0..n {
            for k in 0..cols {
                let zk = z[r * cols + k];
                for c in 0..cols {
                    x[r * cols + c] += zk * m[k * cols + c];
                }
            }
        }
        x
    }

    /// `‖X Wᵀ − X Ŵᵀ‖²` computed directly from the inputs.
    fn direct_output_error(x: &[f32], w: &[f32], qw: &QuantizedWeight) -> f64 {
        let (rows, cols) = (qw.rows, qw.cols);
        let deq = dequantize_weight(qw);
        let mut total = 0.0;
        for xr in x.chunks_exact(cols) {
            for r in 0..rows {
                let y: f64 = (0..cols)
                    .map(|c| xr[c] as f64 * (w[r * cols + c] as f64 - deq[r * cols + c] as f64))
                    .sum();
                total += y * y;
            }
        }
        total
    }

    fn hessian_of(x: &[f32], cols: usize) -> Vec<f64> {
        let mut acc = HessianAccumulator::new(cols);
        acc.add(x);
        acc.hessian()
    }

    /// Unblocked textbook GPTQ (no act_order) with `U` from a dense inverse,
    /// to check the blocked sweep and the reversed-Cholesky shortcut.
    fn naive_gptq(w: &[f32], rows: usize, cols: usize, h: &[f64], s: &WeightSpec) -> (Vec<i8>, Vec<f32>) {
        let mut hm = DMatrix::from_row_slice(cols, cols, h);
        let mut wv: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        for i in 0..cols {
            if hm[(i, i)] == 0.0 {
                hm[(i, i)] = 1.0;
                for r in 0..rows {
                    wv[r * cols + i] = 0.0;
                }
            }
        }
        let damp = 0.01 * hm.diagonal().mean();
        for i in 0..cols {
            hm[(i, i)] += damp;
        }
        let hinv = hm.try_inverse().unwrap();
        let u = Cholesky::new(hinv).unwrap().l().transpose();
        let rtn = quantize_weight(w, rows, cols, s, 1.0);
        let group = s.group_len(cols);
        let per_row = cols.div_ceil(group);
        let mut q = vec![0i8; rows * cols];
        let mut scales = rtn.scales.clone();
        for r in 0..rows {
            let row = &mut wv[r * cols..(r + 1) * cols];
            let (mut sc, mut zp) = (0f32, 0i32);
            for i in 0..cols {
                let k = rtn.scale_index(r, i);
                if matches!(s.granularity, Granularity::PerGroup(_)) {
                    if i % group == 0 {
                        let g1 = (i + group).min(cols);
                        (sc, zp) = group_params(row[i..g1].iter().map(|&v| v as f32), s, 1.0);
                        scales[r * per_row + i / group] = sc;
                    }
                } else {
                    sc = rtn.scales[k];
                    zp = rtn.zero_points.as_ref().map_or(0, |z| z[k]);
                }
                let qv = quantize_value(row[i] as f32, sc, zp, s);
                q[r * cols + i] = qv;
                let e = (row[i] - ((qv as i32 - zp) as f32 * sc) as f64) / u[(i, i)];
                for j in i + 1..cols {
                    row[j] -= e * u[(i, j)];
                }
            }
        }
        (q, scales)
    }

    #[test]
    fn identity_hessian_reproduces_round_to_nearest() {
        let (rows, cols) = (9, 100);
        let w = pseudo_random(rows * cols, 3, 0.4);
        // A diagonal Hessian with distinct entries also makes act_order permute.
        let mut diagonal = vec![0.0; cols * cols];
        for i in 0..cols {
            diagonal[i * cols + i] = 1.0 + ((i * 37) % cols) as f64;
        }
        let specs = [
            spec(4, Granularity::PerChannel, true),
            spec(4, Granularity::PerGroup(32), true),
            spec(3, Granularity::PerGroup(32), false),
            spec(8, Granularity::PerTensor, false),
        ];
        for (h, s) in [identity(cols), diagonal].iter().flat_map(|h| specs.map(|s| (h, s))) {
            for act_order in [false, true] {
                let opts = GptqOptions {
                    act_order,
                    ..Default::default()
                };
                let g = gptq_quantize(&w, rows, cols, h, &s, &opts).unwrap();
                assert_eq!(
                    g,
                    quantize_weight(&w, rows, cols, &s, 1.0),
                    "{s:?}, act_order {act_order}"
                );
            }
        }
    }

    #[test]
    fn lpbq_with_an_identity_hessian_reproduces_round_to_nearest() {
        let (rows, cols) = (7, 128);
        let mut w = pseudo_random(rows * cols, 5, 0.4);
        // A zero block and a zero row exercise the multiplier floor.
        w[16..32].fill(0.0);
        w[3 * cols..4 * cols].fill(0.0);
        for block in [16, 32, 64] {
            let s = spec(4, Granularity::Lpbq(block), true);
            for act_order in [false, true] {
                let opts = GptqOptions {
                    act_order,
                    ..Default::default()
                };
                let g = gptq_quantize(&w, rows, cols, &identity(cols), &s, &opts).unwrap();
                assert_eq!(
                    g,
                    quantize_weight(&w, rows, cols, &s, 1.0),
                    "block {block}, act_order {act_order}"
                );
            }
        }
        let err = gptq_quantize(
            &w[..rows * 100],
            rows,
            100,
            &identity(100),
            &spec(4, Granularity::Lpbq(64), true),
            &GptqOptions::default(),
        );
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("LPBQ blocks of 64 do not divide the 100")
        );
    }

    #[test]
    fn correlated_inputs_give_much_lower_output_error_than_rtn() {
        let (n, rows, cols) = (2048, 32, 64);
        let x = correlated_inputs(n, cols, 21);
        let w = pseudo_random(rows * cols, 22, 0.1);
        let h = hessian_of(&x, cols);
        for (s, act_order) in [
            (spec(4, Granularity::PerChannel, true), false),
            (spec(4, Granularity::PerChannel, true), true),
            (spec(4, Granularity::PerGroup(32), true), false),
            (spec(4, Granularity::PerGroup(32), false), false),
            (spec(4, Granularity::PerGroup(32), true), true),
            (spec(4, Granularity::Lpbq(16), true), false),
            (spec(4, Granularity::Lpbq(32), true), true),
        ] {
            let opts = GptqOptions {
                act_order,
                ..Default::default()
            };
            let rtn = quantize_weight(&w, rows, cols, &s, 1.0);
            let gptq = gptq_quantize(&w, rows, cols, &h, &s, &opts).unwrap();
            let (e_rtn, e_gptq) = (direct_output_error(&x, &w, &rtn), direct_output_error(&x, &w, &gptq));
            // The Hessian form of the same error agrees (H = 2/n XᵀX).
            let via_h = output_error(&w, &gptq, &h) * n as f64 / 2.0;
            assert!((via_h - e_gptq).abs() <= 1e-6 * e_gptq, "{via_h} vs {e_gptq}");
            let ratio = e_gptq / e_rtn;
            println!("{s:?} act_order={act_order}: GPTQ/RTN output error = {ratio:.3}");
            assert!(ratio < 0.8, "{s:?} act_order={act_order}: ratio {ratio}");
        }
    }

    #[test]
    fn blocked_sweep_matches_the_textbook_algorithm_for_any_block_size() {
        let (n, rows, cols) = (512, 12, 70);
        let x = correlated_inputs(n, cols, 31);
        let w = pseudo_random(rows * cols, 32, 0.1);
        let h = hessian_of(&x, cols);
        for s in [
            spec(4, Granularity::PerChannel, true),
            spec(4, Granularity::PerGroup(32), false),
            spec(3, Granularity::PerTensor, true),
        ] {
            let (q_ref, scales_ref) = naive_gptq(&w, rows, cols, &h, &s);
            // 1: lazy updates only; 20: groups straddle blocks; 128: one block.
            for block_size in [1, 20, 32, 128] {
                let opts = GptqOptions {
                    block_size,
                    ..Default::default()
                };
                let g = gptq_quantize(&w, rows, cols, &h, &s, &opts).unwrap();
                assert_eq!(g.q, q_ref, "{s:?}, block {block_size}");
                assert_eq!(g.scales, scales_ref, "{s:?}, block {block_size}");
            }
        }
    }

    #[test]
    fn layout_and_range_match_round_to_nearest() {
        let (n, rows, cols) = (256, 5, 70);
        let x = correlated_inputs(n, cols, 41);
        let w = pseudo_random(rows * cols, 42, 1.0);
        let h = hessian_of(&x, cols);
        for s in [
            spec(4, Granularity::PerGroup(32), true),
            spec(2, Granularity::PerGroup(32), false),
            spec(4, Granularity::PerChannel, false),
            spec(8, Granularity::PerChannel, true),
            spec(3, Granularity::PerTensor, false),
        ] {
            for act_order in [false, true] {
                let opts = GptqOptions {
                    act_order,
                    ..Default::default()
                };
                let g = gptq_quantize(&w, rows, cols, &h, &s, &opts).unwrap();
                let r = quantize_weight(&w, rows, cols, &s, 1.0);
                assert_eq!((g.rows, g.cols, g.group, g.spec), (r.rows, r.cols, r.group, r.spec));
                assert_eq!(g.q.len(), r.q.len());
                assert_eq!(g.scales.len(), r.scales.len(), "{s:?}");
                assert_eq!(
                    g.zero_points.as_ref().map(Vec::len),
                    r.zero_points.as_ref().map(Vec::len)
                );
                let (qmin, qmax) = s.qrange();
                assert!(g.q.iter().all(|&v| (qmin..=qmax).contains(&(v as i32))), "{s:?}");
                if let Some(z) = &g.zero_points {
                    assert!(z.iter().all(|v| (qmin..=qmax).contains(v)));
                }
                assert!(g.scales.iter().all(|v| v.is_finite() && *v > 0.0));
                // Per-channel / per-tensor scales are RTN's, whatever the sweep did.
                if !matches!(s.granularity, Granularity::PerGroup(_)) {
                    assert_eq!(g.scales, r.scales);
                    assert_eq!(g.zero_points, r.zero_points);
                }
                let d = dequantize_weight(&g);
                assert_eq!(d.len(), rows * cols);
                for (i, v) in d.iter().enumerate() {
                    let k = g.scale_index(i / cols, i % cols);
                    let zp = g.zero_points.as_ref().map_or(0, |z| z[k]);
                    assert_eq!(*v, (g.q[i] as i32 - zp) as f32 * g.scales[k]);
                }
            }
        }
    }

    #[test]
    fn dead_input_gives_a_zero_weight_column() {
        let (n, rows, cols, dead) = (256, 6, 40, 7);
        let mut x = correlated_inputs(n, cols, 51);
        for r in 0..n {
            x[r * cols + dead] = 0.0;
        }
        let w = pseudo_random(rows * cols, 52, 0.3);
        let h = hessian_of(&x, cols);
        assert_eq!(h[dead * cols + dead], 0.0);
        for s in [
            spec(4, Granularity::PerChannel, true),
            spec(4, Granularity::PerGroup(32), false),
            spec(4, Granularity::PerChannel, false),
        ] {
            for act_order in [false, true] {
                let opts = GptqOptions {
                    act_order,
                    ..Default::default()
                };
                let g = gptq_quantize(&w, rows, cols, &h, &s, &opts).unwrap();
                let d = dequantize_weight(&g);
                assert!(d.iter().all(|v| v.is_finite()));
                for r in 0..rows {
                    assert_eq!(d[r * cols + dead], 0.0, "{s:?} row {r}");
                }
                assert!(d.iter().any(|&v| v != 0.0));
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let w = pseudo_random(4 * 8, 1, 1.0);
        let s = spec(4, Granularity::PerChannel, true);
        let o = GptqOptions::default();
        assert!(gptq_quantize(&w, 4, 8, &vec![0.0; 64], &s, &o).is_err());
        assert!(gptq_quantize(&w, 4, 8, &identity(7), &s, &o).is_err());
        assert!(gptq_quantize(&w, 4, 7, &identity(7), &s, &o).is_err());
        // Indefinite everywhere: damping cannot rescue it.
        let neg: Vec<f64> = identity(8).iter().map(|v| -v).collect();
        let err = gptq_quantize(&w, 4, 8, &neg, &s, &o).unwrap_err().to_string();
        assert!(err.contains("not positive definite"), "{err}");
    }

    #[test]
    fn hessian_add_and_add_gram_agree() {
        let (n, cols) = (300, 24);
        let x = pseudo_random(n * cols, 61, 2.0);
        let mut a = HessianAccumulator::new(cols);
        a.add(&x[..100 * cols]);
        a.add(&x[100 * cols..]);
        let mut gram = vec![0f32; cols * cols];
        for xr in x.chunks_exact(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    gram[i * cols + j] += xr[i] * xr[j];
                }
            }
        }
        let mut b = HessianAccumulator::new(cols);
        b.add_gram(&gram, n);
        assert_eq!((a.rows_seen(), b.rows_seen(), a.cols()), (n, n, cols));
        let (ha, hb) = (a.hessian(), b.hessian());
        for (i, (p, q)) in ha.iter().zip(&hb).enumerate() {
            assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{i}: {p} vs {q}");
            // Symmetric, and the 2/n scaling of the reference.
            assert_eq!(*p, ha[(i % cols) * cols + i / cols]);
        }
        let direct: f64 = x.chunks_exact(cols).map(|r| (r[3] as f64) * (r[5] as f64)).sum();
        assert!((ha[3 * cols + 5] - 2.0 * direct / n as f64).abs() < 1e-9);
        assert!(HessianAccumulator::new(4).hessian().iter().all(|&v| v == 0.0));
    }

    /// `cargo test -p oqt-compress --lib gptq_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing only"]
    fn gptq_timing() {
        for (rows, cols) in [(1536, 576), (576, 1536)] {
            let x = pseudo_random(2048 * cols, 71, 1.0);
            let w = pseudo_random(rows * cols, 72, 0.1);
            let t = std::time::Instant::now();
            let h = hessian_of(&x, cols);
            let th = t.elapsed();
            for s in [
                spec(4, Granularity::PerChannel, true),
                spec(4, Granularity::PerGroup(32), true),
            ] {
                let t = std::time::Instant::now();
                let g = gptq_quantize(&w, rows, cols, &h, &s, &GptqOptions::default()).unwrap();
                println!(
                    "{rows}×{cols} {:?}: gptq {:?} (Hessian of 2048 rows via add: {th:?})",
                    s.granularity,
                    t.elapsed()
                );
                assert_eq!(g.q.len(), rows * cols);
            }
        }
    }
}
