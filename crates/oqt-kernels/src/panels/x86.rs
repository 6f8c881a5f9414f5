//! x86-64 panel kernels: AVX-512 VNNI (512-bit `vpdpbusd`, one panel of
//! sixteen rows per vector) and AVX2 (`vpmaddubsw` + `vpmaddwd`, each panel as
//! two 256-bit halves of eight rows). Both run the same tile: [`MR`]
//! activation rows against one panel (half), every group's exact i32 dot,
//! then the contract's epilogue per (row, group) lane by lane.

use super::{LUT_TABLE_BYTES, PANEL, PANEL_BLOCK_BYTES, PanelTask};
use crate::pack::BLOCK;
use std::arch::x86_64::*;

/// Activation rows per register tile.
const MR: usize = 4;

/// Finishes the eight partial sums (group `g` adds to partial `g mod 8`) pairwise (`((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7))`) as the contract does.
macro_rules! finish_partials {
    ($add:ident, $q:expr) => {{
        let q = $q;
        $add(
            $add($add(q[0], q[1]), $add(q[2], q[3])),
            $add($add(q[4], q[5]), $add(q[6], q[7])),
        )
    }};
}

/// AVX-512 VNNI: one task's panels, sixteen output columns per vector.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn panels_int4_vnni(t: &PanelTask<'_>) {
    if t.w.tables.is_some() {
        return panels_lut_vnni(t);
    }
    // Tiles of MR rows, the last one shorter: each size its own compiled loop.
    let mut i0 = 0;
    while i0 < t.a.rows {
        let rows = (t.a.rows - i0).min(MR);
        match rows {
            4 => tile_vnni::<4>(t, i0),
            3 => tile_vnni::<3>(t, i0),
            2 => tile_vnni::<2>(t, i0),
            _ => tile_vnni::<1>(t, i0),
        }
        i0 += rows;
    }
}

/// Activation rows per register tile of LUT panels: the table lookups of a
/// block are paid once per tile, and one group a row leaves the registers
/// for more rows.
const MR_LUT: usize = 8;

/// AVX-512 VNNI over LUT panels: tiles of [`MR_LUT`] rows, then 4, 2, 1.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panels_lut_vnni(t: &PanelTask<'_>) {
    let mut i0 = 0;
    while i0 < t.a.rows {
        let left = t.a.rows - i0;
        let rows = [MR_LUT, 4, 2, 1].into_iter().find(|&r| r <= left).expect("1 fits");
        match rows {
            MR_LUT => tile_lut_vnni::<MR_LUT>(t, i0),
            4 => tile_lut_vnni::<4>(t, i0),
            2 => tile_lut_vnni::<2>(t, i0),
            _ => tile_lut_vnni::<1>(t, i0),
        }
        i0 += rows;
    }
}

/// LUT panels (one group a row, per channel), rows `i0..i0 + R`: per block
/// the nibbles become `code + 128` through one `vpshufb` against the panel's
/// lane tables, then the int4 tile's `vpdpbusd`s. The epilogue is the
/// contract's for one group, `0 + (s_a · s_w) · dot` (the eight partial sums
/// of one group finish to exactly that).
#[inline(always)]
unsafe fn tile_lut_vnni<const R: usize>(t: &PanelTask<'_>, i0: usize) {
    let (a, w) = (t.a, t.w);
    debug_assert_eq!(w.groups(), 1, "LUT panels are per channel");
    let blocks = w.blocks();
    let tables = w.tables.as_ref().expect("LUT panels").as_ptr();
    let nibble = _mm512_set1_epi8(0x0F);
    let q: [*const i32; R] = std::array::from_fn(|r| a.q.as_ptr().add((i0 + r) * a.k_pad) as *const i32);
    for p in t.panels.clone() {
        let pdata = w.data.as_ptr().add(p * blocks * PANEL_BLOCK_BYTES);
        let lut = _mm512_loadu_si512(tables.add(p * LUT_TABLE_BYTES) as *const _);
        let mut acc = [_mm512_setzero_si512(); R];
        for b in 0..blocks {
            let mut wv = [_mm512_setzero_si512(); 8];
            for j in 0..4 {
                let v = _mm512_loadu_si512(pdata.add(b * PANEL_BLOCK_BYTES + 64 * j) as *const _);
                wv[j] = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nibble));
                wv[j + 4] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let aq = q[r].add(b * BLOCK / 4);
                for (c, wc) in wv.iter().enumerate() {
                    *acc = _mm512_dpbusd_epi32(*acc, *wc, _mm512_set1_epi32(aq.add(c).read_unaligned()));
                }
            }
        }
        let at = p * PANEL;
        let wsum = _mm512_loadu_si512(w.sums.as_ptr().add(at) as *const _);
        let ws = _mm512_loadu_ps(w.scales.as_ptr().add(at));
        let col = p * PANEL;
        let valid: __mmask16 = if col + PANEL <= t.n { !0 } else { (1 << (t.n - col)) - 1 };
        for (r, acc) in acc.iter().enumerate() {
            // Raw sums are Σ (code + 128) q_a: subtract 128 Σ q_a + zp Σ code.
            let zp = _mm512_set1_epi32(a.zero_point[i0 + r]);
            let correction = _mm512_add_epi32(_mm512_set1_epi32(t.act_corr[i0 + r]), _mm512_mullo_epi32(zp, wsum));
            let dot = _mm512_sub_epi32(*acc, correction);
            let s = _mm512_mul_ps(_mm512_set1_ps(t.act_scale[i0 + r]), ws);
            let y = _mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(s, _mm512_cvtepi32_ps(dot)));
            _mm512_mask_storeu_ps(t.out.get().add((i0 + r) * t.n + col), valid, y);
        }
    }
}

