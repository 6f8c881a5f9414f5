//! One output value: a quantized activation row against one packed weight
//! row, following the crate's contract exactly.
//!
//! Per group `g`: `dot_g = Σ_{c ∈ g} (q_a[c] − zp) · q_w[c]` (exact i32) and
//! `v_g = (s_a · s_w[g]) · dot_g` (f32). The `v_g` are accumulated in eight
//! interleaved f32 partial sums, `p[g mod 8] += v_g` in group order, and the
//! result is `((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))`. That order is
//! what eight SIMD lanes do naturally, so SIMD paths need one horizontal
//! reduction per row instead of one per group — and the scalar reference
//! follows the same order, so every path is bit-identical.

// Index loops address activations, weights and sums in lockstep, as the SIMD code does.
#![allow(clippy::needless_range_loop)]

use crate::Isa;
use crate::pack::BLOCK;

/// Per-row activation data a kernel needs.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    /// `k_pad` quantized values.
    pub q: &'a [i8],
    /// `Σ q` per group of the weights' group size.
    pub group_sums: &'a [i32],
    pub zero_point: i32,
    pub scale: f32,
    /// llama.cpp's Q8_0 activations: one scale per group (the weights' group is
    /// then one block of 32) replacing `scale`; `zero_point` is 0.
    pub block_scales: Option<&'a [f32]>,
}

impl ActRow<'_> {
    /// The activation scale of group `g`.
    #[inline]
    pub fn scale_of(&self, g: usize) -> f32 {
        self.block_scales.map_or(self.scale, |s| s[g])
    }
}

/// Per-row weight data.
#[derive(Clone, Copy)]
pub struct WeightRow<'a, T> {
    pub data: &'a [T],
    pub sums: &'a [i32],
    pub scales: &'a [f32],
    pub group: usize,
}

/// The float epilogue shared by every path (see the module docs).
#[inline]
pub fn combine_reference(a: &ActRow<'_>, scales: &[f32], dots: &[i32]) -> f32 {
    let mut p = [0f32; 8];
    for (g, (&s, &d)) in scales.iter().zip(dots).enumerate() {
        p[g % 8] += (a.scale_of(g) * s) * d as f32;
    }
    ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))
}

/// Signed int4 value at column `c` of a packed (symmetric, offset-8) row.
#[inline]
fn nibble(w: &[u8], c: usize) -> i32 {
    oqt_core::quant::pack::int4_nibble(w, c) as i32 - 8
}

pub fn row_int4(isa: Isa, a: ActRow<'_>, w: WeightRow<'_, u8>) -> f32 {
    debug_assert_eq!(a.q.len(), w.data.len() * 2);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::row_int4(a, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::row_int4_vnni(a, w) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { neon::row_int4(a, w) },
        _ => row_int4_scalar(a, w),
    }
}

/// The reference: unpack each nibble, multiply, sum per group, combine.
pub fn row_int4_scalar(a: ActRow<'_>, w: WeightRow<'_, u8>) -> f32 {
    let dots: Vec<i32> = (0..w.scales.len())
        .map(|g| {
            (g * w.group..(g + 1) * w.group)
                .map(|c| (a.q[c] as i32 - a.zero_point) * nibble(w.data, c))
                .sum()
        })
        .collect();
    combine_reference(&a, w.scales, &dots)
}

/// Exact `Σ a_i·w_i` of 16-bit-grid activations (`a = q − zp`, so `|a| ≤ 65,535`)
/// and int8 weights: the dot of the runtime's 16-bit-input layers (W8A16).
/// Products are at most 65,535 · 128 = 8,388,480 in size, so 128 of them sum
/// exactly in an i32 (≤ 1.07 · 10⁹ < 2³¹); the chunks add up in i64. The
/// result is the same integer on every path.
pub fn dot_wide(isa: Isa, a: &[i32], w: &[i8]) -> i64 {
    debug_assert_eq!(a.len(), w.len());
    match isa {
        // Plain Rust compiled with AVX2 enabled: the i32 chunks vectorize (vpmulld).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { dot_wide_avx2(a, w) },
        _ => dot_wide_chunked(a, w),
    }
}

