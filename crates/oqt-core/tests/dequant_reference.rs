//! oqt's ggml dequantizers against the `gguf` Python package (llama.cpp's
//! reference reader) on random blocks; see `data/make_dequant_fixture.py`.

use oqt_core::gguf::{GgmlType, dequantize};
use serde_json::Value;

fn ty(name: &str) -> GgmlType {
    match name {
        "Q8_0" => GgmlType::Q8_0,
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q4_K" => GgmlType::Q4K,
        "Q6_K" => GgmlType::Q6K,
        other => panic!("fixture type {other}"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn block_formats_decode_exactly_like_gguf_py() {
    let fx: Value = serde_json::from_str(include_str!("data/dequant_reference.json")).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let t = ty(case["type"].as_str().unwrap());
        let raw = hex(case["bytes_hex"].as_str().unwrap());
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize(t, &raw, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{} value {i}: {g} vs {w}",
                t.name()
            );
        }
    }
}
