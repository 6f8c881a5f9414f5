//! GPTQ on one real SmolLM2 layer agrees with a numpy implementation written
//! from the paper (`tests/python/gptq_reference.py`): the same integer codes
//! (up to a few rounding ties), the same scales, the same output error.

use oqt_compress::ptq::gptq::{GptqOptions, gptq_quantize, output_error};
use oqt_core::quant::{Granularity, WeightSpec, quantize_weight};

fn write_f32(path: &std::path::Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

#[test]
fn gptq_on_a_real_layer_matches_the_numpy_reference() {
    let model = oqt_core::load_model(&oqt_hub::resolve_model("smollm2-135m").unwrap().path).unwrap();
    let name = "model.layers.3.self_attn.k_proj.weight";
    let t = model.weights.get(name).unwrap();
    let (rows, cols) = (t.shape[0], t.shape[1]);
    // Fixed calibration inputs: channels of unequal scale and two massive ones,
    // as SmolLM2's residual stream has.
    let n = 512;
    let mut x = oqt_core::testing::pseudo_random(n * cols, 37, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        let c = i % cols;
        *v *= 0.2 + (c % 13) as f32 * 0.3;
        if c == 17 || c == 300 {
            *v *= 40.0;
        }
    }
    let mut h = vec![0f64; cols * cols];
    for row in x.chunks_exact(cols) {
        for i in 0..cols {
            let xi = row[i] as f64;
            for j in 0..cols {
                h[i * cols + j] += 2.0 * xi * row[j] as f64;
            }
        }
    }
    let spec = WeightSpec::new(4, Granularity::PerChannel, true);
    let opts = GptqOptions {
        damp_percent: 0.01,
        ..GptqOptions::default()
    };
    let ours = gptq_quantize(&t.data, rows, cols, &h, &spec, &opts).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (wp, xp, out) = (
        dir.path().join("w.f32"),
        dir.path().join("x.f32"),
        dir.path().join("ref"),
    );
    write_f32(&wp, &t.data);
    write_f32(&xp, &x);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/gptq_reference.py");
    let status = std::process::Command::new("python3")
        .arg(script)
        .args([&wp, &xp])
        .args([rows.to_string(), cols.to_string(), "4".into(), "0.01".into()])
        .arg(&out)
        .status()
        .expect("python3 with numpy runs");
    assert!(status.success(), "gptq_reference.py failed");
    let with_ext = |e: &str| {
        let mut p = out.clone().into_os_string();
        p.push(e);
        std::fs::read(p).unwrap()
    };
    let q_ref: Vec<i8> = with_ext(".q").into_iter().map(|b| b as i8).collect();
    let scales_ref: Vec<f32> = with_ext(".scales")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let errors: serde_json::Value = serde_json::from_slice(&with_ext(".json")).unwrap();

    assert_eq!(scales_ref.len(), rows);
    for (a, b) in ours.scales.iter().zip(&scales_ref) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "scale {a} vs numpy {b}");
    }
    assert_eq!(q_ref.len(), ours.q.len());
    let same = ours.q.iter().zip(&q_ref).filter(|(a, b)| a == b).count();
    let share = same as f64 / q_ref.len() as f64;
    // The sweep's float rounding differs (lazy blocks vs numpy's column loop),
    // so a value sitting on a rounding boundary may land on either side.
    assert!(share >= 0.995, "only {share:.4} of the codes agree with numpy");
    let ours_err = output_error(&t.data, &ours, &h);
    let ref_err = errors["gptq_error"].as_f64().unwrap() * 2.0;
    let rtn_err = output_error(&t.data, &quantize_weight(&t.data, rows, cols, &spec, 1.0), &h);
    let ref_rtn = errors["rtn_error"].as_f64().unwrap() * 2.0;
    eprintln!(
        "{name}: codes agreeing {share:.5}; output error oqt {ours_err:.6e}, numpy {ref_err:.6e}; RTN oqt {rtn_err:.6e}, numpy {ref_rtn:.6e}"
    );
    assert!(
        (ours_err - ref_err).abs() <= 0.01 * ref_err,
        "oqt {ours_err} vs numpy {ref_err}"
    );
    // numpy divides in f64, oqt's quantizer in f32: a few values at a rounding tie differ.
    assert!(
        (rtn_err - ref_rtn).abs() <= 1e-3 * rtn_err,
        "RTN oqt {rtn_err} vs numpy {ref_rtn}"
    );
    // And GPTQ does what it is for: less output error than rounding.
    assert!(ref_err < 0.8 * ref_rtn, "GPTQ {ref_err} vs RTN {ref_rtn}");
}
