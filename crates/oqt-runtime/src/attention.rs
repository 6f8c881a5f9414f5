//! Causal attention of one query row against one KV head of the cache, for
//! the query heads that share it (grouped-query attention), with the
//! reductions of [`crate::reference`] (f64 accumulation, rounded once).
//!
//! The steps around the two reductions are written once ([`attend_with`]); the
//! reductions have a scalar reference and AVX2 / AVX-512 forms chosen at run
//! time. The SIMD forms do the same operations in the same order (each dot
//! keeps the eight lanes `i mod 8` of [`dot_f64`]; the value sum is
//! element-wise; an f32×f32 product is exact in f64, so a fused multiply-add
//! rounds as the separate multiply and add do), so the result is
//! bit-identical whichever runs (tests below).

use crate::reference::{dot_f64, softmax};
#[cfg(test)]
use crate::reference::{dot_tail_f64, sum_lanes_f64};
use oqt_core::quant::ActGrid;

/// Where one KV head's keys and values sit in the cache: row `j` of the head
/// is `k[j * stride + offset..][..head_dim]` (and the same in `v`).
pub(crate) struct HeadCache<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    pub offset: usize,
    pub head_dim: usize,
}

/// Scratch one worker reuses across tasks: scores and the f64 accumulators.
#[derive(Default)]
pub(crate) struct Scratch {
    pub scores: Vec<f32>,
    pub acc: Vec<f64>,
}

/// For each query head of `qs` (the heads that share one KV head, one after
/// the other, `head_dim` each): `out = softmax(q·Kᵀ · scale) · V` over the
/// first `visible` cache rows; the probabilities are put on `probs` (the static
/// grid of the Probs site) first when the recipe quantizes them. Each head's
/// arithmetic is that of one head alone; the heads only share the loads of
/// the keys and values.
pub(crate) fn attend(
    qs: &[f32],
    cache: &HeadCache<'_>,
    visible: usize,
    scale: f32,
    probs: Option<&ActGrid>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let rows_needed = (visible.max(1) - 1) * cache.stride + cache.offset + cache.head_dim;
    assert!(
        rows_needed <= cache.k.len() && rows_needed <= cache.v.len() && qs.len() == out.len(),
        "attention over {visible} cache rows out of bounds"
    );
    let args = (qs, cache, visible, scale, probs);
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
        return unsafe { attend_avx2(args, scratch, out) };
    }
    attend_with(
        args,
        scratch,
        out,
        |q, c, s, sc| per_head(q.len() / c.head_dim, q, sc, |q, sc| scores_scalar(q, c, s, sc)),
        |p, c, acc| {
            per_head(acc.len() / c.head_dim, p, acc, |p, acc| {
                weighted_values_scalar(p, c, acc)
            })
        },
    );
}

/// The AVX2 path of [`attend`]: the one-head AVX2 reductions, head by head.
///
/// # Safety
/// AVX2 must be present; the cache rows must lie inside `k`/`v`.
#[cfg(target_arch = "x86_64")]
unsafe fn attend_avx2(args: AttendArgs<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    attend_with(
        args,
        scratch,
        out,
        |q, c, s, sc| {
            per_head(q.len() / c.head_dim, q, sc, |q, sc| unsafe {
                x86::scores_avx2(q, c, s, sc)
            })
        },
        |p, c, acc| {
            per_head(acc.len() / c.head_dim, p, acc, |p, acc| unsafe {
                x86::weighted_values(p, c, acc)
            })
        },
    )
}

/// Queries, cache, visible rows, scale and the Probs grid of one [`attend`] call.
type AttendArgs<'a> = (&'a [f32], &'a HeadCache<'a>, usize, f32, Option<&'a ActGrid>);

