//! LoRA fine-tuning on a frozen quantized base (QLoRA-style): the base's
//! decoder linears stay on their integer grid — a bundle's own integers, or
//! the recipe's grid applied to a float model — and compute through the
//! recipe's activation quantizers; only the adapter's `A`/`B` train, in f32,
//! first-order (backprop, AdamW) or zeroth-order (SPSA on the adapter only,
//! ZeroQAT's machinery: checkpoints, resume, keep-best). The adapter is
//! written in PEFT's layout and optionally as a llama.cpp GGUF adapter.

use crate::qat::job::device;
use crate::qat::job::{Resumed, resume_run, training_tokens};
use crate::qat::model::QatModel;
use crate::qat::{CheckpointState, QatObserver, QatOutcome, default_checkpoint_dir, restore_checkpoint};
use oqt_core::bundle::Bundle;
use oqt_core::lora::{LoraAdapter, LoraModule};
use oqt_core::quant::{ActGrid, QatStep, QuantizedWeight, Recipe};
use oqt_core::weights::{ModelWeights, TensorF32};
use oqt_core::{CoreError, LlamaConfig, Result};
use oqt_model::hooks::Proj;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The adapter to train: a fresh one of this shape, or one to continue.
#[derive(Debug, Clone)]
pub enum AdapterStart<'a> {
    Fresh {
        rank: usize,
        alpha: f32,
        modules: &'a [LoraModule],
    },
    /// A PEFT adapter directory.
    From(&'a Path),
}

/// What to train and where it goes.
pub struct LoraJob<'a> {
    /// A quantized bundle, or (with `recipe`) a float model's file.
    pub base: &'a Path,
    /// How the user named the base (recorded in the adapter and checkpoints).
    pub base_label: &'a str,
    /// For a float base: the recipe whose grid and activation quantizers the base is frozen on.
    pub recipe: Option<&'a Recipe>,
    pub adapter: AdapterStart<'a>,
    pub options: &'a QatStep,
    /// The PEFT adapter directory to write.
    pub output: &'a Path,
    /// Also write a llama.cpp GGUF adapter here.
    pub gguf: Option<&'a Path>,
    pub checkpoint_dir: Option<PathBuf>,
    pub resume: Option<&'a Path>,
}

pub struct LoraReport {
    pub outcome: QatOutcome,
    pub method: &'static str,
    pub checkpoint_dir: PathBuf,
    pub interrupted: bool,
    /// Trainable values (the adapter's).
    pub trainable: usize,
    pub rank: usize,
    pub modules: Vec<LoraModule>,
}

fn err(msg: String) -> CoreError {
    CoreError::Other(msg)
}

/// A frozen quantized base, ready for [`QatModel::new_lora`].
pub struct FrozenBase {
    pub config: LlamaConfig,
    pub tokenizer: oqt_core::Tokenizer,
    pub recipe: Recipe,
    /// Everything but the decoder linears (those hold 1 × 1 placeholders).
    pub weights: ModelWeights,
    pub frozen: Vec<Vec<QuantizedWeight>>,
    pub grids: Option<BTreeMap<String, ActGrid>>,
    /// The model's name (PEFT's `base_model_name_or_path`).
    pub name: String,
}

/// The recipe a bundle was made with (its provenance; under a size budget, the planned one).
pub fn bundle_recipe(bundle: &Bundle) -> Result<Recipe> {
    let stored = bundle
        .manifest
        .provenance
        .recipe
        .clone()
        .ok_or_else(|| CoreError::Missing {
            path: bundle.path.clone(),
            what: "manifest field",
            name: "provenance.recipe (a float bundle has no grid to freeze on: pass --recipe with the float model)"
                .into(),
        })?;
    let recipe: Recipe = serde_json::from_value(stored).map_err(|e| CoreError::BadField {
        path: bundle.path.clone(),
        field: "provenance.recipe".into(),
        expected: "a recipe".into(),
        found: e.to_string(),
    })?;
    let problems = recipe.spec.problems();
    if let Some(p) = problems.first() {
        return Err(err(format!("{}: provenance.recipe: {p}", bundle.path.display())));
    }
    Ok(recipe)
}

