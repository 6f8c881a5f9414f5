//! Automatic mixed precision under a size budget: from each unit's measured
//! sensitivity ([`crate::stats::sensitivity::unit_sensitivity`]) and its cost
//! in bytes, choose which units' weights move to the wide grid (greedy by
//! error removed per extra byte, while the budget allows) and which inputs
//! move to 16 bits (the largest errors, up to the recipe's count), then write
//! the choice into the recipe as per-tensor overrides and per-layer
//! `act16_sites` — the same spec every other step, the bundle and the runtime
//! already follow.

use crate::stats::sensitivity::{LinearUnit, UnitSensitivity};
use oqt_core::encoding::TensorEncoding;
use oqt_core::quant::{MixedPrecisionSpec, QuantSpec, Recipe, TensorOverride, WeightSpec};
use oqt_core::weights::ModelWeights;
use oqt_core::{CoreError, Result};
use oqt_model::hooks::Proj;
use serde::Serialize;

/// One unit's place in the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedUnit {
    pub layer: usize,
    pub unit: LinearUnit,
    /// The unit's weights on `wide_weights` instead of the recipe's grid.
    pub wide_weights: bool,
    /// The unit's input at 16 bits instead of 8.
    pub act16_input: bool,
    pub weights_error: f64,
    pub input_error: Option<f64>,
    /// Bytes the wide grid adds over the recipe's.
    pub wide_extra_bytes: u64,
}

/// The plan: what was chosen and what it costs.
#[derive(Debug, Clone, Serialize)]
pub struct MixedPrecisionPlan {
    /// The budget as written (`87.5MiB`, `5.45bpw`) and in bytes.
    pub budget: String,
    pub budget_bytes: u64,
    /// Bytes outside the tensors (manifest, headers) set aside from the budget.
    pub reserved_bytes: u64,
    /// Tensor bytes with every unit on the recipe's grid, and as planned.
    pub base_bytes: u64,
    pub planned_bytes: u64,
    /// The recipe's decoder grid and the wide one.
    pub narrow_weights: WeightSpec,
    pub wide_weights: WeightSpec,
    /// Sum of the chosen units' measured errors, before and after the plan
    /// (the additive model the greedy choice maximizes).
    pub error_before: f64,
    pub error_after: f64,
    pub units: Vec<PlannedUnit>,
}

impl MixedPrecisionPlan {
    pub fn wide_count(&self) -> usize {
        self.units.iter().filter(|u| u.wide_weights).count()
    }

    pub fn act16_count(&self) -> usize {
        self.units.iter().filter(|u| u.act16_input).count()
    }
}

/// Tensor bytes of `name` (`shape`) stored on `spec`'s grid (2-D) or in f32.
fn tensor_bytes(shape: &[usize], spec: WeightSpec) -> u64 {
    let encoding = match shape {
        [rows, cols] => TensorEncoding::integer(*rows, *cols, spec.group_len(*cols), spec),
        _ => TensorEncoding::F32 { shape: shape.to_vec() },
    };
    encoding.stored_bytes() as u64
}

/// Tensor bytes of every weight of `weights` under `spec`.
pub fn model_bytes(weights: &ModelWeights, spec: &QuantSpec) -> u64 {
    weights
        .names()
        .map(|n| {
            let t = weights.get(n).expect("listed");
            tensor_bytes(&t.shape, spec.weights_for(n))
        })
        .sum()
}

/// Bytes a bundle of `model` holds outside its tensors: the manifest without
/// tensors (config, tokenizer) as the safetensors header stores it (a JSON
/// string inside JSON, so escaped), plus room for the per-tensor entries, the
/// activation grids, the recipe, the plan and the header's tensor index.
pub fn reserved_bytes(model: &oqt_core::LoadedModel) -> Result<u64> {
    let manifest = oqt_core::bundle::Manifest::for_model(model, "oqt")?;
    let json = serde_json::to_string(&manifest)
        .and_then(|m| serde_json::to_string(&m))
        .map_err(|e| CoreError::Other(format!("manifest: {e}")))?;
    Ok(json.len() as u64 + 256 * 1024)
}

/// The budget error when even the all-narrow plan does not fit.
pub fn check_fits(
    weights: &ModelWeights,
    spec: &QuantSpec,
    mp: &MixedPrecisionSpec,
    n_params: usize,
    reserved: u64,
) -> Result<u64> {
    let budget_bytes = mp.size_budget.bytes(n_params);
    let base_bytes = model_bytes(weights, spec);
    let mib = |b: u64| b as f64 / 1048576.0;
    if base_bytes + reserved > budget_bytes {
        return Err(CoreError::Other(format!(
            "size budget {} ({budget_bytes} bytes, {:.2} MiB) is below the smallest plan: every layer on the recipe's grid takes {:.2} MiB of tensors and {:.2} MiB of manifest; raise the budget or pick a narrower recipe",
            mp.size_budget,
            mib(budget_bytes),
            mib(base_bytes),
            mib(reserved)
        )));
    }
    Ok(base_bytes)
}