/// Runs a one-head reduction for each of `heads` heads: `input` and `output`
/// hold the heads one after the other.
fn per_head<A, B>(heads: usize, input: &[A], output: &mut [B], mut one: impl FnMut(&[A], &mut [B])) {
    for (i, o) in input
        .chunks(input.len() / heads)
        .zip(output.chunks_mut(output.len() / heads))
    {
        one(i, o);
    }
}

/// The steps around the two reductions, shared by every path: scores (each
/// head's row of `visible`), softmax, the Probs grid, the weighted sums of
/// values, one rounding to f32.
#[inline(always)]
fn attend_with(
    (qs, cache, visible, scale, probs): AttendArgs<'_>,
    scratch: &mut Scratch,
    out: &mut [f32],
    scores_of: impl FnOnce(&[f32], &HeadCache<'_>, f32, &mut [f32]),
    weighted_values: impl FnOnce(&[f32], &HeadCache<'_>, &mut [f64]),
) {
    let heads = qs.len() / cache.head_dim;
    scratch.scores.resize(heads * visible, 0.0);
    scratch.acc.resize(qs.len(), 0.0);
    let scores = &mut scratch.scores[..heads * visible];
    scores_of(qs, cache, scale, scores);
    for row in scores.chunks_mut(visible) {
        softmax(row);
        if let Some(g) = probs {
            g.fake(row);
        }
    }
    let acc = &mut scratch.acc[..qs.len()];
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
    values_from(probs, cache, acc, 0);
}

/// Dimensions `first..first + acc.len()` of the weighted sum, one at a time:
/// the reference, and the SIMD forms' tail past their whole vectors.
fn values_from(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64], first: usize) {
    acc.fill(0.0);
    for (j, &p) in probs.iter().enumerate() {
        let v = &cache.v[j * cache.stride + cache.offset + first..][..acc.len()];
        acc.iter_mut().zip(v).for_each(|(a, &x)| *a += p as f64 * x as f64);
    }
}

/// The SIMD forms of the two reductions, in the lanes of the scalar ones.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod x86 {
    use super::HeadCache;
    use crate::reference::dot_tail_f64;
    use std::arch::x86_64::*;

    /// Keys scored together: independent dot chains hide the add latency.
    const KEYS: usize = 8;

    /// Lanes `[l0+l4, l1+l5, l2+l6, l3+l7]` of an 8-lane sum, finished as
    /// [`crate::reference::sum_lanes_f64`] does.
    #[inline(always)]
    unsafe fn sum_halves(h: __m256d) -> f64 {
        let q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd::<1>(h));
        _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)))
    }

    /// `scores[j] = dot_f64(q, k_j) · scale`, the eight lanes held as two
    /// 4-lane sums (lanes 0–3 and 4–7), eight keys at a time.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scores_avx2(q: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32]) {
        let hd = q.len();
        let body = hd / 8 * 8;
        let key = |j: usize| cache.k[j * cache.stride + cache.offset..][..hd].as_ptr();
        // The query in f64 once, for every key.
        let qd: Vec<__m256d> = (0..body)
            .step_by(4)
            .map(|i| _mm256_cvtps_pd(_mm_loadu_ps(q.as_ptr().add(i))))
            .collect();
        let score = |lo: __m256d, hi: __m256d, k: *const f32| -> f32 {
            let tail = dot_tail_f64(&q[body..], std::slice::from_raw_parts(k.add(body), hd - body));
            ((sum_halves(_mm256_add_pd(lo, hi)) + tail) as f32) * scale
        };
        let mut j = 0;
        while j < scores.len() {
            let keys = (scores.len() - j).min(KEYS);
            let ks: [*const f32; KEYS] = std::array::from_fn(|t| key(j + t.min(keys - 1)));
            let mut acc = [[_mm256_setzero_pd(); 2]; KEYS];
            for (c, &qv) in qd.iter().enumerate() {
                for (a, k) in acc.iter_mut().zip(ks).take(keys) {
                    let kv = _mm256_cvtps_pd(_mm_loadu_ps(k.add(4 * c)));
                    a[c % 2] = _mm256_add_pd(a[c % 2], _mm256_mul_pd(qv, kv));
                }
            }
            for t in 0..keys {
                scores[j + t] = score(acc[t][0], acc[t][1], ks[t]);
            }
            j += keys;
        }
    }

    /// [`scores_avx2`] for the query heads of `qs` (up to four at once): the
    /// eight lanes in one 512-bit sum per head, fused multiply-adds (exact
    /// products, so the same sums), each key loaded and widened once for all
    /// the heads.
    #[target_feature(enable = "avx2,avx512f")]
    pub(super) unsafe fn scores_avx512(qs: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32]) {
        let heads = qs.len() / cache.head_dim;
        match heads {
            1 => scores_group::<1>(qs, cache, scale, scores),
            2 => scores_group::<2>(qs, cache, scale, scores),
            3 => scores_group::<3>(qs, cache, scale, scores),
            // Four heads' eight-key tiles would not fit the 32 registers: two pairs.
            4 => super::per_head(2, qs, scores, |q, sc| scores_group::<2>(q, cache, scale, sc)),
            _ => super::per_head(heads, qs, scores, |q, sc| scores_group::<1>(q, cache, scale, sc)),
        }
    }

    #[inline(always)]
    unsafe fn scores_group<const G: usize>(qs: &[f32], cache: &HeadCache<'_>, scale: f32, scores: &mut [f32]) {
        let hd = cache.head_dim;
        let (body, chunks) = (hd / 8 * 8, hd / 8);
        let n = scores.len() / G;
        let key = |j: usize| cache.k[j * cache.stride + cache.offset..][..hd].as_ptr();
        // The queries in f64 once, for every key: head `h`, chunk `c` at `h * chunks + c`.
        let qd: Vec<__m512d> = (0..G * chunks)
            .map(|i| _mm512_cvtps_pd(_mm256_loadu_ps(qs.as_ptr().add((i / chunks) * hd + 8 * (i % chunks)))))
            .collect();
        let qd = qd.as_ptr();
        let mut first = 0;
        if hd == body {
            // Eight keys per pass, their sums reduced together (no tail to add).
            let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            while first + 8 <= n {
                let ks: [*const f32; 8] = std::array::from_fn(|t| key(first + t));
                let mut acc = [[_mm512_setzero_pd(); 8]; G];
                for c in 0..chunks {
                    // 8G sums, G query chunks and one key chunk: 28 of the 32 registers for G = 3.
                    let qc: [__m512d; G] = std::array::from_fn(|h| *qd.add(h * chunks + c));
                    for (t, &k) in ks.iter().enumerate() {
                        let kv = _mm512_cvtps_pd(_mm256_loadu_ps(k.add(8 * c)));
                        for (a, &q) in acc.iter_mut().zip(&qc) {
                            a[t] = _mm512_fmadd_pd(q, kv, a[t]);
                        }
                    }
                }
                for (h, a) in acc.iter().enumerate() {
                    let sums = _mm256_mul_ps(_mm512_cvtpd_ps(sum_lanes_of_8(a)), _mm256_set1_ps(scale));
                    _mm256_storeu_ps(
                        scores.as_mut_ptr().add(h * n + first),
                        _mm256_permutevar8x32_ps(sums, order),
                    );
                }
                first += 8;
            }
        }
        for j in first..n {
            let k = key(j);
            let mut acc = [_mm512_setzero_pd(); G];
            for c in 0..chunks {
                let kv = _mm512_cvtps_pd(_mm256_loadu_ps(k.add(8 * c)));
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_pd(*qd.add(h * chunks + c), kv, *a);
                }
            }
            for (h, a) in acc.into_iter().enumerate() {
                let halves = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd::<1>(a));
                let tail = dot_tail_f64(
                    &qs[h * hd + body..(h + 1) * hd],
                    std::slice::from_raw_parts(k.add(body), hd - body),
                );
                *scores.get_unchecked_mut(h * n + j) = ((sum_halves(halves) + tail) as f32) * scale;
            }
        }
    }

    /// The lane sums of eight keys' 8-lane dots, each by the halves of
    /// [`crate::reference::sum_lanes_f64`] (plus the empty tail's +0.0), as
    /// one vector in the key order `[0, 4, 1, 5, 2, 6, 3, 7]`.
    #[inline(always)]
    unsafe fn sum_lanes_of_8(a: &[__m512d; 8]) -> __m512d {
        // Lanes i + (i + 4): two keys per vector, [l0+l4 .. l3+l7 | same].
        let s: [__m512d; 4] = std::array::from_fn(|p| {
            let (x, y) = (a[2 * p], a[2 * p + 1]);
            _mm512_add_pd(_mm512_shuffle_f64x2::<0x44>(x, y), _mm512_shuffle_f64x2::<0xEE>(x, y))
        });
        // (h0 + h2, h1 + h3): four keys per vector.
        let t: [__m512d; 2] = std::array::from_fn(|p| {
            let (x, y) = (s[2 * p], s[2 * p + 1]);
            _mm512_add_pd(_mm512_shuffle_f64x2::<0x88>(x, y), _mm512_shuffle_f64x2::<0xDD>(x, y))
        });
        // (h0 + h2) + (h1 + h3), then the tail (+0.0) as the reference adds it.
        let r = _mm512_add_pd(_mm512_unpacklo_pd(t[0], t[1]), _mm512_unpackhi_pd(t[0], t[1]));
        _mm512_add_pd(r, _mm512_setzero_pd())
    }

    /// `acc[d] = Σ_j f64(p_j) · f64(v_j[d])` in key order (element-wise, so
    /// any split of the dimensions gives the scalar result).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weighted_values(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64]) {
        /// Dimensions whose sums stay in registers across all keys.
        const DIMS: usize = 32;
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
        super::values_from(probs, cache, &mut acc[d0..], d0);
    }

    /// [`weighted_values`] for the query heads whose probabilities `probs`
    /// holds (up to four at once; each head's row of keys one after the
    /// other): 32 dimensions (four 512-bit sums per head) at a time, then 8,
    /// each value row loaded and widened once for all the heads.
    #[target_feature(enable = "avx2,avx512f")]
    pub(super) unsafe fn weighted_values_avx512(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64]) {
        let heads = acc.len() / cache.head_dim;
        match heads {
            1 => values_group::<1>(probs, cache, acc),
            2 => values_group::<2>(probs, cache, acc),
            3 => values_group::<3>(probs, cache, acc),
            4 => values_group::<4>(probs, cache, acc),
            _ => super::per_head(heads, probs, acc, |p, a| values_group::<1>(p, cache, a)),
        }
    }

    #[inline(always)]
    unsafe fn values_group<const G: usize>(probs: &[f32], cache: &HeadCache<'_>, acc: &mut [f64]) {
        let hd = cache.head_dim;
        let body = hd / 8 * 8;
        // The probabilities in f64 once: each is then a broadcast from memory.
        let p64: Vec<f64> = probs.iter().map(|&p| p as f64).collect();
        let mut d0 = 0;
        while d0 + 32 <= body {
            values_chunk::<G, 4>(&p64, cache, acc, d0);
            d0 += 32;
        }
        while d0 < body {
            values_chunk::<G, 1>(&p64, cache, acc, d0);
            d0 += 8;
        }
        let n = probs.len() / G;
        for h in 0..G {
            super::values_from(
                &probs[h * n..(h + 1) * n],
                cache,
                &mut acc[h * hd + body..(h + 1) * hd],
                body,
            );
        }
    }

    /// Dimensions `d0..d0 + 8V` of every head's weighted sum.
    #[inline(always)]
    unsafe fn values_chunk<const G: usize, const V: usize>(
        probs: &[f64],
        cache: &HeadCache<'_>,
        acc: &mut [f64],
        d0: usize,
    ) {
        let (hd, n) = (cache.head_dim, probs.len() / G);
        let mut sums = [[_mm512_setzero_pd(); V]; G];
        for j in 0..n {
            let v = cache.v.as_ptr().add(j * cache.stride + cache.offset + d0);
            let vv: [__m512d; V] = std::array::from_fn(|c| _mm512_cvtps_pd(_mm256_loadu_ps(v.add(8 * c))));
            for (h, s) in sums.iter_mut().enumerate() {
                let w = _mm512_set1_pd(*probs.get_unchecked(h * n + j));
                for (s, &x) in s.iter_mut().zip(&vv) {
                    *s = _mm512_fmadd_pd(w, x, *s);
                }
            }
        }
        for (h, s) in sums.iter().enumerate() {
            for (c, &x) in s.iter().enumerate() {
                _mm512_storeu_pd(acc.as_mut_ptr().add(h * hd + d0 + 8 * c), x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_f64_sums_lanes_mod_8_then_halves_then_the_tail() {
        let (a, b): (Vec<f32>, Vec<f32>) = (0..21).map(|i| (1.0 + i as f32 / 3.0, 1e8f32.powi(i % 3 - 1))).unzip();
        let mut l = [0f64; 8];
        (0..16).for_each(|i| l[i % 8] += a[i] as f64 * b[i] as f64);
        let want = (sum_lanes_f64(l) + dot_tail_f64(&a[16..], &b[16..])) as f32;
        assert_eq!(dot_f64(&a, &b).to_bits(), want.to_bits());
    }

    /// Every path of the attention (scores, softmax, Probs grid, values) against
    /// the scalar reference one head at a time, bit for bit: head sizes off the
    /// vector widths, 1 to 5 query heads per KV head, key counts off the tile.
    #[test]
    fn simd_attention_matches_the_scalar_reference_bit_for_bit() {
        let grid = ActGrid::from_range(0.0, 1.0, 8);
        for hd in [64, 72, 40, 13, 8, 5] {
            let (stride, offset, keys) = (3 * hd + 2, hd + 1, 37);
            let k: Vec<f32> = (0..keys * stride)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.3)
                .collect();
            let v: Vec<f32> = (0..keys * stride)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.1)
                .collect();
            let cache = HeadCache {
                k: &k,
                v: &v,
                stride,
                offset,
                head_dim: hd,
            };
            for heads in 1..=5 {
                let qs: Vec<f32> = (0..heads * hd).map(|i| ((i * 29 % 31) as f32 - 15.0) / 3.7).collect();
                for (visible, probs) in [
                    (1, None),
                    (7, Some(&grid)),
                    (8, None),
                    (9, None),
                    (17, Some(&grid)),
                    (37, None),
                ] {
                    let args = (&qs[..], &cache, visible, 0.125, probs);
                    // The reference: each head alone on the scalar reductions.
                    let mut want = vec![0f32; heads * hd];
                    for (q, o) in qs.chunks(hd).zip(want.chunks_mut(hd)) {
                        attend_with(
                            (q, &cache, visible, 0.125, probs),
                            &mut Scratch::default(),
                            o,
                            scores_scalar,
                            weighted_values_scalar,
                        );
                    }
                    let mut got = vec![0f32; heads * hd];
                    attend(&qs, &cache, visible, 0.125, probs, &mut Scratch::default(), &mut got);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "best path, hd {hd}, {heads} heads, {visible} keys"
                    );
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx2") {
                        let mut got = vec![0f32; heads * hd];
                        // SAFETY: AVX2 was detected just above.
                        unsafe { attend_avx2(args, &mut Scratch::default(), &mut got) };
                        assert_eq!(bits(&got), bits(&want), "AVX2, hd {hd}, {heads} heads, {visible} keys");
                    }
                }
            }
        }
    }
}
