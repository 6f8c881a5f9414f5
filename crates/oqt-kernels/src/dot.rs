//! Exact integer dots of one quantized activation row with one weight row,
//! per group: `dots[g] = Σ_{c ∈ g} (q_a[c] − zp) · q_w[c]`.

use crate::Isa;
use crate::pack::BLOCK;

/// int4 row. `a`: `k_pad` activations; `a_block_sums`: Σ per block of 32;
/// `w`: `k_pad/2` packed bytes; `w_sums`: Σ q_w per group.
#[allow(clippy::too_many_arguments)]
pub fn dots_int4(
    isa: Isa,
    a: &[i8],
    a_block_sums: &[i32],
    zp: i32,
    w: &[u8],
    w_sums: &[i32],
    group: usize,
    dots: &mut [i32],
) {
    debug_assert_eq!(a.len(), w.len() * 2);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dots_int4_avx2(a, a_block_sums, zp, w, w_sums, group, dots) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::dots_int4_vnni(a, a_block_sums, zp, w, w_sums, group, dots) },
        _ => dots_int4_scalar(a, zp, w, group, dots),
    }
}

/// The reference: unpack each nibble, multiply, sum.
pub fn dots_int4_scalar(a: &[i8], zp: i32, w: &[u8], group: usize, dots: &mut [i32]) {
    for (g, d) in dots.iter_mut().enumerate() {
        let mut acc = 0i32;
        for c in g * group..(g + 1) * group {
            let (b, i) = (c / BLOCK, c % BLOCK);
            let byte = w[b * BLOCK / 2 + i % 16];
            let q = if i < 16 { byte & 0x0F } else { byte >> 4 } as i32 - 8;
            acc += (a[c] as i32 - zp) * q;
        }
        *d = acc;
    }
}

/// int8 row: `w` has `k_pad` values.
pub fn dots_int8(isa: Isa, a: &[i8], zp: i32, w: &[i8], w_sums: &[i32], group: usize, dots: &mut [i32]) {
    debug_assert_eq!(a.len(), w.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dots_int8_avx2(a, zp, w, w_sums, group, dots) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::dots_int8_vnni(a, zp, w, w_sums, group, dots) },
        _ => dots_int8_scalar(a, zp, w, group, dots),
    }
}

pub fn dots_int8_scalar(a: &[i8], zp: i32, w: &[i8], group: usize, dots: &mut [i32]) {
    for (g, d) in dots.iter_mut().enumerate() {
        *d = (g * group..(g + 1) * group).map(|c| (a[c] as i32 - zp) * w[c] as i32).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    fn hsum_epi32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// The 32 weights of a block as unsigned `q + 8`, in column order.
    #[target_feature(enable = "avx2")]
    unsafe fn unpack_block(w: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at w.
        let bytes = unsafe { _mm_loadu_si128(w as *const __m128i) };
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// `Σ (q_w + 8) · q_a` per group with maddubs (u8 ≤ 15 times i8: no i16 overflow),
    /// then `dot = raw − 8 Σ q_a − zp Σ q_w`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dots_int4_avx2(
        a: &[i8],
        a_block_sums: &[i32],
        zp: i32,
        w: &[u8],
        w_sums: &[i32],
        group: usize,
        dots: &mut [i32],
    ) {
        let blocks_per_group = group / BLOCK;
        let ones = _mm256_set1_epi16(1);
        for (g, d) in dots.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_si256();
            let mut asum = 0i32;
            for b in g * blocks_per_group..(g + 1) * blocks_per_group {
                // SAFETY: block b lies inside a (k_pad values) and w (k_pad/2 bytes).
                let (wv, av) = unsafe {
                    (
                        unpack_block(w.as_ptr().add(b * BLOCK / 2)),
                        _mm256_loadu_si256(a.as_ptr().add(b * BLOCK) as *const __m256i),
                    )
                };
                let prod16 = _mm256_maddubs_epi16(wv, av);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod16, ones));
                asum += a_block_sums[b];
            }
            *d = hsum_epi32(acc) - 8 * asum - zp * w_sums[g];
        }
    }

    /// As the AVX2 path, with VNNI's fused u8·i8 → i32 dot product.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dots_int4_vnni(
        a: &[i8],
        a_block_sums: &[i32],
        zp: i32,
        w: &[u8],
        w_sums: &[i32],
        group: usize,
        dots: &mut [i32],
    ) {
        let blocks_per_group = group / BLOCK;
        for (g, d) in dots.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_si256();
            let mut asum = 0i32;
            for b in g * blocks_per_group..(g + 1) * blocks_per_group {
                // SAFETY: as in the AVX2 path.
                let (wv, av) = unsafe {
                    (
                        unpack_block(w.as_ptr().add(b * BLOCK / 2)),
                        _mm256_loadu_si256(a.as_ptr().add(b * BLOCK) as *const __m256i),
                    )
                };
                acc = _mm256_dpbusd_epi32(acc, wv, av);
                asum += a_block_sums[b];
            }
            *d = hsum_epi32(acc) - 8 * asum - zp * w_sums[g];
        }
    }

    /// Sign-extend to i16 and `madd` (exact; maddubs would saturate on int8 weights).
    #[target_feature(enable = "avx2")]
    pub unsafe fn dots_int8_avx2(a: &[i8], zp: i32, w: &[i8], w_sums: &[i32], group: usize, dots: &mut [i32]) {
        for (g, d) in dots.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_si256();
            for c in (g * group..(g + 1) * group).step_by(16) {
                // SAFETY: c + 16 <= k_pad for both rows.
                let (av, wv) = unsafe {
                    (
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(a.as_ptr().add(c) as *const __m128i)),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(c) as *const __m128i)),
                    )
                };
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, wv));
            }
            *d = hsum_epi32(acc) - zp * w_sums[g];
        }
    }

    /// VNNI wants u8·i8: shift activations to `q_a + 128` and correct with the weight sums.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dots_int8_vnni(a: &[i8], zp: i32, w: &[i8], w_sums: &[i32], group: usize, dots: &mut [i32]) {
        let flip = _mm256_set1_epi8(i8::MIN);
        for (g, d) in dots.iter_mut().enumerate() {
            let mut acc = _mm256_setzero_si256();
            for c in (g * group..(g + 1) * group).step_by(BLOCK) {
                // SAFETY: c + 32 <= k_pad for both rows.
                let (av, wv) = unsafe {
                    (
                        _mm256_loadu_si256(a.as_ptr().add(c) as *const __m256i),
                        _mm256_loadu_si256(w.as_ptr().add(c) as *const __m256i),
                    )
                };
                acc = _mm256_dpbusd_epi32(acc, _mm256_xor_si256(av, flip), wv);
            }
            *d = hsum_epi32(acc) - (128 + zp) * w_sums[g];
        }
    }
}
