//! End-to-end: the `oqt` binary on the real SmolLM2 model and the shared datasets.

use assert_cmd::Command;
use predicates::prelude::*;
use predicates::str::contains;
use serde_json::Value;

fn oqt() -> Command {
    let mut c = Command::cargo_bin("oqt").unwrap();
    c.env_remove("OQT_LOG");
    c
}

fn json_of(cmd: &mut Command) -> Value {
    let out = cmd.assert().success().get_output().stdout.clone();
    serde_json::from_slice(&out).expect("stdout is one JSON object")
}

#[test]
fn eval_16_chunks_matches_the_f32_reference_perplexity() {
    let v = json_of(oqt().args([
        "eval",
        "smollm2-135m",
        "--dataset",
        "wikitext2",
        "--ctx",
        "512",
        "--max-chunks",
        "16",
        "--json",
    ]));
    let ppl = v["perplexity"].as_f64().unwrap();
    // Fixture README: f32 forward on the dequantized weights, first 16 chunks = 28.485.
    let reference = 28.485;
    assert!(
        (ppl - reference).abs() / reference < 0.005,
        "perplexity {ppl} vs {reference}"
    );
    assert_eq!(v["chunks"], 16);
    assert_eq!(v["scored_tokens"], 16 * 255);
    assert_eq!(v["dataset_tokens"], 304_830);
}

#[test]
fn generate_answers_a_simple_question() {
    let v = json_of(oqt().args([
        "generate",
        "smollm2-135m",
        "-p",
        "What is the capital of France?",
        "-n",
        "24",
        "--json",
    ]));
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn inspect_reports_the_real_tensor_types() {
    let v = json_of(oqt().args(["inspect", "smollm2-135m", "--json"]));
    assert_eq!(v["types"]["Q4_1"]["tensors"], 210);
    assert_eq!(v["types"]["Q8_0"]["tensors"], 1);
    assert_eq!(v["config"]["num_layers"], 30);
    assert_eq!(v["parameters"], 134_515_008u64);
    assert_eq!(v["tokenizer"]["vocab_size"], 49152);
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    oqt()
        .args(["eval", "smollm2-135m", "--dataset", "no-such-dataset", "--json"])
        .assert()
        .failure()
        .stderr(contains("no-such-dataset").and(contains("wikitext2")));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00").unwrap();
    oqt()
        .args(["eval", bad.to_str().unwrap(), "--max-chunks", "1"])
        .assert()
        .failure()
        .stderr(contains("broken.gguf").and(contains("truncated")));
    oqt()
        .args(["inspect", "not-a-model-anywhere"])
        .assert()
        .failure()
        .stderr(contains("smollm2-135m"));
}

#[cfg(not(feature = "wgpu"))]
#[test]
fn wgpu_without_the_feature_is_an_error_not_a_panic() {
    oqt()
        .args(["eval", "smollm2-135m", "--device", "wgpu", "--max-chunks", "1"])
        .assert()
        .failure()
        .stderr(contains("--features wgpu"));
}

#[test]
fn fetch_lists_aliases_and_resolves_the_default_model() {
    oqt()
        .args(["fetch", "--list"])
        .assert()
        .success()
        .stdout(contains("llama-3.2-1b"));
    let v = json_of(oqt().args(["fetch", "smollm2-135m", "--json"]));
    assert!(v["path"].as_str().unwrap().ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn gguf_and_hf_copies_of_one_model_score_identically() {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf, write_tiny_hf_dir};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let w = random_weights(&cfg, 5);
    let gguf = dir.path().join("tiny.gguf");
    let hf = dir.path().join("tiny-hf");
    write_tiny_gguf(&gguf, &cfg, &w).unwrap();
    write_tiny_hf_dir(&hf, &cfg, &w, &gguf).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the cat in the hat sat on the mat; then the hat sat on the cat. ".repeat(20),
    )
    .unwrap();
    let ppl = |model: &std::path::Path| {
        let v = json_of(oqt().args([
            "eval",
            model.to_str().unwrap(),
            "--dataset",
            text.to_str().unwrap(),
            "--ctx",
            "64",
            "--json",
        ]));
        assert!(v["chunks"].as_u64().unwrap() >= 4);
        v["perplexity"].as_f64().unwrap()
    };
    let (a, b) = (ppl(&gguf), ppl(&hf));
    assert!(a.is_finite() && a > 1.0);
    // GGUF stores Q/K rows permuted and epsilon as f32; the loaders must undo both.
    assert!((a - b).abs() / a < 1e-4, "gguf {a} vs hf {b}");
}

#[test]
fn inspect_reads_bundles() {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, 2)).unwrap();
    let b = dir.path().join("tiny.oqt");
    oqt()
        .args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            "w4a8-dyn",
            "--output",
            b.to_str().unwrap(),
        ])
        .assert()
        .success();
    let v = json_of(oqt().args(["inspect", b.to_str().unwrap(), "--json"]));
    assert_eq!(v["format"], "oqt-bundle");
    assert_eq!(v["recipe"]["name"], "w4a8-dyn");
    // 2 layers × 7 projections at int4 g32; the tied embedding at int8 per-channel.
    assert_eq!(v["tensor_kinds"]["int4 g32 sym"], 14);
    assert_eq!(v["tensor_kinds"]["int8 per-channel sym"], 1);
    oqt()
        .args(["inspect", b.to_str().unwrap()])
        .assert()
        .success()
        .stdout(contains("method rtn, recipe w4a8-dyn"));
}

