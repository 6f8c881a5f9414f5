//! Float operations whose results do not depend on summation order, so the
//! runtime (`oqt-runtime`, plain Rust) computes them bit for bit: every
//! reduction is accumulated in f64 and rounded once to f32; element-wise steps
//! are single IEEE operations in the order written here. The runtime's
//! `reference` module implements the same definitions.
//!
//! * RMSNorm: `ms = f32(Σ f64(x)² / n)`, `inv = 1 / sqrt(ms + eps)`, `y = (x · inv) · γ`.
//! * Softmax: `e = exp(s − max)`, `d = f32(Σ f64(e))`, `p = e / d`.
//! * Attention dots and probability-weighted sums: f64 accumulation, one rounding.
//! * SiLU: `g / (1 + exp(−g))`.

use burn::tensor::{FloatDType, Tensor};

pub fn rms_norm(x: Tensor<3>, gamma: &Tensor<1>, eps: f64) -> Tensor<3> {
    let n = x.dims()[2] as f64;
    let ms = x
        .clone()
        .cast(FloatDType::F64)
        .square()
        .sum_dim(2)
        .div_scalar(n)
        .cast(FloatDType::F32);
    let inv = ms.add_scalar(eps as f32).sqrt().recip();
    (x * inv) * gamma.clone().unsqueeze::<3>()
}

/// Softmax over the last axis of `[b, h, q, k]` (masked entries are −∞).
pub fn softmax(s: Tensor<4>) -> Tensor<4> {
    let max = s.clone().max_dim(3);
    let e = (s - max).exp();
    let d = e.clone().cast(FloatDType::F64).sum_dim(3).cast(FloatDType::F32);
    e / d
}

/// `a · b` with f64 accumulation, rounded once to f32.
pub fn matmul(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    a.cast(FloatDType::F64)
        .matmul(b.cast(FloatDType::F64))
        .cast(FloatDType::F32)
}

pub fn silu(g: Tensor<3>) -> Tensor<3> {
    g.clone() / g.neg().exp().add_scalar(1.0)
}
