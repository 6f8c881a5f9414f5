//! Load a model from disk — a GGUF file or a Hugging Face directory — into
//! float weights, config and tokenizer.

use crate::config::LlamaConfig;
use crate::error::{CoreError, Result};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::weights::{ModelWeights, TensorF32, names, unpermute_rotary_rows};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Gguf,
    Hf,
    /// An oqt bundle of float weights (a pruned model; quantized bundles are refused).
    Bundle,
}

/// A model ready for any backend: config, float weights in canonical layout, tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub name: String,
    pub config: LlamaConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// Weights pruned to a layout (from a float bundle's `sparse` encodings):
    /// quantization keeps their zeros exact and stores them in that layout.
    pub sparsity: BTreeMap<String, crate::sparse::SparseLayout>,
    /// Weights shared with another (from a bundle's `shared` encodings; their
    /// dense values are in `weights` too): quantization keeps them shared.
    pub sharing: BTreeMap<String, crate::sharing::SharedWeight>,
}

/// What kind of model `path` holds, judged by its contents.
pub fn detect_format(path: &Path) -> Result<ModelFormat> {
    if path.is_dir() {
        return Ok(ModelFormat::Hf);
    }
    let mut magic = [0u8; 4];
    let f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    use std::io::Read;
    let n = f.take(4).read(&mut magic).map_err(|e| CoreError::io(path, e))?;
    if n == 4 && &magic == crate::gguf::GGUF_MAGIC {
        Ok(ModelFormat::Gguf)
    } else if looks_like_safetensors(path) {
        Ok(ModelFormat::Bundle)
    } else {
        Err(CoreError::Unsupported {
            path: path.into(),
            what: "model file",
            detail:
                "not a GGUF file (bad magic), not an oqt bundle and not a directory; pass a .gguf file, a float .oqt bundle or a Hugging Face model directory"
                    .into(),
        })
    }
}

pub fn load_model(path: &Path) -> Result<LoadedModel> {
    match detect_format(path)? {
        ModelFormat::Gguf => load_gguf(path),
        ModelFormat::Hf => load_hf_dir(path),
        ModelFormat::Bundle => load_float_bundle(path),
    }
}

/// A safetensors header: a little-endian length, then `{`.
fn looks_like_safetensors(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_exact(&mut head))
        .is_ok()
        && head[8] == b'{'
}

/// A float bundle (what `oqt prune` writes) as a model to compress further.
pub fn load_float_bundle(path: &Path) -> Result<LoadedModel> {
    let b = crate::bundle::Bundle::open(path)?;
    if let Some((name, e)) = b
        .manifest
        .deployment
        .tensors
        .iter()
        .find(|(_, e)| e.int_grid().is_some())
    {
        return Err(CoreError::Unsupported {
            path: path.into(),
            what: "model",
            detail: format!(
                "a quantized bundle (`{name}` is {}); compress the float model it came from, or a float bundle such as `oqt prune` writes",
                e.describe()
            ),
        });
    }
    bundle_model(&b)
}

/// Any bundle as a model: its config, tokenizer and weights dequantized
/// (a distillation teacher may be quantized); pruned tensors' layouts kept.
pub fn load_dequantized_bundle(path: &Path) -> Result<LoadedModel> {
    bundle_model(&crate::bundle::Bundle::open(path)?)
}

fn bundle_model(b: &crate::bundle::Bundle) -> Result<LoadedModel> {
    let sparsity = b
        .manifest
        .deployment
        .tensors
        .iter()
        .filter_map(|(n, e)| match e {
            crate::encoding::TensorEncoding::Sparse { layout, .. } => Some((n.clone(), *layout)),
            _ => None,
        })
        .collect();
    let mut sharing = BTreeMap::new();
    for name in b.manifest.deployment.tensors.keys() {
        if let Some((of, row_scales)) = b.shared(name)? {
            let of = of.to_string();
            sharing.insert(name.clone(), crate::sharing::SharedWeight { of, row_scales });
        }
    }
    Ok(LoadedModel {
        path: b.path.clone(),
        format: ModelFormat::Bundle,
        name: b.manifest.model_name.clone(),
        config: b.manifest.config.clone(),
        weights: b.dequantized_weights()?,
        tokenizer: b.tokenizer()?,
        sparsity,
        sharing,
    })
}

