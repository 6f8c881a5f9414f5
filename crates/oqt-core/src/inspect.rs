//! A summary of a model file for `oqt inspect`, read from headers only
//! (tensors are not decoded).

use crate::config::LlamaConfig;
use crate::error::{CoreError, Result};
use crate::gguf::GgufFile;
use crate::load::{ModelFormat, detect_format, safetensors_files};
use crate::tokenizer::Tokenizer;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct TypeStats {
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct TokenizerSummary {
    pub kind: String,
    pub vocab_size: usize,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub add_bos: bool,
    pub has_chat_template: bool,
}

#[derive(Debug, Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub format: ModelFormat,
    pub file_bytes: u64,
    pub config: LlamaConfig,
    pub parameters: u64,
    pub bits_per_weight: f64,
    pub types: BTreeMap<String, TypeStats>,
    pub tokenizer: TokenizerSummary,
    /// GGUF metadata (arrays summarized), or config.json for HF directories.
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorSummary>,
}

fn tokenizer_summary(t: &Tokenizer) -> TokenizerSummary {
    let name = |id: Option<u32>| id.and_then(|i| t.token_str(i).map(|s| format!("{s} ({i})")));
    TokenizerSummary {
        kind: t.kind.clone(),
        vocab_size: t.vocab_size(),
        bos: name(t.bos_id),
        eos: name(t.eos_id),
        add_bos: t.add_bos,
        has_chat_template: t.chat_template.is_some(),
    }
}

pub fn inspect_model(path: &Path) -> Result<ModelSummary> {
    let file_bytes = dir_or_file_size(path);
    let (config, tokenizer, metadata, tensors) = match detect_format(path)? {
        ModelFormat::Bundle => {
            let b = crate::bundle::Bundle::open(path)?;
            let tensors = b
                .manifest
                .deployment
                .tensors
                .iter()
                .map(|(name, e)| TensorSummary {
                    name: name.clone(),
                    dtype: e.describe(),
                    shape: e.shape(),
                    bytes: e.stored_bytes() as u64,
                })
                .collect();
            (b.manifest.config.clone(), b.tokenizer()?, BTreeMap::new(), tensors)
        }
        ModelFormat::Gguf => {
            let g = GgufFile::open(path)?;
            let config = LlamaConfig::from_gguf(&g)?;
            let tok = Tokenizer::from_gguf(&g)?;
            let metadata = g
                .metadata_order
                .iter()
                .map(|k| (k.clone(), g.metadata[k].summary()))
                .collect();
            let tensors = g
                .tensors
                .iter()
                .map(|t| TensorSummary {
                    name: t.name.clone(),
                    dtype: t.ty.name().into(),
                    shape: t.shape(),
                    bytes: t.n_bytes() as u64,
                })
                .collect();
            (config, tok, metadata, tensors)
        }
        ModelFormat::Hf => {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
            let config = LlamaConfig::from_hf_json(&cfg_path, &text)?;
            let tok = Tokenizer::from_hf_dir(path)?;
            let mut tensors = Vec::new();
            for file in safetensors_files(path)? {
                let f = std::fs::File::open(&file).map_err(|e| CoreError::io(&file, e))?;
                // SAFETY: read-only map of a file not modified while read.
                let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| CoreError::io(&file, e))?;
                let (_, header) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| CoreError::Malformed {
                    path: file.clone(),
                    format: "safetensors",
                    reason: e.to_string(),
                })?;
                for (name, info) in header.tensors() {
                    tensors.push(TensorSummary {
                        name: name.clone(),
                        dtype: format!("{:?}", info.dtype),
                        shape: info.shape.clone(),
                        bytes: (info.data_offsets.1 - info.data_offsets.0) as u64,
                    });
                }
            }
            tensors.sort_by(|a, b| a.name.cmp(&b.name));
            let mut metadata = BTreeMap::new();
            if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(&text) {
                for (k, v) in m {
                    metadata.insert(k, v.to_string());
                }
            }
            (config, tok, metadata, tensors)
        }
    };
    let mut types: BTreeMap<String, TypeStats> = BTreeMap::new();
    let mut parameters = 0u64;
    let mut weight_bytes = 0u64;
    for t in &tensors {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        let e = types.entry(t.dtype.clone()).or_insert(TypeStats {
            tensors: 0,
            elements: 0,
            bytes: 0,
        });
        e.tensors += 1;
        e.elements += n;
        e.bytes += t.bytes;
        parameters += n;
        weight_bytes += t.bytes;
    }
    Ok(ModelSummary {
        path: path.display().to_string(),
        format: detect_format(path)?,
        file_bytes,
        config,
        parameters,
        bits_per_weight: weight_bytes as f64 * 8.0 / parameters.max(1) as f64,
        types,
        tokenizer: tokenizer_summary(&tokenizer),
        metadata,
        tensors,
    })
}

fn dir_or_file_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}
