//! Llama-family decoder: RMSNorm, rotate-half RoPE (with Llama 3 frequency
//! scaling), grouped-query attention, SwiGLU MLP, tied or untied LM head,
//! KV cache, batches of equal-length sequences.
//!
//! Weights use Hugging Face layout converted to Burn's: `Linear.weight` is
//! `[d_in, d_out]`; Q/K rows are in rotate-half order (the GGUF loader undoes
//! llama.cpp's permutation).

use crate::hooks::{ForwardHooks, NoHooks, Proj};
use crate::reference_ops;
use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use oqt_core::LlamaConfig;
use oqt_core::quant::ActSite;

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

#[derive(Module, Debug)]
pub struct Llama {
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Inverse RoPE frequencies, `head_dim / 2` values (not trained).
    pub rope_inv_freq: Vec<f64>,
}

/// RoPE tables and causal mask of a window, shared by every layer.
#[derive(Debug, Clone)]
pub struct Positions {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
    pub mask: Tensor<4, Bool>,
}

/// Keys and values of the positions seen so far, per layer: `[batch, kv_heads, t, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// cos/sin tables for positions `start..start+seq`: `[1, 1, seq, head_dim/2]`.
pub fn rope_tables(inv_freq: &[f64], start: usize, seq: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(seq * half);
    let mut sin = Vec::with_capacity(seq * half);
    for p in start..start + seq {
        for &f in inv_freq {
            // f64 angles: positions in the thousands lose precision in f32.
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let mk = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [1, 1, seq, half]), device);
    (mk(cos), mk(sin))
}

/// Rotate-half RoPE on `[batch, heads, seq, head_dim]`.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.slice([0..b, 0..h, 0..s, half..d]);
    let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let r2 = x2 * cos.clone() + x1 * sin.clone();
    Tensor::cat(vec![r1, r2], 3)
}

/// `true` where query `i` (absolute position `start + i`) must not see key `j`.
fn causal_mask(start: usize, seq: usize, total: usize, device: &Device) -> Tensor<4, Bool> {
    let mut m = Vec::with_capacity(seq * total);
    for i in 0..seq {
        for j in 0..total {
            m.push(j > start + i);
        }
    }
    Tensor::<4, Bool>::from_data(TensorData::new(m, [1, 1, seq, total]), device)
}

/// `1/√head_dim`, rounded to f32 once (the runtime uses the same value).
pub fn attention_scale(head_dim: usize) -> f32 {
    (1.0 / (head_dim as f64).sqrt()) as f32
}

fn norm(n: &RmsNorm, x: Tensor<3>, hooks: &dyn ForwardHooks) -> Tensor<3> {
    if hooks.reference_arithmetic() {
        reference_ops::rms_norm(x, &n.gamma.val(), n.epsilon)
    } else {
        n.forward(x)
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        hooks: &dyn ForwardHooks,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<4, Bool>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let lin = |proj: Proj, l: &Linear, x: Tensor<3>| hooks.linear(layer, proj, x, &|x| l.forward(x));
        let q = lin(Proj::Q, &self.q_proj, x.clone())
            .reshape([b, s, h, hd])
            .swap_dims(1, 2);
        let k = lin(Proj::K, &self.k_proj, x.clone())
            .reshape([b, s, kvh, hd])
            .swap_dims(1, 2);
        let v = lin(Proj::V, &self.v_proj, x).reshape([b, s, kvh, hd]).swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let mut k = apply_rope(k, cos, sin);
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let t = k.dims()[2];
        let group = h / kvh;
        // Grouped-query attention without copying K/V: the `group` query heads
        // that share a KV head are stacked along the sequence axis.
        let qg = q.reshape([b, kvh, group * s, hd]);
        let exact = hooks.reference_arithmetic();
        let scale = attention_scale(hd);
        let scores = if exact {
            reference_ops::matmul(qg, k.swap_dims(2, 3))
        } else {
            qg.matmul(k.swap_dims(2, 3))
        } * scale;
        let scores = scores.reshape([b, h, s, t]).mask_fill(mask.clone(), f32::NEG_INFINITY);
        let probs = if exact {
            reference_ops::softmax(scores)
        } else {
            softmax(scores, 3)
        };
        let probs = hooks.probs(layer, probs).reshape([b, kvh, group * s, t]);
        let out = if exact {
            reference_ops::matmul(probs, v)
        } else {
            probs.matmul(v)
        };
        let out = out.reshape([b, h, s, hd]).swap_dims(1, 2).reshape([b, s, h * hd]);
        let o = lin(Proj::O, &self.o_proj, out);
        hooks.act(layer, ActSite::OOut, o)
    }
}

