//! LoRA adapters in the runtime, on real SmolLM2 bundles: applied unmerged at
//! load, they compute what LoRA training's forward computed (the frozen base
//! through the recipe's quantizers plus the f32 update on each linear's float
//! input), and on a weight-only grid they equal the update merged in float.

use oqt_core::bundle::Bundle;
use oqt_core::lora::{LoraAdapter, LoraModule};
use oqt_core::quant::{ActMode, Recipe, load_recipe};
use oqt_core::scoring::CausalLm;
use oqt_core::{LoadedModel, load_model};
use oqt_runtime::RuntimeModel;
use rand::{Rng, SeedableRng};
use std::path::Path;

fn model() -> LoadedModel {
    load_model(&oqt_hub::resolve_model("smollm2-135m").unwrap().path).unwrap()
}

fn rtn_bundle(m: &LoadedModel, recipe: &Recipe, path: &Path) -> Bundle {
    let calibrated = (recipe.spec.activations.mode == ActMode::Static).then(|| {
        let mut cal = recipe.calibration.clone();
        cal.samples = 4;
        oqt_compress::stats::calibrate::calibrate_model(m, &recipe.spec, &cal, |_, _| {}).unwrap()
    });
    let opts = oqt_compress::ptq::rtn::RtnOptions { clip_search: false };
    oqt_compress::ptq::rtn::quantize_rtn(m, recipe, opts, calibrated, "oqt tests", |_, _| {})
        .unwrap()
        .write(path)
        .unwrap();
    Bundle::open(path).unwrap()
}

/// A rank-4 adapter on every linear with non-zero `B` (as if trained).
fn adapter(cfg: &oqt_core::LlamaConfig) -> LoraAdapter {
    let mut a = LoraAdapter::init(cfg, 4, 8.0, &LoraModule::ALL, 7, "smollm2-135m").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for p in a.pairs.values_mut() {
        p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.01..0.01));
    }
    a
}

fn window() -> Vec<u32> {
    let m = model();
    let text = oqt_core::datasets::resolve("tinyshakespeare")
        .unwrap()
        .read_text()
        .unwrap();
    m.tokenizer.encode(&text[..4000], false).unwrap()[..96].to_vec()
}

fn mean_nll(lm: &dyn CausalLm, w: &[u32]) -> f64 {
    let s = lm.score_window(w, 0).unwrap();
    s.nll.iter().map(|&v| v as f64).sum::<f64>() / s.nll.len() as f64
}

/// Mean and max |Δ| of the next-token log-probabilities of `w` under `x` and `y`.
fn log_prob_gap(x: &dyn CausalLm, y: &dyn CausalLm, w: &[u32]) -> (f64, f64) {
    let (a, b) = (x.log_probs(w).unwrap(), y.log_probs(w).unwrap());
    let (mut sum, mut max) = (0f64, 0f64);
    for (pos, (ra, rb)) in a.iter().zip(&b).enumerate().take(w.len() - 1) {
        let next = w[pos + 1] as usize;
        let d = (ra[next] - rb[next]).abs() as f64;
        sum += d;
        max = max.max(d);
    }
    (sum / (w.len() - 1) as f64, max)
}

