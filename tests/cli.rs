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

/// A fresh temporary directory holding a tiny random Llama as `tiny.gguf`
/// (weights drawn from `seed`): the edge-case model of the tests below.
fn tiny_model(seed: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, seed)).unwrap();
    (dir, gguf)
}

/// `line` repeated `times`, written to `text.txt` in `dir`: a tiny training
/// or evaluation text.
fn write_text(dir: &tempfile::TempDir, line: &str, times: usize) -> std::path::PathBuf {
    let text = dir.path().join("text.txt");
    std::fs::write(&text, line.repeat(times)).unwrap();
    text
}

/// Asserts that the runtime reproduces `--simulate`'s perplexity of `bundle`
/// on `text` (ctx 64) within 0.1%: what was simulated is what runs.
fn assert_runs_as_simulated(bundle: &std::path::Path, text: &std::path::Path, what: &str) {
    let ppl = |extra: &[&str]| -> f64 {
        let mut c = oqt();
        c.args(["eval", "--bundle"])
            .arg(bundle)
            .arg("--dataset")
            .arg(text)
            .args(["--ctx", "64", "--json"])
            .args(extra);
        json_of(&mut c)["perplexity"].as_f64().unwrap()
    };
    let (runtime, simulated) = (ppl(&[]), ppl(&["--simulate"]));
    assert!(
        (runtime - simulated).abs() / simulated < 1e-3,
        "{what}: runtime {runtime} vs simulation {simulated}"
    );
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
    let text = write_text(
        &dir,
        "the cat in the hat sat on the mat; then the hat sat on the cat. ",
        20,
    );
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
    let (dir, gguf) = tiny_model(2);
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
    let (dir, gguf) = tiny_model(6);
    let text = write_text(
        &dir,
        "the cat in the hat sat on the mat; then the hat sat on the cat. ",
        20,
    );
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
    assert_eq!(m.provenance.method.as_deref(), Some("mobilequant"));
    assert!(!m.deployment.act_grids.is_empty());
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
    let (dir, gguf) = tiny_model(7);
    let cfg = oqt_core::testing::tiny_config();
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    // Every method's bundle runs in the runtime exactly as simulated.
    for (recipe, method) in [
        ("w4a8", "rtn"),
        ("w8a8", "rtn"),
        ("w4a8", "smoothquant"),
        ("w4a8", "gptq"),
        ("w4a8", "awq"),
        ("w4a8", "mobilequant"),
        ("w8a8", "mobilequant"),
        // A16W8 down projections: a 16-bit linear input the runtime matches too.
        ("w8a8-down16", "mobilequant"),
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
        assert_eq!(bundle.manifest.provenance.method.as_deref(), Some(method));
        // Every static site has its grid (softmax's fixed one too); the calibration file is recorded.
        assert_eq!(bundle.manifest.deployment.act_grids.len(), 2 + cfg.num_layers * 9);
        assert!(bundle.manifest.inputs.iter().any(|i| i.role == "calibration"));
        assert_runs_as_simulated(&out, &text, &format!("{recipe}/{method}"));
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

/// Outlier channel splitting widens the MLP of the layers it touches; the
/// bundle records the per-layer widths and the runtime runs it as simulated.
/// `oqt quantize GGUF --recipe RECIPE` with a two-step MobileQuant on three
/// 48-token windows of `text`, writing `out` without evaluation, JSON out:
/// the tiny-model quantize of the recipe tests below.
fn quick_quantize(
    gguf: &std::path::Path,
    recipe: &std::path::Path,
    text: &std::path::Path,
    out: &std::path::Path,
) -> Command {
    let mut c = oqt();
    c.arg("quantize")
        .arg(gguf)
        .arg("--recipe")
        .arg(recipe)
        .args(["--steps", "2", "--calib-data"])
        .arg(text)
        .args(["--calib-samples", "3", "--calib-seq-len", "48", "--output"])
        .arg(out)
        .args(["--no-eval", "--json"]);
    c
}

#[test]
fn mobilequant_with_outlier_splitting_runs_as_simulated() {
    let (dir, gguf) = tiny_model(11);
    let cfg = oqt_core::testing::tiny_config();
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    // The w8a8 recipe, splitting every channel above the 16th-largest.
    let w8a8 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/w8a8.toml")).unwrap();
    let with_ratio = |ratio: &str| -> String {
        w8a8.lines()
            .filter(|l| !l.starts_with("split_down_ratio"))
            .map(|l| match l {
                "[mobilequant]" => format!("[mobilequant]\nsplit_down_ratio = {ratio}\n"),
                other => format!("{other}\n"),
            })
            .collect()
    };
    let recipe = dir.path().join("w8a8-split.toml");
    std::fs::write(&recipe, with_ratio("1.0")).unwrap();
    let out = dir.path().join("split.oqt");
    json_of(&mut quick_quantize(&gguf, &recipe, &text, &out));
    let bundle = oqt_core::bundle::Bundle::open(&out).unwrap();
    let sizes = bundle
        .manifest
        .config
        .layer_intermediate_sizes
        .clone()
        .expect("per-layer widths");
    assert_eq!(sizes.len(), cfg.num_layers);
    assert!(
        sizes.iter().all(|&s| s > cfg.intermediate_size),
        "every layer has channels above its 16th-largest: {sizes:?}"
    );
    assert_runs_as_simulated(&out, &text, "split bundle");
    oqt()
        .args(["inspect"])
        .arg(&out)
        .assert()
        .success()
        .stdout(contains("outlier channels split"));
    // A bad ratio is named with its field.
    std::fs::write(&recipe, with_ratio("0.5")).unwrap();
    oqt()
        .args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            recipe.to_str().unwrap(),
            "--no-eval",
        ])
        .assert()
        .failure()
        .stderr(contains("mobilequant.split_down_ratio"));
}

#[test]
fn eval_recipe_fails_when_a_result_regresses_beyond_its_tolerance() {
    let (dir, gguf) = tiny_model(8);
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 30);
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
    let (dir, gguf) = tiny_model(9);
    let cfg = oqt_core::testing::tiny_config();
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

    // Per unit: four per layer, weights and (static recipe) 8-bit inputs each measured.
    let v = json_of(
        oqt()
            .args(["sensitivity", gguf.to_str().unwrap(), "--recipe", "w4a8", "--units"])
            .args(["--calib-samples", "2", "--calib-seq-len", "32", "--json", "--output"])
            .arg(dir.path().join("units.json")),
    );
    let units = v["units"].as_array().unwrap();
    assert_eq!(units.len(), 4 * cfg.num_layers);
    for u in units {
        let (w, i) = (u["weights_error"].as_f64().unwrap(), u["input_error"].as_f64().unwrap());
        assert!(w > 1e-7 && w.is_finite() && i > 1e-9 && i.is_finite(), "{u}");
    }
}

#[test]
fn ci_eval_recipe_passes_on_smollm2() {
    // The CI-sized evaluation recipe: every method on the real model, each within its tolerance.
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/eval-ci.toml");
    let v = json_of(oqt().args(["eval", "--recipe", recipe, "--json"]));
    assert_eq!(v["regressions"], 0, "{v}");
    assert_eq!(v["checks"].as_array().unwrap().len(), 7);
}

