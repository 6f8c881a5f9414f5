//! `oqt bench`: prefill and decode speed, time to first token, peak memory and
//! weight bytes of a bundle on the runtime (or a model in f32 on Burn), on a
//! fixed prompt of real text, greedy, never stopping early.

use super::{DeviceArgs, Engine};
use crate::output::{mib, print_json};
use anyhow::{Context, bail};
use clap::Args;
use oqt_core::generation::GenerationStats;
use oqt_core::sampling::SamplingOptions;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model alias, GGUF file, HF directory or hub id (run in f32 on Burn).
    #[arg(required_unless_present = "bundle", conflicts_with = "bundle")]
    pub model: Option<String>,
    /// An oqt bundle or a GGUF file, run by the integer runtime.
    #[arg(long)]
    pub bundle: Option<std::path::PathBuf>,
    /// Prompt length in tokens (prefill); taken from Tiny Shakespeare.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated after the prompt (decode).
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Timed runs after one warm-up; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print one JSON object (numeric `decode_tok_s`, `prefill_tok_s`, `peak_rss_mib`, …).
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.prompt_tokens == 0 || a.decode_tokens < 2 || a.repeats == 0 {
        bail!("--prompt-tokens must be ≥ 1, --decode-tokens ≥ 2 and --repeats ≥ 1");
    }
    let (tokenizer, engine) = Engine::load(a.model.as_deref(), a.bundle.as_deref(), &a.device)?;
    let name = match (&a.bundle, &a.model) {
        (Some(b), _) => b.display().to_string(),
        (None, m) => m.clone().unwrap_or_default(),
    };
    let weight_bytes = engine.weight_bytes();
    let text = oqt_core::datasets::resolve("tinyshakespeare")?.read_text()?;
    let mut prompt = tokenizer.encode_document(&text[..text.len().min(64 * a.prompt_tokens)])?;
    if prompt.len() < a.prompt_tokens {
        bail!("the prompt text gave only {} tokens", prompt.len());
    }
    prompt.truncate(a.prompt_tokens);
    let greedy = SamplingOptions {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    let run_once = || -> anyhow::Result<GenerationStats> {
        let never = |_: u32| false;
        Ok(engine.generate(&prompt, a.decode_tokens, greedy, never, |_| {})?)
    };
    let pb = crate::output::bar(a.repeats as u64 + 1, "benchmarking");
    run_once().context("warm-up run")?;
    pb.inc(1);
    let mut runs = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        runs.push(run_once()?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let pick = |f: fn(&GenerationStats) -> f64| median(runs.iter().map(f).collect());
    let prefill = pick(|s| s.prefill_tok_s);
    let decode = pick(|s| s.decode_tok_s);
    let ttft = pick(|s| s.time_to_first_token_s);
    let peak = oqt_core::sys::peak_rss_mib();
    let engine_name = engine.name();
    let threads = rayon::current_num_threads();
    if a.json {
        return print_json(&serde_json::json!({
            "model": name,
            "engine": engine_name,
            "threads": threads,
            "prompt_tokens": a.prompt_tokens,
            "decode_tokens": a.decode_tokens,
            "repeats": a.repeats,
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
            "time_to_first_token_s": ttft,
            "peak_rss_mib": peak,
            "weight_bytes": weight_bytes,
        }));
    }
    println!(
        "{name} ({engine_name}, {threads} threads, median of {} runs)",
        a.repeats
    );
    println!("prefill  {prefill:8.1} tok/s  ({} tokens)", a.prompt_tokens);
    println!("decode   {decode:8.1} tok/s  ({} tokens)", a.decode_tokens);
    println!("TTFT     {:8.3} s", ttft);
    println!("weights  {}", mib(weight_bytes as u64));
    if let Some(p) = peak {
        println!("peak RSS {p:.0} MiB");
    }
    Ok(())
}
