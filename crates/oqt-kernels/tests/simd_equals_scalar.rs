//! Every SIMD path equals the scalar reference bit for bit, on randomized
//! shapes: odd sizes, K not a multiple of the block, one row, many rows.

use oqt_kernels::panels::{has_panel_kernel, matmul_int4_panels, repack_int4};
use oqt_kernels::{
    Isa, PackedInt4, PackedInt8, matmul_int4, matmul_int8, quantize_row, quantize_rows, quantize_rows_q8_0,
    quantize_rows_static,
};
use proptest::prelude::*;

fn activations(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            8 => -50.0f32..50.0,
            1 => Just(0.0f32),
            1 => -0.001f32..0.001,
        ],
        len,
    )
}

/// Groups valid for width k: per-channel, or 32/64/128 when they divide the padded width.
fn group_for(k: usize, choice: u8) -> Option<usize> {
    let k_pad = k.div_ceil(32) * 32;
    match choice % 4 {
        0 => None,
        c => {
            let g = 32 << (c - 1);
            k_pad.is_multiple_of(g).then_some(g)
        }
    }
}

/// Direct evaluation of the contract from the packed values, independent of the kernels:
/// exact group dots, then eight interleaved f32 partial sums and a fixed pairwise finish.
fn contract(
    a: &oqt_kernels::QuantizedRows,
    rows: usize,
    k_pad: usize,
    group: usize,
    w_at: impl Fn(usize, usize) -> i32,
    scales: &[f32],
) -> Vec<f32> {
    let groups = k_pad / group;
    let mut out = vec![0f32; a.rows * rows];
    for i in 0..a.rows {
        for n in 0..rows {
            let mut p = [0f32; 8];
            for g in 0..groups {
                let dot: i32 = (g * group..(g + 1) * group)
                    .map(|c| (a.q[i * k_pad + c] as i32 - a.zero_point[i]) * w_at(n, c))
                    .sum();
                let s_a = a.block_scales.as_ref().map_or(a.scale[i], |b| b[i * groups + g]);
                p[g % 8] += (s_a * scales[n * groups + g]) * dot as f32;
            }
            out[i * rows + n] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn activation_quantization_agrees(x in (1usize..300).prop_flat_map(activations)) {
        let mut want = vec![0i8; x.len()];
        let p = quantize_row(Isa::Scalar, &x, &mut want);
        for isa in Isa::available() {
            let mut got = vec![0i8; x.len()];
            prop_assert_eq!(quantize_row(isa, &x, &mut got), p);
            prop_assert_eq!(&got, &want, "{}", isa.name());
        }
        // Zero is exactly representable and the range is covered.
        let (scale, zp) = p;
        prop_assert!((-128..=127).contains(&zp));
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        prop_assert!(scale * 255.0 >= max * 0.999);
    }

    #[test]
    fn static_activation_quantization_agrees(
        rows in 1usize..4,
        x in (1usize..300).prop_flat_map(activations),
        scale in 0.01f32..0.5,
        zp in -128i32..128,
    ) {
        // One fixed grid for every row; values far outside it must clamp identically.
        let k = x.len() / rows.max(1);
        prop_assume!(k >= 1);
        let x = &x[..rows * k];
        let want = quantize_rows_static(Isa::Scalar, x, rows, k, scale, zp);
        let inv = 1.0 / scale;
        for (r, row) in x.chunks(k).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let q = ((v * inv).round_ties_even() as i32 + zp).clamp(-128, 127);
                prop_assert_eq!(want.q[r * want.k_pad + c] as i32, q);
            }
        }
        prop_assert!(want.scale.iter().all(|&s| s == scale) && want.zero_point.iter().all(|&z| z == zp));
        for isa in Isa::available() {
            prop_assert_eq!(&quantize_rows_static(isa, x, rows, k, scale, zp), &want, "{}", isa.name());
        }
    }

    #[test]
    fn int4_matmul_agrees(m in 1usize..11, n in 1usize..40, k in 1usize..600, gsel in 0u8..4, seed in any::<u64>()) {
        let group = group_for(k, gsel);
        let mut rng = seed;
        let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u32 };
        let w: Vec<i8> = (0..n * k).map(|_| (next() % 16) as i8 - 8).collect();
        let k_pad = k.div_ceil(32) * 32;
        let groups = k_pad / group.unwrap_or(k_pad);
        let scales: Vec<f32> = (0..n * groups).map(|_| (next() % 1000 + 1) as f32 * 1e-4).collect();
        let x: Vec<f32> = (0..m * k).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
        let packed = PackedInt4::pack(&w, n, k, group, scales.clone());
        for (c, &v) in w[..k].iter().enumerate() { prop_assert_eq!(packed.value(0, c), v); }
        let a = quantize_rows(Isa::Scalar, &x, m, k);
        let want = contract(&a, n, k_pad, packed.group, |r, c| if c < k { w[r * k + c] as i32 } else { 0 }, &scales);
        for isa in Isa::available() {
            let mut out = vec![0f32; m * n];
            matmul_int4(isa, &a, &packed, &mut out);
            prop_assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{} differs", isa.name());
        }
        let panels = repack_int4(&packed);
        for isa in Isa::available().into_iter().filter(|&i| has_panel_kernel(i)) {
            let mut out = vec![0f32; m * n];
            matmul_int4_panels(isa, &a, &panels, &mut out);
            prop_assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{} panels differ", isa.name());
        }
    }

    #[test]
    fn int8_matmul_agrees(m in 1usize..5, n in 1usize..40, k in 1usize..600, gsel in 0u8..4, seed in any::<u64>()) {
        let group = group_for(k, gsel);
        let mut rng = seed;
        let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u32 };
        let w: Vec<i8> = (0..n * k).map(|_| ((next() % 256) as i32 - 128) as i8).collect();
        let k_pad = k.div_ceil(32) * 32;
        let groups = k_pad / group.unwrap_or(k_pad);
        let scales: Vec<f32> = (0..n * groups).map(|_| (next() % 1000 + 1) as f32 * 1e-4).collect();
        let x: Vec<f32> = (0..m * k).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
        let packed = PackedInt8::pack(&w, n, k, group, scales.clone());
        let a = quantize_rows(Isa::Scalar, &x, m, k);
        let want = contract(&a, n, k_pad, packed.group, |r, c| if c < k { w[r * k + c] as i32 } else { 0 }, &scales);
        for isa in Isa::available() {
            let mut out = vec![0f32; m * n];
            matmul_int8(isa, &a, &packed, &mut out);
            prop_assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{} differs", isa.name());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// llama.cpp's Q8_0 activations (one f16 scale per block of 32) against Q4_0- and
    /// Q8_0-style weights (groups of 32): every path equals the contract bit for bit.
    #[test]
    fn q8_0_block_activations_agree(m in 1usize..5, n in 1usize..40, blocks in 1usize..20, seed in any::<u64>()) {
        let k = blocks * 32;
        let mut rng = seed;
        let mut next = || { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 33) as u32 };
        let w4: Vec<i8> = (0..n * k).map(|_| (next() % 16) as i8 - 8).collect();
        let w8: Vec<i8> = (0..n * k).map(|_| ((next() % 255) as i32 - 127) as i8).collect();
        let scales: Vec<f32> = (0..n * blocks).map(|_| (next() % 1000) as f32 * 1e-4 - 0.05).collect();
        let mut x: Vec<f32> = (0..m * k).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
        x[..32].fill(0.0); // an all-zero block
        let a = quantize_rows_q8_0(Isa::Scalar, &x, m, k);
        for isa in Isa::available() {
            prop_assert_eq!(&quantize_rows_q8_0(isa, &x, m, k), &a, "{} quantizes differently", isa.name());
        }
        let p4 = PackedInt4::pack(&w4, n, k, Some(32), scales.clone());
        let p8 = PackedInt8::pack(&w8, n, k, Some(32), scales.clone());
        let want4 = contract(&a, n, k, 32, |r, c| w4[r * k + c] as i32, &scales);
        let want8 = contract(&a, n, k, 32, |r, c| w8[r * k + c] as i32, &scales);
        for isa in Isa::available() {
            let mut out = vec![0f32; m * n];
            matmul_int4(isa, &a, &p4, &mut out);
            prop_assert!(out.iter().zip(&want4).all(|(a, b)| a.to_bits() == b.to_bits()), "{} int4 differs", isa.name());
            if has_panel_kernel(isa) {
                matmul_int4_panels(isa, &a, &repack_int4(&p4), &mut out);
                prop_assert!(out.iter().zip(&want4).all(|(a, b)| a.to_bits() == b.to_bits()), "{} int4 panels differ", isa.name());
            }
            matmul_int8(isa, &a, &p8, &mut out);
            prop_assert!(out.iter().zip(&want8).all(|(a, b)| a.to_bits() == b.to_bits()), "{} int8 differs", isa.name());
        }
    }
}

