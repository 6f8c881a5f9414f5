//! The reverse of [`Tokenizer::from_gguf`]: the `tokenizer.*` metadata
//! llama.cpp needs to load a byte-level BPE ("gpt2") vocabulary from a GGUF.

use crate::error::{CoreError, Result};
use crate::gguf::MetaValue;
use crate::tokenizer::{TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, Tokenizer, build_gguf_bpe, pre_regexes};
use serde_json::Value;
use std::path::PathBuf;
use tokenizers::Model;

/// ggml token types that `from_gguf` treats as ordinary vocabulary.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNUSED: i32 = 5;

/// `tokenizer.ggml.pre` values tried for a Hugging Face tokenizer, in order:
/// names llama.cpp knows and `pre_regexes` can build.
const PRE_CANDIDATES: [&str; 4] = ["smollm", "llama-bpe", "qwen2", "gpt-2"];

/// Text on which the candidate pre-tokenizers split differently: digit runs,
/// contractions in both cases, whitespace runs and newlines, punctuation runs,
/// punctuation glued to letters, and non-ASCII letters, CJK and emoji.
const PRE_PROBE: &str = "1234567 and 3.14159, 42nd; I'll, you're, DON'T we'd've \
    Hello  world   three\tspaces \n\n\n  indented\r\nline\n \
    !!!??? ...--- (hello) \"quoted\" $var #tag @user x.\n\ny \
    héllo wörld 你好世界 🙂👍 naïve café Ελληνικά  ";

/// `tokenizer.*` metadata entries, in the order llama.cpp's converter writes them.
pub fn gguf_tokenizer_metadata(tok: &Tokenizer) -> Result<Vec<(String, MetaValue)>> {
    // The tokenizer has no file of its own; errors name where it came from.
    let origin = PathBuf::from(format!("tokenizer ({})", tok.kind));
    let unsupported = |what, detail: String| CoreError::Unsupported {
        path: origin.clone(),
        what,
        detail,
    };
    let inner = tok.inner();

    let model = serde_json::to_value(inner.get_model())
        .map_err(|e| CoreError::Other(format!("serializing the tokenizer model: {e}")))?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("unknown");
    // llama.cpp's "gpt2" model is BPE over byte-level symbols; anything else
    // (WordPiece, Unigram, SentencePiece-style BPE with byte fallback) is not it.
    let byte_level = [
        serde_json::to_value(inner.get_pre_tokenizer()),
        serde_json::to_value(inner.get_normalizer()),
    ]
    .into_iter()
    .any(|v| v.is_ok_and(|v| has_type(&v, "ByteLevel")));
    if model_type != "BPE" || !byte_level {
        let found = if model_type == "BPE" {
            "a BPE model without a byte-level pre-tokenizer".to_string()
        } else {
            format!("a {model_type} model")
        };
        return Err(unsupported(
            "tokenizer model",
            format!("found {found}; only byte-level BPE (llama.cpp's \"gpt2\") can be written to GGUF"),
        ));
    }

    let (tokens, types) = tokens_and_types(inner);
    let merges = bpe_merges(&model).map_err(|e| unsupported("tokenizer merges", e))?;

    let pre = match tok.kind.strip_prefix("gguf gpt2/") {
        // Built from a GGUF: keep the pre-tokenizer it named.
        Some(pre) => pre.to_string(),
        None => detect_pre(tok, &origin, &tokens, &types, &merges)?.ok_or_else(|| {
            unsupported(
                "pre-tokenizer",
                format!(
                    "it could not be matched to one llama.cpp knows: none of {} tokenizes a probe text the same way",
                    PRE_CANDIDATES.join(", ")
                ),
            )
        })?,
    };

    let strings = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());
    let mut out = vec![
        ("tokenizer.ggml.model".into(), MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), MetaValue::String(pre)),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            strings(merges.into_iter().map(|(a, b)| format!("{a} {b}")).collect()),
        ),
    ];
    // llama.cpp's converter writes the ids as u32, and only those it knows.
    for (key, id) in [("bos", tok.bos_id), ("eos", tok.eos_id)] {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}_token_id"), MetaValue::U32(id)));
        }
    }
    out.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(tok.add_bos)));
    if let Some(t) = &tok.chat_template {
        out.push(("tokenizer.chat_template".into(), MetaValue::String(t.clone())));
    }
    Ok(out)
}

/// Every id's token string and ggml type, in id order. Added tokens are
/// written as their content (what llama.cpp matches in text), typed the way
/// `from_gguf` reads them back: control when special, user-defined otherwise.
fn tokens_and_types(tk: &tokenizers::Tokenizer) -> (Vec<String>, Vec<i32>) {
    let model = tk.get_model();
    let added = tk.get_added_tokens_decoder();
    let n = model
        .get_vocab()
        .into_values()
        .chain(added.keys().copied())
        .max()
        .map_or(0, |m| m as usize + 1);
    (0..n as u32)
        .map(|id| match (added.get(&id), model.id_to_token(id)) {
            (Some(t), _) => {
                let ty = if t.special {
                    TOKEN_TYPE_CONTROL
                } else {
                    TOKEN_TYPE_USER_DEFINED
                };
                (t.content.clone(), ty as i32)
            }
            (None, Some(t)) => (t, TOKEN_TYPE_NORMAL),
            // A hole in the ids: llama.cpp's converter fills it the same way.
            (None, None) => (format!("[PAD{id}]"), TOKEN_TYPE_UNUSED),
        })
        .unzip()
}

/// The BPE merges in rank order, from the serialized model: `"a b"` strings
/// (older tokenizer.json) or `["a", "b"]` pairs (current), depending on the version.
fn bpe_merges(model: &Value) -> std::result::Result<Vec<(String, String)>, String> {
    let list = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or("the BPE model has no merge list")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(p) => match p.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            match pair {
                // GGUF stores a merge as one space-separated string.
                Some((a, b)) if a.contains(' ') || b.contains(' ') => Err(format!(
                    "merge #{i} ({a:?}, {b:?}) contains a space, which a GGUF merge list cannot hold"
                )),
                Some(p) => Ok(p),
                None => Err(format!("merge #{i} is neither \"a b\" nor [\"a\", \"b\"]: {m}")),
            }
        })
        .collect()
}

/// The first llama.cpp pre-tokenizer under which a GGUF-style rebuild of this
/// vocabulary tokenizes [`PRE_PROBE`] exactly like `tok` does.
fn detect_pre(
    tok: &Tokenizer,
    origin: &std::path::Path,
    tokens: &[String],
    types: &[i32],
    merges: &[(String, String)],
) -> Result<Option<String>> {
    let want = tok.encode(PRE_PROBE, false)?;
    let types: Vec<i64> = types.iter().map(|&t| t as i64).collect();
    for pre in PRE_CANDIDATES {
        let regexes = pre_regexes(pre).expect("every candidate has regexes");
        let mut cand = build_gguf_bpe(origin, tokens, merges.to_vec(), Some(&types), &regexes)?;
        // Plain text, as `Tokenizer::encode(_, false)` does.
        cand.set_encode_special_tokens(true);
        let got = cand
            .encode_fast(PRE_PROBE, false)
            .map_err(|e| CoreError::Other(format!("tokenizing the probe as {pre:?}: {e}")))?;
        if got.get_ids() == want.as_slice() {
            return Ok(Some(pre.to_string()));
        }
    }
    Ok(None)
}

/// True when `v` or anything nested in it is an object with `"type": ty`.
fn has_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some(ty) || o.values().any(|x| has_type(x, ty)),
        Value::Array(a) => a.iter().any(|x| has_type(x, ty)),
        _ => false,
    }
}
