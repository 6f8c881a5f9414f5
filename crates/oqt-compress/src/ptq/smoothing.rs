//! Equivalent transformations: per-channel scales that move quantization
//! difficulty between a producer and the linears consuming its output without
//! changing the float model. The producer is divided by `s`, the consumers'
//! input columns multiplied by `s`:
//!
//! * input RMSNorm → q, k, v (`attn`);
//! * post-attention RMSNorm → gate, up (`mlp`);
//! * up → down (`down`, MobileQuant's addition; exact because `silu(gate) · up`
//!   is linear in `up`);
//! * v → o (`vo`, one scale per KV channel; under grouped-query attention the
//!   scale of a KV channel multiplies the o columns of every query head that
//!   reads it, so the transformation stays exact).
//!
//! q ↔ k is not offered: no recipe quantizes q or k outputs and per-output-row
//! weight grids are invariant to row scaling, so it could change nothing.
//! Folding puts the scales into the exported weights; the runtime sees a plain model.

use crate::ptq::{MethodInput, Progress};
use crate::stats::inputs::{Gather, InputStats};
use oqt_core::weights::{ModelWeights, names};
use oqt_core::{CoreError, LlamaConfig, Result};

/// SmoothQuant's scales (α = `smooth_alpha`) for the whole model, from the
/// float model's input statistics.
pub(crate) fn model_scales(input: &MethodInput, progress: &mut dyn Progress) -> Result<Vec<LayerScales>> {
    let stats = input.input_stats(Gather::default(), progress)?;
    smoothquant_scales(
        &input.model.config,
        &input.model.weights,
        &stats,
        input.opts.smooth_alpha,
    )
}

/// Divisors of one decoder layer's transformations.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerScales {
    /// `[hidden]`: input norm → q/k/v.
    pub attn: Vec<f32>,
    /// `[hidden]`: post-attention norm → gate/up.
    pub mlp: Vec<f32>,
    /// `[intermediate]`: up → down.
    pub down: Vec<f32>,
    /// `[kv_heads · head_dim]`: v → o.
    pub vo: Vec<f32>,
}

/// The KV channel that attention-output channel `c` comes from.
pub fn kv_channel(cfg: &LlamaConfig, c: usize) -> usize {
    let group = cfg.num_heads / cfg.num_kv_heads;
    let head = c / cfg.head_dim;
    (head / group) * cfg.head_dim + c % cfg.head_dim
}

impl LayerScales {
    /// No transformation of decoder layer `layer`.
    pub fn identity(cfg: &LlamaConfig, layer: usize) -> Self {
        Self {
            attn: vec![1.0; cfg.hidden_size],
            mlp: vec![1.0; cfg.hidden_size],
            down: vec![1.0; cfg.intermediate_size_of(layer)],
            vo: vec![1.0; cfg.num_kv_heads * cfg.head_dim],
        }
    }
}

fn tensor<'a>(w: &'a ModelWeights, name: &str) -> Result<&'a oqt_core::weights::TensorF32> {
    w.get(name)
        .ok_or_else(|| CoreError::Other(format!("smoothing needs tensor `{name}`, which the model lacks")))
}

fn tensor_mut<'a>(w: &'a mut ModelWeights, name: &str) -> Result<&'a mut oqt_core::weights::TensorF32> {
    w.get_mut(name)
        .ok_or_else(|| CoreError::Other(format!("smoothing needs tensor `{name}`, which the model lacks")))
}

