//! eDKM training, layer by layer: each decoder layer's seven linears are
//! trained through DKM's soft assignment ([`super::dkm::dkm_grouped`], the
//! uniquified form, one table per group of output channels) to reproduce the
//! float layer's output on the calibration hidden states, then snapped to
//! palettes. Only one layer's activations are live at a time; the inputs of
//! the next layer come through the layers already clustered.
//!
//! Weights train on f16 values (rounded after every step, so the tables of
//! distinct values stay ≤ 65,536 a group); the centroids start from weighted
//! k-means ([`super::kmeans`]), and τ is relative to each linear's weight
//! energy (`τ = tau_rel · E[w²]`). Optimiser: Adam on weights and centroids.

use super::dkm::{DkmOptions, dkm_grouped, dkm_naive_grouped, uniquify_groups};
use super::kmeans::{KmeansOptions, assign, palettize};
use crate::stats::inputs::{group_index, to_vec};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use half::f16;
use oqt_core::lut::Palettized;
use oqt_core::{CoreError, LlamaConfig, ModelWeights, Result};
use oqt_model::hooks::{ForwardHooks, Proj};

/// How DKM's soft assignment is computed: the paper's `[N, K]` tensors, or
/// eDKM's tables of distinct values (the same numbers, far less memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DkmForm {
    Naive,
    Uniquified,
}

/// Options of eDKM training.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EdkmOptions {
    pub bits: u8,
    pub group_rows: usize,
    /// Adam steps per layer (each over every calibration window).
    pub steps: usize,
    pub lr: f32,
    /// τ relative to the linear's mean squared weight.
    pub tau_rel: f32,
    /// DKM centroid iterations per forward.
    pub iterations: usize,
    /// The k-means start's Lloyd iterations (as `oqt cluster --method kmeans`).
    pub kmeans_iterations: usize,
    /// `dkm` (naive) or `edkm` (uniquified).
    pub form: DkmForm,
}

/// What a training run reports as it goes (TensorBoard, progress, checkpoints).
pub trait EdkmObserver {
    /// After Adam step `step` (from 0) of `layer`, with the loss it was taken on.
    fn step(&mut self, _layer: usize, _step: usize, _loss: f64) {}
    /// After each layer: every palette so far (model order) and every layer's
    /// report. An error stops the run (a checkpoint that cannot be written).
    fn layer_done(&mut self, _palettes: &[(String, Palettized)], _layers: &[EdkmLayer]) -> Result<()> {
        Ok(())
    }
}

/// An observer that does nothing.
pub struct Quiet;
impl EdkmObserver for Quiet {}

impl Default for EdkmOptions {
    fn default() -> Self {
        Self {
            bits: 4,
            group_rows: 16,
            steps: 4,
            lr: 1e-4,
            tau_rel: 0.01,
            iterations: 3,
            kmeans_iterations: 50,
            form: DkmForm::Uniquified,
        }
    }
}

/// One layer's linears as trainable `ŵ` (`[cols, rows]`, the model's layout).
struct LayerWeights {
    layer: usize,
    w_hat: Vec<Tensor<2>>,
    /// The model's linears carry biases (q/k/v with attention bias): added
    /// as the float linear gives them (its output on a zero input).
    bias: bool,
}

impl ForwardHooks for LayerWeights {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let Some(i) = Proj::PER_LAYER
            .iter()
            .position(|&p| p == proj)
            .filter(|_| layer == self.layer)
        else {
            return float(x);
        };
        let [b, s, d] = x.dims();
        let w = self.w_hat[i].clone();
        let [_, rows] = w.dims();
        let y = x.clone().reshape([b * s, d]).matmul(w).reshape([b, s, rows]);
        if self.bias { y + float(x.zeros_like()) } else { y }
    }
}

/// Per layer: the mean squared output error of the k-means start and of the trained palettes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EdkmLayer {
    pub layer: usize,
    pub kmeans_error: f64,
    pub edkm_error: f64,
    /// Training did not lower the layer's error, so its k-means palettes
    /// were kept (a layer never ends worse than its start).
    #[serde(default)]
    pub kept_kmeans: bool,
}

/// Palettes by tensor name, in model order.
pub type NamedPalettes = Vec<(String, Palettized)>;

