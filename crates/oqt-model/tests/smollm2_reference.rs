//! The Burn forward pass on the real SmolLM2 model against an independent f32
//! implementation (`shared/fixtures/.../reference_f32_logits.json`).

use burn::tensor::Device;
use oqt_core::scoring::CausalLm;
use oqt_model::llama_from_loaded;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let dir = oqt_core::datasets::find_shared("fixtures/smollm2-135m-instruct-q4_1").expect("shared fixtures");
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

#[test]
fn f32_forward_matches_reference_logits() {
    let path = oqt_hub::resolve_model("smollm2-135m").expect("default model").path;
    let mut loaded = oqt_core::load_model(&path).unwrap();
    let model = llama_from_loaded(&mut loaded, &Device::flex());

    let fx = fixture("reference_f32_logits.json");
    let tokens: Vec<u32> = fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let positions = fx["positions"].as_array().unwrap();
    let lp = model.log_probs(&tokens).unwrap();

    let (mut top1_same, mut abs_delta, mut nll, mut ref_nll, mut scored) = (0usize, 0f64, 0f64, 0f64, 0usize);
    for p in positions {
        let pos = p["pos"].as_u64().unwrap() as usize;
        let row = &lp[pos];
        let ours_top = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let ref_top = p["top10"][0][0].as_u64().unwrap() as usize;
        top1_same += (ours_top == ref_top) as usize;
        // The last position has no next token in the window: top-1 only.
        let Some(theirs) = p["next_token_logprob"].as_f64() else {
            continue;
        };
        let ours = row[tokens[pos + 1] as usize] as f64;
        scored += 1;
        abs_delta += (ours - theirs).abs();
        nll -= ours;
        ref_nll -= theirs;
    }
    let n = scored as f64;
    assert_eq!(scored, 127);
    let top1 = top1_same as f64 / positions.len() as f64;
    let (mad, nll, ref_nll) = (abs_delta / n, nll / n, ref_nll / n);
    eprintln!("top1 agreement {top1:.4}, mean |Δlogp| {mad:.5}, NLL {nll:.5} vs {ref_nll:.5}");
    assert!(top1 >= 0.99, "top-1 agreement {top1}");
    assert!(mad <= 0.01, "mean |Δ log-prob| {mad}");
    assert!((nll - ref_nll).abs() <= 0.005, "mean NLL {nll} vs {ref_nll}");
    assert!((ref_nll - fx["mean_nll_over_positions"].as_f64().unwrap()).abs() < 1e-4);
}
