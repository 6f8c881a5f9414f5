//! Post-training quantization, one entry point for every method: gather what
//! the method needs from calibration windows, transform or quantize the
//! weights, calibrate the static activation grids on the model the method ends
//! with, and hand everything to the bundle writer.
//!
//! | method | weights | activation grids |
//! |---|---|---|
//! | `rtn` | round to nearest | min/max (or percentile) of the float model |
//! | `smoothquant` | SmoothQuant scales (α) folded, then RTN | of the smoothed model |
//! | `awq` | AWQ scales searched per input (q/k/v, gate/up, down) folded, then RTN | of the scaled model |
//! | `gptq` | GPTQ on every decoder linear (Hessians of the float model's inputs, plus the static input grid's rounding noise) | of the GPTQ model |
//! | `mobilequant` | AWQ (or SmoothQuant) init, then learned smoothing + clipping, folded | learned |
//!
//! Before any of them, a static recipe may split the down projection's outlier
//! input channels into exact copies ([`crate::ptq::split`]; MobileQuant's
//! `split_down_ratio`, or `--split-down` for any method): the layers it touches
//! get wider MLPs, which the bundle's config records per layer.

pub mod awq;
pub mod gptq;
pub mod mobilequant;
pub mod rtn;
pub mod smoothing;
pub mod split;

use crate::ptq::awq::{AwqLinear, AwqOptions, search_scales};
use crate::ptq::gptq::{GptqOptions, gptq_quantize};
use crate::ptq::mobilequant::Learned;
use crate::ptq::rtn::{Calibrated, Prepared, RtnOptions, assemble};
use crate::ptq::smoothing::{LayerScales, fold, smoothquant_scales};
use crate::stats::calibrate::{calibrate, load_windows};
use crate::stats::inputs::{Gather, InputStats, gather_inputs};
use oqt_core::bundle::{BundleWriter, InputRecord};
use oqt_core::quant::{
    ActGrid, ActMode, CalibrationSpec, MobileQuantSpec, QuantizedWeight, Recipe, TransformInit, dequantize_weight,
    quantize_weight_rows,
};
use oqt_core::weights::{ModelWeights, TensorF32};
use oqt_core::{CoreError, LoadedModel, Result};
use oqt_model::Proj;
use oqt_model::llama::Llama;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Rtn,
    SmoothQuant,
    Awq,
    Gptq,
    MobileQuant,
}

impl Method {
    pub const ALL: [Method; 5] = [Self::Rtn, Self::SmoothQuant, Self::Awq, Self::Gptq, Self::MobileQuant];

    pub fn name(self) -> &'static str {
        match self {
            Self::Rtn => "rtn",
            Self::SmoothQuant => "smoothquant",
            Self::Awq => "awq",
            Self::Gptq => "gptq",
            Self::MobileQuant => "mobilequant",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
            format!("unknown method `{s}`; expected one of {}", names.join(", "))
        })
    }
}

/// Where a long job reports: phases with a step count, and training losses.
pub trait Progress {
    fn phase(&mut self, name: &str, total: usize);
    fn set(&mut self, done: usize);
    fn loss(&mut self, step: usize, steps: usize, loss: f32) {
        let _ = (steps, loss);
        self.set(step);
    }
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn phase(&mut self, _: &str, _: usize) {}
    fn set(&mut self, _: usize) {}
}

#[derive(Debug, Clone)]
pub struct PtqOptions {
    pub rtn: RtnOptions,
    pub calibration: CalibrationSpec,
    /// SmoothQuant's α (the `smoothquant` method and MobileQuant's initialisation).
    pub smooth_alpha: f32,
    pub mobilequant: MobileQuantSpec,
    pub gptq: GptqOptions,
    /// AWQ: calibration rows replayed by the scale search, in all.
    pub awq_sample_rows: usize,
    /// Outlier channel splitting of the down projection's input for any
    /// static method (`None`: the recipe's `[mobilequant] split_down_ratio`
    /// for MobileQuant, off for the others; `0` = off).
    pub split_down_ratio: Option<f32>,
}

impl PtqOptions {
    /// The recipe's calibration and MobileQuant budget, defaults elsewhere.
    pub fn for_recipe(recipe: &Recipe) -> Self {
        Self {
            rtn: RtnOptions { clip_search: false },
            calibration: recipe.calibration.clone(),
            smooth_alpha: recipe.mobilequant.alpha,
            mobilequant: recipe.mobilequant.clone(),
            gptq: GptqOptions::default(),
            awq_sample_rows: 1024,
            split_down_ratio: None,
        }
    }
}

