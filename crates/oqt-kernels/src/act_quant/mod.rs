//! Dynamic per-row (per-token) asymmetric int8 activation quantization, as
//! XNNPACK's qd8 and ExecuTorch's 8da4w do it. See the crate docs for the formula.

use crate::Isa;
use crate::pack::{BLOCK, padded_len};

/// Rows of quantized activations, padded to a multiple of 32 columns with the
/// row's zero point (so padded columns contribute `q − zp = 0`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedRows {
    pub rows: usize,
    pub k: usize,
    pub k_pad: usize,
    /// `rows × k_pad` values.
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub zero_point: Vec<i32>,
    /// `Σ q` per block of 32 (`rows × k_pad/32`): lets SIMD int4 kernels work on
    /// unsigned offset weights and still produce the exact signed dot.
    pub block_sums: Vec<i32>,
    /// llama.cpp's Q8_0 activations: one scale per block of 32 (`rows × k_pad/32`,
    /// f16 values), zero points 0; `scale` is then unused (1).
    pub block_scales: Option<Vec<f32>>,
}

/// Scale and zero point of a row from its range (shared by every path).
pub fn row_params(min: f32, max: f32) -> (f32, i32) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    if max == min {
        // All zeros: any scale represents them; q = zp exactly.
        return (1.0, -128);
    }
    let scale = (max - min) / 255.0;
    let zp = (-128.0 - min / scale).round_ties_even().clamp(-128.0, 127.0) as i32;
    (scale, zp)
}

/// Quantize one row into `out` (same length); returns `(scale, zero_point)`.
pub fn quantize_row(isa: Isa, x: &[f32], out: &mut [i8]) -> (f32, i32) {
    assert_eq!(x.len(), out.len());
    let (min, max) = min_max(x);
    let (scale, zp) = row_params(min, max);
    quantize_with(isa, x, 1.0 / scale, zp, out);
    (scale, zp)
}

/// The smallest and largest of `x` and 0, in sixteen independent lanes so
/// that it vectorizes (min and max do not depend on the order).
fn min_max(x: &[f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
    let chunks = x.chunks_exact(LANES);
    for (i, &v) in chunks.remainder().iter().enumerate() {
        lo[i] = lo[i].min(v);
        hi[i] = hi[i].max(v);
    }
    for c in chunks {
        for i in 0..LANES {
            lo[i] = lo[i].min(c[i]);
            hi[i] = hi[i].max(c[i]);
        }
    }
    (
        lo.iter().fold(0f32, |m, &v| m.min(v)),
        hi.iter().fold(0f32, |m, &v| m.max(v)),
    )
}

/// The reference: `clamp(round_half_even(x · inv) + zp, −128, 127)`.
pub fn quantize_scalar(x: &[f32], inv: f32, zp: i32, out: &mut [i8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((v * inv).round_ties_even() as i32 + zp).clamp(-128, 127) as i8;
    }
}

/// Quantize `rows × k` row-major activations, each row on its own range (dynamic).
pub fn quantize_rows(isa: Isa, x: &[f32], rows: usize, k: usize) -> QuantizedRows {
    quantize_rows_parallel(x, rows, k, |row, out| quantize_row(isa, row, out))
}

/// Quantize `rows × k` activations onto one fixed 8-bit grid (NPU-style static
/// per-tensor): `clamp(round(x · (1/scale)) + zp, −128, 127)`, the same rounding
/// as the dynamic path.
pub fn quantize_rows_static(isa: Isa, x: &[f32], rows: usize, k: usize, scale: f32, zp: i32) -> QuantizedRows {
    let inv = 1.0 / scale;
    quantize_rows_parallel(x, rows, k, |row, out| {
        quantize_with(isa, row, inv, zp, out);
        (scale, zp)
    })
}

/// Quantize `rows × k` activations into llama.cpp's Q8_0 blocks, as its Arm NEON
/// `quantize_row_q8_0` does: per block of 32, `d = amax / 127`,
/// `q = round_half_even(x · (1/d))` (0 for an all-zero block), `d` kept as f16.
pub fn quantize_rows_q8_0(isa: Isa, x: &[f32], rows: usize, k: usize) -> QuantizedRows {
    let mut scales = Vec::with_capacity(rows * padded_len(k) / BLOCK);
    let mut out = quantize_rows_with(x, rows, k, |row, q| {
        for (xb, qb) in row.chunks(BLOCK).zip(q.chunks_mut(BLOCK)) {
            let (d, inv) = q8_0_block_scale(xb);
            quantize_with(isa, xb, inv, 0, qb);
            scales.push(d);
        }
        // A short last block is padded with zeros (zero point 0) and keeps its scale.
        scales.extend(std::iter::repeat_n(
            0.0,
            padded_len(row.len()) / BLOCK - row.len().div_ceil(BLOCK),
        ));
        (1.0, 0)
    });
    out.block_scales = Some(scales);
    out
}

/// A Q8_0 block's stored scale `f16(amax / 127)` and the multiplier `1 / d`
/// (from the unrounded `d`, as ggml computes it; 0 for an all-zero block).
pub fn q8_0_block_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    (half::f16::from_f32(d).to_f32(), inv)
}

