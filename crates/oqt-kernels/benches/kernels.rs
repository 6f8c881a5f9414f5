//! Kernel throughput on SmolLM2-135M's projection shapes (`cargo bench -p oqt-kernels`).
//!
//! One "token" is every linear layer of the 30 blocks (q, k, v, o, gate, up,
//! down): the weight matmuls of one forward position, without attention,
//! norms or the LM head.

use oqt_kernels::panels::has_panel_kernel;
use oqt_kernels::{
    Int4Panels, Isa, PackedInt4, PackedInt8, has_lut_kernel, matmul_int4, matmul_int4_panels, matmul_int8,
    quantize_rows, repack_int4, repack_lut,
};
use std::time::Instant;

const LAYERS: usize = 30;
/// (out, in) of the seven projections of one SmolLM2-135M block.
const SHAPES: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

fn int4(n: usize, k: usize) -> PackedInt4 {
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 7 + 3) % 16) as i8 - 8).collect();
    PackedInt4::pack(&w, n, k, Some(32), vec![0.01; n * k / 32])
}

fn int8(n: usize, k: usize) -> PackedInt8 {
    let w: Vec<i8> = (0..n * k)
        .map(|i| ((i * 7 + 3) % 255) as i32 - 127)
        .map(|v| v as i8)
        .collect();
    PackedInt8::pack(&w, n, k, None, vec![0.01; n])
}

/// 4-bit palettes, one table of 16 int8 codes per 16 rows (`lut4 g16`).
fn lut4(n: usize, k: usize) -> Int4Panels {
    let idx: Vec<u8> = (0..n * k).map(|i| ((i * 7 + 3) % 16) as u8).collect();
    let codes: Vec<Vec<i8>> = (0..n / 16)
        .map(|t| (0..16i32).map(|e| (e * 15 - 120 + t as i32 % 7) as i8).collect())
        .collect();
    repack_lut(&idx, n, k, 16, &codes, &vec![0.01; n / 16])
}

fn time(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let w4: Vec<PackedInt4> = SHAPES.iter().map(|&(n, k)| int4(n, k)).collect();
    let w8: Vec<PackedInt8> = SHAPES.iter().map(|&(n, k)| int8(n, k)).collect();
    println!("threads: {}", rayon::current_num_threads());
    for m in [1usize, 512] {
        let acts: Vec<_> = SHAPES
            .iter()
            .map(|&(_, k)| {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 97) as f32 / 10.0 - 4.8).collect();
                quantize_rows(Isa::detect(), &x, m, k)
            })
            .collect();
        let reps = if m == 1 { 200 } else { 3 };
        // OQT_BENCH_ISA=avx2 (say) restricts the run to one path, e.g. for profiling.
        let only = std::env::var("OQT_BENCH_ISA").ok();
        for isa in Isa::available()
            .into_iter()
            .filter(|i| only.as_deref().is_none_or(|o| o == i.name()))
        {
            let mut outs: Vec<Vec<f32>> = SHAPES.iter().map(|&(n, _)| vec![0f32; m * n]).collect();
            let t4 = time(
                || {
                    for ((a, w), o) in acts.iter().zip(&w4).zip(outs.iter_mut()) {
                        matmul_int4(isa, a, w, o);
                    }
                },
                reps,
            ) * LAYERS as f64;
            let t8 = time(
                || {
                    for ((a, w), o) in acts.iter().zip(&w8).zip(outs.iter_mut()) {
                        matmul_int8(isa, a, w, o);
                    }
                },
                reps,
            ) * LAYERS as f64;
            println!(
                "m={m:<4} {:<12} int4 g32: {:8.2} ms/forward ({:7.0} tok/s)   int8 per-channel: {:8.2} ms ({:7.0} tok/s)",
                isa.name(),
                t4 * 1e3,
                m as f64 / t4,
                t8 * 1e3,
                m as f64 / t8
            );
            // The runtime's x86 layouts: int4 panels, and LUT panels where the ISA has them.
            let panel_sets: Vec<(&str, Vec<Int4Panels>)> = [
                has_panel_kernel(isa).then(|| ("int4 g32 panels", w4.iter().map(repack_int4).collect())),
                has_lut_kernel(isa).then(|| ("lut4 g16 panels", SHAPES.iter().map(|&(n, k)| lut4(n, k)).collect())),
            ]
            .into_iter()
            .flatten()
            .collect();
            for (label, ws) in &panel_sets {
                let t = time(
                    || {
                        for ((a, w), o) in acts.iter().zip(ws).zip(outs.iter_mut()) {
                            matmul_int4_panels(isa, a, w, o);
                        }
                    },
                    reps,
                ) * LAYERS as f64;
                println!(
                    "m={m:<4} {:<12} {label}: {:8.2} ms/forward ({:7.0} tok/s)",
                    isa.name(),
                    t * 1e3,
                    m as f64 / t
                );
            }
        }
    }
}
