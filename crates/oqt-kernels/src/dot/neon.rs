//! AArch64 paths of [`super`]'s row dots (`sdot`), equal to the scalar reference bit for bit.

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
