//! Per-layer sensitivity: quantize one decoder layer at a time (its linears on
//! the recipe's weight grid, its activation sites on the recipe's activation
//! quantization), everything else float, and measure how far the last decoder
//! layer's output moves on calibration windows. Layers with large errors are
//! the ones to keep at higher precision — the first step toward automatic
//! mixed precision.

use crate::stats::calibrate::calibrate;
use burn::tensor::{Tensor, TensorData};
use oqt_core::quant::{ActGrid, ActMode, ActSite, CalibrationSpec, QuantSpec, dequantize_weight, quantize_weight};
use oqt_core::weights::ModelWeights;
use oqt_core::{LlamaConfig, Result};
use oqt_model::fake_quant::{fake_quant_dynamic_rows, fake_quant_q8_0_blocks};
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use oqt_model::quant_sim::fake_quant_static;
use serde::Serialize;
use std::collections::BTreeMap;

/// One layer's result.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSensitivity {
    pub layer: usize,
    /// `‖y_q − y‖² / ‖y‖²` of the last decoder layer's output over the windows.
    pub relative_mse: f64,
    /// The same with only the layer's weights quantized (activations float).
    pub weights_only_relative_mse: f64,
}

struct OneLayer<'a> {
    layer: usize,
    /// Dequantized `[in, out]` weights of the layer's linears.
    weights: std::collections::HashMap<Proj, Tensor<2>>,
    spec: &'a QuantSpec,
    grids: &'a BTreeMap<String, ActGrid>,
    quantize_acts: bool,
}

impl OneLayer<'_> {
    fn quantize(&self, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        if !self.quantize_acts {
            return x;
        }
        match self.spec.activations.mode {
            ActMode::Dynamic => fake_quant_dynamic_rows(x),
            ActMode::LlamaCppQ8_0 => fake_quant_q8_0_blocks(x),
            ActMode::Static => {
                if site == ActSite::Probs {
                    return x;
                }
                match self.grids.get(&site.key(self.layer)) {
                    Some(g) => fake_quant_static(x, g),
                    None => x,
                }
            }
            ActMode::None => x,
        }
    }
}

impl ForwardHooks for OneLayer<'_> {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        match self.weights.get(&proj).filter(|_| layer == self.layer) {
            Some(w) => project(self.quantize(proj.input_site(), x), w),
            None => float(x),
        }
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        if layer == self.layer && site != ActSite::Embed {
            self.quantize(site, x)
        } else {
            x
        }
    }

    fn probs(&self, layer: usize, p: Tensor<4>) -> Tensor<4> {
        if layer == self.layer && self.quantize_acts && self.spec.activations.mode == ActMode::Static {
            fake_quant_static(p, &ActGrid::probabilities(ActSite::Probs.bits(self.spec)))
        } else {
            p
        }
    }
}

fn sum_sq(t: Tensor<3>) -> f64 {
    t.powi_scalar(2)
        .sum()
        .into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .expect("f64 scalar")[0]
}

/// Linears `projs` of `layer` on `spec`'s grid (round to nearest), dequantized
/// and transposed to `[in, out]` for [`project`].
fn dequantized_linears(
    weights: &ModelWeights,
    spec: &QuantSpec,
    layer: usize,
    projs: &[Proj],
    device: &burn::tensor::Device,
) -> std::collections::HashMap<Proj, Tensor<2>> {
    projs
        .iter()
        .map(|&p| {
            let name = p.weight_name(layer);
            let t = weights.get(&name).expect("validated");
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let qw = quantize_weight(&t.data, rows, cols, &spec.weights_for(&name), 1.0);
            let deq = Tensor::<2>::from_data(TensorData::new(dequantize_weight(&qw), [rows, cols]), device);
            (p, deq.transpose())
        })
        .collect()
}

/// `x` `[b, s, in]` times `w` `[in, out]`.
fn project(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let out = w.dims()[1];
    x.reshape([b * s, d]).matmul(w.clone()).reshape([b, s, out])
}