/// Choose the plan for `weights` (the model as it will be quantized, after any
/// channel splitting) under `mp`; `n_params` counts the parameters a
/// bits-per-weight budget is over, `reserved` the bundle's bytes outside its
/// tensors. Errors when even the all-narrow plan does not fit.
pub fn plan(
    weights: &ModelWeights,
    spec: &QuantSpec,
    mp: &MixedPrecisionSpec,
    sensitivities: &[UnitSensitivity],
    n_params: usize,
    reserved: u64,
) -> Result<MixedPrecisionPlan> {
    let budget_bytes = mp.size_budget.bytes(n_params);
    let base_bytes = check_fits(weights, spec, mp, n_params, reserved)?;
    let extra_of = |layer: usize, unit: LinearUnit| -> u64 {
        unit.projs()
            .iter()
            .map(|p: &Proj| {
                let name = p.weight_name(layer);
                let shape = &weights.get(&name).expect("validated").shape;
                tensor_bytes(shape, mp.wide_weights).saturating_sub(tensor_bytes(shape, spec.weights_for(&name)))
            })
            .sum()
    };
    let mut units: Vec<PlannedUnit> = sensitivities
        .iter()
        .map(|s| PlannedUnit {
            layer: s.layer,
            unit: s.unit,
            wide_weights: false,
            act16_input: false,
            weights_error: s.weights_error,
            input_error: s.input_error,
            wide_extra_bytes: extra_of(s.layer, s.unit),
        })
        .collect();
    // Weights: greedy by error removed per extra byte, skipping what no longer fits.
    let mut order: Vec<usize> = (0..units.len())
        .filter(|&i| units[i].wide_extra_bytes > 0 && units[i].weights_error > 0.0)
        .collect();
    let density = |u: &PlannedUnit| u.weights_error / u.wide_extra_bytes as f64;
    order.sort_by(|&a, &b| density(&units[b]).total_cmp(&density(&units[a])));
    let mut planned = base_bytes;
    for i in order {
        if planned + units[i].wide_extra_bytes + reserved <= budget_bytes {
            planned += units[i].wide_extra_bytes;
            units[i].wide_weights = true;
        }
    }
    // Inputs: they cost no bytes, but each 16-bit input is an A16 layer on the
    // device; the recipe says how many it affords.
    let mut inputs: Vec<usize> = (0..units.len())
        .filter(|&i| units[i].input_error.is_some_and(|e| e > 0.0))
        .collect();
    inputs.sort_by(|&a, &b| units[b].input_error.unwrap().total_cmp(&units[a].input_error.unwrap()));
    for &i in inputs.iter().take(mp.max_act16_inputs) {
        units[i].act16_input = true;
    }
    let error_before = units
        .iter()
        .map(|u| u.weights_error + u.input_error.unwrap_or(0.0))
        .sum();
    let error_after = units
        .iter()
        .map(|u| {
            (if u.wide_weights { 0.0 } else { u.weights_error })
                + (if u.act16_input {
                    0.0
                } else {
                    u.input_error.unwrap_or(0.0)
                })
        })
        .sum();
    Ok(MixedPrecisionPlan {
        budget: mp.size_budget.to_string(),
        budget_bytes,
        reserved_bytes: reserved,
        base_bytes,
        planned_bytes: planned,
        narrow_weights: spec.weights,
        wide_weights: mp.wide_weights,
        error_before,
        error_after,
        units,
    })
}

