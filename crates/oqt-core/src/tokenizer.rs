//! Tokenizers for GGUF models (built in memory from the GGUF vocabulary, the
//! way llama.cpp builds its own) and for Hugging Face directories
//! (`tokenizer.json`), behind one type.

use crate::error::{CoreError, Result};
use crate::gguf::GgufFile;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// GPT-2's pre-tokenizer split.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex sequence llama.cpp applies for a `tokenizer.ggml.pre` value.
pub(crate) fn pre_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt-2" | "gpt2" => vec![GPT2_REGEX],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![r"\p{N}", GPT2_REGEX]
        }
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => vec![LLAMA3_REGEX],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2_REGEX],
        _ => return None,
    })
}

/// ggml token types (`tokenizer.ggml.token_type`).
pub(crate) const TOKEN_TYPE_CONTROL: i64 = 3;
pub(crate) const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer in serializable form (bundle manifests).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredTokenizer {
    pub kind: String,
    pub tokenizer_json: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

#[derive(Clone)]
pub struct Tokenizer {
    /// Recognizes special tokens written in the text (chat templates need this).
    with_special: tokenizers::Tokenizer,
    /// Treats everything as plain text (datasets, llama.cpp's default).
    plain: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Extra ids that also end generation (e.g. Llama 3's `<|eot_id|>`).
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// Where it came from, for `inspect`: e.g. "gguf gpt2/smollm".
    pub kind: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos_id)
            .field("eos", &self.eos_id)
            .finish()
    }
}

fn tok_err(path: &Path, what: &str, e: impl std::fmt::Display) -> CoreError {
    CoreError::Malformed {
        path: path.into(),
        format: "tokenizer",
        reason: format!("{what}: {e}"),
    }
}

/// The byte-level BPE tokenizer llama.cpp builds from a GGUF vocabulary: BPE
/// over `tokens` (id order) and `merges`, split by `regexes`, with the control
/// and user-defined tokens of `types` added. Shared by `from_gguf` and the GGUF exporter's
/// pre-tokenizer detection, so both build exactly the same thing.
pub(crate) fn build_gguf_bpe<S: AsRef<str>>(
    path: &Path,
    tokens: &[S],
    merges: Vec<(String, String)>,
    types: Option<&[i64]>,
    regexes: &[&str],
) -> Result<tokenizers::Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_ref().to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err(path, "building BPE from tokenizer.ggml.tokens/merges", e))?;

    let mut tk = tokenizers::Tokenizer::new(bpe);
    let mut pre_tokenizers: Vec<PreTokenizerWrapper> = Vec::new();
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(path, "pre-tokenizer regex", e))?;
        pre_tokenizers.push(split.into());
    }
    // Byte-level mapping only; the splitting was done by the regexes above.
    pre_tokenizers.push(ByteLevel::new(false, false, false).into());
    tk.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));

    if let Some(types) = types {
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(i, t)| AddedToken::from(tokens[i].as_ref().to_string(), *t == TOKEN_TYPE_CONTROL))
            .collect();
        tk.add_special_tokens(added)
            .map_err(|e| tok_err(path, "adding control tokens", e))?;
    }
    Ok(tk)
}

