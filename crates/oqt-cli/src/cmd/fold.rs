//! `oqt fold`: remove decoder blocks under a budget — chosen by FoldGPT's
//! learned gates, ShortGPT's Block Influence or simply the last N — into a
//! float bundle with fewer blocks. `oqt distill --student` heals it.

use super::load;
use super::quantize::Bars;
use crate::output::{mib, print_json};
use anyhow::Context;
use clap::Args;
use oqt_compress::fold::gates::GateOptions;
use oqt_compress::fold::job::{FoldBudget, FoldMethod, FoldOptions, FoldReport, fold_to_bundle};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Example (remove 8 of SmolLM2-135M's 30 blocks, then heal the tail):
  oqt fold smollm2-135m --method foldgpt --remove 8 --output exports/fold8.oqt
  oqt distill --teacher smollm2-135m --student exports/fold8.oqt --train last:6 \\
      --steps 200 --output exports/fold8-healed.oqt")]
pub struct FoldArgs {
    /// Model alias, GGUF file, HF directory, hub id or float bundle.
    pub model: String,
    /// `foldgpt` (learned block gates, seeded by Block Influence), `shortgpt`
    /// (lowest Block Influence) or `last-n` (the last blocks).
    #[arg(long, default_value = "foldgpt")]
    pub method: FoldMethod,
    /// Blocks to remove.
    #[arg(long, conflicts_with = "budget", required_unless_present_any = ["budget", "share"])]
    pub remove: Option<usize>,
    /// Share of the decoder's parameters to remove, in (0, 1): the fewest
    /// blocks that reach it.
    #[arg(long)]
    pub budget: Option<f64>,
    /// Blocks (of those kept) that share the block before them's linears,
    /// each output row rescaled (FoldGPT's group sharing, pairs chosen by
    /// the KL each tie causes): the bundle stores the shared linears once.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub share: usize,
    /// FoldGPT: swap rounds at most (each: one gate gradient at the current
    /// set, then the proposed swaps' KL on validation windows).
    #[arg(long, default_value_t = 8)]
    pub gate_rounds: usize,
    /// FoldGPT: blocks proposed on each side of a swap per round.
    #[arg(long, default_value_t = 3)]
    pub gate_proposals: usize,
    /// FoldGPT: calibration windows each gate gradient averages over.
    #[arg(long, default_value_t = 4)]
    pub gate_windows: usize,
    /// Calibration dataset (a training-role name or a text file).
    #[arg(long, value_name = "DATASET", default_value = "tinyshakespeare")]
    pub calib_data: String,
    /// Calibration windows (FoldGPT: the last quarter validates the candidates).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub calib_seq_len: usize,
    /// WikiText-2 chunks (ctx 512) to evaluate the folded model on.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub eval_chunks: usize,
    /// Skip the evaluation (just write the bundle).
    #[arg(long)]
    pub no_eval: bool,
    /// Where to write the bundle (default: exports/<model>-<method>-<removed>.oqt).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON (influence, gate gradient and every candidate set included).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Output {
    model: String,
    bundle: PathBuf,
    bundle_bytes: u64,
    #[serde(flatten)]
    report: FoldReport,
    /// WikiText-2 perplexity of the folded model (f32), when evaluated.
    perplexity: Option<f64>,
    eval_chunks: Option<usize>,
    peak_rss_mib: Option<f64>,
}

pub fn run(a: FoldArgs) -> anyhow::Result<()> {
    let budget = match (a.remove, a.budget) {
        (Some(n), _) => FoldBudget::Blocks(n),
        (None, Some(f)) => FoldBudget::Fraction(f),
        (None, None) => FoldBudget::Blocks(0),
    };
    if a.calib_samples < 2 || a.calib_seq_len < 2 {
        anyhow::bail!("--calib-samples must be ≥ 2 and --calib-seq-len ≥ 2");
    }
    let model = load(&a.model)?;
    let opts = FoldOptions {
        method: a.method,
        budget,
        gates: GateOptions {
            rounds: a.gate_rounds,
            proposals: a.gate_proposals,
            grad_windows: a.gate_windows,
            ..GateOptions::default()
        },
        share: a.share,
    };
    // The budget is checked before any output path is made.
    let removed = oqt_compress::fold::job::blocks_to_remove(&model.config, budget)?;
    let output = super::output_path(a.output.as_deref(), || {
        let shared = if a.share > 0 {
            format!("-share{}", a.share)
        } else {
            String::new()
        };
        super::exports_path(&a.model, &format!("{}-{removed}{shared}.oqt", a.method))
    })?;
    let mut calibration = oqt_core::quant::load_recipe("w4a8")?.calibration;
    calibration.dataset = a.calib_data.clone();
    calibration.samples = a.calib_samples;
    calibration.seq_len = a.calib_seq_len;
    let created_by = format!("oqt {}", env!("CARGO_PKG_VERSION"));
    let outcome = {
        let mut bars = Bars {
            label: "fold".into(),
            pb: None,
        };
        fold_to_bundle(&model, &opts, &calibration, &created_by, &mut bars).context("folding")?
    };
    drop(model);
    outcome
        .writer
        .write(&output)
        .with_context(|| format!("writing {}", output.display()))?;
    let perplexity = if a.no_eval {
        None
    } else {
        Some(super::eval::float_wikitext_perplexity(
            &output,
            a.eval_chunks,
            "evaluating the folded model",
        )?)
    };
    let out = Output {
        model: a.model.clone(),
        bundle_bytes: std::fs::metadata(&output)?.len(),
        bundle: output,
        report: outcome.report,
        perplexity,
        eval_chunks: perplexity.map(|_| a.eval_chunks),
        peak_rss_mib: oqt_core::sys::peak_rss_mib(),
    };
    if a.json {
        return print_json(&out);
    }
    let r = &out.report;
    println!(
        "{} · {} · removed blocks {:?} of {} ({:.1}% of decoder parameters)",
        out.model,
        r.method,
        r.removed,
        r.blocks_before,
        r.decoder_params_removed * 100.0
    );
    if let Some(g) = &r.gates {
        for c in &g.candidates {
            println!(
                "  round {}: remove {:?}: validation KL {:.4}",
                c.round, c.removed, c.validation_kl
            );
        }
    }
    for s in &r.shared {
        println!(
            "  block {} shares block {}'s linears (validation KL of that tie alone {:.4})",
            s.block, s.source, s.validation_kl
        );
    }
    println!(
        "parameters {} → {}; bundle {} ({}) in {:.0} s",
        r.params_before,
        r.params_after,
        out.bundle.display(),
        mib(out.bundle_bytes),
        r.seconds
    );
    if let Some(p) = out.perplexity {
        println!("WikiText-2 perplexity (ctx 512, {} chunks, f32): {p:.4}", a.eval_chunks);
    }
    Ok(())
}
