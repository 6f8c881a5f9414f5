//! The float steps between quantizers, defined so their results do not depend
//! on summation order: reductions accumulate in f64 and round once to f32.
//! `oqt_model::reference_ops` is the same definition on Burn tensors; with it
//! the fake-quant simulation and this runtime agree bit for bit.

/// RMSNorm of each `gamma.len()`-wide row: `ms = f32(Σ f64(x)² / n)`,
/// `inv = 1 / sqrt(ms + eps)`, `y = (x · inv) · γ`.
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let n = gamma.len();
    for (xr, or) in x.chunks(n).zip(out.chunks_mut(n)) {
        let ms = (sum_sq_f64(xr) / n as f64) as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(gamma) {
            *o = (v * inv) * g;
        }
    }
}

fn sum_sq_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64 * v as f64).sum();
    for c in chunks {
        for i in 0..4 {
            acc[i] += c[i] as f64 * c[i] as f64;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// `Σ a·b` accumulated in f64, rounded once: element `i` of the whole
/// 8-wide chunks sums into lane `i mod 8`, the lanes are added pairwise by
/// halves (`l_i + l_{i+4}`, then `+2`, then `+1`), the remainder elements in
/// order after. Each f32·f32 product is exact in f64, so a fused multiply-add
/// gives the same sums: the SIMD forms of the runtime follow these lanes.
#[inline]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = dot_tail_f64(ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    (sum_lanes_f64(acc) + tail) as f32
}

/// The remainder of [`dot_f64`] past its whole chunks, summed in order.
#[inline]
pub fn dot_tail_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0.0, |s, (&x, &y)| s + x as f64 * y as f64)
}

/// The lanes of [`dot_f64`] added by halves.
#[inline]
pub fn sum_lanes_f64(l: [f64; 8]) -> f64 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Softmax in place: `e = exp(s − max)`, `d = f32(Σ f64(e))`, `p = e / d`.
pub fn softmax(s: &mut [f32]) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut d = 0f64;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        d += *v as f64;
    }
    let d = d as f32;
    for v in s.iter_mut() {
        *v /= d;
    }
}

/// `silu(g) · u` in place on `g`: `(g / (1 + exp(−g))) · u`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        *g = (*g / ((-*g).exp() + 1.0)) * u;
    }
}