#[test]
fn quantize_then_eval_the_bundle_with_the_runtime() {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, 6)).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the cat in the hat sat on the mat; then the hat sat on the cat. ".repeat(20),
    )
    .unwrap();
    let eval = |args: &[&str]| -> f64 {
        let mut all = vec!["eval"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--dataset", text.to_str().unwrap(), "--ctx", "64", "--json"]);
        json_of(oqt().args(&all))["perplexity"].as_f64().unwrap()
    };
    let float = eval(&[gguf.to_str().unwrap()]);
    for recipe in ["w8a16", "w4a8-dyn"] {
        let out = dir.path().join(format!("{recipe}.oqt"));
        let v = json_of(oqt().args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            recipe,
            "--output",
            out.to_str().unwrap(),
            "--no-eval",
            "--json",
        ]));
        assert_eq!(v["rows"][0]["method"], "rtn");
        let q = eval(&["--bundle", out.to_str().unwrap()]);
        // 8-bit weights barely move the random tiny model; 4-bit moves it more, but stays close.
        let tol = if recipe == "w8a16" { 0.01 } else { 0.25 };
        assert!((q - float).abs() / float < tol, "{recipe}: {q} vs float {float}");
    }
    // The runtime also generates from the bundle, deterministically under a seed.
    let generate = |seed: &str| {
        json_of(oqt().args([
            "generate",
            "--bundle",
            dir.path().join("w4a8-dyn.oqt").to_str().unwrap(),
            "--raw",
            "-p",
            "the cat",
            "-n",
            "8",
            "--temperature",
            "0.8",
            "--seed",
            seed,
            "--json",
        ]))["tokens"]
            .clone()
    };
    let a = generate("3");
    assert!(!a.as_array().unwrap().is_empty());
    assert_eq!(a, generate("3"));
    // w4a8's default method is MobileQuant: a few steps on the tiny model give a
    // static bundle with learned grids, recorded as such.
    let out = dir.path().join("w4a8.oqt");
    let text_arg = text.to_str().unwrap();
    let v = json_of(oqt().args([
        "quantize",
        gguf.to_str().unwrap(),
        "--recipe",
        "w4a8",
        "--calib-data",
        text_arg,
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--steps",
        "3",
        "--act-range",
        "percentile",
        "--output",
        out.to_str().unwrap(),
        "--no-eval",
        "--json",
    ]));
    assert_eq!(v["rows"][0]["method"], "mobilequant");
    let m = oqt_core::bundle::Bundle::open(&out).unwrap().manifest;
    assert_eq!(m.method.as_deref(), Some("mobilequant"));
    assert!(!m.act_grids.is_empty());
    std::fs::remove_file(&out).unwrap();
    oqt()
        .args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            "w4a8",
            "--act-range",
            "median",
        ])
        .assert()
        .failure()
        .stderr(contains("minmax"));
    // Calibrating on the evaluation text is refused, and nothing is written.
    oqt()
        .args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            "w4a8",
            "--method",
            "rtn",
            "--calib-data",
            "wikitext2",
            "--output",
            out.to_str().unwrap(),
        ])
        .assert()
        .failure()
        .stderr(contains("evaluation set"));
    assert!(!out.exists());
}

