//! What the linear layers read: per-channel statistics of each decoder
//! layer's four linear inputs (q/k/v, o, gate/up, down), gathered on
//! calibration windows through the forward hooks. SmoothQuant and MobileQuant
//! take the channel maxima, AWQ the mean magnitudes and a sample of rows,
//! GPTQ the Gram matrices `XᵀX`.

use burn::tensor::Tensor;
use oqt_core::Result;
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use std::cell::RefCell;

/// The four inputs of a decoder layer, named by the first linear reading each.
pub const INPUT_GROUPS: [Proj; 4] = [Proj::Q, Proj::O, Proj::Gate, Proj::Down];

/// Index of `proj`'s input in [`INPUT_GROUPS`] (the head has none).
pub fn group_index(proj: Proj) -> Option<usize> {
    match proj {
        Proj::Q | Proj::K | Proj::V => Some(0),
        Proj::O => Some(1),
        Proj::Gate | Proj::Up => Some(2),
        Proj::Down => Some(3),
        Proj::Head => None,
    }
}

/// Statistics of one input.
#[derive(Debug, Clone)]
pub struct InputStats {
    pub width: usize,
    /// `max_t |x_tj|` per channel.
    pub abs_max: Vec<f32>,
    /// `Σ_t |x_tj|` per channel (divide by `tokens`).
    pub abs_sum: Vec<f64>,
    /// `Σ_t x_tj² / ‖x_t‖²` per channel: each channel's share of the input
    /// energy, every token counted once (see [`Gather::gram_unit_rows`]).
    pub unit_sq_sum: Vec<f64>,
    pub tokens: usize,
    /// Sampled rows (`[sample_rows, width]` row-major), for searches that replay the input.
    pub sample: Vec<f32>,
    /// `Σ_t x_tᵀ x_t` (`[width, width]`, f64), when gathered.
    pub gram: Option<Vec<f64>>,
}

impl InputStats {
    fn new(width: usize, gram: bool) -> Self {
        Self {
            width,
            abs_max: vec![0.0; width],
            abs_sum: vec![0.0; width],
            unit_sq_sum: vec![0.0; width],
            tokens: 0,
            sample: Vec::new(),
            gram: gram.then(|| vec![0.0; width * width]),
        }
    }

    pub fn abs_mean(&self) -> Vec<f32> {
        let n = self.tokens.max(1) as f64;
        self.abs_sum.iter().map(|&s| (s / n) as f32).collect()
    }

    pub fn sample_rows(&self) -> usize {
        self.sample.len() / self.width
    }
}

/// What to gather besides the per-channel magnitudes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gather {
    /// Rows kept per input and calibration window (evenly spaced tokens).
    pub sample_rows_per_window: usize,
    /// Accumulate `XᵀX` (GPTQ).
    pub gram: bool,
    /// Accumulate it over unit-length rows, `Σ_t x_t x_tᵀ / ‖x_t‖²`: the
    /// relative output error of every token weighs the same. Raw `XᵀX` is
    /// dominated by a few tokens of huge norm (SmolLM2's first position of a
    /// window carries activations hundreds of times the others'), and GPTQ
    /// then trades every other token's error for theirs.
    pub gram_unit_rows: bool,
}

/// Observes linear inputs; the forward pass is unchanged.
struct InputObserver {
    gather: Gather,
    stats: RefCell<Vec<[Option<InputStats>; 4]>>,
}

