//! A linear layer as the runtime stores it.

use oqt_core::quant::{ActMode, QuantizedWeight, dequantize_weight};
use oqt_kernels::{Isa, PackedInt4, PackedInt8, matmul_int4, matmul_int8, quantize_rows};
use rayon::prelude::*;

pub enum Linear {
    /// `[out, in]` row-major; activations stay f32.
    F32 { w: Vec<f32>, out: usize, inp: usize },
    /// Dynamic int8 activations × int4 weights.
    Int4(PackedInt4),
    /// Dynamic int8 activations × int8 weights.
    Int8(PackedInt8),
}

impl Linear {
    pub fn out_dim(&self) -> usize {
        match self {
            Self::F32 { out, .. } => *out,
            Self::Int4(w) => w.rows,
            Self::Int8(w) => w.rows,
        }
    }

    /// From a bundle's quantized weight: integer kernels when activations are
    /// quantized dynamically, f32 (dequantized) for weight-only recipes.
    pub fn from_quantized(qw: &QuantizedWeight, acts: ActMode) -> Self {
        let per_row_groups = qw.scales.len() / qw.rows.max(1);
        let integer = acts == ActMode::Dynamic && qw.spec.symmetric && per_row_groups * qw.rows == qw.scales.len();
        let group = (qw.group != qw.cols).then_some(qw.group);
        let k_pad = oqt_core::quant::pack::padded_len(qw.cols);
        let group_ok = group.is_none_or(|g| g.is_multiple_of(32) && k_pad.is_multiple_of(g));
        match (integer && group_ok, qw.spec.bits) {
            (true, b) if b <= 4 => Self::Int4(PackedInt4::pack(&qw.q, qw.rows, qw.cols, group, qw.scales.clone())),
            (true, 8) => Self::Int8(PackedInt8::pack(&qw.q, qw.rows, qw.cols, group, qw.scales.clone())),
            _ => Self::F32 {
                w: dequantize_weight(qw),
                out: qw.rows,
                inp: qw.cols,
            },
        }
    }

    /// `x` `[m, in]` → `[m, out]`.
    pub fn forward(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.out_dim()];
        match self {
            Self::F32 { w, out, inp } => {
                y.par_chunks_mut(*out).enumerate().for_each(|(i, row)| {
                    let xi = &x[i * inp..(i + 1) * inp];
                    for (o, wr) in row.iter_mut().zip(w.chunks(*inp)) {
                        *o = dot(xi, wr);
                    }
                });
            }
            Self::Int4(w) => matmul_int4(isa, &quantize_rows(isa, x, m, w.k), w, &mut y),
            Self::Int8(w) => matmul_int8(isa, &quantize_rows(isa, x, m, w.k), w, &mut y),
        }
        y
    }
}

/// f32 dot product in eight independent lanes (vectorizes; a plain `sum()` is
/// one serial dependency chain).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail
}
