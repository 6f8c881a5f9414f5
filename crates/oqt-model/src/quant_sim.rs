//! The fake-quantized model a bundle describes, in Burn: the bundle's integer
//! weights, its activation quantization (static grids at every site of
//! [`oqt_core::quant::sites`], or dynamic per-token rows) and nothing else
//! changed. This is what compression methods optimize and what the runtime
//! must reproduce; `oqt eval --bundle B --simulate` runs it.
//!
//! Rules shared with the runtime (`oqt-runtime`):
//! * a quantized linear reads quantized inputs (static grid of its input site,
//!   or dynamic per-row int8); an f32 tensor reads float inputs;
//! * a linear the kernels run (symmetric weights, 32-aligned groups, 8-bit
//!   activations) follows the kernels' contract exactly: integer group dots
//!   (f32 sums of integers below 2^24 are exact), the same scale products and
//!   the same partial-sum order, so the two agree bit for bit;
//! * other quantized linears multiply the dequantized operands in f32;
//! * between quantizers, the float steps use [`crate::reference_ops`], which
//!   the runtime reproduces bit for bit — one flipped rounding would otherwise
//!   cascade through every later grid.

use crate::fake_quant::{
    dynamic_rows_integer, fake_quant_dynamic_rows, fake_quant_q8_0_blocks, q8_0_blocks_integer, ste,
};
use crate::hooks::{ForwardHooks, Proj};
use crate::import::{llama_from_weights, transposed};
use crate::llama::Llama;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use oqt_core::bundle::Bundle;
use oqt_core::encoding::{ActInput, KernelChoice, TensorEncoding, choose_kernel};
use oqt_core::quant::pack::padded_len;
use oqt_core::quant::{ActGrid, ActMode, ActSite, QuantizedWeight, SiteGrids, dequantize_weight};
use oqt_core::weights::names;
use oqt_core::{CoreError, Result};

/// How one linear layer is simulated.
// Built once per layer and held for the model's lifetime: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum SimWeights {
    /// Unquantized `[in, out]`: float inputs.
    Float(Tensor<2>),
    /// Dequantized `[in, out]` grid values (weights the kernels cannot run,
    /// e.g. asymmetric grids, and weight-only recipes).
    Dequantized(Tensor<2>),
    /// The kernels' arithmetic: integer weights `[groups, group, out]` (rows
    /// padded to a multiple of 32 with zeros) and their scales `[groups, 1, out]`.
    Integer {
        w_int: Tensor<3>,
        s_w: Tensor<3>,
        k_pad: usize,
        /// Largest `|q_w|` (decides whether f32 sums stay exact).
        w_max_abs: f32,
    },
}

struct SimLinear {
    weights: SimWeights,
    /// A shared weight's output-row scales, applied after the multiply and
    /// before the bias, as the runtime does.
    row_scales: Option<Tensor<1>>,
    bias: Option<Tensor<1>>,
    input: Option<ActGrid>,
}

/// Quantize-dequantize `x` on a static grid (straight-through gradient).
pub fn fake_quant_static<const D: usize>(x: Tensor<D>, g: &ActGrid) -> Tensor<D> {
    let q = integer_on_grid(x.clone(), g).mul_scalar(g.scale);
    ste(x, q)
}

/// `q − zp` of `x` on grid `g`, as exact integer-valued floats.
fn integer_on_grid<const D: usize>(x: Tensor<D>, g: &ActGrid) -> Tensor<D> {
    let zp = g.zero_point as f32;
    x.mul_scalar(g.inv_scale())
        .round()
        .add_scalar(zp)
        .clamp(g.qmin() as f32, g.qmax() as f32)
        .sub_scalar(zp)
}

fn matmul3(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let out = w.dims()[1];
    x.reshape([b * s, d]).matmul(w.clone()).reshape([b, s, out])
}

