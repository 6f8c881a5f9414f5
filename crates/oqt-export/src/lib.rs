//! oqt-export: what oqt made, in the formats other engines load — GGUF for
//! llama.cpp ([`gguf`]) and Hugging Face directories ([`hf`]). The exporters
//! read an [`ExportSource`]: a bundle's integer weights as they are, or a float
//! model's weights.

pub mod gguf;
pub mod hf;

use oqt_core::bundle::Bundle;
use oqt_core::quant::{QuantizedWeight, dequantize_weight};
use oqt_core::{LlamaConfig, LoadedModel, Result, TensorF32, Tokenizer};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One tensor as the source holds it (canonical layout: Q/K rows in HF order).
#[derive(Debug, Clone)]
pub enum SourceTensor {
    Float(TensorF32),
    Quantized(QuantizedWeight),
}

impl SourceTensor {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Float(t) => t.shape.clone(),
            Self::Quantized(q) => vec![q.rows, q.cols],
        }
    }

    /// The values the model computes with.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::Float(t) => t.data.clone(),
            Self::Quantized(q) => dequantize_weight(q),
        }
    }
}

/// A model to export: a bundle (its integer weights untouched) or a float model.
pub struct ExportSource {
    pub path: PathBuf,
    pub name: String,
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    /// Canonical names.
    pub tensors: BTreeMap<String, SourceTensor>,
    /// How the bundle's deployment quantizes activations (`None` for a float model).
    pub activations: Option<oqt_core::quant::ActMode>,
    /// Palettized (LUT) tensors, exported as their f16 table values: no GGUF
    /// type oqt writes holds a palette.
    pub palettized: Vec<String>,
}

impl ExportSource {
    pub fn from_bundle(bundle: &Bundle) -> Result<Self> {
        let m = &bundle.manifest;
        let mut tensors = BTreeMap::new();
        let mut palettized = Vec::new();
        for (name, encoding) in &m.deployment.tensors {
            let t = match encoding.int_grid() {
                _ if matches!(encoding, oqt_core::encoding::TensorEncoding::Lut { .. }) => {
                    palettized.push(name.clone());
                    SourceTensor::Float(TensorF32::new(encoding.shape(), bundle.palettized(name)?.dequantize()))
                }
                None => SourceTensor::Float(TensorF32::new(encoding.shape(), bundle.f32_tensor(name)?)),
                Some(_) => SourceTensor::Quantized(bundle.quantized(name)?),
            };
            tensors.insert(name.clone(), t);
        }
        Ok(Self {
            path: bundle.path.clone(),
            name: m.model_name.clone(),
            config: m.config.clone(),
            tokenizer: bundle.tokenizer()?,
            tensors,
            activations: Some(m.deployment.activations),
            palettized,
        })
    }

    pub fn from_model(model: LoadedModel) -> Self {
        let mut weights = model.weights;
        let names: Vec<String> = weights.names().cloned().collect();
        let tensors = names
            .into_iter()
            .map(|n| {
                let t = weights.take(&n).expect("listed tensor");
                (n, SourceTensor::Float(t))
            })
            .collect();
        Self {
            path: model.path,
            name: model.name,
            config: model.config,
            tokenizer: model.tokenizer,
            tensors,
            activations: None,
            palettized: Vec::new(),
        }
    }
}

/// `t` with its rows reordered: row `i` of the result is row `order[i]` of `t`.
pub fn reorder_rows(t: &SourceTensor, order: &[usize]) -> SourceTensor {
    match t {
        SourceTensor::Float(f) => SourceTensor::Float(f.reorder_rows(order)),
        SourceTensor::Quantized(q) => SourceTensor::Quantized(q.reorder_rows(order)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::quant::{Granularity, WeightSpec, quantize_weight};
    use oqt_core::weights::{permute_rotary_rows, rotary_gguf_order};

    #[test]
    fn quantized_rows_move_with_their_scales_like_float_rows() {
        let w = TensorF32::new(vec![16, 32], (0..512).map(|v| (v as f32 * 0.37).sin()).collect());
        let spec = WeightSpec::new(4, Granularity::PerGroup(32), true);
        let qw = quantize_weight(&w.data, 16, 32, &spec, 1.0);
        let order = rotary_gguf_order(16, 2);
        let SourceTensor::Quantized(moved) = reorder_rows(&SourceTensor::Quantized(qw.clone()), &order) else {
            unreachable!()
        };
        let deq = TensorF32::new(vec![16, 32], dequantize_weight(&qw));
        assert_eq!(dequantize_weight(&moved), permute_rotary_rows(&deq, 2).data);
    }
}
