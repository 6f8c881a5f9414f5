//! The Burn fake quantizers compute exactly what the reference quantizer and
//! the integer kernels compute — the seam where other toolkits lose accuracy.

use burn::tensor::{Device, Tensor, TensorData};
use oqt_core::quant::{Granularity, Rounding, ScaleRule, WeightSpec, dequantize_weight, quantize_weight};
use oqt_core::testing::pseudo_random;
use oqt_kernels::{Isa, quantize_rows, quantize_rows_q8_0};
use oqt_model::fake_quant::{fake_quant_dynamic_rows, fake_quant_q8_0_blocks, fake_quant_weight};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

#[test]
fn dynamic_activation_fake_quant_equals_the_kernel_grid() {
    let (rows, k) = (9, 77);
    let mut x = pseudo_random(rows * k, 17, 6.0);
    x[3 * k..4 * k].fill(0.0); // an all-zero row
    for v in &mut x[5 * k..6 * k] {
        *v = v.abs(); // a row with min > 0
    }
    let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, k]), &Device::flex());
    let sim = values(fake_quant_dynamic_rows(t));
    let q = quantize_rows(Isa::detect(), &x, rows, k);
    for r in 0..rows {
        for c in 0..k {
            let kernel = (q.q[r * q.k_pad + c] as i32 - q.zero_point[r]) as f32 * q.scale[r];
            assert_eq!(
                sim[r * k + c].to_bits(),
                kernel.to_bits(),
                "row {r} col {c}: {} vs {kernel}",
                sim[r * k + c]
            );
        }
    }
}

#[test]
fn weight_fake_quant_equals_the_reference_quantizer() {
    let (out, inp) = (24, 96);
    let mut w = pseudo_random(out * inp, 23, 0.3);
    // LPBQ edge cases: an all-zero row, a row with one huge block (small
    // blocks clamp to multiplier 1), a row whose blocks are all equal.
    w[..inp].fill(0.0);
    w[inp + 3] = 9.0;
    for (c, v) in w[2 * inp..3 * inp].iter_mut().enumerate() {
        *v = if c % 16 == 0 { 0.5 } else { 0.01 };
    }
    for (granularity, rule, clip) in [
        (Granularity::PerGroup(32), ScaleRule::AmaxOverQmax, 1.0),
        (Granularity::PerChannel, ScaleRule::AmaxOverQmax, 0.9),
        (Granularity::PerGroup(32), ScaleRule::AmaxOverHalfRange, 1.0),
        (Granularity::Lpbq(16), ScaleRule::AmaxOverQmax, 1.0),
        (Granularity::Lpbq(32), ScaleRule::AmaxOverQmax, 0.85),
        (Granularity::Lpbq(32), ScaleRule::AmaxOverQmax, 1.0),
    ] {
        let spec = WeightSpec {
            bits: 4,
            granularity,
            symmetric: true,
            scale_rule: rule,
            rounding: Rounding::HalfToEven,
        };
        let reference = dequantize_weight(&quantize_weight(&w, out, inp, &spec, clip)); // [out, in]
        // Burn layout is [in, out].
        let mut t = vec![0f32; w.len()];
        for r in 0..out {
            for c in 0..inp {
                t[c * out + r] = w[r * inp + c];
            }
        }
        let sim = values(fake_quant_weight(
            Tensor::<2>::from_data(TensorData::new(t, [inp, out]), &Device::flex()),
            &spec,
            clip,
        ));
        for r in 0..out {
            for c in 0..inp {
                assert_eq!(
                    sim[c * out + r].to_bits(),
                    reference[r * inp + c].to_bits(),
                    "{granularity:?} {rule:?} ({r},{c})"
                );
            }
        }
    }
}

