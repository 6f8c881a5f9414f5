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
pub mod mixed_precision;
pub mod mobilequant;
pub mod rtn;
pub mod smoothing;
pub mod split;

use crate::ptq::gptq::GptqOptions;
use crate::ptq::rtn::{Calibrated, Prepared, RtnOptions, assemble};
use crate::ptq::smoothing::{LayerScales, fold};
use crate::stats::calibrate::{calibrate, load_windows};
use crate::stats::inputs::{Gather, InputStats, gather_inputs};
use oqt_core::bundle::{BundleWriter, InputRecord};
use oqt_core::quant::{ActGrid, ActMode, CalibrationSpec, MobileQuantSpec, QuantizedWeight, Recipe};
use oqt_core::weights::ModelWeights;
use oqt_core::{CoreError, LoadedModel, Result};
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
    /// The mixed-precision plan, when the recipe has a size budget.
    pub mixed_precision: Option<mixed_precision::MixedPrecisionPlan>,
}

/// What every method's whole-model pass sees: the model (already widened when
/// outlier channels were split), the recipe, the options and the calibration
/// windows (empty for RTN on a dynamic recipe).
pub(crate) struct MethodInput<'a> {
    pub model: &'a LoadedModel,
    pub recipe: &'a Recipe,
    pub opts: &'a PtqOptions,
    pub windows: &'a [Vec<u32>],
}

impl MethodInput<'_> {
    pub fn is_static(&self) -> bool {
        self.recipe.spec.activations.mode == ActMode::Static
    }

    /// The float model of `weights` under this model's config.
    pub fn float_llama(&self, weights: &ModelWeights) -> Llama {
        oqt_model::llama_from_weights(&self.model.config, weights.clone(), &burn::tensor::Device::flex())
    }

    /// Statistics of every decoder linear's input on the float model.
    pub fn input_stats(&self, gather: Gather, progress: &mut dyn Progress) -> Result<Vec<[InputStats; 4]>> {
        progress.phase("input statistics", self.windows.len());
        gather_inputs(&self.float_llama(&self.model.weights), self.windows, gather, |d, _| {
            progress.set(d)
        })
    }

    /// Static activation grids of `llama` on the calibration windows.
    pub fn calibrate(
        &self,
        llama: &Llama,
        phase: &str,
        progress: &mut dyn Progress,
    ) -> Result<BTreeMap<String, ActGrid>> {
        progress.phase(phase, self.windows.len());
        calibrate(
            llama,
            &self.recipe.spec,
            &self.opts.calibration,
            self.windows,
            |d, _| progress.set(d),
        )
    }

    /// The model's weights with `scales` folded in.
    pub fn folded(&self, scales: &[LayerScales]) -> Result<ModelWeights> {
        let mut w = self.model.weights.clone();
        fold(&self.model.config, &mut w, scales)?;
        Ok(w)
    }
}

