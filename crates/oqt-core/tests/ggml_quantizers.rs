//! oqt's llama.cpp grids against the `gguf` Python package's reference
//! quantizers (ports of ggml's `quantize_row_*_ref`): the same bytes for the
//! same floats, so a model quantized by oqt on a `gguf-*` recipe is the model
//! `llama-quantize` would have written — and exports without a changed value.

use oqt_core::gguf::GgmlType;
use oqt_core::gguf::encode::quantize_ggml;
use oqt_core::testing::pseudo_random;
use std::process::Command;

/// `gguf.quants.quantize` of `[rows, cols]` values.
fn gguf_py_quantize(values: &[f32], cols: usize, ty: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("x.f32"), dir.path().join("q.bin"));
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&inp, bytes).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/gguf_check.py");
    let status = Command::new("python3")
        .args([script, "quantize"])
        .arg(&inp)
        .arg(ty)
        .arg(&out)
        .arg(cols.to_string())
        .status()
        .expect("python3 runs (install Python 3 and `pip install gguf==0.19.0`)");
    assert!(status.success(), "gguf_check.py quantize failed");
    std::fs::read(out).unwrap()
}

/// Random rows plus the blocks where rounding rules differ: ties in magnitude of
/// opposite sign (Q4_0 takes the first), an all-zero block, values on half-steps.
fn tricky_rows(rows: usize, cols: usize) -> Vec<f32> {
    let mut w = pseudo_random(rows * cols, 11, 0.2);
    w[..32].fill(0.0);
    w[32] = 0.5;
    w[40] = -0.5;
    w[64] = -0.3;
    w[65] = 0.3;
    for (j, v) in w[96..128].iter_mut().enumerate() {
        *v = (j as f32 - 16.0) * 0.5 / 8.0; // multiples of half a Q4_0 step
    }
    for (j, v) in w[128..160].iter_mut().enumerate() {
        *v = (j as f32 - 15.5) / 15.5 * 127.0 / 254.0; // Q8_0 half-steps
    }
    w
}

#[test]
fn q8_0_q4_0_q4_1_and_f16_quantize_byte_for_byte_like_ggml() {
    let (rows, cols) = (16, 256);
    let w = tricky_rows(rows, cols);
    for (ty, name) in [
        (GgmlType::Q8_0, "Q8_0"),
        (GgmlType::Q4_0, "Q4_0"),
        (GgmlType::Q4_1, "Q4_1"),
        (GgmlType::F16, "F16"),
    ] {
        let ours = quantize_ggml(&w, rows, cols, ty).unwrap();
        let theirs = gguf_py_quantize(&w, cols, name);
        assert_eq!(ours.len(), theirs.len(), "{name}: byte length");
        let first = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: first differing byte");
    }
}
