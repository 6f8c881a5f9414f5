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
            Some(w) => {
                let x = self.quantize(proj.input_site(), x);
                let [b, s, d] = x.dims();
                let out = w.dims()[1];
                x.reshape([b * s, d]).matmul(w.clone()).reshape([b, s, out])
            }
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
    let model: Llama = oqt_model::llama_from_weights(cfg, weights.clone(), &device);
    let grids = if spec.activations.mode == ActMode::Static {
        calibrate(&model, spec, calibration, windows, |_, _| {})?
    } else {
        BTreeMap::new()
    };
    let tokens: Vec<Tensor<2, burn::tensor::Int>> = windows.iter().map(|w| model.tokens_tensor(w)).collect();
    let reference: Vec<Tensor<3>> = tokens
        .iter()
        .map(|t| model.forward_residual_with(t.clone(), None, &oqt_model::NoHooks))
        .collect();
    let norm: f64 = reference.iter().map(|r| sum_sq(r.clone())).sum();
    let mut out = Vec::with_capacity(cfg.num_layers);
    for layer in 0..cfg.num_layers {
        let mut w = std::collections::HashMap::new();
        for p in Proj::PER_LAYER {
            let name = p.weight_name(layer);
            let t = weights.get(&name).expect("validated");
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let qw = quantize_weight(&t.data, rows, cols, &spec.weights_for(&name), 1.0);
            let deq = Tensor::<2>::from_data(TensorData::new(dequantize_weight(&qw), [rows, cols]), &device);
            w.insert(p, deq.transpose());
        }
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
