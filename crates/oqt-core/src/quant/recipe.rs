//! Named recipes (`recipes/*.toml`): what to do to a model and how to check it.

use super::spec::QuantSpec;
use crate::error::{CoreError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// A training-role dataset name or a text file; never an evaluation set.
    pub dataset: String,
    /// Number of windows of `seq_len` tokens.
    pub samples: usize,
    pub seq_len: usize,
    /// How static activation ranges are taken from the calibration activations.
    #[serde(default)]
    pub act_range: ActRange,
    /// For `act_range = "percentile"`: the percentile kept at each end (e.g. 99.99
    /// keeps the 0.01st to 99.99th percentile of every calibration window, averaged).
    #[serde(default = "default_percentile")]
    pub percentile: f64,
}

/// How a static activation grid's range is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActRange {
    /// The extremes seen over all calibration windows (the head's input:
    /// narrowed to the least logit error, `oqt_compress::stats::calibrate`).
    #[default]
    Minmax,
    /// Per-window percentiles, averaged over the windows (ignores rare outliers).
    Percentile,
    /// The extremes, then every 8-bit decoder linear input's range (and the
    /// head's input at any width, as under `Minmax`) narrowed to the least
    /// output error of the weights that read it.
    Search,
}

impl std::str::FromStr for ActRange {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "minmax" => Ok(Self::Minmax),
            "percentile" => Ok(Self::Percentile),
            "search" => Ok(Self::Search),
            other => Err(format!("`{other}`: expected `minmax`, `percentile` or `search`")),
        }
    }
}

fn default_percentile() -> f64 {
    99.99
}

/// MobileQuant's optimization budget and learning rates (`[mobilequant]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MobileQuantSpec {
    /// Optimizer steps (one calibration window each, cycling): the time budget.
    pub steps: usize,
    /// Where the learned transformations start: `awq` (AWQ's searched scales,
    /// activation-aware) or `smoothquant` (the paper's, with `alpha`).
    pub init: TransformInit,
    /// SmoothQuant migration strength of the `smoothquant` initialisation.
    pub alpha: f32,
    /// Initial clip logit (σ(4) ≈ 0.982).
    pub clip_init: f32,
    /// `[start, end]` of the cosine schedule for the smoothing divisors.
    pub lr_smooth: [f64; 2],
    /// … for the clip logits.
    pub lr_clip: [f64; 2],
    /// … for the activation ranges, which are relative (log-scale and
    /// zero-point shift in units of the grid's span), so one rate fits 8- and
    /// 16-bit grids.
    pub lr_range: [f64; 2],
    /// Whether backward keeps the whole stack's graph (`off`) or recomputes
    /// one decoder layer at a time from its saved input (`per-layer`: one
    /// layer's graph in memory, one extra forward per step, same gradients);
    /// `auto` picks per-layer above 300 M decoder-linear parameters, where the
    /// whole graph (~5 weight-sized tensors per linear) would not fit in 24 GiB.
    pub checkpointing: Checkpointing,
    /// Outlier channel splitting of the down projection's input, before
    /// anything else: a channel whose calibration maximum exceeds this many
    /// times the layer's reference maximum (its 16th-largest channel, where
    /// the bulk begins) becomes as many exact copies as bring it under that
    /// threshold. `0` = off.
    pub split_down_ratio: f32,
    /// At most this many channels added to any one layer.
    pub split_down_max: usize,
    /// What the loss compares: the last decoder layer's output (`last-layer`,
    /// the paper's) or that output through the model's final RMSNorm
    /// (`final-norm`: what the head reads, every token at unit scale, so a
    /// few massive-activation values no longer dominate the mean), or the
    /// KL divergence of the next-token distributions through the float head
    /// (`logits-kl`: the metric's own quantity, one head product per step).
    pub loss: LayerLoss,
}

/// See [`MobileQuantSpec::loss`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerLoss {
    #[default]
    LastLayer,
    FinalNorm,
    /// KL divergence of the student's next-token distribution from the float
    /// model's, through the final norm and the float head.
    LogitsKl,
}

/// See [`MobileQuantSpec::checkpointing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Checkpointing {
    Auto,
    PerLayer,
    Off,
}

impl Default for MobileQuantSpec {
    fn default() -> Self {
        Self {
            steps: 100,
            init: TransformInit::Awq,
            alpha: 0.5,
            clip_init: 4.0,
            lr_smooth: [1e-3, 1e-4],
            lr_clip: [1e-2, 1e-3],
            lr_range: [1e-3, 1e-4],
            checkpointing: Checkpointing::Auto,
            split_down_ratio: 0.0,
            split_down_max: 256,
            loss: LayerLoss::LastLayer,
        }
    }
}

/// The starting point of MobileQuant's equivalent transformations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransformInit {
    Awq,
    Smoothquant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub dataset: String,
    pub ctx: usize,
    pub chunks: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    /// Where the result runs: `npu` (static integer graph), `cpu` (dynamic
    /// activations), `weight-only`, or `llama.cpp`.
    pub target: String,
    /// The method `oqt quantize` uses when `--method` is not given.
    pub default_method: String,
    pub spec: QuantSpec,
    pub calibration: CalibrationSpec,
    pub eval: EvalSpec,
    #[serde(default)]
    pub mobilequant: MobileQuantSpec,
    /// Automatic mixed precision under a size budget (`[mixed_precision]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<super::mixed_precision::MixedPrecisionSpec>,
    /// The pipeline (`[[steps]]`), run in order by `oqt run`; empty means one
    /// `quantize` step with `default_method` ([`Recipe::pipeline`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
}

