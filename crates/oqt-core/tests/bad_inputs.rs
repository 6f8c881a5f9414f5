//! Broken or foreign inputs produce errors that name the file, the field and
//! what was expected — never a panic or a silently wrong model.

use oqt_core::gguf::GgufFile;
use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf, write_tiny_hf_dir};
use oqt_core::{CoreError, load_model};
use std::path::{Path, PathBuf};

fn tiny_gguf(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    let cfg = tiny_config();
    write_tiny_gguf(&p, &cfg, &random_weights(&cfg, 1)).unwrap();
    p
}

fn err_of(path: &Path) -> String {
    load_model(path).unwrap_err().to_string()
}

#[test]
fn truncated_real_gguf_is_reported_as_truncated() {
    let model = oqt_hub::resolve_model("smollm2-135m").unwrap().path;
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&model).unwrap();
    // Mid-data: the header parses, the tensor table points past the end.
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let msg = err_of(&cut);
    assert!(msg.contains("cut.gguf") && msg.contains("truncated"), "{msg}");
    // Mid-header: inside the vocabulary array.
    std::fs::write(&cut, &bytes[..200_000]).unwrap();
    let msg = err_of(&cut);
    assert!(msg.contains("truncated") && msg.contains("tokenizer.ggml"), "{msg}");
}

#[test]
fn foreign_file_and_newer_version_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.bin");
    std::fs::write(&p, b"PK\x03\x04 definitely not gguf").unwrap();
    let msg = err_of(&p);
    assert!(msg.contains("x.bin") && msg.contains("not a GGUF file"), "{msg}");

    let good = tiny_gguf(dir.path());
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[4..8].copy_from_slice(&4u32.to_le_bytes());
    std::fs::write(&good, &bytes).unwrap();
    let msg = err_of(&good);
    assert!(msg.contains("GGUF version") && msg.contains('4'), "{msg}");
}

#[test]
fn unknown_tensor_type_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_gguf(dir.path());
    let mut bytes = std::fs::read(&p).unwrap();
    // Find the tensor-table entry of the first layer's Q projection and set its type to 6 (Q5_0).
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    let type_at = at + name.len() + 4 + 2 * 8;
    bytes[type_at..type_at + 4].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let err = GgufFile::open(&p).unwrap_err();
    assert!(matches!(err, CoreError::Unsupported { .. }));
    let msg = err.to_string();
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("Q5_0"), "{msg}");
}

#[test]
fn missing_metadata_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_gguf(dir.path());
    let mut bytes = std::fs::read(&p).unwrap();
    let key = b"llama.feed_forward_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at..at + key.len()].copy_from_slice(b"llama.feed_forward_lengtX");
    std::fs::write(&p, &bytes).unwrap();
    let msg = err_of(&p);
    assert!(
        msg.contains("missing metadata key `llama.feed_forward_length`"),
        "{msg}"
    );
}

fn tiny_hf(dir: &Path) -> PathBuf {
    let gguf = tiny_gguf(dir);
    let hf = dir.join("hf");
    let cfg = tiny_config();
    write_tiny_hf_dir(&hf, &cfg, &random_weights(&cfg, 1), &gguf).unwrap();
    hf
}

#[test]
fn hf_config_missing_field_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf(dir.path());
    let cfg_path = hf.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"num_hidden_layers\"", "\"n_layers\"");
    std::fs::write(&cfg_path, text).unwrap();
    let msg = err_of(&hf);
    assert!(
        msg.contains("config.json") && msg.contains("num_hidden_layers"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_names_file() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf(dir.path());
    let st = hf.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1000]).unwrap();
    let msg = err_of(&hf);
    assert!(
        msg.contains("model.safetensors") && msg.contains("malformed safetensors"),
        "{msg}"
    );
}

#[test]
fn hf_dir_without_weights_or_tokenizer_says_which_file() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf(dir.path());
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    assert!(err_of(&hf).contains("missing file `tokenizer.json`"));
    std::fs::create_dir(dir.path().join("b")).unwrap();
    let hf = tiny_hf(&dir.path().join("b"));
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    assert!(err_of(&hf).contains("model.safetensors"));
}

#[test]
fn wrong_tensor_shape_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf(dir.path());
    let hf = dir.path().join("hf");
    let mut cfg = tiny_config();
    let w = random_weights(&cfg, 1);
    cfg.intermediate_size = 100; // config.json disagrees with the tensors
    write_tiny_hf_dir(&hf, &cfg, &w, &gguf).unwrap();
    let msg = err_of(&hf);
    assert!(
        msg.contains("mlp.gate_proj.weight") && msg.contains("[100, 64]") && msg.contains("[96, 64]"),
        "{msg}"
    );
}

#[test]
fn tiny_gguf_and_hf_load_to_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf(dir.path());
    let a = load_model(&dir.path().join("tiny.gguf")).unwrap();
    let b = load_model(&hf).unwrap();
    // GGUF stores epsilon as f32.
    assert!((a.config.rms_norm_eps - b.config.rms_norm_eps).abs() < 1e-12);
    let mut a_cfg = a.config.clone();
    a_cfg.rms_norm_eps = b.config.rms_norm_eps;
    assert_eq!(a_cfg, b.config);
    for name in a.weights.names() {
        assert_eq!(a.weights.get(name), b.weights.get(name), "{name}");
    }
    assert_eq!(
        a.tokenizer.encode("the cat in the hat", false).unwrap(),
        b.tokenizer.encode("the cat in the hat", false).unwrap()
    );
}