/// What eDKM trains on: token windows, and each decoder linear's input-channel
/// importance (`[layer][group]`) for the k-means start.
#[derive(Debug, Clone, Copy)]
pub struct Calibration<'a> {
    pub windows: &'a [Vec<u32>],
    pub importance: Option<&'a [[Vec<f32>; 4]]>,
}

/// Train and snap every decoder linear of `weights`; returns the palettes by
/// tensor name and each layer's output error before (k-means) and after.
/// `done`: the palettes and reports of the first layers from a checkpoint
/// (a resumed run): those layers are not trained again, and the next layer's
/// inputs come through them exactly as in a run that never stopped.
pub fn edkm_model(
    cfg: &LlamaConfig,
    weights: &ModelWeights,
    data: Calibration<'_>,
    opts: &EdkmOptions,
    done: (NamedPalettes, Vec<EdkmLayer>),
    device: &Device,
    obs: &mut dyn EdkmObserver,
) -> Result<(NamedPalettes, Vec<EdkmLayer>)> {
    let Calibration { windows, importance } = data;
    if windows.is_empty() {
        return Err(CoreError::Other("eDKM needs calibration windows".into()));
    }
    // One model, float and frozen, on the autodiff device: it gives each
    // layer's float targets, and its norms and attention run around the
    // trained linears (the hooks replace all seven) — and around the
    // clustered ones, to carry the hidden states on. One copy of the model
    // besides `weights` (a 1B model's 5 GB, not 10).
    let frozen = oqt_model::llama_from_weights(cfg, weights.clone(), device).freeze();
    let positions: Vec<_> = windows.iter().map(|w| frozen.positions(w.len(), device)).collect();
    let mut hidden: Vec<Tensor<3>> = windows
        .iter()
        .map(|w| frozen.embed_with(frozen.tokens_tensor(w), &oqt_model::NoHooks).detach())
        .collect();
    // Through layer `layer` with its linears as `w_hat` (clustered weights).
    let advance = |hidden: Vec<Tensor<3>>, layer: usize, w_hat: Vec<Tensor<2>>| -> Vec<Tensor<3>> {
        let hooks = LayerWeights {
            layer,
            w_hat,
            bias: cfg.attention_bias,
        };
        hidden
            .into_iter()
            .zip(&positions)
            .map(|(x, pos)| frozen.layer_with(layer, x, pos, &hooks).detach())
            .collect()
    };
    let (mut out, mut report) = done;
    let per_layer = Proj::PER_LAYER.len();
    if out.len() != report.len() * per_layer || report.len() > cfg.num_layers {
        return Err(CoreError::Other(format!(
            "eDKM resume: {} palettes for {} layers done (expected {per_layer} a layer, at most {} layers)",
            out.len(),
            report.len(),
            cfg.num_layers
        )));
    }
    for (layer, chunk) in out.chunks(per_layer).enumerate() {
        let mut w_hat = Vec::with_capacity(per_layer);
        for ((name, pal), proj) in chunk.iter().zip(Proj::PER_LAYER) {
            if *name != proj.weight_name(layer) {
                return Err(CoreError::Other(format!(
                    "eDKM resume: expected {} in place {}, found {name}",
                    proj.weight_name(layer),
                    layer * per_layer + proj as usize
                )));
            }
            w_hat.push(model_layout(&pal.dequantize(), pal.rows, pal.cols, device));
        }
        hidden = advance(hidden, layer, w_hat);
    }
    for layer in report.len()..cfg.num_layers {
        let targets: Vec<Tensor<3>> = hidden
            .iter()
            .zip(&positions)
            .map(|(x, p)| frozen.layer_with(layer, x.clone(), p, &oqt_model::NoHooks).detach())
            .collect();
        // Start: weighted k-means palettes, weights on f16 values.
        let mut params = Vec::new();
        for p in Proj::PER_LAYER.iter() {
            let name = p.weight_name(layer);
            let t = weights
                .get(&name)
                .ok_or_else(|| CoreError::Other(format!("{name}: missing")))?;
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let imp = importance.map(|s| s[layer][group_index(*p).expect("decoder linear")].as_slice());
            let km = palettize(
                &t.data,
                rows,
                cols,
                imp,
                &KmeansOptions {
                    bits: opts.bits,
                    group_rows: opts.group_rows,
                    iterations: opts.kmeans_iterations,
                    keep_zeros: false,
                    // The k-means path's seed: zero steps reproduce it.
                    seed: layer as u64 * 16 + *p as u64,
                },
            )
            .map_err(|e| CoreError::Other(format!("{name}: {e}")))?;
            let energy = t.data.iter().map(|v| (v * v) as f64).sum::<f64>() / t.data.len().max(1) as f64;
            // A floor keeps τ positive for an all-zero weight.
            let tau = (energy as f32 * opts.tau_rel).max(1e-12);
            params.push(Trainable::new(name, t.data.clone(), km, tau, device));
        }
        // The layer's loss on every window with its linears as `w_hat`.
        let loss_with = |w_hat: Vec<Tensor<2>>| -> (Tensor<1>, f64) {
            let hooks = LayerWeights {
                layer,
                w_hat,
                bias: cfg.attention_bias,
            };
            let mut total: Option<Tensor<1>> = None;
            for ((x, t), pos) in hidden.iter().zip(&targets).zip(&positions) {
                let y = frozen.layer_with(layer, x.clone(), pos, &hooks);
                let l = (y - t.clone()).powi_scalar(2).mean().reshape([1]);
                total = Some(match total {
                    Some(s) => s + l,
                    None => l,
                });
            }
            let total = total.expect("windows").div_scalar(windows.len() as f32);
            let value = to_vec(total.clone().detach())[0] as f64;
            (total, value)
        };
        let hard = |params: &[Trainable]| params.iter().map(|p| p.w_hat(opts, Soft::Hard).0).collect();
        let start = snapped(&params);
        let kmeans_error = loss_with(hard(&start)).1;
        for step in 0..opts.steps {
            // The layer's gradient at each soft weight ŵ (held as a leaf),
            // then each linear's DKM graph alone, fed that gradient: one
            // linear's `[U, K]` tensors are live at a time, not seven (a 1B
            // model's MLP linears hold gigabytes of them).
            let leaves: Vec<Tensor<2>> = params
                .iter()
                .map(|p| p.w_hat(opts, Soft::Untracked).0.require_grad())
                .collect();
            let (loss, value) = loss_with(leaves.clone());
            obs.step(layer, step, value);
            let grads = loss.backward();
            let upstream: Vec<_> = leaves.iter().map(|l| l.grad(&grads)).collect();
            drop((grads, leaves));
            for (p, g) in params.iter_mut().zip(upstream) {
                let (gw, gc) = match g {
                    Some(g) => {
                        let (w_hat, tracked) = p.w_hat(opts, Soft::Tracked);
                        let (w, c) = tracked.expect("tracked");
                        let grads = (w_hat * g).sum().backward();
                        (w.grad(&grads).map(to_vec), c.grad(&grads).map(to_vec))
                    }
                    None => (None, None),
                };
                p.adam(gw, gc, opts.lr, step + 1);
            }
        }
        let trained = snapped(&params);
        let edkm_error = loss_with(hard(&trained)).1;
        let kept_kmeans = edkm_error > kmeans_error;
        tracing::info!(layer, kmeans_error, edkm_error, kept_kmeans, "layer clustered");
        let snapped = if kept_kmeans { start } else { trained };
        for p in &snapped {
            out.push((p.name.clone(), p.palette()));
        }
        report.push(EdkmLayer {
            layer,
            kmeans_error,
            edkm_error,
            kept_kmeans,
        });
        if layer + 1 < cfg.num_layers {
            hidden = advance(hidden, layer, hard(&snapped));
        }
        obs.layer_done(&out, &report)?;
    }
    Ok((out, report))
}