/// One step of a recipe's pipeline: a kind and its options. Steps hand a
/// bundle to the next one; each step's result is kept, so a run resumes after
/// the last finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Step {
    /// Post-training quantization of the float model onto the recipe's grids.
    Quantize(QuantizeStep),
    /// Quantization-aware training through the recipe's fake quantizers,
    /// starting from the previous step's bundle.
    Qat(QatStep),
    /// Pruning of the float model (before `quantize`, which keeps its zeros).
    Prune(PruneStep),
    /// Palettization of the decoder linears (the `lut` encoding) of the float
    /// (or pruned) model; embedding, head and activations as the recipe's spec says.
    Cluster(ClusterStep),
    /// Removal of decoder blocks under a budget (FoldGPT, ShortGPT, last-N)
    /// of the float model, before `quantize`.
    Fold(FoldStep),
    /// Distillation from the float model into the previous step's bundle
    /// (folded, or quantized: trained through its grids); `distill` is the KL
    /// weight and must be > 0.
    Distill(QatStep),
    /// A LoRA adapter trained on the previous step's quantized bundle (its
    /// integers frozen), then merged into it and re-quantized with the
    /// recipe: quantize → lora → (export). The adapter itself is kept beside
    /// the step's bundle (`step-N-lora.adapter/`, PEFT files).
    Lora(LoraStep),
}

/// Options of a `lora` step: the adapter's shape and its training (a `qat`
/// step's options under `[steps.training]`; zeroth- or first-order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraStep {
    #[serde(default = "default_lora_rank")]
    pub rank: usize,
    #[serde(default = "default_lora_alpha")]
    pub alpha: f32,
    /// Linears adapted: `q,v`, `all`, … ([`crate::lora::LoraModule::parse_list`]).
    #[serde(default = "default_lora_targets")]
    pub targets: String,
    #[serde(default)]
    pub training: QatStep,
}

fn default_lora_rank() -> usize {
    8
}

fn default_lora_alpha() -> f32 {
    16.0
}

fn default_lora_targets() -> String {
    "q,v".into()
}

impl LoraStep {
    /// Problems with the options, each naming its field as `name(field)` renders it.
    pub fn problems(&self, name: impl Fn(&str) -> String) -> Vec<String> {
        let mut out = Vec::new();
        if self.rank == 0 {
            out.push(format!("{}: a LoRA rank must be at least 1", name("rank")));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            out.push(format!(
                "{}: expected a positive number, found {}",
                name("alpha"),
                self.alpha
            ));
        }
        if let Err(e) = crate::lora::LoraModule::parse_list(&self.targets) {
            out.push(format!("{}: {e}", name("targets")));
        }
        if self.training.distill != 0.0 || self.training.lightweight {
            out.push(format!(
                "{}: a LoRA step trains the adapter on cross-entropy only (no distill, no lightweight)",
                name("training")
            ));
        }
        out.extend(self.training.problems(|f| name(&format!("training.{f}"))));
        out
    }
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Quantize(_) => "quantize",
            Self::Qat(_) => "qat",
            Self::Prune(_) => "prune",
            Self::Cluster(_) => "cluster",
            Self::Fold(_) => "fold",
            Self::Distill(_) => "distill",
            Self::Lora(_) => "lora",
        }
    }
}

/// The `prune` step's methods (`oqt_compress::prune::PruneMethod` names).
pub const PRUNE_METHODS: &[&str] = &["magnitude", "wanda", "sparsegpt"];

/// What DSnoT's swaps are judged by (`oqt_compress::prune::dsnot::DsnotCriterion`).
pub const DSNOT_CRITERIA: &[&str] = &["expectation", "exact"];

/// `[[steps]] kind = "prune"`: the options of `oqt prune`, same names in
/// snake case, same defaults. Exactly one of `sparsity` and `nm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruneStep {
    /// `magnitude`, `wanda` or `sparsegpt`.
    pub method: String,
    /// Unstructured: the fraction of every decoder linear's weights zeroed, in (0, 1).
    pub sparsity: Option<f32>,
    /// N:M: keep N of every M consecutive inputs (`"2:4"`, `"4:8"`).
    pub nm: Option<String>,
    /// DSnoT prune-and-grow on top of the method's mask.
    pub dsnot: bool,
    /// DSnoT: swaps per row at most.
    pub dsnot_cycles: usize,
    /// DSnoT: a row stops when its expected error is within this.
    pub dsnot_threshold: f64,
    /// DSnoT on the MLP linears too (the authors leave them on the base mask).
    pub dsnot_mlp: bool,
    /// DSnoT: stop a row rather than flip its error's sign, on unstructured
    /// masks too (N:M always does).
    pub dsnot_sign_check: bool,
    /// DSnoT: input moments over unit-length token rows (robust to the few
    /// huge-norm tokens), not raw.
    pub dsnot_unit_rows: bool,
    /// DSnoT: `expectation` (the paper's first-moment error) or `exact` (the
    /// squared output error on the calibration inputs).
    pub dsnot_criterion: String,
}

impl Default for PruneStep {
    fn default() -> Self {
        Self {
            method: "wanda".into(),
            sparsity: None,
            nm: None,
            dsnot: false,
            dsnot_cycles: 50,
            dsnot_threshold: 0.1,
            dsnot_mlp: false,
            dsnot_sign_check: false,
            dsnot_unit_rows: false,
            dsnot_criterion: "expectation".into(),
        }
    }
}