/// `gguf_check.py dump` of a GGUF: what the `gguf` Python package (llama.cpp's reader) sees.
fn gguf_py_dump(path: &std::path::Path) -> Value {
    let out = path.with_extension("dump.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/gguf_check.py");
    let status = std::process::Command::new("python3")
        .args([script, "dump"])
        .arg(path)
        .arg(&out)
        .status()
        .expect("python3 runs (install Python 3 and `pip install gguf==0.19.0`)");
    assert!(status.success(), "gguf_check.py dump {} failed", path.display());
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The issue's contract: `quantize --recipe gguf-q4_0` then `export --format gguf`
/// writes exactly the integers oqt simulated; llama.cpp's Python reader parses it;
/// oqt reads it back bit for bit; the runtime scores the GGUF as it scores the
/// bundle (and as the simulation does); GGUF → HF → GGUF reproduces the file's tensors.
#[test]
fn gguf_q4_0_export_is_lossless_parses_with_gguf_py_and_round_trips() {
    use oqt_core::gguf::GgufFile;
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let s = |path: &std::path::Path| path.to_str().unwrap().to_string();
    let bundle = p("q4.oqt");
    oqt()
        .args([
            "quantize",
            "--recipe",
            "gguf-q4_0",
            "smollm2-135m",
            "--no-eval",
            "--output",
        ])
        .arg(&bundle)
        .assert()
        .success();
    let gguf = p("q4.gguf");
    let report = json_of(oqt().args([
        "export",
        "--format",
        "gguf",
        &s(&bundle),
        "--output",
        &s(&gguf),
        "--json",
    ]));
    assert_eq!(report["file_type"], "Q4_0");
    let tensors = report["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 272);
    assert!(
        tensors.iter().all(|t| t["encoding"] == "exact"),
        "every tensor lossless"
    );

    // The gguf Python package reads what oqt wrote, tensor for tensor.
    let py = gguf_py_dump(&gguf);
    let ours = GgufFile::open(&gguf).unwrap();
    assert_eq!(py["tensors"].as_array().unwrap().len(), ours.tensors.len());
    for t in py["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let info = ours
            .tensor_info(name)
            .unwrap_or_else(|| panic!("{name} missing in oqt's reading"));
        assert_eq!(t["type"], info.ty.name(), "{name}");
        let dims: Vec<u64> = t["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(dims, info.dims, "{name}");
        assert_eq!(t["sha256"], sha256_hex(ours.tensor_bytes(info)), "{name} bytes");
        let values: Vec<u8> = ours.dequantize(info).iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            t["values_sha256"],
            sha256_hex(&values),
            "{name} dequantized by gguf-py vs oqt"
        );
    }
    let meta = &py["metadata"];
    assert_eq!(meta["general.architecture"]["value"], "llama");
    assert_eq!(meta["llama.block_count"]["value"], 30);
    assert_eq!(meta["llama.attention.head_count_kv"]["value"], 3);
    assert_eq!(meta["tokenizer.ggml.pre"]["value"], "smollm");
    assert_eq!(meta["tokenizer.ggml.tokens"]["value"].as_array().unwrap().len(), 49152);
    assert_eq!(meta["general.file_type"]["value"], 2);

    // Re-imported, the weights are the bundle's dequantized weights bit for bit.
    let reimported = oqt_core::load_model(&gguf).unwrap();
    let original = oqt_core::bundle::Bundle::open(&bundle)
        .unwrap()
        .dequantized_weights()
        .unwrap();
    for name in original.names() {
        let (a, b) = (original.get(name).unwrap(), reimported.weights.get(name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        assert!(
            a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} changed on the way through GGUF"
        );
    }

    // The runtime scores the GGUF exactly as the bundle; both match the simulation.
    let ppl = |args: &[&str]| -> f64 {
        let mut all = vec!["eval", "--max-chunks", "2", "--json"];
        all.extend_from_slice(args);
        json_of(oqt().args(&all))["perplexity"].as_f64().unwrap()
    };
    let (on_gguf, on_bundle) = (ppl(&["--bundle", &s(&gguf)]), ppl(&["--bundle", &s(&bundle)]));
    let simulated = ppl(&["--bundle", &s(&bundle), "--simulate"]);
    assert_eq!(on_gguf, on_bundle);
    assert!(
        (on_gguf - simulated).abs() / simulated < 1e-3,
        "runtime {on_gguf} vs simulation {simulated}"
    );

    // GGUF → HF (f32) → GGUF at Q4_0: the same tensors, byte for byte.
    let hf = p("q4-hf");
    oqt()
        .args(["export", "--format", "hf", &s(&gguf), "--output", &s(&hf)])
        .assert()
        .success();
    let again = p("again.gguf");
    oqt()
        .args([
            "export",
            "--format",
            "gguf",
            &s(&hf),
            "--type",
            "q4_0",
            "--output",
            &s(&again),
        ])
        .assert()
        .success();
    let again = GgufFile::open(&again).unwrap();
    for info in &ours.tensors {
        let other = again.tensor_info(&info.name).unwrap();
        assert_eq!(other.ty, info.ty, "{}", info.name);
        assert!(
            again.tensor_bytes(other) == ours.tensor_bytes(info),
            "{} differs after GGUF → HF → GGUF",
            info.name
        );
    }
}

#[test]
fn gguf_export_refuses_what_gguf_cannot_hold_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("w4a16.oqt");
    oqt()
        .args(["quantize", "--recipe", "w4a16", "smollm2-135m", "--no-eval", "--output"])
        .arg(&bundle)
        .assert()
        .success();
    let out = dir.path().join("out.gguf");
    // oqt's w4a16 grids (per-channel 8-bit embedding, f32 group scales) are not ggml's.
    oqt()
        .args(["export", "--format", "gguf"])
        .arg(&bundle)
        .arg("--output")
        .arg(&out)
        .assert()
        .failure()
        .stderr(
            contains("token_embd.weight` cannot be written as Q8_0 without changing it").and(contains("gguf-q4_0")),
        );
    assert!(!out.exists(), "a failed export leaves no file");
    // Re-rounding is possible when asked for, and reported.
    let v = json_of(
        oqt()
            .args(["export", "--format", "gguf", "--allow-requantize", "--json"])
            .arg(&bundle)
            .arg("--output")
            .arg(&out),
    );
    assert!(
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["encoding"] == "requantized")
    );
    oqt()
        .args([
            "export",
            "--format",
            "gguf",
            "smollm2-135m",
            "--type",
            "q5_k",
            "--output",
        ])
        .arg(dir.path().join("x.gguf"))
        .assert()
        .failure()
        .stderr(contains("unknown GGUF tensor type `q5_k`").and(contains("q4_0")));
    // q/k/v biases (Qwen2-style) are not the llama architecture.
    use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf, write_tiny_hf_dir};
    let mut cfg = tiny_config();
    let tok_from = dir.path().join("tiny.gguf");
    write_tiny_gguf(&tok_from, &cfg, &random_weights(&cfg, 1)).unwrap();
    cfg.attention_bias = true;
    let hf = dir.path().join("biased");
    write_tiny_hf_dir(&hf, &cfg, &random_weights(&cfg, 1), &tok_from).unwrap();
    let cfg_path = hf.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    c["attention_bias"] = Value::Bool(true);
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    oqt()
        .args(["export", "--format", "gguf"])
        .arg(&hf)
        .arg("--output")
        .arg(dir.path().join("b.gguf"))
        .assert()
        .failure()
        .stderr(contains("q/k/v biases"));
}

/// `oqt qat --zeroth-order` end to end on a tiny model: trains, checkpoints,
/// resumes a finished run to more steps, and writes a bundle the runtime runs
/// exactly as simulated, with its training provenance in the manifest.
#[test]
fn zeroth_order_qat_trains_resumes_and_writes_a_runnable_bundle() {
    let (dir, gguf) = tiny_model(12);
    let text = write_text(
        &dir,
        "the cat in the hat sat on the mat; then the hat sat on the cat. ",
        40,
    );
    let out = dir.path().join("zo.oqt");
    let tb = dir.path().join("tb");
    let common = |steps: &str| {
        let mut c = oqt();
        c.args(["qat", "--zeroth-order", "--recipe", "w4a8-dyn", gguf.to_str().unwrap()])
            .args([
                "--dataset",
                text.to_str().unwrap(),
                "--steps",
                steps,
                "--batch",
                "2",
                "--seq-len",
                "32",
            ])
            .args([
                "--eval-every",
                "2",
                "--eval-windows",
                "2",
                "--lr",
                "1e-3",
                "--json",
                "--output",
            ])
            .arg(&out)
            .arg("--tensorboard")
            .arg(&tb);
        c
    };
    let v = json_of(&mut common("4"));
    assert_eq!(v["steps"], 4);
    assert!(dir.path().join("zo.ckpt/state.json").is_file());
    assert!(
        std::fs::read_dir(&tb).unwrap().count() >= 1,
        "TensorBoard events written"
    );
    // Resume the finished run for two more steps.
    let v = json_of(common("6").arg("--resume").arg(dir.path().join("zo.ckpt")));
    assert_eq!(v["steps"], 6);
    let b = oqt_core::bundle::Bundle::open(&out).unwrap();
    assert_eq!(b.manifest.provenance.method.as_deref(), Some("zeroqat"));
    assert!(b.manifest.provenance.training.is_some() && b.manifest.inputs.iter().any(|i| i.role == "training"));
    assert_runs_as_simulated(&out, &text, "zeroqat");
}

/// `--keep-best` end to end: a rate that overshoots on a tiny model, and the
/// bundle holds the weights of the lowest held-out perplexity, recorded in the
/// manifest, kept on disk beside the checkpoint.
#[test]
fn keep_best_writes_the_lowest_held_out_weights() {
    let (dir, gguf) = tiny_model(14);
    let text = write_text(&dir, "the owl and the pussycat went to sea in a pea-green boat. ", 40);
    let out = dir.path().join("best.oqt");
    let v = json_of(
        oqt()
            .args(["qat", "--zeroth-order", "--recipe", "w4a8-dyn", gguf.to_str().unwrap()])
            .args(["--dataset", text.to_str().unwrap(), "--steps", "5", "--batch", "2"])
            .args([
                "--seq-len",
                "32",
                "--eval-every",
                "1",
                "--eval-windows",
                "2",
                "--lr",
                "3e-2",
            ])
            .args(["--keep-best", "--json", "--output"])
            .arg(&out),
    );
    let evals: Vec<(u64, f64)> = serde_json::from_value(v["held_out_perplexity"].clone()).unwrap();
    let (best_step, lowest) = evals
        .iter()
        .copied()
        .fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
    assert_eq!(v["kept"]["step"], best_step, "{evals:?}");
    assert_eq!(v["kept"]["held_out_perplexity"], lowest);
    assert!(best_step != 5, "the test needs a best before the last step: {evals:?}");
    assert!(dir.path().join("best.best/tensors.safetensors").is_file());
    let b = oqt_core::bundle::Bundle::open(&out).unwrap();
    let training = b.manifest.provenance.training.as_ref().expect("training provenance");
    assert_eq!(training["kept"], v["kept"]);
    assert_runs_as_simulated(&out, &text, "keep-best");
}

/// The other training modes end to end on a tiny model: lightweight
/// zeroth-order QAT of a static recipe (calibrated start, trained activation
/// ranges, frozen integers) with distillation, and the first-order baseline;
/// both bundles run in the runtime as simulated.
#[test]
fn static_lightweight_distilled_and_first_order_qat_write_runnable_bundles() {
    let (dir, gguf) = tiny_model(13);
    let text = write_text(&dir, "a stitch in time saves nine; nine lives has the cat. ", 40);
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut c = oqt();
        c.arg("qat")
            .arg(gguf.as_os_str())
            .args(["--steps", "3", "--batch", "2", "--seq-len", "32", "--eval-every", "0"])
            .args(["--eval-windows", "2", "--json", "--output"])
            .arg(out)
            .args(extra);
        json_of(&mut c)
    };

    let light = dir.path().join("light.oqt");
    run(
        &light,
        &[
            "--zeroth-order",
            "--recipe",
            "w4a8",
            "--lightweight",
            "--distill",
            "0.5",
            "--dataset",
            text.to_str().unwrap(),
        ],
    );
    let b = oqt_core::bundle::Bundle::open(&light).unwrap();
    assert_eq!(b.manifest.provenance.method.as_deref(), Some("zeroqat-lightweight"));
    // Without --lr a lightweight run takes its own default, not full QAT's 1e-5.
    let training = b.manifest.provenance.training.as_ref().expect("training provenance");
    assert_eq!(training["options"]["spsa"]["lr"], 1e-4);
    assert!(b.site_grids().unwrap().is_some(), "static grids exported");
    assert_runs_as_simulated(&light, &text, "static");

    // From a PTQ bundle without a teacher: the float model is never loaded,
    // each linear is frozen as it is read, and the bundle keeps the start's
    // integers (its output-channel scales train).
    let start = dir.path().join("rtn.oqt");
    let text_arg = text.to_str().unwrap();
    json_of(oqt().args([
        "quantize",
        gguf.to_str().unwrap(),
        "--recipe",
        "w4a8",
        "--method",
        "rtn",
        // A start with per-layer MLP widths: ZeroQAT trains and writes it as is.
        "--split-down",
        "1",
        "--calib-data",
        text_arg,
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--output",
        start.to_str().unwrap(),
        "--no-eval",
        "--json",
    ]));
    let from = dir.path().join("from.oqt");
    run(
        &from,
        &[
            "--zeroth-order",
            "--recipe",
            "w4a8",
            "--lightweight",
            "--lr",
            "1e-2",
            "--dataset",
            text_arg,
            "--from",
            start.to_str().unwrap(),
        ],
    );
    let (a, b) = (
        oqt_core::bundle::Bundle::open(&start).unwrap(),
        oqt_core::bundle::Bundle::open(&from).unwrap(),
    );
    assert!(a.manifest.config.layer_intermediate_sizes.is_some());
    assert_eq!(
        a.manifest.config, b.manifest.config,
        "the widths travel through training"
    );
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ] {
        let (qa, qb) = (a.quantized(name).unwrap(), b.quantized(name).unwrap());
        assert_eq!(qa.q, qb.q, "{name}: integers frozen");
        assert_ne!(qa.scales, qb.scales, "{name}: channel scales trained");
    }
    assert_ne!(
        a.manifest.deployment.act_grids, b.manifest.deployment.act_grids,
        "the activation ranges trained"
    );
    assert_runs_as_simulated(&from, &text, "from a bundle");

    // Instruction data through a prompt template, first-order.
    let jsonl = dir.path().join("instructions.jsonl");
    std::fs::write(
        &jsonl,
        "{\"instruction\": \"name a pet\", \"output\": \"the cat\"}\n".repeat(60),
    )
    .unwrap();
    let first = dir.path().join("first.oqt");
    let v = run(
        &first,
        &[
            "--recipe",
            "w4a8-dyn",
            "--lr",
            "1e-3",
            "--dataset",
            jsonl.to_str().unwrap(),
        ],
    );
    assert_eq!(v["steps"], 3);
    let b = oqt_core::bundle::Bundle::open(&first).unwrap();
    assert_eq!(b.manifest.provenance.method.as_deref(), Some("qat-first-order"));
    assert_runs_as_simulated(&first, &text, "first-order");
    // First-order runs keep no optimizer state to resume from: a clear error.
    oqt()
        .args(["qat", "--recipe", "w4a8-dyn", gguf.to_str().unwrap(), "--resume"])
        .arg(dir.path().join("x.ckpt"))
        .arg("--output")
        .arg(dir.path().join("fo.oqt"))
        .assert()
        .failure()
        .stderr(contains("first-order runs do not checkpoint"));
    // A projected-gradient clip must be positive.
    oqt()
        .args(["qat", "--zeroth-order", "--recipe", "w4a8-dyn", gguf.to_str().unwrap()])
        .args(["--grad-clip", "0", "--output"])
        .arg(dir.path().join("clip.oqt"))
        .assert()
        .failure()
        .stderr(contains("--grad-clip"));
    assert!(!dir.path().join("clip.oqt").exists());
}