/// llama.cpp's Q4_0/Q8_0 grids in Burn equal the reference quantizer (itself
/// byte-identical to ggml's, see oqt-core's `ggml_quantizers` test), including
/// opposite-sign ties (first wins), all-zero blocks and learned clips.
#[test]
fn llama_cpp_weight_grids_equal_the_reference_quantizer() {
    let (out, inp) = (8, 96);
    let mut w = pseudo_random(out * inp, 29, 0.3);
    w[..32].fill(0.0);
    w[inp] = 0.4;
    w[inp + 5] = -0.4;
    w[2 * inp] = -0.4;
    w[2 * inp + 5] = 0.4;
    let mut t = vec![0f32; w.len()];
    for r in 0..out {
        for c in 0..inp {
            t[c * out + r] = w[r * inp + c];
        }
    }
    for (bits, rule) in [(4, ScaleRule::LlamaCppQ4_0), (8, ScaleRule::LlamaCppQ8_0)] {
        let mut spec = WeightSpec::new(bits, Granularity::PerGroup(32), true);
        spec.scale_rule = rule;
        for clip in [1.0, 0.85] {
            let reference = dequantize_weight(&quantize_weight(&w, out, inp, &spec, clip));
            let sim = values(fake_quant_weight(
                Tensor::<2>::from_data(TensorData::new(t.clone(), [inp, out]), &Device::flex()),
                &spec,
                clip,
            ));
            for r in 0..out {
                for c in 0..inp {
                    assert_eq!(
                        sim[c * out + r],
                        reference[r * inp + c],
                        "{rule:?} clip {clip} ({r},{c})"
                    );
                }
            }
        }
    }
}

#[test]
fn q8_0_activation_fake_quant_equals_the_kernel_blocks() {
    let (rows, k) = (5, 96);
    let mut x = pseudo_random(rows * k, 31, 4.0);
    x[32..64].fill(0.0);
    let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, k]), &Device::flex());
    let sim = values(fake_quant_q8_0_blocks(t));
    let q = quantize_rows_q8_0(Isa::detect(), &x, rows, k);
    let d = q.block_scales.as_ref().unwrap();
    for r in 0..rows {
        for c in 0..k {
            let kernel = q.q[r * q.k_pad + c] as f32 * d[r * (q.k_pad / 32) + c / 32];
            assert_eq!(sim[r * k + c].to_bits(), kernel.to_bits(), "({r},{c})");
        }
    }
}

#[test]
fn straight_through_gradient_is_identity() {
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::from_data(TensorData::new(pseudo_random(40, 3, 2.0), [4, 10]), &device).require_grad();
    let y = fake_quant_dynamic_rows(x.clone()).sum();
    let grads = y.backward();
    let g = values(x.grad(&grads).unwrap());
    assert!(g.iter().all(|&v| v == 1.0), "{g:?}");
}

#[test]
fn learnable_activation_quantizer_starts_exactly_on_its_grid_and_learns() {
    use oqt_core::quant::ActGrid;
    use oqt_model::fake_quant::ActQuantizer;
    let grid = ActGrid::from_range(-3.0, 5.0, 8);
    let x = pseudo_random(600, 9, 6.0); // some values beyond the range: they clamp
    let q = ActQuantizer::from_grid(&grid, &Device::flex());
    let sim = values(q.forward(Tensor::<2>::from_data(
        TensorData::new(x.clone(), [20, 30]),
        &Device::flex(),
    )));
    let mut want = x.clone();
    grid.fake(&mut want);
    for (a, b) in sim.iter().zip(&want) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
    }
    assert_eq!(q.grid(), grid);
    // Gradients reach the scale and zero point (the clamped values depend on both).
    let device = Device::flex().autodiff();
    let q = ActQuantizer::from_grid(&grid, &device);
    let xt = Tensor::<2>::from_data(TensorData::new(x, [20, 30]), &device);
    let loss = (q.forward(xt.clone()) - xt).powi_scalar(2).mean();
    let grads = loss.backward();
    let gs = values(q.log_scale.grad(&grads).unwrap())[0];
    let gz = values(q.zero_shift.grad(&grads).unwrap())[0];
    assert!(gs.is_finite() && gs != 0.0 && gz.is_finite() && gz != 0.0, "{gs} {gz}");
}
