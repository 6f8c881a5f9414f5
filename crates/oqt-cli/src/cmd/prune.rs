//! `oqt prune`: zero a share of every decoder linear's weights (magnitude,
//! Wanda or SparseGPT, optionally refined by DSnoT) into a float bundle whose
//! pruned linears are stored sparse; `oqt quantize --recipe R BUNDLE` (or a
//! recipe with a `prune` step) quantizes it keeping the zeros.

use super::load;
use super::quantize::Bars;
use crate::output::{mib, print_json};
use anyhow::Context;
use clap::Args;
use oqt_compress::prune::{PruneOptions, PruneReport, prune_to_bundle};
use oqt_core::quant::PruneStep;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Model alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// `magnitude` (|W| per row), `wanda` (|W|·‖x‖ per row) or `sparsegpt`
    /// (OBS pruning with weight reconstruction).
    #[arg(long, default_value = "wanda")]
    pub method: String,
    /// Unstructured: the fraction of every decoder linear's weights zeroed, in (0, 1).
    #[arg(long, conflicts_with = "nm", required_unless_present = "nm")]
    pub sparsity: Option<f32>,
    /// N:M: keep N of every M consecutive inputs (2:4, 4:8).
    #[arg(long, value_name = "N:M")]
    pub nm: Option<String>,
    /// Refine the mask with DSnoT (training-free prune-and-grow).
    #[arg(long)]
    pub dsnot: bool,
    /// DSnoT: swaps per output row at most.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub dsnot_cycles: usize,
    /// DSnoT: a row stops when its expected error is within this.
    #[arg(long, default_value_t = 0.1)]
    pub dsnot_threshold: f64,
    /// DSnoT on gate/up/down too (the authors' default leaves the MLP on its base mask).
    #[arg(long)]
    pub dsnot_mlp: bool,
    /// DSnoT: stop a row rather than flip the sign of its expected error, on
    /// unstructured masks too (N:M always does).
    #[arg(long)]
    pub dsnot_sign_check: bool,
    /// DSnoT: take the inputs' means and variances over unit-length token rows
    /// (robust to the few tokens of huge norm) instead of raw.
    #[arg(long)]
    pub dsnot_unit_rows: bool,
    /// DSnoT: judge swaps by `expectation` (the paper's expected error) or
    /// `exact` (the squared output error on the calibration inputs).
    #[arg(long, value_name = "CRITERION", default_value = "expectation")]
    pub dsnot_criterion: String,
    /// Calibration dataset (a training-role name or a text file).
    #[arg(long, value_name = "DATASET", default_value = "tinyshakespeare")]
    pub calib_data: String,
    /// Calibration windows.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub calib_seq_len: usize,
    /// WikiText-2 chunks (ctx 512) to evaluate the pruned model on.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub eval_chunks: usize,
    /// Skip the evaluation (just write the bundle).
    #[arg(long)]
    pub no_eval: bool,
    /// Where to write the bundle (default: exports/<model>-<method>-<pattern>.oqt).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON (every linear's sparsity and errors included).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Output {
    model: String,
    bundle: PathBuf,
    bundle_bytes: u64,
    #[serde(flatten)]
    report: PruneReport,
    /// WikiText-2 perplexity of the pruned model (f32), when evaluated.
    perplexity: Option<f64>,
    eval_chunks: Option<usize>,
    peak_rss_mib: Option<f64>,
}

pub fn run(a: PruneArgs) -> anyhow::Result<()> {
    let step = PruneStep {
        method: a.method.clone(),
        sparsity: a.sparsity,
        nm: a.nm.clone(),
        dsnot: a.dsnot,
        dsnot_cycles: a.dsnot_cycles,
        dsnot_threshold: a.dsnot_threshold,
        dsnot_mlp: a.dsnot_mlp,
        dsnot_sign_check: a.dsnot_sign_check,
        dsnot_unit_rows: a.dsnot_unit_rows,
        dsnot_criterion: a.dsnot_criterion.clone(),
    };
    let opts = PruneOptions::from_step(&step, |f| format!("--{}", f.replace('_', "-")))?;
    if a.calib_samples == 0 || a.calib_seq_len < 2 {
        anyhow::bail!("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2");
    }
    let model = load(&a.model)?;
    let pattern = match (&a.nm, a.sparsity) {
        (Some(nm), _) => nm.replace(':', "of"),
        (None, Some(s)) => format!("{:.0}", s * 100.0),
        _ => unreachable!("checked by from_step"),
    };
    let output = super::output_path(a.output.as_deref(), || {
        super::exports_path(&a.model, &format!("{}-{pattern}.oqt", a.method))
    })?;
    let mut calibration = oqt_core::quant::load_recipe("w4a8")?.calibration;
    calibration.dataset = a.calib_data.clone();
    calibration.samples = a.calib_samples;
    calibration.seq_len = a.calib_seq_len;
    let created_by = format!("oqt {}", env!("CARGO_PKG_VERSION"));
    let outcome = {
        let mut bars = Bars {
            label: "prune".into(),
            pb: None,
        };
        prune_to_bundle(&model, &opts, &calibration, &created_by, &mut bars).context("pruning")?
    };
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
            "evaluating the pruned model",
        )?)
    };
    let out = Output {
        model: model.name.clone(),
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
    print_report(&out);
    Ok(())
}

fn print_report(o: &Output) {
    let r = &o.report;
    println!(
        "{} · {} {}{} · {:.1}% of decoder-linear weights zero",
        o.model,
        r.options.method,
        r.options.pattern,
        if r.options.dsnot.is_some() { " + DSnoT" } else { "" },
        r.sparsity * 100.0
    );
    println!("{:>5}  {:>8}  {:>10}  {:>10}", "layer", "sparsity", "error", "DSnoT");
    let layers = r.linears.len() / 7;
    for l in 0..layers {
        let lin = &r.linears[l * 7..(l + 1) * 7];
        let mean = |f: &dyn Fn(&oqt_compress::prune::PrunedLinear) -> Option<f64>| {
            let v: Vec<f64> = lin.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        println!(
            "{l:>5}  {:>7.1}%  {:>10.4}  {:>10}",
            mean(&|x| Some(x.sparsity)).unwrap_or(0.0) * 100.0,
            mean(&|x| Some(x.error)).unwrap_or(0.0),
            mean(&|x| x.error_dsnot).map_or("-".into(), |e| format!("{e:.4}"))
        );
    }
    println!("(error: relative output error ‖(W−Ŵ)X‖²/‖WX‖² on the calibration inputs, mean over the layer's linears)");
    println!(
        "stored {} ({:.2} bits/weight; dense f32 {}); bundle {} · pruned in {:.0} s",
        mib(r.stored_bytes),
        r.bits_per_weight,
        mib(r.dense_bytes),
        o.bundle.display(),
        r.seconds
    );
    if let Some(p) = o.perplexity {
        println!(
            "WikiText-2 perplexity (ctx 512, first {} chunks): {p:.4}",
            o.eval_chunks.unwrap_or(0)
        );
    }
}
