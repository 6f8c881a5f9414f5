//! x86-64 paths of [`super`]'s row dots: AVX2 (`vpmaddubsw` + `vpmaddwd`) and
//! AVX-512 VNNI (`vpdpbusd`), each equal to the scalar reference bit for bit.

use super::{ActRow, BLOCK, WeightRow};
use std::arch::x86_64::*;

// The helpers below carry no `target_feature` of their own and are always
// inlined: they take on the features of the kernel they are inlined into, so
// the per-block closures compile to straight-line SIMD with no calls.

/// Eight 8-lane accumulators → one vector of their eight sums (lane j = Σ acc[j]).
#[inline(always)]
unsafe fn reduce8(acc: &[__m256i; 8]) -> __m256i {
    let t0 = _mm256_hadd_epi32(acc[0], acc[1]);
    let t1 = _mm256_hadd_epi32(acc[2], acc[3]);
    let t2 = _mm256_hadd_epi32(acc[4], acc[5]);
    let t3 = _mm256_hadd_epi32(acc[6], acc[7]);
    let u0 = _mm256_hadd_epi32(t0, t1);
    let u1 = _mm256_hadd_epi32(t2, t3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(u0, u1),
        _mm256_permute2x128_si256::<0x31>(u0, u1),
    )
}

/// Load up to 8 values, zero-filling lanes past `n`.
#[inline(always)]
unsafe fn load_i32(src: &[i32], n: usize) -> __m256i {
    if n == 8 {
        // SAFETY: 8 values exist.
        return _mm256_loadu_si256(src.as_ptr() as *const __m256i);
    }
    let mut buf = [0i32; 8];
    buf[..n].copy_from_slice(&src[..n]);
    // SAFETY: buf holds 8 i32.
    unsafe { _mm256_loadu_si256(buf.as_ptr() as *const __m256i) }
}

#[inline(always)]
unsafe fn load_f32(src: &[f32], n: usize) -> __m256 {
    if n == 8 {
        // SAFETY: 8 values exist.
        return _mm256_loadu_ps(src.as_ptr());
    }
    let mut buf = [0f32; 8];
    buf[..n].copy_from_slice(&src[..n]);
    // SAFETY: buf holds 8 f32.
    unsafe { _mm256_loadu_ps(buf.as_ptr()) }
}

/// Final pairwise reduction of the eight f32 partial sums, in the reference order.
#[inline(always)]
unsafe fn finish(p: __m256) -> f32 {
    let mut l = [0f32; 8];
    // SAFETY: l holds 8 f32.
    unsafe { _mm256_storeu_ps(l.as_mut_ptr(), p) };
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// The shared per-row driver: `block_dot(acc, block)` adds one block's raw
/// products to a group accumulator; `correct(raw, chunk_start, n)` turns raw
/// group sums into exact `Σ (q_a − zp) q_w`.
#[inline(always)]
unsafe fn drive(
    groups: usize,
    blocks_per_group: usize,
    scales: &[f32],
    s_a: f32,
    block_scales: Option<&[f32]>,
    mut block_dot: impl FnMut(__m256i, usize) -> __m256i,
    correct: impl Fn(__m256i, usize, usize) -> __m256i,
) -> f32 {
    let vsa = _mm256_set1_ps(s_a);
    let mut p = _mm256_setzero_ps();
    for start in (0..groups).step_by(8) {
        let n = (groups - start).min(8);
        let z = _mm256_setzero_si256();
        let acc = if n == 8 && blocks_per_group == 1 {
            // The common case (group 32, 8 full groups): straight-line code keeps
            // the eight accumulators in registers.
            let b = start;
            [
                block_dot(z, b),
                block_dot(z, b + 1),
                block_dot(z, b + 2),
                block_dot(z, b + 3),
                block_dot(z, b + 4),
                block_dot(z, b + 5),
                block_dot(z, b + 6),
                block_dot(z, b + 7),
            ]
        } else {
            let mut acc = [z; 8];
            for (j, a) in acc.iter_mut().enumerate().take(n) {
                let g = start + j;
                for b in g * blocks_per_group..(g + 1) * blocks_per_group {
                    *a = block_dot(*a, b);
                }
            }
            acc
        };
        let dots = correct(reduce8(&acc), start, n);
        let s_a = match block_scales {
            Some(b) => load_f32(&b[start..], n),
            None => vsa,
        };
        let s = _mm256_mul_ps(s_a, load_f32(&scales[start..], n));
        p = _mm256_add_ps(p, _mm256_mul_ps(s, _mm256_cvtepi32_ps(dots)));
    }
    finish(p)
}

/// The 32 weights of a block as unsigned `q + 8`, in column order.
#[inline(always)]
unsafe fn unpack_block(w: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at w.
    let bytes = unsafe { _mm_loadu_si128(w as *const __m128i) };
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(bytes, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
    _mm256_set_m128i(hi, lo)
}

/// Raw group sums are `Σ (q_w + 8) q_a`; subtract `8 Σ q_a + zp Σ q_w`.
#[inline(always)]
unsafe fn int4_correct(a: &ActRow<'_>, w: &WeightRow<'_, u8>, raw: __m256i, start: usize, n: usize) -> __m256i {
    let asum = _mm256_slli_epi32::<3>(load_i32(&a.group_sums[start..], n));
    let zsum = _mm256_mullo_epi32(_mm256_set1_epi32(a.zero_point), load_i32(&w.sums[start..], n));
    _mm256_sub_epi32(_mm256_sub_epi32(raw, asum), zsum)
}

/// AVX2: maddubs (u8 ≤ 15 times i8 cannot saturate i16) then madd to i32.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_int4(a: ActRow<'_>, w: WeightRow<'_, u8>) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let (aq, wd) = (a.q.as_ptr(), w.data.as_ptr());
    // SAFETY: drive only calls the closures for groups and blocks inside the rows.
    drive(
        w.scales.len(),
        w.group / BLOCK,
        w.scales,
        a.scale,
        a.block_scales,
        |acc, b| {
            // SAFETY: block b lies inside both rows (k_pad values, k_pad/2 bytes).
            let (wv, av) = unsafe {
                (
                    unpack_block(wd.add(b * BLOCK / 2)),
                    _mm256_loadu_si256(aq.add(b * BLOCK) as *const __m256i),
                )
            };
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones))
        },
        |raw, start, n| unsafe { int4_correct(&a, &w, raw, start, n) },
    )
}

