//! Bundles: round trips on the real model, size, and clear errors for
//! truncated, foreign, or newer-format files.

use oqt_core::bundle::{Bundle, BundleWriter, Manifest};
use oqt_core::quant::{load_recipe, quantize_weight};
use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
use oqt_core::{LoadedModel, load_model};
use std::path::Path;

/// Quantize every 2-D weight with the recipe's spec (RTN, no clipping); keep the rest f32.
fn write_bundle(m: &LoadedModel, recipe: &str, path: &Path) {
    let recipe = load_recipe(recipe).unwrap();
    let mut manifest = Manifest::for_model(m, "oqt tests").unwrap();
    // Provenance only: without calibrated grids the deployment keeps float activations.
    manifest.provenance.recipe = Some(serde_json::to_value(&recipe).unwrap());
    manifest.provenance.method = Some("rtn".into());
    let mut w = BundleWriter::new(manifest);
    for name in m.weights.names() {
        let t = m.weights.get(name).unwrap();
        if t.shape.len() == 2 {
            let spec = recipe.spec.weights_for(name);
            w.add_quantized(name, &quantize_weight(&t.data, t.shape[0], t.shape[1], &spec, 1.0));
        } else {
            w.add_f32(name, t.shape.clone(), &t.data);
        }
    }
    w.write(path).unwrap();
}

