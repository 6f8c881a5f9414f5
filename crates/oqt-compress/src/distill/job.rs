//! One `oqt distill` run: a teacher (any loadable model, or a bundle,
//! dequantized) teaches a student (a float, pruned-away-from or folded model,
//! or a quantized bundle trained through its recipe's fake quantizers) on
//! the teacher's top-k next-token distribution. The teacher's targets are
//! computed first and the teacher dropped; the student then trains
//! first-order (autodiff, AdamW) or zeroth-order (ZeroQAT's SPSA) on all its
//! decoder layers or the ones chosen, with the checkpoints, held-out
//! evaluation and keep-best of `oqt qat` — the same trainers.

use crate::distill::hidden::{HiddenTeacher, LayerMap};
use crate::qat::job::device;
use crate::qat::job::{Resumed, qat_options, resume_run, train, training_tokens};
use crate::qat::model::{FreezeLinears, QatModel};
use crate::qat::{
    CheckpointState, QatObserver, QatOutcome, default_checkpoint_dir, precompute_teacher, restore_checkpoint,
};
use oqt_core::bundle::{Bundle, BundleWriter, InputRecord, Manifest};
use oqt_core::encoding::TensorEncoding;
use oqt_core::load::{detect_format, load_float_bundle};
use oqt_core::quant::{ActMode, QatStep, Recipe};
use oqt_core::{CoreError, LoadedModel, ModelFormat, Result, Tokenizer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct DistillJob<'a> {
    pub teacher: &'a Path,
    pub student: &'a Path,
    /// Training options as `oqt qat` takes them; `distill` is the KL weight
    /// `w` in `(1 − w)·CE + w·KL` (1: distillation alone), `train` the layers.
    pub training: &'a QatStep,
    /// How an option is named in errors (`--train`, `steps[2].train`).
    pub option_name: &'a dyn Fn(&str) -> String,
    pub output: &'a Path,
    /// Default: the output path with `.ckpt`.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint (zeroth-order only).
    pub resume: Option<&'a Path>,
    pub created_by: &'a str,
    /// Where the teacher's targets are cached (`None`: not cached).
    pub targets_cache: Option<PathBuf>,
    /// Match the student's block outputs to the teacher's too (first-order).
    pub hidden: Option<HiddenOptions>,
}

/// Hidden-state matching: the loss term's weight and the student → teacher
/// block map (`None`: from the student's folding record, or the identity
/// when both have as many blocks).
#[derive(Debug, Clone)]
pub struct HiddenOptions {
    pub weight: f32,
    pub map: Option<LayerMap>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DistillReport {
    #[serde(skip)]
    pub outcome: QatOutcome,
    /// `float`, or the quantized student's recipe.
    pub student_kind: String,
    pub method: &'static str,
    pub trained_layers: Vec<usize>,
    pub student_blocks: usize,
    pub teacher_blocks: usize,
    /// Hidden-state matching: its weight and the (student, teacher) block pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_weight: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layer_map: Vec<(usize, usize)>,
    pub checkpoint_dir: PathBuf,
    pub interrupted: bool,
}

fn err(msg: String) -> CoreError {
    CoreError::Other(msg)
}

/// The student as it is stored.
// One value a run, moved once: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Student {
    Float(LoadedModel),
    Quantized { bundle: Bundle, recipe: Recipe },
}