impl Mlp {
    pub fn forward(&self, layer: usize, hooks: &dyn ForwardHooks, x: Tensor<3>) -> Tensor<3> {
        let lin = |proj: Proj, l: &Linear, x: Tensor<3>| hooks.linear(layer, proj, x, &|x| l.forward(x));
        let g = lin(Proj::Gate, &self.gate_proj, x.clone());
        let g = if hooks.reference_arithmetic() {
            reference_ops::silu(g)
        } else {
            silu(g)
        };
        let d = lin(Proj::Down, &self.down_proj, g * lin(Proj::Up, &self.up_proj, x));
        hooks.act(layer, ActSite::DownOut, d)
    }
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        hooks: &dyn ForwardHooks,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &Tensor<4, Bool>,
        cache: Option<&mut Option<(Tensor<4>, Tensor<4>)>>,
    ) -> Tensor<3> {
        let attn = self.attn.forward(
            layer,
            hooks,
            norm(&self.input_layernorm, x.clone(), hooks),
            cos,
            sin,
            mask,
            cache,
        );
        let h = hooks.act(layer, ActSite::AttnResidual, x + attn);
        let mlp = self
            .mlp
            .forward(layer, hooks, norm(&self.post_attention_layernorm, h.clone(), hooks));
        hooks.act(layer, ActSite::MlpResidual, h + mlp)
    }
}