#[test]
fn smollm2_w4a8_bundle_round_trips_and_is_under_a_third_of_f16() {
    let path = oqt_hub::resolve_model("smollm2-135m").unwrap().path;
    let m = load_model(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-w4a8.oqt");
    write_bundle(&m, "w4a8", &out);

    let size = std::fs::metadata(&out).unwrap().len() as f64;
    let f16 = m.config.n_params() as f64 * 2.0;
    eprintln!("bundle {:.1} MiB = {:.3} × f16", size / 1048576.0, size / f16);
    assert!(size <= 0.33 * f16, "bundle is {:.3} × the f16 size", size / f16);

    let b = Bundle::open(&out).unwrap();
    assert_eq!(b.manifest.config, m.config);
    assert_eq!(b.manifest.recipe_name(), Some("w4a8"));
    let name = "model.layers.7.mlp.down_proj.weight";
    let t = m.weights.get(name).unwrap();
    let spec = load_recipe("w4a8").unwrap().spec.weights_for(name);
    assert_eq!(
        b.quantized(name).unwrap(),
        quantize_weight(&t.data, t.shape[0], t.shape[1], &spec, 1.0)
    );
    let emb = b.quantized("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.spec.bits, 8);
    assert_eq!(
        b.f32_tensor("model.norm.weight").unwrap(),
        m.weights.get("model.norm.weight").unwrap().data
    );
    // The stored tokenizer is the model's.
    let tok = b.tokenizer().unwrap();
    for text in [
        "Hello world",
        "Numbers: 3.14159, 2026",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        assert_eq!(
            tok.encode(text, false).unwrap(),
            m.tokenizer.encode(text, false).unwrap()
        );
        assert_eq!(tok.encode(text, true).unwrap(), m.tokenizer.encode(text, true).unwrap());
    }
    assert_eq!(tok.chat_template, m.tokenizer.chat_template);
}

/// The tiny random Llama of weights `seed`, written to `dir/t.gguf` and loaded.
fn tiny_model(dir: &Path, seed: u64) -> LoadedModel {
    let cfg = tiny_config();
    let gguf = dir.join("t.gguf");
    write_tiny_gguf(&gguf, &cfg, &random_weights(&cfg, seed)).unwrap();
    load_model(&gguf).unwrap()
}

fn tiny_bundle(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("tiny.oqt");
    write_bundle(&tiny_model(dir, 4), "w4a8-dyn", &out);
    out
}

#[test]
fn asymmetric_and_odd_width_weights_round_trip() {
    use oqt_core::quant::{Granularity, Rounding, ScaleRule, WeightSpec};
    let gguf_dir = tempfile::tempdir().unwrap();
    let m = tiny_model(gguf_dir.path(), 8);
    let mut w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
    let data: Vec<f32> = oqt_core::testing::pseudo_random(5 * 45, 3, 1.0);
    let asym = WeightSpec {
        bits: 4,
        granularity: Granularity::PerGroup(32),
        symmetric: false,
        scale_rule: ScaleRule::AmaxOverQmax,
        rounding: Rounding::HalfToEven,
    };
    let q8 = WeightSpec {
        bits: 8,
        granularity: Granularity::PerTensor,
        symmetric: true,
        ..asym
    };
    let a = quantize_weight(&data, 5, 45, &asym, 1.0);
    let b = quantize_weight(&data, 5, 45, &q8, 0.9);
    w.add_quantized("a", &a);
    w.add_quantized("b", &b);
    let path = gguf_dir.path().join("x.oqt");
    w.write(&path).unwrap();
    let bundle = Bundle::open(&path).unwrap();
    assert_eq!(bundle.quantized("a").unwrap(), a);
    assert_eq!(bundle.quantized("b").unwrap(), b);
}

#[test]
fn truncated_bundle_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_bundle(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(msg.contains("tiny.oqt") && msg.contains("truncated"), "{msg}");
    std::fs::write(&p, &bytes[..5]).unwrap();
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(msg.contains("tiny.oqt") && msg.contains("safetensors"), "{msg}");
}

#[test]
fn a_file_of_neither_format_names_both_and_what_each_expected() {
    let dir = tempfile::tempdir().unwrap();
    // A GGUF file whose magic is wrong: not GGUF by content, so read as a bundle.
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, b"XXXX\x03\x00\x00\x00garbage garbage garbage").unwrap();
    let msg = Bundle::open(&p).unwrap_err().to_string();
    for part in [
        "model.gguf",
        "oqt bundle",
        "safetensors",
        "header length",
        "magic `GGUF`",
        "found `XXXX`",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    std::fs::write(&p, [0xffu8, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]).unwrap();
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(msg.contains("found bytes [ff 00 01 02]"), "{msg}");
}

#[test]
fn newer_format_version_says_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_bundle(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    // Same-length edit inside the JSON header: version 2 → 9.
    let needle = b"\\\"format_version\\\":2";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("version in header");
    let mut edited = bytes.clone();
    edited[at + needle.len() - 1] = b'9';
    std::fs::write(&p, &edited).unwrap();
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(
        msg.contains("bundle format version") && msg.contains('9') && msg.contains("upgrade"),
        "{msg}"
    );
}

#[test]
fn plain_safetensors_is_not_a_bundle_and_failed_writes_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plain.safetensors");
    let data = vec![0u8; 16];
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    safetensors::serialize_to_file(vec![("x", v)], None, &p).unwrap();
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(msg.contains("not an oqt bundle"), "{msg}");

    let missing_dir = dir.path().join("no-such-dir").join("x.oqt");
    let m = tiny_model(dir.path(), 1);
    let w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
    assert!(w.write(&missing_dir).is_err());
    assert!(!missing_dir.exists());
}

/// Rewrite the manifest of the bundle at `p` through `edit` (the tensor data kept).
fn rewrite_manifest(p: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &mut header["__metadata__"]["oqt.manifest"];
    let mut manifest: serde_json::Value = serde_json::from_str(meta.as_str().unwrap()).unwrap();
    edit(&mut manifest);
    *meta = serde_json::Value::String(manifest.to_string());
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(p, out).unwrap();
}

#[test]
fn hostile_deployment_specs_are_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_bundle(dir.path());
    let original = std::fs::read(&p).unwrap();
    // An encoding this oqt does not know.
    rewrite_manifest(&p, |m| {
        m["deployment"]["tensors"]["model.norm.weight"]["kind"] = "vq".into();
    });
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(
        msg.contains("tiny.oqt") && msg.contains("vq") && msg.contains("int4"),
        "{msg}"
    );
    // An integer encoding whose stored values are too short for its shape.
    std::fs::write(&p, &original).unwrap();
    rewrite_manifest(&p, |m| {
        m["deployment"]["tensors"]["model.layers.0.mlp.up_proj.weight"]["cols"] = 4096.into();
    });
    let b = Bundle::open(&p).unwrap();
    let msg = b
        .quantized("model.layers.0.mlp.up_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("up_proj.weight.qweight") && msg.contains("bytes"), "{msg}");
    // A static deployment with a broken grid.
    std::fs::write(&p, &original).unwrap();
    rewrite_manifest(&p, |m| {
        m["deployment"]["activations"] = "static".into();
        m["deployment"]["act_grids"] = serde_json::json!({ "embed": { "scale": 0.0, "zero_point": 0, "bits": 8 } });
    });
    let msg = Bundle::open(&p).unwrap().site_grids().unwrap_err().to_string();
    assert!(msg.contains("deployment.act_grids"), "{msg}");
    // A tensor the deployment names but the file lacks.
    std::fs::write(&p, &original).unwrap();
    rewrite_manifest(&p, |m| {
        m["deployment"]["tensors"]["extra.weight"] = serde_json::json!({ "kind": "f32", "shape": [2] });
    });
    let msg = Bundle::open(&p).unwrap_err().to_string();
    assert!(msg.contains("missing tensor `extra.weight`"), "{msg}");
}

/// The byte range of tensor `name`'s data in a safetensors file.
fn tensor_bytes(file: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
    8 + n + a..8 + n + b
}

#[test]
fn lpbq_weights_round_trip_and_hostile_multipliers_are_refused() {
    use oqt_core::quant::{Granularity, WeightSpec};
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path(), 8);
    let mut data: Vec<f32> = oqt_core::testing::pseudo_random(6 * 128, 5, 1.0);
    data[64..128].fill(0.0); // a zero block: multiplier 1
    data[2 * 128..3 * 128].iter_mut().for_each(|v| *v *= 1e-3); // a small row
    let path = dir.path().join("x.oqt");
    let mut expected = Vec::new();
    {
        let mut w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
        for block in [16, 32, 64] {
            let qw = quantize_weight(&data, 6, 128, &WeightSpec::new(4, Granularity::Lpbq(block), true), 1.0);
            assert!(qw.multipliers.as_ref().unwrap().iter().any(|&x| x > 1 && x < 16));
            w.add_quantized(&format!("lpbq{block}"), &qw);
            expected.push(qw);
        }
        w.write(&path).unwrap();
    }
    let bundle = Bundle::open(&path).unwrap();
    for (block, qw) in [16, 32, 64].iter().zip(&expected) {
        assert_eq!(&bundle.quantized(&format!("lpbq{block}")).unwrap(), qw);
    }
    drop(bundle);
    let clean = std::fs::read(&path).unwrap();
    for bad in [0u8, 17, 255] {
        let mut bytes = clean.clone();
        let range = tensor_bytes(&bytes, "lpbq32.multipliers");
        bytes[range.start + 3] = bad;
        std::fs::write(&path, &bytes).unwrap();
        let msg = Bundle::open(&path)
            .and_then(|b| b.quantized("lpbq32"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("lpbq32.multipliers") && msg.contains("[1, 16]") && msg.contains(&bad.to_string()),
            "{msg}"
        );
    }
}

#[test]
fn stored_bytes_of_every_encoding_is_what_the_bundle_holds() {
    use oqt_core::encoding::TensorEncoding;
    use oqt_core::quant::{Granularity, WeightSpec};
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path(), 8);
    let mut w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
    let data: Vec<f32> = oqt_core::testing::pseudo_random(6 * 128, 9, 1.0);
    let specs = [
        WeightSpec::new(4, Granularity::PerChannel, true),
        WeightSpec::new(4, Granularity::PerGroup(32), false),
        WeightSpec::new(8, Granularity::PerChannel, true),
        WeightSpec::new(8, Granularity::PerTensor, true),
        WeightSpec::new(4, Granularity::Lpbq(64), true),
    ];
    let mut expected = 0;
    for (i, spec) in specs.iter().enumerate() {
        // 100 columns: rows padded to 128 in storage (groups and LPBQ blocks need whole widths).
        let cols = if matches!(i, 1 | 4) { 128 } else { 100 };
        let qw = quantize_weight(&data[..6 * cols], 6, cols, spec, 1.0);
        expected += TensorEncoding::of_quantized(&qw).stored_bytes();
        w.add_quantized(&format!("w{i}"), &qw);
    }
    w.add_f32("norm", vec![7], &[1.0; 7]);
    expected += TensorEncoding::F32 { shape: vec![7] }.stored_bytes();
    let path = dir.path().join("x.oqt");
    w.write(&path).unwrap();
    assert_eq!(Bundle::open(&path).unwrap().data_bytes(), expected);
}

