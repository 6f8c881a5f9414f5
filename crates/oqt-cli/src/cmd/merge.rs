//! `oqt merge`: fold a LoRA adapter into its quantized base as a new bundle,
//! re-quantized with the base's recipe, and report what the merge costs.

use crate::output::print_json;
use anyhow::Context;
use clap::Args;
use oqt_core::scoring::CausalLm;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Example:
  oqt merge exports/base.oqt exports/shakespeare-lora --output exports/merged.oqt
  # reports WikiText-2 perplexity with the adapter unmerged and merged (re-quantized)")]
pub struct MergeArgs {
    /// The quantized bundle the adapter was trained on.
    pub base: PathBuf,
    /// The adapter: a PEFT directory (adapter_config.json, adapter_model.safetensors).
    pub adapter: PathBuf,
    /// The merged bundle to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Dataset for the quality report (name or text file).
    #[arg(long, default_value = "wikitext2")]
    pub dataset: String,
    /// Chunks of the quality report; 0 skips it.
    #[arg(long, default_value_t = 8)]
    pub eval_chunks: usize,
    /// Tokens per chunk of the quality report.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    let adapter = oqt_core::lora::LoraAdapter::read_peft(&a.adapter)?;
    // The report's text is checked before anything is written.
    let report_text = if a.eval_chunks > 0 {
        let base = oqt_core::bundle::Bundle::open(&a.base)?;
        Some(super::eval::dataset_tokens(&base.tokenizer()?, &a.dataset)?)
    } else {
        None
    };
    let weights_file = a.adapter.join(oqt_core::lora::PEFT_WEIGHTS_FILE);
    let created_by = concat!("oqt ", env!("CARGO_PKG_VERSION"));
    oqt_compress::lora::merge(&a.base, &adapter, &weights_file, &a.output, created_by)
        .with_context(|| format!("merging {} into {}", a.adapter.display(), a.base.display()))?;
    let mut report = serde_json::json!({ "output": a.output, "base": a.base, "adapter": a.adapter });
    if let Some((dataset, tokens)) = report_text {
        let (base, _) = super::load_runtime(&a.base)?;
        let (merged, _) = super::load_runtime(&a.output)?;
        let opts = oqt_eval::PerplexityOptions {
            ctx: a.ctx,
            max_chunks: Some(a.eval_chunks),
            bos: base.tokenizer.document_bos(),
        };
        let ppl = |lm: &dyn CausalLm, label: &str| -> anyhow::Result<f64> {
            let pb = crate::output::bar(a.eval_chunks as u64, label);
            let r = oqt_eval::perplexity(lm, &tokens, &opts, |p| pb.set_position(p.chunk as u64))?;
            pb.finish_and_clear();
            Ok(r.perplexity)
        };
        let plain = ppl(&base, "base")?;
        let unmerged = ppl(&base.with_adapter(Some(&adapter)), "adapter unmerged")?;
        let merged_ppl = ppl(&merged, "merged")?;
        report["dataset"] = dataset.name.clone().into();
        report["chunks"] = a.eval_chunks.into();
        report["perplexity"] = serde_json::json!({
            "base": plain,
            "adapter_unmerged": unmerged,
            "merged": merged_ppl,
            "merge_change_pct": 100.0 * (merged_ppl / unmerged - 1.0),
        });
        if !a.json {
            println!(
                "{} ({} chunks): base {plain:.4}, adapter unmerged {unmerged:.4}, merged {merged_ppl:.4} ({:+.2}% from merging)",
                dataset.name,
                a.eval_chunks,
                100.0 * (merged_ppl / unmerged - 1.0)
            );
        }
    }
    if a.json {
        return print_json(&report);
    }
    println!("wrote {}", a.output.display());
    Ok(())
}