/// What a method's whole-model pass hands back.
#[derive(Default)]
pub(crate) struct MethodOutput {
    /// The float weights the method ends with (`None`: the model's own).
    pub weights: Option<ModelWeights>,
    /// Weights the method quantized itself (the rest are rounded to nearest).
    pub quantized: BTreeMap<String, QuantizedWeight>,
    /// Activation grids the method learned (`None`: calibrate the final model).
    pub grids: Option<BTreeMap<String, ActGrid>>,
    /// Training loss per step, for methods that train.
    pub losses: Vec<f32>,
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
    // Fail before calibration, not only when the bundle is assembled.
    crate::ptq::rtn::check_model(recipe, model)?;
    if !model.sharing.is_empty()
        && (method != Method::Rtn || recipe.mixed_precision.is_some() || opts.split_down_ratio.is_some_and(|r| r > 0.0))
    {
        return Err(CoreError::Other(format!(
            "{}: the model shares weights between blocks ({} shared weights); only round-to-nearest without a size budget or channel splitting keeps one quantized copy for every block that uses it — use `--method rtn`, or quantize before sharing",
            model.path.display(),
            model.sharing.len()
        )));
    }
    let reserved = match &recipe.mixed_precision {
        Some(mp) => {
            let reserved = mixed_precision::reserved_bytes(model)?;
            mixed_precision::check_fits(&model.weights, &recipe.spec, mp, model.config.n_params(), reserved)?;
            reserved
        }
        None => 0,
    };
    let is_static = recipe.spec.activations.mode == ActMode::Static;
    let (windows, calibration_input) = if is_static || method != Method::Rtn {
        let (data, windows) = load_windows(&model.tokenizer, &opts.calibration)?;
        let record = InputRecord::of_file("calibration", &data.path)?;
        (windows, Some(record))
    } else {
        (Vec::new(), None)
    };
    // Outlier channel splitting (MobileQuant, when the recipe asks): the rest of
    // the method, and the bundle, see the widened model.
    let split_ratio = match opts.split_down_ratio {
        Some(r) => r,
        None if method == Method::MobileQuant => opts.mobilequant.split_down_ratio,
        None => 0.0,
    };
    let split_model = if split_ratio > 0.0 {
        Some(split_outliers(model, recipe, opts, split_ratio, &windows, progress)?)
    } else {
        None
    };
    let widened = split_model.as_ref().unwrap_or(model);
    let planned = match &recipe.mixed_precision {
        Some(mp) => {
            let plan = plan_mixed_precision(model, widened, recipe, mp, opts, reserved, progress)?;
            Some((mixed_precision::apply(recipe, &plan), plan))
        }
        None => None,
    };
    let input = MethodInput {
        model: widened,
        recipe: planned.as_ref().map_or(recipe, |(r, _)| r),
        opts,
        windows: &windows,
    };
    let output = match method {
        Method::Rtn => MethodOutput::default(),
        Method::SmoothQuant => MethodOutput {
            weights: Some(input.folded(&crate::ptq::smoothing::model_scales(&input, progress)?)?),
            ..MethodOutput::default()
        },
        Method::Awq => MethodOutput {
            weights: Some(input.folded(&crate::ptq::awq::model_scales(&input, progress)?)?),
            ..MethodOutput::default()
        },
        Method::Gptq => crate::ptq::gptq::quantize_model(&input, progress)?,
        Method::MobileQuant => crate::ptq::mobilequant::quantize_model(&input, progress)?,
    };
    let mut outcome = write_bundle(&input, method, output, calibration_input, created_by, progress)?;
    if let Some((_, plan)) = planned {
        outcome.writer.manifest_mut().provenance.mixed_precision =
            Some(serde_json::to_value(&plan).map_err(|e| CoreError::Other(format!("mixed-precision plan: {e}")))?);
        outcome.mixed_precision = Some(plan);
    }
    Ok(outcome)
}

/// Measure every unit's sensitivity on `widened` (the model the method will
/// quantize) and choose the plan under the recipe's budget.
fn plan_mixed_precision(
    model: &LoadedModel,
    widened: &LoadedModel,
    recipe: &Recipe,
    mp: &oqt_core::quant::MixedPrecisionSpec,
    opts: &PtqOptions,
    reserved: u64,
    progress: &mut dyn Progress,
) -> Result<mixed_precision::MixedPrecisionPlan> {
    let mut calibration = opts.calibration.clone();
    calibration.samples = mp.samples;
    calibration.seq_len = mp.seq_len;
    let (_, windows) = load_windows(&widened.tokenizer, &calibration)?;
    let total = widened.config.num_layers * crate::stats::sensitivity::LinearUnit::ALL.len();
    progress.phase("mixed precision: unit sensitivity", total);
    let sensitivities = crate::stats::sensitivity::unit_sensitivity(
        &widened.config,
        &widened.weights,
        &recipe.spec,
        &calibration,
        &windows,
        |d, _| progress.set(d),
    )?;
    let plan = mixed_precision::plan(
        &widened.weights,
        &recipe.spec,
        mp,
        &sensitivities,
        model.config.n_params(),
        reserved,
    )?;
    tracing::info!(
        wide_units = plan.wide_count(),
        act16_inputs = plan.act16_count(),
        planned_mib = plan.planned_bytes as f64 / 1048576.0,
        budget_mib = plan.budget_bytes as f64 / 1048576.0,
        "mixed-precision plan"
    );
    Ok(plan)
}

