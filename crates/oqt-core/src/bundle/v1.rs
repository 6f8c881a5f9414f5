//! Version-1 manifests (oqt before the deployment spec): the authoring recipe
//! was embedded and every consumer re-derived the deployment from it. Opening
//! one resolves its deployment here, once — the only place a bundle's recipe
//! is parsed — so everything downstream reads version 2 only.

use super::{Deployment, EvalRecord, InputRecord, Manifest, Provenance};
use crate::config::LlamaConfig;
use crate::encoding::TensorEncoding;
use crate::quant::{ActGrid, ActMode, QuantSpec, SiteGrids, WeightSpec};
use crate::tokenizer::StoredTokenizer;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum TensorEntryV1 {
    F32 {
        shape: Vec<usize>,
    },
    Quantized {
        rows: usize,
        cols: usize,
        group: usize,
        spec: WeightSpec,
    },
}

#[derive(Deserialize)]
struct ManifestV1 {
    format_version: u32,
    created_by: String,
    model_name: String,
    config: LlamaConfig,
    tokenizer: StoredTokenizer,
    recipe: Option<serde_json::Value>,
    method: Option<String>,
    tensors: BTreeMap<String, TensorEntryV1>,
    #[serde(default)]
    inputs: Vec<InputRecord>,
    #[serde(default)]
    evaluation: Vec<EvalRecord>,
    #[serde(default)]
    act_grids: BTreeMap<String, ActGrid>,
    #[serde(default)]
    training: Option<serde_json::Value>,
}

/// A version-1 manifest's JSON as a version-2 [`Manifest`]; `Err` says what is wrong.
pub(super) fn upgrade(json: &str) -> Result<Manifest, String> {
    let v1: ManifestV1 = serde_json::from_str(json).map_err(|e| format!("manifest (version 1): {e}"))?;
    let spec: Option<QuantSpec> = match v1.recipe.as_ref().and_then(|r| r.get("spec")) {
        None => None,
        Some(s) => Some(serde_json::from_value(s.clone()).map_err(|e| format!("manifest recipe.spec: {e}"))?),
    };
    let activations = spec.as_ref().map_or(ActMode::None, |s| s.activations.mode);
    let act_grids = match &spec {
        Some(s) if activations == ActMode::Static => {
            SiteGrids::from_map(s, v1.config.num_layers, &v1.act_grids)?.to_map()
        }
        _ => BTreeMap::new(),
    };
    let tensors = v1
        .tensors
        .into_iter()
        .map(|(name, e)| {
            let enc = match e {
                TensorEntryV1::F32 { shape } => TensorEncoding::F32 { shape },
                TensorEntryV1::Quantized {
                    rows,
                    cols,
                    group,
                    spec,
                } => TensorEncoding::integer(rows, cols, group, spec),
            };
            (name, enc)
        })
        .collect();
    Ok(Manifest {
        format_version: v1.format_version,
        created_by: v1.created_by,
        model_name: v1.model_name,
        config: v1.config,
        tokenizer: v1.tokenizer,
        deployment: Deployment {
            activations,
            act_grids,
            kv_cache: spec.and_then(|s| s.kv_cache),
            tensors,
        },
        provenance: Provenance {
            recipe: v1.recipe,
            method: v1.method,
            training: v1.training,
            mixed_precision: None,
            pruning: None,
            folding: None,
        },
        inputs: v1.inputs,
        evaluation: v1.evaluation,
    })
}