#[test]
fn sparse_weights_round_trip_and_hostile_positions_are_refused() {
    use oqt_core::encoding::TensorEncoding;
    use oqt_core::quant::{Granularity, WeightSpec, dequantize_weight};
    use oqt_core::sparse::SparseLayout;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path(), 8);
    let (rows, cols) = (6, 128);
    let mut data: Vec<f32> = oqt_core::testing::pseudo_random(rows * cols, 5, 1.0);
    // 2:4 by magnitude; an unstructured copy with a few more zeros.
    for block in data.chunks_exact_mut(4) {
        let mut idx = [0, 1, 2, 3];
        idx.sort_by(|&a, &b| block[a].abs().total_cmp(&block[b].abs()));
        block[idx[0]] = 0.0;
        block[idx[1]] = 0.0;
    }
    let mut unstructured = data.clone();
    unstructured[..40].fill(0.0);
    let two_four = SparseLayout::NOfM { n: 2, m: 4 };
    let specs = [
        WeightSpec::new(4, Granularity::PerGroup(32), true),
        WeightSpec::new(4, Granularity::PerChannel, false),
        WeightSpec::new(8, Granularity::PerChannel, true),
    ];
    let path = dir.path().join("s.oqt");
    let mut quantized = Vec::new();
    let mut expected_bytes = 0;
    {
        let mut w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
        w.add_sparse_f32("f24", rows, cols, &data, two_four).unwrap();
        w.add_sparse_f32("fbits", rows, cols, &unstructured, SparseLayout::Bitmap)
            .unwrap();
        for (i, spec) in specs.iter().enumerate() {
            let qw = quantize_weight(&data, rows, cols, spec, 1.0);
            w.add_sparse_quantized(&format!("q{i}"), &qw, two_four).unwrap();
            quantized.push(qw);
        }
        // A weight that is not 2:4 is refused, naming it.
        let e = w.add_sparse_f32(
            "dense",
            rows,
            cols,
            &unstructured.iter().map(|v| v + 9.0).collect::<Vec<_>>(),
            two_four,
        );
        assert!(e.unwrap_err().to_string().contains("dense: more than 2 non-zeros"));
        expected_bytes += w
            .manifest_mut()
            .deployment
            .tensors
            .values()
            .map(TensorEncoding::stored_bytes)
            .sum::<usize>();
        w.write(&path).unwrap();
    }
    let b = Bundle::open(&path).unwrap();
    // Sparse bundles are version 3 (an older oqt says "upgrade"); dense ones stay 2.
    assert_eq!(b.manifest.format_version, 3);
    assert_eq!(
        Bundle::open(tiny_bundle(dir.path())).unwrap().manifest.format_version,
        2
    );
    assert_eq!(b.data_bytes(), expected_bytes);
    assert_eq!(b.f32_tensor("f24").unwrap(), data);
    assert_eq!(b.f32_tensor("fbits").unwrap(), unstructured);
    for (i, qw) in quantized.iter().enumerate() {
        let back = b.quantized(&format!("q{i}")).unwrap();
        // The kept codes back in place, the pruned ones on the exact zero code.
        assert_eq!(dequantize_weight(&back), dequantize_weight(qw), "{:?}", specs[i]);
        assert_eq!(
            b.manifest.deployment.tensors[&format!("q{i}")].int_grid().unwrap().cols,
            cols
        );
    }
    assert_eq!(b.manifest.deployment.tensors["q0"].describe(), "int4 g32 sym 2:4");
    drop(b);

    // Hostile: a repeated position, a bitmap whose bits do not count the values, a values shape off its layout.
    let clean = std::fs::read(&path).unwrap();
    let mut bytes = clean.clone();
    let r = tensor_bytes(&bytes, "q0.indices");
    bytes[r.start] = 0; // positions 0, 0, 0, 0
    std::fs::write(&path, &bytes).unwrap();
    let msg = Bundle::open(&path)
        .and_then(|b| b.quantized("q0"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("q0.indices") && msg.contains("increasing positions"),
        "{msg}"
    );
    let mut bytes = clean.clone();
    let r = tensor_bytes(&bytes, "fbits.mask");
    bytes[r.start] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let msg = Bundle::open(&path)
        .and_then(|b| b.f32_tensor("fbits"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("fbits") && msg.contains("bits set in fbits.mask"), "{msg}");
    std::fs::write(&path, &clean).unwrap();
    rewrite_manifest(&path, |m| {
        m["deployment"]["tensors"]["f24"]["values"]["shape"] = serde_json::json!([6, 60]);
    });
    let msg = Bundle::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("deployment.tensors.f24") && msg.contains("expected [6, 64]"),
        "{msg}"
    );
    std::fs::write(&path, &clean).unwrap();
    rewrite_manifest(&path, |m| {
        m["deployment"]["tensors"]["q1"]["layout"] = serde_json::json!({"n-of-m": {"n": 2, "m": 5}});
    });
    let msg = Bundle::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("deployment.tensors.q1") && msg.contains("do not divide"),
        "{msg}"
    );
}

