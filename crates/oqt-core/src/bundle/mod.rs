//! oqt's deployment artifact: one safetensors file (any safetensors tool can
//! open it) holding packed integer weights, scales and zero points, float
//! tensors, and — in the metadata key `oqt.manifest` — a versioned JSON
//! manifest: model config, tokenizer, per-tensor quantization spec, the recipe
//! and inputs that produced it (with hashes) and the evaluation figures
//! measured when it was made. Written atomically; memory-mapped when read.
//!
//! Tensor naming: a quantized weight `NAME` is stored as `NAME.qweight`
//! (int4: U8, two values per byte in the kernels' block layout, rows padded to
//! 32 columns; int8: I8, padded the same way), `NAME.scales` (F32, one per
//! row and group) and, for asymmetric grids, `NAME.zero_points` (I32). Float
//! tensors keep their canonical names.

mod read;
mod write;

pub use read::{Bundle, BundleTensor};
pub use write::BundleWriter;

use crate::config::LlamaConfig;
use crate::quant::{Recipe, WeightSpec};
use crate::tokenizer::StoredTokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The manifest version this oqt writes and the newest it reads.
pub const BUNDLE_FORMAT_VERSION: u32 = 1;
pub const MANIFEST_KEY: &str = "oqt.manifest";

/// How one tensor is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TensorEntry {
    /// Float32, canonical shape.
    F32 { shape: Vec<usize> },
    /// Integer weights `[rows, cols]` on `spec`'s grid, `group` columns per scale.
    Quantized {
        rows: usize,
        cols: usize,
        group: usize,
        spec: WeightSpec,
    },
}

/// A file that went into making the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    /// "model", "calibration", …
    pub role: String,
    pub path: String,
    pub sha256: String,
}

/// A figure measured when the bundle was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub dataset: String,
    pub ctx: usize,
    pub chunks: usize,
    pub perplexity: f64,
    /// Which engine measured it ("runtime", "burn-fake-quant", …).
    pub engine: String,
}

impl Manifest {
    /// A manifest for `model` with no tensors, recipe or records yet.
    pub fn for_model(model: &crate::LoadedModel, created_by: &str) -> crate::Result<Self> {
        Ok(Self {
            format_version: BUNDLE_FORMAT_VERSION,
            created_by: created_by.into(),
            model_name: model.name.clone(),
            config: model.config.clone(),
            tokenizer: model.tokenizer.to_stored()?,
            recipe: None,
            method: None,
            tensors: BTreeMap::new(),
            inputs: Vec::new(),
            evaluation: Vec::new(),
            act_grids: BTreeMap::new(),
            training: None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    pub model_name: String,
    pub config: LlamaConfig,
    pub tokenizer: StoredTokenizer,
    pub recipe: Option<Recipe>,
    /// The method that produced the weights ("rtn", "mobilequant", …).
    pub method: Option<String>,
    pub tensors: BTreeMap<String, TensorEntry>,
    #[serde(default)]
    pub inputs: Vec<InputRecord>,
    #[serde(default)]
    pub evaluation: Vec<EvalRecord>,
    /// Static activation grids by site key (`embed`, `layers.3.attn_in`, …;
    /// see [`crate::quant::sites`]); empty unless activations are static.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub act_grids: BTreeMap<String, crate::quant::ActGrid>,
    /// How the weights were trained (QAT runs: method, options, steps, held-out curve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
}