/// Bundles written before the deployment spec (manifest version 1, checked in
/// under `tests/data/bundle-v1`) open, and the runtime and the simulation
/// reproduce the perplexities that version measured.
#[test]
fn version_1_bundles_evaluate_as_they_did() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/bundle-v1"));
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (file, figures) in expected.as_object().unwrap() {
        let bundle = dir.join(file);
        let b = oqt_core::bundle::Bundle::open(&bundle).unwrap();
        assert_eq!(b.manifest.format_version, 1, "{file}");
        assert!(b.manifest.recipe_name().is_some(), "{file}: provenance kept");
        for (engine, extra) in [("runtime", None), ("simulate", Some("--simulate"))] {
            let mut c = oqt();
            c.args(["eval", "--bundle"])
                .arg(&bundle)
                .args(["--dataset", "wikitext2", "--ctx", "64", "--max-chunks", "4", "--json"])
                .args(extra);
            let got = json_of(&mut c)["perplexity"].as_f64().unwrap();
            let want = figures[engine].as_f64().unwrap();
            assert!(
                (got - want).abs() / want < 1e-6,
                "{file} ({engine}): {got} vs {want} measured by the version that wrote it"
            );
        }
    }
}

/// A two-step recipe (RTN, then zeroth-order QAT) on the tiny model: tiny
/// step sizes, the real code path.
fn two_step_recipe(dir: &std::path::Path) -> std::path::PathBuf {
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/w4a8-dyn.toml")).unwrap();
    let text = base.replace("name = \"w4a8-dyn\"", "name = \"two-step\"")
        + "\n[[steps]]\nkind = \"quantize\"\nmethod = \"rtn\"\n\n[[steps]]\nkind = \"qat\"\nzeroth_order = true\n\
           lightweight = true\nsteps = 6\nbatch = 1\nseq_len = 32\neval_every = 3\neval_windows = 2\ncheckpoint_every = 2\n";
    let path = dir.join("two-step.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every tensor of a bundle, by name: dtype, shape and bytes (the manifest,
/// which records input paths, left out).
fn tensors_of(path: &std::path::Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

#[test]
fn a_two_step_recipe_equals_the_two_commands_and_resumes_between_steps() {
    let (dir, gguf) = tiny_model(11);
    let d = dir.path();
    let recipe = two_step_recipe(d);
    // `oqt run RECIPE MODEL -o OUT` on this recipe and model.
    let run = |out: &std::path::Path| {
        let mut c = oqt();
        c.arg("run").arg(&recipe).arg(&gguf).arg("-o").arg(out);
        c
    };
    // By hand: quantize, then qat from its bundle.
    oqt()
        .args([
            "quantize",
            "--recipe",
            "w4a8-dyn",
            "--method",
            "rtn",
            "--no-eval",
            "--json",
            "-o",
        ])
        .arg(d.join("hand1.oqt"))
        .arg(&gguf)
        .assert()
        .success();
    oqt()
        .args([
            "qat",
            "--zeroth-order",
            "--lightweight",
            "--recipe",
            "w4a8-dyn",
            "--from",
        ])
        .arg(d.join("hand1.oqt"))
        .args(["--steps", "6", "--batch", "1", "--seq-len", "32", "--eval-every", "3"])
        .args(["--eval-windows", "2", "--checkpoint-every", "2", "--json", "-o"])
        .arg(d.join("hand2.oqt"))
        .arg(&gguf)
        .assert()
        .success();
    // One command.
    let v = json_of(run(&d.join("one.oqt")).arg("--json"));
    assert_eq!(v["report"]["steps"].as_array().unwrap().len(), 2);
    assert_eq!(tensors_of(&d.join("one.oqt")), tensors_of(&d.join("hand2.oqt")));
    let b = oqt_core::bundle::Bundle::open(d.join("one.oqt")).unwrap();
    assert_eq!(b.manifest.provenance.method.as_deref(), Some("zeroqat-lightweight"));
    // Stopped after the first step (as a kill between steps leaves it), then resumed.
    let out = d.join("resumed.oqt");
    let v = json_of(run(&out).args(["--stop-after", "1", "--json"]));
    assert_eq!(v["report"]["stopped"], true);
    assert!(!out.exists(), "no output before the last step");
    // Without --resume an existing run is never overwritten.
    run(&out).assert().failure().stderr(contains("resume it (--resume)"));
    json_of(run(&out).args(["--resume", "--json"]));
    assert_eq!(tensors_of(&out), tensors_of(&d.join("hand2.oqt")));
    assert_runs_as_simulated(
        &out,
        &write_text(&dir, "The quick brown fox jumps over the lazy dog. ", 40),
        "pipeline",
    );
    // A resume refuses a changed step result and a different recipe.
    let run_dir = d.join("resumed.oqt.run");
    let step1 = run_dir.join("step-1-quantize.oqt");
    let mut bytes = std::fs::read(&step1).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&step1, &bytes).unwrap();
    run(&out)
        .arg("--resume")
        .assert()
        .failure()
        .stderr(contains("step-1-quantize.oqt").and(contains("sha256")));
    oqt()
        .args(["run", "w4a8-dyn"])
        .arg(&gguf)
        .arg("-o")
        .arg(&out)
        .arg("--resume")
        .assert()
        .failure()
        .stderr(contains("state.json").and(contains("recipe")));
}

/// LPBQ through MobileQuant with outlier splitting: every widened down
/// projection stays a whole number of blocks, and the bundle runs as
/// simulated. A block that does not divide a width fails before calibration,
/// naming the tensor, and writes nothing.
#[test]
fn lpbq_mobilequant_bundle_runs_as_simulated_and_bad_blocks_are_refused() {
    let (dir, gguf) = tiny_model(12);
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    let lpbq = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/w4a8-lpbq.toml")).unwrap();
    let with_block = |b: usize| {
        lpbq.replace(
            "granularity = { lpbq = 64 }",
            &format!("granularity = {{ lpbq = {b} }}"),
        )
    };
    let recipe = dir.path().join("lpbq.toml");
    std::fs::write(&recipe, with_block(32)).unwrap();
    let out = dir.path().join("lpbq.oqt");
    let quantize = |recipe: &std::path::Path, out: &std::path::Path| quick_quantize(&gguf, recipe, &text, out);
    json_of(&mut quantize(&recipe, &out));
    let bundle = oqt_core::bundle::Bundle::open(&out).unwrap();
    let sizes = bundle
        .manifest
        .config
        .layer_intermediate_sizes
        .clone()
        .expect("split widths");
    assert!(sizes.iter().all(|s| s % 32 == 0 && *s > 96), "{sizes:?}");
    let down = bundle.quantized("model.layers.1.mlp.down_proj.weight").unwrap();
    assert_eq!(down.multipliers.as_ref().unwrap().len(), 64 * sizes[1] / 32);
    assert_runs_as_simulated(&out, &text, "LPBQ bundle");
    oqt()
        .args(["inspect"])
        .arg(&out)
        .assert()
        .success()
        .stdout(contains("lpbq32"));

    // Blocks of 64 do not tile the tiny model's 96-wide MLP.
    let bad = dir.path().join("lpbq64.toml");
    std::fs::write(&bad, with_block(64)).unwrap();
    let bad_out = dir.path().join("bad.oqt");
    quantize(&bad, &bad_out)
        .assert()
        .failure()
        .stderr(contains("down_proj.weight").and(contains("LPBQ blocks of 64 do not divide its 96")));
    assert!(!bad_out.exists(), "a refused recipe writes nothing");
    // A block size LPBQ does not define is named with its field.
    std::fs::write(&bad, with_block(48)).unwrap();
    quantize(&bad, &bad_out)
        .assert()
        .failure()
        .stderr(contains("granularity").and(contains("48")));
    assert!(!bad_out.exists());
}

#[test]
fn size_budget_plans_mixed_precision_fits_and_runs_as_simulated() {
    use oqt_compress::ptq::mixed_precision::{model_bytes, reserved_bytes};
    let (dir, gguf) = tiny_model(21);
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    // `w4a8-auto` on LPBQ blocks of 32 (the tiny model's widths are 64 and 96).
    let auto = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/w4a8-auto.toml"))
        .unwrap()
        .replace("granularity = { lpbq = 64 }", "granularity = { lpbq = 32 }");
    let recipe_path = dir.path().join("auto.toml");
    std::fs::write(&recipe_path, &auto).unwrap();
    let recipe = oqt_core::quant::load_recipe(recipe_path.to_str().unwrap()).unwrap();
    let m = oqt_core::load_model(&gguf).unwrap();
    let base = model_bytes(&m.weights, &recipe.spec);
    let reserved = reserved_bytes(&m).unwrap();
    // Room for about a third of the decoder linears at 8 bits.
    let budget = base + reserved + 20_000;
    let out = dir.path().join("auto.oqt");
    let quantize = |budget: &str, out: &std::path::Path| {
        let mut c = oqt();
        c.args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            recipe_path.to_str().unwrap(),
        ])
        .args(["--method", "rtn", "--size-budget", budget, "--max-act16-inputs", "2"])
        .args([
            "--calib-data",
            text.to_str().unwrap(),
            "--calib-samples",
            "3",
            "--calib-seq-len",
            "48",
        ])
        .args(["--no-eval", "--json", "--output", out.to_str().unwrap()]);
        c
    };
    let report = json_of(&mut quantize(&format!("{budget}B"), &out));
    let plan = &report["rows"][0]["mixed_precision"];
    let units = plan["units"].as_array().unwrap();
    assert_eq!(units.len(), 2 * 4);
    let wide: Vec<&Value> = units.iter().filter(|u| u["wide_weights"] == true).collect();
    assert!(!wide.is_empty() && wide.len() < units.len(), "{plan}");
    assert_eq!(units.iter().filter(|u| u["act16_input"] == true).count(), 2);
    let size = std::fs::metadata(&out).unwrap().len();
    assert!(size <= budget, "bundle {size} B over the budget {budget} B");
    let bundle = oqt_core::bundle::Bundle::open(&out).unwrap();
    assert_eq!(bundle.data_bytes() as u64, plan["planned_bytes"].as_u64().unwrap());
    assert!(bundle.manifest.provenance.mixed_precision.is_some());
    // The chosen units are int8 per-channel in the bundle, the rest LPBQ.
    for u in units {
        let layer = u["layer"].as_u64().unwrap();
        let name = match u["unit"].as_str().unwrap() {
            "qkv" => format!("model.layers.{layer}.self_attn.k_proj.weight"),
            "o" => format!("model.layers.{layer}.self_attn.o_proj.weight"),
            "gate_up" => format!("model.layers.{layer}.mlp.up_proj.weight"),
            _ => format!("model.layers.{layer}.mlp.down_proj.weight"),
        };
        let kind = bundle.manifest.deployment.tensors[&name].kind();
        let expected = if u["wide_weights"] == true { "int8" } else { "int4-lpbq" };
        assert_eq!(kind, expected, "{name}");
    }
    drop(bundle);
    assert_runs_as_simulated(&out, &text, "mixed-precision bundle");

    // ZeroQAT from the planned bundle trains on its planned grids and keeps the plan.
    let trained = dir.path().join("auto-zo.oqt");
    oqt()
        .args([
            "qat",
            "--zeroth-order",
            "--recipe",
            recipe_path.to_str().unwrap(),
            gguf.to_str().unwrap(),
        ])
        .arg("--from")
        .arg(&out)
        .args([
            "--dataset",
            text.to_str().unwrap(),
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "32",
        ])
        .args(["--eval-every", "2", "--eval-windows", "2", "--json", "--output"])
        .arg(&trained)
        .assert()
        .success();
    let (before, after) = (
        oqt_core::bundle::Bundle::open(&out).unwrap(),
        oqt_core::bundle::Bundle::open(&trained).unwrap(),
    );
    for (name, encoding) in &before.manifest.deployment.tensors {
        assert_eq!(
            after.manifest.deployment.tensors[name].kind(),
            encoding.kind(),
            "{name}"
        );
    }
    assert_eq!(
        after.manifest.provenance.mixed_precision,
        before.manifest.provenance.mixed_precision
    );
    assert_runs_as_simulated(&trained, &text, "ZeroQAT on a mixed-precision bundle");

    // A budget below the all-narrow plan is refused before any work, nothing written.
    let small = dir.path().join("small.oqt");
    quantize("1KiB", &small)
        .assert()
        .failure()
        .stderr(contains("size budget 1024B").and(contains("below the smallest plan")));
    assert!(!small.exists());
    quantize("5 parsecs", &small)
        .assert()
        .failure()
        .stderr(contains("5 parsecs").and(contains("MiB")));
    // A 16-bit input count without a budget says what is missing.
    oqt()
        .args([
            "quantize",
            gguf.to_str().unwrap(),
            "--recipe",
            "w4a8",
            "--max-act16-inputs",
            "2",
        ])
        .args(["--no-eval", "--output", small.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(contains("--size-budget"));
    assert!(!small.exists());
}

#[test]
fn prune_then_quantize_keeps_exact_zeros_stores_them_sparse_and_runs_as_simulated() {
    use oqt_core::encoding::TensorEncoding;
    let (dir, gguf) = tiny_model(31);
    let d = dir.path();
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    let prune = |args: &[&str], out: &std::path::Path| {
        let mut c = oqt();
        c.arg("prune")
            .arg(&gguf)
            .args(args)
            .arg("--calib-data")
            .arg(&text)
            .args([
                "--calib-samples",
                "3",
                "--calib-seq-len",
                "48",
                "--no-eval",
                "--json",
                "--output",
            ])
            .arg(out);
        c
    };
    // SparseGPT 2:4: every block of four inputs keeps two, stored as 2:4.
    let p24 = d.join("p24.oqt");
    let report = json_of(&mut prune(&["--method", "sparsegpt", "--nm", "2:4"], &p24));
    assert_eq!(report["sparsity"].as_f64().unwrap(), 0.5);
    assert_eq!(report["linears"].as_array().unwrap().len(), 2 * 7);
    let pruned = oqt_core::load_model(&p24).unwrap();
    let dense = oqt_core::load_model(&gguf).unwrap();
    for l in report["linears"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let e = l["error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 1.0, "{name}: {e}");
        let w = pruned.weights.get(name).unwrap();
        for block in w.data.chunks_exact(4) {
            assert_eq!(block.iter().filter(|v| **v == 0.0).count(), 2, "{name}");
        }
        assert_eq!(
            pruned.sparsity[name],
            oqt_core::sparse::SparseLayout::NOfM { n: 2, m: 4 }
        );
    }
    // SparseGPT updates the kept weights; the embedding stays as it was.
    assert_ne!(
        pruned.weights.get("model.layers.0.self_attn.q_proj.weight"),
        dense.weights.get("model.layers.0.self_attn.q_proj.weight")
    );
    assert_eq!(
        pruned.weights.get("model.embed_tokens.weight"),
        dense.weights.get("model.embed_tokens.weight")
    );

    // Quantized on the 8da4w grid, the zeros stay exact and the linears are stored 2:4, smaller than dense.
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/w4a8-dyn.toml");
    let (q24, qdense) = (d.join("q24.oqt"), d.join("qdense.oqt"));
    for (from, out) in [(&p24, &q24), (&gguf, &qdense)] {
        oqt()
            .arg("quantize")
            .arg(from)
            .args(["--recipe", recipe, "--method", "rtn", "--no-eval", "--json", "--output"])
            .arg(out)
            .assert()
            .success();
    }
    let b = oqt_core::bundle::Bundle::open(&q24).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    assert!(matches!(
        b.manifest.deployment.tensors[name],
        TensorEncoding::Sparse { .. }
    ));
    let q = b.quantized(name).unwrap();
    let float = pruned.weights.get(name).unwrap();
    // (A kept weight may round to zero too; a pruned one always does.)
    let deq = oqt_core::quant::dequantize_weight(&q);
    assert!(deq.iter().zip(&float.data).all(|(v, f)| *f != 0.0 || *v == 0.0));
    let (sparse_bytes, dense_bytes) = (
        oqt_core::bundle::Bundle::open(&q24).unwrap().data_bytes(),
        oqt_core::bundle::Bundle::open(&qdense).unwrap().data_bytes(),
    );
    // Each decoder linear row: its nibbles (rows padded to 32 values) dense,
    // half of them (padded) plus 2-bit positions at 2:4; scales equal. On
    // SmolLM2's widths (576, 1536) that is exactly 4 → 3 bits a weight.
    use oqt_core::quant::pack::padded_len;
    let saved: usize = dense
        .weights
        .names()
        .filter(|n| n.contains("proj"))
        .map(|n| {
            let s = &dense.weights.get(n).unwrap().shape;
            s[0] * (padded_len(s[1]) / 2 - padded_len(s[1] / 2) / 2 - s[1] / 8)
        })
        .sum();
    assert_eq!(dense_bytes - sparse_bytes, saved, "{dense_bytes} vs {sparse_bytes}");
    assert_runs_as_simulated(&q24, &text, "2:4 w4a8-dyn");

    // Wanda 60% unstructured with DSnoT on every linear: a bitmap bundle, the
    // DSnoT error reported per linear; the float bundle runs.
    let p60 = d.join("p60.oqt");
    let report = json_of(&mut prune(
        &["--method", "wanda", "--sparsity", "0.6", "--dsnot", "--dsnot-mlp"],
        &p60,
    ));
    assert!((report["sparsity"].as_f64().unwrap() - 0.6).abs() < 0.01);
    assert!(
        report["linears"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["error_dsnot"].is_number())
    );
    let b = oqt_core::bundle::Bundle::open(&p60).unwrap();
    assert!(b.manifest.deployment.tensors[name].describe().ends_with("bitmap"));
    assert!(b.manifest.provenance.pruning.is_some());
    oqt()
        .arg("eval")
        .arg(&p60)
        .arg("--dataset")
        .arg(&text)
        .args(["--ctx", "64", "--json"])
        .assert()
        .success();

    // Bad input: each names the option; nothing is written.
    let none = d.join("none.oqt");
    for (args, says) in [
        (&["--sparsity", "1.5"][..], "--sparsity: expected a fraction in (0, 1)"),
        (&["--sparsity", "0"][..], "--sparsity: expected a fraction in (0, 1)"),
        (&["--nm", "2:5"][..], "blocks of 5 do not divide the row length 64"),
        (&["--nm", "4:2"][..], "--nm: `4:2`: expected 0 < N < M"),
        (
            &["--nm", "2:4", "--method", "obs"][..],
            "--method: unknown method `obs`",
        ),
    ] {
        prune(args, &none).assert().failure().stderr(contains(says));
        assert!(!none.exists(), "{args:?} wrote a bundle");
    }
}

#[test]
fn prune_recipes_chain_before_quantize_and_bad_step_orders_are_refused() {
    let (dir, gguf) = tiny_model(33);
    let d = dir.path();
    // The built-in recipe end to end from one command (Tiny Shakespeare calibration).
    let out = d.join("run.oqt");
    oqt()
        .args(["run", "sparse-2of4-w4a8-dyn"])
        .arg(&gguf)
        .arg("--output")
        .arg(&out)
        .assert()
        .success();
    let b = oqt_core::bundle::Bundle::open(&out).unwrap();
    let sparse = b
        .manifest
        .deployment
        .tensors
        .values()
        .filter(|e| e.describe() == "int4 g32 sym 2:4")
        .count();
    assert_eq!(sparse, 2 * 7);
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    assert_runs_as_simulated(&out, &text, "sparse-2of4-w4a8-dyn");

    // A prune step after quantize, an unknown step kind: refused before any work.
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../recipes/sparse-2of4-w4a8-dyn.toml"
    ))
    .unwrap();
    let after = base.clone() + "\n[[steps]]\nkind = \"prune\"\nmethod = \"wanda\"\nsparsity = 0.5\n";
    let unknown = base.replace("kind = \"quantize\"", "kind = \"export\"");
    let bad_sparsity = base.replace("nm = \"2:4\"", "sparsity = 1.0");
    for (text, says) in [
        (after, "steps[2]: a `prune` step works on the float model"),
        (unknown, "unknown variant `export`"),
        (bad_sparsity, "steps[0].sparsity: expected a fraction in (0, 1)"),
    ] {
        let path = d.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let none = d.join("none.oqt");
        oqt()
            .arg("run")
            .arg(&path)
            .arg(&gguf)
            .arg("--output")
            .arg(&none)
            .assert()
            .failure()
            .stderr(contains(says));
        assert!(!none.exists() && !d.join("none.oqt.run").exists());
    }
}

#[test]
fn cluster_palettizes_into_a_lut_bundle_that_runs_as_simulated_and_refuses_bad_shapes() {
    use oqt_core::encoding::TensorEncoding;
    let (dir, gguf) = tiny_model(41);
    let d = dir.path();
    let text = write_text(&dir, "a quick brown fox jumps over the lazy dog. ", 40);
    let cluster = |args: &[&str], out: &std::path::Path| {
        let mut c = oqt();
        c.arg("cluster")
            .arg(&gguf)
            .args(args)
            .args(["--no-importance", "--no-eval", "--json", "--output"])
            .arg(out);
        c
    };
    // 3-bit tables shared by 32 output channels.
    let out = d.join("lut3.oqt");
    let report = json_of(&mut cluster(&["--bits", "3", "--group-channels", "32"], &out));
    assert_eq!(report["linears"].as_array().unwrap().len(), 2 * 7);
    let bpw = report["linear_bits_per_weight"].as_f64().unwrap();
    assert!(bpw > 3.0 && bpw < 3.2, "{bpw}");
    let b = oqt_core::bundle::Bundle::open(&out).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    assert!(matches!(
        b.manifest.deployment.tensors[name],
        TensorEncoding::Lut {
            bits: 3,
            group_rows: 32,
            ..
        }
    ));
    // Every weight is one of its table's 8 values.
    let p = b.palettized(name).unwrap();
    let dense = oqt_core::load_model(&gguf).unwrap();
    let w = &dense.weights.get(name).unwrap().data;
    let deq = p.dequantize();
    let err: f32 = w.iter().zip(&deq).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / w.len() as f32;
    let var: f32 = w.iter().map(|a| a * a).sum::<f32>() / w.len() as f32;
    assert!(err < 0.05 * var, "3-bit palette error {err} vs weight energy {var}");
    drop(b);
    assert_runs_as_simulated(&out, &text, "lut3 g32");
    // GGUF has no palette type: the LUT linears go out as F16, which holds
    // their f16 table values exactly, and the export says so.
    let gguf_out = d.join("lut3.gguf");
    let v = json_of(
        oqt()
            .args(["export", "--format", "gguf", "--allow-requantize", "--json"])
            .arg(&out)
            .arg("--output")
            .arg(&gguf_out),
    );
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("14 palettized (LUT) tensors were dequantized"),
        "{notes}"
    );
    let down = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "blk.1.ffn_down.weight")
        .unwrap();
    assert_eq!(down["type"], "F16");
    let back = oqt_core::load_model(&gguf_out).unwrap();
    assert_eq!(
        back.weights.get(name).unwrap().data,
        deq,
        "F16 holds the palette exactly"
    );

    // Pruned first: the zeros keep an exact zero entry of their table.
    let p24 = d.join("p24.oqt");
    oqt()
        .arg("prune")
        .arg(&gguf)
        .args(["--nm", "2:4", "--calib-data"])
        .arg(&text)
        .args(["--calib-samples", "3", "--calib-seq-len", "48", "--no-eval", "--output"])
        .arg(&p24)
        .assert()
        .success();
    let lut_sparse = d.join("lut-sparse.oqt");
    oqt()
        .arg("cluster")
        .arg(&p24)
        .args(["--bits", "2", "--no-importance", "--no-eval", "--output"])
        .arg(&lut_sparse)
        .assert()
        .success();
    let pruned = oqt_core::load_model(&p24).unwrap();
    let b = oqt_core::bundle::Bundle::open(&lut_sparse).unwrap();
    let deq = b.palettized(name).unwrap().dequantize();
    let zeros = pruned
        .weights
        .get(name)
        .unwrap()
        .data
        .iter()
        .filter(|a| **a == 0.0)
        .count();
    assert_eq!(zeros, deq.len() / 2);
    for (a, b) in pruned.weights.get(name).unwrap().data.iter().zip(&deq) {
        assert!(*a != 0.0 || *b == 0.0, "a pruned weight moved off zero: {b}");
    }

    // eDKM: DKM training layer by layer from the k-means palettes, then the same bundle kind.
    let edkm = d.join("edkm.oqt");
    let report = json_of(
        oqt()
            .arg("cluster")
            .arg(&gguf)
            .args([
                "--method",
                "edkm",
                "--bits",
                "2",
                "--group-channels",
                "32",
                "--steps",
                "3",
                "--lr",
                "1e-3",
            ])
            .arg("--calib-data")
            .arg(&text)
            .args([
                "--calib-samples",
                "2",
                "--calib-seq-len",
                "32",
                "--no-eval",
                "--json",
                "--output",
            ])
            .arg(&edkm),
    );
    assert_eq!(report["method"], "edkm");
    assert_runs_as_simulated(&edkm, &text, "edkm lut2 g32");
    // Naive DKM (the paper's [N, K] form), with TensorBoard scalars; its
    // per-layer checkpoint is gone once the bundle is written.
    let dkm = d.join("dkm.oqt");
    let tb = d.join("tb");
    let report = json_of(
        oqt()
            .arg("cluster")
            .arg(&gguf)
            .args([
                "--method",
                "dkm",
                "--bits",
                "2",
                "--group-channels",
                "32",
                "--steps",
                "2",
            ])
            .arg("--calib-data")
            .arg(&text)
            .args(["--calib-samples", "2", "--calib-seq-len", "32", "--no-eval", "--json"])
            .arg("--tensorboard")
            .arg(&tb)
            .arg("--output")
            .arg(&dkm),
    );
    assert_eq!(report["method"], "dkm");
    let events: Vec<_> = std::fs::read_dir(&tb).unwrap().collect();
    assert_eq!(events.len(), 1, "one event file");
    assert!(
        !dkm.with_extension("ckpt").exists(),
        "checkpoint removed after the bundle is written"
    );
    assert_runs_as_simulated(&dkm, &text, "dkm lut2 g32");
    // A resume needs a checkpoint that exists, and a training method.
    let missing = d.join("none.ckpt");
    oqt()
        .arg("cluster")
        .arg(&gguf)
        .args(["--method", "edkm", "--calib-data"])
        .arg(&text)
        .args(["--calib-samples", "2", "--calib-seq-len", "32", "--no-eval", "--resume"])
        .arg(&missing)
        .arg("--output")
        .arg(d.join("bad.oqt"))
        .assert()
        .failure()
        .stderr(contains("none.ckpt").and(contains("state.json")));
    cluster(&["--resume", missing.to_str().unwrap()], &d.join("bad.oqt"))
        .assert()
        .failure()
        .stderr(contains("are for --method dkm or edkm"));
    // Training on wgpu needs a build with the feature: a clear error, nothing written.
    cluster(&["--method", "edkm", "--device", "wgpu"], &d.join("bad.oqt"))
        .assert()
        .failure()
        .stderr(contains("--features wgpu"));
    assert!(!d.join("bad.oqt").exists());

    // Bad input: bits outside 1–8, a group not dividing the output channels; nothing written.
    let bad = d.join("bad.oqt");
    cluster(&["--bits", "9"], &bad)
        .assert()
        .failure()
        .stderr(contains("--bits: expected 1–8, found 9"));
    cluster(&["--group-channels", "5"], &bad)
        .assert()
        .failure()
        .stderr(contains("q_proj.weight").and(contains("divisor of the 64 output channels")));
    cluster(&["--method", "dkm-naive"], &bad)
        .assert()
        .failure()
        .stderr(contains("--method: unknown method `dkm-naive`"));
    assert!(!bad.exists());
}