#[test]
fn lut_bundles_round_trip_are_version_4_and_refuse_hostile_palettes() {
    use half::f16;
    use oqt_core::encoding::TensorEncoding;
    use oqt_core::lut::Palettized;
    use oqt_core::quant::dequantize_weight;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lut.oqt");
    let m = tiny_model(dir.path(), 5);
    let mut w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
    let (rows, cols) = (8, 20);
    let mut palettes = Vec::new();
    for bits in [2u8, 3, 4, 8] {
        let entries = 1usize << bits;
        let p = Palettized {
            rows,
            cols,
            bits,
            group_rows: 4,
            tables: (0..2 * entries).map(|i| f16::from_f32(i as f32 * 0.01 - 0.3)).collect(),
            indices: (0..rows * cols).map(|i| ((i * 5 + 1) % entries) as u8).collect(),
        };
        w.add_lut(&format!("w{bits}"), &p).unwrap();
        palettes.push(p);
    }
    // A malformed palette is refused at the writer, naming the tensor.
    let mut bad = palettes[0].clone();
    bad.group_rows = 3;
    let msg = w.add_lut("bad", &bad).unwrap_err().to_string();
    assert!(msg.contains("bad") && msg.contains("divisor"), "{msg}");
    let expected: usize = w
        .manifest_mut()
        .deployment
        .tensors
        .values()
        .map(TensorEncoding::stored_bytes)
        .sum();
    w.write(&path).unwrap();
    let b = Bundle::open(&path).unwrap();
    assert_eq!(b.manifest.format_version, 4);
    assert_eq!(b.data_bytes(), expected);
    for p in &palettes {
        let name = format!("w{}", p.bits);
        assert_eq!(&b.palettized(&name).unwrap(), p);
        // The kernels' int8 view: each weight within half a step of its table value.
        let qw = b.quantized(&name).unwrap();
        let half_step = p.tables.iter().fold(0f32, |a, t| a.max(t.to_f32().abs())) / 127.0 / 2.0;
        for (v, want) in dequantize_weight(&qw).iter().zip(p.dequantize()) {
            assert!((v - want).abs() <= half_step * 1.0001, "{v} {want}");
        }
        assert_eq!(
            b.manifest.deployment.tensors[&name].describe(),
            format!("lut{} g4", p.bits)
        );
    }
    drop(b);

    // Hostile: bits outside 1–8, a row group not dividing the rows, short indices, a newer version.
    let clean = std::fs::read(&path).unwrap();
    rewrite_manifest(&path, |m| m["deployment"]["tensors"]["w4"]["bits"] = 9.into());
    let msg = Bundle::open(&path).unwrap_err().to_string();
    assert!(msg.contains("deployment.tensors.w4") && msg.contains("1–8"), "{msg}");
    std::fs::write(&path, &clean).unwrap();
    rewrite_manifest(&path, |m| m["deployment"]["tensors"]["w4"]["group_rows"] = 3.into());
    let msg = Bundle::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("deployment.tensors.w4") && msg.contains("divisor"),
        "{msg}"
    );
    std::fs::write(&path, &clean).unwrap();
    rewrite_manifest(&path, |m| m["deployment"]["tensors"]["w4"]["cols"] = 24.into());
    let msg = Bundle::open(&path)
        .and_then(|b| b.palettized("w4"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("w4.indices") && msg.contains("4-bit indices"), "{msg}");
    std::fs::write(&path, &clean).unwrap();
    rewrite_manifest(&path, |m| m["format_version"] = 6.into());
    let msg = Bundle::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("bundle format version") && msg.contains("upgrade"),
        "{msg}"
    );
}