/// A quantized model ready to write, and what the method reports.
pub struct PtqOutcome {
    pub writer: BundleWriter,
    /// MobileQuant's loss per step (empty for other methods).
    pub losses: Vec<f32>,
}

fn float_llama(cfg: &oqt_core::LlamaConfig, weights: &ModelWeights) -> Llama {
    oqt_model::llama_from_weights(cfg, weights.clone(), &burn::tensor::Device::flex())
}

/// Quantize `model` with `method` under `recipe`.
pub fn quantize(
    model: &LoadedModel,
    recipe: &Recipe,
    method: Method,
    opts: &PtqOptions,
    created_by: &str,
    progress: &mut dyn Progress,
) -> Result<PtqOutcome> {
    let cfg = &model.config;
    let spec = &recipe.spec;
    // Fail before calibration, not only when the bundle is assembled.
    crate::ptq::rtn::check_layers(recipe, cfg.num_layers)?;
    let is_static = spec.activations.mode == ActMode::Static;
    let needs_windows = is_static || method != Method::Rtn;
    let (windows, calibration_input) = if needs_windows {
        let (data, windows) = load_windows(&model.tokenizer, &opts.calibration)?;
        let record = InputRecord {
            role: "calibration".into(),
            path: data.path.display().to_string(),
            sha256: oqt_core::datasets::sha256_file(&data.path)?,
        };
        (windows, Some(record))
    } else {
        (Vec::new(), None)
    };
    // Outlier channel splitting (MobileQuant, when the recipe asks): the rest of
    // the method, and the bundle, see the widened model.
    let split_model;
    let split_ratio = match opts.split_down_ratio {
        Some(r) => r,
        None if method == Method::MobileQuant => opts.mobilequant.split_down_ratio,
        None => 0.0,
    };
    if split_ratio > 0.0 && !is_static {
        return Err(CoreError::Other(format!(
            "outlier channel splitting narrows static activation grids; recipe `{}` quantizes activations per token at run time — drop the split ratio",
            recipe.name
        )));
    }
    let model = if split_ratio > 0.0 {
        progress.phase("input statistics (channel splitting)", windows.len());
        let st = gather_inputs(
            &float_llama(cfg, &model.weights),
            &windows,
            Gather::default(),
            |d, _| progress.set(d),
        )?;
        let plan = crate::ptq::split::plan(&st, split_ratio, 16, opts.mobilequant.split_down_max);
        let mut weights = model.weights.clone();
        let sizes = crate::ptq::split::apply(cfg, &mut weights, &plan)?;
        tracing::info!(
            added = plan.total_extra(),
            ?sizes,
            "split down-projection input channels"
        );
        let mut config = cfg.clone();
        config.layer_intermediate_sizes = Some(sizes);
        split_model = LoadedModel {
            path: model.path.clone(),
            format: model.format,
            name: model.name.clone(),
            config,
            weights,
            tokenizer: model.tokenizer.clone(),
        };
        &split_model
    } else {
        model
    };
    let cfg = &model.config;
    let stats = |gather: Gather, progress: &mut dyn Progress| -> Result<Vec<[InputStats; 4]>> {
        progress.phase("input statistics", windows.len());
        gather_inputs(&float_llama(cfg, &model.weights), &windows, gather, |d, _| {
            progress.set(d)
        })
    };

    let mut quantized: BTreeMap<String, QuantizedWeight> = BTreeMap::new();
    let mut learned_grids: Option<BTreeMap<String, ActGrid>> = None;
    let mut losses = Vec::new();
    // The float weights the method ends with (`None`: the model's own).
    let weights: Option<ModelWeights> = match method {
        Method::Rtn => None,
        Method::SmoothQuant => {
            let st = stats(Gather::default(), progress)?;
            let scales = smoothquant_scales(cfg, &model.weights, &st, opts.smooth_alpha)?;
            let mut w = model.weights.clone();
            fold(cfg, &mut w, &scales)?;
            Some(w)
        }
        Method::Awq => {
            let st = stats(awq_gather(opts, windows.len()), progress)?;
            let scales = awq_scales(model, recipe, &st, progress)?;
            let mut w = model.weights.clone();
            fold(cfg, &mut w, &scales)?;
            Some(w)
        }
        Method::Gptq => {
            let st = stats(
                Gather {
                    sample_rows_per_window: 0,
                    gram: true,
                },
                progress,
            )?;
            // Static 8-bit inputs carry rounding noise of variance `scale²/12` on every
            // channel, which GPTQ's float-input Hessian does not see: its error
            // compensation then loads weight onto quiet channels where the noise
            // is amplified. The expected Hessian of the noisy input, `XᵀX + n·σ²·I`,
            // keeps it honest (without it GPTQ is worse than RTN on SmolLM2 w4a8).
            let noise: Option<BTreeMap<String, ActGrid>> = if is_static {
                progress.phase("calibrating (input noise)", windows.len());
                Some(calibrate(
                    &float_llama(cfg, &model.weights),
                    spec,
                    &opts.calibration,
                    &windows,
                    |d, _| progress.set(d),
                )?)
            } else {
                None
            };
            progress.phase("GPTQ", cfg.num_layers * Proj::PER_LAYER.len());
            let mut w = model.weights.clone();
            let mut done = 0;
            for (l, groups) in st.iter().enumerate() {
                for p in Proj::PER_LAYER {
                    let name = p.weight_name(l);
                    let t = model.weights.get(&name).expect("validated");
                    let g = &groups[crate::stats::inputs::group_index(p).expect("decoder linear")];
                    let mut h = g.gram.clone().expect("gathered");
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    if let Some(grid) = noise.as_ref().and_then(|n| n.get(&p.input_site().key(l)))
                        && grid.bits == 8
                    {
                        let add = g.tokens as f64 * (grid.scale as f64).powi(2) / 12.0;
                        for i in 0..cols {
                            h[i * cols + i] += add;
                        }
                    }
                    let qw = gptq_quantize(&t.data, rows, cols, &h, &spec.weights_for(&name), &opts.gptq)
                        .map_err(|e| CoreError::Other(format!("{name}: {e}")))?;
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let rtn = oqt_core::quant::quantize_weight(&t.data, rows, cols, &spec.weights_for(&name), 1.0);
                        let (e_gptq, e_rtn) = (
                            crate::ptq::gptq::output_error(&t.data, &qw, &h),
                            crate::ptq::gptq::output_error(&t.data, &rtn, &h),
                        );
                        tracing::debug!(%name, ratio = e_gptq / e_rtn, "GPTQ proxy error vs RTN");
                    }
                    // Activation grids are calibrated on the model GPTQ produced.
                    *w.get_mut(&name).expect("validated") = TensorF32::new(t.shape.clone(), dequantize_weight(&qw));
                    quantized.insert(name, qw);
                    done += 1;
                    progress.set(done);
                }
            }
            Some(w)
        }
        Method::MobileQuant => {
            if !is_static {
                return Err(CoreError::Other(format!(
                    "MobileQuant targets static (NPU) activation grids; recipe `{}` has {:?} activations — use rtn, gptq or awq",
                    recipe.name, spec.activations.mode
                )));
            }
            let init = match opts.mobilequant.init {
                TransformInit::Smoothquant => {
                    let st = stats(Gather::default(), progress)?;
                    smoothquant_scales(cfg, &model.weights, &st, opts.smooth_alpha)?
                }
                TransformInit::Awq => {
                    let st = stats(awq_gather(opts, windows.len()), progress)?;
                    awq_scales(model, recipe, &st, progress)?
                }
            };
            let initialised = || -> Result<ModelWeights> {
                let mut w = model.weights.clone();
                fold(cfg, &mut w, &init)?;
                Ok(w)
            };
            progress.phase("calibrating", windows.len());
            // The calibration model owns its fold of the weights and training
            // gets a fresh one, so the two never coexist: one weight copy fewer
            // at this phase's peak (~4.6 GiB at 1B).
            let grids = {
                let llama = oqt_model::llama_from_weights(cfg, initialised()?, &burn::tensor::Device::flex());
                calibrate(&llama, spec, &opts.calibration, &windows, |d, _| progress.set(d))?
            };
            let w = initialised()?;
            progress.phase("MobileQuant", opts.mobilequant.steps);
            // Training takes the weights; they are rebuilt (the same fold)
            // afterwards rather than kept: one copy fewer while a 1B model trains.
            let Learned {
                scales,
                clips,
                grids,
                losses: l,
            } = mobilequant::train(cfg, w, spec, &grids, &windows, &opts.mobilequant, &mut |s, n, loss| {
                progress.loss(s, n, loss)
            })?;
            losses = l;
            let mut w = initialised()?;
            fold(cfg, &mut w, &scales)?;
            for (name, c) in &clips {
                let t = w.get(name).expect("validated");
                let qw = quantize_weight_rows(&t.data, t.shape[0], t.shape[1], &spec.weights_for(name), c);
                quantized.insert(name.clone(), qw);
            }
            learned_grids = Some(grids);
            Some(w)
        }
    };
    let final_weights = weights.as_ref().unwrap_or(&model.weights);

    let calibrated = match (is_static, learned_grids) {
        (false, _) => None,
        (true, Some(grids)) => Some(grids),
        (true, None) => {
            progress.phase("calibrating", windows.len());
            Some(calibrate(
                &float_llama(cfg, final_weights),
                spec,
                &opts.calibration,
                &windows,
                |d, _| progress.set(d),
            )?)
        }
    }
    .map(|grids| Calibrated {
        grids,
        input: calibration_input.clone().expect("static recipes load windows"),
    });
    let method_name = match (method, opts.rtn.clip_search) {
        (Method::Rtn, true) => "rtn-mse-clip".to_string(),
        (m, _) => m.name().to_string(),
    };
    progress.phase("writing", model.weights.len());
    let prepared = Prepared {
        weights: final_weights,
        quantized,
        method: method_name,
    };
    let mut writer = assemble(model, prepared, recipe, opts.rtn, calibrated, created_by, |d, _| {
        progress.set(d)
    })?;
    if !is_static && let Some(input) = calibration_input {
        writer.manifest_mut().inputs.push(input);
    }
    Ok(PtqOutcome { writer, losses })
}

