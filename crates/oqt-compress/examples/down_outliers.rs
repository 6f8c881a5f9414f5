//! Diagnostic behind `split_down_ratio`: per-layer channel maxima of the
//! q/k/v (g0), gate/up (g2) and down (g3) inputs over 8 × 512 Tiny Shakespeare
//! tokens. `cargo run --release -p oqt-compress --example down_outliers -- MODEL.gguf`
//!
//! `PLANS=1`: the split plans of a few ratios, ranks and caps. `SINK=1`: where
//! the down projection's massive inputs sit — per layer, its largest |x| at
//! each window's first position (the attention sink) and at every later one,
//! with the position and token of the later maximum.
use burn::tensor::Tensor;
use oqt_compress::stats::calibrate::calibration_windows;
use oqt_compress::stats::inputs::{Gather, gather_inputs, to_vec};
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use std::cell::RefCell;

fn main() {
    let path = std::env::args().nth(1).expect("model path");
    let model = oqt_core::load_model(std::path::Path::new(&path)).unwrap();
    let data = oqt_core::datasets::resolve("tinyshakespeare").unwrap();
    let windows = calibration_windows(&model.tokenizer, &data.read_text().unwrap(), 8, 512).unwrap();
    let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &burn::tensor::Device::flex());
    if std::env::var_os("SINK").is_some() {
        sink(&model, &llama, &windows);
        return;
    }
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

fn plans(st: &[[oqt_compress::stats::inputs::InputStats; 4]]) {
    let mlp_channels: usize = st.iter().map(|g| g[3].abs_max.len()).sum();
    for (ratio, rank, cap) in [
        (2.0, 16, 256),
        (1.0, 16, 256),
        (1.0, 16, 512),
        (1.0, 32, 512),
        (1.0, 64, 1024),
    ] {
        let p = oqt_compress::ptq::split::plan(st, ratio, rank, cap, 1);
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

/// Per layer: (max at position 0, max after it, its position, its window).
#[derive(Default, Clone, Copy)]
struct Seen {
    first: f32,
    rest: f32,
    rest_pos: usize,
    rest_window: usize,
}

struct Observer {
    window: RefCell<usize>,
    seen: RefCell<Vec<Seen>>,
}

impl ForwardHooks for Observer {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        if proj == Proj::Down {
            let [_, s, _] = x.dims();
            let per_pos = to_vec(x.clone().abs().max_dim(2).reshape([s]));
            let mut seen = self.seen.borrow_mut();
            let e = &mut seen[layer];
            e.first = e.first.max(per_pos[0]);
            for (p, &v) in per_pos.iter().enumerate().skip(1) {
                if v > e.rest {
                    *e = Seen {
                        rest: v,
                        rest_pos: p,
                        rest_window: *self.window.borrow(),
                        ..*e
                    };
                }
            }
        }
        float(x)
    }
}

fn sink(model: &oqt_core::LoadedModel, llama: &Llama, windows: &[Vec<u32>]) {
    let obs = Observer {
        window: RefCell::new(0),
        seen: RefCell::new(vec![Seen::default(); model.config.num_layers]),
    };
    for (i, w) in windows.iter().enumerate() {
        *obs.window.borrow_mut() = i;
        let _ = llama.forward_residual_with(llama.tokens_tensor(w), None, &obs);
    }
    println!("layer | max at position 0 | max after it | at position (window) | token there");
    for (l, e) in obs.seen.borrow().iter().enumerate() {
        let token = windows[e.rest_window][e.rest_pos];
        let text = model.tokenizer.decode(&[token], false).unwrap_or_default();
        println!(
            "{l:2} | {:9.1} | {:9.1} | {:3} ({}) | {token} {text:?}",
            e.first, e.rest, e.rest_pos, e.rest_window
        );
    }
}
