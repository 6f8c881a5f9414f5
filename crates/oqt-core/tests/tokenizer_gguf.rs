//! GGUF tokenizer metadata written from a `Tokenizer`, checked against the
//! real SmolLM2 GGUF it was read from.

use oqt_core::gguf::{GgmlType, GgufFile, GgufTensorOut, GgufWriter, MetaValue};
use oqt_core::tokenizer_gguf::gguf_tokenizer_metadata;
use oqt_core::{Tokenizer, datasets};
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn original() -> GgufFile {
    let path = oqt_hub::resolve_model("smollm2-135m").expect("default model").path;
    GgufFile::open(path).unwrap()
}

fn as_map(meta: Vec<(String, MetaValue)>) -> BTreeMap<String, MetaValue> {
    let n = meta.len();
    let map: BTreeMap<_, _> = meta.into_iter().collect();
    assert_eq!(map.len(), n, "duplicate keys");
    map
}

fn fixture_texts() -> Vec<String> {
    let dir = datasets::find_shared("fixtures/smollm2-135m-instruct-q4_1").expect("shared fixtures");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    cases
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

/// The entries SmolLM2's tokenizer produces, in the order they are written.
const KEYS: [&str; 9] = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
];

#[test]
fn gguf_tokenizer_metadata_equals_the_original_entries() {
    let g = original();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let meta = gguf_tokenizer_metadata(&tok).unwrap();
    let keys: Vec<&str> = meta.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, KEYS);
    for (k, v) in &meta {
        // Same variant (so the same GGUF type) and the same value.
        assert_eq!(Some(v), g.get(k), "entry `{k}`");
    }
    assert_eq!(as_map(meta)["tokenizer.ggml.pre"], MetaValue::String("smollm".into()));
}

#[test]
fn hf_directory_round_trip_keeps_vocab_merges_types_and_pre() {
    let g = original();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf_json(&dir.path().join("tokenizer.json")).unwrap();
    let token = |id: Option<u32>| tok.token_str(id.unwrap()).unwrap();
    let cfg = json!({
        "bos_token": token(tok.bos_id),
        "eos_token": token(tok.eos_id),
        "add_bos_token": tok.add_bos,
        "chat_template": tok.chat_template,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();

    let hf = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(hf.kind, "hf tokenizer.json");
    let meta = as_map(gguf_tokenizer_metadata(&hf).unwrap());
    for k in KEYS {
        assert_eq!(meta.get(k), g.get(k), "entry `{k}`");
    }
}

#[test]
fn written_gguf_rebuilds_an_identical_tokenizer() {
    let g = original();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()));
    for (k, v) in gguf_tokenizer_metadata(&tok).unwrap() {
        w.meta(&k, v);
    }
    // A file with metadata only would do for oqt; a tensor keeps it an ordinary model file.
    w.tensor(GgufTensorOut {
        name: "dummy".into(),
        dims: vec![4],
        ty: GgmlType::F32,
        data: [1f32, 2., 3., 4.].iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok.gguf");
    w.write(&path).unwrap();

    let back = GgufFile::open(&path).unwrap();
    let rebuilt = Tokenizer::from_gguf(&back).unwrap();
    assert_eq!(rebuilt.kind, tok.kind);
    assert_eq!(rebuilt.vocab_size(), tok.vocab_size());
    assert_eq!(
        (rebuilt.bos_id, rebuilt.eos_id, rebuilt.add_bos, &rebuilt.chat_template),
        (tok.bos_id, tok.eos_id, tok.add_bos, &tok.chat_template)
    );
    let texts = fixture_texts();
    assert!(!texts.is_empty());
    for text in &texts {
        for special in [false, true] {
            assert_eq!(
                rebuilt.encode(text, special).unwrap(),
                tok.encode(text, special).unwrap(),
                "text {text:?}, parse_special {special}"
            );
        }
    }
}

#[test]
fn non_bpe_tokenizer_is_refused_by_name() {
    // A minimal WordLevel tokenizer.json: not something llama.cpp's "gpt2" model can hold.
    let dir = tempfile::tempdir().unwrap();
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let err = gguf_tokenizer_metadata(&tok).unwrap_err().to_string();
    assert!(err.contains("WordLevel") && err.contains("byte-level BPE"), "{err}");
}

const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Hugging Face's byte-level pre-tokenizer with GPT-2's split (what GPT-2 ships).
fn hf_byte_level() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
}

/// How SmolLM2 ships: single digits, then GPT-2's byte-level split.
fn hf_smollm() -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true}, hf_byte_level()]})
}