/// What AWQ's search replays: `awq_sample_rows` rows spread over the windows.
fn awq_gather(opts: &PtqOptions, windows: usize) -> Gather {
    Gather {
        sample_rows_per_window: opts.awq_sample_rows.div_ceil(windows.max(1)),
        gram: false,
    }
}

/// AWQ scales for every layer's q/k/v, gate/up and down inputs (v → o is left
/// at 1: under grouped-query attention the o columns do not map one to one
/// onto v's rows, and the reference implementation skips it too).
fn awq_scales(
    model: &LoadedModel,
    recipe: &Recipe,
    stats: &[[InputStats; 4]],
    progress: &mut dyn Progress,
) -> Result<Vec<LayerScales>> {
    let cfg = &model.config;
    let spec = &recipe.spec;
    let act_bits = (spec.activations.mode == ActMode::Static).then_some(spec.activations.bits);
    let opts = AwqOptions {
        act_bits,
        ..AwqOptions::default()
    };
    progress.phase("AWQ search", cfg.num_layers * 3);
    let mut out = Vec::with_capacity(cfg.num_layers);
    let mut done = 0;
    for (l, groups) in stats.iter().enumerate() {
        let mut s = LayerScales::identity(cfg, l);
        for (gi, projs) in [
            (0usize, &[Proj::Q, Proj::K, Proj::V][..]),
            (2, &[Proj::Gate, Proj::Up][..]),
            (3, &[Proj::Down][..]),
        ] {
            let names: Vec<String> = projs.iter().map(|p| p.weight_name(l)).collect();
            let linears: Vec<AwqLinear> = names
                .iter()
                .map(|n| {
                    let t = model.weights.get(n).expect("validated");
                    AwqLinear {
                        weight: &t.data,
                        rows: t.shape[0],
                        spec: spec.weights_for(n),
                    }
                })
                .collect();
            let g = &groups[gi];
            let r = search_scales(&g.sample, g.width, &linears, &opts);
            tracing::debug!(
                layer = l,
                input = gi,
                alpha = r.alpha,
                gain = r.error / r.rtn_error.max(1e-30),
                "AWQ"
            );
            match gi {
                0 => s.attn = r.scales,
                2 => s.mlp = r.scales,
                _ => s.down = r.scales,
            }
            done += 1;
            progress.set(done);
        }
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Method;

    #[test]
    fn recipe_steps_name_exactly_the_methods_there_are() {
        let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
        let mut listed = oqt_core::quant::QUANTIZE_METHODS.to_vec();
        let mut ours = names.clone();
        listed.sort();
        ours.sort();
        assert_eq!(listed, ours);
        for n in names {
            assert_eq!(n.parse::<Method>().unwrap().name(), n);
        }
    }
}