/// The model with the down projection's outlier input channels split into
/// exact copies (static recipes only: the split narrows static grids).
fn split_outliers(
    model: &LoadedModel,
    recipe: &Recipe,
    opts: &PtqOptions,
    ratio: f32,
    windows: &[Vec<u32>],
    progress: &mut dyn Progress,
) -> Result<LoadedModel> {
    if recipe.spec.activations.mode != ActMode::Static {
        return Err(CoreError::Other(format!(
            "outlier channel splitting narrows static activation grids; recipe `{}` quantizes activations per token at run time — drop the split ratio",
            recipe.name
        )));
    }
    let cfg = &model.config;
    progress.phase("input statistics (channel splitting)", windows.len());
    let float = oqt_model::llama_from_weights(cfg, model.weights.clone(), &burn::tensor::Device::flex());
    let st = gather_inputs(&float, windows, Gather::default(), |d, _| progress.set(d))?;
    // LPBQ blocks must tile the widened down projection.
    let align = (0..cfg.num_layers)
        .filter_map(|l| {
            let name = format!("model.layers.{l}.mlp.down_proj.weight");
            recipe.spec.weights_for(&name).granularity.lpbq_block()
        })
        .max()
        .unwrap_or(1);
    let plan = crate::ptq::split::plan(&st, ratio, 16, opts.mobilequant.split_down_max, align);
    let mut weights = model.weights.clone();
    let sizes = crate::ptq::split::apply(cfg, &mut weights, &plan)?;
    tracing::info!(
        added = plan.total_extra(),
        ?sizes,
        "split down-projection input channels"
    );
    let mut config = cfg.clone();
    config.layer_intermediate_sizes = Some(sizes);
    Ok(LoadedModel {
        path: model.path.clone(),
        format: model.format,
        name: model.name.clone(),
        config,
        weights,
        tokenizer: model.tokenizer.clone(),
        // Only RTN quantizes a model with shared weights (refused before this).
        sharing: Default::default(),
        // Split down projections no longer hold their N:M blocks.
        sparsity: model
            .sparsity
            .iter()
            .filter(|(n, _)| !n.ends_with("mlp.down_proj.weight"))
            .map(|(n, l)| (n.clone(), *l))
            .collect(),
    })
}

/// Calibrate the static grids of the final model (unless the method learned
/// them), round the remaining weights and assemble the bundle.
fn write_bundle(
    input: &MethodInput,
    method: Method,
    output: MethodOutput,
    calibration_input: Option<InputRecord>,
    created_by: &str,
    progress: &mut dyn Progress,
) -> Result<PtqOutcome> {
    let model = input.model;
    let final_weights = output.weights.as_ref().unwrap_or(&model.weights);
    let is_static = input.is_static();
    let calibrated = match (is_static, output.grids) {
        (false, _) => None,
        (true, Some(grids)) => Some(grids),
        (true, None) => Some(input.calibrate(&input.float_llama(final_weights), "calibrating", progress)?),
    }
    .map(|grids| Calibrated {
        grids,
        input: calibration_input.clone().expect("static recipes load windows"),
    });
    let method_name = match (method, input.opts.rtn.clip_search) {
        (Method::Rtn, true) => "rtn-mse-clip".to_string(),
        (m, _) => m.name().to_string(),
    };
    progress.phase("writing", model.weights.len());
    let prepared = Prepared {
        weights: final_weights,
        quantized: output.quantized,
        method: method_name,
    };
    let mut writer = assemble(
        model,
        prepared,
        input.recipe,
        input.opts.rtn,
        calibrated,
        created_by,
        |d, _| progress.set(d),
    )?;
    if !is_static && let Some(input) = calibration_input {
        writer.manifest_mut().inputs.push(input);
    }
    Ok(PtqOutcome {
        writer,
        losses: output.losses,
        mixed_precision: None,
    })
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