impl ForwardHooks for InputObserver {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        if matches!(proj, Proj::Q | Proj::O | Proj::Gate | Proj::Down) {
            let g = group_index(proj).expect("decoder linear");
            let [b, s, d] = x.dims();
            let rows = x.clone().reshape([b * s, d]);
            let abs = rows.clone().abs();
            let max = to_vec(abs.clone().max_dim(0));
            let sum = to_vec(abs.sum_dim(0));
            let sq = rows.clone().powf_scalar(2.0);
            let unit_sq = to_vec((sq.clone() / sq.sum_dim(1).clamp_min(1e-30)).sum_dim(0));
            let gram = self.gather.gram.then(|| {
                // Each token's row scaled to unit length: every token counts
                // once, not by its squared norm (see `Gather::gram_unit_rows`).
                let r = if self.gather.gram_unit_rows {
                    let norm = rows.clone().powf_scalar(2.0).sum_dim(1).sqrt().clamp_min(1e-30);
                    rows.clone() / norm
                } else {
                    rows.clone()
                };
                to_vec(r.clone().transpose().matmul(r))
            });
            let mut all = self.stats.borrow_mut();
            let st = all[layer][g].get_or_insert_with(|| InputStats::new(d, self.gather.gram));
            for j in 0..d {
                st.abs_max[j] = st.abs_max[j].max(max[j]);
                st.abs_sum[j] += sum[j] as f64;
                st.unit_sq_sum[j] += unit_sq[j] as f64;
            }
            st.tokens += b * s;
            if let (Some(acc), Some(gram)) = (st.gram.as_mut(), gram) {
                for (a, &g) in acc.iter_mut().zip(&gram) {
                    *a += g as f64;
                }
            }
            let want = self.gather.sample_rows_per_window.min(b * s);
            if let Some(stride) = (b * s).checked_div(want) {
                let all_rows = to_vec(rows);
                for i in 0..want {
                    st.sample
                        .extend_from_slice(&all_rows[i * stride * d..(i * stride + 1) * d]);
                }
            }
        }
        float(x)
    }
}

/// A tensor's values, row-major, as f32.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor")
}

/// Statistics of every decoder layer's four inputs (`[layer][group]`, see
/// [`INPUT_GROUPS`]) over `windows`; `progress(done, total)` after each window.
pub fn gather_inputs(
    model: &Llama,
    windows: &[Vec<u32>],
    gather: Gather,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<[InputStats; 4]>> {
    let observer = InputObserver {
        gather,
        stats: RefCell::new((0..model.n_layers()).map(|_| [None, None, None, None]).collect()),
    };
    for (i, w) in windows.iter().enumerate() {
        let _ = model.forward_residual_with(model.tokens_tensor(w), None, &observer);
        progress(i + 1, windows.len());
    }
    observer
        .stats
        .into_inner()
        .into_iter()
        .enumerate()
        .map(|(l, groups)| {
            let [a, b, c, d] = groups;
            match (a, b, c, d) {
                (Some(a), Some(b), Some(c), Some(d)) => Ok([a, b, c, d]),
                _ => Err(oqt_core::CoreError::Other(format!(
                    "calibration saw no inputs of layer {l}'s linears"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::{random_weights, tiny_config};

    /// Over unit-length rows every token adds exactly 1 to the Gram matrix's
    /// trace; the raw Gram matrix's trace is the inputs' total squared norm.
    #[test]
    fn unit_row_gram_counts_every_token_once() {
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 3), &burn::tensor::Device::flex());
        let windows = vec![vec![3u32, 40, 7, 99, 12, 5], vec![250u32, 1, 2, 3]];
        let gather = |unit| Gather {
            sample_rows_per_window: 0,
            gram: true,
            gram_unit_rows: unit,
        };
        let unit = gather_inputs(&llama, &windows, gather(true), |_, _| {}).unwrap();
        let raw = gather_inputs(&llama, &windows, gather(false), |_, _| {}).unwrap();
        for (u, r) in unit.iter().flatten().zip(raw.iter().flatten()) {
            let trace = |st: &InputStats| {
                let g = st.gram.as_ref().unwrap();
                (0..st.width).map(|i| g[i * st.width + i]).sum::<f64>()
            };
            assert_eq!(u.tokens, 10);
            assert!((trace(u) - 10.0).abs() < 1e-4, "unit trace {}", trace(u));
            assert!(
                (trace(r) - 10.0).abs() > 1e-2,
                "raw trace {} is not a token count",
                trace(r)
            );
        }
    }
}
