//! Prune every decoder linear of a model, layer after layer: each layer's
//! calibration statistics come from windows run through the layers already
//! pruned (as Wanda, SparseGPT and DSnoT do), so later layers see the errors
//! of the earlier ones.

use super::dsnot::{DsnotOptions, InputMoments, dsnot_refine};
use super::mask::{Pattern, apply_mask, magnitude_scores, mask_from_scores, wanda_scores};
use super::sparsegpt::{HessianFactor, SparseGptOptions, relative_output_error, sparsegpt_prune_factored};
use crate::stats::inputs::{group_index, to_vec};
use burn::tensor::Tensor;
use oqt_core::weights::ModelWeights;
use oqt_core::{CoreError, LlamaConfig, Result};
use oqt_model::hooks::{ForwardHooks, Proj};
use serde::Serialize;
use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

/// DSnoT's expectations are sums over a sequence of this many tokens (the
/// authors' calibration length), whatever the calibration windows are, so that
/// its threshold means what theirs does.
pub const DSNOT_SEQUENCE: f64 = 2048.0;

/// How the base mask is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneMethod {
    /// `|W|` per output row (needs no calibration).
    Magnitude,
    /// `|W| · ‖X_j‖₂` per output row, no weight update.
    Wanda,
    /// OBS pruning with weight reconstruction from `XᵀX` ([`super::sparsegpt`]).
    Sparsegpt,
}

impl PruneMethod {
    pub const NAMES: &[&str] = &["magnitude", "wanda", "sparsegpt"];
}

impl FromStr for PruneMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "magnitude" => Ok(Self::Magnitude),
            "wanda" => Ok(Self::Wanda),
            "sparsegpt" => Ok(Self::Sparsegpt),
            _ => Err(format!(
                "unknown pruning method `{s}`; expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for PruneMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Magnitude => "magnitude",
            Self::Wanda => "wanda",
            Self::Sparsegpt => "sparsegpt",
        })
    }
}

/// Everything a pruning run decides.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PruneOptions {
    pub method: PruneMethod,
    #[serde(serialize_with = "display")]
    pub pattern: Pattern,
    /// DSnoT on top of the base mask (on the dense weights: for SparseGPT its
    /// mask, its reconstruction dropped).
    pub dsnot: Option<DsnotOptions>,
    pub sparsegpt: SparseGptOptions,
}

fn display<S: serde::Serializer>(p: &Pattern, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(p)
}

/// One pruned linear.
#[derive(Debug, Clone, Serialize)]
pub struct PrunedLinear {
    pub name: String,
    /// Fraction of the weights now zero.
    pub sparsity: f64,
    /// Relative output error `‖(W − Ŵ)X‖² / ‖WX‖²` on the calibration inputs
    /// of the base method (before DSnoT).
    pub error: f64,
    /// The same after DSnoT, and its swaps (when DSnoT ran on this linear).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_dsnot: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsnot_swaps: Option<usize>,
}

/// Per-channel moments and the Gram matrix of one layer's four linear inputs.
struct LayerInputs {
    layer: usize,
    unit_rows: bool,
    /// Also `XᵀX` over unit rows (DSnoT's exact criterion on unit rows).
    unit_gram: bool,
    stats: RefCell<[Option<Moments>; 4]>,
}

#[derive(Clone)]
struct Moments {
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
    /// The same over token rows scaled to unit length (DSnoT's robust moments).
    unit_sum: Vec<f64>,
    unit_sum_sq: Vec<f64>,
    /// `XᵀX` over unit-length token rows (DSnoT's exact criterion on `unit_rows`).
    unit_gram: Vec<f64>,
    gram: Vec<f64>,
    tokens: usize,
}

impl ForwardHooks for LayerInputs {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        if layer == self.layer && matches!(proj, Proj::Q | Proj::O | Proj::Gate | Proj::Down) {
            let g = group_index(proj).expect("decoder linear");
            let [b, s, d] = x.dims();
            let rows = x.clone().reshape([b * s, d]);
            let sum = to_vec(rows.clone().sum_dim(0));
            let sum_sq = to_vec(rows.clone().powi_scalar(2).sum_dim(0));
            // Unit-row moments only for DSnoT's `unit_token_rows` (zeros otherwise).
            let (unit_sum, unit_sum_sq, unit_gram) = if self.unit_rows {
                let unit = rows.clone() / rows.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-30);
                (
                    to_vec(unit.clone().sum_dim(0)),
                    to_vec(unit.clone().powi_scalar(2).sum_dim(0)),
                    if self.unit_gram {
                        to_vec(unit.clone().transpose().matmul(unit))
                    } else {
                        Vec::new()
                    },
                )
            } else {
                (vec![0.0; d], vec![0.0; d], Vec::new())
            };
            let gram = to_vec(rows.clone().transpose().matmul(rows));
            let mut all = self.stats.borrow_mut();
            let st = all[g].get_or_insert_with(|| Moments {
                sum: vec![0.0; d],
                sum_sq: vec![0.0; d],
                unit_sum: vec![0.0; d],
                unit_sum_sq: vec![0.0; d],
                unit_gram: vec![0.0; if self.unit_gram { d * d } else { 0 }],
                gram: vec![0.0; d * d],
                tokens: 0,
            });
            for (a, v) in st.sum.iter_mut().zip(sum) {
                *a += v as f64;
            }
            for (a, v) in st.sum_sq.iter_mut().zip(sum_sq) {
                *a += v as f64;
            }
            for (a, v) in st.unit_sum.iter_mut().zip(unit_sum) {
                *a += v as f64;
            }
            for (a, v) in st.unit_sum_sq.iter_mut().zip(unit_sum_sq) {
                *a += v as f64;
            }
            for (a, v) in st.unit_gram.iter_mut().zip(unit_gram) {
                *a += v as f64;
            }
            for (a, v) in st.gram.iter_mut().zip(gram) {
                *a += v as f64;
            }
            st.tokens += b * s;
        }
        float(x)
    }
}