/// Per-layer tensors: GGUF suffix (after `blk.N.`) and canonical suffix.
const GGUF_LAYER_SUFFIXES: [(&str, &str); 12] = [
    ("attn_norm.weight", names::ATTN_NORM),
    ("ffn_norm.weight", names::MLP_NORM),
    ("attn_q.weight", names::Q),
    ("attn_k.weight", names::K),
    ("attn_v.weight", names::V),
    ("attn_output.weight", names::O),
    ("attn_q.bias", names::Q_BIAS),
    ("attn_k.bias", names::K_BIAS),
    ("attn_v.bias", names::V_BIAS),
    ("ffn_gate.weight", names::GATE),
    ("ffn_up.weight", names::UP),
    ("ffn_down.weight", names::DOWN),
];

/// GGUF tensor name → canonical name (None for tensors a Llama forward does not use).
pub fn canonical_gguf_name(name: &str) -> Option<String> {
    Some(match name {
        "token_embd.weight" => names::EMBED.into(),
        "output_norm.weight" => names::FINAL_NORM.into(),
        "output.weight" => names::LM_HEAD.into(),
        _ => {
            let rest = name.strip_prefix("blk.")?;
            let (idx, suffix) = rest.split_once('.')?;
            let i: usize = idx.parse().ok()?;
            let (_, s) = GGUF_LAYER_SUFFIXES.iter().find(|(g, _)| *g == suffix)?;
            names::layer(i, s)
        }
    })
}

/// Canonical name → llama.cpp's GGUF tensor name (the inverse of [`canonical_gguf_name`]).
pub fn gguf_tensor_name(canonical: &str) -> Option<String> {
    Some(match canonical {
        names::EMBED => "token_embd.weight".into(),
        names::FINAL_NORM => "output_norm.weight".into(),
        names::LM_HEAD => "output.weight".into(),
        _ => {
            let rest = canonical.strip_prefix("model.layers.")?;
            let (idx, suffix) = rest.split_once('.')?;
            let i: usize = idx.parse().ok()?;
            let (g, _) = GGUF_LAYER_SUFFIXES.iter().find(|(_, c)| *c == suffix)?;
            format!("blk.{i}.{g}")
        }
    })
}

/// A GGUF file's model config, with Llama 3 RoPE scaling taken from its
/// `rope_freqs.weight` tensor when present (llama.cpp's form of it).
pub fn gguf_config(g: &GgufFile) -> Result<LlamaConfig> {
    let mut config = LlamaConfig::from_gguf(g)?;
    if let Some(info) = g.tensor_info("rope_freqs.weight") {
        let f: Vec<f64> = g.dequantize(info).into_iter().map(f64::from).collect();
        if f.len() != config.head_dim / 2 {
            return Err(CoreError::BadField {
                path: g.path().into(),
                field: "rope_freqs.weight".into(),
                expected: format!("{} values (head_dim / 2)", config.head_dim / 2),
                found: f.len().to_string(),
            });
        }
        config.rope_freq_factors = Some(f);
    }
    Ok(config)
}

/// Config, tokenizer and name, and each canonical tensor's storage type,
/// without reading a weight: for runs whose weights come from elsewhere (a
/// bundle), so the float model is never resident.
pub fn load_model_meta(path: &Path) -> Result<(LoadedModel, BTreeMap<String, String>)> {
    match detect_format(path)? {
        ModelFormat::Gguf => {
            let g = GgufFile::open(path)?;
            let types = g
                .tensors
                .iter()
                .filter_map(|info| canonical_gguf_name(&info.name).map(|n| (n, info.ty.name().to_string())))
                .collect();
            Ok((gguf_model(&g, path, gguf_config(&g)?, ModelWeights::default())?, types))
        }
        // Safetensors headers carry the dtypes too, but an HF checkpoint is
        // float already: load it and keep only the types.
        ModelFormat::Bundle => {
            let mut m = load_float_bundle(path)?;
            let types = m.weights.source_types();
            m.weights = ModelWeights::default();
            Ok((m, types))
        }
        ModelFormat::Hf => {
            let mut m = load_hf_dir(path)?;
            let types = m.weights.source_types();
            m.weights = ModelWeights::default();
            Ok((m, types))
        }
    }
}

