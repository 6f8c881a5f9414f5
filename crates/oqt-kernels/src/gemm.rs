//! `out[m, n]` = activation row `m` against weight row `n`, per the crate
//! contract; parallel over weight rows.

use crate::Isa;
use crate::act_quant::QuantizedRows;
use crate::dot::{ActRow, row_int4, row_int8};
use crate::pack::{BLOCK, PackedInt4, PackedInt8};
use crate::team::Team;

/// Weight rows per parallel task: a couple of tasks per thread (load balance)
/// but no smaller than 16 rows (scheduling costs microseconds, a row nanoseconds).
fn rows_per_task(n: usize) -> usize {
    (n / (3 * Team::global().threads())).max(16)
}

/// `Σ q_a` per weight group, for every activation row (`rows × groups`).
fn group_sums(a: &QuantizedRows, group: usize) -> Vec<i32> {
    let per = group / BLOCK;
    a.block_sums.chunks(per).map(|c| c.iter().sum()).collect()
}

/// Per-block activation scales pair with per-block weight scales only.
fn check_block_scales(a: &QuantizedRows, group: usize) {
    assert!(
        a.block_scales.is_none() || group == BLOCK,
        "Q8_0 block activations need weights in groups of {BLOCK}, found {group}"
    );
}

/// Activation row `i` as the row kernels read it.
fn act_row<'a>(a: &'a QuantizedRows, sums: &'a [i32], groups: usize, i: usize) -> ActRow<'a> {
    ActRow {
        q: &a.q[i * a.k_pad..(i + 1) * a.k_pad],
        group_sums: &sums[i * groups..(i + 1) * groups],
        zero_point: a.zero_point[i],
        scale: a.scale[i],
        block_scales: a.block_scales.as_ref().map(|s| &s[i * groups..(i + 1) * groups]),
    }
}

/// Run `value(m, n)` for every output, tasks over weight rows, writing `[m, n]` row-major.
/// Shared by every matmul shape the runtime runs (the f32 path of weight-only recipes too).
pub fn by_weight_rows(m: usize, n: usize, out: &mut [f32], value: impl Fn(usize, usize) -> f32 + Sync) {
    assert_eq!(out.len(), m * n);
    let per_task = rows_per_task(n);
    if m == 1 {
        Team::global().for_each_chunk_mut(out, per_task, |t, chunk| {
            for (i, o) in chunk.iter_mut().enumerate() {
                *o = value(0, t * per_task + i);
            }
        });
        return;
    }
    // Each task owns a band of weight rows and sweeps every activation row over it,
    // so a weight row is read from cache, not memory, for all m.
    let mut by_n = vec![0f32; m * n];
    Team::global().for_each_chunk_mut(&mut by_n, m * per_task, |t, band| {
        for (j, col) in band.chunks_mut(m).enumerate() {
            for (i, o) in col.iter_mut().enumerate() {
                *o = value(i, t * per_task + j);
            }
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
    let groups = w.groups();
    check_block_scales(a, w.group);
    let sums = group_sums(a, w.group);
    by_weight_rows(a.rows, w.rows, out, |i, n| {
        row_int4(isa, act_row(a, &sums, groups, i), w.row(n))
    });
}

/// `a` (`[m, k]` quantized) × `w`ᵀ (`[n, k]` int8) → `out` `[m, n]`.
pub fn matmul_int8(isa: Isa, a: &QuantizedRows, w: &PackedInt8, out: &mut [f32]) {
    assert_eq!(a.k_pad, w.k_pad, "activation and weight widths differ");
    let groups = w.groups();
    check_block_scales(a, w.group);
    let sums = group_sums(a, w.group);
    by_weight_rows(a.rows, w.rows, out, |i, n| {
        row_int8(isa, act_row(a, &sums, groups, i), w.row(n))
    });
}
