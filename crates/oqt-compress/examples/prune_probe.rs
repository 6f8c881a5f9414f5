//! First pruning figures on SmolLM2 until `oqt prune` exists (issue 38):
//! magnitude and Wanda at 50% unstructured and 2:4, every decoder linear,
//! WikiText-2 ctx 512 on the first CHUNKS chunks (default 16), Wanda's norms
//! from 16 × 512 Tiny Shakespeare tokens.
//!
//!     OQT_DATA=../shared/datasets cargo run --release -p oqt-compress --example prune_probe [CHUNKS]

use oqt_compress::prune::mask::Pattern;
use oqt_compress::prune::model::{Scoring, prune_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let chunks: usize = std::env::args().nth(1).map_or(16, |c| c.parse().expect("CHUNKS"));
    let model = oqt_core::load_model(&oqt_hub::resolve_model("smollm2-135m")?.path)?;
    let mut cal = oqt_core::quant::load_recipe("w4a8")?.calibration;
    cal.samples = 16;
    let (_, windows) = oqt_compress::stats::calibrate::load_windows(&model.tokenizer, &cal)?;
    let text = oqt_core::datasets::resolve("wikitext2")?.read_text()?;
    let tokens = model.tokenizer.encode(&text, false)?;
    let opts = oqt_eval::PerplexityOptions {
        ctx: 512,
        max_chunks: Some(chunks),
        bos: model.tokenizer.document_bos(),
    };
    let device = burn::tensor::Device::flex();
    let eval = |w: oqt_core::weights::ModelWeights| -> Result<f64, Box<dyn std::error::Error>> {
        let llama = oqt_model::llama_from_weights(&model.config, w, &device);
        Ok(oqt_eval::perplexity(&llama, &tokens, &opts, |_| {})?.perplexity)
    };
    println!("dense: {:.4}", eval(model.weights.clone())?);
    for pattern in [Pattern::Unstructured { sparsity: 0.5 }, Pattern::NOfM { n: 2, m: 4 }] {
        for scoring in [Scoring::Magnitude, Scoring::Wanda] {
            let t0 = std::time::Instant::now();
            let (w, _) = prune_model(&model.config, &model.weights, scoring, pattern, &windows, |_, _| {})?;
            let secs = t0.elapsed().as_secs_f64();
            println!("{scoring:?} {pattern}: {:.4} (pruned in {secs:.1} s)", eval(w)?);
        }
    }
    Ok(())
}