/// AVX-512 VNNI: fused u8·i8 → i32 dot products.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
pub unsafe fn row_int4_vnni(a: ActRow<'_>, w: WeightRow<'_, u8>) -> f32 {
    let (aq, wd) = (a.q.as_ptr(), w.data.as_ptr());
    drive(
        w.scales.len(),
        w.group / BLOCK,
        w.scales,
        a.scale,
        a.block_scales,
        |acc, b| {
            // SAFETY: as in the AVX2 path.
            let (wv, av) = unsafe {
                (
                    unpack_block(wd.add(b * BLOCK / 2)),
                    _mm256_loadu_si256(aq.add(b * BLOCK) as *const __m256i),
                )
            };
            _mm256_dpbusd_epi32(acc, wv, av)
        },
        |raw, start, n| unsafe { int4_correct(&a, &w, raw, start, n) },
    )
}

/// AVX2 int8: sign-extend to i16 and madd (maddubs would saturate). Raw sums are exact `Σ q_a q_w`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_int8(a: ActRow<'_>, w: WeightRow<'_, i8>) -> f32 {
    let (aq, wd) = (a.q.as_ptr(), w.data.as_ptr());
    drive(
        w.scales.len(),
        w.group / BLOCK,
        w.scales,
        a.scale,
        a.block_scales,
        |acc, b| {
            let mut acc = acc;
            for h in 0..2 {
                let c = b * BLOCK + h * 16;
                // SAFETY: c + 16 <= k_pad for both rows.
                let (av, wv) = unsafe {
                    (
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(aq.add(c) as *const __m128i)),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(wd.add(c) as *const __m128i)),
                    )
                };
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, wv));
            }
            acc
        },
        |raw, start, n| {
            // SAFETY: load_i32 reads n <= 8 values that exist.
            let zsum = _mm256_mullo_epi32(_mm256_set1_epi32(a.zero_point), unsafe {
                load_i32(&w.sums[start..], n)
            });
            _mm256_sub_epi32(raw, zsum)
        },
    )
}

/// VNNI int8: activations shifted to `q_a + 128` (u8); raw = `Σ q_a q_w + 128 Σ q_w`.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
pub unsafe fn row_int8_vnni(a: ActRow<'_>, w: WeightRow<'_, i8>) -> f32 {
    let flip = _mm256_set1_epi8(i8::MIN);
    let (aq, wd) = (a.q.as_ptr(), w.data.as_ptr());
    drive(
        w.scales.len(),
        w.group / BLOCK,
        w.scales,
        a.scale,
        a.block_scales,
        |acc, b| {
            // SAFETY: block b lies inside both rows.
            let (av, wv) = unsafe {
                (
                    _mm256_loadu_si256(aq.add(b * BLOCK) as *const __m256i),
                    _mm256_loadu_si256(wd.add(b * BLOCK) as *const __m256i),
                )
            };
            _mm256_dpbusd_epi32(acc, _mm256_xor_si256(av, flip), wv)
        },
        |raw, start, n| {
            // SAFETY: load_i32 reads n <= 8 values that exist.
            let corr = _mm256_mullo_epi32(_mm256_set1_epi32(128 + a.zero_point), unsafe {
                load_i32(&w.sums[start..], n)
            });
            _mm256_sub_epi32(raw, corr)
        },
    )
}

/// Plain Rust compiled with AVX2 enabled: the i32 chunks vectorize (`vpmulld`).
#[target_feature(enable = "avx2")]
pub unsafe fn dot_wide_avx2(a: &[i32], w: &[i8]) -> i64 {
    super::dot_wide_chunked(a, w)
}