/// `recipe` with `plan` written into its spec: one override naming every
/// widened tensor (one regular expression, ahead of the recipe's own, which
/// never name decoder linears) and one `act16_sites` entry `input@layer` per
/// widened input.
pub fn apply(recipe: &Recipe, plan: &MixedPrecisionPlan) -> Recipe {
    let mut out = recipe.clone();
    let wide: Vec<String> = plan
        .units
        .iter()
        .filter(|u| u.wide_weights)
        .flat_map(|u| {
            u.unit
                .projs()
                .iter()
                .map(move |p| regex::escape(&p.weight_name(u.layer)))
        })
        .collect();
    if !wide.is_empty() {
        out.spec.overrides.insert(
            0,
            TensorOverride {
                pattern: format!("^({})$", wide.join("|")),
                weights: plan.wide_weights,
            },
        );
    }
    out.spec.act16_sites.extend(
        plan.units
            .iter()
            .filter(|u| u.act16_input)
            .map(|u| format!("{}@{}", u.unit.input_name(), u.layer)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::quant::{SizeBudget, load_recipe};
    use oqt_core::testing::{random_weights, tiny_config};

    fn sens(errors: &[(usize, LinearUnit, f64, f64)]) -> Vec<UnitSensitivity> {
        errors
            .iter()
            .map(|&(layer, unit, w, a)| UnitSensitivity {
                layer,
                unit,
                weights_error: w,
                input_error: Some(a),
            })
            .collect()
    }

    #[test]
    fn greedy_takes_the_most_error_per_byte_that_fits_and_apply_names_exactly_those() {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, 3);
        let recipe = load_recipe("w4a8").unwrap();
        let spec = &recipe.spec;
        let s = sens(&[
            (0, LinearUnit::Qkv, 1.0, 0.5),
            (0, LinearUnit::O, 1.0, 0.0),
            (0, LinearUnit::GateUp, 2.0, 3.0),
            (0, LinearUnit::Down, 3.0, 0.1),
            (1, LinearUnit::Qkv, 0.1, 2.0),
            (1, LinearUnit::O, 0.0, 0.2),
            (1, LinearUnit::GateUp, 0.2, 0.3),
            (1, LinearUnit::Down, 0.5, 0.4),
        ]);
        let base = model_bytes(&weights, spec);
        let mp0 = oqt_core::quant::MixedPrecisionSpec::with_budget(SizeBudget::Bytes(u64::MAX));
        let all = plan(&weights, spec, &mp0, &s, cfg.n_params(), 0).unwrap();
        let extra = |layer: usize, unit: LinearUnit| {
            all.units
                .iter()
                .find(|u| u.layer == layer && u.unit == unit)
                .unwrap()
                .wide_extra_bytes
        };
        // An unlimited budget widens every unit with an error; o of layer 1 has none.
        assert_eq!(all.wide_count(), 7);
        // Error per byte: layer 0's o (1.0 / small) and down (3.0 / 96·64 bytes) lead.
        let room = extra(0, LinearUnit::O) + extra(0, LinearUnit::Down);
        let mut mp = mp0.clone();
        mp.size_budget = SizeBudget::Bytes(base + room + 7);
        mp.max_act16_inputs = 2;
        let p = plan(&weights, spec, &mp, &s, cfg.n_params(), 7).unwrap();
        let chosen = |pick: fn(&PlannedUnit) -> bool| -> Vec<(usize, LinearUnit)> {
            p.units.iter().filter(|u| pick(u)).map(|u| (u.layer, u.unit)).collect()
        };
        let wide = chosen(|u| u.wide_weights);
        assert_eq!(wide, vec![(0, LinearUnit::O), (0, LinearUnit::Down)]);
        assert_eq!(p.planned_bytes, base + room);
        assert!(p.error_after < p.error_before);
        assert_eq!(
            chosen(|u| u.act16_input),
            vec![(0, LinearUnit::GateUp), (1, LinearUnit::Qkv)]
        );

        let planned = apply(&recipe, &p);
        for layer in 0..2 {
            for unit in LinearUnit::ALL {
                for proj in unit.projs() {
                    let name = proj.weight_name(layer);
                    let expected = if wide.contains(&(layer, unit)) { 8 } else { 4 };
                    assert_eq!(planned.spec.weights_for(&name).bits, expected, "{name}");
                }
            }
        }
        assert_eq!(planned.spec.weights_for("model.embed_tokens.weight").bits, 8);
        assert!(planned.spec.problems().is_empty());
        assert!(planned.spec.layer_problems(2).is_empty());
        assert!(
            planned
                .spec
                .act16_sites
                .ends_with(&["gate_up_input@0".into(), "qkv_input@1".into()])
        );
        assert_eq!(model_bytes(&weights, &planned.spec), p.planned_bytes);
    }

    #[test]
    fn a_budget_below_the_all_narrow_plan_is_refused_with_both_sizes() {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, 3);
        let recipe = load_recipe("w4a8").unwrap();
        let base = model_bytes(&weights, &recipe.spec);
        let mp = oqt_core::quant::MixedPrecisionSpec::with_budget(SizeBudget::Bytes(base + 99));
        let e = plan(&weights, &recipe.spec, &mp, &[], cfg.n_params(), 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("below the smallest plan") && e.contains(&format!("{}", base + 99)),
            "{e}"
        );
        assert!(plan(&weights, &recipe.spec, &mp, &[], cfg.n_params(), 99).is_ok());
    }
}