#[test]
fn shared_weights_expand_from_their_source_are_version_5_and_refuse_hostile_references() {
    use oqt_core::encoding::TensorEncoding;
    use oqt_core::quant::dequantize_weight;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.oqt");
    let m = tiny_model(dir.path(), 6);
    let mut w = BundleWriter::new(Manifest::for_model(&m, "t").unwrap());
    let (rows, cols) = (6, 40);
    let data = oqt_core::testing::pseudo_random(rows * cols, 9, 1.0);
    let spec = load_recipe("w4a8-dyn").unwrap().spec.weights_for("x");
    let qw = quantize_weight(&data, rows, cols, &spec, 1.0);
    w.add_f32("float", vec![rows, cols], &data);
    w.add_quantized("int", &qw);
    let scales: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 * 0.25).collect();
    w.add_shared("float.twin", rows, cols, "float", &scales);
    w.add_shared("int.twin", rows, cols, "int", &scales);
    let expected: usize = w
        .manifest_mut()
        .deployment
        .tensors
        .values()
        .map(TensorEncoding::stored_bytes)
        .sum();
    w.write(&path).unwrap();
    let b = Bundle::open(&path).unwrap();
    assert_eq!(b.manifest.format_version, 5);
    // A shared weight stores only its row scales.
    assert_eq!(b.data_bytes(), expected);
    let scaled = |src: &[f32]| -> Vec<f32> {
        src.chunks(cols)
            .zip(&scales)
            .flat_map(|(r, s)| r.iter().map(move |v| v * s))
            .collect()
    };
    assert_eq!(b.dense("float.twin").unwrap(), scaled(&data));
    assert_eq!(b.dense("int.twin").unwrap(), scaled(&dequantize_weight(&qw)));
    assert_eq!(b.f32_tensor("float.twin").unwrap(), scaled(&data));
    let (of, s) = b.shared("int.twin").unwrap().unwrap();
    assert_eq!((of, s), ("int", scales.clone()));
    assert_eq!(b.first_shared(), Some("float.twin"));
    assert_eq!(
        b.manifest.deployment.tensors["int.twin"].describe(),
        "shared × row scales"
    );
    drop(b);

    // Hostile: a missing source, a shared source, a source of another shape,
    // row scales of the wrong length, an empty source name.
    let clean = std::fs::read(&path).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value), want: &[&str]| {
        std::fs::write(&path, &clean).unwrap();
        rewrite_manifest(&path, edit);
        let msg = Bundle::open(&path)
            .and_then(|b| b.dense("int.twin"))
            .unwrap_err()
            .to_string();
        for w in want {
            assert!(msg.contains(w), "{msg} (wanted {w})");
        }
    };
    let twin = |m: &mut serde_json::Value| m["deployment"]["tensors"]["int.twin"].clone();
    refused(
        &|m| m["deployment"]["tensors"]["int.twin"]["of"] = "nowhere".into(),
        &["deployment.tensors.int.twin", "`nowhere` is not in the bundle"],
    );
    refused(
        &|m| m["deployment"]["tensors"]["int.twin"]["of"] = "float.twin".into(),
        &["deployment.tensors.int.twin", "itself shared"],
    );
    refused(
        &|m| {
            let mut t = twin(m);
            t["cols"] = 41.into();
            m["deployment"]["tensors"]["int.twin"] = t;
        },
        &["deployment.tensors.int.twin", "shape [6, 41]", "[6, 40]"],
    );
    refused(
        &|m| {
            let mut t = twin(m);
            t["rows"] = 5.into();
            t["of"] = "int".into();
            m["deployment"]["tensors"]["int.twin"] = t;
            m["deployment"]["tensors"]["int"]["rows"] = 5.into();
        },
        &["int.twin.row_scales", "5 row scales", "6 values"],
    );
    refused(
        &|m| m["deployment"]["tensors"]["int.twin"]["of"] = "".into(),
        &["deployment.tensors.int.twin", "source (`of`)"],
    );
}
