//! x86-64 path of [`super`]'s tiles: the generic micro-kernel compiled with
//! AVX2 + FMA enabled (6 × 16 tiles), which the compiler vectorizes.

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tiles_avx2_fma(ap: &[f32], bg: &[f32], k: usize, sink: &mut dyn FnMut(usize, usize, &[f32])) {
    super::tiles::<6, 16, true>(ap, bg, k, sink)
}