/// `oqt fold` and `oqt distill` on the tiny model: every method removes the
/// block asked for into a float bundle of one block that the runtime runs as
/// simulated; training it from the full model on the layers chosen lowers
/// the held-out perplexity; a quantized student trains zeroth-order through
/// its grids; bad budgets, layer lists, weights and mismatched vocabularies
/// fail naming what is wrong, writing nothing.
#[test]
fn fold_and_distill_write_runnable_bundles_and_refuse_bad_inputs() {
    let (dir, gguf) = tiny_model(44);
    let d = dir.path();
    let text = write_text(
        &dir,
        "the cat in the hat sat on the mat; then the hat sat on the cat. ",
        60,
    );
    let fold = |method: &str, extra: &[&str], out: &std::path::Path| {
        let mut c = oqt();
        c.arg("fold")
            .arg(&gguf)
            .args(["--method", method, "--calib-data"])
            .arg(&text)
            .args([
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "32",
                "--gate-rounds",
                "2",
                "--no-eval",
                "--json",
            ])
            .args(extra)
            .arg("--output")
            .arg(out);
        c
    };
    for (method, removed) in [("last-n", 1), ("shortgpt", -1), ("foldgpt", -1)] {
        let out = d.join(format!("{method}.oqt"));
        let v = json_of(&mut fold(method, &["--remove", "1"], &out));
        let r = v["removed"].as_array().unwrap();
        assert_eq!(r.len(), 1, "{method}: {v}");
        if removed >= 0 {
            assert_eq!(r[0], removed, "{method}: {v}");
        }
        assert!(v["params_after"].as_u64() < v["params_before"].as_u64());
        let b = oqt_core::bundle::Bundle::open(&out).unwrap();
        assert_eq!(b.manifest.config.num_layers, 1);
        assert!(b.manifest.provenance.folding.is_some());
        assert_runs_as_simulated(&out, &text, method);
    }
    let gates = json_of(&mut fold("foldgpt", &["--remove", "1"], &d.join("again.oqt")));
    assert!(!gates["gates"]["candidates"].as_array().unwrap().is_empty(), "{gates}");

    // Distill the full model into the folded one, on its only block.
    let folded = d.join("shortgpt.oqt");
    let healed = d.join("healed.oqt");
    let distill = |student: &std::path::Path, extra: &[&str], out: &std::path::Path| {
        let mut c = oqt();
        c.arg("distill")
            .arg("--teacher")
            .arg(&gguf)
            .arg("--student")
            .arg(student)
            .arg("--dataset")
            .arg(&text)
            .args(["--steps", "6", "--batch", "2", "--seq-len", "32", "--eval-every", "3"])
            .args(["--eval-windows", "2", "--lr", "3e-3", "--no-eval", "--json"])
            .args(extra)
            .arg("--output")
            .arg(out);
        c
    };
    // A random teacher knows nothing of the text: half cross-entropy, so training shows.
    let v = json_of(&mut distill(
        &folded,
        &["--train", "last:1", "--distill-weight", "0.5"],
        &healed,
    ));
    let curve = v["held_out_perplexity"].as_array().unwrap();
    let (first, last) = (
        curve[0][1].as_f64().unwrap(),
        curve.last().unwrap()[1].as_f64().unwrap(),
    );
    assert!(last < first, "training lowers the held-out perplexity: {curve:?}");
    assert_eq!(v["report"]["trained_layers"], serde_json::json!([0]));
    let b = oqt_core::bundle::Bundle::open(&healed).unwrap();
    assert_eq!(b.manifest.config.num_layers, 1);
    assert!(b.manifest.provenance.folding.is_some(), "the folding record is kept");
    assert!(b.manifest.inputs.iter().any(|i| i.role == "teacher"));
    assert_runs_as_simulated(&healed, &text, "distilled");

    // With hidden-state matching: the folding record pairs the kept block with its old place.
    let matched = d.join("matched.oqt");
    let v = json_of(&mut distill(
        &folded,
        &["--train", "last:1", "--distill-weight", "0.5", "--hidden-weight", "1"],
        &matched,
    ));
    let kept = oqt_core::bundle::Bundle::open(&folded)
        .unwrap()
        .manifest
        .provenance
        .folding
        .unwrap()["removed"][0]
        .as_u64()
        .unwrap();
    let teacher_block = if kept == 0 { 1 } else { 0 };
    assert_eq!(v["report"]["layer_map"], serde_json::json!([[0, teacher_block]]), "{v}");
    assert_eq!(v["report"]["hidden_weight"], 1.0);
    let curve = v["held_out_perplexity"].as_array().unwrap();
    assert!(
        curve.last().unwrap()[1].as_f64().unwrap() < curve[0][1].as_f64().unwrap(),
        "{curve:?}"
    );
    assert_runs_as_simulated(&matched, &text, "distilled with hidden states");

    // A quantized student trains through its grids, zeroth-order.
    let w4 = d.join("w4.oqt");
    oqt()
        .args([
            "quantize",
            "--recipe",
            "w4a8-dyn",
            gguf.to_str().unwrap(),
            "--no-eval",
            "--output",
        ])
        .arg(&w4)
        .assert()
        .success();
    let zo = d.join("zo.oqt");
    let v = json_of(&mut distill(&w4, &["--zeroth-order", "--lightweight"], &zo));
    assert_eq!(v["steps"], 6);
    assert_runs_as_simulated(&zo, &text, "distilled w4a8-dyn");

    // Bad inputs: clear errors, nothing written.
    let bad = d.join("bad.oqt");
    fold("shortgpt", &["--remove", "2"], &bad)
        .assert()
        .failure()
        .stderr(contains("removes 2 of the model's 2 blocks"));
    fold("shortgpt", &["--budget", "1.5"], &bad)
        .assert()
        .failure()
        .stderr(contains("--budget 1.5"));
    distill(&folded, &["--train", "3"], &bad)
        .assert()
        .failure()
        .stderr(contains("layer 3 is out of range").and(contains("1 blocks")));
    distill(&folded, &["--train", "last:2"], &bad)
        .assert()
        .failure()
        .stderr(contains("last:2"));
    distill(&folded, &["--distill-weight", "0"], &bad)
        .assert()
        .failure()
        .stderr(contains("--distill-weight"));
    distill(&folded, &["--hidden-weight", "1", "--layer-map", "0:5"], &bad)
        .assert()
        .failure()
        .stderr(contains("--layer-map").and(contains("teacher block 5 is out of range")));
    distill(&folded, &["--hidden-weight", "1", "--layer-map", "1:0"], &bad)
        .assert()
        .failure()
        .stderr(contains("student block 1 is out of range"));
    distill(&folded, &["--layer-map", "0:0"], &bad)
        .assert()
        .failure()
        .stderr(contains("--hidden-weight"));
    distill(&folded, &["--hidden-weight", "1", "--zeroth-order"], &bad)
        .assert()
        .failure()
        .stderr(contains("first-order only"));
    let mut c = oqt();
    c.args(["distill", "--teacher", "smollm2-135m", "--student"])
        .arg(&folded)
        .arg("--dataset")
        .arg(&text)
        .args(["--steps", "1", "--no-eval", "--output"])
        .arg(&bad);
    c.assert()
        .failure()
        .stderr(contains("vocabulary").and(contains("same tokenizer")));
    assert!(!bad.exists(), "nothing written");
}