/// Which `ŵ` a linear gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Soft {
    /// The weights as they are (snapped: their palette's values).
    Hard,
    /// DKM's soft weights, no graph kept.
    Untracked,
    /// DKM's soft weights with the graph back to weights and centroids.
    Tracked,
}

/// One linear under training: f32 master weights (DKM sees them rounded to
/// f16, so its tables of distinct values stay small, and the gradient updates
/// the master copy: small steps are not lost to f16 rounding), one centroid
/// row per group, Adam state.
#[derive(Clone)]
struct Trainable {
    name: String,
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    c: Vec<f32>,
    km: Palettized,
    tau: f32,
    moments: [Vec<f32>; 4],
    device: Device,
}

impl Trainable {
    /// From the f32 weights and their k-means palette (the starting centroids).
    fn new(name: String, w: Vec<f32>, km: Palettized, tau: f32, device: &Device) -> Self {
        let c: Vec<f32> = km.tables.iter().map(|v| v.to_f32()).collect();
        let (nw, nc) = (w.len(), c.len());
        Self {
            name,
            rows: km.rows,
            cols: km.cols,
            w,
            c,
            km,
            tau,
            moments: [vec![0.0; nw], vec![0.0; nw], vec![0.0; nc], vec![0.0; nc]],
            device: device.clone(),
        }
    }

