//! Causal attention of one query row and head against the KV cache, with the
//! reductions of [`crate::reference`] (f64 accumulation, rounded once).
//!
//! The steps around the two reductions are written once ([`attend_with`]); the
//! reductions have a scalar reference and AVX2 / AVX-512 forms chosen at run
//! time. The SIMD forms do the same operations in the same order (each dot
//! keeps its four lanes `i mod 4`; the value sum is element-wise; an f32×f32
//! product is exact in f64), so the result is bit-identical whichever runs.

use crate::reference::{dot_f64, softmax};
use oqt_core::quant::ActGrid;

/// Where one head's keys and values sit in the cache: row `j` of the head is
/// `k[j * stride + offset..][..head_dim]` (and the same in `v`).
pub(crate) struct HeadCache<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    pub offset: usize,
}

/// Scratch one worker reuses across heads: scores and the f64 accumulator.
pub(crate) struct Scratch {
    pub scores: Vec<f32>,
    pub acc: Vec<f64>,
}

/// `out = softmax(q·Kᵀ · scale) · V` over the first `visible` cache rows; the
/// probabilities are put on `probs` (the static grid of the Probs site) first
/// when the recipe quantizes them.
pub(crate) fn attend(
    q: &[f32],
    cache: &HeadCache<'_>,
    visible: usize,
    scale: f32,
    probs: Option<&ActGrid>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let args = (q, cache, visible, scale, probs);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F (and so AVX2) is present, checked just above; the
        // cache rows lie inside `k`/`v`.
        return attend_with(
            args,
            scratch,
            out,
            |q, c, s, sc| unsafe { x86::scores_avx512(q, c, s, sc) },
            |p, c, acc| unsafe { x86::weighted_values_avx512(p, c, acc) },
        );
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, checked just above; as above.
        return attend_with(
            args,
            scratch,
            out,
            |q, c, s, sc| unsafe { x86::scores_avx2(q, c, s, sc) },
            |p, c, acc| unsafe { x86::weighted_values(p, c, acc) },
        );
    }
    attend_with(args, scratch, out, scores_scalar, weighted_values_scalar);
}

