//! The architecture description every backend agrees on: a Llama-family
//! decoder (Llama 2/3.x, SmolLM2, TinyLlama, Qwen2-style q/k/v biases).

use crate::error::{CoreError, Result};
use crate::gguf::{GgufFile, MetaValue};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Llama 3.x frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Per-pair frequency divisors stored in Llama 3 GGUFs as `rope_freqs.weight`
    /// (llama.cpp's form of the same Llama 3 scaling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f64>>,
    /// Per-layer MLP widths where they differ from `intermediate_size`
    /// (outlier channel splitting widens a few layers; llama.cpp reads the
    /// same as an array-valued `feed_forward_length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_intermediate_sizes: Option<Vec<usize>>,
}

impl LlamaConfig {
    /// The MLP width of decoder layer `l`.
    pub fn intermediate_size_of(&self, l: usize) -> usize {
        self.layer_intermediate_sizes
            .as_ref()
            .and_then(|s| s.get(l).copied())
            .unwrap_or(self.intermediate_size)
    }

    /// Every layer's MLP width.
    pub fn intermediate_sizes(&self) -> Vec<usize> {
        (0..self.num_layers).map(|l| self.intermediate_size_of(l)).collect()
    }

    /// Inverse RoPE frequencies, one per rotated pair (`head_dim / 2` values),
    /// with Llama 3 scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let inv = self.rope_theta.powf(-((2 * i) as f64) / self.head_dim as f64);
                match (&self.rope_scaling, &self.rope_freq_factors) {
                    (_, Some(f)) => inv / f[i],
                    (Some(s), None) => llama3_scale(inv, s),
                    (None, None) => inv,
                }
            })
            .collect()
    }

    /// Heads whose rows a Q or K projection (canonical name) interleaves in
    /// llama.cpp's rotary order; `None` for every other tensor.
    pub fn rotary_heads(&self, canonical: &str) -> Option<usize> {
        use crate::weights::names;
        if canonical.ends_with(names::Q) {
            Some(self.num_heads)
        } else if canonical.ends_with(names::K) {
            Some(self.num_kv_heads)
        } else {
            None
        }
    }

    /// Parameter count (embeddings and head included, head counted once when tied).
    pub fn n_params(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        let per_layer_extra = if self.attention_bias { q + 2 * kv } else { 0 } + 2 * h;
        let emb = self.vocab_size * h;
        emb + self.decoder_linear_params()
            + self.num_layers * per_layer_extra
            + h
            + if self.tie_word_embeddings { 0 } else { emb }
    }

    /// Weights of the decoder layers' seven linears (no biases, norms or embeddings).
    pub fn decoder_linear_params(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        self.num_layers * (2 * h * q + 2 * h * kv) + 3 * h * self.intermediate_sizes().iter().sum::<usize>()
    }

    fn validate(self, path: &Path) -> Result<Self> {
        let bad = |field: &str, expected: &str, found: String| CoreError::BadField {
            path: path.into(),
            field: field.into(),
            expected: expected.into(),
            found,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return Err(bad(name, "a positive integer", "0".into()));
            }
        }
        if let Some(sizes) = &self.layer_intermediate_sizes
            && (sizes.len() != self.num_layers || sizes.contains(&0))
        {
            return Err(bad(
                "feed_forward_length",
                &format!("{} positive per-layer widths", self.num_layers),
                format!("{sizes:?}"),
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                &format!("a divisor of the {} attention heads", self.num_heads),
                self.num_kv_heads.to_string(),
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return Err(bad("head_dim", "an even positive integer", self.head_dim.to_string()));
        }
        Ok(self)
    }

    /// From the `llama.*` keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.get_str("general.architecture")?;
        if !matches!(arch, "llama" | "qwen2") {
            return Err(CoreError::Unsupported {
                path: g.path().into(),
                what: "architecture",
                detail: format!("`general.architecture` = {arch:?}; oqt runs Llama-family models (llama, qwen2)"),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = g.get_u64(&key("embedding_length"))? as usize;
        let heads = g.get_u64(&key("attention.head_count"))? as usize;
        let kv_heads = g
            .opt_u64(&key("attention.head_count_kv"))?
            .map_or(heads, |v| v as usize);
        let head_dim = match g.opt_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => hidden / heads.max(1),
        };
        let vocab = match g.opt_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let has_output = g.tensor_info("output.weight").is_some();
        let rope_scaling = match g.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some(other) => {
                return Err(CoreError::Unsupported {
                    path: g.path().into(),
                    what: "RoPE scaling",
                    detail: format!("`{}` = {other:?}", key("rope.scaling.type")),
                });
            }
        };
        // One width, or (llama.cpp's per-layer form) one per layer.
        let ffn_key = key("feed_forward_length");
        let (intermediate_size, layer_intermediate_sizes) = match g.get(&ffn_key) {
            Some(v @ MetaValue::Array(items)) => {
                let sizes = items
                    .iter()
                    .map(|v| v.as_u64().map(|v| v as usize))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| g.bad(&ffn_key, "an integer or an array of integers", v))?;
                let layers = g.get_u64(&key("block_count"))? as usize;
                if sizes.len() != layers {
                    return Err(g.bad(&ffn_key, &format!("one width per layer ({layers})"), v));
                }
                let first = sizes.first().copied().unwrap_or(0);
                let uniform = sizes.iter().all(|&s| s == first);
                (first, (!uniform).then_some(sizes))
            }
            _ => (g.get_u64(&ffn_key)? as usize, None),
        };
        Self {
            hidden_size: hidden,
            intermediate_size,
            num_layers: g.get_u64(&key("block_count"))? as usize,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            rope_theta: g.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: g.opt_u64(&key("context_length"))?.map_or(2048, |v| v as usize),
            tie_word_embeddings: !has_output,
            attention_bias: arch == "qwen2",
            // Llama 3 GGUFs carry the scaling as a `rope_freqs.weight` tensor;
            // the loader turns that tensor back into this struct.
            rope_scaling,
            rope_freq_factors: None,
            layer_intermediate_sizes,
        }
        .validate(g.path())
    }

    /// The `llama.*` keys of a GGUF file for this config (the inverse of
    /// [`LlamaConfig::from_gguf`]), typed as llama.cpp's converter writes them.
    /// Llama 3 RoPE scaling travels as the `rope_freqs.weight` tensor, not here.
    pub fn gguf_metadata(&self) -> Vec<(String, MetaValue)> {
        let u = |k: &str, v: usize| (format!("llama.{k}"), MetaValue::U32(v as u32));
        let f = |k: &str, v: f64| (format!("llama.{k}"), MetaValue::F32(v as f32));
        let mut out = vec![
            u("block_count", self.num_layers),
            u("context_length", self.max_position_embeddings),
            u("embedding_length", self.hidden_size),
            match &self.layer_intermediate_sizes {
                None => u("feed_forward_length", self.intermediate_size),
                Some(sizes) => (
                    "llama.feed_forward_length".to_string(),
                    MetaValue::Array(sizes.iter().map(|&s| MetaValue::U32(s as u32)).collect()),
                ),
            },
            u("attention.head_count", self.num_heads),
            u("attention.head_count_kv", self.num_kv_heads),
            f("rope.freq_base", self.rope_theta),
            f("attention.layer_norm_rms_epsilon", self.rms_norm_eps),
            u("vocab_size", self.vocab_size),
            u("rope.dimension_count", self.head_dim),
        ];
        if self.head_dim * self.num_heads != self.hidden_size {
            out.push(u("attention.key_length", self.head_dim));
            out.push(u("attention.value_length", self.head_dim));
        }
        out
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| CoreError::Malformed {
            path: path.into(),
            format: "config.json",
            reason: e.to_string(),
        })?;
        let arch = raw.model_type.as_deref().unwrap_or("llama");
        if !matches!(arch, "llama" | "qwen2" | "mistral") {
            return Err(CoreError::Unsupported {
                path: path.into(),
                what: "model_type",
                detail: format!("{arch:?}; oqt runs Llama-family models (llama, qwen2, mistral)"),
            });
        }
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_default();
                if kind != "llama3" {
                    return Err(CoreError::Unsupported {
                        path: path.into(),
                        what: "rope_scaling",
                        detail: format!("rope_type {kind:?}; oqt implements \"llama3\""),
                    });
                }
                let need = |v: Option<f64>, f: &str| {
                    v.ok_or_else(|| CoreError::Missing {
                        path: path.into(),
                        what: "field",
                        name: format!("rope_scaling.{f}"),
                    })
                };
                Some(Llama3RopeScaling {
                    factor: need(s.factor, "factor")?,
                    low_freq_factor: need(s.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(s.high_freq_factor, "high_freq_factor")?,
                    original_max_position_embeddings: need(
                        s.original_max_position_embeddings.map(|v| v as f64),
                        "original_max_position_embeddings",
                    )? as usize,
                })
            }
        };
        let heads = raw.num_attention_heads;
        Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads.max(1)),
            vocab_size: raw.vocab_size,
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == "qwen2"),
            rope_scaling,
            rope_freq_factors: None,
            layer_intermediate_sizes: None,
        }
        .validate(path)
    }
}

