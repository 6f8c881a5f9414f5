//! x86-64 panel kernels: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI
//! (`vpdpbusd`, 256-bit), one driver for both.

use super::{PANEL, PanelTask};
use crate::pack::BLOCK;
use std::arch::x86_64::*;

/// Activation rows per register tile.
const MR: usize = 4;

/// The eight unpacked weight vectors of one panel block (`u8`, `q + 8`):
/// vector `c` holds columns `4c..4c+4` of the block for the eight rows.
#[inline(always)]
unsafe fn unpack(p: *const u8) -> [__m256i; 8] {
    let mask = _mm256_set1_epi8(0x0F);
    let mut w = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let v = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
        w[j] = _mm256_and_si256(v, mask);
        w[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
    }
    w
}

/// The shared driver; `dot4(acc, w, a)` adds four u8·i8 products per lane.
#[inline(always)]
unsafe fn drive(t: &PanelTask<'_>, out: &mut [f32], dot4: impl Fn(__m256i, __m256i, __m256i) -> __m256i) {
    let (a, w) = (t.a, t.w);
    let (m, groups, blocks) = (a.rows, w.groups(), w.blocks());
    let per = w.group / BLOCK;
    let width = t.panels.len() * PANEL;
    for (pi, p) in t.panels.clone().enumerate() {
        let pdata = w.data.as_ptr().add(p * blocks * 128);
        for i0 in (0..m).step_by(MR) {
            let rows = (m - i0).min(MR);
            let mut partial = [[_mm256_setzero_ps(); 8]; MR];
            for g in 0..groups {
                let mut acc = [_mm256_setzero_si256(); MR];
                for b in g * per..(g + 1) * per {
                    let wv = unpack(pdata.add(b * 128));
                    for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                        let aq = a.q.as_ptr().add((i0 + r) * a.k_pad + b * BLOCK) as *const i32;
                        for (c, wc) in wv.iter().enumerate() {
                            *acc = dot4(*acc, *wc, _mm256_set1_epi32(aq.add(c).read_unaligned()));
                        }
                    }
                }
                let at = (p * groups + g) * PANEL;
                let wsum = _mm256_loadu_si256(w.sums.as_ptr().add(at) as *const __m256i);
                let ws = _mm256_loadu_ps(w.scales.as_ptr().add(at));
                for r in 0..rows {
                    let i = i0 + r;
                    // Raw sums are Σ (q_w + 8) q_a: subtract 8 Σ q_a + zp Σ q_w.
                    let corr = _mm256_add_epi32(
                        _mm256_set1_epi32(8 * t.group_sums[i * groups + g]),
                        _mm256_mullo_epi32(_mm256_set1_epi32(a.zero_point[i]), wsum),
                    );
                    let dot = _mm256_sub_epi32(acc[r], corr);
                    let s_a = match &a.block_scales {
                        Some(s) => s[i * groups + g],
                        None => a.scale[i],
                    };
                    let s = _mm256_mul_ps(_mm256_set1_ps(s_a), ws);
                    let v = _mm256_mul_ps(s, _mm256_cvtepi32_ps(dot));
                    partial[r][g % 8] = _mm256_add_ps(partial[r][g % 8], v);
                }
            }
            for (r, q) in partial.iter().enumerate().take(rows) {
                let y = _mm256_add_ps(
                    _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3])),
                    _mm256_add_ps(_mm256_add_ps(q[4], q[5]), _mm256_add_ps(q[6], q[7])),
                );
                _mm256_storeu_ps(out.as_mut_ptr().add((i0 + r) * width + pi * PANEL), y);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panels_int4_avx2(t: &PanelTask<'_>, out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    // u8 ≤ 15 times i8: the i16 pair sums cannot saturate.
    drive(t, out, |acc, w, a| {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones))
    })
}

#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn panels_int4_vnni(t: &PanelTask<'_>, out: &mut [f32]) {
    drive(t, out, |acc, w, a| _mm256_dpbusd_epi32(acc, w, a))
}