impl Student {
    fn open(path: &Path) -> Result<Self> {
        if detect_format(path)? != ModelFormat::Bundle {
            return Ok(Self::Float(oqt_core::load_model(path)?));
        }
        let bundle = Bundle::open(path)?;
        let tensors = &bundle.manifest.deployment.tensors;
        if let Some(name) = tensors
            .iter()
            .find_map(|(n, e)| matches!(e, TensorEncoding::Lut { .. }).then_some(n))
        {
            return Err(err(format!(
                "{}: tensor `{name}` is palettized (lut); distillation trains float weights or integer grids, not palettes",
                path.display()
            )));
        }
        let quantized = tensors.values().any(|e| e.int_grid().is_some());
        if let Some(name) = bundle.first_shared()
            && quantized
        {
            return Err(err(format!(
                "{}: `{name}` shares another block's weights in a quantized bundle; its fake-quantized training copy would not be the deployed one — distill the float model before quantizing",
                path.display()
            )));
        }
        if !quantized {
            let model = load_float_bundle(path)?;
            if let Some(name) = model.sparsity.keys().next() {
                return Err(err(format!(
                    "{}: `{name}` is pruned (sparse); training would refill its zeros — distill the dense model, then prune",
                    path.display()
                )));
            }
            return Ok(Self::Float(model));
        }
        let stored = bundle.manifest.provenance.recipe.clone().ok_or_else(|| {
            err(format!(
                "{}: a quantized bundle without its recipe (provenance.recipe); it cannot be trained through its quantizers",
                path.display()
            ))
        })?;
        let recipe: Recipe = serde_json::from_value(stored)
            .map_err(|e| err(format!("{}: provenance.recipe: not a recipe ({e})", path.display())))?;
        Ok(Self::Quantized { bundle, recipe })
    }

    fn config(&self) -> &oqt_core::LlamaConfig {
        match self {
            Self::Float(m) => &m.config,
            Self::Quantized { bundle, .. } => &bundle.manifest.config,
        }
    }

    fn kind(&self) -> String {
        match self {
            Self::Float(_) => "float".into(),
            Self::Quantized { recipe, .. } => recipe.name.clone(),
        }
    }
}

/// The teacher's float weights: a model file or directory, or any bundle dequantized.
pub fn load_teacher(path: &Path) -> Result<LoadedModel> {
    if detect_format(path)? != ModelFormat::Bundle {
        return oqt_core::load_model(path);
    }
    oqt_core::load::load_dequantized_bundle(path)
}

/// Teacher and student must score the same tokens: same vocabulary size and
/// the same string for every token id.
pub fn check_same_vocabulary(teacher: (&Path, &Tokenizer, usize), student: (&Path, &Tokenizer, usize)) -> Result<()> {
    let ((tp, tt, tv), (sp, st, sv)) = (teacher, student);
    if tv != sv || tt.vocab_size() != st.vocab_size() {
        return Err(err(format!(
            "teacher {} has a vocabulary of {tv} tokens ({} in its tokenizer), student {} of {sv} ({}): distillation needs the same tokenizer",
            tp.display(),
            tt.vocab_size(),
            sp.display(),
            st.vocab_size()
        )));
    }
    for id in 0..tt.vocab_size() as u32 {
        let (a, b) = (tt.token_str(id), st.token_str(id));
        if a != b {
            return Err(err(format!(
                "teacher {} and student {} have different tokenizers: token {id} is {a:?} in the teacher, {b:?} in the student",
                tp.display(),
                sp.display()
            )));
        }
    }
    Ok(())
}

/// A student with shared blocks trains only blocks outside every sharing
/// pair (tying trained weights is not built): the shared weights and their
/// sources stay as they are and are written shared again.
fn check_shared_frozen(
    path: &Path,
    sharing: &BTreeMap<String, oqt_core::sharing::SharedWeight>,
    layers: &[usize],
    option: &str,
) -> Result<()> {
    use crate::fold::remove::layer_of;
    for (name, shared) in sharing {
        for n in [name.as_str(), shared.of.as_str()] {
            if let Some((l, _)) = layer_of(n)
                && layers.contains(&l)
            {
                return Err(err(format!(
                    "{}: block {l} is in a sharing pair (`{name}` uses `{}`), and training shared weights is not supported yet: choose {option} without it (e.g. last:N past the shared blocks)",
                    path.display(),
                    shared.of
                )));
            }
        }
    }
    Ok(())
}