/// Sharing: the tiny model's second block uses the first's linears,
/// row-scaled; the float bundle stores them once, quantizing keeps one
/// integer copy, both run as simulated; shared models refuse what would
/// silently unshare or mistrain them.
#[test]
fn shared_blocks_are_stored_once_quantize_with_rtn_and_refuse_training() {
    let (dir, gguf) = tiny_model(45);
    let d = dir.path();
    let text = write_text(&dir, "a shared block is stored once and scaled per row. ", 60);
    let fold = |extra: &[&str], out: &std::path::Path| {
        let mut c = oqt();
        c.arg("fold")
            .arg(&gguf)
            .args(["--calib-data"])
            .arg(&text)
            .args(["--calib-samples", "4", "--calib-seq-len", "32", "--no-eval", "--json"])
            .args(extra)
            .arg("--output")
            .arg(out);
        c
    };
    let shared = d.join("shared.oqt");
    let v = json_of(&mut fold(&["--share", "1"], &shared));
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert_eq!(v["shared"][0]["block"], 1, "{v}");
    assert_eq!(v["shared"][0]["source"], 0, "{v}");
    assert!(v["params_after"].as_u64() < v["params_before"].as_u64());
    let b = oqt_core::bundle::Bundle::open(&shared).unwrap();
    assert_eq!(b.manifest.config.num_layers, 2);
    assert_eq!(
        b.shared("model.layers.1.self_attn.q_proj.weight").unwrap().unwrap().0,
        "model.layers.0.self_attn.q_proj.weight"
    );
    drop(b);
    assert_runs_as_simulated(&shared, &text, "shared float");
    let quantize = |extra: &[&str], out: &std::path::Path| {
        let mut c = oqt();
        c.args(["quantize", "--recipe", "w4a8-dyn"])
            .arg(&shared)
            .args(["--no-eval", "--json"])
            .args(extra)
            .arg("--output")
            .arg(out);
        c
    };
    let w4 = d.join("shared-w4.oqt");
    quantize(&[], &w4).assert().success();
    let b = oqt_core::bundle::Bundle::open(&w4).unwrap();
    assert_eq!(b.first_shared(), Some("model.layers.1.mlp.down_proj.weight"));
    assert!(b.quantized("model.layers.0.mlp.down_proj.weight").is_ok());
    drop(b);
    assert_runs_as_simulated(&w4, &text, "shared w4a8-dyn");

    // Refused, nothing written: methods that change each block's weights,
    // training a shared student, folding a shared model, too many pairs.
    let bad = d.join("bad.oqt");
    quantize(&["--method", "gptq"], &bad)
        .assert()
        .failure()
        .stderr(contains("shares weights between blocks").and(contains("--method rtn")));
    let mut c = oqt();
    c.args(["distill", "--teacher"])
        .arg(&gguf)
        .arg("--student")
        .arg(&w4)
        .arg("--dataset")
        .arg(&text)
        .args(["--steps", "1", "--no-eval", "--output"])
        .arg(&bad);
    c.assert()
        .failure()
        .stderr(contains("shares another block's weights in a quantized bundle").and(contains("before quantizing")));
    // A float student trains only outside its sharing pairs (here: nowhere).
    let mut c = oqt();
    c.args(["distill", "--teacher"])
        .arg(&gguf)
        .arg("--student")
        .arg(&shared)
        .arg("--dataset")
        .arg(&text)
        .args(["--steps", "1", "--train", "last:1", "--no-eval", "--output"])
        .arg(&bad);
    c.assert()
        .failure()
        .stderr(contains("block 1 is in a sharing pair").and(contains("--train")));
    let mut c = oqt();
    c.args(["fold"])
        .arg(&shared)
        .args(["--remove", "1", "--calib-data"])
        .arg(&text)
        .args(["--calib-samples", "4", "--calib-seq-len", "32", "--no-eval", "--output"])
        .arg(&bad);
    c.assert().failure().stderr(contains("already shares blocks"));
    fold(&["--share", "2"], &bad)
        .assert()
        .failure()
        .stderr(contains("sharing 2 blocks needs 4 blocks"));
    assert!(!bad.exists(), "nothing written");
}