impl PruneStep {
    /// `(n, m)` of an `"N:M"` string, checked (`0 < N < M ≤ 16`).
    pub fn parse_nm(s: &str) -> std::result::Result<(usize, usize), String> {
        let (n, m) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: expected N:M, e.g. 2:4"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}`: expected N:M with whole numbers, e.g. 2:4"))
        };
        let (n, m) = (parse(n)?, parse(m)?);
        if n == 0 || n >= m || m > crate::sparse::MAX_BLOCK {
            return Err(format!("`{s}`: expected 0 < N < M ≤ {}", crate::sparse::MAX_BLOCK));
        }
        Ok((n, m))
    }

    /// Problems with the options, each naming its field as `name(field)` renders it.
    pub fn problems(&self, name: impl Fn(&str) -> String) -> Vec<String> {
        let mut out = Vec::new();
        if !PRUNE_METHODS.contains(&self.method.as_str()) {
            out.push(format!(
                "{}: unknown method `{}`; expected one of {}",
                name("method"),
                self.method,
                PRUNE_METHODS.join(", ")
            ));
        }
        match (self.sparsity, &self.nm) {
            (Some(_), Some(_)) | (None, None) => out.push(format!(
                "{} or {}: give exactly one (unstructured or N:M)",
                name("sparsity"),
                name("nm")
            )),
            (Some(s), None) if !(s > 0.0 && s < 1.0) => out.push(format!(
                "{}: expected a fraction in (0, 1), found {s}",
                name("sparsity")
            )),
            (None, Some(nm)) => {
                if let Err(e) = Self::parse_nm(nm) {
                    out.push(format!("{}: {e}", name("nm")));
                }
            }
            _ => {}
        }
        if !DSNOT_CRITERIA.contains(&self.dsnot_criterion.as_str()) {
            out.push(format!(
                "{}: unknown criterion `{}`; expected one of {}",
                name("dsnot_criterion"),
                self.dsnot_criterion,
                DSNOT_CRITERIA.join(", ")
            ));
        }
        if !(self.dsnot_threshold >= 0.0 && self.dsnot_threshold.is_finite()) {
            out.push(format!(
                "{}: expected a number ≥ 0, found {}",
                name("dsnot_threshold"),
                self.dsnot_threshold
            ));
        }
        out
    }
}

/// The `cluster` step's methods.
pub const CLUSTER_METHODS: &[&str] = &["kmeans", "dkm", "edkm"];

/// The `fold` step's methods (`oqt_compress::fold::job::FoldMethod` names).
pub const FOLD_METHODS: &[&str] = &["foldgpt", "shortgpt", "last-n"];

/// `[[steps]] kind = "fold"`: the options of `oqt fold`, same names in snake
/// case, same defaults. Exactly one of `remove` (blocks) and `budget` (share
/// of decoder parameters), or `share` alone (blocks that use the block before
/// them's linears, row-scaled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoldStep {
    pub method: String,
    pub remove: Option<usize>,
    pub budget: Option<f64>,
    pub gate_rounds: usize,
    pub gate_proposals: usize,
    pub gate_windows: usize,
    pub share: usize,
}

impl Default for FoldStep {
    fn default() -> Self {
        Self {
            method: "foldgpt".into(),
            remove: None,
            budget: None,
            gate_rounds: 8,
            gate_proposals: 3,
            gate_windows: 4,
            share: 0,
        }
    }
}

impl FoldStep {
    /// Problems with the options, each naming its field as `name(field)` renders it.
    pub fn problems(&self, name: impl Fn(&str) -> String) -> Vec<String> {
        let mut out = Vec::new();
        if !FOLD_METHODS.contains(&self.method.as_str()) {
            out.push(format!(
                "{}: unknown method `{}`; expected one of {}",
                name("method"),
                self.method,
                FOLD_METHODS.join(", ")
            ));
        }
        match (self.remove, self.budget) {
            (None, None) if self.share > 0 => {}
            (Some(_), Some(_)) | (None, None) => out.push(format!(
                "exactly one of {} and {} (blocks, or a share of decoder parameters), or {} alone",
                name("remove"),
                name("budget"),
                name("share")
            )),
            (Some(0), _) if self.share == 0 => {
                out.push(format!("{}: remove at least one block (or share some)", name("remove")))
            }
            (_, Some(b)) if !(b > 0.0 && b < 1.0) => {
                out.push(format!("{}: expected a share in (0, 1), found {b}", name("budget")))
            }
            _ => {}
        }
        if self.gate_rounds == 0 || self.gate_proposals == 0 || self.gate_windows == 0 {
            out.push(format!(
                "{}, {} and {}: expected ≥ 1",
                name("gate_rounds"),
                name("gate_proposals"),
                name("gate_windows")
            ));
        }
        out
    }
}

/// Which decoder layers a training run trains (its final norm always does):
/// `all`, `last:N` (tail distillation) or a list such as `20,21,22`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrainLayers {
    All,
    Last(usize),
    List(Vec<usize>),
}

