//! Training text for quantization-aware training: plain text, or instruction
//! data as JSON Lines rendered through a prompt template into one token stream
//! (examples in file order, so the held-out tail is whole examples but the last).
//!
//! Each JSONL line is an object with one of
//! * `"text"`: used as is;
//! * `"messages"`: `[{"role", "content"}, …]`, rendered with the model's chat template;
//! * a prompt (`"prompt"`, `"instruction"` or `"question"`, plus `"input"`
//!   appended when present) and a response (`"response"`, `"output"`,
//!   `"completion"` or `"answer"`).
//!
//! Prompt/response pairs use `--prompt-template` when given (`{prompt}` and
//! `{response}` are replaced), else the model's chat template (a user turn,
//! the assistant's response, end-of-sequence), else `"{prompt}\n{response}"`.

use oqt_core::chat::{ChatMessage, render_chat};
use oqt_core::tokenizer::Tokenizer;
use oqt_core::{CoreError, Result};
use serde_json::Value;
use std::path::Path;

const PROMPT_KEYS: [&str; 3] = ["prompt", "instruction", "question"];
const RESPONSE_KEYS: [&str; 4] = ["response", "output", "completion", "answer"];

/// Whether `path` holds JSON Lines (by extension).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "jsonl")
}

/// Token ids of the examples in the JSONL file `path`, concatenated.
pub fn jsonl_tokens(tok: &Tokenizer, path: &Path, template: Option<&str>) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    let mut ids = Vec::new();
    let mut examples = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| CoreError::Malformed {
            path: path.to_path_buf(),
            format: "JSON Lines training data",
            reason: format!("line {}: {reason}", i + 1),
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let rendered = render_example(tok, &v, template).map_err(bad)?;
        ids.extend(tok.encode(&rendered, true)?);
        examples += 1;
    }
    if examples == 0 {
        return Err(CoreError::Malformed {
            path: path.to_path_buf(),
            format: "JSON Lines training data",
            reason: "no examples (one JSON object a line expected)".into(),
        });
    }
    Ok(ids)
}

fn render_example(tok: &Tokenizer, v: &Value, template: Option<&str>) -> std::result::Result<String, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let string = |k: &str| obj.get(k).and_then(Value::as_str);
    if let Some(t) = string("text") {
        return Ok(t.to_string());
    }
    if let Some(m) = obj.get("messages") {
        let messages = m
            .as_array()
            .ok_or("\"messages\": expected an array")?
            .iter()
            .map(|m| {
                match (
                    m.get("role").and_then(Value::as_str),
                    m.get("content").and_then(Value::as_str),
                ) {
                    (Some(r), Some(c)) => Ok(ChatMessage::new(r, c)),
                    _ => Err("\"messages\": each needs string \"role\" and \"content\"".to_string()),
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // The template ends with the assistant's prompt; the last turn is already in it.
        let rendered = render_chat(tok, &messages).map_err(|e| e.to_string())?;
        return Ok(format!("{rendered}{}", eos_text(tok)));
    }
    let prompt = PROMPT_KEYS.iter().find_map(|k| string(k)).ok_or_else(|| {
        format!(
            "expected \"text\", \"messages\", or a prompt ({}) with a response ({})",
            PROMPT_KEYS.join(", "),
            RESPONSE_KEYS.join(", ")
        )
    })?;
    let prompt = match string("input").filter(|s| !s.is_empty()) {
        Some(input) => format!("{prompt}\n\n{input}"),
        None => prompt.to_string(),
    };
    let response = RESPONSE_KEYS
        .iter()
        .find_map(|k| string(k))
        .ok_or_else(|| format!("a prompt needs a response ({})", RESPONSE_KEYS.join(", ")))?;
    if let Some(t) = template {
        return Ok(t.replace("{prompt}", &prompt).replace("{response}", response));
    }
    if tok.chat_template.is_some() {
        let head = render_chat(tok, &[ChatMessage::new("user", &prompt)]).map_err(|e| e.to_string())?;
        return Ok(format!("{head}{response}{}", eos_text(tok)));
    }
    Ok(format!("{prompt}\n{response}"))
}

/// The end-of-sequence token as text (empty when the model names none).
fn eos_text(tok: &Tokenizer) -> String {
    tok.eos_id.and_then(|i| tok.token_str(i)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let cfg = tiny_config();
        write_tiny_gguf(&path, &cfg, &random_weights(&cfg, 1)).unwrap();
        oqt_core::load::load_model(&path).unwrap().tokenizer
    }

    #[test]
    fn prompt_response_pairs_follow_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"instruction\": \"add\", \"input\": \"1 2\", \"output\": \"3\"}\n\n{\"text\": \"plain\"}\n",
        )
        .unwrap();
        let tok = tokenizer();
        let ids = jsonl_tokens(&tok, &p, Some("Q: {prompt}\nA: {response}\n")).unwrap();
        let expected = [
            tok.encode("Q: add\n\n1 2\nA: 3\n", true).unwrap(),
            tok.encode("plain", true).unwrap(),
        ]
        .concat();
        assert_eq!(ids, expected);
    }

    #[test]
    fn bad_lines_name_the_file_line_and_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"ok\"}\n{\"prompt\": \"no answer\"}\n").unwrap();
        let e = jsonl_tokens(&tokenizer(), &p, None).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl") && e.contains("line 2") && e.contains("response"),
            "{e}"
        );
        std::fs::write(&p, "not json\n").unwrap();
        let e = jsonl_tokens(&tokenizer(), &p, None).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::write(&p, "\n\n").unwrap();
        let e = jsonl_tokens(&tokenizer(), &p, None).unwrap_err().to_string();
        assert!(e.contains("no examples"), "{e}");
    }
}