    fn groups(&self) -> usize {
        self.rows / self.km.group_rows
    }

    /// `ŵ` in the model's layout `[cols, rows]`: DKM's soft weights (with
    /// the weights and centroids tensors to read gradients from, when
    /// tracked), or the weights as they are (already snapped).
    fn w_hat(&self, opts: &EdkmOptions, soft: Soft) -> (Tensor<2>, Option<(Tensor<1>, Tensor<2>)>) {
        let w16: Vec<f32> = self.w.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        let w = tensor(&w16, [w16.len()], &self.device);
        let (flat, tracked) = if soft != Soft::Hard {
            let c = tensor(&self.c, [self.groups(), self.km.entries()], &self.device);
            let track = soft == Soft::Tracked;
            let (w, c) = if track {
                (w.require_grad(), c.require_grad())
            } else {
                (w, c)
            };
            let dkm = DkmOptions {
                tau: self.tau,
                iterations: opts.iterations,
            };
            let w_hat = match opts.form {
                DkmForm::Uniquified => {
                    let gu = uniquify_groups(&w16, self.cols, self.km.group_rows);
                    dkm_grouped(w.clone(), &gu, c.clone(), &dkm).0
                }
                DkmForm::Naive => dkm_naive_grouped(w.clone(), c.clone(), &dkm).0,
            };
            if track {
                (w_hat, Some((w, c)))
            } else {
                (w_hat.detach(), None)
            }
        } else {
            (w, None)
        };
        (flat.reshape([self.rows, self.cols]).transpose(), tracked)
    }

    /// One Adam step on weights and centroids (no gradient: no move).
    fn adam(&mut self, gw: Option<Vec<f32>>, gc: Option<Vec<f32>>, lr: f32, t: usize) {
        let gw = gw.unwrap_or_else(|| vec![0.0; self.w.len()]);
        let gc = gc.unwrap_or_else(|| vec![0.0; self.c.len()]);
        let [mw, vw, mc, vc] = &mut self.moments;
        adam_update(&mut self.w, &gw, mw, vw, lr, t);
        adam_update(&mut self.c, &gc, mc, vc, lr, t);
    }

    /// Hard assignment to the current centroids (rounded to f16, sorted).
    fn palette(&self) -> Palettized {
        let k = self.km.entries();
        let mut tables = Vec::with_capacity(self.c.len());
        let mut indices = Vec::with_capacity(self.w.len());
        for (g, c) in self.c.chunks(k).enumerate() {
            let mut t: Vec<f16> = c.iter().map(|&v| f16::from_f32(v)).collect();
            t.sort_by(|a, b| a.total_cmp(b));
            let span = g * self.km.group_rows * self.cols..(g + 1) * self.km.group_rows * self.cols;
            indices.extend(assign(&self.w[span], &t));
            tables.extend(t);
        }
        Palettized {
            tables,
            indices,
            ..self.km.clone()
        }
    }
}

/// Copies of `params` whose weights are their palettes' values.
fn snapped(params: &[Trainable]) -> Vec<Trainable> {
    params
        .iter()
        .map(|p| {
            let mut s = p.clone();
            s.w = p.palette().dequantize();
            s
        })
        .collect()
}

fn adam_update(x: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, t: usize) {
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    for i in 0..x.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        x[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
    }
}

/// `[rows, cols]` row-major values as the model's `[cols, rows]` weight.
fn model_layout(w: &[f32], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    tensor(w, [rows, cols], device).transpose()
}

