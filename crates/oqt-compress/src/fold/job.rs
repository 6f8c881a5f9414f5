//! One `oqt fold` run: choose the blocks to remove under a budget, remove
//! them, and hand back a float bundle (not yet written) with the choice and
//! its scores in the provenance. Healing is `oqt distill`'s job.

use crate::fold::gates::{GateOptions, GateOutcome, learn_removal};
use crate::fold::share::{SharedBlock, choose_shared, shared_params_saved, tie_block};
use crate::fold::{block_influence, remove::remove_blocks};
use crate::ptq::Progress;
use crate::stats::calibrate::load_windows;
use oqt_core::bundle::{BundleWriter, InputRecord, Manifest};
use oqt_core::quant::CalibrationSpec;
use oqt_core::{CoreError, LoadedModel, Result};
use serde::Serialize;

/// How the removed blocks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoldMethod {
    /// Learned block gates (FoldGPT), seeded by Block Influence.
    Foldgpt,
    /// The blocks of lowest Block Influence (ShortGPT).
    Shortgpt,
    /// The last N blocks.
    LastN,
}

impl std::str::FromStr for FoldMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "foldgpt" => Ok(Self::Foldgpt),
            "shortgpt" => Ok(Self::Shortgpt),
            "last-n" => Ok(Self::LastN),
            other => Err(format!(
                "unknown fold method `{other}`; expected foldgpt, shortgpt or last-n"
            )),
        }
    }
}

impl std::fmt::Display for FoldMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Foldgpt => "foldgpt",
            Self::Shortgpt => "shortgpt",
            Self::LastN => "last-n",
        })
    }
}

/// The budget: blocks to remove, or the share of decoder parameters to remove.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoldBudget {
    Blocks(usize),
    /// In (0, 1): the fewest blocks whose removal reaches this share of the
    /// decoder's parameters.
    Fraction(f64),
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FoldOptions {
    pub method: FoldMethod,
    pub budget: FoldBudget,
    pub gates: GateOptions,
    /// Blocks (of those kept) that share the block before them's linears.
    pub share: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct FoldReport {
    pub method: FoldMethod,
    pub blocks_before: usize,
    /// Removed blocks, by their index in the model before folding.
    pub removed: Vec<usize>,
    /// Blocks that use the block before them's linears (indices after removal).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<SharedBlock>,
    /// Share of the decoder blocks' parameters removed (removed blocks, and
    /// shared blocks' linears less their row scales).
    pub decoder_params_removed: f64,
    pub params_before: usize,
    pub params_after: usize,
    /// Each block's Block Influence (every method computes it: it is cheap and explains the choice).
    pub influence: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gates: Option<GateOutcome>,
    pub seconds: f64,
}

pub struct FoldOutcome {
    pub writer: BundleWriter,
    pub report: FoldReport,
}

/// Parameters of decoder block `l` (linears and norms).
fn block_params(cfg: &oqt_core::LlamaConfig, l: usize) -> usize {
    let (h, q, kv) = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let bias = if cfg.attention_bias { q + 2 * kv } else { 0 };
    h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size_of(l) + bias + 2 * h
}

/// How many blocks `budget` removes from a model of `cfg`'s shape.
pub fn blocks_to_remove(cfg: &oqt_core::LlamaConfig, budget: FoldBudget) -> Result<usize> {
    let n = cfg.num_layers;
    let count = match budget {
        FoldBudget::Blocks(b) => b,
        FoldBudget::Fraction(f) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(CoreError::Other(format!(
                    "--budget {f}: the share of decoder parameters to remove must lie in (0, 1)"
                )));
            }
            let total: usize = (0..n).map(|l| block_params(cfg, l)).sum();
            let mean = total as f64 / n as f64;
            (f * total as f64 / mean).ceil() as usize
        }
    };
    if count >= n {
        return Err(CoreError::Other(format!(
            "the budget removes {count} of the model's {n} blocks: at least one must stay"
        )));
    }
    Ok(count)
}

