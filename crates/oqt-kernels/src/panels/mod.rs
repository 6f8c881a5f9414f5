//! Register-tiled int8 × int4 GEMM over weights repacked into panels.
//!
//! **The repack** ([`repack_int4`], done once when a model loads): the weight
//! rows are taken sixteen at a time (a *panel*; the last one padded with zero
//! rows) and, per block of 32 columns, interleaved so that one 64-byte vector
//! holds four consecutive columns of all sixteen rows. A broadcast of four
//! activation bytes against that vector gives, in one 512-bit `vpdpbusd`,
//! four products for each of the sixteen rows: the SIMD lanes are output
//! columns, so no horizontal reduction is needed, and the unpacked weights of
//! a block are reused for several activation rows (the register tile) before
//! the next block is read. AVX2 (`vpmaddubsw` + `vpmaddwd`, 256-bit) reads
//! each 64-byte vector as two halves of eight rows.
//!
//! **The arithmetic** is the crate contract, unchanged: per (row, group) the
//! exact i32 dot `Σ (q_a − zp) · q_w`, then `p[g mod 8] += (s_a · s_w[g]) · dot`
//! and the pairwise finish — lane by lane, so every output equals
//! [`crate::dot::row_int4_scalar`] bit for bit (tests on odd shapes).
//!
//! Per panel and block the 256 data bytes are four vectors `P_j` (`j < 4`, 64
//! bytes each): the low nibble of byte `4r + t` of `P_j` is row `r`, column
//! `4j + t` of the block (stored `+ 8`), its high nibble column `4(j + 4) + t`.
//!
//! **Palettized (LUT) weights** ([`repack_lut`]) use the same layout with the
//! nibble an index into a table of sixteen int8 codes (a `lut` weight's
//! kernel view, `oqt_core::lut`). Each 128-bit lane of a panel vector holds
//! four rows, so one `vpshufb` against a vector of four 16-byte tables (one a
//! lane, stored `code + 128`) turns sixteen rows' indices into their codes in
//! register; the dot then runs as for int4 with the offset 128 in place of 8.
//! The result is the int8 per-channel kernel's on the kernel view, bit for
//! bit: the same exact i32 dot and the same one-group epilogue.

use crate::Isa;
use crate::act_quant::QuantizedRows;
use crate::pack::{BLOCK, PackedInt4};
use crate::team::{SendPtr, Team};

/// Weight rows per panel (the SIMD lanes of one 512-bit i32 vector).
pub const PANEL: usize = 16;

/// Data bytes of one panel and block of [`BLOCK`] columns (two nibbles a byte).
pub(crate) const PANEL_BLOCK_BYTES: usize = PANEL * BLOCK / 2;

/// int4 weights repacked into panels of [`PANEL`] rows (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Panels {
    pub rows: usize,
    pub k: usize,
    pub k_pad: usize,
    pub group: usize,
    /// `panels × blocks × PANEL_BLOCK_BYTES` bytes.
    pub data: Vec<u8>,
    /// `panels × groups × PANEL` scales (lane = row in the panel; 0 for padding rows).
    pub scales: Vec<f32>,
    /// `panels × groups × PANEL` sums of the signed weights of each (row, group).
    pub sums: Vec<i32>,
    /// LPBQ: `panels × groups × PANEL` integer block multipliers in [1, 16].
    /// The kernel then accumulates `Σ_g m_g · dot_g` in i32 and scales once by
    /// the row's scale (every group's `scales` entry): the int8 per-channel
    /// contract on the expanded weights `q · m`, bit for bit.
    pub multipliers: Option<Vec<i32>>,
    /// LUT: `panels × 64` bytes, per panel four 16-entry tables (one per
    /// 128-bit lane of four rows), each entry an int8 code stored `+ 128`.
    /// The nibbles are then indices into these tables, not values.
    pub tables: Option<Vec<u8>>,
}