/// The base a LoRA run freezes: a quantized bundle's own integers (and its
/// static grids), or a float model put on `recipe`'s grid.
pub fn frozen_base(path: &Path, recipe: Option<&Recipe>) -> Result<FrozenBase> {
    let is_bundle = matches!(oqt_core::load::detect_format(path)?, oqt_core::ModelFormat::Bundle);
    let bundle = if is_bundle { Some(Bundle::open(path)?) } else { None };
    match (bundle, recipe) {
        (Some(b), None) if b.manifest.provenance.recipe.is_some() => from_bundle(&b),
        (Some(b), Some(_)) if b.manifest.provenance.recipe.is_some() => Err(err(format!(
            "{}: the base is already quantized (recipe `{}`): drop --recipe, the bundle's own grid is kept",
            path.display(),
            b.manifest.recipe_name().unwrap_or("?")
        ))),
        (_, None) => Err(err(format!(
            "{}: a float base needs --recipe (the grid and activation quantizers it is frozen on, e.g. w4a8-dyn)",
            path.display()
        ))),
        (_, Some(recipe)) => from_float(path, recipe),
    }
}

fn decoder_linear(name: &str, n_layers: usize) -> Option<(usize, usize)> {
    (0..n_layers).find_map(|l| {
        Proj::PER_LAYER
            .iter()
            .position(|p| p.weight_name(l) == name)
            .map(|i| (l, i))
    })
}

fn from_bundle(b: &Bundle) -> Result<FrozenBase> {
    if let Some(name) = b.first_shared() {
        return Err(err(format!(
            "{}: `{name}` shares another block's weights; LoRA on shared blocks is not supported yet",
            b.path.display()
        )));
    }
    let recipe = bundle_recipe(b)?;
    let cfg = b.manifest.config.clone();
    let n = cfg.num_layers;
    let mut frozen: Vec<Vec<Option<QuantizedWeight>>> = vec![vec![None; Proj::PER_LAYER.len()]; n];
    let mut weights = ModelWeights::default();
    for (name, encoding) in &b.manifest.deployment.tensors {
        match decoder_linear(name, n) {
            Some((l, i)) => {
                let is_plain_grid = encoding.int_grid().is_some()
                    && !matches!(encoding, oqt_core::encoding::TensorEncoding::Lut { .. });
                if !is_plain_grid {
                    return Err(CoreError::Unsupported {
                        path: b.path.clone(),
                        what: "LoRA base",
                        detail: format!(
                            "`{name}` is stored as {}; a LoRA base keeps its decoder linears on an integer grid — fine-tune the float model with --recipe",
                            encoding.describe()
                        ),
                    });
                }
                frozen[l][i] = Some(b.quantized(name)?);
                weights.insert(name.clone(), TensorF32::new(vec![1, 1], vec![0.0]), "frozen");
            }
            None => {
                let data = match encoding.int_grid() {
                    Some(_) => oqt_core::quant::dequantize_weight(&b.quantized(name)?),
                    None => b.f32_tensor(name)?,
                };
                weights.insert(name.clone(), TensorF32::new(encoding.shape(), data), "F32");
            }
        }
    }
    let frozen = collect_frozen(frozen, &b.path)?;
    weights.validate_except(&cfg, &b.path, |name| decoder_linear(name, n).is_some())?;
    let grids = (recipe.spec.activations.mode == oqt_core::quant::ActMode::Static)
        .then(|| b.manifest.deployment.act_grids.clone());
    Ok(FrozenBase {
        tokenizer: b.tokenizer()?,
        name: b.manifest.model_name.clone(),
        config: cfg,
        recipe,
        weights,
        frozen,
        grids,
    })
}

fn collect_frozen(frozen: Vec<Vec<Option<QuantizedWeight>>>, path: &Path) -> Result<Vec<Vec<QuantizedWeight>>> {
    frozen
        .into_iter()
        .enumerate()
        .map(|(l, row)| {
            row.into_iter()
                .zip(Proj::PER_LAYER)
                .map(|(q, p)| {
                    q.ok_or_else(|| CoreError::Missing {
                        path: path.to_path_buf(),
                        what: "tensor",
                        name: p.weight_name(l),
                    })
                })
                .collect()
        })
        .collect()
}

fn from_float(path: &Path, recipe: &Recipe) -> Result<FrozenBase> {
    if recipe.spec.activations.mode == oqt_core::quant::ActMode::Static {
        return Err(err(format!(
            "recipe `{}` has static activation grids: quantize first (`oqt quantize --recipe {}`) and fine-tune that bundle",
            recipe.name, recipe.name
        )));
    }
    let model = oqt_core::load_model(path)?;
    if let Some(name) = model.sharing.keys().next() {
        return Err(err(format!(
            "{}: `{name}` shares another block's weights; LoRA on shared blocks is not supported yet",
            path.display()
        )));
    }
    let mut freeze = crate::qat::model::FreezeLinears::new(&recipe.spec, &model.config, path);
    for (name, t, source) in model.weights.into_tensors() {
        freeze.add(&name, t, source)?;
    }
    let (weights, frozen) = freeze.finish()?;
    Ok(FrozenBase {
        config: model.config,
        tokenizer: model.tokenizer,
        recipe: recipe.clone(),
        weights,
        frozen,
        grids: None,
        name: model.name,
    })
}

