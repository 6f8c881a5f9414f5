//! `oqt eval --recipe recipes/eval-*.toml`: quantize the recipe's model with
//! every listed recipe × method, measure each on the evaluation set with the
//! integer runtime (the float model on Burn), compare with the expected values
//! and fail when any result regresses beyond its tolerance.

use super::load;
use crate::output::print_json;
use anyhow::{Context, bail};
use oqt_compress::ptq::{Method, PtqOptions, Silent};
use oqt_eval::{EvalRecipe, Verdict};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
struct Outcome {
    check: String,
    expected: f64,
    limit: f64,
    measured: f64,
    verdict: Verdict,
    seconds: f64,
}

pub fn run(path: &Path, json: bool) -> anyhow::Result<()> {
    let recipe = EvalRecipe::load(path)?;
    let model = load(&recipe.model)?;
    let (_, tokens) = super::eval::dataset_tokens(&model.tokenizer, &recipe.eval.dataset)?;
    let ppl_opts = oqt_eval::PerplexityOptions {
        ctx: recipe.eval.ctx,
        max_chunks: Some(recipe.eval.chunks),
        bos: model.tokenizer.document_bos(),
    };
    let scratch = tempdir_for(path)?;
    let created_by = format!("oqt {}", env!("CARGO_PKG_VERSION"));
    let pb = crate::output::bar(recipe.checks.len() as u64, &recipe.name);
    let mut outcomes = Vec::new();
    for (i, check) in recipe.checks.iter().enumerate() {
        pb.set_message(check.label());
        let start = std::time::Instant::now();
        let measured = if check.is_float() {
            let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)?;
            let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &device);
            oqt_eval::perplexity(&llama, &tokens, &ppl_opts, |_| {})?.perplexity
        } else {
            let name = check
                .recipe
                .as_deref()
                .expect("validated: quantized checks name a recipe");
            let q = oqt_core::quant::load_recipe(name).with_context(|| format!("check `{}`", check.label()))?;
            let method: Method = check
                .method
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: check `{}`: {e}", path.display(), check.label()))?;
            let mut opts = PtqOptions::for_recipe(&q);
            if let Some(b) = &recipe.calibration {
                opts.calibration.samples = b.samples;
                opts.calibration.seq_len = b.seq_len;
                opts.awq_sample_rows = opts.awq_sample_rows.min(b.samples * b.seq_len / 4).max(64);
            }
            if let Some(s) = check.steps {
                opts.mobilequant.steps = s;
            }
            let outcome = oqt_compress::ptq::quantize(&model, &q, method, &opts, &created_by, &mut Silent)
                .with_context(|| format!("check `{}`", check.label()))?;
            let bundle_path = scratch.join(format!("check-{i}.oqt"));
            outcome.writer.write(&bundle_path)?;
            let rt = oqt_runtime::RuntimeModel::load(&oqt_core::bundle::Bundle::open(&bundle_path)?)?;
            let ppl = oqt_eval::perplexity(&rt, &tokens, &ppl_opts, |_| {})?.perplexity;
            std::fs::remove_file(&bundle_path).ok();
            ppl
        };
        let verdict = check.verdict(measured);
        tracing::info!(check = %check.label(), measured, expected = check.expected, ?verdict, "checked");
        outcomes.push(Outcome {
            check: check.label(),
            expected: check.expected,
            limit: check.limit(),
            measured,
            verdict,
            seconds: start.elapsed().as_secs_f64(),
        });
        pb.set_position(i as u64 + 1);
    }
    pb.finish_and_clear();
    std::fs::remove_dir_all(&scratch).ok();

    let regressed: Vec<&Outcome> = outcomes.iter().filter(|o| o.verdict == Verdict::Regressed).collect();
    if json {
        print_json(&serde_json::json!({
            "recipe": recipe.name,
            "model": model.name,
            "eval": {"dataset": recipe.eval.dataset, "ctx": recipe.eval.ctx, "chunks": recipe.eval.chunks},
            "checks": outcomes,
            "regressions": regressed.len(),
        }))?;
    } else {
        println!(
            "{} · {} · {} (ctx {}, first {} chunks)",
            recipe.name, model.name, recipe.eval.dataset, recipe.eval.ctx, recipe.eval.chunks
        );
        println!(
            "{:<26} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "check", "expected", "limit", "measured", "verdict", "time"
        );
        for o in &outcomes {
            let v = match o.verdict {
                Verdict::Pass => "pass",
                Verdict::Improved => "improved",
                Verdict::Regressed => "REGRESSED",
            };
            println!(
                "{:<26} {:>10.4} {:>10.4} {:>10.4} {:>10} {:>6.1} s",
                o.check, o.expected, o.limit, o.measured, v, o.seconds
            );
        }
    }
    if !regressed.is_empty() {
        let list: Vec<String> = regressed
            .iter()
            .map(|o| format!("{} ({:.4} > limit {:.4})", o.check, o.measured, o.limit))
            .collect();
        bail!(
            "{}: {} check(s) regressed: {}",
            path.display(),
            regressed.len(),
            list.join(", ")
        );
    }
    Ok(())
}

/// A scratch directory for the checks' bundles.
fn tempdir_for(recipe: &Path) -> anyhow::Result<std::path::PathBuf> {
    let stem = recipe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("oqt-{stem}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
