use super::{DeviceArgs, load_burn};
use crate::output::print_json;
use anyhow::Context;
use clap::Args;
use oqt_eval::{PerplexityOptions, perplexity};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// Dataset name (wikitext2, tinyshakespeare) or a text file.
    #[arg(long, default_value = "wikitext2")]
    pub dataset: String,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first N chunks.
    #[arg(long)]
    pub max_chunks: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print one JSON object (with a numeric `perplexity` field) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let dataset = oqt_core::datasets::resolve(&a.dataset)?;
    let (loaded, model) = load_burn(&a.model, &a.device)?;
    let text = dataset.read_text()?;
    let tokens = loaded
        .tokenizer
        .encode(&text, false)
        .context("tokenizing the dataset")?;
    let opts = PerplexityOptions {
        ctx: a.ctx,
        max_chunks: a.max_chunks,
        bos: loaded.tokenizer.add_bos.then_some(loaded.tokenizer.bos_id).flatten(),
    };
    let chunks = opts
        .max_chunks
        .map_or(tokens.len() / a.ctx, |m| m.min(tokens.len() / a.ctx));
    let pb = crate::output::bar(chunks as u64, "perplexity");
    let report = perplexity(&model, &tokens, &opts, |p| {
        pb.set_position(p.chunk as u64);
        pb.set_message(format!("ppl {:.4}", p.running_perplexity));
    })?;
    pb.finish_and_clear();
    let peak = oqt_core::sys::peak_rss_mib();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        let o = v.as_object_mut().expect("report is an object");
        o.insert("model".into(), a.model.clone().into());
        o.insert("model_path".into(), loaded.path.display().to_string().into());
        o.insert("dataset".into(), dataset.name.clone().into());
        o.insert("engine".into(), "burn-f32".into());
        o.insert("peak_rss_mib".into(), serde_json::json!(peak));
        return print_json(&v);
    }
    println!(
        "{} on {} (ctx {}, {} of {} chunks, {} predictions)",
        loaded.name, dataset.name, report.ctx, report.chunks, report.chunks_available, report.scored_tokens
    );
    println!(
        "perplexity {:.4}   mean NLL {:.5}   top-1 {:.2}%",
        report.perplexity,
        report.mean_nll,
        100.0 * report.top1_accuracy
    );
    println!(
        "{:.1} s, {:.0} tokens/s{}",
        report.seconds,
        report.tokens_per_second,
        peak.map(|p| format!(", peak RSS {p:.0} MiB")).unwrap_or_default()
    );
    Ok(())
}