impl std::str::FromStr for TrainLayers {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}`: expected `all`, `last:N` or layer indices such as `20,21,22`");
        if s == "all" {
            return Ok(Self::All);
        }
        if let Some(n) = s.strip_prefix("last:") {
            return n.parse().map(Self::Last).map_err(|_| bad());
        }
        s.split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Self::List)
            .map_err(|_| bad())
    }
}

impl TrainLayers {
    /// The layer indices of a model with `n` blocks, checked; `what` names
    /// the option in errors (`--train`, `steps[2].train`).
    pub fn resolve(&self, n: usize, what: &str) -> Result<Vec<usize>> {
        let layers: Vec<usize> = match self {
            Self::All => (0..n).collect(),
            Self::Last(k) if *k == 0 || *k > n => {
                return Err(CoreError::Other(format!(
                    "{what} last:{k}: the model has {n} blocks; train 1 to {n} of them"
                )));
            }
            Self::Last(k) => (n - k..n).collect(),
            Self::List(l) => l.clone(),
        };
        if layers.is_empty() {
            return Err(CoreError::Other(format!("{what}: no layer to train")));
        }
        if let Some(bad) = layers.iter().find(|&&l| l >= n) {
            return Err(CoreError::Other(format!(
                "{what}: layer {bad} is out of range: the model has {n} blocks (0..={})",
                n - 1
            )));
        }
        Ok(layers)
    }
}

/// `[[steps]] kind = "cluster"`: the options of `oqt cluster`, same names in
/// snake case, same defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterStep {
    /// `kmeans` (post-training), `edkm` (DKM training layer by layer,
    /// uniquified, from the k-means palettes) or `dkm` (the same training
    /// with the paper's `[N, K]` soft assignment: the memory eDKM removes).
    pub method: String,
    /// Index width: `2^bits` table entries (1–8).
    pub bits: u8,
    /// Output channels sharing one table; 0 for one table per tensor.
    pub group_channels: usize,
    /// k-means: Lloyd iterations at most.
    pub iterations: usize,
    /// Weigh each weight by its input channel's calibration energy `E[x²]`
    /// (over unit-length token rows); `false`: every weight counts the same.
    pub importance: bool,
    /// eDKM: Adam steps per layer (each over every calibration window).
    pub steps: usize,
    /// eDKM: Adam learning rate on the weights and centroids.
    pub lr: f32,
    /// eDKM: DKM's temperature relative to each linear's mean squared weight.
    pub tau: f32,
}

impl Default for ClusterStep {
    fn default() -> Self {
        Self {
            method: "kmeans".into(),
            bits: 4,
            group_channels: 16,
            iterations: 50,
            importance: true,
            steps: 4,
            lr: 1e-4,
            tau: 0.01,
        }
    }
}

impl ClusterStep {
    /// Problems with the options, each naming its field as `name(field)` renders it.
    pub fn problems(&self, name: impl Fn(&str) -> String) -> Vec<String> {
        let mut out = Vec::new();
        if !CLUSTER_METHODS.contains(&self.method.as_str()) {
            out.push(format!(
                "{}: unknown method `{}`; expected one of {}",
                name("method"),
                self.method,
                CLUSTER_METHODS.join(", ")
            ));
        }
        if !crate::lut::LUT_BITS.contains(&self.bits) {
            out.push(format!("{}: expected 1–8, found {}", name("bits"), self.bits));
        }
        if self.iterations == 0 {
            out.push(format!("{}: expected at least 1", name("iterations")));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            out.push(format!("{}: expected a positive number, found {}", name("lr"), self.lr));
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            out.push(format!(
                "{}: expected a positive number, found {}",
                name("tau"),
                self.tau
            ));
        }
        out
    }
}

/// `[[steps]] kind = "quantize"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeStep {
    /// `rtn`, `smoothquant`, `gptq`, `awq` or `mobilequant`; the recipe's
    /// `default_method` when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// RTN: search each row's clip ratio for the lowest weight MSE.
    #[serde(default)]
    pub clip_search: bool,
}

/// `[[steps]] kind = "qat"`: the options of `oqt qat`, same names in snake
/// case, same defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QatStep {
    /// Forward-only training (SPSA); `false`: first-order (STE, AdamW).
    pub zeroth_order: bool,
    /// Training text: a training-role dataset, a text file or `.jsonl` instruction data.
    pub dataset: String,
    pub prompt_template: Option<String>,
    /// Fraction of the text held out for evaluation (its tail).
    pub held_out: f64,
    /// Optimizer steps in all.
    pub steps: u64,
    /// Train norm gains, output-channel scales and activation ranges only.
    pub lightweight: bool,
    /// Learning rate (default 1e-4 lightweight, 1e-5 full).
    pub lr: Option<f64>,
    /// Weight of logit distillation from the float model (0: off).
    pub distill: f32,
    pub distill_top_k: usize,
    /// SPSA perturbation size ε.
    pub eps: f32,
    /// Directions averaged per step.
    pub n_spsa: u32,
    /// Clamp of each projected gradient (default 0.2 / ε).
    pub grad_clip: Option<f32>,
    pub weight_decay: f64,
    /// `constant`, `linear` or `cosine`.
    pub schedule: String,
    pub batch: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// Held-out evaluation every N steps and at the end (0: only at the end).
    pub eval_every: u64,
    pub eval_windows: usize,
    /// Checkpoint every N steps (zeroth-order; 0: only at the end and on interruption).
    pub checkpoint_every: u64,
    /// End on the weights of the lowest held-out perplexity evaluated.
    pub keep_best: bool,
    /// Which decoder layers train ([`TrainLayers`]: `all`, `last:N`, `3,4,5`).
    pub train: String,
}

impl Default for QatStep {
    fn default() -> Self {
        Self {
            zeroth_order: false,
            dataset: "tinyshakespeare".into(),
            prompt_template: None,
            held_out: 0.1,
            steps: 200,
            lightweight: false,
            lr: None,
            distill: 0.0,
            distill_top_k: 32,
            eps: 1e-2,
            n_spsa: 1,
            grad_clip: None,
            weight_decay: 0.0,
            schedule: "constant".into(),
            batch: 4,
            seq_len: 256,
            seed: 0,
            eval_every: 50,
            eval_windows: 8,
            checkpoint_every: 100,
            keep_best: false,
            train: "all".into(),
        }
    }
}

