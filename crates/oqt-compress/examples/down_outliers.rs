//! Diagnostic behind `split_down_ratio`: per-layer channel maxima of the
//! q/k/v (g0), gate/up (g2) and down (g3) inputs over 8 × 512 Tiny Shakespeare
//! tokens. `cargo run --release -p oqt-compress --example down_outliers -- MODEL.gguf`
use oqt_compress::calibrate::calibration_windows;
use oqt_compress::inputs::{Gather, gather_inputs};

fn main() {
    let path = std::env::args().nth(1).expect("model path");
    let model = oqt_core::load_model(std::path::Path::new(&path)).unwrap();
    let data = oqt_core::datasets::resolve("tinyshakespeare").unwrap();
    let windows = calibration_windows(&model.tokenizer, &data.read_text().unwrap(), 8, 512).unwrap();
    let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &burn::tensor::Device::flex());
    let st = gather_inputs(&llama, &windows, Gather::default(), |_, _| {}).unwrap();
    if std::env::var_os("PLANS").is_some() {
        plans(&st);
        return;
    }
    for (l, g) in st.iter().enumerate() {
        for gi in [0usize, 2, 3] {
            let mut m = g[gi].abs_max.clone();
            m.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let n = m.len();
            println!(
                "L{l:2} g{gi} top {:?} | p1 {:.2} p5 {:.2} med {:.2}",
                &m[..8].iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>(),
                m[n / 100],
                m[n / 20],
                m[n / 2]
            );
        }
    }
}

fn plans(st: &[[oqt_compress::inputs::InputStats; 4]]) {
    let mlp_channels: usize = st.iter().map(|g| g[3].abs_max.len()).sum();
    for (ratio, rank, cap) in [
        (2.0, 16, 256),
        (1.0, 16, 256),
        (1.0, 16, 512),
        (1.0, 32, 512),
        (1.0, 64, 1024),
    ] {
        let p = oqt_compress::split::plan(st, ratio, rank, cap);
        let widest: Vec<f32> = st
            .iter()
            .zip(&p.copies)
            .map(|(g, k)| {
                g[3].abs_max
                    .iter()
                    .zip(k)
                    .map(|(m, &k)| m / k as f32)
                    .fold(0f32, f32::max)
            })
            .collect();
        println!(
            "ratio {ratio} rank {rank} cap {cap}: +{} ({:.2}% of MLP) widest per layer {:?}",
            p.total_extra(),
            100.0 * p.total_extra() as f64 / mlp_channels as f64,
            widest.iter().map(|v| v.round()).collect::<Vec<_>>()
        );
    }
}