/// The block map of a student with no explicit one: a folded bundle's kept
/// blocks paired with their places before folding; a student as deep as the
/// teacher, the identity.
fn auto_layer_map(student: &Path, student_blocks: usize, teacher_blocks: usize) -> Result<LayerMap> {
    let folding = match detect_format(student)? {
        ModelFormat::Bundle => Bundle::open(student)?.manifest.provenance.folding,
        _ => None,
    };
    if let Some(f) = folding {
        let removed: Vec<usize> = serde_json::from_value(f["removed"].clone())
            .map_err(|e| err(format!("{}: provenance.folding.removed: {e}", student.display())))?;
        let before = f["blocks_before"].as_u64().unwrap_or(0) as usize;
        if before == teacher_blocks && before - removed.len() == student_blocks {
            return Ok(LayerMap::folded(teacher_blocks, &removed));
        }
    }
    if student_blocks == teacher_blocks {
        return Ok(LayerMap::folded(teacher_blocks, &[]));
    }
    Err(err(format!(
        "{}: {student_blocks} blocks against the teacher's {teacher_blocks}, and no folding record that pairs them: give --layer-map STUDENT:TEACHER,…",
        student.display()
    )))
}

/// Distill as `job` says and write the student (unless interrupted).
pub fn run(job: &DistillJob<'_>, observer: &mut dyn QatObserver) -> Result<DistillReport> {
    let s = job.training;
    if !(s.distill > 0.0 && s.distill <= 1.0) {
        return Err(err(format!(
            "{} {}: the KL weight must lie in (0, 1] (1: distillation alone)",
            (job.option_name)("distill"),
            s.distill
        )));
    }
    let student = Student::open(job.student)?;
    let n_student = student.config().num_layers;
    let layers = s.train_layers(n_student, job.option_name)?;
    if let Student::Float(m) = &student {
        check_shared_frozen(&m.path, &m.sharing, &layers, &(job.option_name)("train"))?;
    }
    if s.lightweight && matches!(student, Student::Float(_)) {
        return Err(err(format!(
            "--lightweight trains a quantized student's quantizer-facing parameters; {} is a float model",
            job.student.display()
        )));
    }
    let kind = student.kind();
    let start = job.student.display().to_string();
    let Resumed {
        next_step: start_step,
        best,
        options,
    } = resume_run(job.resume, qat_options(s)?, s.zeroth_order, |r, saved| {
        if saved.recipe != kind || saved.start != start {
            return Err(err(format!(
                "{}: checkpoint of a `{}` student from `{}`, not `{kind}` from `{start}`",
                r.display(),
                saved.recipe,
                saved.start
            )));
        }
        Ok(())
    })?;

    // The teacher first: its targets for every batch, then it is dropped.
    let (student_tokenizer, student_path) = match &student {
        Student::Float(m) => (m.tokenizer.clone(), m.path.clone()),
        Student::Quantized { bundle, .. } => (bundle.tokenizer()?, bundle.path.clone()),
    };
    let teacher = load_teacher(job.teacher)?;
    check_same_vocabulary(
        (job.teacher, &teacher.tokenizer, teacher.config.vocab_size),
        (job.student, &student_tokenizer, student.config().vocab_size),
    )?;
    let teacher_blocks = teacher.config.num_layers;
    let layer_map = match &job.hidden {
        None => None,
        Some(h) => {
            if !(h.weight > 0.0 && h.weight.is_finite()) {
                return Err(err(format!(
                    "{} {}: the hidden-state weight must be positive",
                    (job.option_name)("hidden-weight"),
                    h.weight
                )));
            }
            let map = match &h.map {
                Some(m) => m.clone(),
                None => auto_layer_map(job.student, n_student, teacher_blocks)?,
            };
            map.check(n_student, teacher_blocks)
                .map_err(|e| err(format!("{}: {e}", (job.option_name)("layer-map"))))?;
            Some(map)
        }
    };
    let teacher_record = job
        .teacher
        .is_file()
        .then(|| InputRecord::of_file("teacher", job.teacher))
        .transpose()?;
    let (data, tokens) = training_tokens(&student_tokenizer, s)?;
    let (targets, hidden_teacher) = {
        let cpu = device(false)?;
        let llama = oqt_model::llama_from_weights(&teacher.config, teacher.weights, &cpu);
        let key = teacher_record.as_ref().map(|r| crate::distill::cache::TargetsKey {
            teacher_sha256: r.sha256.clone(),
            tokens_sha256: crate::distill::cache::TargetsKey::tokens_sha256(&tokens.train),
            seed: options.spsa.seed,
            batch: options.batch,
            seq_len: options.seq_len,
            top_k: options.distill_top_k,
            vocab_size: teacher.config.vocab_size,
        });
        let cached = match (&job.targets_cache, &key) {
            (Some(dir), Some(key)) => {
                let path = key.path_in(dir);
                match crate::distill::cache::load(&path, key, start_step..options.steps) {
                    Ok(t) => t.map(|t| (t, path)),
                    Err(e) => {
                        tracing::warn!(%e, "teacher targets cache unreadable: computing them again");
                        None
                    }
                }
            }
            _ => None,
        };
        let targets = match cached {
            Some((t, path)) => {
                tracing::info!(path = %path.display(), "teacher targets from the cache");
                t
            }
            None => {
                observer.phase("teacher targets", options.steps - start_step);
                let t = precompute_teacher(&llama, &tokens, &options, start_step, |d, _| observer.advance(d))?;
                if let (Some(dir), Some(key)) = (&job.targets_cache, &key)
                    && let Err(e) = crate::distill::cache::store(&key.path_in(dir), key, &t)
                {
                    tracing::warn!(%e, "teacher targets not cached");
                }
                t
            }
        };
        // Hidden-state targets come from the teacher at every step: it stays.
        let hidden = layer_map.clone().map(|map| HiddenTeacher {
            model: llama,
            map,
            weight: job.hidden.as_ref().expect("a map only with options").weight,
        });
        (targets, hidden)
    };

    // The student.
    let device = device(!s.zeroth_order)?;
    let (mut qat, meta, recipe, grids) = match student {
        Student::Float(mut m) => {
            let weights = std::mem::take(&mut m.weights);
            weights.validate(&m.config, &m.path)?;
            let llama = oqt_model::llama_from_weights(&m.config, weights, &device);
            (QatModel::new_float(llama)?, m, None, None)
        }
        Student::Quantized { bundle, recipe } => {
            let config = bundle.manifest.config.clone();
            let grids =
                (recipe.spec.activations.mode == ActMode::Static).then(|| bundle.manifest.deployment.act_grids.clone());
            let qat = if s.lightweight {
                let mut freeze = FreezeLinears::new(&recipe.spec, &config, &bundle.path);
                bundle.for_each_dequantized(|n, t, src| freeze.add(n, t, src))?;
                let (weights, frozen) = freeze.finish()?;
                let llama = oqt_model::llama_from_weights(&config, weights, &device);
                QatModel::new_frozen(llama, recipe.spec.clone(), frozen, grids.as_ref())?
            } else {
                let weights = bundle.dequantized_weights()?;
                weights.validate(&config, &bundle.path)?;
                let llama = oqt_model::llama_from_weights(&config, weights, &device);
                QatModel::new(llama, recipe.spec.clone(), grids.as_ref())?
            };
            let meta = LoadedModel {
                path: student_path.clone(),
                format: ModelFormat::Bundle,
                name: bundle.manifest.model_name.clone(),
                config,
                weights: Default::default(),
                tokenizer: student_tokenizer.clone(),
                sparsity: Default::default(),
                sharing: Default::default(),
            };
            (qat, meta, Some(recipe), grids)
        }
    };
    if layers.len() < n_student {
        qat.train_only_layers(&layers)?;
    }
    if let Some(r) = job.resume {
        restore_checkpoint(r, &mut qat)?;
    }
    let ckpt_dir = job
        .resume
        .map(Path::to_path_buf)
        .or(job.checkpoint_dir.clone())
        .unwrap_or_else(|| default_checkpoint_dir(job.output));
    let state = CheckpointState {
        next_step: start_step,
        options: options.clone(),
        recipe: kind.clone(),
        start,
        best,
    };
    let phase = if s.zeroth_order {
        "distill (zeroth-order)"
    } else {
        "distill (first-order)"
    };
    let (qat, outcome) = train(
        qat,
        &tokens,
        &options,
        s.zeroth_order,
        (&ckpt_dir, &state),
        Some(&targets),
        hidden_teacher.as_ref(),
        phase,
        observer,
    )?;
    drop((targets, hidden_teacher));
    let method = match (s.zeroth_order, s.lightweight) {
        (true, false) => "distill-zeroth-order",
        (true, true) => "distill-zeroth-order-lightweight",
        (false, false) => "distill-first-order",
        (false, true) => "distill-first-order-lightweight",
    };
    let report = |outcome: QatOutcome, interrupted: bool| DistillReport {
        outcome,
        student_kind: kind.clone(),
        method,
        trained_layers: layers.clone(),
        student_blocks: n_student,
        teacher_blocks,
        hidden_weight: job.hidden.as_ref().map(|h| h.weight),
        layer_map: layer_map.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
        checkpoint_dir: ckpt_dir.clone(),
        interrupted,
    };
    if outcome.interrupted {
        return Ok(report(outcome, true));
    }

    let trained = qat.into_trained(&BTreeMap::new());
    let training = serde_json::json!({
        "method": method,
        "options": options,
        "trained_layers": layers,
        "steps_run": outcome.next_step,
        "held_out_perplexity": outcome.evals,
        "kept": outcome.best,
        "dataset": data.name,
        "teacher": job.teacher.display().to_string(),
    });
    let mut writer = match recipe {
        None => {
            let mut manifest = Manifest::for_model(&meta, job.created_by)?;
            manifest.provenance = Bundle::open(&meta.path)
                .map(|b| b.manifest.provenance)
                .unwrap_or_default();
            manifest.provenance.method = Some(method.into());
            let mut w = BundleWriter::new(manifest);
            for (name, t, _) in trained.weights.into_tensors() {
                // Shared blocks were frozen: they stay their source, row-scaled.
                match meta.sharing.get(&name) {
                    Some(s) => w.add_shared(&name, t.shape[0], t.shape[1], &s.of, &s.row_scales),
                    None => w.add_f32(&name, t.shape.clone(), &t.data),
                }
            }
            w
        }
        Some(recipe) => {
            let start_record = InputRecord::of_file("start", &meta.path)?;
            let calibrated = match (trained.act_grids, grids) {
                (Some(g), Some(_)) => Some(crate::ptq::rtn::Calibrated {
                    grids: g,
                    input: start_record.clone(),
                }),
                _ => None,
            };
            let has_start = calibrated.is_some();
            let mut meta = meta;
            meta.weights = trained.weights;
            let mut w = crate::ptq::rtn::assemble(
                &meta,
                crate::ptq::rtn::Prepared {
                    weights: &meta.weights,
                    quantized: trained.quantized,
                    method: method.into(),
                },
                &recipe,
                crate::ptq::rtn::RtnOptions { clip_search: false },
                calibrated,
                job.created_by,
                |_, _| {},
            )?;
            if !has_start {
                w.manifest_mut().inputs.push(start_record);
            }
            w
        }
    };
    let m = writer.manifest_mut();
    m.inputs.push(InputRecord::of_file("training", &data.path)?);
    m.inputs.extend(teacher_record);
    m.provenance.training = Some(training);
    writer.write(job.output)?;
    Ok(report(outcome, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_student_trains_only_outside_its_pairs() {
        let mut sharing = BTreeMap::new();
        sharing.insert(
            "model.layers.3.mlp.up_proj.weight".to_string(),
            oqt_core::sharing::SharedWeight {
                of: "model.layers.2.mlp.up_proj.weight".into(),
                row_scales: vec![1.0],
            },
        );
        let path = Path::new("s.oqt");
        assert!(check_shared_frozen(path, &sharing, &[0, 1, 4], "--train").is_ok());
        for trained in [vec![3], vec![2, 5]] {
            let e = check_shared_frozen(path, &sharing, &trained, "--train")
                .unwrap_err()
                .to_string();
            assert!(e.contains("is in a sharing pair") && e.contains("--train"), "{e}");
        }
    }
}