#[test]
fn q8_0_activation_blocks_follow_ggml() {
    // Block 0: amax 2.54 → d = 0.02, values on half-steps round to even; block 1 is zero.
    let mut x = vec![0f32; 64];
    x[0] = 2.54;
    x[1] = 0.01; // 0.5 step
    x[2] = 0.03; // 1.5 steps
    x[3] = -0.05; // −2.5 steps
    let a = quantize_rows_q8_0(Isa::Scalar, &x, 1, 64);
    let d = a.block_scales.as_ref().unwrap();
    assert_eq!(d[0], half::f16::from_f32(2.54 / 127.0).to_f32());
    assert_eq!(d[1], 0.0);
    assert_eq!(&a.q[..4], &[127, 0, 2, -2]);
    assert!(a.q[32..].iter().all(|&q| q == 0));
}

#[test]
fn this_machine_exercises_the_simd_paths() {
    // On the project's x86-64 machines both SIMD paths must actually be tested.
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        assert_eq!(Isa::available(), vec![Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]);
    }
    // On AArch64 with the dot-product extension (e.g. `qemu-aarch64 -cpu max`), the sdot path.
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        assert_eq!(Isa::available(), vec![Isa::Scalar, Isa::NeonDot]);
    }
}

#[test]
fn quantized_matmul_approximates_the_float_product() {
    // 4-bit weights, 8-bit activations: the result tracks the f32 product of the dequantized weights.
    let (m, n, k) = (3, 24, 200);
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 7 + 3) % 16) as i8 - 8).collect();
    let scales = vec![0.01f32; n * (224 / 32)];
    let packed = PackedInt4::pack(&w, n, k, Some(32), scales);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 97) as f32 / 10.0 - 4.8).collect();
    let a = quantize_rows(Isa::detect(), &x, m, k);
    let mut out = vec![0f32; m * n];
    matmul_int4(Isa::detect(), &a, &packed, &mut out);
    for i in 0..m {
        for j in 0..n {
            let exact: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c] as f32 * 0.01).sum();
            assert!(
                (out[i * n + j] - exact).abs() < 0.02 * (1.0 + exact.abs()),
                "{} vs {exact}",
                out[i * n + j]
            );
        }
    }
}