/// `weights` with every decoder linear pruned as `opts` says, statistics from
/// `windows` (not needed by magnitude pruning alone), layer by layer. The
/// embedding, head and norms stay dense. `progress(done, total)` after each layer.
pub fn prune_model(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    opts: &PruneOptions,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<(ModelWeights, Vec<PrunedLinear>)> {
    for l in 0..cfg.num_layers {
        for p in Proj::PER_LAYER {
            let name = p.weight_name(l);
            let cols = weights.get(&name).map(|t| t.shape[1]).unwrap_or(0);
            if let Some(problem) = opts.pattern.problems(cols) {
                return Err(CoreError::Other(format!("{name}: {problem}")));
            }
        }
    }
    if windows.is_empty() {
        return Err(CoreError::Other("pruning needs calibration windows".into()));
    }
    let device = burn::tensor::Device::flex();
    let mut pruned = weights.clone();
    let mut report = Vec::new();
    let mut model = oqt_model::llama_from_weights(cfg, weights.clone(), &device);
    let positions: Vec<_> = windows.iter().map(|w| model.positions(w.len(), &device)).collect();
    // The hidden state entering the current layer, per window, through the pruned layers.
    let mut hidden: Vec<Tensor<3>> = windows
        .iter()
        .map(|w| model.embed_with(model.tokens_tensor(w), &oqt_model::NoHooks))
        .collect();
    for layer in 0..cfg.num_layers {
        let inputs = LayerInputs {
            layer,
            unit_rows: opts.dsnot.is_some_and(|d| d.unit_token_rows),
            unit_gram: opts
                .dsnot
                .is_some_and(|d| d.unit_token_rows && d.criterion == super::dsnot::DsnotCriterion::Exact),
            stats: RefCell::new([None, None, None, None]),
        };
        for (x, pos) in hidden.iter().zip(&positions) {
            model.layer_with(layer, x.clone(), pos, &inputs);
        }
        let stats = inputs.stats.into_inner();
        // One Hessian factor per input, shared by the linears reading it.
        let mut factors: [Option<HessianFactor>; 4] = [None, None, None, None];
        for p in Proj::PER_LAYER {
            let name = p.weight_name(layer);
            let st = stats[group_index(p).expect("decoder linear")]
                .as_ref()
                .expect("every input observed");
            let t = pruned.get_mut(&name).expect("checked above");
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let dense = t.data.clone();
            let norm: Vec<f64> = st.sum_sq.iter().map(|s| s.sqrt()).collect();
            let (mut values, mut keep) = match opts.method {
                PruneMethod::Sparsegpt => {
                    let g = group_index(p).expect("decoder linear");
                    if factors[g].is_none() {
                        factors[g] = Some(
                            HessianFactor::new(&st.gram, cols, opts.sparsegpt.damp_percent)
                                .map_err(|e| CoreError::Other(format!("{name}: {e}")))?,
                        );
                    }
                    let factor = factors[g].as_ref().expect("set above");
                    sparsegpt_prune_factored(&dense, rows, factor, opts.pattern, opts.sparsegpt.block_size)
                        .map_err(|e| CoreError::Other(format!("{name}: {e}")))?
                }
                m => {
                    let scores = if m == PruneMethod::Magnitude {
                        magnitude_scores(&dense)
                    } else {
                        let n32: Vec<f32> = norm.iter().map(|&v| v as f32).collect();
                        wanda_scores(&dense, cols, &n32)
                    };
                    let keep = mask_from_scores(&scores, cols, opts.pattern);
                    let mut v = dense.clone();
                    apply_mask(&mut v, &keep);
                    (v, keep)
                }
            };
            let error = relative_output_error(&dense, &values, cols, &st.gram);
            let mut entry = PrunedLinear {
                name: name.clone(),
                sparsity: 0.0,
                error,
                error_dsnot: None,
                dsnot_swaps: None,
            };
            if let Some(d) = opts
                .dsnot
                .filter(|d| !(d.skip_mlp && matches!(p, Proj::Gate | Proj::Up | Proj::Down)))
            {
                let n = st.tokens as f64;
                let (sum, sum_sq, gram) = if d.unit_token_rows {
                    (&st.unit_sum, &st.unit_sum_sq, &st.unit_gram)
                } else {
                    (&st.sum, &st.sum_sq, &st.gram)
                };
                // E[x_j] on the authors' scale: a 2048-token sequence's sum.
                let mean: Vec<f64> = sum.iter().map(|s| s / n * DSNOT_SEQUENCE).collect();
                let var: Vec<f64> = sum
                    .iter()
                    .zip(sum_sq)
                    .map(|(s, q)| (q / n - (s / n) * (s / n)).max(0.0))
                    .collect();
                let moments = InputMoments {
                    mean: &mean,
                    var: &var,
                    norm: &norm,
                    gram: Some(gram),
                };
                let swaps = dsnot_refine(&dense, &mut keep, cols, opts.pattern, &moments, &d);
                values = dense.clone();
                apply_mask(&mut values, &keep);
                entry.error_dsnot = Some(relative_output_error(&dense, &values, cols, &st.gram));
                entry.dsnot_swaps = Some(swaps);
            }
            entry.sparsity = keep.iter().filter(|k| !**k).count() as f64 / keep.len() as f64;
            oqt_model::set_decoder_weight(&mut model, layer, p, &values);
            t.data = values;
            report.push(entry);
        }
        if layer + 1 < cfg.num_layers {
            // The next layer's inputs come through this layer pruned.
            hidden = hidden
                .into_iter()
                .zip(&positions)
                .map(|(x, pos)| model.layer_with(layer, x, pos, &oqt_model::NoHooks))
                .collect();
        }
        tracing::info!(layer, of = cfg.num_layers, "layer pruned");
        progress(layer + 1, cfg.num_layers);
    }
    Ok((pruned, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::{random_weights, tiny_config};

    fn opts(method: PruneMethod, pattern: Pattern) -> PruneOptions {
        PruneOptions {
            method,
            pattern,
            dsnot: None,
            sparsegpt: SparseGptOptions::default(),
        }
    }

    #[test]
    fn every_decoder_linear_reaches_the_pattern_and_the_rest_stays_dense() {
        let cfg = tiny_config();
        let w = random_weights(&cfg, 5);
        let windows = vec![(0..40).map(|i| (i * 7 % 300) as u32).collect::<Vec<u32>>()];
        let half = Pattern::Unstructured { sparsity: 0.5 };
        for o in [
            opts(PruneMethod::Magnitude, half),
            opts(PruneMethod::Wanda, Pattern::NOfM { n: 2, m: 4 }),
            opts(PruneMethod::Sparsegpt, Pattern::NOfM { n: 2, m: 4 }),
            PruneOptions {
                dsnot: Some(DsnotOptions {
                    skip_mlp: false,
                    ..Default::default()
                }),
                ..opts(PruneMethod::Wanda, half)
            },
        ] {
            let (p, report) = prune_model(&cfg, &w, &o, &windows, |_, _| {}).unwrap();
            assert_eq!(report.len(), cfg.num_layers * 7);
            for r in &report {
                assert_eq!(r.sparsity, 0.5, "{}", r.name);
                let zeros = p.get(&r.name).unwrap().data.iter().filter(|v| **v == 0.0).count();
                assert_eq!(zeros * 2, p.get(&r.name).unwrap().data.len());
                assert!(r.error > 0.0 && r.error < 1.0, "{}: {}", r.name, r.error);
                if let Some(e) = r.error_dsnot {
                    assert!(r.dsnot_swaps.is_some() && e.is_finite());
                }
            }
            assert_eq!(p.get("model.embed_tokens.weight"), w.get("model.embed_tokens.weight"));
        }
        // Wanda ranks by input norm: its mask differs from magnitude's somewhere.
        let (m, _) = prune_model(&cfg, &w, &opts(PruneMethod::Magnitude, half), &windows, |_, _| {}).unwrap();
        let (wa, _) = prune_model(&cfg, &w, &opts(PruneMethod::Wanda, half), &windows, |_, _| {}).unwrap();
        assert_ne!(
            m.get("model.layers.1.mlp.down_proj.weight"),
            wa.get("model.layers.1.mlp.down_proj.weight")
        );
        // A pattern the widths cannot take names the tensor.
        let e = prune_model(
            &cfg,
            &w,
            &opts(PruneMethod::Magnitude, Pattern::NOfM { n: 2, m: 5 }),
            &windows,
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("q_proj.weight") && e.contains("do not divide"), "{e}");
    }
}