impl Int4Panels {
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }
    pub fn groups(&self) -> usize {
        self.k_pad / self.group
    }
    pub fn blocks(&self) -> usize {
        self.k_pad / BLOCK
    }
    /// The signed weight at (`row`, `col`) (`col < k`), read back from the
    /// panel layout: a gather, e.g. an embedding row looked up from tied weights.
    pub fn value(&self, row: usize, col: usize) -> i8 {
        self.nibble(row, col) as i8 - 8
    }

    /// The stored nibble at (`row`, `col`).
    fn nibble(&self, row: usize, col: usize) -> u8 {
        let (p, r) = (row / PANEL, row % PANEL);
        let (b, c) = (col / BLOCK, col % BLOCK);
        let (j, t, high) = if c < 16 {
            (c / 4, c % 4, false)
        } else {
            ((c - 16) / 4, c % 4, true)
        };
        let byte = self.data[(p * self.blocks() + b) * PANEL_BLOCK_BYTES + j * 4 * PANEL + 4 * r + t];
        if high { byte >> 4 } else { byte & 0x0F }
    }

    /// The offset the stored weights carry (the kernels remove `offset · Σ q_a`).
    pub fn offset(&self) -> i32 {
        if self.tables.is_some() { 128 } else { 8 }
    }

    /// The weight the arithmetic uses at (`row`, `col`): the stored value times
    /// its LPBQ multiplier (1 for plain int4 panels).
    pub fn weight(&self, row: usize, col: usize) -> i32 {
        if let Some(t) = &self.tables {
            let (p, r) = (row / PANEL, row % PANEL);
            return t[p * LUT_TABLE_BYTES + (r / 4) * 16 + self.nibble(row, col) as usize] as i32 - 128;
        }
        let m = self.multipliers.as_ref().map_or(1, |m| {
            let (p, r) = (row / PANEL, row % PANEL);
            m[(p * self.groups() + col / self.group) * PANEL + r]
        });
        self.value(row, col) as i32 * m
    }

    /// The scale of (`row`, group of `col`).
    pub fn scale(&self, row: usize, col: usize) -> f32 {
        let (p, r) = (row / PANEL, row % PANEL);
        self.scales[(p * self.groups() + col / self.group) * PANEL + r]
    }

    /// Bytes held (what the runtime keeps in memory).
    pub fn bytes(&self) -> usize {
        self.data.len()
            + self.scales.len() * 4
            + self.sums.len() * 4
            + self.multipliers.as_ref().map_or(0, |m| m.len() * 4)
            + self.tables.as_ref().map_or(0, Vec::len)
    }
}

/// Several weights of the same width and grouping as one, their panels one
/// after the other (a part whose rows are not a multiple of [`PANEL`] keeps its
/// zero padding rows); `None` when the widths or groups differ. Outputs are
/// computed independently per row, so each part's outputs are unchanged; the
/// part `i` starts at output column `Σ_{j<i} panels_j × PANEL`.
pub fn concat_panels(parts: &[&Int4Panels]) -> Option<Int4Panels> {
    let first = parts.first()?;
    if parts.iter().any(|p| {
        (p.k, p.k_pad, p.group, p.multipliers.is_some(), p.tables.is_some())
            != (
                first.k,
                first.k_pad,
                first.group,
                first.multipliers.is_some(),
                first.tables.is_some(),
            )
    }) {
        return None;
    }
    Some(Int4Panels {
        rows: parts.iter().map(|p| p.panels() * PANEL).sum(),
        k: first.k,
        k_pad: first.k_pad,
        group: first.group,
        data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        scales: parts.iter().flat_map(|p| p.scales.iter().copied()).collect(),
        sums: parts.iter().flat_map(|p| p.sums.iter().copied()).collect(),
        multipliers: first.multipliers.as_ref().map(|_| {
            parts
                .iter()
                .flat_map(|p| p.multipliers.iter().flatten().copied())
                .collect()
        }),
        tables: first
            .tables
            .as_ref()
            .map(|_| parts.iter().flat_map(|p| p.tables.iter().flatten().copied()).collect()),
    })
}