/// The 16-bit-input dot is exact on every path, at the extremes its chunking
/// relies on (|a| = 65,535, w = −128, long rows) and on random values.
#[test]
fn wide_dots_are_exact_at_the_extremes() {
    use oqt_kernels::dot_wide;
    let exact = |a: &[i32], w: &[i8]| -> i64 { a.iter().zip(w).map(|(&x, &y)| x as i64 * y as i64).sum() };
    let n = 4099; // more than 32 chunks of 128, and a ragged tail
    let a = vec![65_535; n];
    let w = vec![-128i8; n];
    let mut rng = 7u64;
    let mut next = || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as u32
    };
    let ra: Vec<i32> = (0..n).map(|_| (next() % 131_071) as i32 - 65_535).collect();
    let rw: Vec<i8> = (0..n).map(|_| (next() % 256) as i32 as u8 as i8).collect();
    for isa in Isa::available() {
        assert_eq!(dot_wide(isa, &a, &w), exact(&a, &w), "{}", isa.name());
        assert_eq!(dot_wide(isa, &ra, &rw), exact(&ra, &rw), "{}", isa.name());
        assert_eq!(
            dot_wide(isa, &ra[..5], &rw[..5]),
            exact(&ra[..5], &rw[..5]),
            "{}",
            isa.name()
        );
    }
}