/// A GGUF file's model with `config` (read from it) and `weights` (its own, or none).
fn gguf_model(g: &GgufFile, path: &Path, config: LlamaConfig, weights: ModelWeights) -> Result<LoadedModel> {
    let name = g
        .opt_str("general.name")?
        .map(str::to_string)
        .unwrap_or_else(|| file_stem(path));
    Ok(LoadedModel {
        path: path.into(),
        format: crate::load::ModelFormat::Gguf,
        name,
        config,
        weights,
        tokenizer: Tokenizer::from_gguf(g)?,
        sparsity: BTreeMap::new(),
        sharing: BTreeMap::new(),
    })
}

pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let config = gguf_config(&g)?;
    let mut weights = ModelWeights::default();
    for info in &g.tensors {
        let Some(name) = canonical_gguf_name(&info.name) else {
            if info.name != "rope_freqs.weight" {
                tracing::debug!(tensor = %info.name, "ignoring tensor a Llama forward does not use");
            }
            continue;
        };
        let mut t = TensorF32::new(info.shape(), g.dequantize(info));
        // llama.cpp's converter interleaved the rotary halves of Q and K rows.
        if let Some(h) = config.rotary_heads(&name) {
            t = unpermute_rotary_rows(&t, h);
        }
        weights.insert(name, t, info.ty.name());
    }
    weights.validate(&config, path)?;
    gguf_model(&g, path, config, weights)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The safetensors files of an HF directory: one file, or the shards named by the index.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(CoreError::Missing {
            path: dir.into(),
            what: "file",
            name: "model.safetensors (or model.safetensors.index.json)".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| CoreError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| CoreError::Malformed {
        path: index.clone(),
        format: "safetensors index",
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| CoreError::Missing {
            path: index.clone(),
            what: "field",
            name: "weight_map".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| CoreError::BadField {
            path: index.clone(),
            field: format!("weight_map.{tensor}"),
            expected: "a file name".into(),
            found: file.to_string(),
        })?;
        let p = dir.join(file);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Read every tensor of one safetensors file as f32 (F32, F16 and BF16 accepted).
pub fn read_safetensors_f32(path: &Path) -> Result<BTreeMap<String, (TensorF32, String)>> {
    let file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    // SAFETY: read-only map of a file oqt does not modify while reading.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CoreError::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| CoreError::Malformed {
        path: path.into(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(CoreError::Unsupported {
                    path: path.into(),
                    what: "tensor dtype",
                    detail: format!("tensor `{name}` is {other:?}; oqt reads F32, F16 and BF16"),
                });
            }
        };
        let dtype = format!("{:?}", view.dtype());
        out.insert(name, (TensorF32::new(view.shape().to_vec(), data), dtype));
    }
    Ok(out)
}

pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
    let config = LlamaConfig::from_hf_json(&cfg_path, &text)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let mut weights = ModelWeights::default();
    for file in safetensors_files(dir)? {
        for (name, (t, dtype)) in read_safetensors_f32(&file)? {
            if name.contains("rotary_emb.inv_freq") {
                continue;
            }
            weights.insert(name, t, dtype);
        }
    }
    // Some tied checkpoints also store lm_head; the model reads only the embedding then.
    if config.tie_word_embeddings {
        weights.take(names::LM_HEAD);
    }
    weights.validate(&config, dir)?;
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(LoadedModel {
        path: dir.into(),
        format: ModelFormat::Hf,
        name,
        config,
        weights,
        tokenizer,
        sparsity: BTreeMap::new(),
        sharing: BTreeMap::new(),
    })
}
