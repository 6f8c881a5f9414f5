//! Write a GGUF with a real model's shapes and random weights, for measuring
//! what a pipeline costs on a model this machine cannot download (memory
//! bounds of `oqt quantize` on a 1B model, for instance). The weights are
//! noise and the vocabulary is a byte-level toy padded to the model's size:
//! perplexities mean nothing, shapes and memory are the real ones.
//!
//! ```text
//! cargo run --release -p oqt-core --example synthetic_gguf -- llama-3.2-1b /tmp/llama-3.2-1b-synthetic.gguf
//! ```

use oqt_core::LlamaConfig;
use oqt_core::testing::{random_weights, write_tiny_gguf};

/// Llama-3.2-1B's shapes (config.json of meta-llama/Llama-3.2-1B); the llama3
/// rope scaling is left out (it changes no shape or memory).
fn llama_3_2_1b() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 2048,
        intermediate_size: 8192,
        num_layers: 16,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 64,
        vocab_size: 128_256,
        rope_theta: 500_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_scaling: None,
        rope_freq_factors: None,
        layer_intermediate_sizes: None,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape, out] = args.as_slice() else {
        return Err("usage: synthetic_gguf SHAPE OUTPUT.gguf   (SHAPE: llama-3.2-1b)".into());
    };
    let cfg = match shape.as_str() {
        "llama-3.2-1b" => llama_3_2_1b(),
        other => return Err(format!("unknown shape {other:?}; known: llama-3.2-1b").into()),
    };
    let mut weights = random_weights(&cfg, 1);
    // random_weights draws matrices uniform in ±0.15 (std 0.087), sized for
    // the 64-wide test model; std 0.02 (the usual initialisation) keeps a
    // 2048-wide stack's activations in a realistic range.
    let names: Vec<String> = weights.names().cloned().collect();
    for name in names {
        let t = weights.get_mut(&name).expect("listed tensor");
        if t.shape.len() == 2 {
            t.data.iter_mut().for_each(|v| *v *= 0.02 / 0.0866);
        }
    }
    write_tiny_gguf(std::path::Path::new(out), &cfg, &weights)?;
    println!("wrote {out}");
    Ok(())
}