/// The float model of `weights` and, for static recipes, its calibrated grids.
fn float_model_and_grids(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    spec: &QuantSpec,
    calibration: &CalibrationSpec,
    windows: &[Vec<u32>],
) -> Result<(Llama, BTreeMap<String, ActGrid>)> {
    let model: Llama = oqt_model::llama_from_weights(cfg, weights.clone(), &burn::tensor::Device::flex());
    let grids = if spec.activations.mode == ActMode::Static {
        calibrate(&model, spec, calibration, windows, |_, _| {})?
    } else {
        BTreeMap::new()
    };
    Ok((model, grids))
}

/// Sensitivity of every decoder layer of `weights` under `spec`;
/// `progress(done, total)` after each layer.
pub fn layer_sensitivity(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    spec: &QuantSpec,
    calibration: &CalibrationSpec,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<LayerSensitivity>> {
    let device = burn::tensor::Device::flex();
    let (model, grids) = float_model_and_grids(cfg, weights, spec, calibration, windows)?;
    let tokens: Vec<Tensor<2, burn::tensor::Int>> = windows.iter().map(|w| model.tokens_tensor(w)).collect();
    let reference: Vec<Tensor<3>> = tokens
        .iter()
        .map(|t| model.forward_residual_with(t.clone(), None, &oqt_model::NoHooks))
        .collect();
    let norm: f64 = reference.iter().map(|r| sum_sq(r.clone())).sum();
    let mut out = Vec::with_capacity(cfg.num_layers);
    for layer in 0..cfg.num_layers {
        let w = dequantized_linears(weights, spec, layer, &Proj::PER_LAYER, &device);
        let mut errs = [0f64; 2];
        for (k, quantize_acts) in [true, false].into_iter().enumerate() {
            let hooks = OneLayer {
                layer,
                weights: w.clone(),
                spec,
                grids: &grids,
                quantize_acts,
            };
            for (t, r) in tokens.iter().zip(&reference) {
                let y = model.forward_residual_with(t.clone(), None, &hooks);
                errs[k] += sum_sq(y - r.clone());
            }
        }
        out.push(LayerSensitivity {
            layer,
            relative_mse: errs[0] / norm,
            weights_only_relative_mse: errs[1] / norm,
        });
        progress(layer + 1, cfg.num_layers);
    }
    Ok(out)
}

/// The linears of a decoder layer that read one activation site: the unit
/// mixed precision chooses a precision for (one weight grid and one input
/// width per unit, so fused projections keep one kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearUnit {
    Qkv,
    O,
    GateUp,
    Down,
}

impl LinearUnit {
    pub const ALL: [LinearUnit; 4] = [Self::Qkv, Self::O, Self::GateUp, Self::Down];

    pub fn projs(self) -> &'static [Proj] {
        match self {
            Self::Qkv => &[Proj::Q, Proj::K, Proj::V],
            Self::O => &[Proj::O],
            Self::GateUp => &[Proj::Gate, Proj::Up],
            Self::Down => &[Proj::Down],
        }
    }

    /// The `act16_sites` name of the unit's input.
    pub fn input_name(self) -> &'static str {
        match self {
            Self::Qkv => "qkv_input",
            Self::O => "o_proj_input",
            Self::GateUp => "gate_up_input",
            Self::Down => "down_proj_input",
        }
    }

    pub fn input_site(self) -> ActSite {
        self.projs()[0].input_site()
    }

    /// Short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Qkv => "qkv",
            Self::O => "o",
            Self::GateUp => "gate_up",
            Self::Down => "down",
        }
    }
}

/// One unit's sensitivity: the relative error `‖y_q − y‖² / ‖y‖²` of the
/// final-normed hidden state (what the head reads) with only this unit
/// quantized and everything else float.
#[derive(Debug, Clone, Serialize)]
pub struct UnitSensitivity {
    pub layer: usize,
    pub unit: LinearUnit,
    /// The unit's weights on the recipe's grid (round to nearest), input float.
    pub weights_error: f64,
    /// The unit's input on its calibrated 8-bit static grid, weights float
    /// (static recipes whose input is 8-bit; `None` otherwise).
    pub input_error: Option<f64>,
}