/// The panel kernel's result does not depend on how many threads split the
/// panels: 1 and 3 threads, a shape with a partial last panel and row tile.
#[test]
fn panel_matmul_is_the_same_on_1_and_3_threads() {
    let (m, n, k): (usize, usize, usize) = (7, 203, 333);
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 7919 + 13) % 16) as i8 - 8).collect();
    let k_pad = k.div_ceil(32) * 32;
    let scales: Vec<f32> = (0..n * k_pad / 32).map(|i| ((i * 31) % 97 + 1) as f32 * 1e-3).collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 2654435761usize) % 2001) as f32 / 100.0 - 10.0)
        .collect();
    let packed = PackedInt4::pack(&w, n, k, Some(32), scales);
    let panels = repack_int4(&packed);
    let a = quantize_rows(Isa::Scalar, &x, m, k);
    let mut want = vec![0f32; m * n];
    matmul_int4(Isa::Scalar, &a, &packed, &mut want);
    for isa in Isa::available().into_iter().filter(|&i| has_panel_kernel(i)) {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![0f32; m * n];
            pool.install(|| matmul_int4_panels(isa, &a, &panels, &mut out));
            assert!(
                out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} on {threads} threads differs",
                isa.name()
            );
        }
    }
}

/// The panel epilogue's i16 pair `(zp, Σ q_a)` at its edge: groups of 256
/// whose activations all sit at −128 or at 127 (`Σ q_a` = −32768 / 32512),
/// zero points at both ends, and groups of 512 (past the pair, the i32 path).
#[test]
fn panel_epilogue_holds_at_extreme_group_sums() {
    let (m, n, k) = (4, 21, 1024);
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 7919 + 5) % 16) as i8 - 8).collect();
    // Row 0: all at the minimum of a range that holds 0 (zp = 127 side); row 1:
    // all at the maximum; row 2: negative half then positive half; row 3: zeros.
    let mut x = vec![0f32; m * k];
    x[..k].fill(-3.0);
    x[k..2 * k].fill(5.0);
    x[2 * k..3 * k]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = if i < k / 2 { -1.0 } else { 7.0 });
    let a = quantize_rows(Isa::Scalar, &x, m, k);
    assert_eq!(a.q[0], -128);
    assert_eq!(a.q[k], 127);
    for group in [256, 512] {
        let scales: Vec<f32> = (0..n * k / group).map(|i| ((i * 31) % 97 + 1) as f32 * 1e-3).collect();
        let packed = PackedInt4::pack(&w, n, k, Some(group), scales.clone());
        let want = contract(&a, n, k, group, |r, c| w[r * k + c] as i32, &scales);
        let panels = repack_int4(&packed);
        for isa in Isa::available().into_iter().filter(|&i| has_panel_kernel(i)) {
            let mut out = vec![0f32; m * n];
            matmul_int4_panels(isa, &a, &panels, &mut out);
            assert!(
                out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} panels differ at group {group}",
                isa.name()
            );
        }
    }
}
