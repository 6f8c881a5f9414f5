//! Pruning figures on SmolLM2 outside the CLI (issue 38): one run per
//! process so that `/usr/bin/time -v` reports each run's peak RSS.
//!
//!     OQT_DATA=../shared/datasets cargo run --release -p oqt-compress --example prune_probe -- \
//!         CHUNKS SAMPLES RUN
//!
//! RUN is `dense` or `METHOD/PATTERN[/dsnot[-mlp][-sign][-unit][-exact][-cCYCLES][-tTHRESHOLD]]`, PATTERN `50%` or
//! `2:4`: e.g. `wanda/60%/dsnot`, `sparsegpt/2:4`. WikiText-2 ctx 512 on the
//! first CHUNKS chunks; calibration SAMPLES × 512 Tiny Shakespeare tokens.

use oqt_compress::prune::{DsnotOptions, Pattern, PruneOptions, prune_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let chunks: usize = args[0].parse()?;
    let samples: usize = args[1].parse()?;
    let run = args[2].as_str();
    let model = oqt_core::load_model(&oqt_hub::resolve_model("smollm2-135m")?.path)?;
    let mut cal = oqt_core::quant::load_recipe("w4a8")?.calibration;
    cal.samples = samples;
    cal.seq_len = 512;
    let (_, windows) = oqt_compress::stats::calibrate::load_windows(&model.tokenizer, &cal)?;
    let text = oqt_core::datasets::resolve("wikitext2")?.read_text()?;
    let tokens = model.tokenizer.encode(&text, false)?;
    let opts = oqt_eval::PerplexityOptions {
        ctx: 512,
        max_chunks: Some(chunks),
        bos: model.tokenizer.document_bos(),
    };
    let device = burn::tensor::Device::flex();
    let t0 = std::time::Instant::now();
    let weights = if run == "dense" {
        model.weights.clone()
    } else {
        let parts: Vec<&str> = run.split('/').collect();
        let pattern = match parts[1].strip_suffix('%') {
            Some(p) => Pattern::Unstructured {
                sparsity: p.parse::<f32>()? / 100.0,
            },
            None => parts[1].parse()?,
        };
        // `dsnot[-mlp][-sign][-cN][-tX]`: MLP too, sign check, N cycles, threshold X.
        let dsnot = parts.get(2).map(|d| {
            let mut o = DsnotOptions {
                skip_mlp: !d.contains("-mlp"),
                sign_check: d.contains("-sign"),
                unit_token_rows: d.contains("-unit"),
                criterion: if d.contains("-exact") {
                    oqt_compress::prune::dsnot::DsnotCriterion::Exact
                } else {
                    Default::default()
                },
                ..Default::default()
            };
            for part in d.split('-') {
                if let Some(c) = part.strip_prefix('c') {
                    o.max_cycles = c.parse().expect("cycles");
                }
                if let Some(t) = part.strip_prefix('t') {
                    o.threshold = t.parse().expect("threshold");
                }
            }
            o
        });
        let o = PruneOptions {
            method: parts[0].parse()?,
            pattern,
            dsnot,
            sparsegpt: Default::default(),
        };
        let (w, report) = prune_model(&model.config, &model.weights, &o, &windows, |_, _| {})?;
        let mean = |f: &dyn Fn(&oqt_compress::prune::PrunedLinear) -> Option<f64>| {
            let v: Vec<f64> = report.iter().filter_map(f).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        println!(
            "mean relative output error {:.4}; DSnoT linears {:.4} → {:.4}",
            mean(&|r| Some(r.error)),
            mean(&|r| r.error_dsnot.map(|_| r.error)),
            mean(&|r| r.error_dsnot)
        );
        w
    };
    let prune_s = t0.elapsed().as_secs_f64();
    let llama = oqt_model::llama_from_weights(&model.config, weights, &device);
    let ppl = oqt_eval::perplexity(&llama, &tokens, &opts, |_| {})?.perplexity;
    println!("{run}: ppl {ppl:.4} (pruned in {prune_s:.1} s, {chunks} chunks, {samples} × 512 calibration)");
    Ok(())
}
