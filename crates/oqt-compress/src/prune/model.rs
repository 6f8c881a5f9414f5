//! Prune every decoder linear of a model, layer after layer: each layer's
//! input norms come from calibration windows run through the layers already
//! pruned (as Wanda and SparseGPT do), so later layers see the errors of the
//! earlier ones.

use super::mask::{Pattern, apply_mask, magnitude_scores, mask_from_scores, wanda_scores};
use burn::tensor::Tensor;
use oqt_core::weights::ModelWeights;
use oqt_core::{CoreError, LlamaConfig, Result};
use oqt_model::hooks::{ForwardHooks, Proj};
use serde::Serialize;
use std::cell::RefCell;
use std::collections::HashMap;

/// How a weight's importance is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// `|W|` (needs no calibration).
    Magnitude,
    /// `|W| · ‖X_j‖₂` over the calibration inputs.
    Wanda,
}

/// One pruned linear.
#[derive(Debug, Clone, Serialize)]
pub struct PrunedLinear {
    pub name: String,
    /// Fraction of the weights now zero.
    pub sparsity: f64,
}

/// Per-input-channel sums of squares of every linear input of one layer.
struct InputNorms {
    layer: usize,
    sums: RefCell<HashMap<Proj, Vec<f64>>>,
}

impl ForwardHooks for InputNorms {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        if layer == self.layer {
            let [b, s, d] = x.dims();
            let sq: Vec<f32> = x
                .clone()
                .reshape([b * s, d])
                .powi_scalar(2)
                .sum_dim(0)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 sums");
            let mut sums = self.sums.borrow_mut();
            let acc = sums.entry(proj).or_insert_with(|| vec![0.0; d]);
            for (a, v) in acc.iter_mut().zip(sq) {
                *a += v as f64;
            }
        }
        float(x)
    }
}

/// `weights` with every decoder linear pruned to `pattern` by `scoring`
/// (Wanda's norms from `windows`, layer by layer). The embedding, head and
/// norms stay dense. `progress(done, total)` after each layer.
pub fn prune_model(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    scoring: Scoring,
    pattern: Pattern,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<(ModelWeights, Vec<PrunedLinear>)> {
    for l in 0..cfg.num_layers {
        for p in Proj::PER_LAYER {
            let name = p.weight_name(l);
            let cols = weights.get(&name).map(|t| t.shape[1]).unwrap_or(0);
            if let Some(problem) = pattern.problems(cols) {
                return Err(CoreError::Other(format!("{name}: {problem}")));
            }
        }
    }
    if scoring == Scoring::Wanda && windows.is_empty() {
        return Err(CoreError::Other("Wanda needs calibration windows".into()));
    }
    let device = burn::tensor::Device::flex();
    let mut pruned = weights.clone();
    let mut report = Vec::new();
    // The hidden state entering the current layer, per window, through the pruned layers.
    let mut model = oqt_model::llama_from_weights(cfg, pruned.clone(), &device);
    let positions: Vec<_> = windows.iter().map(|w| model.positions(w.len(), &device)).collect();
    let mut hidden: Vec<Tensor<3>> = windows
        .iter()
        .map(|w| model.embed_with(model.tokens_tensor(w), &oqt_model::NoHooks))
        .collect();
    for layer in 0..cfg.num_layers {
        let norms = InputNorms {
            layer,
            sums: RefCell::new(HashMap::new()),
        };
        if scoring == Scoring::Wanda {
            for (x, pos) in hidden.iter().zip(&positions) {
                model.layer_with(layer, x.clone(), pos, &norms);
            }
        }
        let sums = norms.sums.into_inner();
        for p in Proj::PER_LAYER {
            let name = p.weight_name(layer);
            let t = pruned.get_mut(&name).expect("checked above");
            let cols = t.shape[1];
            let scores = match scoring {
                Scoring::Magnitude => magnitude_scores(&t.data),
                Scoring::Wanda => {
                    let norm: Vec<f32> = sums[&p].iter().map(|s| s.sqrt() as f32).collect();
                    wanda_scores(&t.data, cols, &norm)
                }
            };
            let keep = mask_from_scores(&scores, cols, pattern);
            apply_mask(&mut t.data, &keep);
            report.push(PrunedLinear {
                name,
                sparsity: keep.iter().filter(|k| !**k).count() as f64 / keep.len() as f64,
            });
        }
        if scoring == Scoring::Wanda && layer + 1 < cfg.num_layers {
            // The next layer's inputs come through this layer pruned.
            model = oqt_model::llama_from_weights(cfg, pruned.clone(), &device);
            hidden = hidden
                .into_iter()
                .zip(&positions)
                .map(|(x, pos)| model.layer_with(layer, x, pos, &oqt_model::NoHooks))
                .collect();
        }
        progress(layer + 1, cfg.num_layers);
    }
    Ok((pruned, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::{random_weights, tiny_config};

    #[test]
    fn every_decoder_linear_reaches_the_pattern_and_the_rest_stays_dense() {
        let cfg = tiny_config();
        let w = random_weights(&cfg, 5);
        let windows = vec![(0..40).map(|i| (i * 7 % 300) as u32).collect::<Vec<u32>>()];
        for (scoring, pattern) in [
            (Scoring::Magnitude, Pattern::Unstructured { sparsity: 0.5 }),
            (Scoring::Wanda, Pattern::NOfM { n: 2, m: 4 }),
        ] {
            let (p, report) = prune_model(&cfg, &w, scoring, pattern, &windows, |_, _| {}).unwrap();
            assert_eq!(report.len(), cfg.num_layers * 7);
            for r in &report {
                assert_eq!(r.sparsity, 0.5, "{}", r.name);
                let zeros = p.get(&r.name).unwrap().data.iter().filter(|v| **v == 0.0).count();
                assert_eq!(zeros * 2, p.get(&r.name).unwrap().data.len());
            }
            assert_eq!(p.get("model.embed_tokens.weight"), w.get("model.embed_tokens.weight"));
        }
        // Wanda ranks by input norm: its mask differs from magnitude's somewhere.
        let half = Pattern::Unstructured { sparsity: 0.5 };
        let (m, _) = prune_model(&cfg, &w, Scoring::Magnitude, half, &windows, |_, _| {}).unwrap();
        let (wa, _) = prune_model(&cfg, &w, Scoring::Wanda, half, &windows, |_, _| {}).unwrap();
        assert_ne!(
            m.get("model.layers.1.mlp.down_proj.weight"),
            wa.get("model.layers.1.mlp.down_proj.weight")
        );
        // A pattern the widths cannot take names the tensor.
        let e = prune_model(
            &cfg,
            &w,
            Scoring::Magnitude,
            Pattern::NOfM { n: 2, m: 5 },
            &windows,
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("q_proj.weight") && e.contains("do not divide"), "{e}");
    }
}