/// The panel bytes of `panels × blocks` blocks (the module docs' layout):
/// `nibble(row, col)` gives each stored nibble, padding rows included.
fn interleave_nibbles(panels: usize, blocks: usize, nibble: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut data = vec![0u8; panels * blocks * PANEL_BLOCK_BYTES];
    for p in 0..panels {
        for b in 0..blocks {
            let out = &mut data[(p * blocks + b) * PANEL_BLOCK_BYTES..][..PANEL_BLOCK_BYTES];
            for j in 0..4 {
                for r in 0..PANEL {
                    for t in 0..4 {
                        let row = p * PANEL + r;
                        let lo = nibble(row, b * BLOCK + 4 * j + t);
                        let hi = nibble(row, b * BLOCK + 4 * (j + 4) + t);
                        out[j * 4 * PANEL + 4 * r + t] = lo | (hi << 4);
                    }
                }
            }
        }
    }
    data
}

/// The load-time repack of row-major packed int4 weights into panels.
pub fn repack_int4(w: &PackedInt4) -> Int4Panels {
    let (panels, blocks, groups) = (w.rows.div_ceil(PANEL), w.k_pad / BLOCK, w.groups());
    let mut scales = vec![0f32; panels * groups * PANEL];
    let mut sums = vec![0i32; panels * groups * PANEL];
    // Stored nibble (`q + 8`) of (row, col); padding rows hold zeros (8).
    let data = interleave_nibbles(
        panels,
        blocks,
        |r, c| {
            if r < w.rows { (w.value(r, c) + 8) as u8 } else { 8 }
        },
    );
    for p in 0..panels {
        for g in 0..groups {
            for r in 0..PANEL {
                let row = p * PANEL + r;
                if row < w.rows {
                    scales[(p * groups + g) * PANEL + r] = w.scales[row * groups + g];
                    sums[(p * groups + g) * PANEL + r] = w.sums[row * groups + g];
                }
            }
        }
    }
    Int4Panels {
        rows: w.rows,
        k: w.k,
        k_pad: w.k_pad,
        group: w.group,
        data,
        scales,
        sums,
        multipliers: None,
        tables: None,
    }
}

/// LPBQ weights as panels: `w` holds the 4-bit factors in groups of the LPBQ
/// block (a multiple of [`BLOCK`]) with the row's float scale in every group,
/// `multipliers` the `[rows, groups]` block multipliers in [1, 16].
pub fn repack_int4_lpbq(w: &PackedInt4, multipliers: &[u8]) -> Int4Panels {
    let groups = w.groups();
    assert_eq!(w.k, w.k_pad, "LPBQ blocks tile the row, so its width is whole blocks");
    assert_eq!(multipliers.len(), w.rows * groups, "one multiplier per (row, block)");
    let mut p = repack_int4(w);
    let mut m = vec![0i32; p.panels() * groups * PANEL];
    for row in 0..w.rows {
        for g in 0..groups {
            m[((row / PANEL) * groups + g) * PANEL + row % PANEL] = multipliers[row * groups + g] as i32;
        }
    }
    p.multipliers = Some(m);
    p
}

/// Whether this ISA has a panel kernel (otherwise the row kernels run).
pub fn has_panel_kernel(isa: Isa) -> bool {
    matches!(isa, Isa::Avx2 | Isa::Avx512Vnni)
}

/// Table bytes of one LUT panel: four lanes × 16 entries.
pub const LUT_TABLE_BYTES: usize = 64;

/// Whether this ISA runs LUT panels ([`repack_lut`]). AVX2's `vpmaddubsw`
/// would saturate on `code + 128` bytes, so there (and on the scalar and NEON
/// paths) a LUT weight runs its int8 kernel view on the int8 kernels.
pub fn has_lut_kernel(isa: Isa) -> bool {
    isa == Isa::Avx512Vnni
}

/// Why a palette cannot run as LUT panels, or `None` when it can: at most 16
/// entries, tables shared by whole lanes of four rows, and a width of whole
/// 32-column blocks (padding columns would read a table entry, not a zero).
pub fn lut_panel_problem(rows: usize, k: usize, entries: usize, group_rows: usize) -> Option<String> {
    if entries > 16 {
        return Some(format!("{entries} table entries (a lane table holds 16)"));
    }
    if group_rows == 0 || !group_rows.is_multiple_of(4) || !rows.is_multiple_of(group_rows) {
        return Some(format!(
            "tables shared by {group_rows} rows (a multiple of 4 dividing {rows} is needed)"
        ));
    }
    if k == 0 || !k.is_multiple_of(BLOCK) {
        return Some(format!("width {k} (a multiple of {BLOCK} is needed)"));
    }
    None
}

