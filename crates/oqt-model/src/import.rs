//! Turn float weights from oqt-core into a Burn [`Llama`] on a device.

use crate::llama::{Attention, Block, Llama, Mlp, inv_freq, linear, rms_norm};
use burn::module::Param;
use burn::nn::Embedding;
use burn::tensor::{Device, Tensor, TensorData};
use oqt_core::weights::{ModelWeights, TensorF32, names};
use oqt_core::{LlamaConfig, LoadedModel};

fn take(w: &mut ModelWeights, name: &str) -> TensorF32 {
    // Presence and shapes were validated when the weights were loaded.
    w.take(name)
        .unwrap_or_else(|| panic!("validated weights lack `{name}`"))
}

fn t1(t: TensorF32, device: &Device) -> Tensor<1> {
    let n = t.data.len();
    Tensor::from_data(TensorData::new(t.data, [n]), device)
}

fn t2(t: TensorF32, device: &Device) -> Tensor<2> {
    let [r, c] = [t.shape[0], t.shape[1]];
    Tensor::from_data(TensorData::new(t.data, [r, c]), device)
}

/// HF `[out, in]` → Burn `[in, out]`, stored contiguously: a transposed *view*
/// would be copied by every `Linear::forward` (Flex reshapes the weight).
fn t2_transposed(t: TensorF32, device: &Device) -> Tensor<2> {
    transposed(&t.data, t.shape[0], t.shape[1], device)
}

/// Row-major `[rows, cols]` → a contiguous `[cols, rows]` tensor.
pub(crate) fn transposed(data: &[f32], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let mut out = vec![0f32; data.len()];
    // Blocked so both sides stay in cache.
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [cols, rows]), device)
}

/// Build the model, consuming the weights (a 1B model's f32 copy is not kept twice).
pub fn llama_from_weights(cfg: &LlamaConfig, mut w: ModelWeights, device: &Device) -> Llama {
    let eps = cfg.rms_norm_eps;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let mut lin = |s: &str, b: Option<&str>| {
            let weight = t2_transposed(take(&mut w, &names::layer(i, s)), device);
            let bias = b
                .filter(|_| cfg.attention_bias)
                .map(|b| t1(take(&mut w, &names::layer(i, b)), device));
            linear(weight, bias)
        };
        let attn = Attention {
            q_proj: lin(names::Q, Some(names::Q_BIAS)),
            k_proj: lin(names::K, Some(names::K_BIAS)),
            v_proj: lin(names::V, Some(names::V_BIAS)),
            o_proj: lin(names::O, None),
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let mlp = Mlp {
            gate_proj: lin(names::GATE, None),
            up_proj: lin(names::UP, None),
            down_proj: lin(names::DOWN, None),
        };
        layers.push(Block {
            input_layernorm: rms_norm(t1(take(&mut w, &names::layer(i, names::ATTN_NORM)), device), eps),
            attn,
            post_attention_layernorm: rms_norm(t1(take(&mut w, &names::layer(i, names::MLP_NORM)), device), eps),
            mlp,
        });
    }
    let lm_head = (!cfg.tie_word_embeddings).then(|| linear(t2_transposed(take(&mut w, names::LM_HEAD), device), None));
    Llama {
        embed_tokens: Embedding {
            weight: Param::from_tensor(t2(take(&mut w, names::EMBED), device)),
        },
        layers,
        norm: rms_norm(t1(take(&mut w, names::FINAL_NORM), device), eps),
        lm_head,
        rope_inv_freq: inv_freq(cfg),
    }
}

/// Build the model from a loaded model, leaving config and tokenizer in place.
pub fn llama_from_loaded(m: &mut LoadedModel, device: &Device) -> Llama {
    let weights = std::mem::take(&mut m.weights);
    llama_from_weights(&m.config, weights, device)
}

/// Replace the weight of decoder linear `proj` in `layer` with `w` (canonical
/// `[out, in]` row-major): methods that rewrite one layer at a time (pruning)
/// update the model in place instead of rebuilding it.
pub fn set_decoder_weight(llama: &mut Llama, layer: usize, proj: crate::Proj, w: &[f32]) {
    let lin = llama.decoder_linear_mut(layer, proj);
    let [cols, rows] = lin.weight.val().dims();
    assert_eq!(w.len(), rows * cols, "weight of {rows} × {cols} expected");
    let device = lin.weight.val().device();
    lin.weight = Param::from_tensor(transposed(w, rows, cols, &device));
}