#[test]
fn every_methods_static_bundle_runs_as_simulated_and_benches() {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, 7)).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "a quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    // Every method's bundle runs in the runtime exactly as simulated.
    for (recipe, method) in [
        ("w4a8", "rtn"),
        ("w8a8", "rtn"),
        ("w4a8", "smoothquant"),
        ("w4a8", "gptq"),
        ("w4a8", "awq"),
        ("w4a8", "mobilequant"),
        ("w8a8", "mobilequant"),
    ] {
        let out = dir.path().join(format!("{recipe}-{method}.oqt"));
        let text_arg = text.to_str().unwrap();
        let v = json_of(oqt().args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            recipe,
            "--method",
            method,
            "--steps",
            "3",
            "--calib-data",
            text_arg,
            "--calib-samples",
            "3",
            "--calib-seq-len",
            "48",
            "--output",
            out.to_str().unwrap(),
            "--no-eval",
            "--json",
        ]));
        assert_eq!(v["rows"][0]["method"], method);
        let bundle = oqt_core::bundle::Bundle::open(&out).unwrap();
        assert_eq!(bundle.manifest.method.as_deref(), Some(method));
        // Every static site has a calibrated grid; the calibration file is recorded.
        assert_eq!(bundle.manifest.act_grids.len(), 2 + cfg.num_layers * 8);
        assert!(bundle.manifest.inputs.iter().any(|i| i.role == "calibration"));
        let eval = |extra: &[&str]| -> f64 {
            let mut args = vec![
                "eval",
                "--bundle",
                out.to_str().unwrap(),
                "--dataset",
                text_arg,
                "--ctx",
                "64",
            ];
            args.extend_from_slice(extra);
            args.push("--json");
            json_of(oqt().args(&args))["perplexity"].as_f64().unwrap()
        };
        let (runtime, simulated) = (eval(&[]), eval(&["--simulate"]));
        assert!(
            (runtime - simulated).abs() / simulated < 1e-3,
            "{recipe}/{method}: runtime {runtime} vs simulation {simulated}"
        );
    }
    let v = json_of(oqt().args([
        "bench",
        "--bundle",
        dir.path().join("w4a8-mobilequant.oqt").to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
    ]));
    for field in ["decode_tok_s", "prefill_tok_s", "time_to_first_token_s", "weight_bytes"] {
        assert!(v[field].as_f64().unwrap() > 0.0, "{field}: {v}");
    }
    assert!(v["peak_rss_mib"].as_f64().unwrap_or(1.0) > 0.0);
}

#[test]
fn eval_recipe_fails_when_a_result_regresses_beyond_its_tolerance() {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, 8)).unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "a quick brown fox jumps over the lazy dog. ".repeat(30)).unwrap();
    let recipe = |float: f64, rtn: f64| {
        format!(
            r#"name = "tiny"
model = "{model}"
[eval]
dataset = "{text}"
ctx = 64
chunks = 2
[calibration]
samples = 2
seq_len = 32
[[check]]
method = "float"
expected = {float}
tolerance = 0.02
[[check]]
recipe = "w8a8"
method = "rtn"
expected = {rtn}
tolerance = 0.02
"#,
            model = gguf.display(),
            text = text.display()
        )
    };
    let path = dir.path().join("eval-tiny.toml");
    // Generous expectations: both pass (as improvements), and the run reports what it measured.
    std::fs::write(&path, recipe(1e6, 1e6)).unwrap();
    let v = json_of(oqt().args(["eval", "--recipe", path.to_str().unwrap(), "--json"]));
    assert_eq!(v["regressions"], 0);
    let measured: Vec<f64> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["measured"].as_f64().unwrap())
        .collect();
    assert!(measured.iter().all(|m| m.is_finite() && *m > 1.0), "{measured:?}");
    // Expectations equal to the measurements: pass.
    std::fs::write(&path, recipe(measured[0], measured[1])).unwrap();
    oqt()
        .args(["eval", "--recipe", path.to_str().unwrap()])
        .assert()
        .success()
        .stdout(contains("pass"));
    // The quantized result is now 10% worse than expected (beyond the 2% tolerance): exit non-zero, naming it.
    std::fs::write(&path, recipe(measured[0], measured[1] / 1.1)).unwrap();
    oqt()
        .args(["eval", "--recipe", path.to_str().unwrap()])
        .assert()
        .failure()
        .stdout(contains("REGRESSED"))
        .stderr(contains("w8a8/rtn").and(contains("regressed")));
}

#[test]
fn sensitivity_reports_every_layer_and_saves_the_report() {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, 9)).unwrap();
    let out = dir.path().join("sens.json");
    let v = json_of(oqt().args([
        "sensitivity",
        gguf.to_str().unwrap(),
        "--recipe",
        "w4a8",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--output",
        out.to_str().unwrap(),
        "--json",
    ]));
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), cfg.num_layers);
    for l in layers {
        let full = l["relative_mse"].as_f64().unwrap();
        let weights = l["weights_only_relative_mse"].as_f64().unwrap();
        // 4-bit weights move the output; activations on top move it further.
        assert!(weights > 1e-6 && full.is_finite(), "{l}");
    }
    let saved: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(saved["layers"], v["layers"]);
}

#[test]
fn ci_eval_recipe_passes_on_smollm2() {
    // The CI-sized evaluation recipe: every method on the real model, each within its tolerance.
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/eval-ci.toml");
    let v = json_of(oqt().args(["eval", "--recipe", recipe, "--json"]));
    assert_eq!(v["regressions"], 0, "{v}");
    assert_eq!(v["checks"].as_array().unwrap().len(), 7);
}
