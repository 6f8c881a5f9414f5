//! One clustering run: every decoder linear of the float (or pruned) model
//! palettized, into a bundle whose other tensors follow the recipe's spec
//! (the embedding and head on their grids, norms f32) and whose activations
//! are the recipe's.

use super::checkpoint::{self, ClusterCheckpoint};
use super::edkm::{DkmForm, EdkmLayer, EdkmObserver, EdkmOptions};
use super::kmeans::{KmeansOptions, palettize};
use crate::ptq::Progress;
use crate::stats::calibrate::load_windows;
use crate::stats::inputs::{Gather, gather_inputs, group_index};
use oqt_core::bundle::{BundleWriter, InputRecord, Manifest};
use oqt_core::lut::Palettized;
use oqt_core::quant::{ActMode, ClusterStep, Recipe, quantize_weight};
use oqt_core::{CoreError, LoadedModel, Result};
use oqt_model::hooks::Proj;
use serde::Serialize;
use std::path::Path;

/// One palettized linear.
#[derive(Debug, Clone, Serialize)]
pub struct ClusteredLinear {
    pub name: String,
    pub group_rows: usize,
    /// `Σ a_j (w − ŵ)² / Σ a_j w²` with `a_j` the input channel's importance
    /// (1 without calibration): the weighted relative weight error.
    pub relative_error: f64,
}

/// What a clustering run did.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub method: String,
    pub bits: u8,
    /// Output channels per table (0: one table per tensor).
    pub group_channels: usize,
    pub importance: bool,
    pub linears: Vec<ClusteredLinear>,
    /// dkm/edkm: each layer's output error from its k-means start and after training.
    pub trained_layers: Vec<EdkmLayer>,
    pub mean_relative_error: f64,
    /// Stored bits per decoder-linear weight, tables included.
    pub linear_bits_per_weight: f64,
    /// Bytes of tensor data stored, and stored bits per parameter over the model.
    pub stored_bytes: u64,
    pub bits_per_weight: f64,
    pub seconds: f64,
}

/// A DKM/eDKM run's side outputs: a checkpoint rewritten after every layer
/// (and read first, with `resume`), and an observer of the training
/// (TensorBoard scalars). k-means runs ignore them.
pub struct ClusterRun<'a> {
    /// Where DKM trains (an autodiff device: wgpu when built with it);
    /// `None`: Flex on the CPU.
    pub device: Option<burn::tensor::Device>,
    pub checkpoint: Option<&'a Path>,
    pub resume: bool,
    pub observer: &'a mut dyn EdkmObserver,
}

