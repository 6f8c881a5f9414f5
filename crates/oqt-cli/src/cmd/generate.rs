use super::{DeviceArgs, Engine};
use crate::output::print_json;
use clap::Args;
use oqt_core::chat::{ChatMessage, render_chat};
use oqt_core::sampling::SamplingOptions;
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model alias, GGUF file, HF directory or hub id (run in f32 on Burn).
    #[arg(required_unless_present = "bundle", conflicts_with = "bundle")]
    pub model: Option<String>,
    /// An oqt bundle or a GGUF file, run by the integer runtime instead.
    #[arg(long)]
    pub bundle: Option<std::path::PathBuf>,
    /// With --bundle: apply this LoRA adapter (a PEFT directory) unmerged.
    #[arg(long, requires = "bundle")]
    pub adapter: Option<std::path::PathBuf>,
    /// The user's message (or the raw text with --raw).
    #[arg(short, long)]
    pub prompt: String,
    /// Optional system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Continue the prompt as plain text instead of applying the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Maximum new tokens.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Sampling seed (with --temperature above 0): the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print one JSON object with the text and timing instead of streaming.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let (tok, engine) = Engine::load(a.model.as_deref(), a.bundle.as_deref(), &a.device)?;
    let engine = engine.with_adapter(a.adapter.as_deref())?;
    let tok = &tok;
    let prompt_ids = if a.raw {
        tok.encode_document(&a.prompt)?
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &a.prompt));
        let text = render_chat(tok, &msgs)?;
        tracing::debug!(prompt = %text, "rendered chat template");
        // The template writes BOS itself when the model wants one.
        tok.encode(&text, true)?
    };
    let sampling = SamplingOptions {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut ids = Vec::new();
    let mut printed = 0;
    let stdout = std::io::stdout();
    let on_token = |t: u32| {
        ids.push(t);
        if !a.json {
            // Decode everything so far and print the new suffix: multi-byte
            // characters split across tokens come out whole.
            if let Ok(text) = tok.decode(&ids, true)
                && text.len() > printed
                && text.is_char_boundary(printed)
            {
                let mut out = stdout.lock();
                let _ = out.write_all(&text.as_bytes()[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
        }
    };
    let stop = |t: u32| tok.is_stop(t);
    let stats = engine.generate(&prompt_ids, a.max_tokens, sampling, stop, on_token)?;
    let text = tok.decode(&ids, true)?;
    if a.json {
        return print_json(&serde_json::json!({
            "model": a.model,
            "bundle": a.bundle,
            "prompt": a.prompt,
            "text": text,
            "tokens": ids,
            "stats": stats,
        }));
    }
    println!();
    eprintln!(
        "[{} prompt tokens, {:.1} tok/s prefill; {} generated, {:.1} tok/s decode]",
        stats.prompt_tokens, stats.prefill_tok_s, stats.generated_tokens, stats.decode_tok_s
    );
    Ok(())
}
