//! Chat templates (Jinja, as stored in GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja.

use crate::error::{CoreError, Result};
use crate::tokenizer::Tokenizer;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Render `messages` with the model's chat template, ending with the prompt
/// for the assistant's turn.
pub fn render_chat(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<String> {
    let template = tok.chat_template.as_deref().ok_or_else(|| {
        CoreError::Other("the model has no chat template; pass --raw to generate from plain text".into())
    })?;
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| CoreError::Other(format!("chat template does not parse: {e}")))?;
    let tpl = env.get_template("chat").expect("just added");
    let token = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or_default();
    tpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => token(tok.bos_id),
        eos_token => token(tok.eos_id),
    })
    .map_err(|e| CoreError::Other(format!("rendering the chat template failed: {e}")))
}
