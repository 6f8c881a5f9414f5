//! A Hugging Face directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`) with the model's float or
//! dequantized weights — what transformers, MLX and other converters read.

use crate::ExportSource;
use oqt_core::weights::names;
use oqt_core::{CoreError, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HfDtype {
    /// Dequantized values exactly.
    #[default]
    F32,
    F16,
}

impl std::str::FromStr for HfDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            other => Err(format!("unknown dtype `{other}`; expected f32 or f16")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HfReport {
    pub path: PathBuf,
    pub dtype: HfDtype,
    pub tensors: usize,
    pub bytes: u64,
}

fn unsupported(path: &Path, what: &'static str, detail: String) -> CoreError {
    CoreError::Unsupported {
        path: path.into(),
        what,
        detail,
    }
}

/// `config.json` for `LlamaForCausalLM`.
fn config_json(src: &ExportSource, dtype: HfDtype) -> Result<serde_json::Value> {
    let c = &src.config;
    if c.layer_intermediate_sizes.is_some() {
        return Err(unsupported(
            &src.path,
            "per-layer MLP widths",
            "the model's layers have different intermediate sizes (outlier channel splitting); Llama's config.json has one `intermediate_size` — export to GGUF or a bundle instead".into(),
        ));
    }
    if c.rope_freq_factors.is_some() && c.rope_scaling.is_none() {
        return Err(unsupported(
            &src.path,
            "RoPE scaling",
            "the model's RoPE frequencies come from a GGUF `rope_freqs` tensor, which config.json cannot express"
                .into(),
        ));
    }
    let rope_scaling = c.rope_scaling.as_ref().map(|s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })
    });
    Ok(json!({
        "architectures": [if c.attention_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if c.attention_bias { "qwen2" } else { "llama" },
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": false,
        "hidden_act": "silu",
        "rope_scaling": rope_scaling,
        "bos_token_id": src.tokenizer.bos_id,
        "eos_token_id": src.tokenizer.eos_id,
        "torch_dtype": match dtype { HfDtype::F32 => "float32", HfDtype::F16 => "float16" },
    }))
}

fn tokenizer_config_json(src: &ExportSource) -> serde_json::Value {
    let t = &src.tokenizer;
    let token = |id: Option<u32>| id.and_then(|i| t.token_str(i));
    json!({
        "bos_token": token(t.bos_id),
        "eos_token": token(t.eos_id),
        "add_bos_token": t.add_bos,
        "chat_template": t.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

/// Write the directory `out` (which must not exist or be empty); it appears
/// complete or not at all (built beside it, then renamed into place).
pub fn export_hf(src: &ExportSource, dtype: HfDtype, out: &Path) -> Result<HfReport> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| CoreError::io(out, e))?
            .next()
            .is_some()
    {
        return Err(CoreError::Other(format!(
            "{}: exists and is not empty; choose a new directory for the export",
            out.display()
        )));
    }
    let (tensors, bytes) = oqt_core::fs::write_dir_atomically(out, |dir| write_hf_files(src, dtype, dir))?;
    Ok(HfReport {
        path: out.into(),
        dtype,
        tensors,
        bytes,
    })
}

/// The files of the export into `dir`: returns the tensor count and weight bytes.
fn write_hf_files(src: &ExportSource, dtype: HfDtype, dir: &Path) -> Result<(usize, u64)> {
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
        std::fs::write(&p, text + "\n").map_err(|e| CoreError::io(&p, e))
    };
    write_json("config.json", &config_json(src, dtype)?)?;
    write_json("tokenizer_config.json", &tokenizer_config_json(src))?;
    src.tokenizer.save_hf_json(&dir.join("tokenizer.json"))?;

    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in &src.tensors {
        if name == names::LM_HEAD && src.config.tie_word_embeddings {
            continue;
        }
        let values = t.values();
        let bytes: Vec<u8> = match dtype {
            HfDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            HfDtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        buffers.push((name.clone(), t.shape(), bytes));
    }
    let st_dtype = match dtype {
        HfDtype::F32 => Dtype::F32,
        HfDtype::F16 => Dtype::F16,
    };
    let views = buffers
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(st_dtype, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| CoreError::Other(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let st_path = dir.join("model.safetensors");
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &st_path)
        .map_err(|e| CoreError::Other(format!("{}: {e}", st_path.display())))?;

    let bytes = std::fs::metadata(&st_path)
        .map_err(|e| CoreError::io(&st_path, e))?
        .len();
    Ok((buffers.len(), bytes))
}