/// Rows `i0..i0 + R` against every panel of the task.
#[inline(always)]
unsafe fn tile_vnni<const R: usize>(t: &PanelTask<'_>, i0: usize) {
    let (a, w) = (t.a, t.w);
    let (groups, blocks, per) = (w.groups(), w.blocks(), w.group / BLOCK);
    let nibble = _mm512_set1_epi8(0x0F);
    let (low16, eight_high) = (_mm512_set1_epi32(0xFFFF), _mm512_set1_epi32(8 << 16));
    let q: [*const i32; R] = std::array::from_fn(|r| a.q.as_ptr().add((i0 + r) * a.k_pad) as *const i32);
    let corr = t.act_corr.as_ptr().add(i0 * groups);
    let scale = t.act_scale.as_ptr().add(i0 * groups);
    let lpbq = w.multipliers.as_ref().map(|m| m.as_ptr());
    for p in t.panels.clone() {
        let pdata = w.data.as_ptr().add(p * blocks * PANEL_BLOCK_BYTES);
        let mut partial = [[_mm512_setzero_ps(); 8]; R];
        // LPBQ: Σ_g m_g · dot_g, exact in i32.
        let mut iacc = [_mm512_setzero_si512(); R];
        for g in 0..groups {
            let mut acc = [_mm512_setzero_si512(); R];
            for b in g * per..(g + 1) * per {
                // The eight weight vectors of the block (`u8`, `q + 8`):
                // vector `c` holds its columns `4c..4c+4` for the sixteen rows.
                let mut wv = [_mm512_setzero_si512(); 8];
                for j in 0..4 {
                    let v = _mm512_loadu_si512(pdata.add(b * PANEL_BLOCK_BYTES + 64 * j) as *const _);
                    wv[j] = _mm512_and_si512(v, nibble);
                    wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let aq = q[r].add(b * BLOCK / 4);
                    for (c, wc) in wv.iter().enumerate() {
                        *acc = _mm512_dpbusd_epi32(*acc, *wc, _mm512_set1_epi32(aq.add(c).read_unaligned()));
                    }
                }
            }
            let at = (p * groups + g) * PANEL;
            let wsum = _mm512_loadu_si512(w.sums.as_ptr().add(at) as *const _);
            let ws = _mm512_loadu_ps(w.scales.as_ptr().add(at));
            let wpair = _mm512_or_si512(_mm512_and_si512(wsum, low16), eight_high);
            for r in 0..R {
                let c = *corr.add(r * groups + g);
                // Raw sums are Σ (q_w + 8) q_a: subtract 8 Σ q_a + zp Σ q_w.
                let correction = if t.paired {
                    _mm512_madd_epi16(wpair, _mm512_set1_epi32(c))
                } else {
                    let zp = _mm512_set1_epi32(a.zero_point[i0 + r]);
                    _mm512_add_epi32(_mm512_set1_epi32(c), _mm512_mullo_epi32(zp, wsum))
                };
                let dot = _mm512_sub_epi32(acc[r], correction);
                if let Some(m) = lpbq {
                    let mv = _mm512_loadu_si512(m.add(at) as *const _);
                    iacc[r] = _mm512_add_epi32(iacc[r], _mm512_mullo_epi32(dot, mv));
                    continue;
                }
                let s = _mm512_mul_ps(_mm512_set1_ps(*scale.add(r * groups + g)), ws);
                let v = _mm512_mul_ps(s, _mm512_cvtepi32_ps(dot));
                partial[r][g % 8] = _mm512_add_ps(partial[r][g % 8], v);
            }
        }
        if lpbq.is_some() {
            // One per-channel group over the expanded weights: (s_a · s_w) · dot.
            let ws = _mm512_loadu_ps(w.scales.as_ptr().add(p * groups * PANEL));
            for r in 0..R {
                let s = _mm512_mul_ps(_mm512_set1_ps(*scale.add(r * groups)), ws);
                partial[r][0] = _mm512_add_ps(partial[r][0], _mm512_mul_ps(s, _mm512_cvtepi32_ps(iacc[r])));
            }
        }
        let col = p * PANEL;
        // The last panel's padding rows are not output columns.
        let valid: __mmask16 = if col + PANEL <= t.n { !0 } else { (1 << (t.n - col)) - 1 };
        for (r, q) in partial.iter().enumerate() {
            let y = finish_partials!(_mm512_add_ps, q);
            _mm512_mask_storeu_ps(t.out.get().add((i0 + r) * t.n + col), valid, y);
        }
    }
}

