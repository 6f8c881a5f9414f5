//! Small synthetic models for tests of every crate: a tiny random Llama with a
//! byte-level tokenizer, written as GGUF (llama.cpp layout) and as an HF directory.

use crate::config::LlamaConfig;
use crate::gguf::{GgmlType, GgufTensorOut, GgufWriter, MetaValue};
use crate::weights::{ModelWeights, TensorF32, permute_rotary_rows};
use std::path::Path;

/// The tiny architecture: 2 layers, GQA 4/2 heads of 16, vocab 300.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 300,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_scaling: None,
        rope_freq_factors: None,
        layer_intermediate_sizes: None,
    }
}

/// The largest elementwise `|a − b|`: how far two logit vectors moved.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Deterministic pseudo-random values in [-scale, scale] (SplitMix64).
pub fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Random weights for `cfg` in canonical layout (norms near 1).
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> ModelWeights {
    let mut w = ModelWeights::default();
    for (i, (name, shape)) in ModelWeights::expected(cfg).into_iter().enumerate() {
        let n = shape.iter().product();
        let data = if shape.len() == 1 {
            pseudo_random(n, seed + i as u64, 0.2)
                .into_iter()
                .map(|v| 1.0 + v)
                .collect()
        } else {
            pseudo_random(n, seed + i as u64, 0.15)
        };
        w.insert(name, TensorF32::new(shape, data), "F32");
    }
    w
}

/// GPT-2's byte → printable-character table used by byte-level BPE vocabularies.
pub fn byte_level_alphabet() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = vec![0u32; 256];
    for &b in &printable {
        chars[b as usize] = b;
    }
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = next;
            next += 1;
        }
    }
    printable.clear();
    chars
        .into_iter()
        .map(|c| char::from_u32(c).unwrap().to_string())
        .collect()
}

/// Vocabulary of the tiny model: 256 byte tokens, a few merges, two control tokens.
fn tiny_vocab(vocab_size: usize) -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens = byte_level_alphabet();
    let mut merges = Vec::new();
    for (a, b) in [("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("Ġ", "a")] {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    let mut types = vec![1; tokens.len()];
    for special in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(special.into());
        types.push(3);
    }
    while tokens.len() < vocab_size {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(5);
    }
    (tokens, merges, types)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write a GGUF the way llama.cpp's converter does (Q/K rows permuted, F32 tensors).
pub fn write_tiny_gguf(path: &Path, cfg: &LlamaConfig, w: &ModelWeights) -> crate::Result<()> {
    let mut g = GgufWriter::new();
    let s = |v: &str| MetaValue::String(v.into());
    let u = |v: usize| MetaValue::U32(v as u32);
    g.meta("general.architecture", s("llama"))
        .meta("general.name", s("tiny-test"));
    for (k, v) in cfg.gguf_metadata() {
        g.meta(&k, v);
    }
    let (tokens, merges, types) = tiny_vocab(cfg.vocab_size);
    g.meta("tokenizer.ggml.model", s("gpt2"))
        .meta("tokenizer.ggml.pre", s("smollm"))
        .meta("tokenizer.ggml.tokens", MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()))
        .meta("tokenizer.ggml.token_type", MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()))
        .meta("tokenizer.ggml.merges", MetaValue::Array(merges.into_iter().map(MetaValue::String).collect()))
        .meta("tokenizer.ggml.bos_token_id", u(261))
        .meta("tokenizer.ggml.eos_token_id", u(262))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .meta(
            "tokenizer.chat_template",
            s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        );
    for name in w.names() {
        let mut t = w.get(name).unwrap().clone();
        if let Some(h) = cfg.rotary_heads(name) {
            t = permute_rotary_rows(&t, h);
        }
        g.tensor(GgufTensorOut {
            name: crate::load::gguf_tensor_name(name).expect("a llama tensor"),
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            ty: GgmlType::F32,
            data: f32_bytes(&t.data),
        })?;
    }
    g.write(path)
}

/// Write an HF directory (config.json, model.safetensors, tokenizer.json) for the same model.
pub fn write_tiny_hf_dir(dir: &Path, cfg: &LlamaConfig, w: &ModelWeights, tokenizer_from: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::CoreError::io(dir, e))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
    });
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).unwrap()).map_err(|e| crate::CoreError::io(&p, e))?;
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = w
        .names()
        .map(|n| {
            let t = w.get(n).unwrap();
            (n.clone(), f32_bytes(&t.data), t.shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let p = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &p)
        .map_err(|e| crate::CoreError::Other(format!("{}: {e}", p.display())))?;
    let tok = crate::Tokenizer::from_gguf(&crate::gguf::GgufFile::open(tokenizer_from)?)?;
    tok.save_hf_json(&dir.join("tokenizer.json"))?;
    let tc = serde_json::json!({"eos_token": "<|im_end|>", "add_bos_token": false});
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, tc.to_string()).map_err(|e| crate::CoreError::io(&p, e))
}
