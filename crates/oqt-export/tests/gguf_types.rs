//! Type selection and structure of GGUF exports, on a tiny synthetic model.

use oqt_core::config::Llama3RopeScaling;
use oqt_core::gguf::{GgmlType, GgufFile};
use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
use oqt_core::{LlamaConfig, load_model};
use oqt_export::ExportSource;
use oqt_export::gguf::{Encoding, GgufOptions, export_gguf};

fn tiny(dir: &std::path::Path, cfg: &LlamaConfig) -> ExportSource {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, cfg, &random_weights(cfg, 3)).unwrap();
    ExportSource::from_model(load_model(&path).unwrap())
}

fn types(path: &std::path::Path) -> Vec<(String, GgmlType)> {
    let g = GgufFile::open(path).unwrap();
    g.tensors.iter().map(|t| (t.name.clone(), t.ty)).collect()
}

#[test]
fn four_bit_exports_keep_embeddings_at_q8_0_and_norms_at_f32_and_honour_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny(dir.path(), &tiny_config());
    let out = dir.path().join("q4.gguf");
    let opts = GgufOptions {
        default_type: Some(GgmlType::Q4_0),
        overrides: vec!["ffn_down=q8_0".parse().unwrap()],
        allow_requantize: false,
    };
    let report = export_gguf(&src, &opts, &out).unwrap();
    assert_eq!(report.file_type, "Q4_0");
    for (name, ty) in types(&out) {
        let want = if name == "token_embd.weight" || name.contains("ffn_down") {
            GgmlType::Q8_0
        } else if name.ends_with("norm.weight") {
            GgmlType::F32
        } else {
            GgmlType::Q4_0
        };
        assert_eq!(ty, want, "{name}");
    }
    // Float weights are quantized with ggml's quantizer; norms stay exact.
    assert!(report.tensors.iter().all(|t| match t.ty {
        "F32" => t.encoding == Encoding::Exact,
        _ => t.encoding == Encoding::Quantized,
    }));
    // `auto` on a float model is F16 for matrices.
    let f16 = dir.path().join("f16.gguf");
    export_gguf(&src, &GgufOptions::default(), &f16).unwrap();
    assert!(types(&f16).iter().all(|(n, t)| *t
        == if n.ends_with("norm.weight") {
            GgmlType::F32
        } else {
            GgmlType::F16
        }));
}

#[test]
fn f32_export_reloads_to_the_same_model_and_llama3_scaling_becomes_rope_freqs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = false;
    cfg.rope_scaling = Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    });
    let w = random_weights(&cfg, 4);
    let src = ExportSource {
        path: dir.path().join("src"),
        name: "tiny".into(),
        config: cfg.clone(),
        tokenizer: tiny(dir.path(), &tiny_config()).tokenizer,
        tensors: w
            .names()
            .map(|n| (n.clone(), oqt_export::SourceTensor::Float(w.get(n).unwrap().clone())))
            .collect(),
        activations: None,
        palettized: Vec::new(),
    };
    let out = dir.path().join("f32.gguf");
    let opts = GgufOptions {
        default_type: Some(GgmlType::F32),
        ..Default::default()
    };
    export_gguf(&src, &opts, &out).unwrap();
    let back = load_model(&out).unwrap();
    assert!(!back.config.tie_word_embeddings);
    for (a, b) in cfg.rope_inv_freq().iter().zip(back.config.rope_inv_freq()) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    for n in w.names() {
        assert_eq!(w.get(n).unwrap(), back.weights.get(n).unwrap(), "{n}");
    }
}
