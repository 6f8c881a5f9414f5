//! oqt's deployment artifact: one safetensors file (any safetensors tool can
//! open it) holding packed integer weights, scales and zero points, float
//! tensors, and — in the metadata key `oqt.manifest` — a versioned JSON
//! manifest in two parts: the resolved [`Deployment`] (per tensor its
//! encoding, per activation site its grid: all the runtime, the simulation and
//! the exporters read) and the [`Provenance`] (the recipe, method and training
//! that produced it, never parsed by the runtime), beside the model config,
//! tokenizer, input hashes and the evaluation figures measured when it was
//! made. Written atomically; memory-mapped when read.
//!
//! How each tensor is stored is its encoding's row in [`crate::encoding`]:
//! a quantized weight `NAME` is `NAME.qweight` (int4: U8, two values per byte
//! in the kernels' block layout, rows padded to 32 columns; int8: I8, padded
//! the same way), `NAME.scales` (F32, one per row and group) and, for
//! asymmetric grids, `NAME.zero_points` (I32). Float tensors keep their
//! canonical names.

mod read;
mod v1;
mod write;

pub use read::{Bundle, BundleTensor};
pub use write::BundleWriter;

use crate::config::LlamaConfig;
use crate::encoding::TensorEncoding;
use crate::quant::{ActGrid, ActMode, KvSpec, Recipe, SiteGrids};
use crate::tokenizer::StoredTokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The newest manifest version this oqt reads. Version 1 (the recipe
/// embedded, read by every consumer) is upgraded on open; version 3 adds the
/// `sparse` encoding, version 4 the `lut` encoding, version 5 the `shared`
/// encoding. A bundle is written as the
/// oldest version holding its encodings, so an older oqt reads every bundle
/// it can and says "upgrade" for the others.
pub const BUNDLE_FORMAT_VERSION: u32 = SHARED_FORMAT_VERSION;
/// The version of bundles with a `shared` tensor.
pub const SHARED_FORMAT_VERSION: u32 = 5;
/// The version of bundles with a `lut` tensor.
pub const LUT_FORMAT_VERSION: u32 = 4;
/// The version of bundles with a `sparse` tensor (and no `lut` one).
pub const SPARSE_FORMAT_VERSION: u32 = 3;
/// The version of bundles without sparse or LUT tensors.
pub const DENSE_FORMAT_VERSION: u32 = 2;
pub const MANIFEST_KEY: &str = "oqt.manifest";

/// A file that went into making the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    /// "model", "calibration", …
    pub role: String,
    pub path: String,
    pub sha256: String,
}

impl InputRecord {
    /// The record of the file at `path` in `role`, with its hash.
    pub fn of_file(role: &str, path: &std::path::Path) -> crate::Result<Self> {
        Ok(Self {
            role: role.into(),
            path: path.display().to_string(),
            sha256: crate::datasets::sha256_file(path)?,
        })
    }
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

/// What runs: every decision the runtime, the simulation and the exporters
/// need, resolved when the bundle was written. They read this and nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// How the inputs of linear layers are quantized: the graph's activation
    /// scheme (`none`, `dynamic`, `static`, `llama.cpp-q8_0`).
    pub activations: ActMode,
    /// Static graphs: the grid of every activation site, fixed softmax grids
    /// included, by site key (`embed`, `layers.3.attn_in`, … see
    /// [`crate::quant::sites`]). Empty unless `activations` is `static`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub act_grids: BTreeMap<String, ActGrid>,
    /// A quantized KV cache (not run yet: the runtime and the simulation refuse it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvSpec>,
    /// Every tensor by canonical name, with its encoding ([`crate::encoding`]).
    pub tensors: BTreeMap<String, TensorEncoding>,
}

impl Default for Deployment {
    fn default() -> Self {
        Self {
            activations: ActMode::None,
            act_grids: BTreeMap::new(),
            kv_cache: None,
            tensors: BTreeMap::new(),
        }
    }
}

/// How the bundle was made: kept for people and tools, never parsed by the
/// runtime (so a newer recipe schema never makes an older reader refuse a bundle).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The authoring recipe as it was written into the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<serde_json::Value>,
    /// The method that produced the weights ("rtn", "mobilequant", …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// How the weights were trained (QAT runs: method, options, steps, held-out curve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
    /// The mixed-precision plan a size budget chose (units, choices, gains, bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<serde_json::Value>,
    /// How the weights were pruned (method, pattern, options, per-linear report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<serde_json::Value>,
    /// Which decoder blocks were removed and why (`oqt fold`: method, scores, budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folding: Option<serde_json::Value>,
}

impl Manifest {
    /// A manifest for `model` with no tensors, recipe or records yet (float
    /// activations until [`Self::set_recipe`]).
    pub fn for_model(model: &crate::LoadedModel, created_by: &str) -> crate::Result<Self> {
        Ok(Self {
            format_version: BUNDLE_FORMAT_VERSION,
            created_by: created_by.into(),
            model_name: model.name.clone(),
            config: model.config.clone(),
            tokenizer: model.tokenizer.to_stored()?,
            deployment: Deployment::default(),
            provenance: Provenance::default(),
            inputs: Vec::new(),
            evaluation: Vec::new(),
        })
    }

    /// Record `recipe` as provenance and resolve what it deploys: the
    /// activation scheme, the KV cache and, for static graphs, every site's
    /// grid from `calibrated` (the fixed softmax grids added). Errors name a
    /// missing or mismatched site.
    pub fn set_recipe(&mut self, recipe: &Recipe, calibrated: &BTreeMap<String, ActGrid>) -> crate::Result<()> {
        let spec = &recipe.spec;
        self.deployment.activations = spec.activations.mode;
        self.deployment.kv_cache = spec.kv_cache;
        self.deployment.act_grids = if spec.activations.mode == ActMode::Static {
            SiteGrids::from_map(spec, self.config.num_layers, calibrated)
                .map_err(|reason| crate::CoreError::Other(format!("{}: {reason}", recipe.name)))?
                .to_map()
        } else {
            BTreeMap::new()
        };
        self.provenance.recipe =
            Some(serde_json::to_value(recipe).map_err(|e| crate::CoreError::Other(format!("recipe: {e}")))?);
        Ok(())
    }

    /// The authoring recipe's name, for reports.
    pub fn recipe_name(&self) -> Option<&str> {
        self.provenance.recipe.as_ref()?.get("name")?.as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub created_by: String,
    pub model_name: String,
    pub config: LlamaConfig,
    pub tokenizer: StoredTokenizer,
    pub deployment: Deployment,
    #[serde(default)]
    pub provenance: Provenance,
    #[serde(default)]
    pub inputs: Vec<InputRecord>,
    #[serde(default)]
    pub evaluation: Vec<EvalRecord>,
}