/// The kernels' contract on Burn tensors: exact integer dots per group (f32 sums
/// of integers below 2^24 are exact), `v_g = (s_a · s_w[g]) · dot_g`, summed in
/// eight interleaved partial sums in group order and finished pairwise.
fn integer_linear(
    x_int: Tensor<2>,
    s_a: Tensor<2>,
    w_int: &Tensor<3>,
    s_w: &Tensor<3>,
    k_pad: usize,
    w_max_abs: f32,
    x_span: f32,
) -> Tensor<2> {
    let [m, k] = x_int.dims();
    let [groups, group, n] = w_int.dims();
    let device = x_int.device();
    let x_int = if k_pad > k {
        Tensor::cat(vec![x_int, Tensor::zeros([m, k_pad - k], &device)], 1)
    } else {
        x_int
    };
    // |q_a − zp| ≤ x_span (255 for 8-bit inputs): a group's dot is exact in f32 while
    // x_span · max|q_w| · group < 2^24; otherwise (int8 weights over long rows, 16-bit
    // inputs) sum in f64, still exact, rounded once as the kernels do.
    let wide = x_span * w_max_abs * group as f32 >= (1u32 << 24) as f32;
    let dot = |a: Tensor<3>, b: Tensor<3>| {
        if wide {
            a.cast(FloatDType::F64)
                .matmul(b.cast(FloatDType::F64))
                .cast(FloatDType::F32)
        } else {
            a.matmul(b)
        }
    };
    if groups == 1 {
        let acc = dot(x_int.reshape([1, m, group]), w_int.clone()).reshape([m, n]);
        let comb = s_a * s_w.clone().reshape([1, n]);
        return comb * acc;
    }
    let x3 = x_int.reshape([m, groups, group]).swap_dims(0, 1); // [G, m, group]
    let dots = dot(x3, w_int.clone()); // [G, m, n]
    // One activation scale per row, or per row and block (Q8_0 activations).
    let s_a = if s_a.dims()[1] == groups && groups > 1 {
        s_a.swap_dims(0, 1).reshape([groups, m, 1])
    } else {
        s_a.reshape([1, m, 1])
    };
    let comb = s_a * s_w.clone(); // [G, m, n]
    let v = comb * dots;
    let lanes = groups.div_ceil(8) * 8;
    let v = if lanes > groups {
        Tensor::cat(vec![v, Tensor::zeros([lanes - groups, m, n], &device)], 0)
    } else {
        v
    };
    let v = v.reshape([lanes / 8, 8, m, n]);
    let mut p = v.clone().slice([0..1, 0..8, 0..m, 0..n]);
    for i in 1..lanes / 8 {
        p = p + v.clone().slice([i..i + 1, 0..8, 0..m, 0..n]);
    }
    let lane = |j: usize| p.clone().slice([0..1, j..j + 1, 0..m, 0..n]).reshape([m, n]);
    ((lane(0) + lane(1)) + (lane(2) + lane(3))) + ((lane(4) + lane(5)) + (lane(6) + lane(7)))
}

impl SimLinear {
    fn forward(&self, x: Tensor<3>, mode: ActMode) -> Tensor<3> {
        let y = match (&self.weights, mode, &self.input) {
            (SimWeights::Float(w), ..) => matmul3(x, w),
            (
                SimWeights::Integer {
                    w_int,
                    s_w,
                    k_pad,
                    w_max_abs,
                },
                _,
                input,
            ) => {
                let [b, s, d] = x.dims();
                let x2 = x.reshape([b * s, d]);
                let (x_int, s_a, x_span) = match input {
                    Some(g) => {
                        let s_a = Tensor::full([b * s, 1], g.scale, &x2.device());
                        (integer_on_grid(x2, g), s_a, (g.qmax() - g.qmin()) as f32)
                    }
                    None if mode == ActMode::LlamaCppQ8_0 => {
                        let (x, s) = q8_0_blocks_integer(x2);
                        (x, s, 255.0)
                    }
                    None => {
                        let (x, s) = dynamic_rows_integer(x2);
                        (x, s, 255.0)
                    }
                };
                let y = integer_linear(x_int, s_a, w_int, s_w, *k_pad, *w_max_abs, x_span);
                let n = y.dims()[1];
                y.reshape([b, s, n])
            }
            (SimWeights::Dequantized(w), ActMode::Static, Some(g)) => matmul3(fake_quant_static(x, g), w),
            (SimWeights::Dequantized(w), ActMode::Dynamic, _) => matmul3(fake_quant_dynamic_rows(x), w),
            (SimWeights::Dequantized(w), ActMode::LlamaCppQ8_0, _) => matmul3(fake_quant_q8_0_blocks(x), w),
            (SimWeights::Dequantized(w), ..) => matmul3(x, w),
        };
        let y = match &self.row_scales {
            Some(s) => y * s.clone().unsqueeze::<3>(),
            None => y,
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<3>(),
            None => y,
        }
    }
}

