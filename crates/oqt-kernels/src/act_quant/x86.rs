//! x86-64 path of [`super`]'s activation quantizer, equal to the scalar one bit for bit.

use std::arch::x86_64::*;

/// 8 lanes at a time; same IEEE multiply and round-half-even as the scalar path.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_avx2(x: &[f32], inv: f32, zp: i32, out: &mut [i8]) {
    let n = x.len();
    let chunks = n / 8;
    let vinv = _mm256_set1_ps(inv);
    let vzp = _mm256_set1_epi32(zp);
    let lo = _mm256_set1_epi32(-128);
    let hi = _mm256_set1_epi32(127);
    let mut lanes = [0i32; 8];
    for c in 0..chunks {
        // SAFETY: c * 8 + 8 <= n.
        let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(c * 8)) };
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v, vinv));
        let q = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(r), vzp), lo), hi);
        // SAFETY: lanes holds 8 i32.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, q) };
        for (o, &l) in out[c * 8..c * 8 + 8].iter_mut().zip(&lanes) {
            *o = l as i8;
        }
    }
    super::quantize_scalar(&x[chunks * 8..], inv, zp, &mut out[chunks * 8..]);
}