/// Palettized weights `[rows, k]` as LUT panels: `indices` one per byte
/// (each below `codes[t].len() ≤ 16`), rows `t · group_rows ..` reading table
/// `t`, whose int8 codes are `codes[t]` and scale `scales[t]`. The outputs are
/// the int8 per-channel kernel's on the weights `codes[t][index]` with row
/// scales `scales[t]`, bit for bit. Panics on shapes [`lut_panel_problem`]
/// refuses (the caller checks first).
pub fn repack_lut(
    indices: &[u8],
    rows: usize,
    k: usize,
    group_rows: usize,
    codes: &[Vec<i8>],
    scales: &[f32],
) -> Int4Panels {
    let entries = codes.iter().map(Vec::len).max().unwrap_or(0);
    if let Some(p) = lut_panel_problem(rows, k, entries, group_rows) {
        panic!("not a LUT panel shape: {p}");
    }
    assert_eq!(indices.len(), rows * k);
    assert_eq!(codes.len(), rows / group_rows);
    assert_eq!(scales.len(), codes.len());
    let (panels, blocks) = (rows.div_ceil(PANEL), k / BLOCK);
    let mut tables = vec![128u8; panels * LUT_TABLE_BYTES];
    let mut row_scales = vec![0f32; panels * PANEL];
    let mut sums = vec![0i32; panels * PANEL];
    let data = interleave_nibbles(panels, blocks, |r, c| if r < rows { indices[r * k + c] } else { 0 });
    for p in 0..panels {
        for lane in 0..PANEL / 4 {
            let first = p * PANEL + 4 * lane;
            if first >= rows {
                continue; // padding rows: a table of zeros, never written out
            }
            let table = &codes[first / group_rows];
            for (e, &c) in table.iter().enumerate() {
                tables[p * LUT_TABLE_BYTES + lane * 16 + e] = (c as i32 + 128) as u8;
            }
        }
        for r in 0..PANEL {
            let row = p * PANEL + r;
            if row < rows {
                let table = &codes[row / group_rows];
                row_scales[p * PANEL + r] = scales[row / group_rows];
                sums[p * PANEL + r] = indices[row * k..(row + 1) * k]
                    .iter()
                    .map(|&i| table[i as usize] as i32)
                    .sum();
            }
        }
    }
    Int4Panels {
        rows,
        k,
        k_pad: k,
        group: k,
        data,
        scales: row_scales,
        sums,
        multipliers: None,
        tables: Some(tables),
    }
}

/// What one task computes: activation rows against panels `panels`, written
/// into their columns of the `[m, n]` row-major output at `out` (padding rows
/// of the last panel are not written).
pub(crate) struct PanelTask<'a> {
    pub a: &'a QuantizedRows,
    pub w: &'a Int4Panels,
    pub panels: std::ops::Range<usize>,
    pub out: &'a SendPtr<f32>,
    pub n: usize,
    /// Per (activation row, weight group): the integer correction's activation
    /// side, `8 Σ q_a` (the weights are stored `+ 8`), or when
    /// [`PanelTask::paired`] the i16 pair `(zp, Σ q_a)` that one `vpmaddwd`
    /// against the weights' `(Σ q_w, 8)` turns into `zp Σ q_w + 8 Σ q_a`.
    pub act_corr: &'a [i32],
    /// Per (activation row, weight group): the activation scale.
    pub act_scale: &'a [f32],
    /// Whether [`PanelTask::act_corr`] holds i16 pairs (`Σ q_a` fits in i16).
    pub paired: bool,
}

/// Groups up to this wide keep `Σ q_a` (≤ 128 per column) inside i16.
const PAIRED_MAX_GROUP: usize = 256;