fn tensor<const D: usize>(v: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::{random_weights, tiny_config};

    fn ad() -> Device {
        Device::flex().autodiff()
    }

    fn cal(windows: &[Vec<u32>]) -> Calibration<'_> {
        Calibration {
            windows,
            importance: None,
        }
    }

    /// A whole run from the start, on the CPU, observed by no one.
    fn train(
        cfg: &LlamaConfig,
        weights: &ModelWeights,
        windows: &[Vec<u32>],
        opts: &EdkmOptions,
    ) -> Result<(NamedPalettes, Vec<EdkmLayer>)> {
        edkm_model(cfg, weights, cal(windows), opts, Default::default(), &ad(), &mut Quiet)
    }

    #[test]
    fn edkm_lowers_each_layers_error_below_its_kmeans_start() {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, 9);
        let windows: Vec<Vec<u32>> = (0..3)
            .map(|s| (0..24).map(|i| ((i * 7 + s * 13) % 300) as u32).collect())
            .collect();
        let opts = EdkmOptions {
            bits: 2,
            group_rows: 16,
            steps: 15,
            lr: 2e-3,
            ..Default::default()
        };
        let (palettes, report) = train(&cfg, &weights, &windows, &opts).unwrap();
        assert_eq!(palettes.len(), 2 * 7);
        for (name, p) in &palettes {
            assert_eq!(p.problems(), None, "{name}");
        }
        for l in &report {
            eprintln!(
                "layer {}: k-means {:.4e} → eDKM {:.4e}",
                l.layer, l.kmeans_error, l.edkm_error
            );
            assert!(
                l.edkm_error < l.kmeans_error,
                "layer {}: k-means {} → eDKM {}",
                l.layer,
                l.kmeans_error,
                l.edkm_error
            );
            assert!(!l.kept_kmeans);
        }
        // Training that makes a layer worse (a learning rate far too large)
        // keeps that layer's k-means palettes: the run equals zero steps.
        let wild = EdkmOptions {
            steps: 1,
            lr: 0.5,
            ..opts
        };
        let (palettes, report) = train(&cfg, &weights, &windows, &wild).unwrap();
        assert!(
            report.iter().all(|l| l.kept_kmeans && l.edkm_error > l.kmeans_error),
            "{report:?}"
        );
        let none = EdkmOptions { steps: 0, ..opts };
        let (kmeans, _) = train(&cfg, &weights, &windows, &none).unwrap();
        assert_eq!(palettes, kmeans);
    }

    /// Stopped after its first layer (the observer fails, as a full disk
    /// would) and resumed from that layer's palettes, a run ends on exactly
    /// the palettes and reports of a run that never stopped; the naive form
    /// (`--method dkm`) trains to the same errors within f32 noise.
    #[test]
    fn a_resumed_run_equals_one_that_never_stopped() {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, 4);
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|s| (0..16).map(|i| ((i * 5 + s * 11) % 300) as u32).collect())
            .collect();
        let opts = EdkmOptions {
            bits: 2,
            group_rows: 16,
            steps: 3,
            lr: 2e-3,
            ..Default::default()
        };
        let whole = train(&cfg, &weights, &windows, &opts).unwrap();
        struct StopAfterOne(Option<(NamedPalettes, Vec<EdkmLayer>)>);
        impl EdkmObserver for StopAfterOne {
            fn layer_done(&mut self, p: &[(String, Palettized)], l: &[EdkmLayer]) -> Result<()> {
                self.0 = Some((p.to_vec(), l.to_vec()));
                Err(CoreError::Other("disk full".into()))
            }
        }
        let mut stop = StopAfterOne(None);
        let e = edkm_model(
            &cfg,
            &weights,
            cal(&windows),
            &opts,
            Default::default(),
            &ad(),
            &mut stop,
        )
        .unwrap_err();
        assert!(e.to_string().contains("disk full"));
        let first = stop.0.expect("the first layer finished");
        assert_eq!(first.1.len(), 1);
        let resumed = edkm_model(&cfg, &weights, cal(&windows), &opts, first.clone(), &ad(), &mut Quiet).unwrap();
        assert_eq!(resumed, whole);
        // A checkpoint whose names are out of place is refused.
        let mut shuffled = first;
        shuffled.0.swap(0, 1);
        let e = edkm_model(&cfg, &weights, cal(&windows), &opts, shuffled, &ad(), &mut Quiet).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let naive = EdkmOptions {
            form: DkmForm::Naive,
            ..opts
        };
        let (_, report) = train(&cfg, &weights, &windows, &naive).unwrap();
        for (a, b) in report.iter().zip(&whole.1) {
            assert!(
                (a.edkm_error - b.edkm_error).abs() <= 1e-3 * b.edkm_error,
                "layer {}: naive {} vs uniquified {}",
                a.layer,
                a.edkm_error,
                b.edkm_error
            );
        }
    }
}