fn quantize_with(isa: Isa, x: &[f32], inv: f32, zp: i32, out: &mut [i8]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::quantize_avx2(x, inv, zp, out) },
        _ => quantize_scalar(x, inv, zp, out),
    }
}

/// The shared row loop: `quantize(row, out)` fills one row and returns its (scale, zp).
/// [`quantize_rows_with`] over the thread team when there are enough rows
/// (a prefill): rows are independent, so the result is the same.
fn quantize_rows_parallel(
    x: &[f32],
    rows: usize,
    k: usize,
    quantize: impl Fn(&[f32], &mut [i8]) -> (f32, i32) + Sync,
) -> QuantizedRows {
    const ROWS_PER_TASK: usize = 16;
    if rows < 2 * ROWS_PER_TASK {
        return quantize_rows_with(x, rows, k, quantize);
    }
    let parts: Vec<std::sync::Mutex<Option<QuantizedRows>>> =
        (0..rows.div_ceil(ROWS_PER_TASK)).map(|_| Default::default()).collect();
    crate::team::Team::global().run(parts.len(), |t| {
        let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(rows));
        let part = quantize_rows_with(&x[r0 * k..r1 * k], r1 - r0, k, &quantize);
        *parts[t].lock().unwrap_or_else(|e| e.into_inner()) = Some(part);
    });
    let mut out = QuantizedRows {
        rows,
        k,
        k_pad: padded_len(k),
        q: Vec::with_capacity(rows * padded_len(k)),
        scale: Vec::with_capacity(rows),
        zero_point: Vec::with_capacity(rows),
        block_sums: Vec::with_capacity(rows * padded_len(k) / BLOCK),
        block_scales: None,
    };
    for part in parts {
        let p = part
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .expect("every part quantized");
        out.q.extend_from_slice(&p.q);
        out.scale.extend_from_slice(&p.scale);
        out.zero_point.extend_from_slice(&p.zero_point);
        out.block_sums.extend_from_slice(&p.block_sums);
    }
    out
}

fn quantize_rows_with(
    x: &[f32],
    rows: usize,
    k: usize,
    mut quantize: impl FnMut(&[f32], &mut [i8]) -> (f32, i32),
) -> QuantizedRows {
    assert_eq!(x.len(), rows * k);
    let k_pad = padded_len(k);
    let blocks = k_pad / BLOCK;
    let mut q = vec![0i8; rows * k_pad];
    let mut scale = Vec::with_capacity(rows);
    let mut zero_point = Vec::with_capacity(rows);
    let mut block_sums = vec![0i32; rows * blocks];
    for r in 0..rows {
        let dst = &mut q[r * k_pad..(r + 1) * k_pad];
        let (s, zp) = quantize(&x[r * k..(r + 1) * k], &mut dst[..k]);
        dst[k..].fill(zp as i8);
        for (b, sum) in block_sums[r * blocks..(r + 1) * blocks].iter_mut().enumerate() {
            *sum = dst[b * BLOCK..(b + 1) * BLOCK].iter().map(|&v| v as i32).sum();
        }
        scale.push(s);
        zero_point.push(zp);
    }
    QuantizedRows {
        rows,
        k,
        k_pad,
        q,
        scale,
        zero_point,
        block_sums,
        block_scales: None,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;