/// `a` (`[m, k]` quantized) × `w`ᵀ → `out` `[m, n]`; tasks over panels.
pub fn matmul_int4_panels(isa: Isa, a: &QuantizedRows, w: &Int4Panels, out: &mut [f32]) {
    assert!(has_panel_kernel(isa), "no panel kernel for {}", isa.name());
    assert_eq!(a.k_pad, w.k_pad, "activation and weight widths differ");
    assert_eq!(out.len(), a.rows * w.rows);
    assert!(
        a.block_scales.is_none() || w.group == BLOCK,
        "Q8_0 block activations need weights in groups of {BLOCK}, found {}",
        w.group
    );
    assert!(
        a.block_scales.is_none() || w.multipliers.is_none(),
        "LPBQ weights take per-row activation scales, not Q8_0 blocks"
    );
    assert!(
        w.tables.is_none() || (has_lut_kernel(isa) && a.block_scales.is_none()),
        "LUT panels run on AVX-512 VNNI with per-row activation scales"
    );
    let groups = w.groups();
    let per = w.group / BLOCK;
    // LUT sums of int8 codes need not fit in i16.
    let paired = w.group <= PAIRED_MAX_GROUP && w.tables.is_none();
    let offset = w.offset();
    // The per-(row, group) scalars of the epilogue, once for every panel.
    let mut act_corr = Vec::with_capacity(a.rows * groups);
    let mut act_scale = Vec::with_capacity(a.rows * groups);
    for i in 0..a.rows {
        for g in 0..groups {
            let sum: i32 = a.block_sums[(i * groups + g) * per..][..per].iter().sum();
            act_corr.push(if paired {
                (a.zero_point[i] & 0xFFFF) | (sum << 16)
            } else {
                offset * sum
            });
            act_scale.push(match &a.block_scales {
                Some(s) => s[i * groups + g],
                None => a.scale[i],
            });
        }
    }
    let (n, panels) = (w.rows, w.panels());
    // A few tasks per thread (load balance), each writing its own columns of `out`.
    let team = Team::global();
    let per_task = (panels / (3 * team.threads())).max(1);
    let out_ptr = SendPtr(out.as_mut_ptr());
    team.run(panels.div_ceil(per_task), |t| {
        let task = PanelTask {
            a,
            w,
            panels: t * per_task..((t + 1) * per_task).min(panels),
            out: &out_ptr,
            n,
            act_corr: &act_corr,
            act_scale: &act_scale,
            paired,
        };
        // SAFETY: the ISA was checked above, the task's ranges lie inside `a`
        // and `w`, and task `t` alone writes the columns of its panels.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match isa {
                Isa::Avx512Vnni => x86::panels_int4_vnni(&task),
                _ => x86::panels_int4_avx2(&task),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act_quant::quantize_rows;

    fn weights(rows: usize, k: usize, seed: usize) -> PackedInt4 {
        let values: Vec<i8> = (0..rows * k).map(|i| ((i * 7 + seed * 13) % 16) as i8 - 8).collect();
        let groups = k.div_ceil(BLOCK);
        let scales = (0..rows * groups).map(|i| 0.01 + (i % 5) as f32 * 0.003).collect();
        PackedInt4::pack(&values, rows, k, Some(BLOCK), scales)
    }

    #[test]
    fn values_and_scales_read_back_from_the_panels() {
        let w = weights(13, 70, 1); // rows and columns off the panel and block sizes
        let p = repack_int4(&w);
        for r in 0..13 {
            for c in 0..70 {
                assert_eq!(p.value(r, c), w.value(r, c), "({r}, {c})");
                assert_eq!(p.scale(r, c), w.scales[r * w.groups() + c / BLOCK]);
            }
        }
    }

    /// LPBQ panels against the int8 per-channel kernel on the expanded
    /// weights `q4 · m`: the same outputs bit for bit, blocks of 32 and 64,
    /// rows off the panel size, 1 to 6 activation rows, extreme multipliers.
    #[test]
    fn lpbq_panels_equal_the_int8_per_channel_kernel_on_expanded_weights() {
        use crate::{PackedInt8, matmul_int8, quantize_rows_static};
        let isa = crate::Isa::detect();
        if !has_panel_kernel(isa) {
            return;
        }
        for (rows, k, block) in [(13, 128, 32), (40, 192, 64), (16, 64, 64), (5, 96, 32)] {
            let blocks = k / block;
            let q4: Vec<i8> = (0..rows * k).map(|i| ((i * 7 + 3) % 16) as i8 - 8).collect();
            let m: Vec<u8> = (0..rows * blocks).map(|i| [1, 16, 7, 2, 11][i % 5]).collect();
            let q8: Vec<i8> = (0..rows * k)
                .map(|i| q4[i] * m[(i / k) * blocks + (i % k) / block] as i8)
                .collect();
            let row_scales: Vec<f32> = (0..rows).map(|r| 0.002 + r as f32 * 1e-4).collect();
            let per_group: Vec<f32> = row_scales
                .iter()
                .flat_map(|&s| std::iter::repeat_n(s, blocks))
                .collect();
            let panels = repack_int4_lpbq(&PackedInt4::pack(&q4, rows, k, Some(block), per_group), &m);
            let int8 = PackedInt8::pack(&q8, rows, k, None, row_scales);
            for r in 0..rows {
                for c in 0..k {
                    assert_eq!(panels.weight(r, c), q8[r * k + c] as i32);
                }
            }
            for mr in 1..=6 {
                let x: Vec<f32> = (0..mr * k).map(|i| ((i * 31) % 23) as f32 / 7.0 - 1.5).collect();
                for a in [
                    quantize_rows(isa, &x, mr, k),
                    quantize_rows_static(isa, &x, mr, k, 0.013, 117),
                ] {
                    let (mut y_panels, mut y_int8) = (vec![0f32; mr * rows], vec![0f32; mr * rows]);
                    matmul_int4_panels(isa, &a, &panels, &mut y_panels);
                    matmul_int8(isa, &a, &int8, &mut y_int8);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&y_panels), bits(&y_int8), "{rows}×{k} block {block}, {mr} rows");
                }
            }
        }
    }

    /// LUT panels against the int8 per-channel kernel on the looked-up codes:
    /// the same outputs bit for bit, for tables shared by 4 to 16 rows (rows
    /// off the panel size), 2 to 16 entries with the extreme codes ±127 and
    /// −128, dynamic and static activations, 1 to 15 activation rows; fused
    /// LUT parts give each part its own outputs.
    #[test]
    fn lut_panels_equal_the_int8_per_channel_kernel_on_the_codes() {
        use crate::{PackedInt8, matmul_int8, quantize_rows_static};
        let isa = crate::Isa::detect();
        if !has_lut_kernel(isa) {
            return;
        }
        let lut = |rows: usize, k: usize, group_rows: usize, entries: usize, seed: usize| {
            let tables = rows / group_rows;
            let codes: Vec<Vec<i8>> = (0..tables)
                .map(|t| {
                    (0..entries)
                        .map(|e| match (e + t + seed) % 7 {
                            0 => 127,
                            1 => -128,
                            2 => -127,
                            v => (v as i32 * 37 - 90 + e as i32) as i8,
                        })
                        .collect()
                })
                .collect();
            let scales: Vec<f32> = (0..tables).map(|t| 0.003 + t as f32 * 1e-4).collect();
            let indices: Vec<u8> = (0..rows * k).map(|i| ((i * 11 + seed * 5) % entries) as u8).collect();
            let q8: Vec<i8> = (0..rows * k)
                .map(|i| codes[(i / k) / group_rows][indices[i] as usize])
                .collect();
            let row_scales: Vec<f32> = (0..rows).map(|r| scales[r / group_rows]).collect();
            let panels = repack_lut(&indices, rows, k, group_rows, &codes, &scales);
            (panels, PackedInt8::pack(&q8, rows, k, None, row_scales), q8)
        };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (rows, k, group_rows, entries) in [
            (32, 64, 16, 16),
            (20, 96, 4, 8),
            (48, 128, 8, 16),
            (16, 32, 16, 2),
            (12, 576, 12, 16),
        ] {
            let (panels, int8, q8) = lut(rows, k, group_rows, entries, rows);
            for r in 0..rows {
                for c in 0..k {
                    assert_eq!(panels.weight(r, c), q8[r * k + c] as i32, "({r}, {c})");
                }
            }
            // Tiles of 8, 4, 2 and 1 rows; an all-zero row (a zero activation scale).
            for mr in [1, 2, 3, 4, 5, 6, 8, 9, 15] {
                let mut x: Vec<f32> = (0..mr * k).map(|i| ((i * 31) % 23) as f32 / 7.0 - 1.5).collect();
                x[..k].fill(0.0);
                for a in [
                    quantize_rows(isa, &x, mr, k),
                    quantize_rows_static(isa, &x, mr, k, 0.013, 117),
                ] {
                    let (mut y_lut, mut y_int8) = (vec![0f32; mr * rows], vec![0f32; mr * rows]);
                    matmul_int4_panels(isa, &a, &panels, &mut y_lut);
                    matmul_int8(isa, &a, &int8, &mut y_int8);
                    assert_eq!(
                        bits(&y_lut),
                        bits(&y_int8),
                        "{rows}×{k}, {group_rows} rows a table, {mr} rows"
                    );
                }
            }
        }
        let parts = [lut(16, 64, 16, 16, 1).0, lut(8, 64, 4, 16, 2).0];
        let fused = concat_panels(&[&parts[0], &parts[1]]).expect("same widths");
        assert!(concat_panels(&[&parts[0], &repack_int4(&weights(16, 64, 1))]).is_none());
        let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 13) % 19) as f32 / 6.0 - 1.4).collect();
        let a = quantize_rows(isa, &x, 3, 64);
        let mut y = vec![0f32; 3 * fused.rows];
        matmul_int4_panels(isa, &a, &fused, &mut y);
        let mut own = vec![0f32; 3 * 8];
        matmul_int4_panels(isa, &a, &parts[1], &mut own);
        for i in 0..3 {
            assert_eq!(bits(&y[i * fused.rows + 16..][..8]), bits(&own[i * 8..(i + 1) * 8]));
        }
        assert!(lut_panel_problem(16, 64, 32, 16).is_some(), "32 entries");
        assert!(lut_panel_problem(16, 64, 16, 2).is_some(), "tables of 2 rows");
        assert!(lut_panel_problem(16, 70, 16, 16).is_some(), "a width off the blocks");
    }

    #[test]
    fn concatenated_panels_give_each_part_its_own_outputs() {
        let isa = crate::Isa::detect();
        if !has_panel_kernel(isa) {
            return;
        }
        let (k, m) = (96, 5);
        let parts = [weights(16, k, 1), weights(11, k, 2), weights(8, k, 3)];
        let panels: Vec<Int4Panels> = parts.iter().map(repack_int4).collect();
        let fused = concat_panels(&panels.iter().collect::<Vec<_>>()).expect("same widths");
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let a = quantize_rows(isa, &x, m, k);
        let mut y = vec![0f32; m * fused.rows];
        matmul_int4_panels(isa, &a, &fused, &mut y);
        let mut first = 0;
        for p in &panels {
            let mut own = vec![0f32; m * p.rows];
            matmul_int4_panels(isa, &a, p, &mut own);
            for i in 0..m {
                assert_eq!(
                    &y[i * fused.rows + first..][..p.rows],
                    &own[i * p.rows..(i + 1) * p.rows]
                );
            }
            first += p.panels() * PANEL;
        }
        assert!(concat_panels(&[&panels[0], &repack_int4(&weights(8, 64, 4))]).is_none());
        // LPBQ and plain int4 panels do not mix; LPBQ parts concatenate with their multipliers.
        let lpbq = |rows: usize| repack_int4_lpbq(&weights(rows, k, 5), &vec![3; rows * k / BLOCK]);
        assert!(concat_panels(&[&panels[0], &lpbq(16)]).is_none());
        let both = concat_panels(&[&lpbq(11), &lpbq(16)]).unwrap();
        assert_eq!(both.weight(16 + 2, 5), 3 * both.value(18, 5) as i32);
    }
}
