//! `out[m, n] = Σ_groups (s_a[m] · s_w[n, g]) · dot_g(m, n)`: quantized
//! activations times packed weights, parallel over weight rows.

use crate::Isa;
use crate::act_quant::QuantizedRows;
use crate::dot::{dots_int4, dots_int8};
use crate::pack::{BLOCK, PackedInt4, PackedInt8};
use rayon::prelude::*;

/// The shared float epilogue: group dots → one output, in group order.
#[inline]
fn combine(s_a: f32, s_w: &[f32], dots: &[i32]) -> f32 {
    let mut y = 0f32;
    for (&s, &d) in s_w.iter().zip(dots) {
        y += (s_a * s) * d as f32;
    }
    y
}

/// Weight rows per parallel task: enough work to amortize scheduling.
const ROWS_PER_TASK: usize = 16;

/// Run `row_fn(n, out_column)` for every weight row in parallel, then
/// transpose the `[n, m]` results into `out` (`[m, n]`, row-major).
fn by_weight_rows(m: usize, n: usize, out: &mut [f32], row_fn: impl Fn(usize, &mut [f32]) + Sync) {
    assert_eq!(out.len(), m * n);
    if m == 1 {
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(t, chunk)| {
            for (i, o) in chunk.iter_mut().enumerate() {
                row_fn(t * ROWS_PER_TASK + i, std::slice::from_mut(o));
            }
        });
        return;
    }
    let mut by_n = vec![0f32; m * n];
    by_n.par_chunks_mut(m * ROWS_PER_TASK).enumerate().for_each(|(t, chunk)| {
        for (i, col) in chunk.chunks_mut(m).enumerate() {
            row_fn(t * ROWS_PER_TASK + i, col);
        }
    });
    for (j, col) in by_n.chunks(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

/// `a` (`[m, k]` quantized) × `w`ᵀ (`[n, k]` int4) → `out` `[m, n]`.
pub fn matmul_int4(isa: Isa, a: &QuantizedRows, w: &PackedInt4, out: &mut [f32]) {
    assert_eq!(a.k_pad, w.k_pad, "activation and weight widths differ");
    let (m, groups, blocks) = (a.rows, w.groups(), a.k_pad / BLOCK);
    by_weight_rows(m, w.rows, out, |n, col| {
        let mut dots = vec![0i32; groups];
        let wrow = &w.data[n * w.row_bytes()..(n + 1) * w.row_bytes()];
        let (ws, wsum) = (&w.scales[n * groups..(n + 1) * groups], &w.sums[n * groups..(n + 1) * groups]);
        for (i, o) in col.iter_mut().enumerate() {
            let arow = &a.q[i * a.k_pad..(i + 1) * a.k_pad];
            let asums = &a.block_sums[i * blocks..(i + 1) * blocks];
            dots_int4(isa, arow, asums, a.zero_point[i], wrow, wsum, w.group, &mut dots);
            *o = combine(a.scale[i], ws, &dots);
        }
    });
}

/// `a` (`[m, k]` quantized) × `w`ᵀ (`[n, k]` int8) → `out` `[m, n]`.
pub fn matmul_int8(isa: Isa, a: &QuantizedRows, w: &PackedInt8, out: &mut [f32]) {
    assert_eq!(a.k_pad, w.k_pad, "activation and weight widths differ");
    let (m, groups) = (a.rows, w.groups());
    by_weight_rows(m, w.rows, out, |n, col| {
        let mut dots = vec![0i32; groups];
        let wrow = &w.data[n * w.k_pad..(n + 1) * w.k_pad];
        let (ws, wsum) = (&w.scales[n * groups..(n + 1) * groups], &w.sums[n * groups..(n + 1) * groups]);
        for (i, o) in col.iter_mut().enumerate() {
            let arow = &a.q[i * a.k_pad..(i + 1) * a.k_pad];
            dots_int8(isa, arow, a.zero_point[i], wrow, wsum, w.group, &mut dots);
            *o = combine(a.scale[i], ws, &dots);
        }
    });
}