/// Llama 3.1's frequency remapping: long wavelengths are slowed by `factor`,
/// short ones kept, and the band between is interpolated smoothly.
fn llama3_scale(inv_freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / s.low_freq_factor;
    let high_wavelen = old_ctx / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_wavelen {
        inv_freq
    } else if wavelen > low_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rms_norm_eps: f64,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<HfRopeScaling>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,
        "rope_theta":100000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;

    #[test]
    fn hf_config_parses_smollm2() {
        let c = LlamaConfig::from_hf_json(Path::new("config.json"), SMOL).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_heads, 3);
        assert!(c.tie_word_embeddings);
        // SmolLM2-135M has 134.5M parameters.
        assert_eq!(c.n_params(), 134_515_008);
    }

    #[test]
    fn per_layer_mlp_widths_travel_through_gguf() {
        let mut cfg = crate::testing::tiny_config();
        cfg.layer_intermediate_sizes = Some(vec![101, 96]);
        let weights = crate::testing::random_weights(&cfg, 7);
        assert_eq!(
            weights.get("model.layers.0.mlp.down_proj.weight").unwrap().shape,
            [64, 101]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("split.gguf");
        crate::testing::write_tiny_gguf(&path, &cfg, &weights).unwrap();
        let loaded = crate::load_model(&path).unwrap();
        assert_eq!(loaded.config.layer_intermediate_sizes, Some(vec![101, 96]));
        assert_eq!(loaded.config.intermediate_sizes(), [101, 96]);
        assert_eq!(
            loaded.config.decoder_linear_params(),
            2 * (2 * 64 * 64 + 2 * 64 * 32) + 3 * 64 * (101 + 96)
        );
        // A width list of the wrong length is named.
        cfg.layer_intermediate_sizes = Some(vec![101]);
        crate::testing::write_tiny_gguf(&path, &cfg, &weights).unwrap();
        let msg = crate::load_model(&path).unwrap_err().to_string();
        assert!(msg.contains("feed_forward_length"), "{msg}");
    }

    #[test]
    fn missing_field_names_file_and_field() {
        let text = SMOL.replace("\"hidden_size\":576,", "");
        let err = LlamaConfig::from_hf_json(Path::new("/m/config.json"), &text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/m/config.json") && msg.contains("hidden_size"), "{msg}");
    }

    #[test]
    fn bad_gqa_ratio_is_rejected() {
        let text = SMOL.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        let msg = LlamaConfig::from_hf_json(Path::new("c.json"), &text)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("num_key_value_heads"), "{msg}");
    }

    #[test]
    fn llama3_scaling_matches_reference_values() {
        // Llama 3.2 1B settings; reference values from the HF implementation's formula.
        let s = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // High frequency (short wavelength) is untouched, lowest is divided by the factor.
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        let low = 500_000f64.powf(-62.0 / 64.0);
        assert!((llama3_scale(low, &s) - low / 32.0).abs() < 1e-18);
        // In the band, the result lies between the two.
        let mid = 2.0 * std::f64::consts::PI / 4000.0;
        let v = llama3_scale(mid, &s);
        assert!(v < mid && v > mid / 32.0);
    }
}

#[cfg(test)]
mod rope_factor_tests {
    use super::*;

    /// llama.cpp stores Llama 3 scaling as per-pair divisors (`rope_freqs.weight`);
    /// both forms must give the same frequencies.
    #[test]
    fn gguf_rope_factors_equal_llama3_scaling() {
        let mut c = LlamaConfig::from_hf_json(
            Path::new("config.json"),
            r#"{"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,
                "num_key_value_heads":8,"vocab_size":128256,"rope_theta":500000.0,"rms_norm_eps":1e-5,
                "rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                "original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        let scaled = c.rope_inv_freq();
        c.rope_scaling = None;
        let plain = c.rope_inv_freq();
        c.rope_freq_factors = Some(plain.iter().zip(&scaled).map(|(p, s)| p / s).collect());
        for (a, b) in c.rope_inv_freq().iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-12 * b.abs());
        }
        assert!(scaled[0] == plain[0] && scaled[31] < plain[31] / 31.0);
    }
}