/// Quantizes one unit of one layer: its input on `grid`, its weights replaced by `weights`.
struct OneUnit {
    layer: usize,
    unit: LinearUnit,
    weights: Option<std::collections::HashMap<Proj, Tensor<2>>>,
    grid: Option<ActGrid>,
}

impl ForwardHooks for OneUnit {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        if layer != self.layer || !self.unit.projs().contains(&proj) {
            return float(x);
        }
        let x = match &self.grid {
            Some(g) => fake_quant_static(x, g),
            None => x,
        };
        match self.weights.as_ref().and_then(|w| w.get(&proj)) {
            Some(w) => project(x, w),
            None => float(x),
        }
    }
}

/// Sensitivity of every (decoder layer, [`LinearUnit`]) of `weights` under
/// `spec`: each unit's weights alone on the recipe's grid, and (static recipes)
/// its input alone on its calibrated 8-bit grid. The wide alternatives (8-bit
/// per-channel weights, 16-bit inputs) are taken as error-free: their errors
/// are 2⁻⁸ and 2⁻¹⁶ of these in mean square. Runs each measurement from the
/// unit's layer on (the float inputs of every layer are kept), so a model of
/// L layers costs about 4·L·(1 + static) half-model forwards per window.
/// `progress(done, total)` after each unit.
pub fn unit_sensitivity(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    spec: &QuantSpec,
    calibration: &CalibrationSpec,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<UnitSensitivity>> {
    let device = burn::tensor::Device::flex();
    let is_static = spec.activations.mode == ActMode::Static;
    let (model, grids) = float_model_and_grids(cfg, weights, spec, calibration, windows)?;
    // Every layer's float input and the float reference, per window.
    let mut inputs: Vec<Vec<Tensor<3>>> = Vec::with_capacity(windows.len());
    let mut reference = Vec::with_capacity(windows.len());
    let mut positions = Vec::with_capacity(windows.len());
    for w in windows {
        let pos = model.positions(w.len(), &device);
        let mut x = model.embed_with(model.tokens_tensor(w), &oqt_model::NoHooks);
        let mut per_layer = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            per_layer.push(x.clone());
            x = model.layer_with(l, x, &pos, &oqt_model::NoHooks);
        }
        reference.push(model.final_norm(x));
        inputs.push(per_layer);
        positions.push(pos);
    }
    let norm: f64 = reference.iter().map(|r| sum_sq(r.clone())).sum();
    let error_of = |hooks: &OneUnit| -> f64 {
        let mut err = 0.0;
        for ((per_layer, pos), r) in inputs.iter().zip(&positions).zip(&reference) {
            let mut x = per_layer[hooks.layer].clone();
            for l in hooks.layer..cfg.num_layers {
                x = model.layer_with(l, x, pos, hooks);
            }
            err += sum_sq(model.final_norm(x) - r.clone());
        }
        err / norm
    };
    let total = cfg.num_layers * LinearUnit::ALL.len();
    let mut out = Vec::with_capacity(total);
    for layer in 0..cfg.num_layers {
        for unit in LinearUnit::ALL {
            let weights_error = error_of(&OneUnit {
                layer,
                unit,
                weights: Some(dequantized_linears(weights, spec, layer, unit.projs(), &device)),
                grid: None,
            });
            let grid = (is_static && unit.input_site().bits_at(layer, spec) == 8)
                .then(|| grids.get(&unit.input_site().key(layer)).copied())
                .flatten();
            let input_error = grid.map(|g| {
                error_of(&OneUnit {
                    layer,
                    unit,
                    weights: None,
                    grid: Some(g),
                })
            });
            out.push(UnitSensitivity {
                layer,
                unit,
                weights_error,
                input_error,
            });
            progress(out.len(), total);
        }
    }
    Ok(out)
}