/// The teacher's targets are cached per teacher, text and batch options:
/// a second run reads them and trains exactly as the first; a damaged cache
/// file is computed again and replaced.
#[test]
fn distillation_caches_the_teachers_targets_and_survives_a_damaged_cache() {
    let (dir, gguf) = tiny_model(46);
    let d = dir.path();
    let text = write_text(&dir, "cached targets train the same student the same way. ", 60);
    let student = d.join("student.gguf");
    oqt_core::testing::write_tiny_gguf(
        &student,
        &oqt_core::testing::tiny_config(),
        &oqt_core::testing::random_weights(&oqt_core::testing::tiny_config(), 47),
    )
    .unwrap();
    let cache = d.join("cache");
    let run = |extra: &[&str]| -> Value {
        let mut c = oqt();
        c.env("OQT_CACHE", &cache)
            .args(["distill", "--teacher"])
            .arg(&gguf)
            .arg("--student")
            .arg(&student)
            .arg("--dataset")
            .arg(&text)
            .args(["--steps", "4", "--batch", "2", "--seq-len", "32", "--eval-every", "2"])
            .args(["--eval-windows", "2", "--lr", "3e-3", "--no-eval", "--json", "--output"])
            .arg(d.join("out.oqt"))
            .args(extra);
        json_of(&mut c)["held_out_perplexity"].clone()
    };
    let files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache.join("teacher-targets"))
            .map(|r| r.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let first = run(&[]);
    let cached = files();
    assert_eq!(cached.len(), 1, "one cache file: {cached:?}");
    let size = std::fs::metadata(&cached[0]).unwrap().len();
    assert_eq!(run(&[]), first, "cached targets train identically");
    std::fs::write(&cached[0], b"not targets").unwrap();
    assert_eq!(run(&[]), first, "a damaged cache is recomputed");
    assert_eq!(std::fs::metadata(&cached[0]).unwrap().len(), size, "and replaced");
    assert_eq!(run(&["--no-targets-cache"]), first);
    assert_eq!(files().len(), 1);
}