/// AVX2: one task's panels, each as two halves of eight rows.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panels_int4_avx2(t: &PanelTask<'_>) {
    // Tiles of MR rows, the last one shorter: each size its own compiled loop.
    let mut i0 = 0;
    while i0 < t.a.rows {
        let rows = (t.a.rows - i0).min(MR);
        match rows {
            4 => tile_avx2::<4>(t, i0),
            3 => tile_avx2::<3>(t, i0),
            2 => tile_avx2::<2>(t, i0),
            _ => tile_avx2::<1>(t, i0),
        }
        i0 += rows;
    }
}

/// Rows `i0..i0 + R` against every panel half of the task.
#[inline(always)]
unsafe fn tile_avx2<const R: usize>(t: &PanelTask<'_>, i0: usize) {
    const HALF: usize = PANEL / 2;
    let (a, w) = (t.a, t.w);
    let (groups, blocks, per) = (w.groups(), w.blocks(), w.group / BLOCK);
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (low16, eight_high) = (_mm256_set1_epi32(0xFFFF), _mm256_set1_epi32(8 << 16));
    let q: [*const i32; R] = std::array::from_fn(|r| a.q.as_ptr().add((i0 + r) * a.k_pad) as *const i32);
    let corr = t.act_corr.as_ptr().add(i0 * groups);
    let scale = t.act_scale.as_ptr().add(i0 * groups);
    let lpbq = w.multipliers.as_ref().map(|m| m.as_ptr());
    for p in t.panels.clone() {
        for h in 0..2 {
            let pdata = w.data.as_ptr().add(p * blocks * PANEL_BLOCK_BYTES + h * 32);
            let mut partial = [[_mm256_setzero_ps(); 8]; R];
            let mut iacc = [_mm256_setzero_si256(); R];
            for g in 0..groups {
                let mut acc = [_mm256_setzero_si256(); R];
                for b in g * per..(g + 1) * per {
                    let mut wv = [_mm256_setzero_si256(); 8];
                    for j in 0..4 {
                        let v = _mm256_loadu_si256(pdata.add(b * PANEL_BLOCK_BYTES + 64 * j) as *const _);
                        wv[j] = _mm256_and_si256(v, nibble);
                        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let aq = q[r].add(b * BLOCK / 4);
                        for (c, wc) in wv.iter().enumerate() {
                            // u8 ≤ 15 times i8: the i16 pair sums cannot saturate.
                            let a4 = _mm256_set1_epi32(aq.add(c).read_unaligned());
                            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_maddubs_epi16(*wc, a4), ones));
                        }
                    }
                }
                let at = (p * groups + g) * PANEL + h * HALF;
                let wsum = _mm256_loadu_si256(w.sums.as_ptr().add(at) as *const _);
                let ws = _mm256_loadu_ps(w.scales.as_ptr().add(at));
                let wpair = _mm256_or_si256(_mm256_and_si256(wsum, low16), eight_high);
                for r in 0..R {
                    let c = *corr.add(r * groups + g);
                    let correction = if t.paired {
                        _mm256_madd_epi16(wpair, _mm256_set1_epi32(c))
                    } else {
                        let zp = _mm256_set1_epi32(a.zero_point[i0 + r]);
                        _mm256_add_epi32(_mm256_set1_epi32(c), _mm256_mullo_epi32(zp, wsum))
                    };
                    let dot = _mm256_sub_epi32(acc[r], correction);
                    if let Some(m) = lpbq {
                        let mv = _mm256_loadu_si256(m.add(at) as *const _);
                        iacc[r] = _mm256_add_epi32(iacc[r], _mm256_mullo_epi32(dot, mv));
                        continue;
                    }
                    let s = _mm256_mul_ps(_mm256_set1_ps(*scale.add(r * groups + g)), ws);
                    let v = _mm256_mul_ps(s, _mm256_cvtepi32_ps(dot));
                    partial[r][g % 8] = _mm256_add_ps(partial[r][g % 8], v);
                }
            }
            if lpbq.is_some() {
                let ws = _mm256_loadu_ps(w.scales.as_ptr().add(p * groups * PANEL + h * HALF));
                for r in 0..R {
                    let s = _mm256_mul_ps(_mm256_set1_ps(*scale.add(r * groups)), ws);
                    partial[r][0] = _mm256_add_ps(partial[r][0], _mm256_mul_ps(s, _mm256_cvtepi32_ps(iacc[r])));
                }
            }
            let col = p * PANEL + h * HALF;
            if col >= t.n {
                continue; // a half of padding rows
            }
            // Lanes past the output's last column (padding rows) are not written.
            let valid = _mm256_cmpgt_epi32(
                _mm256_set1_epi32((t.n - col) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            for (r, q) in partial.iter().enumerate() {
                let y = finish_partials!(_mm256_add_ps, q);
                _mm256_maskstore_ps(t.out.get().add((i0 + r) * t.n + col), valid, y);
            }
        }
    }
}