/// The steps around the two reductions, shared by every path: scores, softmax,
/// the Probs grid, the weighted sum of values, one rounding to f32.
#[inline(always)]
fn attend_with(
    (q, cache, visible, scale, probs): (&[f32], &HeadCache<'_>, usize, f32, Option<&ActGrid>),
    scratch: &mut Scratch,
    out: &mut [f32],
    scores_of: impl FnOnce(&[f32], &HeadCache<'_>, f32, &mut [f32]),
    weighted_values: impl FnOnce(&[f32], &HeadCache<'_>, &mut [f64]),
) {
    let hd = q.len();
    if scratch.scores.len() < visible {
        scratch.scores.resize(visible, 0.0);
    }
    scratch.acc.resize(hd, 0.0);
    let scores = &mut scratch.scores[..visible];
    scores_of(q, cache, scale, scores);
    softmax(scores);
    if let Some(g) = probs {
        g.fake(scores);
    }
    let acc = &mut scratch.acc[..hd];
    weighted_values(scores, cache, acc);
    out.iter_mut().zip(acc.iter()).for_each(|(o, &a)| *o = a as f32);
}

/// `scores[j] = dot_f64(q, k_j) · scale`: the reference the SIMD forms follow.
fn scores_scalar(q: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    for (j, sc) in scores.iter_mut().enumerate() {
        let kv = &cache.k[j * cache.stride + cache.offset..][..hd];
        *sc = dot_f64(q, kv) * scale;
    }
}

/// `acc[d] = Σ_j f64(p_j) · f64(v_j[d])` in key order: the reference.
fn weighted_values_scalar(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64]) {
    let hd = acc.len();
    acc.fill(0.0);
    for (j, &w) in probs.iter().enumerate() {
        let vv = &cache.v[j * cache.stride + cache.offset..][..hd];
        let w = w as f64;
        acc.iter_mut().zip(vv).for_each(|(a, &b)| *a += w * b as f64);
    }
}

/// The AVX2 forms of the two reductions, in the lanes of the scalar ones.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod x86 {
    use super::HeadCache;
    use std::arch::x86_64::*;

    /// Keys scored together: four independent dot chains hide the add latency.
    const KEYS: usize = 4;

    /// `scores[j] = dot_f64(q, k_j) · scale`, lane `i mod 4` per key as in
    /// [`crate::reference::dot_f64`], four keys at a time.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scores_avx2(q: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let body = hd / 4 * 4;
        let key = |j: usize| cache.k[j * cache.stride + cache.offset..][..hd].as_ptr();
        // The query in f64 once, for every key.
        let qd: Vec<__m256d> = (0..body)
            .step_by(4)
            .map(|i| _mm256_cvtps_pd(_mm_loadu_ps(q.as_ptr().add(i))))
            .collect();
        let finish = |acc: __m256d, k: *const f32| -> f32 {
            let mut lanes = [0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), acc);
            let tail: f64 = (body..hd).map(|i| q[i] as f64 * *k.add(i) as f64).sum();
            (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail) as f32
        };
        let n = scores.len();
        let mut j = 0;
        while j + KEYS <= n {
            let ks = [key(j), key(j + 1), key(j + 2), key(j + 3)];
            let mut acc = [_mm256_setzero_pd(); KEYS];
            for (c, &qv) in qd.iter().enumerate() {
                for (a, k) in acc.iter_mut().zip(ks) {
                    let kv = _mm256_cvtps_pd(_mm_loadu_ps(k.add(4 * c)));
                    *a = _mm256_add_pd(*a, _mm256_mul_pd(qv, kv));
                }
            }
            for (t, (a, k)) in acc.into_iter().zip(ks).enumerate() {
                scores[j + t] = finish(a, k) * scale;
            }
            j += KEYS;
        }
        for (jj, sc) in scores.iter_mut().enumerate().skip(j) {
            let k = key(jj);
            let mut acc = _mm256_setzero_pd();
            for (c, &qv) in qd.iter().enumerate() {
                acc = _mm256_add_pd(acc, _mm256_mul_pd(qv, _mm256_cvtps_pd(_mm_loadu_ps(k.add(4 * c)))));
            }
            *sc = finish(acc, k) * scale;
        }
    }

    /// Dimensions whose f64 sums stay in registers across all keys.
    const DIMS: usize = 32;

    /// `acc[d] = Σ_j f64(p_j) · f64(v_j[d])` in key order (element-wise, so
    /// any lane layout gives the scalar result).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weighted_values(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64]) {
        let hd = acc.len();
        let value = |j: usize| cache.v[j * cache.stride + cache.offset..][..hd].as_ptr();
        let mut d0 = 0;
        while d0 + DIMS <= hd {
            let mut sums = [_mm256_setzero_pd(); DIMS / 4];
            for (j, &p) in probs.iter().enumerate() {
                let w = _mm256_set1_pd(p as f64);
                let v = value(j).add(d0);
                for (c, s) in sums.iter_mut().enumerate() {
                    let vv = _mm256_cvtps_pd(_mm_loadu_ps(v.add(4 * c)));
                    *s = _mm256_add_pd(*s, _mm256_mul_pd(w, vv));
                }
            }
            for (c, s) in sums.into_iter().enumerate() {
                _mm256_storeu_pd(acc.as_mut_ptr().add(d0 + 4 * c), s);
            }
            d0 += DIMS;
        }
        // Dimensions past the last full chunk (head sizes not a multiple of 32).
        if d0 < hd {
            let rest = &mut acc[d0..];
            rest.fill(0.0);
            for (j, &p) in probs.iter().enumerate() {
                let w = p as f64;
                let v = value(j);
                for (i, a) in rest.iter_mut().enumerate() {
                    *a += w * *v.add(d0 + i) as f64;
                }
            }
        }
    }

    /// [`scores_avx2`] with two keys per 512-bit vector (lanes 0–3 one key, 4–7 the
    /// next): each key still sums in its own four lanes `i mod 4`, finished as
    /// the scalar dot is.
    #[target_feature(enable = "avx2,avx512f")]
    pub(super) unsafe fn scores_avx512(q: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let body = hd / 4 * 4;
        let key = |j: usize| cache.k[j * cache.stride + cache.offset..][..hd].as_ptr();
        let qd: Vec<__m512d> = (0..body)
            .step_by(4)
            .map(|i| {
                let v = _mm_loadu_ps(q.as_ptr().add(i));
                _mm512_cvtps_pd(_mm256_set_m128(v, v))
            })
            .collect();
        let tail = |k: *const f32| -> f64 { (body..hd).map(|i| q[i] as f64 * *k.add(i) as f64).sum() };
        let n = scores.len();
        let mut j = 0;
        // Four vectors of two keys: eight keys per pass.
        while j + 2 * KEYS <= n {
            let ks: [*const f32; 2 * KEYS] = std::array::from_fn(|t| key(j + t));
            let mut acc = [_mm512_setzero_pd(); KEYS];
            for (c, &qv) in qd.iter().enumerate() {
                for (p, a) in acc.iter_mut().enumerate() {
                    let lo = _mm_loadu_ps(ks[2 * p].add(4 * c));
                    let hi = _mm_loadu_ps(ks[2 * p + 1].add(4 * c));
                    *a = _mm512_add_pd(*a, _mm512_mul_pd(qv, _mm512_cvtps_pd(_mm256_set_m128(hi, lo))));
                }
            }
            for (p, a) in acc.into_iter().enumerate() {
                let mut l = [0f64; 8];
                _mm512_storeu_pd(l.as_mut_ptr(), a);
                let (k0, k1) = (ks[2 * p], ks[2 * p + 1]);
                scores[j + 2 * p] = ((((l[0] + l[1]) + (l[2] + l[3])) + tail(k0)) as f32) * scale;
                scores[j + 2 * p + 1] = ((((l[4] + l[5]) + (l[6] + l[7])) + tail(k1)) as f32) * scale;
            }
            j += 2 * KEYS;
        }
        if j < n {
            scores_rest(q, cache, scale, &mut scores[j..], j);
        }
    }

    /// Keys `first..` of [`scores_avx512`] on the AVX2 path.
    #[target_feature(enable = "avx2")]
    unsafe fn scores_rest(q: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32], first: usize) {
        let shifted = HeadCache {
            k: &cache.k[first * cache.stride..],
            v: cache.v,
            stride: cache.stride,
            offset: cache.offset,
        };
        scores_avx2(q, &shifted, scale, scores)
    }

    /// [`weighted_values`] 64 dimensions (eight 512-bit sums) at a time.
    #[target_feature(enable = "avx2,avx512f")]
    pub(super) unsafe fn weighted_values_avx512(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64]) {
        const WIDE: usize = 64;
        let hd = acc.len();
        if !hd.is_multiple_of(WIDE) {
            return weighted_values(probs, cache, acc);
        }
        let value = |j: usize| cache.v[j * cache.stride + cache.offset..][..hd].as_ptr();
        for d0 in (0..hd).step_by(WIDE) {
            let mut sums = [_mm512_setzero_pd(); WIDE / 8];
            for (j, &p) in probs.iter().enumerate() {
                let w = _mm512_set1_pd(p as f64);
                let v = value(j).add(d0);
                for (c, s) in sums.iter_mut().enumerate() {
                    let vv = _mm512_cvtps_pd(_mm256_loadu_ps(v.add(8 * c)));
                    *s = _mm512_add_pd(*s, _mm512_mul_pd(w, vv));
                }
            }
            for (c, s) in sums.into_iter().enumerate() {
                _mm512_storeu_pd(acc.as_mut_ptr().add(d0 + 8 * c), s);
            }
        }
    }
}