#[inline(always)]
fn dot_wide_chunked(a: &[i32], w: &[i8]) -> i64 {
    a.chunks(128)
        .zip(w.chunks(128))
        .map(|(a, w)| a.iter().zip(w).map(|(&x, &y)| x * y as i32).sum::<i32>() as i64)
        .sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_wide_avx2(a: &[i32], w: &[i8]) -> i64 {
    dot_wide_chunked(a, w)
}

pub fn row_int8(isa: Isa, a: ActRow<'_>, w: WeightRow<'_, i8>) -> f32 {
    debug_assert_eq!(a.q.len(), w.data.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::row_int8(a, w) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::row_int8_vnni(a, w) },
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => unsafe { neon::row_int8(a, w) },
        _ => row_int8_scalar(a, w),
    }
}

pub fn row_int8_scalar(a: ActRow<'_>, w: WeightRow<'_, i8>) -> f32 {
    let dots: Vec<i32> = (0..w.scales.len())
        .map(|g| {
            (g * w.group..(g + 1) * w.group)
                .map(|c| (a.q[c] as i32 - a.zero_point) * w.data[c] as i32)
                .sum()
        })
        .collect();
    combine_reference(&a, w.scales, &dots)
}

#[cfg(target_arch = "x86_64")]
// Every function here is SIMD intrinsics on bounds the callers establish; the
// helpers are `unsafe fn` only so that they inline into the feature-enabled kernels.
#[allow(unsafe_op_in_unsafe_fn)]
mod x86 {
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
}

/// AArch64 `sdot` (dot-product extension): exact i32 group dots with SIMD, then
/// the shared float epilogue ([`combine_reference`]), so the result is the
/// scalar reference's bit for bit.
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod neon {
    use super::{ActRow, BLOCK, WeightRow, combine_reference};
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// `acc += sdot(a, w)` on one 16-byte half block. The `vdotq_s32` intrinsic is
    /// still unstable in Rust 1.95, so the instruction is written out; it must
    /// expand inside a function compiled with the `dotprod` feature.
    macro_rules! sdot {
        ($acc:ident, $a:expr, $w:expr) => {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {w:v}.16b",
                acc = inout(vreg) $acc,
                a = in(vreg) $a,
                w = in(vreg) $w,
                options(pure, nomem, nostack, preserves_flags)
            )
        };
    }

    /// Σ over one 32-value block of `a · w` (signed bytes), as four i32 lanes.
    macro_rules! block_dot {
        ($acc:ident, $a:expr, $w_lo:expr, $w_hi:expr) => {{
            let a: *const i8 = $a;
            let (lo, hi) = (vld1q_s8(a), vld1q_s8(a.add(16)));
            sdot!($acc, lo, $w_lo);
            sdot!($acc, hi, $w_hi);
        }};
    }

    /// Packed int4 block (value j in the low nibble of byte j, value j+16 in the high
    /// nibble; stored as `q + 8`) → two vectors of signed weights.
    #[inline(always)]
    unsafe fn unpack(w: *const u8) -> (int8x16_t, int8x16_t) {
        let bytes = vld1q_u8(w);
        let eight = vdupq_n_s8(8);
        let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0F))), eight);
        let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(bytes)), eight);
        (lo, hi)
    }

    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn row_int4(a: ActRow<'_>, w: WeightRow<'_, u8>) -> f32 {
        let per = w.group / BLOCK;
        let mut dots = vec![0i32; w.scales.len()];
        for (g, d) in dots.iter_mut().enumerate() {
            let mut acc = vdupq_n_s32(0);
            for b in g * per..(g + 1) * per {
                let (lo, hi) = unpack(w.data.as_ptr().add(b * BLOCK / 2));
                block_dot!(acc, a.q.as_ptr().add(b * BLOCK), lo, hi);
            }
            // Σ (q_a − zp) q_w = Σ q_a q_w − zp Σ q_w.
            *d = vaddvq_s32(acc) - a.zero_point * w.sums[g];
        }
        combine_reference(&a, w.scales, &dots)
    }

    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn row_int8(a: ActRow<'_>, w: WeightRow<'_, i8>) -> f32 {
        let per = w.group / BLOCK;
        let mut dots = vec![0i32; w.scales.len()];
        for (g, d) in dots.iter_mut().enumerate() {
            let mut acc = vdupq_n_s32(0);
            for b in g * per..(g + 1) * per {
                let wp = w.data.as_ptr().add(b * BLOCK);
                block_dot!(acc, a.q.as_ptr().add(b * BLOCK), vld1q_s8(wp), vld1q_s8(wp.add(16)));
            }
            *d = vaddvq_s32(acc) - a.zero_point * w.sums[g];
        }
        combine_reference(&a, w.scales, &dots)
    }
}