/// The runtime's unmerged adapter against the bundle's simulation with the
/// same adapter (the runtime's arithmetic on Burn), at the simulation parity
/// bounds; and against LoRA training's forward (the fake-quant surrogate,
/// float matmuls instead of integer ones: a few hundredths of a nat).
fn runtime_equals_simulation(recipe: &str) {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.oqt");
    let b = rtn_bundle(&m, &load_recipe(recipe).unwrap(), &path);
    let a = adapter(&b.manifest.config);
    let rt = RuntimeModel::load(&b).unwrap();
    rt.check_adapter(&a, Path::new("adapter")).unwrap();
    let w = window();
    let base = mean_nll(&rt, &w);
    let adapted = rt.with_adapter(Some(&a));
    let adapted_nll = mean_nll(&adapted, &w);
    assert!(
        (adapted_nll - base).abs() > 0.005,
        "the adapter changes the model: {base} → {adapted_nll}"
    );
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false).unwrap();
    let sim = oqt_model::SimulatedModel::from_bundle(&b, &device).unwrap();
    let (mean, max) = log_prob_gap(&adapted, &oqt_model::lora::AdaptedSimulation::new(&sim, &a), &w);
    let qat = oqt_compress::lora::lora_model(oqt_compress::lora::frozen_base(&path, None).unwrap(), &a, false).unwrap();
    let trained = qat.loss(std::slice::from_ref(&w)).unwrap() as f64;
    eprintln!(
        "{recipe}: base {base:.6}, runtime+adapter {adapted_nll:.6}, vs simulation+adapter |Δ log-prob| mean {mean:.2e} max {max:.2e}; training forward {trained:.6}"
    );
    assert!(
        mean <= 1e-4 && max <= 1e-3,
        "{recipe}: |Δ log-prob| mean {mean}, max {max}"
    );
    assert!(
        (adapted_nll - trained).abs() < 0.05,
        "{recipe}: runtime {adapted_nll} vs training forward {trained}"
    );
    assert_eq!(mean_nll(&rt, &w), base, "the base is untouched by an adapted call");

    // Written as PEFT files and read back, the adapter computes the same logits.
    let peft = dir.path().join("peft");
    a.write_peft(&peft).unwrap();
    let back = LoraAdapter::read_peft(&peft).unwrap();
    let (x, y) = (
        rt.with_adapter(Some(&a)).log_probs(&w).unwrap(),
        rt.with_adapter(Some(&back)).log_probs(&w).unwrap(),
    );
    let gap = x
        .iter()
        .flatten()
        .zip(y.iter().flatten())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(gap <= 1e-6, "{recipe}: PEFT round trip moves log-probs by {gap}");
}

#[test]
fn w4a8_dyn_unmerged_adapter_in_the_runtime_matches_simulation() {
    runtime_equals_simulation("w4a8-dyn");
}

#[test]
fn w4a8_static_unmerged_adapter_in_the_runtime_matches_simulation() {
    runtime_equals_simulation("w4a8");
}

/// On a weight-only grid (float inputs) the unmerged update is the update
/// merged into the dequantized weights in float.
#[test]
fn unmerged_adapter_equals_the_update_merged_in_float() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let b = rtn_bundle(&m, &load_recipe("w4a16").unwrap(), &dir.path().join("b.oqt"));
    let a = adapter(&b.manifest.config);
    let rt = RuntimeModel::load(&b).unwrap();
    let mut merged = b.dequantized_weights().unwrap();
    a.merge_weights(&mut merged).unwrap();
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false).unwrap();
    let float = oqt_model::llama_from_weights(&b.manifest.config, merged, &device);
    let w = window();
    let (mean, max) = log_prob_gap(&rt.with_adapter(Some(&a)), &float, &w);
    eprintln!("w4a16: unmerged vs merged in float, next-token log-prob |Δ| mean {mean:.2e}, max {max:.2e}");
    assert!(mean <= 1e-4 && max <= 1e-3, "mean {mean}, max {max}");
}

#[test]
fn an_adapter_for_another_model_is_refused_naming_the_tensor() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let b = rtn_bundle(&m, &load_recipe("w4a8-dyn").unwrap(), &dir.path().join("b.oqt"));
    let rt = RuntimeModel::load(&b).unwrap();
    let cfg = oqt_core::testing::tiny_config();
    let small = LoraAdapter::init(&cfg, 2, 4.0, &[LoraModule::Q], 1, "tiny").unwrap();
    let e = rt
        .check_adapter(&small, Path::new("ad/adapter_model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ad/adapter_model.safetensors") && e.contains("q_proj"),
        "{e}"
    );
}