impl QatStep {
    /// Problems with the options, each naming its field as `name(field)`
    /// renders it (`steps[1].grad_clip` in a recipe, `--grad-clip` on the command line).
    pub fn problems(&self, name: impl Fn(&str) -> String) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = self.grad_clip
            && !(c > 0.0 && c.is_finite())
        {
            out.push(format!("{} must be a positive number, found {c}", name("grad_clip")));
        }
        if !matches!(self.schedule.as_str(), "constant" | "linear" | "cosine") {
            out.push(format!(
                "{}: expected constant, linear or cosine, found `{}`",
                name("schedule"),
                self.schedule
            ));
        }
        if !(0.0..=1.0).contains(&self.distill) {
            out.push(format!(
                "{}: expected a weight in [0, 1], found {}",
                name("distill"),
                self.distill
            ));
        }
        if !(0.0..1.0).contains(&self.held_out) {
            out.push(format!(
                "{}: expected a fraction in [0, 1), found {}",
                name("held_out"),
                self.held_out
            ));
        }
        if self.steps == 0 || self.batch == 0 || self.seq_len < 2 || self.n_spsa == 0 {
            out.push(format!(
                "{}, {}, {} and {}: expected ≥ 1, ≥ 1, ≥ 2 and ≥ 1",
                name("steps"),
                name("batch"),
                name("seq_len"),
                name("n_spsa")
            ));
        }
        if let Some(lr) = self.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            out.push(format!("{} must be a positive number, found {lr}", name("lr")));
        }
        if let Err(e) = self.train.parse::<TrainLayers>() {
            out.push(format!("{}: {e}", name("train")));
        }
        out
    }

    /// The layers that train, for a model of `n` blocks.
    pub fn train_layers(&self, n: usize, name: impl Fn(&str) -> String) -> Result<Vec<usize>> {
        let what = name("train");
        let layers: TrainLayers = self
            .train
            .parse()
            .map_err(|e| CoreError::Other(format!("{what}: {e}")))?;
        layers.resolve(n, &what)
    }
}

impl Recipe {
    /// The steps `oqt run` runs: `[[steps]]`, or one `quantize` step with the
    /// default method for a recipe without them.
    pub fn pipeline(&self) -> Vec<Step> {
        if self.steps.is_empty() {
            vec![Step::Quantize(QuantizeStep::default())]
        } else {
            self.steps.clone()
        }
    }
}

/// The `quantize` step's methods (`oqt_compress::ptq::Method` names).
pub const QUANTIZE_METHODS: &[&str] = &["rtn", "smoothquant", "gptq", "awq", "mobilequant"];

const BUILTIN: &[(&str, &str)] = &[
    ("w4a8", include_str!("../../../../recipes/w4a8.toml")),
    ("w4a8-lpbq", include_str!("../../../../recipes/w4a8-lpbq.toml")),
    ("w4a8-auto", include_str!("../../../../recipes/w4a8-auto.toml")),
    ("w4a8-dyn", include_str!("../../../../recipes/w4a8-dyn.toml")),
    (
        "w4a8-dyn-zeroqat",
        include_str!("../../../../recipes/w4a8-dyn-zeroqat.toml"),
    ),
    ("w8a8", include_str!("../../../../recipes/w8a8.toml")),
    ("w8a8-down16", include_str!("../../../../recipes/w8a8-down16.toml")),
    ("w4a16", include_str!("../../../../recipes/w4a16.toml")),
    ("w4a16-g128", include_str!("../../../../recipes/w4a16-g128.toml")),
    ("w8a16", include_str!("../../../../recipes/w8a16.toml")),
    ("gguf-q4_0", include_str!("../../../../recipes/gguf-q4_0.toml")),
    ("gguf-q8_0", include_str!("../../../../recipes/gguf-q8_0.toml")),
    ("sparse50", include_str!("../../../../recipes/sparse50.toml")),
    ("sparse-2of4", include_str!("../../../../recipes/sparse-2of4.toml")),
    (
        "sparse-2of4-w4a8-dyn",
        include_str!("../../../../recipes/sparse-2of4-w4a8-dyn.toml"),
    ),
    ("lut4-a8-dyn", include_str!("../../../../recipes/lut4-a8-dyn.toml")),
];

pub fn builtin_recipe_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

