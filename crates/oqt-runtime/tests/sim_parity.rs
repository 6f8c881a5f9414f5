//! What was simulated is what runs: on real SmolLM2 bundles, the runtime's
//! integer arithmetic reproduces the Burn fake-quant simulation of the same bundle.

use oqt_core::bundle::Bundle;
use oqt_core::quant::{ActMode, Recipe, load_recipe};
use oqt_core::scoring::CausalLm;
use oqt_core::{LoadedModel, load_model};
use oqt_model::SimulatedModel;
use oqt_runtime::RuntimeModel;
use std::path::Path;

fn model() -> LoadedModel {
    load_model(&oqt_hub::resolve_model("smollm2-135m").unwrap().path).unwrap()
}

/// An RTN bundle of `recipe`, calibrated on a few Tiny Shakespeare windows when static.
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

fn fixture_tokens() -> Vec<u32> {
    let dir = oqt_core::datasets::find_shared("fixtures/smollm2-135m-instruct-q4_1").unwrap();
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference_f32_logits.json")).unwrap()).unwrap();
    fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Mean and max |Δ| of the next-token log-probabilities over the fixture's 128 tokens.
fn log_prob_gap(bundle: &Bundle) -> (f64, f64) {
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false).unwrap();
    let sim = SimulatedModel::from_bundle(bundle, &device).unwrap();
    let rt = RuntimeModel::load(bundle).unwrap();
    let tokens = fixture_tokens();
    let (a, b) = (sim.log_probs(&tokens).unwrap(), rt.log_probs(&tokens).unwrap());
    let (mut sum, mut max) = (0f64, 0f64);
    for (pos, (ra, rb)) in a.iter().zip(&b).enumerate().take(tokens.len() - 1) {
        let next = tokens[pos + 1] as usize;
        let d = (ra[next] - rb[next]).abs() as f64;
        sum += d;
        max = max.max(d);
    }
    (sum / (tokens.len() - 1) as f64, max)
}

fn check(recipe: &str) {
    check_recipe(&load_recipe(recipe).unwrap(), recipe);
}

fn check_recipe(r: &Recipe, recipe: &str) {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let b = rtn_bundle(&m, r, &dir.path().join("b.oqt"));
    let (mean, max) = log_prob_gap(&b);
    eprintln!("{recipe}: runtime vs simulation, next-token log-prob |Δ| mean {mean:.2e}, max {max:.2e}");
    // The issue asks for 1e-3; the two agree to float rounding of the final log-softmax.
    assert!(
        mean <= 1e-4 && max <= 1e-3,
        "{recipe}: |Δ log-prob| mean {mean}, max {max}"
    );
}

#[test]
fn w4a8_static_runtime_matches_simulation() {
    check("w4a8");
}

#[test]
fn w8a8_static_runtime_matches_simulation() {
    check("w8a8");
}

#[test]
fn w4a8_dyn_runtime_matches_simulation() {
    check("w4a8-dyn");
}

#[test]
fn gguf_q4_0_runtime_matches_simulation() {
    check("gguf-q4_0");
}

/// 16-bit static linear inputs (a whole class and one layer's) run the
/// runtime's exact 16-bit-input kernel; with a float GEMM there instead, last-bit
/// differences became different roundings at the next 8-bit grid (WikiText-2,
/// 2 chunks: 22.45 vs 22.98).
#[test]
fn w8a8_with_16_bit_linear_inputs_runtime_matches_simulation() {
    let mut r = load_recipe("w8a8").unwrap();
    r.spec.act16_sites.push("qkv_input".into());
    r.spec.act16_sites.push("down_proj_input@11".into());
    check_recipe(&r, "w8a8 + qkv_input + down_proj_input@11");
}

/// LPBQ weights (blocks of 64, integer multipliers on a per-row scale) run as
/// the expanded per-channel int8 grid in both.
#[test]
fn w4a8_lpbq_runtime_matches_simulation() {
    check("w4a8-lpbq");
}

/// LPBQ with 16-bit linear inputs runs the 16-bit-input kernel on the expanded grid.
#[test]
fn w4a8_lpbq_with_16_bit_linear_inputs_runtime_matches_simulation() {
    let mut r = load_recipe("w4a8-lpbq").unwrap();
    r.spec.weights.granularity = oqt_core::quant::Granularity::Lpbq(32);
    r.spec.act16_sites.push("down_proj_input".into());
    check_recipe(&r, "w4a8-lpbq32 + down_proj_input");
}

