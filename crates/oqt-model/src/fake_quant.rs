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

/// `x` rounded to f16 and back (llama.cpp stores block scales in f16), with a
/// straight-through gradient.
pub fn f16_round_ste<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let shape = x.shape();
    let values: Vec<f32> = x
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor")
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    let rounded = Tensor::from_data(TensorData::new(values, shape), &x.device());
    ste(x, rounded)
}

/// `1 / x`, with 0 where `x` is 0 (ggml's `id = d ? 1/d : 0`).
fn safe_recip<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let zero = x.clone().equal_elem(0.0);
    x.mask_fill(zero.clone(), 1.0).recip().mask_fill(zero, 0.0)
}

/// C's `roundf` (half away from zero), exactly: `⌊|x|⌋ + ⌊2(|x| − ⌊|x|⌋)⌋`
/// with the sign of `x` (`⌊|x| + 0.5⌋` would round 0.49999997 up).
fn round_half_away<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let a = x.clone().abs();
    let floor = a.clone().floor();
    (floor.clone() + (a - floor).mul_scalar(2.0).floor()) * x.sign()
}

/// llama.cpp's Q8_0 activation blocks on the last axis (length a multiple of 32):
/// the integers `q` (exact, as floats) and each block's f16 scale `d`
/// (`[.., blocks]`), as `oqt_kernels::act_quant::quantize_rows_q8_0` computes them.
pub fn q8_0_blocks_integer(x: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    let [m, k] = x.dims();
    assert!(
        k.is_multiple_of(32),
        "Q8_0 activation rows must be a multiple of 32 long, found {k}"
    );
    let blocks = x.reshape([m, k / 32, 32]);
    let d = blocks.clone().abs().max_dim(2).div_scalar(127.0); // [m, G, 1]
    let inv = safe_recip(d.clone()).detach();
    let q = (blocks * inv).round().clamp(-128.0, 127.0);
    let d16 = f16_round_ste(d).reshape([m, k / 32]);
    (q.reshape([m, k]), d16)
}

/// Quantize-dequantize rows into llama.cpp's Q8_0 blocks (straight-through gradient).
pub fn fake_quant_q8_0_blocks<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m = x.shape().num_elements() / k;
    let (q, d) = q8_0_blocks_integer(x.clone().reshape([m, k]));
    let y = (q.reshape([m, k / 32, 32]) * d.reshape([m, k / 32, 1])).reshape(dims);
    ste(x, y)
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
        Granularity::Lpbq(block) => return fake_quant_lpbq(w, block, clip),
        Granularity::PerGroup(g) => g,
        Granularity::PerChannel => d_in,
        Granularity::PerTensor => panic!("per-tensor weight grids are not simulated yet"),
    };
    assert!(
        d_in.is_multiple_of(group),
        "input width {d_in} is not a multiple of the group {group}"
    );
    let (qmin, qmax) = spec.qrange();
    let g3 = w.reshape([d_in / group, group, d_out]);
    let clip = clip.reshape([1, 1, d_out]);
    match spec.scale_rule {
        ScaleRule::LlamaCppQ8_0 => {
            // d = clip · amax / 127; q = roundf(w · (1/d)); grid f16(d) · q.
            let d = g3.clone().abs().max_dim(1) * clip / 127.0;
            let q = ste(
                g3.clone() * safe_recip(d.clone()),
                round_half_away(g3 * safe_recip(d.clone())),
            )
            .clamp(-127.0, 127.0);
            return (q * f16_round_ste(d)).reshape([d_in, d_out]);
        }
        ScaleRule::LlamaCppQ4_0 => {
            // d = clip · max / −8 with max the signed extreme (first on ties);
            // q = min(15, ⌊w · (1/d) + 8.5⌋) − 8; grid f16(d) · q.
            let first_extreme = g3.clone().abs().argmax(1); // [G, 1, d_out]
            let max = g3.clone().gather(1, first_extreme);
            let d = max * clip / -8.0;
            let scaled = g3 * safe_recip(d.clone());
            let q = ste(scaled.clone(), (scaled + 8.5).floor().clamp(0.0, 15.0) - 8.0);
            return (q * f16_round_ste(d)).reshape([d_in, d_out]);
        }
        _ => {}
    }
    let divisor = match spec.scale_rule {
        ScaleRule::AmaxOverHalfRange => (qmax - qmin) as f32 / 2.0,
        _ => qmax as f32,
    };
    let amax = g3.clone().abs().max_dim(1) * clip;
    // All-zero groups: any scale represents them; the reference uses 1.
    let scale = (amax.clone() / divisor).mask_fill(amax.equal_elem(0.0), 1.0);
    let q = round_ste(g3 / scale.clone()).clamp(qmin as f32, qmax as f32);
    (q * scale).reshape([d_in, d_out])
}

/// LPBQ ([`Granularity::Lpbq`]) on Burn's `[d_in, d_out]` layout, as
/// `oqt_core::quant::weights::lpbq_row_params` computes per output column:
/// block scales `s_b = clip · amax_b / 7`, `s_row = max_b s_b / 16` (1 for an
/// all-zero column), integer multipliers `m_b = clamp(round(s_b / s_row), 1, 16)`
/// (a discrete choice: no gradient), `q = clamp(round(w / (m_b · s_row)), −8, 7)`;
/// returns `(q · m_b) · s_row`, the expanded int8 value times the row scale.
/// The clip's gradient reaches `s_row` through the largest block.
fn fake_quant_lpbq(w: Tensor<2>, block: usize, clip: Tensor<2>) -> Tensor<2> {
    let [d_in, d_out] = w.dims();
    assert!(
        d_in.is_multiple_of(block),
        "LPBQ blocks of {block} do not divide the input width {d_in}"
    );
    let max_m = oqt_core::quant::spec::LPBQ_MAX_MULTIPLIER as f32;
    let g3 = w.reshape([d_in / block, block, d_out]);
    let clip = clip.reshape([1, 1, d_out]);
    let block_scale = g3.clone().abs().max_dim(1) * clip / 7.0; // [B, 1, d_out]
    let largest = block_scale.clone().max_dim(0); // [1, 1, d_out]
    let s_row = (largest.clone() / max_m).mask_fill(largest.equal_elem(0.0), 1.0);
    let m = (block_scale / s_row.clone()).round().clamp(1.0, max_m).detach();
    let q = round_ste(g3 / (m.clone() * s_row.clone())).clamp(-8.0, 7.0);
    ((q * m) * s_row).reshape([d_in, d_out])
}