/// Folding SmolLM2 by Block Influence removes 8 of its 30 blocks (the file
/// shrinks by their bytes, the perplexity rises), and a few first-order
/// distillation steps from the full model on the last four blocks lower the
/// held-out perplexity on Tiny Shakespeare.
#[test]
fn folded_smollm2_shrinks_and_distillation_heals_it() {
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("short8.oqt");
    let v = json_of(
        oqt()
            .args(["fold", "smollm2-135m", "--method", "shortgpt", "--remove", "8"])
            .args([
                "--calib-samples",
                "4",
                "--calib-seq-len",
                "128",
                "--eval-chunks",
                "2",
                "--json",
                "--output",
            ])
            .arg(&folded),
    );
    assert_eq!(v["removed"].as_array().unwrap().len(), 8, "{v}");
    let b = oqt_core::bundle::Bundle::open(&folded).unwrap();
    assert_eq!(b.manifest.config.num_layers, 22);
    // Every removed block held 3,540,096 f32 parameters (linears and norms).
    let per_block = 3_540_096u64;
    assert_eq!(
        v["params_before"].as_u64().unwrap() - v["params_after"].as_u64().unwrap(),
        8 * per_block
    );
    let float_bytes = v["params_before"].as_u64().unwrap() * 4;
    let bytes = v["bundle_bytes"].as_u64().unwrap();
    assert!(
        bytes < float_bytes - 8 * per_block * 4 + (16 << 20),
        "file {bytes} vs f32 {float_bytes}"
    );
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(
        ppl.is_finite() && ppl > 40.0,
        "removing 8 blocks costs perplexity: {ppl}"
    );

    let v = json_of(
        oqt()
            .args(["distill", "--teacher", "smollm2-135m", "--student"])
            .arg(&folded)
            .args(["--train", "last:4", "--steps", "4", "--batch", "4", "--seq-len", "128"])
            .args([
                "--lr",
                "1e-4",
                "--eval-every",
                "4",
                "--eval-windows",
                "4",
                "--no-eval",
                "--json",
                "--output",
            ])
            .arg(dir.path().join("healed.oqt")),
    );
    let curve = v["held_out_perplexity"].as_array().unwrap();
    let (first, last) = (
        curve[0][1].as_f64().unwrap(),
        curve.last().unwrap()[1].as_f64().unwrap(),
    );
    assert!(last < first, "distillation heals: {curve:?}");
}

/// `peft_check.py` of an adapter directory: what the `safetensors` Python
/// package sees, checked against PEFT's names and config fields.
fn peft_py_check(dir: &std::path::Path) -> Value {
    let out = dir.with_extension("peft.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/peft_check.py");
    let o = std::process::Command::new("python3")
        .arg(script)
        .arg(dir)
        .arg(&out)
        .output()
        .expect("python3 runs (install Python 3 and `pip install safetensors numpy`)");
    assert!(
        o.status.success(),
        "peft_check.py {}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// A tiny model quantized to `w4a8-dyn` (`base.oqt`) and a training text.
fn tiny_lora_base(seed: u64) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let (dir, gguf) = tiny_model(seed);
    let text = write_text(
        &dir,
        "the fox and the hound ran round the mound; the hound found the fox. ",
        40,
    );
    let base = dir.path().join("base.oqt");
    oqt()
        .args(["quantize", "--recipe", "w4a8-dyn", "--no-eval", "--output"])
        .arg(&base)
        .arg(&gguf)
        .assert()
        .success();
    (dir, base, text)
}

/// `oqt finetune --lora --zeroth-order` end to end: trains the adapter only,
/// resumes bit-identically, writes PEFT files (PEFT's names and fields, as the
/// `safetensors` package reads them) and a GGUF adapter (llama.cpp's keys and
/// names, as the `gguf` package reads them), and `oqt eval --adapter` applies it.
#[test]
fn lora_finetune_writes_peft_and_gguf_adapters_resumes_and_evaluates() {
    let (dir, base, text) = tiny_lora_base(31);
    let d = dir.path();
    let run_with = |out: &str, steps: &str, resume: Option<&str>, schedule: &str| {
        let mut c = oqt();
        c.args(["finetune", "--lora", "--zeroth-order", "--rank", "2", "--alpha", "4"])
            .args(["--schedule", schedule])
            .args(["--targets", "q,v,down"])
            .arg(&base)
            .args(["--dataset", text.to_str().unwrap(), "--steps", steps, "--batch", "2"])
            .args([
                "--seq-len",
                "32",
                "--eval-every",
                "2",
                "--eval-windows",
                "2",
                "--lr",
                "1e-2",
            ])
            .args(["--json", "--output"])
            .arg(d.join(out))
            .arg("--gguf")
            .arg(d.join(out).with_extension("gguf"));
        if let Some(r) = resume {
            c.arg("--resume").arg(d.join(r));
        }
        json_of(&mut c)
    };
    let run = |out: &str, steps: &str, resume: Option<&str>| run_with(out, steps, resume, "constant");
    let straight = run("straight", "4", None);
    assert_eq!(straight["steps"], 4);
    assert_eq!(straight["method"], "lora-zeroth-order");
    // 2 layers × (q 64×64, v 32×64, down 64×96) at rank 2.
    assert_eq!(
        straight["trainable_params"],
        2 * 2 * ((64 + 64) + (64 + 32) + (96 + 64))
    );
    run("resumed", "2", None);
    let resumed = run("resumed", "4", Some("resumed.ckpt"));
    assert_eq!(resumed["steps"], 4);
    let read = |n: &str| std::fs::read(d.join(n).join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        read("straight"),
        read("resumed"),
        "a resumed run ends on the same adapter"
    );
    // A resume with another adapter shape is refused, not mixed into the checkpoint.
    oqt()
        .args([
            "finetune",
            "--lora",
            "--zeroth-order",
            "--rank",
            "2",
            "--alpha",
            "8",
            "--targets",
            "q,v,down",
        ])
        .arg(&base)
        .args([
            "--dataset",
            text.to_str().unwrap(),
            "--steps",
            "6",
            "--seq-len",
            "32",
            "--resume",
        ])
        .arg(d.join("resumed.ckpt"))
        .arg("--output")
        .arg(d.join("other"))
        .assert()
        .failure()
        .stderr(contains("alpha 8"));
    assert!(!d.join("other").exists());

    let peft = peft_py_check(&d.join("straight"));
    assert_eq!(peft["config"]["r"], 2);
    assert_eq!(peft["config"]["lora_alpha"], 4.0);
    assert_eq!(
        peft["config"]["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let names: Vec<&str> = peft["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
        "{names:?}"
    );
    assert_eq!(names.len(), 2 * 3 * 2);
    let b_moved = peft["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"].as_str().unwrap().ends_with("lora_B.weight") && t["sum"].as_f64().unwrap() != 0.0);
    assert!(b_moved, "training moved B away from zero");
    let back = oqt_core::lora::LoraAdapter::read_peft(&d.join("straight")).unwrap();
    assert_eq!((back.rank, back.alpha), (2, 4.0));

    let g = gguf_py_dump(&d.join("straight.gguf"));
    assert_eq!(g["metadata"]["general.type"]["value"], "adapter", "{}", g["metadata"]);
    assert_eq!(g["metadata"]["adapter.type"]["value"], "lora");
    assert_eq!(g["metadata"]["adapter.lora.alpha"]["type"], "float32");
    assert_eq!(g["metadata"]["adapter.lora.alpha"]["value"], 4.0);
    let t = g["tensors"].as_array().unwrap();
    let q_a = t.iter().find(|t| t["name"] == "blk.0.attn_q.weight.lora_a").unwrap();
    assert_eq!(q_a["dims"], serde_json::json!([64, 2]), "ggml order: [in, r]");
    let down_b = t.iter().find(|t| t["name"] == "blk.1.ffn_down.weight.lora_b").unwrap();
    assert_eq!(down_b["dims"], serde_json::json!([2, 64]), "ggml order: [r, out]");

    let ppl = |adapter: Option<&str>| {
        let mut c = oqt();
        c.args(["eval", "--bundle"])
            .arg(&base)
            .arg("--dataset")
            .arg(&text)
            .args(["--ctx", "32", "--json"]);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(d.join(a));
        }
        json_of(&mut c)
    };
    let (plain, adapted) = (ppl(None), ppl(Some("straight")));
    assert_eq!(adapted["engine"], "runtime+lora", "{adapted}");
    let (p0, p1) = (
        plain["perplexity"].as_f64().unwrap(),
        adapted["perplexity"].as_f64().unwrap(),
    );
    assert!(p1.is_finite() && p1 != p0, "base {p0}, adapted {p1}");

    // The same run inside the runtime (no Burn): the same steps on the
    // runtime's forward, so its losses follow the Burn run's; it resumes
    // bit-identically from its own checkpoint.
    // Checkpointed after every step: the run is taken in one-step pieces.
    let in_runtime_with = |out: &str, steps: &str, resume: Option<&str>, schedule: &str| {
        let mut c = oqt();
        c.args([
            "finetune",
            "--lora",
            "--zeroth-order",
            "--engine",
            "runtime",
            "--rank",
            "2",
            "--alpha",
            "4",
        ])
        .args(["--targets", "q,v,down"])
        .arg(&base)
        .args(["--dataset", text.to_str().unwrap(), "--steps", steps, "--batch", "2"])
        .args([
            "--seq-len",
            "32",
            "--eval-every",
            "2",
            "--eval-windows",
            "2",
            "--lr",
            "1e-2",
        ])
        .args(["--schedule", schedule, "--checkpoint-every", "1"])
        .args(["--json", "--output"])
        .arg(d.join(out));
        if let Some(r) = resume {
            c.arg("--resume").arg(d.join(r));
        }
        json_of(&mut c)
    };
    let in_runtime = |out: &str, steps: &str, resume: Option<&str>| in_runtime_with(out, steps, resume, "constant");
    let rt = in_runtime("rt", "4", None);
    assert_eq!(rt["method"], "lora-zeroth-order-runtime");
    let losses = |v: &Value| -> Vec<f64> {
        v["train_loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .collect()
    };
    let (burn, runtime) = (losses(&straight), losses(&rt));
    eprintln!("train loss, Burn {burn:?} vs runtime {runtime:?}");
    assert_eq!(burn.len(), 4);
    for (b, r) in burn.iter().zip(&runtime) {
        assert!((b - r).abs() < 1e-3, "Burn {burn:?} vs runtime {runtime:?}");
    }
    // A schedule spans the whole run, however many pieces it is taken in.
    let (burn_cos, rt_cos) = (
        run_with("cos", "4", None, "cosine"),
        in_runtime_with("rt-cos", "4", None, "cosine"),
    );
    for (b, r) in losses(&burn_cos).iter().zip(&losses(&rt_cos)) {
        assert!((b - r).abs() < 1e-3, "cosine: Burn {burn_cos} vs runtime {rt_cos}");
    }
    assert_eq!(
        rt_cos["held_out_perplexity"].as_array().unwrap().len(),
        3,
        "evaluated at 0, 2 and 4 only: {rt_cos}"
    );
    in_runtime("rt2", "2", None);
    let rt2 = in_runtime("rt2", "4", Some("rt2.ckpt"));
    assert_eq!(rt2["steps"], 4);
    assert_eq!(
        read("rt"),
        read("rt2"),
        "a resumed runtime run ends on the same adapter"
    );

    // Merged into a new bundle, re-quantized with the base's recipe: the
    // linears the adapter does not touch keep the base's integers.
    let merged = d.join("merged.oqt");
    let v = json_of(
        oqt()
            .arg("merge")
            .arg(&base)
            .arg(d.join("straight"))
            .arg("--dataset")
            .arg(&text)
            .args(["--ctx", "32", "--eval-chunks", "2", "--json", "--output"])
            .arg(&merged),
    );
    let pct = v["perplexity"]["merge_change_pct"].as_f64().unwrap();
    assert!(pct.is_finite(), "{v}");
    let (b0, b1) = (
        oqt_core::bundle::Bundle::open(&base).unwrap(),
        oqt_core::bundle::Bundle::open(&merged).unwrap(),
    );
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(b0.quantized(k).unwrap().q, b1.quantized(k).unwrap().q);
    assert_eq!(b1.manifest.provenance.method.as_deref(), Some("lora-merge"));
    assert!(b1.manifest.inputs.iter().any(|i| i.role == "adapter"));
}

/// Bad LoRA input: rank 0, a rank larger than a layer, an unknown target, an
/// adapter for another model, a float base without a recipe — each a clear
/// error naming what is wrong, and nothing written.
#[test]
fn lora_refuses_bad_ranks_targets_and_foreign_adapters_writing_nothing() {
    let (dir, base, text) = tiny_lora_base(32);
    let d = dir.path();
    let finetune = |extra: &[&str]| {
        let mut c = oqt();
        c.args(["finetune", "--lora"])
            .arg(&base)
            .args(["--dataset", text.to_str().unwrap(), "--steps", "1", "--seq-len", "16"])
            .args(extra)
            .arg("--output")
            .arg(d.join("out"));
        c
    };
    finetune(&["--rank", "0"])
        .assert()
        .failure()
        .stderr(contains("--rank 0"));
    finetune(&["--rank", "40", "--targets", "k"])
        .assert()
        .failure()
        .stderr(contains("larger than").and(contains("k_proj")));
    finetune(&["--targets", "q,qkv"])
        .assert()
        .failure()
        .stderr(contains("unknown LoRA target `qkv`"));
    let (_d2, gguf) = tiny_model(33);
    oqt()
        .args(["finetune", "--lora"])
        .arg(&gguf)
        .args(["--dataset", text.to_str().unwrap(), "--output"])
        .arg(d.join("out"))
        .assert()
        .failure()
        .stderr(contains("needs --recipe"));
    assert!(
        !d.join("out").exists() && !d.join("out.ckpt").exists(),
        "nothing written"
    );

    // An adapter for the real model applied to the tiny one: the file and tensor named.
    let foreign = d.join("foreign");
    let cfg = oqt_core::load_model(&oqt_hub::resolve_model("smollm2-135m").unwrap().path)
        .unwrap()
        .config;
    oqt_core::lora::LoraAdapter::init(&cfg, 2, 4.0, &[oqt_core::lora::LoraModule::V], 0, "smollm2")
        .unwrap()
        .write_peft(&foreign)
        .unwrap();
    oqt()
        .args(["eval", "--bundle"])
        .arg(&base)
        .arg("--adapter")
        .arg(&foreign)
        .args(["--dataset", text.to_str().unwrap(), "--ctx", "16"])
        .assert()
        .failure()
        .stderr(
            contains("adapter_model.safetensors")
                .and(contains("v_proj"))
                .and(contains("another model")),
        );
    oqt()
        .arg("merge")
        .arg(&base)
        .arg(&foreign)
        .arg("--output")
        .arg(d.join("merged.oqt"))
        .assert()
        .failure()
        .stderr(contains("another model"));
    assert!(!d.join("merged.oqt").exists(), "nothing written");
    finetune(&["--init-adapter", foreign.to_str().unwrap()])
        .assert()
        .failure()
        .stderr(contains("another model"));
    assert!(!d.join("out").exists(), "nothing written");
}

/// First-order LoRA on the real model's `w4a8-dyn` bundle: the held-out Tiny
/// Shakespeare loss falls within a few steps while the base stays frozen.
#[test]
fn first_order_lora_on_smollm2_lowers_the_held_out_loss() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.oqt");
    oqt()
        .args([
            "quantize",
            "--recipe",
            "w4a8-dyn",
            "smollm2-135m",
            "--no-eval",
            "--output",
        ])
        .arg(&base)
        .assert()
        .success();
    let v = json_of(
        oqt()
            .args(["finetune", "--lora", "--rank", "8", "--targets", "q,v"])
            .arg(&base)
            .args(["--steps", "6", "--batch", "2", "--seq-len", "64", "--eval-every", "6"])
            .args(["--eval-windows", "4", "--lr", "3e-3", "--json", "--output"])
            .arg(dir.path().join("ad")),
    );
    let losses = v["held_out_loss"].as_array().unwrap();
    let (first, last) = (
        losses[0][1].as_f64().unwrap(),
        losses[losses.len() - 1][1].as_f64().unwrap(),
    );
    assert!(last < first - 0.02, "held-out loss {first} → {last}");
    assert_eq!(v["trainable_params"], 30 * 8 * ((576 + 576) + (576 + 192)));
}