/// A regex split followed by the byte mapping alone (how Llama 3 and Qwen2 ship).
fn hf_regex(re: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
}

/// Load `tokenizer.json` (as JSON) from a fresh directory.
fn load_hf(tj: &Value) -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    Tokenizer::from_hf_dir(dir.path()).unwrap()
}

fn detected_pre(tok: &Tokenizer) -> String {
    let meta = as_map(gguf_tokenizer_metadata(tok).unwrap());
    meta["tokenizer.ggml.pre"].as_str().unwrap().to_string()
}

#[test]
fn smollm2_pre_tokenizer_is_detected_in_hugging_face_form() {
    let tok = Tokenizer::from_gguf(&original()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tj_path = dir.path().join("tokenizer.json");
    tok.save_hf_json(&tj_path).unwrap();
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(&tj_path).unwrap()).unwrap();
    let with_pre = |pre_tokenizer: Value| {
        let mut tj = tj.clone();
        tj["pre_tokenizer"] = pre_tokenizer;
        load_hf(&tj)
    };

    assert_eq!(detected_pre(&with_pre(hf_smollm())), "smollm");
    // SmolLM2 has no multi-digit tokens, so digit grouping never shows:
    // GPT-2's split behaves exactly like "smollm", Qwen2's like "llama-bpe".
    assert_eq!(detected_pre(&with_pre(hf_byte_level())), "smollm");
    assert_eq!(detected_pre(&with_pre(hf_regex(LLAMA3_REGEX))), "llama-bpe");
    assert_eq!(detected_pre(&with_pre(hf_regex(QWEN2_REGEX))), "llama-bpe");

    // Whitespace splitting is nothing llama.cpp knows.
    let ws = json!({"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]});
    let err = gguf_tokenizer_metadata(&with_pre(ws)).unwrap_err().to_string();
    assert!(err.contains("could not be matched"), "{err}");
}

/// GPT-2's byte → symbol table (`bytes_to_unicode`), indexed by byte.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// A tiny byte-level BPE whose merges make each candidate's split visible:
/// digit runs ("1234"), an uppercase contraction ("'T") and newline pairs.
fn tiny_bpe(pre_tokenizer: Value, legacy_merges: bool) -> Value {
    let mut vocab: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    let pairs = [("1", "2"), ("3", "4"), ("12", "34"), ("'", "T"), ("Ċ", "Ċ")];
    vocab.extend(pairs.iter().map(|(a, b)| format!("{a}{b}")));
    let merges: Vec<Value> = pairs
        .iter()
        .map(|(a, b)| {
            if legacy_merges {
                json!(format!("{a} {b}"))
            } else {
                json!([a, b])
            }
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = vocab.into_iter().enumerate().map(|(i, t)| (t, json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": vocab.len(), "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

#[test]
fn pre_tokenizer_candidates_are_told_apart() {
    for (pre_tokenizer, want) in [
        (hf_smollm(), "smollm"),
        (hf_byte_level(), "gpt-2"),
        (hf_regex(LLAMA3_REGEX), "llama-bpe"),
        (hf_regex(QWEN2_REGEX), "qwen2"),
    ] {
        for legacy in [false, true] {
            let tok = load_hf(&tiny_bpe(pre_tokenizer.clone(), legacy));
            let meta = as_map(gguf_tokenizer_metadata(&tok).unwrap());
            assert_eq!(
                meta["tokenizer.ggml.pre"].as_str(),
                Some(want),
                "legacy merges {legacy}"
            );
            // Both merge formats come out as "a b" strings in rank order.
            let merges = meta["tokenizer.ggml.merges"].as_array().unwrap();
            assert_eq!(merges.len(), 5);
            assert_eq!(merges[2], MetaValue::String("12 34".into()));
            // The added special token is last, typed control.
            let types = meta["tokenizer.ggml.token_type"].as_array().unwrap();
            assert_eq!(types.len(), 262);
            assert_eq!(types[261], MetaValue::I32(3));
            assert_eq!(types[0], MetaValue::I32(1));
        }
    }
}
