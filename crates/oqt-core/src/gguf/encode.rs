//! ggml block encoders: oqt's integer weights written as GGUF blocks without
//! changing a value ([`encode_exact`]), ggml's reference quantizers for float
//! weights ([`quantize_ggml`]), and GGUF Q4_0/Q8_0 blocks read back as oqt
//! integer weights ([`decode_quantized`]).

use super::{GgmlType, dequantize};
use crate::quant::{Granularity, QuantizedWeight, ScaleRule, WeightSpec, dequantize_weight, quantize_weight};
use half::f16;

/// Why a weight cannot be written as a ggml type without changing it.
pub type Inexact = String;

fn f16_exact(v: f32) -> bool {
    let h = f16::from_f32(v);
    h.to_f32() == v || (v.is_nan() && h.is_nan())
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Nibble layout of Q4_0/Q4_1: value j in the low nibble of byte j, value j+16 in the high one.
fn push_nibbles(out: &mut Vec<u8>, q: &[u8]) {
    for j in 0..16 {
        out.push((q[j] & 0x0F) | (q[j + 16] << 4));
    }
}

/// The ggml types oqt writes.
pub const WRITABLE: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];

/// `qw` as ggml blocks of `ty`, every dequantized value unchanged; `Err` says
/// why that is impossible (wrong bits, groups not 32, a scale or value f16
/// cannot hold). Verified by decoding: the bytes dequantize (as llama.cpp
/// does) to exactly `dequantize_weight(qw)`.
pub fn encode_exact(qw: &QuantizedWeight, ty: GgmlType) -> Result<Vec<u8>, Inexact> {
    let spec = &qw.spec;
    let grouped_32 = qw.group == 32 && qw.cols.is_multiple_of(32) && spec.granularity == Granularity::PerGroup(32);
    let block_grid = |bits: u8| -> Result<(), Inexact> {
        if spec.bits != bits || !grouped_32 {
            return Err(format!(
                "its grid is {}-bit {}, {} needs {bits}-bit groups of 32",
                spec.bits,
                describe_granularity(spec),
                ty.name()
            ));
        }
        if let Some(s) = qw.scales.iter().find(|s| !f16_exact(**s)) {
            return Err(format!(
                "scale {s:e} is not an f16 value ({} stores f16 scales); quantize with a gguf-* recipe",
                ty.name()
            ));
        }
        Ok(())
    };
    let mut out = Vec::with_capacity(ty.bytes_for(qw.q.len()).unwrap_or(0));
    match ty {
        GgmlType::F32 => {
            for v in dequantize_weight(qw) {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for v in dequantize_weight(qw) {
                if !f16_exact(v) {
                    return Err(format!("value {v:e} is not an f16 value"));
                }
                push_f16(&mut out, v);
            }
        }
        GgmlType::Q8_0 => {
            block_grid(8)?;
            if !spec.symmetric {
                return Err("its grid is asymmetric; Q8_0 is symmetric".into());
            }
            for (b, q) in qw.q.chunks_exact(32).enumerate() {
                push_f16(&mut out, qw.scales[b]);
                out.extend(q.iter().map(|&v| v as u8));
            }
        }
        GgmlType::Q4_0 => {
            block_grid(4)?;
            if !spec.symmetric {
                return Err("its grid is asymmetric; Q4_0 is symmetric".into());
            }
            for (b, q) in qw.q.chunks_exact(32).enumerate() {
                push_f16(&mut out, qw.scales[b]);
                let offset: Vec<u8> = q.iter().map(|&v| (v + 8) as u8).collect();
                push_nibbles(&mut out, &offset);
            }
        }
        GgmlType::Q4_1 => {
            // x = d·q' + m: a symmetric q ∈ [−8, 7] is q' = q + 8 with m = −8·d;
            // an asymmetric one q' = q with m = −zp·d.
            block_grid(4)?;
            for (b, q) in qw.q.chunks_exact(32).enumerate() {
                let d = qw.scales[b];
                let (offset, m) = match &qw.zero_points {
                    None => (8i32, -8.0 * d),
                    Some(z) => (0, -(z[b] as f32) * d),
                };
                push_f16(&mut out, d);
                push_f16(&mut out, m);
                let qs: Vec<u8> = q.iter().map(|&v| (v as i32 + offset) as u8).collect();
                push_nibbles(&mut out, &qs);
            }
        }
        other => return Err(format!("oqt does not write {} tensors", other.name())),
    }
    // The proof: decode as llama.cpp does and compare (numerically: Q4_1 writes
    // a negative scale's −0 as +0, which multiplies identically).
    let expected = dequantize_weight(qw);
    let mut decoded = vec![0f32; expected.len()];
    dequantize(ty, &out, &mut decoded);
    if let Some(i) = (0..expected.len()).find(|&i| expected[i] != decoded[i]) {
        return Err(format!(
            "value {} (row {}, column {}) would change from {:e} to {:e} as {}",
            i,
            i / qw.cols,
            i % qw.cols,
            expected[i],
            decoded[i],
            ty.name()
        ));
    }
    Ok(out)
}

fn describe_granularity(spec: &WeightSpec) -> String {
    match spec.granularity {
        Granularity::PerTensor => "per-tensor".into(),
        Granularity::PerChannel => "per-channel".into(),
        Granularity::PerGroup(g) => format!("groups of {g}"),
        Granularity::Lpbq(b) => format!("LPBQ blocks of {b}"),
    }
}

/// The spec of llama.cpp's Q8_0 / Q4_0 grids.
pub fn llama_cpp_spec(ty: GgmlType) -> Option<WeightSpec> {
    let (bits, rule) = match ty {
        GgmlType::Q8_0 => (8, ScaleRule::LlamaCppQ8_0),
        GgmlType::Q4_0 => (4, ScaleRule::LlamaCppQ4_0),
        _ => return None,
    };
    let mut spec = WeightSpec::new(bits, Granularity::PerGroup(32), true);
    spec.scale_rule = rule;
    Some(spec)
}

/// Float `[rows, cols]` weights as `ty`, with ggml's reference quantizers
/// (`quantize_row_*_ref`): identical bytes to `llama-quantize` without an imatrix.
pub fn quantize_ggml(values: &[f32], rows: usize, cols: usize, ty: GgmlType) -> Result<Vec<u8>, Inexact> {
    assert_eq!(values.len(), rows * cols);
    if ty.block_size() > 1 && !cols.is_multiple_of(ty.block_size()) {
        return Err(format!(
            "rows of {cols} values are not a whole number of {}-value {} blocks",
            ty.block_size(),
            ty.name()
        ));
    }
    let mut out = Vec::with_capacity(ty.bytes_for(values.len()).unwrap_or(0));
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|&v| push_f16(&mut out, v)),
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            let spec = llama_cpp_spec(ty).expect("block type");
            return encode_exact(&quantize_weight(values, rows, cols, &spec, 1.0), ty);
        }
        GgmlType::Q4_1 => {
            for block in values.chunks_exact(32) {
                let min = block.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = block.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                push_f16(&mut out, d);
                push_f16(&mut out, min);
                let q: Vec<u8> = block
                    .iter()
                    .map(|&v| ((v - min) * id + 0.5).floor().clamp(0.0, 15.0) as u8)
                    .collect();
                push_nibbles(&mut out, &q);
            }
        }
        other => return Err(format!("oqt does not write {} tensors", other.name())),
    }
    Ok(out)
}