/// A recipe's `lora` step (quantize → lora, merged) equals `oqt quantize`,
/// `oqt finetune --lora` and `oqt merge` run by hand, and keeps the adapter
/// beside its bundle; a `lora` step without a quantized bundle before it, or
/// with an unknown target, is refused naming the step's field.
#[test]
fn a_lora_recipe_step_equals_finetune_then_merge() {
    let (dir, gguf) = tiny_model(34);
    let d = dir.path();
    let text = write_text(&dir, "a stitch in time saves nine; nine stitches save a time. ", 40);
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../recipes/w4a8-dyn.toml")).unwrap();
    let with_steps = |steps: &str| {
        let path = d.join("lora.toml");
        std::fs::write(&path, base.replace("name = \"w4a8-dyn\"", "name = \"lora\"") + steps).unwrap();
        path
    };
    let training = format!(
        "zeroth_order = true\nsteps = 3\nbatch = 1\nseq_len = 32\neval_every = 0\neval_windows = 2\nlr = 1e-2\ndataset = \"{}\"\n",
        text.display()
    );
    let recipe = with_steps(&format!(
        "\n[[steps]]\nkind = \"quantize\"\nmethod = \"rtn\"\n\n[[steps]]\nkind = \"lora\"\nrank = 2\nalpha = 4.0\ntargets = \"q,v\"\n\n[steps.training]\n{training}"
    ));
    json_of(
        oqt()
            .arg("run")
            .arg(&recipe)
            .arg(&gguf)
            .arg("-o")
            .arg(d.join("one.oqt"))
            .arg("--json"),
    );
    assert!(d.join("one.oqt.run/step-2-lora.adapter/adapter_config.json").is_file());

    oqt()
        .args(["quantize", "--recipe", "w4a8-dyn", "--method", "rtn", "--no-eval", "-o"])
        .arg(d.join("hand1.oqt"))
        .arg(&gguf)
        .assert()
        .success();
    oqt()
        .args([
            "finetune",
            "--lora",
            "--zeroth-order",
            "--rank",
            "2",
            "--alpha",
            "4",
            "--targets",
            "q,v",
        ])
        .arg(d.join("hand1.oqt"))
        .args([
            "--dataset",
            text.to_str().unwrap(),
            "--steps",
            "3",
            "--batch",
            "1",
            "--seq-len",
            "32",
        ])
        .args(["--eval-every", "0", "--eval-windows", "2", "--lr", "1e-2", "-o"])
        .arg(d.join("hand-ad"))
        .assert()
        .success();
    oqt()
        .arg("merge")
        .arg(d.join("hand1.oqt"))
        .arg(d.join("hand-ad"))
        .args(["--eval-chunks", "0", "-o"])
        .arg(d.join("hand2.oqt"))
        .assert()
        .success();
    assert_eq!(tensors_of(&d.join("one.oqt")), tensors_of(&d.join("hand2.oqt")));

    let bad = with_steps(&format!("\n[[steps]]\nkind = \"lora\"\n\n[steps.training]\n{training}"));
    oqt()
        .arg("run")
        .arg(&bad)
        .arg(&gguf)
        .arg("-o")
        .arg(d.join("bad.oqt"))
        .assert()
        .failure()
        .stderr(contains("steps[0]").and(contains("put a `quantize` step before it")));
    let bad = with_steps("\n[[steps]]\nkind = \"quantize\"\n\n[[steps]]\nkind = \"lora\"\ntargets = \"q,attn\"\n");
    oqt()
        .arg("run")
        .arg(&bad)
        .arg(&gguf)
        .arg("-o")
        .arg(d.join("bad.oqt"))
        .assert()
        .failure()
        .stderr(contains("steps[1].targets").and(contains("`attn`")));
    assert!(!d.join("bad.oqt").exists());
}