/// Palettize `model`'s decoder linears as `step` says into a bundle (not yet
/// written) under `recipe`'s spec. A pruned model keeps its zeros exact.
pub fn cluster_to_bundle(
    model: &LoadedModel,
    recipe: &Recipe,
    step: &ClusterStep,
    created_by: &str,
    progress: &mut dyn Progress,
    run: ClusterRun<'_>,
) -> Result<(BundleWriter, ClusterReport)> {
    let t0 = std::time::Instant::now();
    let problems = step.problems(|f| f.to_string());
    if !problems.is_empty() {
        return Err(CoreError::Other(problems.join("; ")));
    }
    if recipe.spec.activations.mode == ActMode::Static {
        return Err(CoreError::Other(format!(
            "recipe `{}`: a `cluster` step runs with dynamic or float activations; static activation grids are not calibrated for palettized weights yet",
            recipe.name
        )));
    }
    let trains = step.method != "kmeans";
    if trains && !model.sparsity.is_empty() {
        return Err(CoreError::Other(format!(
            "method {}: a pruned model is not supported yet (kmeans keeps its zeros)",
            step.method
        )));
    }
    if trains && step.group_channels == 0 {
        return Err(CoreError::Other(format!(
            "method {}: needs a group of output channels (group_channels > 0)",
            step.method
        )));
    }
    if run.resume && (run.checkpoint.is_none() || !trains) {
        return Err(CoreError::Other(
            "resume: needs a checkpoint directory and method dkm or edkm".into(),
        ));
    }
    let cfg = &model.config;
    // Check every linear's grouping before any work.
    for layer in 0..cfg.num_layers {
        for p in Proj::PER_LAYER {
            let name = p.weight_name(layer);
            let t = model
                .weights
                .get(&name)
                .ok_or_else(|| CoreError::Other(format!("{name}: missing from the model")))?;
            let rows = t.shape[0];
            let group = resolve_group(step.group_channels, rows);
            if let Some(problem) = oqt_core::lut::shape_problems(rows, step.bits, group) {
                return Err(CoreError::Other(format!("{name}: {problem}")));
            }
        }
    }
    let mut manifest = Manifest::for_model(model, created_by)?;
    manifest.set_recipe(recipe, &Default::default())?;
    manifest.provenance.method = Some(format!("cluster-{}", step.method));
    let model_identity = if model.path.is_file() {
        let sha256 = oqt_core::datasets::sha256_file(&model.path)?;
        manifest.inputs.push(InputRecord {
            role: "model".into(),
            path: model.path.display().to_string(),
            sha256: sha256.clone(),
        });
        sha256
    } else {
        model.name.clone()
    };
    // Calibration windows, read once: the importance's and the training's.
    let windows = if step.importance || trains {
        let (data, windows) = load_windows(&model.tokenizer, &recipe.calibration)?;
        manifest.inputs.push(InputRecord::of_file("calibration", &data.path)?);
        windows
    } else {
        Vec::new()
    };
    // Importance: each input channel's share of the energy on calibration text.
    let importance = if step.importance {
        progress.phase("calibration", windows.len());
        let llama = oqt_model::llama_from_weights(cfg, model.weights.clone(), &burn::tensor::Device::flex());
        let gather = Gather {
            sample_rows_per_window: 0,
            gram: false,
            gram_unit_rows: false,
        };
        let stats = gather_inputs(&llama, &windows, gather, |d, _| progress.set(d))?;
        Some(stats)
    } else {
        None
    };
    let mut writer = BundleWriter::new(manifest);
    let total = cfg.num_layers * Proj::PER_LAYER.len();
    let importance: Option<Vec<[Vec<f32>; 4]>> = importance.map(|s| {
        s.iter()
            .map(|groups| {
                groups
                    .clone()
                    .map(|st| st.unit_sq_sum.iter().map(|&v| v as f32).collect())
            })
            .collect()
    });
    // eDKM trains every layer first (the palettes come out whole).
    let mut trained: std::collections::BTreeMap<String, oqt_core::lut::Palettized> = Default::default();
    let mut trained_layers = Vec::new();
    if trains {
        let opts = EdkmOptions {
            bits: step.bits,
            group_rows: step.group_channels,
            steps: step.steps,
            lr: step.lr,
            tau_rel: step.tau,
            iterations: 3,
            kmeans_iterations: step.iterations,
            form: if step.method == "dkm" {
                DkmForm::Naive
            } else {
                DkmForm::Uniquified
            },
        };
        let state = ClusterCheckpoint {
            method: step.method.clone(),
            options: opts,
            importance: step.importance,
            model: model_identity,
            calibration: checkpoint::windows_fingerprint(&windows),
            layers: Vec::new(),
        };
        if let Some(dir) = run.checkpoint.filter(|_| !run.resume) {
            checkpoint::start_fresh(dir)?;
        }
        let done = match run.checkpoint.filter(|_| run.resume) {
            Some(dir) => {
                let names: Vec<String> = (0..cfg.num_layers)
                    .flat_map(|l| Proj::PER_LAYER.map(|p| p.weight_name(l)))
                    .collect();
                let shape_of = |name: &str| {
                    model
                        .weights
                        .get(name)
                        .map(|t| (t.shape[0], t.shape[1], step.group_channels))
                };
                let (saved, palettes) = checkpoint::load(dir, &state, shape_of, &names)?;
                tracing::info!(layers = saved.layers.len(), "resuming from {}", dir.display());
                (palettes, saved.layers)
            }
            None => Default::default(),
        };
        progress.phase(&format!("{} {} bits", step.method, step.bits), cfg.num_layers);
        progress.set(done.1.len());
        let mut obs = Checkpointing {
            dir: run.checkpoint,
            state,
            inner: run.observer,
            progress,
        };
        let (palettes, layers) = super::edkm::edkm_model(
            cfg,
            &model.weights,
            super::edkm::Calibration {
                windows: &windows,
                importance: importance.as_deref(),
            },
            &opts,
            done,
            &run.device
                .clone()
                .unwrap_or_else(|| burn::tensor::Device::flex().autodiff()),
            &mut obs,
        )?;
        for l in &layers {
            tracing::info!(
                layer = l.layer,
                kmeans = l.kmeans_error,
                edkm = l.edkm_error,
                "eDKM layer error"
            );
        }
        trained = palettes.into_iter().collect();
        trained_layers = layers;
    }
    progress.phase(&format!("{} {} bits", step.method, step.bits), total);
    let mut linears = Vec::with_capacity(total);
    let mut palettized = std::collections::BTreeSet::new();
    for layer in 0..cfg.num_layers {
        for p in Proj::PER_LAYER {
            let name = p.weight_name(layer);
            let t = model.weights.get(&name).expect("checked above");
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let imp: Option<&[f32]> = importance
                .as_ref()
                .map(|s| s[layer][group_index(p).expect("decoder linear")].as_slice());
            let opts = KmeansOptions {
                bits: step.bits,
                group_rows: resolve_group(step.group_channels, rows),
                iterations: step.iterations,
                keep_zeros: model.sparsity.contains_key(&name),
                seed: layer as u64 * 16 + p as u64,
            };
            let pal = match trained.remove(&name) {
                Some(pal) => pal,
                None => {
                    palettize(&t.data, rows, cols, imp, &opts).map_err(|e| CoreError::Other(format!("{name}: {e}")))?
                }
            };
            let deq = pal.dequantize();
            let (mut num, mut den) = (0f64, 0f64);
            for (i, (&w, &q)) in t.data.iter().zip(&deq).enumerate() {
                let a = imp.map_or(1.0, |v| v[i % cols] as f64);
                num += a * ((w - q) as f64).powi(2);
                den += a * (w as f64).powi(2);
            }
            linears.push(ClusteredLinear {
                name: name.clone(),
                group_rows: opts.group_rows,
                relative_error: num / den.max(f64::MIN_POSITIVE),
            });
            writer.add_lut(&name, &pal)?;
            palettized.insert(name);
            progress.set(linears.len());
        }
    }
    // The rest on the recipe's grids (embedding and head), norms f32.
    for name in model.weights.names() {
        if palettized.contains(name) {
            continue;
        }
        let t = model.weights.get(name).expect("listed");
        if t.shape.len() == 2 {
            let spec = recipe.spec.weights_for(name);
            writer.add_quantized(name, &quantize_weight(&t.data, t.shape[0], t.shape[1], &spec, 1.0));
        } else {
            writer.add_f32(name, t.shape.clone(), &t.data);
        }
    }
    let tensors = &writer.manifest_mut().deployment.tensors;
    let stored_bytes: u64 = tensors.values().map(|e| e.stored_bytes() as u64).sum();
    let lut_bytes: u64 = palettized
        .iter()
        .map(|n| tensors.get(n).expect("added").stored_bytes() as u64)
        .sum();
    let linear_params = cfg.decoder_linear_params() as f64;
    let report = ClusterReport {
        method: step.method.clone(),
        bits: step.bits,
        group_channels: step.group_channels,
        importance: step.importance,
        mean_relative_error: linears.iter().map(|l| l.relative_error).sum::<f64>() / linears.len().max(1) as f64,
        linears,
        trained_layers,
        linear_bits_per_weight: lut_bytes as f64 * 8.0 / linear_params,
        stored_bytes,
        bits_per_weight: stored_bytes as f64 * 8.0 / cfg.n_params() as f64,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((writer, report))
}

/// Writes the checkpoint after each layer, then passes events on.
struct Checkpointing<'a, 'b> {
    dir: Option<&'a Path>,
    state: ClusterCheckpoint,
    inner: &'a mut dyn EdkmObserver,
    progress: &'b mut dyn Progress,
}

impl EdkmObserver for Checkpointing<'_, '_> {
    fn step(&mut self, layer: usize, step: usize, loss: f64) {
        self.inner.step(layer, step, loss);
    }

    fn layer_done(&mut self, palettes: &[(String, Palettized)], layers: &[EdkmLayer]) -> Result<()> {
        if let Some(dir) = self.dir {
            self.state.layers = layers.to_vec();
            let per_layer = Proj::PER_LAYER.len();
            checkpoint::save_layer(dir, &self.state, &palettes[palettes.len() - per_layer..])?;
        }
        self.progress.set(layers.len());
        self.inner.layer_done(palettes, layers)
    }
}

/// Rows per table: `group_channels`, or the whole tensor for 0.
fn resolve_group(group_channels: usize, rows: usize) -> usize {
    if group_channels == 0 { rows } else { group_channels }
}
