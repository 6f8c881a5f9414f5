//! One pruning run, from a float model to a float bundle whose pruned
//! linears are stored sparse (`oqt prune` and the recipes' `prune` step).

use super::dsnot::{DsnotCriterion, DsnotOptions};
use super::mask::Pattern;
use super::model::{PruneMethod, PruneOptions, PrunedLinear, prune_model};
use crate::ptq::Progress;
use crate::stats::calibrate::load_windows;
use oqt_core::bundle::{BundleWriter, InputRecord, Manifest};
use oqt_core::quant::{CalibrationSpec, PruneStep};
use oqt_core::sparse::SparseLayout;
use oqt_core::{CoreError, LoadedModel, Result};
use serde::Serialize;

impl PruneOptions {
    /// The options a recipe's `prune` step (or `oqt prune`'s flags) asks for;
    /// `Err` names the field (`name(field)`).
    pub fn from_step(step: &PruneStep, name: impl Fn(&str) -> String) -> Result<Self> {
        let problems = step.problems(&name);
        if !problems.is_empty() {
            return Err(CoreError::Other(problems.join("; ")));
        }
        let pattern = match (&step.nm, step.sparsity) {
            (Some(nm), _) => {
                let (n, m) = PruneStep::parse_nm(nm).map_err(CoreError::Other)?;
                Pattern::NOfM { n, m }
            }
            (None, Some(sparsity)) => Pattern::Unstructured { sparsity },
            (None, None) => unreachable!("checked by problems()"),
        };
        Ok(Self {
            method: step.method.parse::<PruneMethod>().map_err(CoreError::Other)?,
            pattern,
            dsnot: step.dsnot.then_some(DsnotOptions {
                max_cycles: step.dsnot_cycles,
                threshold: step.dsnot_threshold,
                skip_mlp: !step.dsnot_mlp,
                sign_check: step.dsnot_sign_check,
                unit_token_rows: step.dsnot_unit_rows,
                criterion: match step.dsnot_criterion.as_str() {
                    "exact" => DsnotCriterion::Exact,
                    _ => DsnotCriterion::Expectation,
                },
            }),
            sparsegpt: Default::default(),
        })
    }
}

/// What a pruning run did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub options: PruneOptions,
    /// Every decoder linear, in model order.
    pub linears: Vec<PrunedLinear>,
    /// Zeros over all decoder linear weights.
    pub sparsity: f64,
    /// Mean relative output error of the base mask, and after DSnoT (over the
    /// linears DSnoT ran on, with the base error of the same linears).
    pub mean_error: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsnot_error: Option<(f64, f64)>,
    /// Bytes of tensor data stored, and what the dense f32 model stores.
    pub stored_bytes: u64,
    pub dense_bytes: u64,
    /// Stored bits per parameter (every tensor: values, positions, the dense rest).
    pub bits_per_weight: f64,
    pub seconds: f64,
}

pub struct PruneOutcome {
    pub writer: BundleWriter,
    pub report: PruneReport,
}

/// Prune `model` as `opts` says with windows of `calibration`, into a bundle
/// (not yet written): decoder linears stored `sparse` (a bitmap for
/// unstructured masks, N:M positions for N:M), everything else f32.
pub fn prune_to_bundle(
    model: &LoadedModel,
    opts: &PruneOptions,
    calibration: &CalibrationSpec,
    created_by: &str,
    progress: &mut dyn Progress,
) -> Result<PruneOutcome> {
    let t0 = std::time::Instant::now();
    let (data, windows) = load_windows(&model.tokenizer, calibration)?;
    progress.phase(&format!("{} {}", opts.method, opts.pattern), model.config.num_layers);
    let (weights, linears) = prune_model(&model.config, &model.weights, opts, &windows, |d, _| progress.set(d))?;
    let layout = match opts.pattern {
        Pattern::Unstructured { .. } => SparseLayout::Bitmap,
        Pattern::NOfM { n, m } => SparseLayout::NOfM { n, m },
    };
    let mut manifest = Manifest::for_model(model, created_by)?;
    manifest.provenance.method = Some(format!(
        "prune-{}{}",
        opts.method,
        if opts.dsnot.is_some() { "+dsnot" } else { "" }
    ));
    manifest.inputs.push(InputRecord::of_file("calibration", &data.path)?);
    if model.path.is_file() {
        manifest.inputs.push(InputRecord::of_file("model", &model.path)?);
    }
    let mut writer = BundleWriter::new(manifest);
    let pruned: std::collections::BTreeSet<&str> = linears.iter().map(|l| l.name.as_str()).collect();
    let (mut zeros, mut linear_params) = (0usize, 0usize);
    let dense_bytes: u64 = weights
        .names()
        .map(|n| weights.get(n).expect("listed").data.len() as u64 * 4)
        .sum();
    let names: Vec<String> = weights.names().cloned().collect();
    let mut weights = weights;
    for name in &names {
        // Taken one at a time: a 1B model's pruned f32 copy shrinks as the bundle fills.
        let t = weights.take(name).expect("listed");
        if pruned.contains(name.as_str()) {
            zeros += t.data.iter().filter(|v| **v == 0.0).count();
            linear_params += t.data.len();
            writer.add_sparse_f32(name, t.shape[0], t.shape[1], &t.data, layout)?;
        } else {
            writer.add_f32(name, t.shape.clone(), &t.data);
        }
    }
    let stored_bytes: u64 = writer
        .manifest_mut()
        .deployment
        .tensors
        .values()
        .map(|e| e.stored_bytes() as u64)
        .sum();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let with_dsnot: Vec<&PrunedLinear> = linears.iter().filter(|l| l.error_dsnot.is_some()).collect();
    let report = PruneReport {
        options: *opts,
        sparsity: zeros as f64 / linear_params.max(1) as f64,
        mean_error: mean(linears.iter().map(|l| l.error).collect()),
        dsnot_error: (!with_dsnot.is_empty()).then(|| {
            (
                mean(with_dsnot.iter().map(|l| l.error).collect()),
                mean(with_dsnot.iter().map(|l| l.error_dsnot.expect("filtered")).collect()),
            )
        }),
        stored_bytes,
        dense_bytes,
        bits_per_weight: stored_bytes as f64 * 8.0 / model.config.n_params() as f64,
        linears,
        seconds: t0.elapsed().as_secs_f64(),
    };
    writer.manifest_mut().provenance.pruning =
        Some(serde_json::to_value(&report).map_err(|e| CoreError::Other(format!("pruning report: {e}")))?);
    Ok(PruneOutcome { writer, report })
}
