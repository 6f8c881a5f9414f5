//! oqt-export: what oqt made, in the formats other engines load — GGUF for
//! llama.cpp ([`gguf`]) and Hugging Face directories ([`hf`]). The exporters
//! read an [`ExportSource`]: a bundle's integer weights as they are, or a float
//! model's weights.

pub mod gguf;
pub mod hf;

use oqt_core::bundle::{Bundle, TensorEntry};
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
    /// The bundle's recipe spec, when there is one.
    pub recipe: Option<oqt_core::quant::Recipe>,
}

impl ExportSource {
    pub fn from_bundle(bundle: &Bundle) -> Result<Self> {
        let m = &bundle.manifest;
        let mut tensors = BTreeMap::new();
        for (name, entry) in &m.tensors {
            let t = match entry {
                TensorEntry::F32 { shape } => {
                    SourceTensor::Float(TensorF32::new(shape.clone(), bundle.f32_tensor(name)?))
                }
                TensorEntry::Quantized { .. } => SourceTensor::Quantized(bundle.quantized(name)?),
            };
            tensors.insert(name.clone(), t);
        }
        Ok(Self {
            path: bundle.path.clone(),
            name: m.model_name.clone(),
            config: m.config.clone(),
            tokenizer: bundle.tokenizer()?,
            tensors,
            recipe: m.recipe.clone(),
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
            recipe: None,
        }
    }
}

/// Row order of llama.cpp's Q/K layout: `order[gguf_row] = hf_row` (its converter
/// puts each head's rotary pairs on adjacent rows).
pub fn rotary_gguf_order(rows: usize, n_heads: usize) -> Vec<usize> {
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut order = vec![0; rows];
    for h in 0..n_heads {
        for a in 0..2 {
            for b in 0..half {
                order[h * hd + b * 2 + a] = h * hd + a * half + b;
            }
        }
    }
    order
}

/// `t` with its rows reordered: row `i` of the result is row `order[i]` of `t`.
pub fn reorder_rows(t: &SourceTensor, order: &[usize]) -> SourceTensor {
    fn gather<T: Copy>(v: &[T], per_row: usize, order: &[usize]) -> Vec<T> {
        order
            .iter()
            .flat_map(|&r| v[r * per_row..(r + 1) * per_row].iter().copied())
            .collect()
    }
    match t {
        SourceTensor::Float(f) => {
            let cols = f.data.len() / f.shape[0];
            SourceTensor::Float(TensorF32::new(f.shape.clone(), gather(&f.data, cols, order)))
        }
        SourceTensor::Quantized(q) => {
            let per_row = q.scales.len() / q.rows;
            SourceTensor::Quantized(QuantizedWeight {
                q: gather(&q.q, q.cols, order),
                scales: gather(&q.scales, per_row, order),
                zero_points: q.zero_points.as_ref().map(|z| gather(z, per_row, order)),
                ..q.clone()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::weights::permute_rotary_rows;

    #[test]
    fn rotary_order_is_the_converters_permutation() {
        let t = TensorF32::new(vec![16, 3], (0..48).map(|v| v as f32).collect());
        let ours = reorder_rows(&SourceTensor::Float(t.clone()), &rotary_gguf_order(16, 2));
        let SourceTensor::Float(ours) = ours else {
            unreachable!()
        };
        assert_eq!(ours, permute_rotary_rows(&t, 2));
    }
}
