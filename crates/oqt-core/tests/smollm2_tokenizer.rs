//! The GGUF-built tokenizer against llama.cpp's token ids on the real model.

use oqt_core::gguf::GgufFile;
use oqt_core::{Tokenizer, datasets};
use serde_json::Value;

fn tokenizer() -> Tokenizer {
    let path = oqt_hub::resolve_model("smollm2-135m").expect("default model").path;
    Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
}

fn fixture(name: &str) -> Value {
    let dir = datasets::find_shared("fixtures/smollm2-135m-instruct-q4_1").expect("shared fixtures");
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn every_fixture_case_tokenizes_like_llama_cpp() {
    let tok = tokenizer();
    let cases = fixture("tokenizer_cases.json");
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&case["ids"]), "text {text:?}");
    }
}

#[test]
fn special_tokens_parse_only_when_asked() {
    let tok = tokenizer();
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert!(!tok.add_bos);
    assert_eq!(tok.eos_id, Some(2));
    assert_eq!(
        tok.decode(&tok.encode("Hello world", false).unwrap(), false).unwrap(),
        "Hello world"
    );
}

#[test]
fn wikitext2_test_split_has_the_reference_token_count() {
    let tok = tokenizer();
    let text = datasets::resolve("wikitext2").unwrap().read_text().unwrap();
    let ids = tok.encode_document(&text).unwrap();
    assert_eq!(ids.len(), 304_830);
    let fx = fixture("reference_logits.json");
    assert_eq!(ids[..128], ids_of(&fx["tokens"])[..]);
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids(v)
}

#[test]
fn chat_template_renders_smollm2_prompt() {
    let tok = tokenizer();
    let prompt = oqt_core::chat::render_chat(&tok, &[oqt_core::chat::ChatMessage::new("user", "Hi")]).unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
    assert!(
        prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt}"
    );
}