fn parse(text: &str, origin: &Path) -> Result<Recipe> {
    let recipe: Recipe = toml::from_str(text).map_err(|e| CoreError::Malformed {
        path: origin.into(),
        format: "recipe",
        reason: e.to_string(),
    })?;
    let mut problems = recipe.spec.problems();
    if let Some(m) = crate::datasets::manifest(&recipe.calibration.dataset)
        && m.role == "eval"
    {
        problems.push(format!(
            "calibration.dataset: `{}` is an evaluation set; calibrate on a training set (e.g. tinyshakespeare)",
            m.name
        ));
    }
    if !(50.0..=100.0).contains(&recipe.calibration.percentile) {
        problems.push(format!(
            "calibration.percentile: expected a value in [50, 100], found {}",
            recipe.calibration.percentile
        ));
    }
    if recipe.calibration.samples == 0 || recipe.calibration.seq_len < 2 {
        problems.push("calibration: samples must be ≥ 1 and seq_len ≥ 2".into());
    }
    // Float-stage steps (prune, fold, and distill before any weights step)
    // work on the float model; `quantize`/`cluster` follow them, once.
    let weights_step = |s: &Step| matches!(s, Step::Quantize(_) | Step::Cluster(_));
    let first_weights = recipe.steps.iter().position(weights_step);
    let float_stage = |s: &Step| matches!(s, Step::Prune(_) | Step::Fold(_) | Step::Distill(_));
    for (i, step) in recipe.steps.iter().enumerate() {
        let before = &recipe.steps[..i];
        match step {
            Step::Prune(p) => {
                if let Some(f) = first_weights.filter(|&f| f < i) {
                    problems.push(format!(
                        "steps[{i}]: a `prune` step works on the float model, so it goes before `quantize` (found after `{}`)",
                        recipe.steps[f].kind()
                    ));
                }
                problems.extend(p.problems(|f| format!("steps[{i}].{f}")));
            }
            Step::Fold(f) => {
                if first_weights.is_some_and(|w| w < i) || before.iter().any(|s| matches!(s, Step::Prune(_))) {
                    problems.push(format!(
                        "steps[{i}]: a `fold` step works on the dense float model, so it goes before `prune` and `quantize`"
                    ));
                }
                problems.extend(f.problems(|n| format!("steps[{i}].{n}")));
            }
            Step::Cluster(c) => {
                if Some(i) != first_weights || !before.iter().all(float_stage) {
                    problems.push(format!(
                        "steps[{i}]: a `cluster` step starts from the float (pruned, folded) model, so it comes first or right after the float-stage steps (prune, fold, distill), once"
                    ));
                }
                problems.extend(c.problems(|f| format!("steps[{i}].{f}")));
            }
            Step::Quantize(q) => {
                if Some(i) != first_weights || !before.iter().all(float_stage) {
                    problems.push(format!(
                        "steps[{i}]: a `quantize` step starts from the float (pruned, folded) model, so it comes first or right after the float-stage steps (prune, fold, distill), once"
                    ));
                }
                if let Some(m) = &q.method
                    && !QUANTIZE_METHODS.contains(&m.as_str())
                {
                    problems.push(format!(
                        "steps[{i}].method: unknown method `{m}`; expected one of {}",
                        QUANTIZE_METHODS.join(", ")
                    ));
                }
            }
            Step::Qat(q) => {
                if before.iter().any(|s| matches!(s, Step::Cluster(_))) {
                    problems.push(format!(
                        "steps[{i}]: a `qat` step trains integer grids, not palettes; it cannot follow a `cluster` step"
                    ));
                } else if !before.iter().any(weights_step) {
                    problems.push(format!(
                        "steps[{i}]: a `qat` step trains a quantized bundle; put a `quantize` step before it"
                    ));
                }
                problems.extend(q.problems(|f| format!("steps[{i}].{f}")));
            }
            Step::Distill(q) => {
                if before.iter().any(|s| matches!(s, Step::Cluster(_))) {
                    problems.push(format!(
                        "steps[{i}]: a `distill` step trains float weights or integer grids, not palettes; it cannot follow a `cluster` step"
                    ));
                } else if i == 0 {
                    problems.push(format!(
                        "steps[{i}]: a `distill` step trains the previous step's bundle from the float model; put a `fold` or `quantize` step before it"
                    ));
                }
                if !(q.distill > 0.0 && q.distill <= 1.0) {
                    problems.push(format!(
                        "steps[{i}].distill: a distill step needs the KL weight in (0, 1] (1: distillation alone), found {}",
                        q.distill
                    ));
                }
                problems.extend(q.problems(|f| format!("steps[{i}].{f}")));
            }
            Step::Lora(l) => {
                if before.iter().any(|s| matches!(s, Step::Cluster(_))) {
                    problems.push(format!(
                        "steps[{i}]: a `lora` step freezes integer grids, not palettes; it cannot follow a `cluster` step"
                    ));
                } else if !before.iter().any(weights_step) {
                    problems.push(format!(
                        "steps[{i}]: a `lora` step trains an adapter on a quantized bundle; put a `quantize` step before it"
                    ));
                }
                problems.extend(l.problems(|f| format!("steps[{i}].{f}")));
            }
        }
    }
    if let Some(mp) = &recipe.mixed_precision {
        problems.extend(mp.problems());
    }
    let ratio = recipe.mobilequant.split_down_ratio;
    if !(ratio == 0.0 || ratio >= 1.0) || !ratio.is_finite() {
        problems.push(format!(
            "mobilequant.split_down_ratio: expected 0 (off) or a value ≥ 1, found {ratio}"
        ));
    }
    match problems.first() {
        None => Ok(recipe),
        Some(_) => Err(CoreError::Other(format!(
            "{}: invalid recipe: {}",
            origin.display(),
            problems.join("; ")
        ))),
    }
}

pub fn builtin_recipe(name: &str) -> Option<Result<Recipe>> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| parse(text, Path::new(&format!("recipes/{n}.toml"))))
}