/// Q4_0 / Q8_0 blocks as oqt integer weights on llama.cpp's grid (the runtime's
/// kernels then run them directly); `None` for other types.
pub fn decode_quantized(raw: &[u8], ty: GgmlType, rows: usize, cols: usize) -> Option<QuantizedWeight> {
    let spec = llama_cpp_spec(ty)?;
    let n = rows * cols;
    let mut q = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(n / 32);
    for b in raw.chunks_exact(ty.block_bytes()).take(n / 32) {
        scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
        match ty {
            GgmlType::Q8_0 => q.extend(b[2..34].iter().map(|&v| v as i8)),
            _ => {
                let lo = b[2..18].iter().map(|&v| (v & 0x0F) as i8 - 8);
                let hi = b[2..18].iter().map(|&v| (v >> 4) as i8 - 8);
                q.extend(lo.chain(hi));
            }
        }
    }
    Some(QuantizedWeight {
        rows,
        cols,
        group: 32,
        q,
        scales,
        zero_points: None,
        spec,
        multipliers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;

    #[test]
    fn llama_cpp_grids_encode_exactly_and_decode_back() {
        let (rows, cols) = (6, 96);
        let w = pseudo_random(rows * cols, 5, 0.3);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
            let spec = llama_cpp_spec(ty).unwrap();
            let qw = quantize_weight(&w, rows, cols, &spec, 1.0);
            let bytes = encode_exact(&qw, ty).unwrap();
            assert_eq!(bytes, quantize_ggml(&w, rows, cols, ty).unwrap());
            assert_eq!(decode_quantized(&bytes, ty, rows, cols).unwrap(), qw);
        }
    }

    #[test]
    fn symmetric_4_bit_f16_scales_are_exact_in_q4_1_too() {
        let (rows, cols) = (3, 64);
        let qw = quantize_weight(
            &pseudo_random(rows * cols, 9, 1.0),
            rows,
            cols,
            &llama_cpp_spec(GgmlType::Q4_0).unwrap(),
            1.0,
        );
        let bytes = encode_exact(&qw, GgmlType::Q4_1).unwrap();
        // 20 bytes a block of 32 (f16 scale, f16 minimum, 16 bytes of nibbles) …
        assert_eq!(bytes.len(), rows * cols / 32 * 20);
        // … that ggml's Q4_1 dequantizer turns back into exactly the grid's values.
        let mut back = vec![0f32; rows * cols];
        crate::gguf::dequant::dequantize(GgmlType::Q4_1, &bytes, &mut back);
        assert_eq!(back, crate::quant::weights::dequantize_weight(&qw));
    }

    #[test]
    fn grids_ggml_cannot_hold_are_refused_with_the_reason() {
        let (rows, cols) = (2, 64);
        let w = pseudo_random(rows * cols, 2, 0.5);
        let per_channel = quantize_weight(&w, rows, cols, &WeightSpec::new(4, Granularity::PerChannel, true), 1.0);
        let e = encode_exact(&per_channel, GgmlType::Q4_0).unwrap_err();
        assert!(e.contains("per-channel") && e.contains("groups of 32"), "{e}");
        let f32_scales = quantize_weight(
            &w,
            rows,
            cols,
            &WeightSpec::new(4, Granularity::PerGroup(32), true),
            1.0,
        );
        let e = encode_exact(&f32_scales, GgmlType::Q4_0).unwrap_err();
        assert!(e.contains("not an f16 value"), "{e}");
        let e = encode_exact(&f32_scales, GgmlType::Q8_0).unwrap_err();
        assert!(e.contains("4-bit"), "{e}");
    }
}