/// A mixed-precision plan (`w4a8-auto`'s spec): LPBQ units beside 8-bit
/// per-channel ones, and 16-bit inputs in single layers, as the planner writes
/// them into the recipe — the same arithmetic in both.
#[test]
fn w4a8_auto_mixed_plan_runtime_matches_simulation() {
    use oqt_compress::ptq::mixed_precision::{apply, model_bytes, plan, reserved_bytes};
    use oqt_compress::stats::sensitivity::{LinearUnit, UnitSensitivity};
    let m = model();
    let recipe = load_recipe("w4a8-auto").unwrap();
    let mut mp = recipe.mixed_precision.clone().unwrap();
    // Room for about a quarter of the units: a real mix.
    let base = model_bytes(&m.weights, &recipe.spec);
    let reserved = reserved_bytes(&m).unwrap();
    mp.size_budget = oqt_core::quant::SizeBudget::Bytes(base + reserved + 5 * 1024 * 1024);
    mp.max_act16_inputs = 3;
    let sens: Vec<UnitSensitivity> = (0..m.config.num_layers)
        .flat_map(|layer| {
            LinearUnit::ALL.into_iter().map(move |unit| UnitSensitivity {
                layer,
                unit,
                weights_error: ((layer * 7 + unit as usize * 3) % 11) as f64,
                input_error: Some(((layer * 5 + unit as usize) % 13) as f64),
            })
        })
        .collect();
    let p = plan(&m.weights, &recipe.spec, &mp, &sens, m.config.n_params(), reserved).unwrap();
    assert!(
        p.wide_count() > 4 && p.wide_count() < 100,
        "{} wide units",
        p.wide_count()
    );
    assert_eq!(p.act16_count(), 3);
    let planned = apply(&recipe, &p);
    check_recipe(&planned, "w4a8-auto (synthetic plan)");
}

#[test]
fn lut4_dynamic_runtime_matches_simulation() {
    // k-means palettes (no calibration, to keep the test short), int8 dynamic inputs:
    // each table on its int8 grid, as the runtime and the simulation both multiply it.
    let m = model();
    let recipe = load_recipe("lut4-a8-dyn").unwrap();
    let step = oqt_core::quant::ClusterStep {
        importance: false,
        iterations: 10,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lut.oqt");
    let run = oqt_compress::cluster::ClusterRun {
        device: None,
        checkpoint: None,
        resume: false,
        observer: &mut oqt_compress::cluster::edkm::Quiet,
    };
    let (w, report) =
        oqt_compress::cluster::cluster_to_bundle(&m, &recipe, &step, "oqt tests", &mut oqt_compress::ptq::Silent, run)
            .unwrap();
    w.write(&path).unwrap();
    assert!(report.linear_bits_per_weight < 4.1, "{}", report.linear_bits_per_weight);
    let b = Bundle::open(&path).unwrap();
    assert_eq!(b.manifest.format_version, 4);
    let (mean, max) = log_prob_gap(&b);
    eprintln!("lut4-a8-dyn: runtime vs simulation, next-token log-prob |Δ| mean {mean:.2e}, max {max:.2e}");
    assert!(
        mean <= 1e-4 && max <= 1e-3,
        "lut4-a8-dyn: |Δ log-prob| mean {mean}, max {max}"
    );
}

#[test]
fn shared_blocks_hold_one_copy_and_runtime_matches_simulation() {
    // Blocks 5 and 11 use blocks 4's and 10's linears, row-scaled (FoldGPT's
    // sharing); quantized with w4a8-dyn RTN the bundle keeps one integer copy.
    let mut m = model();
    for (source, block) in [(4, 5), (10, 11)] {
        let tied = oqt_compress::fold::share::tie_block(&mut m.weights, source, block).unwrap();
        m.sharing.extend(tied);
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = load_recipe("w4a8-dyn").unwrap();
    let b = rtn_bundle(&m, &recipe, &dir.path().join("shared.oqt"));
    assert_eq!(b.manifest.format_version, 5);
    assert_eq!(b.first_shared(), Some("model.layers.11.mlp.down_proj.weight"));
    let mut unshared = model();
    unshared.weights = m.weights.clone();
    let full = rtn_bundle(&unshared, &recipe, &dir.path().join("full.oqt"));
    // Two blocks' int4 linears (≈ 1.8 MB each) are gone from the file and the runtime.
    let saved = full.data_bytes() - b.data_bytes();
    assert!(saved > 3_400_000, "file shrank by {saved} bytes only");
    let (rt, rt_full) = (RuntimeModel::load(&b).unwrap(), RuntimeModel::load(&full).unwrap());
    assert!(rt_full.weight_bytes - rt.weight_bytes > 3_400_000);
    drop((rt, rt_full));
    let (mean, max) = log_prob_gap(&b);
    eprintln!("shared w4a8-dyn: runtime vs simulation, next-token log-prob |Δ| mean {mean:.2e}, max {max:.2e}");
    assert!(
        mean <= 1e-4 && max <= 1e-3,
        "shared: |Δ log-prob| mean {mean}, max {max}"
    );
}