/// The LoRA model on `base` with `adapter` (first-order: on an autodiff device).
pub fn lora_model(base: FrozenBase, adapter: &LoraAdapter, autodiff: bool) -> Result<QatModel> {
    let device = device(autodiff)?;
    let llama = oqt_model::llama_from_weights(&base.config, base.weights, &device);
    QatModel::new_lora(llama, base.recipe.spec, base.frozen, base.grids.as_ref(), adapter)
}

/// The trainer's options for a LoRA run: [`crate::qat::job::qat_options`]
/// with LoRA's default learning rates (its factors start at PEFT's scale,
/// not at a quantizer's): 1e-3 first-order (AdamW), 1e-4 zeroth-order.
pub fn lora_options(s: &QatStep) -> Result<crate::qat::QatOptions> {
    let mut options = crate::qat::job::qat_options(s)?;
    if s.lr.is_none() {
        options.spsa.lr = if s.zeroth_order { 1e-4 } else { 1e-3 };
    }
    Ok(options)
}

/// Train as `job` says and write the adapter (unless interrupted).
pub fn run(job: &LoraJob<'_>, observer: &mut dyn QatObserver) -> Result<LoraReport> {
    let s = job.options;
    if s.distill > 0.0 {
        return Err(err(
            "--distill is not offered for LoRA yet: the adapter trains on the text's cross-entropy".into(),
        ));
    }
    if s.lightweight {
        return Err(err(
            "--lightweight does not apply to LoRA: only the adapter trains".into()
        ));
    }
    let base = frozen_base(job.base, job.recipe)?;
    let adapter = match job.adapter {
        AdapterStart::Fresh { rank, alpha, modules } => {
            LoraAdapter::init(&base.config, rank, alpha, modules, s.seed, &base.name).map_err(err)?
        }
        AdapterStart::From(dir) => {
            let a = LoraAdapter::read_peft(dir)?;
            a.check_base(&base.config, &dir.join(oqt_core::lora::PEFT_WEIGHTS_FILE))?;
            a
        }
    };
    let options = lora_options(s)?;
    let recipe_name = base.recipe.name.clone();
    // The adapter's shape is part of what a checkpoint continues: a resume
    // with another rank, α or target set is refused, not silently mixed.
    let start = format!(
        "{} (LoRA rank {}, alpha {}, {})",
        job.base_label,
        adapter.rank,
        adapter.alpha,
        adapter
            .modules
            .iter()
            .map(|m| m.peft_name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let Resumed {
        next_step: start_step,
        best,
        options,
    } = resume_run(job.resume, options, s.zeroth_order, |r, saved| {
        if saved.recipe != recipe_name || saved.start != start {
            return Err(err(format!(
                "{}: checkpoint of a LoRA run on `{}` ({}), not on `{start}` ({recipe_name})",
                r.display(),
                saved.start,
                saved.recipe
            )));
        }
        Ok(())
    })?;
    let (_, tokens) = training_tokens(&base.tokenizer, s)?;
    let (rank, modules) = (adapter.rank, adapter.modules.clone());
    let cfg = base.config.clone();
    let mut model = lora_model(base, &adapter, !s.zeroth_order)?;
    let layers = s.train_layers(model.llama.n_layers(), |f| f.to_string())?;
    if layers.len() < model.llama.n_layers() {
        model.train_only_layers(&layers)?;
    }
    if let Some(r) = job.resume {
        restore_checkpoint(r, &mut model)?;
    }
    let trainable = crate::qat::zeroqat::ZoTrainable::tensor_sizes(&model).iter().sum();
    let ckpt_dir = job
        .resume
        .map(Path::to_path_buf)
        .or(job.checkpoint_dir.clone())
        .unwrap_or_else(|| default_checkpoint_dir(job.output));
    let state = CheckpointState {
        next_step: start_step,
        options: options.clone(),
        recipe: recipe_name,
        start,
        best,
    };
    let phase = if s.zeroth_order {
        "lora (zeroth-order)"
    } else {
        "lora (first-order)"
    };
    let (model, outcome) = crate::qat::job::train(
        model,
        &tokens,
        &options,
        s.zeroth_order,
        (&ckpt_dir, &state),
        None,
        None,
        phase,
        observer,
    )?;
    let method = if s.zeroth_order {
        "lora-zeroth-order"
    } else {
        "lora-first-order"
    };
    let report = LoraReport {
        interrupted: outcome.interrupted,
        outcome,
        method,
        checkpoint_dir: ckpt_dir,
        trainable,
        rank,
        modules,
    };
    if report.interrupted {
        return Ok(report);
    }
    let trained = model.adapter().expect("a LoRA model");
    // Check the GGUF first: nothing is written unless both can be.
    if let Some(g) = job.gguf {
        trained.write_gguf(&cfg, g)?;
    }
    trained.write_peft(job.output)?;
    Ok(report)
}

/// Merge `adapter` into the quantized bundle `base` as a new bundle: each
/// adapted linear's dequantized weight plus `s·B·A`, re-quantized with the
/// base's own recipe (RTN on its grid); every other tensor keeps the base's
/// integers and the static grids stay the base's. What the merge costs in
/// quality is the difference between running the adapter unmerged and
/// running this bundle (`oqt merge` reports it).
pub fn merge(base: &Path, adapter: &LoraAdapter, adapter_path: &Path, output: &Path, created_by: &str) -> Result<()> {
    let b = Bundle::open(base)?;
    if b.manifest.provenance.recipe.is_none() {
        return Err(err(format!(
            "{}: a float bundle; merge the adapter into float weights with a recipe instead (quantize after merging)",
            base.display()
        )));
    }
    // The same checks as training's base: plain integer grids, no shared blocks.
    let frozen = from_bundle(&b)?;
    if let Some((name, _)) = b
        .manifest
        .deployment
        .tensors
        .iter()
        .find(|(_, e)| matches!(e, oqt_core::encoding::TensorEncoding::Sparse { .. }))
    {
        return Err(CoreError::Unsupported {
            path: b.path.clone(),
            what: "merge base",
            detail: format!(
                "`{name}` is sparse; merging would store it dense — apply the adapter unmerged (--adapter) instead"
            ),
        });
    }
    let recipe = frozen.recipe;
    let cfg = b.manifest.config.clone();
    adapter.check_base(&cfg, adapter_path)?;
    let adapted: std::collections::BTreeSet<String> = adapter.pairs.keys().map(|&(l, m)| m.weight_name(l)).collect();
    let mut weights = ModelWeights::default();
    let mut quantized = BTreeMap::new();
    for (name, encoding) in &b.manifest.deployment.tensors {
        let on_grid = encoding.int_grid().is_some();
        if on_grid && !adapted.contains(name) {
            quantized.insert(name.clone(), b.quantized(name)?);
            continue;
        }
        let mut data = match on_grid {
            true => oqt_core::quant::dequantize_weight(&b.quantized(name)?),
            false => b.f32_tensor(name)?,
        };
        if let Some(&(l, m)) = adapter.pairs.keys().find(|&&(l, m)| m.weight_name(l) == *name) {
            adapter.merge_into(l, m, &mut data);
        }
        weights.insert(name.clone(), TensorF32::new(encoding.shape(), data), "F32");
    }
    let model = oqt_core::LoadedModel {
        path: base.to_path_buf(),
        format: oqt_core::ModelFormat::Bundle,
        name: b.manifest.model_name.clone(),
        config: cfg,
        weights: ModelWeights::default(),
        tokenizer: b.tokenizer()?,
        sparsity: Default::default(),
        sharing: Default::default(),
    };
    let calibrated = match frozen.grids {
        Some(grids) => Some(crate::ptq::rtn::Calibrated {
            grids,
            input: oqt_core::bundle::InputRecord::of_file("start", base)?,
        }),
        None => None,
    };
    let mut writer = crate::ptq::rtn::assemble(
        &model,
        crate::ptq::rtn::Prepared {
            weights: &weights,
            quantized,
            method: "lora-merge".into(),
        },
        &recipe,
        crate::ptq::rtn::RtnOptions { clip_search: false },
        calibrated,
        created_by,
        |_, _| {},
    )?;
    let m = writer.manifest_mut();
    if !m.inputs.iter().any(|i| i.role == "start") {
        m.inputs.push(oqt_core::bundle::InputRecord::of_file("start", base)?);
    }
    m.inputs
        .push(oqt_core::bundle::InputRecord::of_file("adapter", adapter_path)?);
    m.provenance.training = Some(serde_json::json!({
        "method": "lora-merge",
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "targets": adapter.modules.iter().map(|m| m.peft_name()).collect::<Vec<_>>(),
    }));
    writer.write(output)
}