impl Llama {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.dims()[0]
    }

    /// The decoder linear `proj` of `layer` (the head is not a decoder linear).
    pub fn decoder_linear(&self, layer: usize, proj: Proj) -> &Linear {
        let b = &self.layers[layer];
        match proj {
            Proj::Q => &b.attn.q_proj,
            Proj::K => &b.attn.k_proj,
            Proj::V => &b.attn.v_proj,
            Proj::O => &b.attn.o_proj,
            Proj::Gate => &b.mlp.gate_proj,
            Proj::Up => &b.mlp.up_proj,
            Proj::Down => &b.mlp.down_proj,
            Proj::Head => panic!("the head is the embedding or lm_head, not a decoder linear"),
        }
    }

    /// [`Llama::decoder_linear`], mutably (training replaces its weight).
    pub fn decoder_linear_mut(&mut self, layer: usize, proj: Proj) -> &mut Linear {
        let b = &mut self.layers[layer];
        match proj {
            Proj::Q => &mut b.attn.q_proj,
            Proj::K => &mut b.attn.k_proj,
            Proj::V => &mut b.attn.v_proj,
            Proj::O => &mut b.attn.o_proj,
            Proj::Gate => &mut b.mlp.gate_proj,
            Proj::Up => &mut b.mlp.up_proj,
            Proj::Down => &mut b.mlp.down_proj,
            Proj::Head => panic!("the head is the embedding or lm_head, not a decoder linear"),
        }
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.weight.device()
    }

    /// One sequence of token ids as a `[1, len]` input on the model's device.
    pub fn tokens_tensor(&self, tokens: &[u32]) -> Tensor<2, Int> {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        Tensor::from_data(TensorData::new(ids, [1, tokens.len()]), &self.device())
    }

    /// Final hidden states (after the last norm), `[batch, seq, hidden]`.
    /// With a cache, `tokens` continue the cached positions.
    pub fn forward_hidden(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.forward_hidden_with(tokens, cache, &NoHooks)
    }

    /// [`Llama::forward_hidden`] through `hooks`.
    pub fn forward_hidden_with(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
        hooks: &dyn ForwardHooks,
    ) -> Tensor<3> {
        let hidden = self.forward_residual_with(tokens, cache, hooks);
        norm(&self.norm, hidden, hooks)
    }

    /// The last decoder layer's output (the residual stream before the final
    /// norm), `[batch, seq, hidden]`: what layer-output objectives compare.
    pub fn forward_residual_with(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        hooks: &dyn ForwardHooks,
    ) -> Tensor<3> {
        let [_, s] = tokens.dims();
        let device = tokens.device();
        let start = cache.as_ref().map_or(0, |c| c.len);
        let (cos, sin) = rope_tables(&self.rope_inv_freq, start, s, &device);
        let mask = causal_mask(start, s, start + s, &device);
        let mut x = self.embed_with(tokens, hooks);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(i, hooks, x, &cos, &sin, &mask, slot);
        }
        if let Some(c) = cache {
            c.len += s;
        }
        x
    }

    /// The final RMSNorm through `hooks` (as [`Llama::forward_hidden_with`] applies it).
    pub fn final_norm_with(&self, hidden: Tensor<3>, hooks: &dyn ForwardHooks) -> Tensor<3> {
        norm(&self.norm, hidden, hooks)
    }

    /// The final RMSNorm alone, in float (no hooks): what the head reads.
    pub fn final_norm(&self, hidden: Tensor<3>) -> Tensor<3> {
        norm(&self.norm, hidden, &NoHooks)
    }

    /// The embedding of `tokens` through `hooks` (the decoder stack's input):
    /// with [`Llama::positions`] and [`Llama::layer_with`], the layer-by-layer
    /// form of [`Llama::forward_residual_with`] that per-layer recomputation uses.
    pub fn embed_with(&self, tokens: Tensor<2, Int>, hooks: &dyn ForwardHooks) -> Tensor<3> {
        hooks.act(0, ActSite::Embed, self.embed_tokens.forward(tokens))
    }

    /// RoPE tables and causal mask for `seq` fresh positions (no cache).
    pub fn positions(&self, seq: usize, device: &Device) -> Positions {
        let (cos, sin) = rope_tables(&self.rope_inv_freq, 0, seq, device);
        Positions {
            cos,
            sin,
            mask: causal_mask(0, seq, seq, device),
        }
    }

    /// Decoder layer `layer` on its input `x` (no cache).
    pub fn layer_with(&self, layer: usize, x: Tensor<3>, pos: &Positions, hooks: &dyn ForwardHooks) -> Tensor<3> {
        self.layers[layer].forward(layer, hooks, x, &pos.cos, &pos.sin, &pos.mask, None)
    }

    /// Logits for hidden states: `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.logits_with(hidden, &NoHooks)
    }

    /// [`Llama::logits`] through `hooks` (the head is [`Proj::Head`]).
    pub fn logits_with(&self, hidden: Tensor<3>, hooks: &dyn ForwardHooks) -> Tensor<3> {
        let float = |hidden: Tensor<3>| match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, d] = hidden.dims();
                let w = self.embed_tokens.weight.val(); // [vocab, d]
                hidden
                    .reshape([b * s, d])
                    .matmul(w.transpose())
                    .reshape([b, s, self.vocab_size()])
            }
        };
        hooks.linear(self.layers.len(), Proj::Head, hidden, &float)
    }

    pub fn forward(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.forward_hidden(tokens, cache))
    }
}

/// Build an uninitialized-shape-correct module from weights (used by the importer and tests).
pub(crate) fn linear(weight_in_out: Tensor<2>, bias: Option<Tensor<1>>) -> Linear {
    Linear {
        weight: Param::from_tensor(weight_in_out),
        bias: bias.map(Param::from_tensor),
    }
}

pub(crate) fn rms_norm(gamma: Tensor<1>, eps: f64) -> RmsNorm {
    RmsNorm {
        gamma: Param::from_tensor(gamma),
        epsilon: eps,
    }
}

/// Config-derived constants the module keeps.
pub(crate) fn inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    cfg.rope_inv_freq()
}
