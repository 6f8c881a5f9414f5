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
        Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::dot_wide_avx2(a, w) },
        _ => dot_wide_chunked(a, w),
    }
}

#[inline(always)]
pub(crate) fn dot_wide_chunked(a: &[i32], w: &[i8]) -> i64 {
    a.chunks(128)
        .zip(w.chunks(128))
        .map(|(a, w)| a.iter().zip(w).map(|(&x, &y)| x * y as i32).sum::<i32>() as i64)
        .sum()
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
mod x86;

/// AArch64 `sdot` (dot-product extension): exact i32 group dots with SIMD, then
/// the shared float epilogue ([`combine_reference`]), so the result is the
/// scalar reference's bit for bit.
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod neon;
