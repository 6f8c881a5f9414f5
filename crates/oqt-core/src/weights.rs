//! Float weights under canonical (Hugging Face Llama) names, in Hugging Face
//! layout: `[out, in]` matrices, Q/K rows in rotate-half order.

use crate::config::LlamaConfig;
use crate::error::{CoreError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorF32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl TensorF32 {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?} vs {} values",
            data.len()
        );
        Self { shape, data }
    }
}

/// Canonical tensor names.
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";

    pub fn layer(i: usize, suffix: &str) -> String {
        format!("model.layers.{i}.{suffix}")
    }

    /// Per-layer tensors: (suffix, shape as a function of the config).
    pub const ATTN_NORM: &str = "input_layernorm.weight";
    pub const MLP_NORM: &str = "post_attention_layernorm.weight";
    pub const Q: &str = "self_attn.q_proj.weight";
    pub const K: &str = "self_attn.k_proj.weight";
    pub const V: &str = "self_attn.v_proj.weight";
    pub const O: &str = "self_attn.o_proj.weight";
    pub const Q_BIAS: &str = "self_attn.q_proj.bias";
    pub const K_BIAS: &str = "self_attn.k_proj.bias";
    pub const V_BIAS: &str = "self_attn.v_proj.bias";
    pub const GATE: &str = "mlp.gate_proj.weight";
    pub const UP: &str = "mlp.up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";
}

/// Weights of one model, with the storage type each tensor came from.
#[derive(Debug, Default, Clone)]
pub struct ModelWeights {
    tensors: BTreeMap<String, TensorF32>,
    source_types: BTreeMap<String, String>,
}

impl ModelWeights {
    pub fn insert(&mut self, name: String, t: TensorF32, source_type: impl Into<String>) {
        self.source_types.insert(name.clone(), source_type.into());
        self.tensors.insert(name, t);
    }

    pub fn get(&self, name: &str) -> Option<&TensorF32> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut TensorF32> {
        self.tensors.get_mut(name)
    }

    pub fn take(&mut self, name: &str) -> Option<TensorF32> {
        self.tensors.remove(name)
    }

    pub fn source_type(&self, name: &str) -> Option<&str> {
        self.source_types.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Each tensor's name and storage type (`f32` where none was recorded).
    pub fn source_types(&self) -> BTreeMap<String, String> {
        self.tensors
            .keys()
            .map(|n| (n.clone(), self.source_type(n).unwrap_or("f32").to_string()))
            .collect()
    }

    /// The tensors by value with their storage types, in name order; each is
    /// released as the caller drops it.
    pub fn into_tensors(self) -> impl Iterator<Item = (String, TensorF32, String)> {
        let mut types = self.source_types;
        self.tensors.into_iter().map(move |(n, t)| {
            let source = types.remove(&n).unwrap_or_else(|| "f32".to_string());
            (n, t, source)
        })
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Every tensor the config calls for, with the shape it must have.
    pub fn expected(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        use names::*;
        let h = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let mut out = vec![
            (EMBED.to_string(), vec![cfg.vocab_size, h]),
            (FINAL_NORM.to_string(), vec![h]),
        ];
        if !cfg.tie_word_embeddings {
            out.push((LM_HEAD.to_string(), vec![cfg.vocab_size, h]));
        }
        for i in 0..cfg.num_layers {
            let inter = cfg.intermediate_size_of(i);
            let mut l = vec![
                (ATTN_NORM, vec![h]),
                (MLP_NORM, vec![h]),
                (Q, vec![q, h]),
                (K, vec![kv, h]),
                (V, vec![kv, h]),
                (O, vec![h, q]),
                (GATE, vec![inter, h]),
                (UP, vec![inter, h]),
                (DOWN, vec![h, inter]),
            ];
            if cfg.attention_bias {
                l.extend([(Q_BIAS, vec![q]), (K_BIAS, vec![kv]), (V_BIAS, vec![kv])]);
            }
            out.extend(l.into_iter().map(|(s, shape)| (layer(i, s), shape)));
        }
        out
    }

    /// Check that every expected tensor is present with the right shape.
    pub fn validate(&self, cfg: &LlamaConfig, path: &Path) -> Result<()> {
        self.validate_except(cfg, path, |_| false)
    }

    /// [`Self::validate`], leaving out the tensors `skip` names (held elsewhere).
    pub fn validate_except(&self, cfg: &LlamaConfig, path: &Path, skip: impl Fn(&str) -> bool) -> Result<()> {
        for (name, shape) in Self::expected(cfg) {
            if skip(&name) {
                continue;
            }
            match self.tensors.get(&name) {
                None => {
                    return Err(CoreError::Missing {
                        path: PathBuf::from(path),
                        what: "tensor",
                        name,
                    });
                }
                Some(t) if t.shape != shape => {
                    return Err(CoreError::BadField {
                        path: PathBuf::from(path),
                        field: name,
                        expected: format!("shape {shape:?}"),
                        found: format!("shape {:?}", t.shape),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// llama.cpp's row order of a Q or K projection: `order[gguf_row] = hf_row`.
/// Its converter maps Hugging Face row `(head, a, b)` (rotate-half halves
/// `a ∈ {0,1}`, `b < head_dim/2`) to GGUF row `(head, b, a)` (pairs adjacent).
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

/// The inverse of [`rotary_gguf_order`]: `order[hf_row] = gguf_row`.
pub fn rotary_hf_order(rows: usize, n_heads: usize) -> Vec<usize> {
    let mut inverse = vec![0; rows];
    for (gguf, hf) in rotary_gguf_order(rows, n_heads).into_iter().enumerate() {
        inverse[hf] = gguf;
    }
    inverse
}

impl TensorF32 {
    /// Row `i` of the result is row `order[i]` of `self`.
    pub fn reorder_rows(&self, order: &[usize]) -> TensorF32 {
        let cols = self.data.len() / self.shape[0];
        let data = order
            .iter()
            .flat_map(|&r| self.data[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        TensorF32::new(self.shape.clone(), data)
    }
}

/// Reorder the rows of a Q or K projection from llama.cpp's GGUF order
/// (rotary pairs adjacent) to Hugging Face's rotate-half order.
pub fn unpermute_rotary_rows(t: &TensorF32, n_heads: usize) -> TensorF32 {
    t.reorder_rows(&rotary_hf_order(t.shape[0], n_heads))
}

/// The converter's forward permutation (HF → GGUF), for export.
pub fn permute_rotary_rows(t: &TensorF32, n_heads: usize) -> TensorF32 {
    t.reorder_rows(&rotary_gguf_order(t.shape[0], n_heads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_permutation_round_trips_and_moves_pairs() {
        // 2 heads of dim 4, 1 column: rows are their own indices.
        let t = TensorF32::new(vec![8, 1], (0..8).map(|v| v as f32).collect());
        let g = permute_rotary_rows(&t, 2);
        // HF head 0 rows [0,1 | 2,3] (halves) become adjacent pairs [0,2,1,3].
        assert_eq!(g.data, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute_rotary_rows(&g, 2), t);
    }
}
