//! Fake quantization on Burn tensors: the same grids and rounding as the
//! reference quantizers (`oqt_core::quant`) and the integer kernels
//! (`oqt-kernels`), with straight-through gradients (`x + (x̂ − x).detach()`),
//! so what is simulated while compressing is what the runtime computes.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use oqt_core::quant::{ActGrid, Granularity, ScaleRule, WeightSpec};

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
    let (q, scale) = dynamic_rows_integer(x.clone());
    ste(x, q * scale)
}

/// The integers `q − zp` of [`fake_quant_dynamic_rows`] (exact, as floats) and
/// each row's scale (last axis of size 1).
pub fn dynamic_rows_integer<const D: usize>(x: Tensor<D>) -> (Tensor<D>, Tensor<D>) {
    let last = D - 1;
    let min = x.clone().min_dim(last).clamp_max(0.0);
    let max = x.clone().max_dim(last).clamp_min(0.0);
    let range = max - min.clone();
    // All-zero rows: any scale represents them; the kernels use 1.
    let scale = (range.clone() / 255.0).mask_fill(range.equal_elem(0.0), 1.0);
    let zp = ((min / scale.clone()).neg() - 128.0).round().clamp(-128.0, 127.0);
    let inv = scale.clone().recip();
    let q = ((x * inv).round() + zp.clone()).clamp(-128.0, 127.0);
    (q - zp, scale)
}

/// Weights in Burn's Linear layout `[d_in, d_out]`, symmetric, one scale per
/// output column and group of `group` input rows (per-channel: all of them),
/// as `oqt_core::quant::quantize_weight` computes: `scale = clip · amax / qmax`
/// (or `/ half-range`), `q = clamp(round(w / scale), qmin, qmax)`; returns `q · scale`.
/// Asymmetric and per-tensor grids are not simulated here yet.
pub fn fake_quant_weight(w: Tensor<2>, spec: &WeightSpec, clip: f32) -> Tensor<2> {
    let [_, d_out] = w.dims();
    let clip = Tensor::full([1, d_out], clip, &w.device());
    ste(w.clone(), fake_quant_weight_learned(w, spec, clip))
}

/// `round(x)` forward (half to even), identity gradient. Exact: `x + (round(x) − x)`
/// reproduces `round(x)` bit for bit (the difference is exact by Sterbenz' lemma).
pub fn round_ste<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    ste(x.clone(), x.round())
}

/// A static per-tensor activation quantizer whose scale and zero point are
/// trained (LSQ-style: the rounding passes gradients straight through, so the
/// loss reaches the scale through `(q − zp) · scale` and the zero point through
/// the clamp bounds). Initialised from, and exported back to, an [`ActGrid`];
/// with untouched parameters it computes exactly [`ActGrid::fake`].
///
/// The parameters are relative — `scale = scale₀ · exp(log_scale)`,
/// `zp = zp₀ + zero_shift · (qmax − qmin)` — so one learning rate suits 8-bit
/// and 16-bit grids whose scales differ by orders of magnitude.
#[derive(Module, Debug)]
pub struct ActQuantizer {
    /// `[1]`, 0 at the calibrated scale.
    pub log_scale: Param<Tensor<1>>,
    /// `[1]`, in units of the grid's span; rounded (with STE) when used.
    pub zero_shift: Param<Tensor<1>>,
    pub scale0: f32,
    pub zero_point0: f32,
    pub bits: u8,
}

impl ActQuantizer {
    pub fn from_grid(g: &ActGrid, device: &Device) -> Self {
        let zero = || Param::from_tensor(Tensor::<1>::from_data(TensorData::new(vec![0f32], [1]), device));
        Self {
            log_scale: zero(),
            zero_shift: zero(),
            scale0: g.scale,
            zero_point0: g.zero_point as f32,
            bits: g.bits,
        }
    }

    fn qrange(&self) -> (f32, f32) {
        let qmin = -((1i64 << (self.bits - 1)) as f32);
        let qmax = ((1i64 << (self.bits - 1)) - 1) as f32;
        (qmin, qmax)
    }

    fn scale(&self) -> Tensor<1> {
        self.log_scale.val().exp() * self.scale0
    }

    fn zero_point(&self) -> Tensor<1> {
        let (qmin, qmax) = self.qrange();
        round_ste(self.zero_shift.val() * (qmax - qmin) + self.zero_point0).clamp(qmin, qmax)
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let (qmin, qmax) = self.qrange();
        let scale = self.scale().reshape([1; D]);
        let zp = self.zero_point().reshape([1; D]);
        let q = (round_ste(x * scale.clone().recip()) + zp.clone()).clamp(qmin, qmax);
        (q - zp) * scale
    }

    /// The grid as trained (zero point rounded, as the runtime stores it).
    pub fn grid(&self) -> ActGrid {
        let read = |t: Tensor<1>| {
            t.into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 parameter")[0]
        };
        ActGrid {
            scale: read(self.scale()),
            zero_point: read(self.zero_point()) as i32,
            bits: self.bits,
        }
    }
}

/// [`fake_quant_weight`] with a learned clip per output column (`clip`:
/// `[1, d_out]`, in (0, 1]) and LSQ-style gradients: rounding passes the
/// gradient straight through, so the loss reaches the weights, the clip (and
/// whatever produced the weights, e.g. smoothing scales) through `q · scale`.
/// The forward value equals `oqt_core::quant::quantize_weight` with that clip.
pub fn fake_quant_weight_learned(w: Tensor<2>, spec: &WeightSpec, clip: Tensor<2>) -> Tensor<2> {
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
    let g3 = w.reshape([d_in / group, group, d_out]);
    let amax = g3.clone().abs().max_dim(1) * clip.reshape([1, 1, d_out]);
    // All-zero groups: any scale represents them; the reference uses 1.
    let scale = (amax.clone() / divisor).mask_fill(amax.equal_elem(0.0), 1.0);
    let q = round_ste(g3 / scale.clone()).clamp(qmin as f32, qmax as f32);
    (q * scale).reshape([d_in, d_out])
}
