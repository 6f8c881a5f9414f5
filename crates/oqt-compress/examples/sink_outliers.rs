//! Where the down projection's massive inputs sit: per layer, the largest
//! |x| of the down projection's input at each window's first position (the
//! attention sink) and at every later one, with the position and token of
//! the later maximum, over 8 × 512 Tiny Shakespeare tokens.
//! `cargo run --release -p oqt-compress --example sink_outliers -- MODEL.gguf`
use burn::tensor::Tensor;
use oqt_compress::calibrate::calibration_windows;
use oqt_model::hooks::{ForwardHooks, Proj};
use std::cell::RefCell;

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
            let per_pos = x
                .clone()
                .abs()
                .max_dim(2)
                .reshape([s])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 tensor");
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

fn main() {
    let path = std::env::args().nth(1).expect("model path");
    let model = oqt_core::load_model(std::path::Path::new(&path)).unwrap();
    let data = oqt_core::datasets::resolve("tinyshakespeare").unwrap();
    let windows = calibration_windows(&model.tokenizer, &data.read_text().unwrap(), 8, 512).unwrap();
    let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &burn::tensor::Device::flex());
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