impl Tokenizer {
    fn finish(
        with_special: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
        kind: String,
    ) -> Self {
        let mut plain = with_special.clone();
        plain.set_encode_special_tokens(true);
        let stop_ids = ["<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| with_special.token_to_id(t))
            .filter(|id| Some(*id) != eos_id)
            .collect();
        Self {
            with_special,
            plain,
            bos_id,
            eos_id,
            stop_ids,
            add_bos,
            chat_template,
            kind,
        }
    }

    /// Build the byte-level BPE tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(CoreError::Unsupported {
                path: path.into(),
                what: "tokenizer",
                detail: format!(
                    "`tokenizer.ggml.model` = {model:?}; oqt builds byte-level BPE (\"gpt2\") tokenizers from GGUF. \
                     For SentencePiece models use the Hugging Face directory (tokenizer.json)"
                ),
            });
        }
        let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let regexes = pre_regexes(pre).ok_or_else(|| CoreError::Unsupported {
            path: path.into(),
            what: "pre-tokenizer",
            detail: format!(
                "`tokenizer.ggml.pre` = {pre:?}; known: default, gpt-2, smollm, starcoder, llama-bpe, qwen2"
            ),
        })?;
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        let types = g.opt_i64_array("tokenizer.ggml.token_type")?;
        if let Some(t) = &types
            && t.len() != tokens.len()
        {
            return Err(CoreError::BadField {
                path: path.into(),
                field: "tokenizer.ggml.token_type".into(),
                expected: format!("{} entries (one per token)", tokens.len()),
                found: t.len().to_string(),
            });
        }

        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| CoreError::BadField {
                        path: path.into(),
                        field: format!("tokenizer.ggml.merges[{i}]"),
                        expected: "two tokens separated by a space".into(),
                        found: format!("{m:?}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let tk = build_gguf_bpe(path, &tokens, merges, types.as_deref(), &regexes)?;

        let id = |k: &str| -> Result<Option<u32>> { Ok(g.opt_u64(k)?.map(|v| v as u32)) };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let template = g.opt_str("tokenizer.chat_template")?.map(str::to_string);
        Ok(Self::finish(
            tk,
            bos,
            eos,
            add_bos,
            template,
            format!("gguf {model}/{pre}"),
        ))
    }

    /// Load `tokenizer.json` (and `tokenizer_config.json` when present) from a directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(CoreError::Missing {
                path: dir.into(),
                what: "file",
                name: "tokenizer.json".into(),
            });
        }
        let tk = tokenizers::Tokenizer::from_file(&tj).map_err(|e| tok_err(&tj, "parsing", e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| tok_err(&cfg_path, "parsing", e))?
        } else {
            serde_json::Value::Null
        };
        // Special token strings may be plain strings or {"content": ...} objects.
        let token_str = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos = token_str("bos_token").and_then(|t| tk.token_to_id(&t));
        let eos = token_str("eos_token").and_then(|t| tk.token_to_id(&t));
        // Whether the post-processor inserts BOS is what actually happens at encode time.
        let add_bos = match cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
            Some(b) => b,
            None => {
                let with = tk.encode("a", true).map_err(|e| tok_err(&tj, "encoding a probe", e))?;
                bos.is_some() && with.get_ids().first().copied() == bos
            }
        };
        let template = cfg.get("chat_template").and_then(|v| v.as_str()).map(str::to_string);
        Ok(Self::finish(
            tk,
            bos,
            eos,
            add_bos,
            template,
            "hf tokenizer.json".into(),
        ))
    }

    /// Token ids of `text`, without BOS. With `parse_special`, special tokens
    /// written in the text (`<|im_start|>`) become their single ids.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special { &self.with_special } else { &self.plain };
        let enc = tk
            .encode_fast(text, false)
            .map_err(|e| CoreError::Other(format!("tokenizing failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The BOS id a document starts with, when the model adds one.
    pub fn document_bos(&self) -> Option<u32> {
        self.add_bos.then_some(self.bos_id).flatten()
    }

    /// Ids as the model expects a document: BOS first when the model adds one.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.document_bos().into_iter().collect();
        ids.extend(self.encode(text, false)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.with_special
            .decode(ids, skip_special)
            .map_err(|e| CoreError::Other(format!("decoding failed: {e}")))
    }

    /// Everything needed to rebuild this tokenizer, as stored in bundles.
    pub fn to_stored(&self) -> Result<StoredTokenizer> {
        Ok(StoredTokenizer {
            kind: self.kind.clone(),
            tokenizer_json: self
                .with_special
                .to_string(false)
                .map_err(|e| CoreError::Other(format!("serializing the tokenizer: {e}")))?,
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            add_bos: self.add_bos,
            chat_template: self.chat_template.clone(),
        })
    }

    pub fn from_stored(s: &StoredTokenizer, origin: &Path) -> Result<Self> {
        let tk: tokenizers::Tokenizer = s
            .tokenizer_json
            .parse()
            .map_err(|e| tok_err(origin, "stored tokenizer.json", e))?;
        Ok(Self::finish(
            tk,
            s.bos_id,
            s.eos_id,
            s.add_bos,
            s.chat_template.clone(),
            s.kind.clone(),
        ))
    }

    /// Write the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_hf_json(&self, path: &Path) -> Result<()> {
        self.with_special
            .save(path, false)
            .map_err(|e| CoreError::Other(format!("{}: writing tokenizer.json: {e}", path.display())))
    }

    /// The wrapped tokenizer (special tokens recognized), for the GGUF exporter.
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.with_special
    }

    pub fn token_str(&self, id: u32) -> Option<String> {
        self.with_special.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.with_special.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.with_special.get_vocab_size(true)
    }

    /// True for ids that end generation.
    pub fn is_stop(&self, id: u32) -> bool {
        Some(id) == self.eos_id || self.stop_ids.contains(&id)
    }
}