/// Fold `model` as `opts` says, choosing with windows of `calibration`.
pub fn fold_to_bundle(
    model: &LoadedModel,
    opts: &FoldOptions,
    calibration: &CalibrationSpec,
    created_by: &str,
    progress: &mut dyn Progress,
) -> Result<FoldOutcome> {
    let t0 = std::time::Instant::now();
    let cfg = &model.config;
    let n = cfg.num_layers;
    let remove = blocks_to_remove(cfg, opts.budget)?;
    if remove == 0 && opts.share == 0 {
        return Err(CoreError::Other(
            "the budget removes no block and no block is shared: nothing to fold".into(),
        ));
    }
    if !model.sharing.is_empty() {
        return Err(CoreError::Other(format!(
            "{}: the model already shares blocks; fold the unshared model",
            model.path.display()
        )));
    }
    if !model.sparsity.is_empty() {
        return Err(CoreError::Other(format!(
            "{}: a pruned (sparse) model; fold the dense model, then prune",
            model.path.display()
        )));
    }
    let (data, windows) = load_windows(&model.tokenizer, calibration)?;
    let autodiff = opts.method == FoldMethod::Foldgpt;
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, autodiff)
        .map_err(|e| CoreError::Other(format!("selecting the CPU device: {e}")))?;
    let llama = oqt_model::llama_from_weights(cfg, model.weights.clone(), &device);
    progress.phase("block influence", 1);
    let influence = block_influence(&burn::module::Module::valid(&llama), &windows)?;
    progress.set(1);
    let mut gates = None;
    let removed = match opts.method {
        _ if remove == 0 => Vec::new(),
        FoldMethod::LastN => (n - remove..n).collect(),
        FoldMethod::Shortgpt => crate::fold::gates::lowest(&influence, remove),
        FoldMethod::Foldgpt => {
            progress.phase("block gates", opts.gates.rounds);
            let out = learn_removal(&llama, &windows, &influence, remove, &opts.gates, |d, _| {
                progress.set(d)
            })?;
            let r = out.removed.clone();
            gates = Some(out);
            r
        }
    };
    drop(llama);
    let (folded_cfg, mut weights) = remove_blocks(cfg, model.weights.clone(), &removed)?;
    let shared = if opts.share > 0 {
        // Scored against the model as folded so far, on the validation quarter.
        let n_val = (windows.len() / 4).max(1);
        progress.phase("block sharing", folded_cfg.num_layers - 1);
        choose_shared(
            &folded_cfg,
            &weights,
            &windows[windows.len() - n_val..],
            opts.share,
            opts.gates.top_k,
            |d, _| progress.set(d),
        )?
    } else {
        Vec::new()
    };
    let mut sharing = std::collections::BTreeMap::new();
    for s in &shared {
        sharing.extend(tie_block(&mut weights, s.source, s.block)?);
    }
    // Shared blocks' linears are gone too (their row scales stay).
    let shared_saved: usize = shared.iter().map(|s| shared_params_saved(&folded_cfg, s.block)).sum();
    let removed_params: usize = removed.iter().map(|&l| block_params(cfg, l)).sum::<usize>() + shared_saved;
    let decoder_params: usize = (0..n).map(|l| block_params(cfg, l)).sum();
    let folded = LoadedModel {
        path: model.path.clone(),
        format: model.format,
        name: model.name.clone(),
        config: folded_cfg.clone(),
        weights: Default::default(),
        tokenizer: model.tokenizer.clone(),
        sparsity: Default::default(),
        sharing: Default::default(),
    };
    let mut manifest = Manifest::for_model(&folded, created_by)?;
    manifest.provenance.method = Some(format!("fold-{}", opts.method));
    manifest.inputs.push(InputRecord::of_file("calibration", &data.path)?);
    if model.path.is_file() {
        manifest.inputs.push(InputRecord::of_file("model", &model.path)?);
    }
    let mut writer = BundleWriter::new(manifest);
    for (name, t, _) in weights.into_tensors() {
        match sharing.get(&name) {
            Some(s) => writer.add_shared(&name, t.shape[0], t.shape[1], &s.of, &s.row_scales),
            None => writer.add_f32(&name, t.shape.clone(), &t.data),
        }
    }
    let report = FoldReport {
        method: opts.method,
        blocks_before: n,
        removed,
        decoder_params_removed: removed_params as f64 / decoder_params as f64,
        params_before: cfg.n_params(),
        params_after: folded_cfg.n_params() - shared_saved,
        shared,
        influence,
        gates,
        seconds: t0.elapsed().as_secs_f64(),
    };
    writer.manifest_mut().provenance.folding =
        Some(serde_json::to_value(&report).map_err(|e| CoreError::Other(format!("folding report: {e}")))?);
    Ok(FoldOutcome { writer, report })
}