/// Per input column, `max_r |W_rc|` over the given `[out, in]` matrices.
fn column_abs_max(w: &ModelWeights, names: &[String]) -> Result<Vec<f32>> {
    let mut out: Vec<f32> = Vec::new();
    for n in names {
        let t = tensor(w, n)?;
        let cols = t.shape[1];
        out.resize(cols, 0.0);
        for row in t.data.chunks(cols) {
            for (m, &v) in out.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
    Ok(out)
}

/// SmoothQuant's rule `s_j = max|X_j|^α / max|W_j|^(1−α)`, with dead channels left at 1.
fn smoothquant_rule(x_max: &[f32], w_max: &[f32], alpha: f32) -> Vec<f32> {
    x_max
        .iter()
        .zip(w_max)
        .map(|(&x, &w)| {
            if x <= 0.0 || w <= 0.0 {
                1.0
            } else {
                (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5)
            }
        })
        .collect()
}

/// SmoothQuant scales for every layer from the calibration maxima of its inputs.
pub fn smoothquant_scales(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    stats: &[[InputStats; 4]],
    alpha: f32,
) -> Result<Vec<LayerScales>> {
    let kv = cfg.num_kv_heads * cfg.head_dim;
    (0..cfg.num_layers)
        .map(|l| {
            let n = |s: &str| names::layer(l, s);
            let [attn_in, attn_out, mlp_in, down_in] = &stats[l];
            let attn = smoothquant_rule(
                &attn_in.abs_max,
                &column_abs_max(weights, &[n(names::Q), n(names::K), n(names::V)])?,
                alpha,
            );
            let mlp = smoothquant_rule(
                &mlp_in.abs_max,
                &column_abs_max(weights, &[n(names::GATE), n(names::UP)])?,
                alpha,
            );
            let down = smoothquant_rule(&down_in.abs_max, &column_abs_max(weights, &[n(names::DOWN)])?, alpha);
            // v → o: reduce the attention-output channels onto the KV channel each comes from.
            let o_cols = column_abs_max(weights, &[n(names::O)])?;
            let (mut x_kv, mut w_kv) = (vec![0f32; kv], vec![0f32; kv]);
            for (c, (&x, &w)) in attn_out.abs_max.iter().zip(&o_cols).enumerate() {
                let k = kv_channel(cfg, c);
                x_kv[k] = x_kv[k].max(x);
                w_kv[k] = w_kv[k].max(w);
            }
            let vo = smoothquant_rule(&x_kv, &w_kv, alpha);
            Ok(LayerScales { attn, mlp, down, vo })
        })
        .collect()
}

fn scale_columns(t: &mut oqt_core::weights::TensorF32, s: &[f32]) {
    let cols = t.shape[1];
    for row in t.data.chunks_mut(cols) {
        for (v, &k) in row.iter_mut().zip(s) {
            *v *= k;
        }
    }
}

fn divide_rows(t: &mut oqt_core::weights::TensorF32, s: &[f32]) {
    let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
    for (row, &k) in t.data.chunks_mut(cols).zip(s) {
        for v in row {
            *v /= k;
        }
    }
}

/// Fold `scales` into `weights`: producers divided, consumers' columns multiplied.
pub fn fold(cfg: &LlamaConfig, weights: &mut ModelWeights, scales: &[LayerScales]) -> Result<()> {
    if scales.len() != cfg.num_layers {
        return Err(CoreError::Other(format!(
            "smoothing has {} layers of scales; the model has {}",
            scales.len(),
            cfg.num_layers
        )));
    }
    for (l, s) in scales.iter().enumerate() {
        let n = |x: &str| names::layer(l, x);
        divide_rows(tensor_mut(weights, &n(names::ATTN_NORM))?, &s.attn);
        for m in [names::Q, names::K, names::V] {
            scale_columns(tensor_mut(weights, &n(m))?, &s.attn);
        }
        divide_rows(tensor_mut(weights, &n(names::MLP_NORM))?, &s.mlp);
        for m in [names::GATE, names::UP] {
            scale_columns(tensor_mut(weights, &n(m))?, &s.mlp);
        }
        divide_rows(tensor_mut(weights, &n(names::UP))?, &s.down);
        scale_columns(tensor_mut(weights, &n(names::DOWN))?, &s.down);
        divide_rows(tensor_mut(weights, &n(names::V))?, &s.vo);
        if let Some(b) = weights.get_mut(&n(names::V_BIAS)) {
            divide_rows(b, &s.vo);
        }
        let o_scale: Vec<f32> = (0..cfg.num_heads * cfg.head_dim)
            .map(|c| s.vo[kv_channel(cfg, c)])
            .collect();
        scale_columns(tensor_mut(weights, &n(names::O))?, &o_scale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::{random_weights, tiny_config};

    #[test]
    fn folding_any_scales_leaves_the_float_model_unchanged() {
        let cfg = &tiny_config();
        let weights = random_weights(cfg, 3);
        let device = burn::tensor::Device::flex();
        let tokens: Vec<i64> = (0..12).map(|i| (i * 7 % cfg.vocab_size) as i64).collect();
        let run = |w: ModelWeights| {
            let llama = oqt_model::llama_from_weights(cfg, w, &device);
            let t = burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(tokens.clone(), [1, 12]), &device);
            crate::stats::inputs::to_vec(llama.forward(t, None))
        };
        let before = run(weights.clone());
        let wobble = |n: usize, seed: u64| -> Vec<f32> {
            oqt_core::testing::pseudo_random(n, seed, 0.9)
                .iter()
                .map(|v| (v * 2.0).exp())
                .collect()
        };
        let scales: Vec<LayerScales> = (0..cfg.num_layers)
            .map(|l| LayerScales {
                attn: wobble(cfg.hidden_size, 10 + l as u64),
                mlp: wobble(cfg.hidden_size, 20 + l as u64),
                down: wobble(cfg.intermediate_size, 30 + l as u64),
                vo: wobble(cfg.num_kv_heads * cfg.head_dim, 40 + l as u64),
            })
            .collect();
        let mut folded = weights.clone();
        fold(cfg, &mut folded, &scales).unwrap();
        assert_ne!(
            folded.get(&names::layer(0, names::O)),
            weights.get(&names::layer(0, names::O))
        );
        let after = run(folded);
        let worst = oqt_core::testing::max_abs_diff(&before, &after);
        assert!(worst < 1e-3, "logits moved by {worst}");
    }
}