/// One quantized linear layer as the simulation computes it: `x` `[rows, in]`
/// → `[rows, out]` (for checking the simulation against the kernels).
pub fn simulate_linear(qw: &QuantizedWeight, mode: ActMode, input: Option<ActGrid>, x: Tensor<2>) -> Tensor<2> {
    let l = SimLinear {
        weights: sim_weights(qw, mode, input, &x.device()),
        row_scales: None,
        bias: None,
        input,
    };
    let [m, k] = x.dims();
    let y = l.forward(x.reshape([1, m, k]), mode);
    let n = y.dims()[2];
    y.reshape([m, n])
}

/// The hooks that turn a float [`Llama`] into the bundle's quantized model.
pub struct QuantSim {
    mode: ActMode,
    grids: Option<SiteGrids>,
    layers: Vec<Vec<SimLinear>>,
    head: SimLinear,
}

impl QuantSim {
    /// Read the simulation of `bundle`; the returned [`Llama`] holds the
    /// dequantized weights (embedding and norms as the runtime uses them).
    pub fn from_bundle(bundle: &Bundle, device: &Device) -> Result<(Llama, Self)> {
        let m = &bundle.manifest;
        let cfg = &m.config;
        let mode = m.deployment.activations;
        if m.deployment.kv_cache.is_some() {
            return Err(CoreError::Unsupported {
                path: bundle.path.clone(),
                what: "quantization",
                detail: "a quantized KV cache is not simulated yet".into(),
            });
        }
        let grids = bundle.site_grids()?;
        let bias = |name: &str| -> Result<Option<Tensor<1>>> {
            if !cfg.attention_bias || !m.deployment.tensors.contains_key(name) {
                return Ok(None);
            }
            let b = bundle.f32_tensor(name)?;
            let n = b.len();
            Ok(Some(Tensor::from_data(TensorData::new(b, [n]), device)))
        };
        let linear = |name: &str, bias: Option<Tensor<1>>, input: Option<ActGrid>| -> Result<SimLinear> {
            // A shared weight multiplies as its source, then scales its outputs.
            let (name, row_scales) = match bundle.shared(name)? {
                Some((of, s)) => {
                    let n = s.len();
                    (of, Some(Tensor::from_data(TensorData::new(s, [n]), device)))
                }
                None => (name, None),
            };
            let weights = match m.deployment.tensors.get(name) {
                Some(e) if e.int_grid().is_some() => sim_weights(&bundle.quantized(name)?, mode, input, device),
                Some(e) => {
                    let shape = e.shape();
                    SimWeights::Float(transposed(&bundle.f32_tensor(name)?, shape[0], shape[1], device))
                }
                None => {
                    return Err(CoreError::Missing {
                        path: bundle.path.clone(),
                        what: "tensor",
                        name: name.into(),
                    });
                }
            };
            Ok(SimLinear {
                weights,
                row_scales,
                bias,
                input,
            })
        };
        let grid = |layer: usize, site: ActSite| grids.as_ref().map(|g| g.get(layer, site));
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut row = Vec::with_capacity(7);
            for p in Proj::PER_LAYER {
                let b = match p {
                    Proj::Q => bias(&names::layer(l, names::Q_BIAS))?,
                    Proj::K => bias(&names::layer(l, names::K_BIAS))?,
                    Proj::V => bias(&names::layer(l, names::V_BIAS))?,
                    _ => None,
                };
                row.push(linear(&p.weight_name(l), b, grid(l, p.input_site()))?);
            }
            layers.push(row);
        }
        let head_name = if cfg.tie_word_embeddings {
            names::EMBED
        } else {
            names::LM_HEAD
        };
        let head = linear(head_name, None, grid(0, ActSite::FinalIn))?;
        let llama = llama_from_weights(cfg, bundle.dequantized_weights()?, device);
        Ok((
            llama,
            Self {
                mode,
                grids,
                layers,
                head,
            },
        ))
    }
}

