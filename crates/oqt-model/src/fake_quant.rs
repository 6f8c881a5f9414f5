//! Fake quantization on Burn tensors: the same grids and rounding as the
//! reference quantizers (`oqt_core::quant`) and the integer kernels
//! (`oqt-kernels`), with straight-through gradients (`x + (x̂ − x).detach()`),
//! so what is simulated while compressing is what the runtime computes.

use burn::tensor::Tensor;
use oqt_core::quant::{Granularity, ScaleRule, WeightSpec};

/// Straight-through estimator: the forward value of `quantized`, the gradient of `x`.
pub fn ste<const D: usize>(x: Tensor<D>, quantized: Tensor<D>) -> Tensor<D> {
    x.clone() + (quantized - x).detach()
}

/// Dynamic per-row (per-token) asymmetric int8 activations, exactly as
/// `oqt_kernels::act_quant`: `scale = (max − min)/255` with `min ≤ 0 ≤ max`,
/// `zp = clamp(round(−128 − min/scale), −128, 127)`,
/// `q = clamp(round(x · (1/scale)) + zp, −128, 127)`, rounding half to even;
/// returns `(q − zp) · scale`.
pub fn fake_quant_dynamic_rows<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let last = D - 1;
    let min = x.clone().min_dim(last).clamp_max(0.0);
    let max = x.clone().max_dim(last).clamp_min(0.0);
    let range = max - min.clone();
    // All-zero rows: any scale represents them; the kernels use 1.
    let scale = (range.clone() / 255.0).mask_fill(range.equal_elem(0.0), 1.0);
    let zp = ((min / scale.clone()).neg() - 128.0).round().clamp(-128.0, 127.0);
    let inv = scale.clone().recip();
    let q = ((x.clone() * inv).round() + zp.clone()).clamp(-128.0, 127.0);
    ste(x, (q - zp) * scale)
}

/// Weights in Burn's Linear layout `[d_in, d_out]`, symmetric, one scale per
/// output column and group of `group` input rows (per-channel: all of them),
/// as `oqt_core::quant::quantize_weight` computes: `scale = clip · amax / qmax`
/// (or `/ half-range`), `q = clamp(round(w / scale), qmin, qmax)`; returns `q · scale`.
/// Asymmetric and per-tensor grids are not simulated here yet.
pub fn fake_quant_weight(w: Tensor<2>, spec: &WeightSpec, clip: f32) -> Tensor<2> {
    assert!(spec.symmetric, "asymmetric weight grids are not simulated yet");
    let [d_in, d_out] = w.dims();
    let group = match spec.granularity {
        Granularity::PerGroup(g) => g,
        Granularity::PerChannel => d_in,
        Granularity::PerTensor => panic!("per-tensor weight grids are not simulated yet"),
    };
    assert!(
        d_in.is_multiple_of(group),
        "input width {d_in} is not a multiple of the group {group}"
    );
    let (qmin, qmax) = spec.qrange();
    let divisor = match spec.scale_rule {
        ScaleRule::AmaxOverQmax => qmax as f32,
        ScaleRule::AmaxOverHalfRange => (qmax - qmin) as f32 / 2.0,
    };
    let g3 = w.clone().reshape([d_in / group, group, d_out]);
    let amax = g3.clone().abs().max_dim(1) * clip;
    let scale = (amax.clone() / divisor).mask_fill(amax.equal_elem(0.0), 1.0);
    let q = (g3 / scale.clone()).round().clamp(qmin as f32, qmax as f32);
    ste(w, (q * scale).reshape([d_in, d_out]))
}
