//! Round-to-nearest post-training quantization: every linear weight on the
//! recipe's grid (per-tensor overrides applied), optionally with a per-row MSE
//! search over clip ratios; norms stay f32.
//!
//! Static (NPU-style) recipes also need the activation grids calibrated on the
//! float model ([`crate::stats::calibrate`]); they are passed in and stored in the manifest.

use oqt_core::bundle::{BundleWriter, InputRecord, Manifest};
use oqt_core::quant::{ActGrid, ActMode, QuantizedWeight, Recipe, quantize_weight, quantize_weight_mse};
use oqt_core::{CoreError, LoadedModel, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy)]
pub struct RtnOptions {
    /// Search the clip ratio per output row (slower, lower weight error).
    pub clip_search: bool,
}

/// Calibrated activation grids and the file they came from.
#[derive(Debug, Clone)]
pub struct Calibrated {
    pub grids: BTreeMap<String, ActGrid>,
    pub input: InputRecord,
}

/// Quantize `model` with `recipe`; `progress(done, total)` after each tensor.
pub fn quantize_rtn(
    model: &LoadedModel,
    recipe: &Recipe,
    opts: RtnOptions,
    calibrated: Option<Calibrated>,
    created_by: &str,
    progress: impl FnMut(usize, usize),
) -> Result<BundleWriter> {
    let method = if opts.clip_search { "rtn-mse-clip" } else { "rtn" };
    let prepared = Prepared {
        weights: &model.weights,
        quantized: BTreeMap::new(),
        method: method.into(),
    };
    assemble(model, prepared, recipe, opts, calibrated, created_by, progress)
}

/// What a method hands to the bundle writer: the float weights it ends with
/// (transformations folded in) and the weights it quantized itself (GPTQ's
/// updates, learned clips); everything else is rounded to nearest here.
pub struct Prepared<'a> {
    /// Float tensors to quantize (or store) on the recipe's grids.
    pub weights: &'a oqt_core::weights::ModelWeights,
    /// Tensors already quantized, written as they are (`weights` need not hold them).
    pub quantized: BTreeMap<String, oqt_core::quant::QuantizedWeight>,
    pub method: String,
}

/// Fails naming every `act16_sites` entry that names a layer the model lacks
/// and every matrix whose width its grid cannot tile (LPBQ blocks).
pub fn check_model(recipe: &Recipe, model: &LoadedModel) -> Result<()> {
    let mut problems = recipe.spec.layer_problems(model.config.num_layers);
    // Grids that need a width (LPBQ blocks) are checked on every matrix now,
    // before calibration, not when the bundle is half assembled.
    for name in model.weights.names() {
        let t = model.weights.get(name).expect("listed");
        if t.shape.len() == 2
            && let Some(p) = recipe.spec.weights_for(name).width_problems(name, t.shape[1])
        {
            problems.push(p);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CoreError::Other(format!(
            "recipe `{}`: {}",
            recipe.name,
            problems.join("; ")
        )))
    }
}

/// Write `prepared` as a bundle of `model` under `recipe`.
/// Add a quantized weight; a pruned one (`model.sparsity`) keeps its pruned
/// weights on the exact zero code (methods that update weights, like GPTQ,
/// may have moved them) and is stored N:M when its layout is N:M (an
/// unstructured mask is stored dense: zeros cost their codes).
fn add_weight(w: &mut BundleWriter, model: &LoadedModel, name: &str, mut qw: QuantizedWeight) -> Result<()> {
    let Some(layout) = model.sparsity.get(name) else {
        w.add_quantized(name, &qw);
        return Ok(());
    };
    let float = model.weights.get(name).expect("a pruned weight of the model");
    if float.data.len() == qw.q.len() {
        for i in (0..qw.q.len()).filter(|&i| float.data[i] == 0.0) {
            qw.q[i] = oqt_core::encoding::zero_code(&qw, i);
        }
    }
    match layout {
        oqt_core::sparse::SparseLayout::NOfM { .. } => {
            if let Err(e) = w.add_sparse_quantized(name, &qw, *layout) {
                // LPBQ blocks or groups that split N:M blocks: the zeros stay, stored dense.
                tracing::warn!(%e, "stored dense");
                w.add_quantized(name, &qw);
            }
        }
        oqt_core::sparse::SparseLayout::Bitmap => w.add_quantized(name, &qw),
    }
    Ok(())
}

pub fn assemble(
    model: &LoadedModel,
    prepared: Prepared<'_>,
    recipe: &Recipe,
    opts: RtnOptions,
    calibrated: Option<Calibrated>,
    created_by: &str,
    mut progress: impl FnMut(usize, usize),
) -> Result<BundleWriter> {
    check_model(recipe, model)?;
    let mut manifest = Manifest::for_model(model, created_by)?;
    let grids = match (recipe.spec.activations.mode, calibrated) {
        (ActMode::Static, Some(c)) => {
            manifest.inputs.push(c.input);
            c.grids
        }
        (ActMode::Static, None) => {
            return Err(CoreError::Other(format!(
                "recipe `{}` uses static activation grids: calibrate first (oqt_compress::stats::calibrate)",
                recipe.name
            )));
        }
        _ => Default::default(),
    };
    manifest.set_recipe(recipe, &grids)?;
    manifest.provenance.method = Some(prepared.method.clone());
    if let Ok(sha) = oqt_core::datasets::sha256_file(&model.path)
        && model.path.is_file()
    {
        manifest.inputs.push(InputRecord {
            role: "model".into(),
            path: model.path.display().to_string(),
            sha256: sha,
        });
    }
    let mut w = BundleWriter::new(manifest);
    // Tensors already quantized need no float copy in `weights`.
    let names: std::collections::BTreeSet<&String> =
        prepared.weights.names().chain(prepared.quantized.keys()).collect();
    let total = names.len();
    for (done, name) in names.into_iter().enumerate() {
        if let Some(qw) = prepared.quantized.get(name) {
            add_weight(&mut w, model, name, qw.clone())?;
            progress(done + 1, total);
            continue;
        }
        let t = prepared.weights.get(name).expect("listed");
        if let Some(shared) = model.sharing.get(name) {
            // One quantized copy, the source's: this weight keeps only its row scales.
            w.add_shared(name, t.shape[0], t.shape[1], &shared.of, &shared.row_scales);
        } else if t.shape.len() == 2 {
            let spec = recipe.spec.weights_for(name);
            let per_tensor = spec.granularity == oqt_core::quant::Granularity::PerTensor;
            let qw = if opts.clip_search && !per_tensor {
                // Rows are independent: split the search across threads.
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let chunk = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
                let parts: Vec<_> = t
                    .data
                    .par_chunks(chunk * cols)
                    .map(|part| quantize_weight_mse(part, part.len() / cols, cols, &spec).0)
                    .collect();
                QuantizedWeight::stack_rows(parts).expect("a weight has rows")
            } else if opts.clip_search {
                quantize_weight_mse(&t.data, t.shape[0], t.shape[1], &spec).0
            } else {
                quantize_weight(&t.data, t.shape[0], t.shape[1], &spec, 1.0)
            };
            add_weight(&mut w, model, name, qw)?;
        } else {
            w.add_f32(name, t.shape.clone(), &t.data);
        }
        progress(done + 1, total);
    }
    Ok(w)
}