/// The simulation of one quantized linear: the kernels' integer contract
/// where the encoding table ([`choose_kernel`]) gives the runtime an integer
/// kernel — 16-bit static inputs included (a float GEMM would differ from the
/// runtime's in the last bits, and the next 8-bit grid turns those into
/// different roundings) — and dequantized weights in f32 otherwise.
fn sim_weights(qw: &QuantizedWeight, mode: ActMode, input: Option<ActGrid>, device: &Device) -> SimWeights {
    let group = match choose_kernel(&TensorEncoding::of_quantized(qw), ActInput::resolve(mode, input)) {
        KernelChoice::Int8Input { group, .. } | KernelChoice::Int16Input { group } => group,
        KernelChoice::Dequantized | KernelChoice::Float => {
            return SimWeights::Dequantized(transposed(&dequantize_weight(qw), qw.rows, qw.cols, device));
        }
    };
    let k_pad = padded_len(qw.cols);
    let groups = k_pad / group;
    let n = qw.rows;
    // [G, group, n]: w_int[g][c][r] = q[r, g·group + c] (zero past cols).
    let mut w = vec![0f32; k_pad * n];
    for r in 0..n {
        for c in 0..qw.cols {
            w[c * n + r] = qw.q[r * qw.cols + c] as f32;
        }
    }
    let mut s = vec![0f32; groups * n];
    for r in 0..n {
        for g in 0..groups {
            s[g * n + r] = qw.scales[r * groups + g];
        }
    }
    SimWeights::Integer {
        w_int: Tensor::from_data(TensorData::new(w, [groups, group, n]), device),
        s_w: Tensor::from_data(TensorData::new(s, [groups, 1, n]), device),
        k_pad,
        w_max_abs: qw.q.iter().map(|&v| (v as i32).unsigned_abs()).max().unwrap_or(0) as f32,
    }
}

impl ForwardHooks for QuantSim {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, _float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let l = match proj {
            Proj::Head => &self.head,
            p => &self.layers[layer][Proj::PER_LAYER.iter().position(|&q| q == p).expect("layer projection")],
        };
        l.forward(x, self.mode)
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        match &self.grids {
            Some(g) => fake_quant_static(x, &g.get(layer, site)),
            None => x,
        }
    }

    fn reference_arithmetic(&self) -> bool {
        true
    }

    fn probs(&self, layer: usize, p: Tensor<4>) -> Tensor<4> {
        match &self.grids {
            Some(g) => fake_quant_static(p, &g.get(layer, ActSite::Probs)),
            None => p,
        }
    }
}

/// A float model together with the hooks that quantize it: scores like any model.
pub struct SimulatedModel {
    pub llama: Llama,
    pub sim: QuantSim,
}

impl SimulatedModel {
    pub fn from_bundle(bundle: &Bundle, device: &Device) -> Result<Self> {
        let (llama, sim) = QuantSim::from_bundle(bundle, device)?;
        Ok(Self { llama, sim })
    }
}