/// A built-in recipe by name, or a recipe file by path.
pub fn load_recipe(name_or_path: &str) -> Result<Recipe> {
    if let Some(r) = builtin_recipe(name_or_path) {
        return r;
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        return parse(&text, path);
    }
    Err(CoreError::Other(format!(
        "recipe `{name_or_path}` is neither built in ({}) nor a file",
        builtin_recipe_names().join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::spec::{ActMode, Granularity};

    #[test]
    fn every_builtin_recipe_parses_and_validates() {
        for name in builtin_recipe_names() {
            let r = builtin_recipe(name).unwrap().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.name, name);
        }
    }

    #[test]
    fn recipes_say_what_the_layouts_are() {
        let w4a8 = load_recipe("w4a8").unwrap();
        assert_eq!(w4a8.spec.weights.bits, 4);
        assert_eq!(w4a8.spec.weights.granularity, Granularity::PerChannel);
        assert_eq!(w4a8.spec.activations.mode, ActMode::Static);
        assert_eq!(w4a8.default_method, "mobilequant");
        let dyn8 = load_recipe("w4a8-dyn").unwrap();
        assert_eq!(dyn8.spec.weights.granularity, Granularity::PerGroup(32));
        assert_eq!(dyn8.spec.activations.mode, ActMode::Dynamic);
        // Embedding and head stay at 8 bits per channel by default.
        for r in [&w4a8, &dyn8] {
            let e = r.spec.weights_for("model.embed_tokens.weight");
            assert_eq!((e.bits, e.granularity), (8, Granularity::PerChannel));
            assert_eq!(r.spec.weights_for("model.layers.3.mlp.up_proj.weight").bits, 4);
        }
        assert_eq!(
            load_recipe("w4a16-g128").unwrap().spec.weights.granularity,
            Granularity::PerGroup(128)
        );
    }

    #[test]
    fn bad_recipes_name_the_field() {
        let good = include_str!("../../../../recipes/w4a8-dyn.toml");
        let p = Path::new("my.toml");
        let e = parse(&good.replace("bits = 4", "bits = 5"), p).unwrap_err().to_string();
        assert!(e.contains("my.toml") && e.contains("weights.bits"), "{e}");
        let e = parse(
            &good.replace("dataset = \"tinyshakespeare\"", "dataset = \"wikitext2\""),
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("calibration.dataset") && e.contains("evaluation set"), "{e}");
        let e = parse(&good.replace("[calibration]", "[calibration]\nsamplez = 3"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("samplez"), "{e}");
        let e = load_recipe("w5a5").unwrap_err().to_string();
        assert!(e.contains("w4a8-dyn"), "{e}");
    }

    #[test]
    fn recipes_are_pipelines_of_steps() {
        // Without [[steps]]: one quantize step with the default method.
        assert_eq!(
            load_recipe("w4a8").unwrap().pipeline(),
            vec![Step::Quantize(QuantizeStep::default())]
        );
        let zq = load_recipe("w4a8-dyn-zeroqat").unwrap();
        let kinds: Vec<_> = zq.pipeline().iter().map(Step::kind).collect();
        assert_eq!(kinds, ["quantize", "qat"]);
        let Step::Qat(q) = &zq.steps[1] else {
            panic!("second step is qat")
        };
        assert!(q.zeroth_order && q.lightweight);
        assert_eq!((q.n_spsa, q.steps, q.schedule.as_str()), (8, 150, "cosine"));
        // Options left out take `oqt qat`'s defaults.
        assert_eq!((q.eps, q.distill_top_k, q.held_out), (1e-2, 32, 0.1));
    }

    #[test]
    fn bad_steps_name_the_step_and_field() {
        let good = include_str!("../../../../recipes/w4a8-dyn-zeroqat.toml");
        let p = Path::new("pipe.toml");
        let err = |text: String| parse(&text, p).unwrap_err().to_string();
        let e = err(good.replace("kind = \"qat\"", "kind = \"export\""));
        assert!(
            e.contains("pipe.toml") && e.contains("export") && e.contains("qat") && e.contains("prune"),
            "{e}"
        );
        // A prune step after quantize, and a prune step's bad fields.
        let e = err(good.to_string() + "\n[[steps]]\nkind = \"prune\"\nsparsity = 0.5\n");
        assert!(e.contains("steps[2]: a `prune` step works on the float model"), "{e}");
        let e = err(good.replace(
            "[[steps]]\nkind = \"quantize\"",
            "[[steps]]\nkind = \"prune\"\nnm = \"2:3\"\nsparsity = 0.5\n\n[[steps]]\nkind = \"quantize\"",
        ));
        assert!(e.contains("steps[0].sparsity or steps[0].nm: give exactly one"), "{e}");
        let e = err(good.replace(
            "[[steps]]\nkind = \"quantize\"",
            "[[steps]]\nkind = \"prune\"\nnm = \"4:2\"\nmethod = \"obs\"\n\n[[steps]]\nkind = \"quantize\"",
        ));
        assert!(
            e.contains("steps[0].nm: `4:2`: expected 0 < N < M") && e.contains("steps[0].method: unknown method `obs`"),
            "{e}"
        );
        let e = err(good.replace("n_spsa = 8", "n_spsa = 8\nlearning_rate = 1"));
        assert!(e.contains("learning_rate"), "{e}");
        let e = err(good.replace("schedule = \"cosine\"", "schedule = \"cosin\""));
        assert!(e.contains("steps[1].schedule") && e.contains("cosine"), "{e}");
        let e = err(good.replace("method = \"rtn\"", "method = \"rtm\""));
        assert!(e.contains("steps[0].method") && e.contains("gptq"), "{e}");
        // A qat step needs a quantized bundle before it; quantize starts from the float model.
        let swapped = good.replace("kind = \"quantize\"\nmethod = \"rtn\"", "kind = \"qat\"");
        let e = err(swapped.clone() + "\n[[steps]]\nkind = \"quantize\"\n");
        assert!(
            e.contains("steps[0]") && e.contains("steps[2]") && e.contains("comes first"),
            "{e}"
        );
        let e = err(good.replace("lr = 1e-3", "lr = -1.0"));
        assert!(e.contains("steps[1].lr"), "{e}");
    }

    /// `fold` goes on the dense float model (before prune and quantize),
    /// `distill` trains the previous step's bundle with a KL weight > 0; their
    /// bad fields are named.
    #[test]
    fn fold_and_distill_steps_are_checked_like_the_others() {
        let base = include_str!("../../../../recipes/w4a8-dyn.toml");
        let p = Path::new("fold.toml");
        let with = |steps: &str| base.to_string() + steps;
        let fold = "\n[[steps]]\nkind = \"fold\"\nmethod = \"shortgpt\"\nremove = 4\n";
        let distill = "\n[[steps]]\nkind = \"distill\"\ndistill = 1.0\ntrain = \"last:4\"\n";
        let quantize = "\n[[steps]]\nkind = \"quantize\"\n";
        let r = parse(&with(&format!("{fold}{distill}{quantize}{distill}")), p).unwrap();
        let kinds: Vec<_> = r.pipeline().iter().map(Step::kind).collect();
        assert_eq!(kinds, ["fold", "distill", "quantize", "distill"]);
        let Step::Distill(d) = &r.steps[1] else {
            panic!("distill")
        };
        assert_eq!(d.train_layers(26, |f| f.to_string()).unwrap(), vec![22, 23, 24, 25]);
        let err = |text: String| parse(&text, p).unwrap_err().to_string();
        let e = err(with(&format!("{quantize}{fold}")));
        assert!(
            e.contains("steps[1]: a `fold` step works on the dense float model"),
            "{e}"
        );
        let e = err(with(&format!("{distill}{quantize}")));
        assert!(
            e.contains("steps[0]: a `distill` step trains the previous step's bundle"),
            "{e}"
        );
        let e = err(with(&format!(
            "{fold}{}",
            distill.replace("distill = 1.0", "distill = 0.0")
        )));
        assert!(
            e.contains("steps[1].distill: a distill step needs the KL weight"),
            "{e}"
        );
        let e = err(with(&format!("{fold}{}", distill.replace("last:4", "last:x"))));
        assert!(e.contains("steps[1].train: `last:x`"), "{e}");
        let e = err(with(&fold.replace("remove = 4", "remove = 4\nbudget = 0.25")));
        assert!(e.contains("exactly one of steps[0].remove and steps[0].budget"), "{e}");
        let e = err(with(&fold.replace("shortgpt", "shortgtp")));
        assert!(e.contains("steps[0].method: unknown method `shortgtp`"), "{e}");
        let e = err(with(&fold.replace("remove = 4", "budget = 1.5")));
        assert!(e.contains("steps[0].budget: expected a share in (0, 1)"), "{e}");
        let layers: TrainLayers = "3,5".parse().unwrap();
        assert!(
            layers
                .resolve(4, "--train")
                .unwrap_err()
                .to_string()
                .contains("layer 5 is out of range")
        );
    }

    #[test]
    fn cluster_steps_are_checked_like_the_others() {
        let good = include_str!("../../../../recipes/lut4-a8-dyn.toml");
        let p = Path::new("lut.toml");
        let lut = parse(good, p).unwrap();
        let Step::Cluster(c) = &lut.steps[0] else {
            panic!("a cluster step")
        };
        assert_eq!((c.method.as_str(), c.bits, c.group_channels), ("kmeans", 4, 16));
        assert!(c.importance && c.iterations == 50);
        let err = |text: String| parse(&text, p).unwrap_err().to_string();
        let e = err(good.replace("bits = 4\ngroup", "bits = 9\ngroup"));
        assert!(e.contains("steps[0].bits: expected 1–8, found 9"), "{e}");
        let e = err(good.replace("method = \"kmeans\"", "method = \"gmm\""));
        assert!(e.contains("steps[0].method: unknown method `gmm`"), "{e}");
        let e = err(good.replace("group_channels = 16", "group_channels = 16\ntemperature = 1"));
        assert!(e.contains("temperature"), "{e}");
        // Quantize and cluster both start from the float model; qat does not train palettes.
        let e = err(good.to_string() + "\n[[steps]]\nkind = \"quantize\"\n");
        assert!(e.contains("steps[1]: a `quantize` step starts from the float"), "{e}");
        let e = err(good.to_string() + "\n[[steps]]\nkind = \"qat\"\n");
        assert!(
            e.contains("steps[1]: a `qat` step trains integer grids, not palettes"),
            "{e}"
        );
        // Prune first is fine.
        let pruned = good.replace(
            "[[steps]]\nkind = \"cluster\"",
            "[[steps]]\nkind = \"prune\"\nnm = \"2:4\"\n\n[[steps]]\nkind = \"cluster\"",
        );
        assert_eq!(parse(&pruned, p).unwrap().steps.len(), 2);
    }

    #[test]
    fn mobilequant_checkpointing_is_a_recipe_field() {
        let w4a8 = include_str!("../../../../recipes/w4a8.toml");
        let p = Path::new("my.toml");
        assert_eq!(
            load_recipe("w4a8").unwrap().mobilequant.checkpointing,
            Checkpointing::Auto
        );
        // w4a8 has a `[mobilequant]` table already (its channel splitting).
        assert!(w4a8.contains("[mobilequant]\n"));
        let with = |v: &str| {
            parse(
                &w4a8.replace("[mobilequant]\n", &format!("[mobilequant]\ncheckpointing = \"{v}\"\n")),
                p,
            )
        };
        assert_eq!(
            with("per-layer").unwrap().mobilequant.checkpointing,
            Checkpointing::PerLayer
        );
        assert_eq!(with("off").unwrap().mobilequant.checkpointing, Checkpointing::Off);
        let e = with("sometimes").unwrap_err().to_string();
        assert!(
            e.contains("my.toml") && e.contains("checkpointing") && e.contains("per-layer"),
            "{e}"
        );
    }
}
