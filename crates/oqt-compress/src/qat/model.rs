//! The model quantization-aware training moves: a float [`Llama`] whose
//! linear layers compute through the recipe's fake quantizers (weights on the
//! recipe's grid, inputs quantized as the recipe says, static sites on their
//! grids), trained on next-token cross-entropy. [`QatModel`] exposes its
//! trainable tensors to the zeroth-order optimizer ([`crate::qat::zeroqat`]) and,
//! on an autodiff device, its parameters to first-order training
//! ([`crate::qat::train_first_order`]).
//!
//! Which tensors train ([`Trainable`]):
//! * `Full`: every decoder linear's latent float weights (under the fake
//!   quantizer, straight-through), every RMSNorm gain, and on static recipes
//!   the activation ranges;
//! * `Lightweight`: the quantizer-facing parameters only (~0.14% of
//!   SmolLM2's parameters), with every decoder linear's integers frozen:
//!   - the RMSNorm gains: a gain scales the input channels of the q/k/v or
//!     gate/up projections before their inputs are quantized — a learned
//!     per-channel smoothing of every quantized matmul;
//!   - each frozen linear's output-channel scales (PEQA-style), as one
//!     log-offset per row (`row r ← row r · exp(δ_r)`): the integers stay, the
//!     bundle's scales become `scale · exp(δ_r)`, so the runtime needs
//!     nothing new. Not trained on per-tensor grids (one scale cannot hold a
//!     row's factor) nor on llama.cpp grids (their f16 block scales would be
//!     re-rounded; GGUF export must stay exact);
//!   - on static recipes, the activation ranges.
//!
//!   The frozen decoder linears are stored as the bundle will store them —
//!   integers and scales ([`QuantizedWeight`], one byte a weight instead of
//!   four) — and dequantized layer by layer in the forward pass, so the run
//!   needs less memory than inference on the float model, and the bundle
//!   holds exactly the integers that were trained through.
//!
//! Activation ranges are one log-scale offset per static site
//! (`scale = scale₀ · exp(δ)`, δ = 0 at the calibrated or PTQ grid): the
//! same relative parameter MobileQuant learns, so weight decay pulls a range
//! back toward its starting grid rather than toward scale 1.
//!
//! The embedding and the head are fake-quantized once, in place (they never
//! train): the embedding lookup then reads the values the runtime reads.

use crate::distill::WindowTargets;
use crate::ptq::mobilequant::RangeParams;
use crate::qat::zeroqat::ZoTrainable;
use crate::stats::inputs::to_vec;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use oqt_core::lora::LoraAdapter;
use oqt_core::quant::{
    ActGrid, ActMode, ActSite, QuantSpec, QuantizedWeight, SiteGrids, WeightSpec, dequantize_weight, quantize_weight,
    static_sites,
};
use oqt_core::weights::{ModelWeights, TensorF32, names};
use oqt_core::{CoreError, Result};
use oqt_model::fake_quant::{ActQuantizer, fake_quant_dynamic_rows, fake_quant_q8_0_blocks, fake_quant_weight};
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use oqt_model::lora::{lora_module, proj_of};
use oqt_model::quant_sim::fake_quant_static;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trainable {
    Full,
    Lightweight,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Linear(usize, Proj),
    AttnNorm(usize),
    MlpNorm(usize),
    FinalNorm,
    /// A frozen linear's per-output-channel log-scale offsets (lightweight).
    ChannelScales(usize, Proj),
    /// Every static site's log-scale offset, as one tensor.
    ActRanges,
    /// LoRA runs: adapter `i`'s `A` (`[r, in]`) or `B` (`[out, r]`).
    LoraA(usize),
    LoraB(usize),
}

/// Logit distillation for one batch: the teacher's targets (one per window)
/// and the weight `w` of the KL term; optionally the teacher's block outputs
/// to match (first-order only).
#[derive(Debug, Clone, Copy)]
pub struct Distill<'a> {
    pub targets: &'a [WindowTargets],
    pub weight: f32,
    pub hidden: Option<HiddenMatch<'a>>,
}

/// The teacher's block outputs for one batch, `(student block, [b, s, d])`,
/// and the weight of their normalized MSE ([`crate::distill::hidden`]).
#[derive(Debug, Clone, Copy)]
pub struct HiddenMatch<'a> {
    pub states: &'a [(usize, Tensor<3>)],
    pub weight: f32,
}

/// Checkpoint name of the activation-range tensor.
pub const ACT_RANGES_NAME: &str = "act_ranges.log_scale";

/// The static activation quantizers of a static recipe.
struct StaticSites {
    params: RangeParams,
    /// Manifest keys (`layers.3.attn_in`, `final_in`, …), in `params` order.
    keys: Vec<String>,
    index: HashMap<String, usize>,
    /// The fixed softmax grid.
    probs: ActGrid,
}

/// Lightweight runs' per-output-channel log-scale offsets of the frozen
/// linears, `[layer · 7 + position in Proj::PER_LAYER]`; row `r` of a linear
/// computes with `exp(δ_r)` times its stored scales. Zero (the start) and not
/// trained where the grid cannot hold a row factor ([`trains_channel_scales`]).
#[derive(Module, Debug)]
pub struct ChannelScales {
    pub log_scale: Vec<Param<Tensor<1>>>,
}

impl ChannelScales {
    fn of(&self, layer: usize, p: Proj) -> &Param<Tensor<1>> {
        &self.log_scale[layer * Proj::PER_LAYER.len() + position(p)]
    }

    fn of_mut(&mut self, layer: usize, p: Proj) -> &mut Param<Tensor<1>> {
        &mut self.log_scale[layer * Proj::PER_LAYER.len() + position(p)]
    }
}

/// Whether a frozen linear on `spec` trains its output-channel scales.
pub fn trains_channel_scales(spec: &WeightSpec) -> bool {
    spec.granularity != oqt_core::quant::Granularity::PerTensor && !spec.scale_rule.is_llama_cpp()
}

/// `qw`'s scales with row `r` multiplied by `exp(δ_r)`, stored as the grid
/// stores scales: what the bundle holds after a lightweight run.
fn fold_channel_scales(mut qw: QuantizedWeight, log_scale: &[f32]) -> QuantizedWeight {
    let per_row = qw.scales.len() / qw.rows;
    for (r, &d) in log_scale.iter().enumerate() {
        let m = d.exp();
        for s in &mut qw.scales[r * per_row..(r + 1) * per_row] {
            *s = qw.spec.stored_scale(*s * m);
        }
    }
    qw
}

/// The LoRA factors a LoRA run trains, one `A` and one `B` per adapted linear.
#[derive(Module, Debug)]
pub struct LoraParams {
    pub a: Vec<Param<Tensor<2>>>,
    pub b: Vec<Param<Tensor<2>>>,
}

/// A LoRA run's adapter: its factors and what they adapt.
struct Lora {
    params: LoraParams,
    /// `(layer, linear)` of each factor pair, in `params` order.
    keys: Vec<(usize, Proj)>,
    index: HashMap<(usize, Proj), usize>,
    /// The adapter as it started (rank, α, modules, base; values replaced on export).
    start: LoraAdapter,
}

/// What training ends with, ready for the bundle writer.
pub struct TrainedWeights {
    /// Canonical float weights (everything but the frozen linears).
    pub weights: ModelWeights,
    /// Linears already on their grid (lightweight runs' frozen integers).
    pub quantized: BTreeMap<String, QuantizedWeight>,
    /// The static sites' grids as trained (static recipes).
    pub act_grids: Option<BTreeMap<String, ActGrid>>,
}

pub struct QatModel {
    pub llama: Llama,
    /// The recipe's quantizers; `None` for a float student (distillation of
    /// a float, pruned or folded model): every linear computes in f32.
    pub spec: Option<QuantSpec>,
    targets: Vec<Target>,
    /// `[layer][position in Proj::PER_LAYER]`: each decoder linear's weight grid.
    specs: Vec<Vec<WeightSpec>>,
    /// Lightweight runs: the frozen decoder linears as integers (same
    /// indexing); shared with [`QatModel::without_autodiff`]'s copy.
    frozen: Option<Arc<Vec<Vec<QuantizedWeight>>>>,
    /// Lightweight runs: their output-channel scale offsets.
    channel_scales: Option<ChannelScales>,
    sites: Option<StaticSites>,
    /// LoRA runs: the adapter (the only trainable tensors).
    lora: Option<Lora>,
}

fn position(p: Proj) -> usize {
    Proj::PER_LAYER.iter().position(|&q| q == p).expect("decoder linear")
}

struct QatHooks<'a> {
    m: &'a QatModel,
}

impl QatHooks<'_> {
    fn site(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        match &self.m.sites {
            Some(s) => match s.index.get(&site.key(layer)) {
                Some(&i) => s.params.sites[i].forward(x),
                None => x,
            },
            None => x,
        }
    }
}

impl ForwardHooks for QatHooks<'_> {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let m = self.m;
        let Some(spec) = &m.spec else {
            return float(x);
        };
        // A LoRA update reads the linear's float input, as the runtime does.
        let adapter = m
            .lora
            .as_ref()
            .and_then(|lo| lo.index.get(&(layer, proj)).map(|&i| (lo, i)))
            .map(|(lo, i)| (lo, i, x.clone()));
        let x = match spec.activations.mode {
            ActMode::Dynamic => fake_quant_dynamic_rows(x),
            ActMode::LlamaCppQ8_0 => fake_quant_q8_0_blocks(x),
            ActMode::Static => self.site(layer, proj.input_site(), x),
            ActMode::None => x,
        };
        let w = match proj {
            Proj::Head => m.head_weight(),
            p => match &m.frozen {
                Some(f) => {
                    let qw = &f[layer][position(p)];
                    let device = m.llama.device();
                    let w = Tensor::<2>::from_data(TensorData::new(dequantize_weight(qw), [qw.rows, qw.cols]), &device);
                    let w = match &m.channel_scales {
                        Some(c) => w * c.of(layer, p).val().exp().reshape([qw.rows, 1]),
                        None => w,
                    };
                    w.transpose()
                }
                None => fake_quant_weight(
                    m.llama.decoder_linear(layer, p).weight.val(),
                    &m.specs[layer][position(p)],
                    1.0,
                ),
            },
        };
        let [b, t, d_in] = x.dims();
        let d_out = w.dims()[1];
        let y = x.reshape([b * t, d_in]).matmul(w);
        let y = match adapter {
            Some((lo, i, xf)) => {
                let a = lo.params.a[i].val().transpose();
                let bb = lo.params.b[i].val().transpose();
                let u = xf.reshape([b * t, d_in]).matmul(a) * lo.start.scaling();
                y + u.matmul(bb)
            }
            None => y,
        };
        y.reshape([b, t, d_out])
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        self.site(layer, site, x)
    }

    fn probs(&self, _layer: usize, p: Tensor<4>) -> Tensor<4> {
        match &self.m.sites {
            Some(s) => fake_quant_static(p, &s.probs),
            None => p,
        }
    }
}

impl QatModel {
    /// Full QAT: every decoder linear trains its latent float weights.
    /// `grids`: the static sites' starting grids (a PTQ bundle's `act_grids`
    /// or a calibration), required by static recipes and ignored otherwise.
    pub fn new(llama: Llama, spec: QuantSpec, grids: Option<&BTreeMap<String, ActGrid>>) -> Result<Self> {
        Self::build(llama, Some(spec), None, grids)
    }

    /// A float student: every decoder linear and norm gain trains, nothing is
    /// quantized (the embedding and head stay frozen, as in QAT).
    pub fn new_float(llama: Llama) -> Result<Self> {
        Self::build(llama, None, None, None)
    }

    /// The lightweight model from decoder linears frozen beforehand
    /// ([`FreezeLinears`]): `llama`'s own linears are placeholders and
    /// the float weights never exist in the Burn model.
    pub fn new_frozen(
        llama: Llama,
        spec: QuantSpec,
        frozen: Vec<Vec<QuantizedWeight>>,
        grids: Option<&BTreeMap<String, ActGrid>>,
    ) -> Result<Self> {
        if frozen.len() != llama.layers.len() || frozen.iter().any(|r| r.len() != Proj::PER_LAYER.len()) {
            return Err(CoreError::Other(format!(
                "frozen linears: expected {} layers of {}, found {} layers",
                llama.layers.len(),
                Proj::PER_LAYER.len(),
                frozen.len()
            )));
        }
        Self::build(llama, Some(spec), Some(frozen), grids)
    }

    fn build(
        llama: Llama,
        spec: Option<QuantSpec>,
        frozen: Option<Vec<Vec<QuantizedWeight>>>,
        grids: Option<&BTreeMap<String, ActGrid>>,
    ) -> Result<Self> {
        if llama.layers.iter().any(|b| b.attn.q_proj.bias.is_some()) {
            return Err(CoreError::Other(
                "QAT of models with q/k/v biases is not implemented yet".into(),
            ));
        }
        let n = llama.layers.len();
        let device = llama.device();
        let sites = if let Some(spec) = spec.as_ref().filter(|s| s.activations.mode == ActMode::Static) {
            let grids = grids.ok_or_else(|| {
                CoreError::Other(
                    "a static-activation recipe needs starting grids: start from its PTQ bundle (--from) or calibrate"
                        .into(),
                )
            })?;
            Some(static_sites_from(spec, n, grids, &device)?)
        } else {
            None
        };
        let mut targets = Vec::new();
        if frozen.is_none() {
            // Full QAT: the latent float linears train.
            for l in 0..n {
                targets.extend(Proj::PER_LAYER.iter().map(|&p| Target::Linear(l, p)));
            }
        }
        for l in 0..n {
            targets.push(Target::AttnNorm(l));
            targets.push(Target::MlpNorm(l));
        }
        targets.push(Target::FinalNorm);
        let specs: Vec<Vec<WeightSpec>> = match &spec {
            Some(spec) => (0..n)
                .map(|l| {
                    Proj::PER_LAYER
                        .iter()
                        .map(|p| spec.weights_for(&p.weight_name(l)))
                        .collect()
                })
                .collect(),
            None => Vec::new(),
        };
        let channel_scales = frozen.as_ref().map(|f| {
            let mut log_scale = Vec::with_capacity(n * Proj::PER_LAYER.len());
            for (l, row) in f.iter().enumerate() {
                for ((&p, qw), ws) in Proj::PER_LAYER.iter().zip(row).zip(&specs[l]) {
                    let d = Param::from_tensor(Tensor::<1>::zeros([qw.rows], &device));
                    log_scale.push(if trains_channel_scales(ws) {
                        targets.push(Target::ChannelScales(l, p));
                        d
                    } else {
                        d.set_require_grad(false)
                    });
                }
            }
            ChannelScales { log_scale }
        });
        if sites.is_some() {
            targets.push(Target::ActRanges);
        }

        let mut llama = llama;
        match &spec {
            Some(spec) => quantize_embedding_and_head(&mut llama, spec),
            None => {
                // A float student's embedding and head stay as they are, frozen.
                llama.embed_tokens = llama.embed_tokens.clone().no_grad();
                llama.lm_head = llama.lm_head.take().map(Module::no_grad);
            }
        }
        Ok(Self {
            llama,
            spec,
            targets,
            specs,
            frozen: frozen.map(Arc::new),
            channel_scales,
            sites,
            lora: None,
        })
    }

    /// LoRA on a frozen quantized base: the decoder linears as integers
    /// (`frozen`, e.g. a bundle's own), every other tensor of `llama`, the
    /// norm gains, channel scales and activation ranges frozen; only
    /// `adapter`'s factors train (starting from its values).
    pub fn new_lora(
        llama: Llama,
        spec: QuantSpec,
        frozen: Vec<Vec<QuantizedWeight>>,
        grids: Option<&BTreeMap<String, ActGrid>>,
        adapter: &LoraAdapter,
    ) -> Result<Self> {
        let mut m = Self::new_frozen(llama, spec, frozen, grids)?;
        let device = m.llama.device();
        m.llama = m.llama.no_grad();
        if let Some(c) = m.channel_scales.take() {
            m.channel_scales = Some(c.no_grad());
        }
        if let Some(s) = &mut m.sites {
            s.params = s.params.clone().no_grad();
        }
        let mut params = LoraParams {
            a: Vec::new(),
            b: Vec::new(),
        };
        let mut keys = Vec::new();
        let r = adapter.rank;
        for (&(l, module), pair) in &adapter.pairs {
            let p = proj_of(module);
            let qw = m
                .frozen
                .as_ref()
                .and_then(|f| f.get(l))
                .map(|row| &row[position(p)])
                .ok_or_else(|| CoreError::Other(format!("the adapter adapts layer {l}, which the base lacks")))?;
            if (qw.rows, qw.cols) != (pair.rows, pair.cols) {
                return Err(CoreError::Other(format!(
                    "the adapter's layers.{l}.{} updates a {} × {} weight; the base's is {} × {}",
                    module.peft_name(),
                    pair.rows,
                    pair.cols,
                    qw.rows,
                    qw.cols
                )));
            }
            let t = |v: &[f32], shape: [usize; 2]| {
                Param::from_tensor(Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), &device))
            };
            params.a.push(t(&pair.a, [r, pair.cols]));
            params.b.push(t(&pair.b, [pair.rows, r]));
            keys.push((l, p));
        }
        let index = keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        m.targets = (0..keys.len())
            .flat_map(|i| [Target::LoraA(i), Target::LoraB(i)])
            .collect();
        m.lora = Some(Lora {
            params,
            keys,
            index,
            start: adapter.clone(),
        });
        Ok(m)
    }

    /// The adapter as trained (LoRA runs).
    pub fn adapter(&self) -> Option<LoraAdapter> {
        let lo = self.lora.as_ref()?;
        let mut out = lo.start.clone();
        for (i, &(l, p)) in lo.keys.iter().enumerate() {
            let pair = out
                .pairs
                .get_mut(&(l, lora_module(p).expect("decoder linear")))
                .expect("the adapter's own key");
            pair.a = to_vec(lo.params.a[i].val());
            pair.b = to_vec(lo.params.b[i].val());
        }
        Some(out)
    }

    fn head_weight(&self) -> Tensor<2> {
        match &self.llama.lm_head {
            Some(h) => h.weight.val(),
            None => self.llama.embed_tokens.weight.val().transpose(),
        }
    }

    /// Mean next-token cross-entropy over `windows` (equal lengths) as a
    /// tensor (with its graph on an autodiff device); with `distill`,
    /// `(1 − w)·CE + w·KL(teacher_k ‖ student)` (per position, summed over the
    /// teacher's top k, averaged over positions).
    pub fn loss_tensor(&self, windows: &[Vec<u32>], distill: Option<Distill<'_>>) -> Result<Tensor<1>> {
        let (b, s) = (windows.len(), windows.first().map_or(0, Vec::len));
        if b == 0 || s < 2 || windows.iter().any(|w| w.len() != s) {
            return Err(CoreError::Other(format!(
                "a training batch needs equal windows of at least 2 tokens, found {b} windows"
            )));
        }
        let device = self.llama.device();
        let ids: Vec<i64> = windows.iter().flatten().map(|&t| t as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
        let hooks = QatHooks { m: self };
        let mut matched = Vec::new();
        let hidden = match distill.and_then(|d| d.hidden) {
            None => self.llama.forward_hidden_with(tokens.clone(), None, &hooks),
            Some(h) => {
                // Block by block, to compare each matched block's output.
                let pos = self.llama.positions(s, &device);
                let mut x = self.llama.embed_with(tokens.clone(), &hooks);
                for l in 0..self.llama.n_layers() {
                    x = self.llama.layer_with(l, x, &pos, &hooks);
                    for (_, t) in h.states.iter().filter(|(block, _)| *block == l) {
                        matched.push(crate::distill::hidden::normalized_mse(x.clone(), t.clone()));
                    }
                }
                self.llama.final_norm_with(x, &hooks)
            }
        };
        let d = hidden.dims()[2];
        let hidden = hidden.slice([0..b, 0..s - 1, 0..d]);
        let lp = log_softmax(self.llama.logits_with(hidden, &hooks), 2);
        let targets = tokens.slice([0..b, 1..s]).reshape([b, s - 1, 1]);
        let ce = lp.clone().gather(2, targets).neg().mean();
        let Some(d) = distill else {
            return Ok(ce);
        };
        let kl = crate::distill::targets::kl_to_targets(lp, d.targets)?;
        let loss = ce * (1.0 - d.weight) + kl * d.weight;
        match d.hidden {
            Some(h) if !matched.is_empty() => {
                let n = matched.len() as f32;
                Ok(loss + Tensor::cat(matched, 0).sum() * (h.weight / n))
            }
            _ => Ok(loss),
        }
    }

    /// The device the model (and its gradients) live on.
    pub fn device(&self) -> burn::tensor::Device {
        self.llama.device()
    }

    /// [`QatModel::objective`] without distillation: the held-out metric.
    pub fn loss(&self, windows: &[Vec<u32>]) -> Result<f32> {
        self.objective(windows, None)
    }

    /// [`QatModel::loss_tensor`]'s value, one window at a time: the
    /// `[tokens, vocab]` logits of a single window are the largest buffer, as
    /// in evaluation. Never backpropagated, so a first-order model computes
    /// it off its autodiff graph ([`QatModel::without_autodiff`]).
    pub fn objective(&self, windows: &[Vec<u32>], distill: Option<Distill<'_>>) -> Result<f32> {
        if windows.is_empty() {
            return Err(CoreError::Other("a training batch needs at least one window".into()));
        }
        if self.llama.device().is_autodiff() {
            return self.without_autodiff().objective(windows, distill);
        }
        let mut total = 0f64;
        for (i, w) in windows.iter().enumerate() {
            // Hidden-state matching trains first-order only; objectives (held-out
            // losses, zeroth-order probes) are the logit terms.
            let d = distill.map(|d| Distill {
                targets: &d.targets[i..i + 1],
                weight: d.weight,
                hidden: None,
            });
            let v = to_vec(self.loss_tensor(std::slice::from_ref(w), d)?.detach());
            total += v[0] as f64;
        }
        Ok((total / windows.len() as f64) as f32)
    }

    /// Train only decoder layers `layers` (with the final norm and, on static
    /// recipes, the activation ranges): the other layers' tensors leave the
    /// trainable set and take no gradients. Tail distillation trains the last
    /// few blocks this way.
    pub fn train_only_layers(&mut self, layers: &[usize]) -> Result<()> {
        let n = self.llama.layers.len();
        if layers.is_empty() {
            return Err(CoreError::Other("no layer to train".into()));
        }
        if let Some(bad) = layers.iter().find(|&&l| l >= n) {
            return Err(CoreError::Other(format!(
                "layer {bad} is out of range: the model has {n} layers (0..={})",
                n - 1
            )));
        }
        let keep = |l: usize| layers.contains(&l);
        self.targets.retain(|t| match *t {
            Target::Linear(l, _) | Target::AttnNorm(l) | Target::MlpNorm(l) | Target::ChannelScales(l, _) => keep(l),
            Target::FinalNorm | Target::ActRanges => true,
            Target::LoraA(i) | Target::LoraB(i) => keep(self.lora.as_ref().expect("LoRA model").keys[i].0),
        });
        let blocks = std::mem::take(&mut self.llama.layers);
        self.llama.layers = blocks
            .into_iter()
            .enumerate()
            .map(|(l, b)| if keep(l) { b } else { b.no_grad() })
            .collect();
        if let Some(c) = &mut self.channel_scales {
            for l in (0..n).filter(|&l| !keep(l)) {
                for p in Proj::PER_LAYER {
                    let d = c.of_mut(l, p);
                    *d = d.clone().set_require_grad(false);
                }
            }
        }
        Ok(())
    }

    /// Names of the trainable tensors, in [`ZoTrainable`] order (canonical names).
    pub fn tensor_names(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|&t| match t {
                Target::Linear(l, p) => p.weight_name(l),
                Target::AttnNorm(l) => names::layer(l, names::ATTN_NORM),
                Target::MlpNorm(l) => names::layer(l, names::MLP_NORM),
                Target::FinalNorm => names::FINAL_NORM.to_string(),
                Target::ChannelScales(l, p) => format!("{}.log_scale", p.weight_name(l)),
                Target::ActRanges => ACT_RANGES_NAME.to_string(),
                Target::LoraA(i) | Target::LoraB(i) => {
                    let (l, p) = self.lora.as_ref().expect("LoRA model").keys[i];
                    let which = if matches!(t, Target::LoraA(_)) { "A" } else { "B" };
                    format!("{}.lora_{which}.weight", p.weight_name(l).trim_end_matches(".weight"))
                }
            })
            .collect()
    }

    /// Tensor `i` as it stands (Burn layout, flattened).
    pub fn tensor_values(&self, i: usize) -> Vec<f32> {
        to_vec(self.values_of(self.targets[i]))
    }

    /// Replace tensor `i` (checkpoint restore): `θ_i ← values`.
    pub fn set_tensor(&mut self, i: usize, values: &[f32]) {
        self.update(i, 0.0, 1.0, values);
    }

    /// The static sites' grids as they stand (static recipes).
    pub fn act_grids(&self) -> Option<BTreeMap<String, ActGrid>> {
        self.sites.as_ref().map(|s| {
            s.keys
                .iter()
                .zip(&s.params.sites)
                .map(|(k, q)| (k.clone(), q.grid()))
                .collect()
        })
    }

    /// Consume the model into what the bundle writer needs, one tensor at a
    /// time (the Burn copy of each weight is released as it is read). Storage
    /// types come from `source_types` ("f32" for names it lacks).
    pub fn into_trained(self, source_types: &BTreeMap<String, String>) -> TrainedWeights {
        let act_grids = self.act_grids();
        let Self {
            llama,
            frozen,
            channel_scales,
            ..
        } = self;
        let Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            ..
        } = llama;
        // Burn keeps linears as [in, out]; canonical is [out, in].
        let linear = |w: Tensor<2>| {
            let w = w.transpose();
            let shape = w.dims().to_vec();
            TensorF32::new(shape, to_vec(w))
        };
        let vector = |g: Tensor<1>| {
            let v = to_vec(g);
            TensorF32::new(vec![v.len()], v)
        };
        let mut weights = ModelWeights::default();
        let mut put = |name: String, t: TensorF32| {
            let source = source_types.get(&name).map_or("f32", String::as_str).to_string();
            weights.insert(name, t, source);
        };
        let e = embed_tokens.weight.into_value();
        let shape = e.dims().to_vec();
        put(names::EMBED.to_string(), TensorF32::new(shape, to_vec(e)));
        if let Some(h) = lm_head {
            put(names::LM_HEAD.to_string(), linear(h.weight.into_value()));
        }
        put(names::FINAL_NORM.to_string(), vector(norm.gamma.into_value()));
        let mut quantized = BTreeMap::new();
        let mut frozen = frozen.map(|f| Arc::unwrap_or_clone(f).into_iter());
        let mut channel_scales = channel_scales.map(|c| c.log_scale.into_iter());
        for (l, b) in layers.into_iter().enumerate() {
            put(
                names::layer(l, names::ATTN_NORM),
                vector(b.input_layernorm.gamma.into_value()),
            );
            put(
                names::layer(l, names::MLP_NORM),
                vector(b.post_attention_layernorm.gamma.into_value()),
            );
            let lins = [
                b.attn.q_proj,
                b.attn.k_proj,
                b.attn.v_proj,
                b.attn.o_proj,
                b.mlp.gate_proj,
                b.mlp.up_proj,
                b.mlp.down_proj,
            ];
            let frozen_row = frozen.as_mut().map(|f| f.next().expect("a frozen row per layer"));
            match frozen_row {
                Some(row) => {
                    for (&p, qw) in Proj::PER_LAYER.iter().zip(row) {
                        let qw = match channel_scales.as_mut().and_then(Iterator::next) {
                            Some(d) => fold_channel_scales(qw, &to_vec(d.into_value())),
                            None => qw,
                        };
                        quantized.insert(p.weight_name(l), qw);
                    }
                }
                None => {
                    for (&p, lin) in Proj::PER_LAYER.iter().zip(lins) {
                        put(p.weight_name(l), linear(lin.weight.into_value()));
                    }
                }
            }
        }
        TrainedWeights {
            weights,
            quantized,
            act_grids,
        }
    }

    fn values_of(&self, t: Target) -> Tensor<1> {
        match t {
            Target::Linear(l, p) => {
                let w = self.llama.decoder_linear(l, p).weight.val();
                let n = w.shape().num_elements();
                w.reshape([n])
            }
            Target::AttnNorm(l) => self.llama.layers[l].input_layernorm.gamma.val(),
            Target::MlpNorm(l) => self.llama.layers[l].post_attention_layernorm.gamma.val(),
            Target::FinalNorm => self.llama.norm.gamma.val(),
            Target::ChannelScales(l, p) => self.channel_scales.as_ref().expect("lightweight model").of(l, p).val(),
            Target::ActRanges => {
                let s = self.sites.as_ref().expect("static sites");
                Tensor::cat(s.params.sites.iter().map(|q| q.log_scale.val()).collect(), 0)
            }
            Target::LoraA(i) | Target::LoraB(i) => {
                let lo = self.lora.as_ref().expect("LoRA model");
                let w = if matches!(t, Target::LoraA(_)) {
                    lo.params.a[i].val()
                } else {
                    lo.params.b[i].val()
                };
                let n = w.shape().num_elements();
                w.reshape([n])
            }
        }
    }

    /// The same model off the autodiff graph (tensors shared, nothing
    /// copied): what [`QatModel::objective`] runs on for a first-order model,
    /// since every forward on an autodiff device that is never
    /// backpropagated keeps its graph alive (a held-out evaluation of 16
    /// windows grew first-order runs by ~3 GiB).
    pub fn without_autodiff(&self) -> QatModel {
        QatModel {
            llama: self.llama.valid(),
            spec: self.spec.clone(),
            targets: self.targets.clone(),
            specs: self.specs.clone(),
            frozen: self.frozen.clone(),
            channel_scales: self.channel_scales.as_ref().map(Module::valid),
            sites: self.sites.as_ref().map(|s| StaticSites {
                params: s.params.valid(),
                keys: s.keys.clone(),
                index: s.index.clone(),
                probs: s.probs,
            }),
            lora: self.lora.as_ref().map(|lo| Lora {
                params: lo.params.valid(),
                keys: lo.keys.clone(),
                index: lo.index.clone(),
                start: lo.start.clone(),
            }),
        }
    }

    /// One first-order step (the baseline): backpropagate the batch loss
    /// through the same fake quantizers (straight-through rounding) and step
    /// AdamW on the same trainable set. Needs an autodiff device. Returns the
    /// model and the loss before the step.
    pub fn first_order_step(
        mut self,
        windows: &[Vec<u32>],
        distill: Option<Distill<'_>>,
        lr: f64,
        opt: &mut FirstOrder,
    ) -> Result<(Self, f32)> {
        if !self.llama.device().is_autodiff() {
            return Err(CoreError::Other(
                "first-order QAT needs an autodiff device (oqt_model::select_device(.., true))".into(),
            ));
        }
        let loss = self.loss_tensor(windows, distill)?;
        let value = to_vec(loss.clone().detach())[0];
        if !value.is_finite() {
            return Err(CoreError::Other(format!(
                "first-order QAT diverged (loss {value}); lower --lr"
            )));
        }
        let mut grads = loss.backward();
        // The optimizers take modules by value: move each out and back in.
        let g = GradientsParams::from_module(&mut grads, &self.llama);
        self.llama = opt.model.step(lr, self.llama, g);
        if let Some(mut s) = self.sites.take() {
            let g = GradientsParams::from_module(&mut grads, &s.params);
            s.params = opt.ranges.step(lr, s.params, g);
            self.sites = Some(s);
        }
        if let Some(c) = self.channel_scales.take() {
            let g = GradientsParams::from_module(&mut grads, &c);
            self.channel_scales = Some(opt.channel_scales.step(lr, c, g));
        }
        if let Some(mut lo) = self.lora.take() {
            let g = GradientsParams::from_module(&mut grads, &lo.params);
            lo.params = opt.lora.step(lr, lo.params, g);
            self.lora = Some(lo);
        }
        Ok((self, value))
    }
}

/// AdamW state of first-order QAT: one optimizer for the model's trainable
/// parameters (decoupled weight decay as given), one for the activation
/// ranges (no decay: a range's parameter is an offset from its start), one
/// for the channel-scale offsets (decayed toward their start, 0).
pub struct FirstOrder {
    model: ModuleOptimizer,
    ranges: ModuleOptimizer,
    channel_scales: ModuleOptimizer,
    lora: ModuleOptimizer,
}

impl FirstOrder {
    pub fn new(weight_decay: f64) -> Self {
        Self {
            model: AdamWConfig::new().with_weight_decay(weight_decay as f32).init(),
            ranges: AdamWConfig::new().with_weight_decay(0.0).init(),
            channel_scales: AdamWConfig::new().with_weight_decay(weight_decay as f32).init(),
            lora: AdamWConfig::new().with_weight_decay(weight_decay as f32).init(),
        }
    }
}

/// Embedding and head: on their grids once, never trained.
fn quantize_embedding_and_head(llama: &mut Llama, spec: &QuantSpec) {
    let device = llama.device();
    // Embedding and head: on their grids once, never trained. The
    // embedding (the largest tensor) is rounded in place on the host, a
    // block of rows at a time, so it is never held twice.
    let embed = std::mem::replace(
        &mut llama.embed_tokens.weight,
        Param::from_tensor(Tensor::zeros([1, 1], &device)),
    )
    .into_value();
    let [vocab, hidden] = embed.dims();
    let mut values = to_vec(embed);
    let embed_spec = spec.weights_for(names::EMBED);
    for rows in values.chunks_mut(4096 * hidden) {
        let q = quantize_weight(rows, rows.len() / hidden, hidden, &embed_spec, 1.0);
        rows.copy_from_slice(&dequantize_weight(&q));
    }
    let q_embed = Tensor::<2>::from_data(TensorData::new(values, [vocab, hidden]), &device);
    llama.embed_tokens.weight = Param::from_tensor(q_embed).set_require_grad(false);
    if let Some(h) = &mut llama.lm_head {
        let q = fake_quant_weight(h.weight.val(), &spec.weights_for(names::LM_HEAD), 1.0);
        h.weight = Param::from_tensor(q.detach()).set_require_grad(false);
    }
}

fn static_sites_from(
    spec: &QuantSpec,
    n_layers: usize,
    grids: &BTreeMap<String, ActGrid>,
    device: &Device,
) -> Result<StaticSites> {
    // The runtime's own check of a manifest's grids: every site present, right bits, positive scale.
    SiteGrids::from_map(spec, n_layers, grids).map_err(CoreError::Other)?;
    let mut keys = Vec::new();
    let mut sites = Vec::new();
    for (key, site, _) in static_sites(spec, n_layers) {
        if site.is_fixed() {
            continue;
        }
        let mut q = ActQuantizer::from_grid(&grids[&key], device);
        // Ranges train through their scale; the zero point stays the starting grid's.
        q.zero_shift = q.zero_shift.set_require_grad(false);
        sites.push(q);
        keys.push(key);
    }
    let index = keys.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
    Ok(StaticSites {
        params: RangeParams { sites },
        keys,
        index,
        probs: ActGrid::probabilities(ActSite::Probs.bits(spec)),
    })
}

/// Lightweight QAT's starting weights, gathered one tensor at a time: every
/// decoder linear is stored on its grid as it arrives (leaving a 1 × 1
/// placeholder for the Burn model), everything else stays float. Fed from a
/// bundle ([`oqt_core::bundle::Bundle::for_each_dequantized`]) the model is
/// never resident in f32. Hand the result to [`QatModel::new_frozen`].
pub struct FreezeLinears {
    spec: QuantSpec,
    config: oqt_core::LlamaConfig,
    /// Where the tensors come from, for errors.
    source: std::path::PathBuf,
    /// Each decoder linear's place (`[layer][position]`) and the shape the config gives it.
    linears: HashMap<String, (usize, usize, Vec<usize>)>,
    weights: ModelWeights,
    frozen: Vec<Vec<Option<QuantizedWeight>>>,
}

impl FreezeLinears {
    pub fn new(spec: &QuantSpec, config: &oqt_core::LlamaConfig, source: &std::path::Path) -> Self {
        let n_layers = config.num_layers;
        let shapes: HashMap<String, Vec<usize>> = ModelWeights::expected(config).into_iter().collect();
        let linears = (0..n_layers)
            .flat_map(|l| {
                Proj::PER_LAYER
                    .iter()
                    .enumerate()
                    .map(move |(i, p)| (p.weight_name(l), l, i))
            })
            .map(|(name, l, i)| {
                let shape = shapes[&name].clone();
                (name, (l, i, shape))
            })
            .collect();
        Self {
            spec: spec.clone(),
            config: config.clone(),
            source: source.to_path_buf(),
            linears,
            weights: ModelWeights::default(),
            frozen: vec![vec![None; Proj::PER_LAYER.len()]; n_layers],
        }
    }

    pub fn add(&mut self, name: &str, t: TensorF32, source: String) -> Result<()> {
        if let Some((l, i, want)) = self.linears.get(name) {
            let (l, i) = (*l, *i);
            // The model's own shape, checked before the float tensor is gone.
            if *want != t.shape {
                return Err(CoreError::BadField {
                    path: self.source.clone(),
                    field: name.to_string(),
                    expected: format!("shape {want:?}"),
                    found: format!("shape {:?}", t.shape),
                });
            }
            let (rows, cols) = (t.shape[0], t.shape[1]);
            self.frozen[l][i] = Some(quantize_weight(&t.data, rows, cols, &self.spec.weights_for(name), 1.0));
            self.weights
                .insert(name.to_string(), TensorF32::new(vec![1, 1], vec![0.0]), source);
        } else {
            self.weights.insert(name.to_string(), t, source);
        }
        Ok(())
    }

    /// The float weights (with placeholders) and the frozen linears
    /// (`[layer][position in Proj::PER_LAYER]`), every tensor the config calls
    /// for present with its shape.
    pub fn finish(self) -> Result<(ModelWeights, Vec<Vec<QuantizedWeight>>)> {
        // The linears hold placeholders here; their shapes were checked in `add`.
        self.weights
            .validate_except(&self.config, &self.source, |n| self.linears.contains_key(n))?;
        let mut frozen = Vec::with_capacity(self.frozen.len());
        for (l, row) in self.frozen.into_iter().enumerate() {
            let row = row
                .into_iter()
                .zip(Proj::PER_LAYER)
                .map(|(q, p)| {
                    q.ok_or_else(|| CoreError::Missing {
                        path: self.source.clone(),
                        what: "tensor",
                        name: p.weight_name(l),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            frozen.push(row);
        }
        Ok((self.weights, frozen))
    }
}

impl ZoTrainable for QatModel {
    fn tensor_sizes(&self) -> Vec<usize> {
        self.targets
            .iter()
            .map(|&t| self.values_of(t).shape().num_elements())
            .collect()
    }

    fn update(&mut self, i: usize, a: f32, b: f32, z: &[f32]) {
        // a = 0 replaces θ (a restore): θ·0 would keep the NaN of a diverged run.
        fn times<const D: usize>(t: Tensor<D>, a: f32) -> Tensor<D> {
            if a == 0.0 { t.zeros_like() } else { t * a }
        }
        if self.targets[i] == Target::ActRanges {
            let s = self.sites.as_mut().expect("static sites");
            for (q, &zk) in s.params.sites.iter_mut().zip(z) {
                q.log_scale = Param::from_tensor(times(q.log_scale.val(), a).add_scalar(b * zk));
            }
            return;
        }
        let device = self.llama.device();
        let z = Tensor::<1>::from_data(TensorData::new(z.to_vec(), [z.len()]), &device);
        match self.targets[i] {
            Target::Linear(l, p) => {
                let lin = self.llama.decoder_linear_mut(l, p);
                let w = lin.weight.val();
                let dims = w.dims();
                lin.weight = Param::from_tensor(times(w, a) + z.reshape(dims) * b);
            }
            Target::AttnNorm(l) => {
                let g = &mut self.llama.layers[l].input_layernorm.gamma;
                *g = Param::from_tensor(times(g.val(), a) + z * b);
            }
            Target::MlpNorm(l) => {
                let g = &mut self.llama.layers[l].post_attention_layernorm.gamma;
                *g = Param::from_tensor(times(g.val(), a) + z * b);
            }
            Target::FinalNorm => {
                let g = &mut self.llama.norm.gamma;
                *g = Param::from_tensor(times(g.val(), a) + z * b);
            }
            Target::ChannelScales(l, p) => {
                let g = self.channel_scales.as_mut().expect("lightweight model").of_mut(l, p);
                *g = Param::from_tensor(times(g.val(), a) + z * b);
            }
            Target::LoraA(k) | Target::LoraB(k) => {
                let lo = self.lora.as_mut().expect("LoRA model");
                let g = if matches!(self.targets[i], Target::LoraA(_)) {
                    &mut lo.params.a[k]
                } else {
                    &mut lo.params.b[k]
                };
                let w = g.val();
                let dims = w.dims();
                *g = Param::from_tensor(times(w, a) + z.reshape(dims) * b);
            }
            Target::ActRanges => unreachable!("updated above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qat::zeroqat::{SpsaConfig, spsa_step};
    use oqt_core::lora::LoraModule;
    use oqt_core::quant::builtin_recipe;
    use oqt_core::testing::{random_weights, tiny_config};

    /// `weights` as QAT starts from them: full (latent float linears) or
    /// lightweight (linears frozen as they are read, as the CLI does).
    fn build(
        trainable: Trainable,
        weights: ModelWeights,
        spec: QuantSpec,
        grids: Option<&BTreeMap<String, ActGrid>>,
    ) -> QatModel {
        build_on(trainable, weights, spec, grids, Device::flex())
    }

    fn build_on(
        trainable: Trainable,
        weights: ModelWeights,
        spec: QuantSpec,
        grids: Option<&BTreeMap<String, ActGrid>>,
        device: Device,
    ) -> QatModel {
        let cfg = tiny_config();
        match trainable {
            Trainable::Full => QatModel::new(oqt_model::llama_from_weights(&cfg, weights, &device), spec, grids),
            Trainable::Lightweight => {
                let mut freeze = FreezeLinears::new(&spec, &cfg, std::path::Path::new("start.oqt"));
                for (n, t, source) in weights.into_tensors() {
                    freeze.add(&n, t, source).unwrap();
                }
                let (start, frozen) = freeze.finish().unwrap();
                let llama = oqt_model::llama_from_weights(&cfg, start, &device);
                QatModel::new_frozen(llama, spec, frozen, grids)
            }
        }
        .unwrap()
    }

    fn model(trainable: Trainable) -> QatModel {
        let cfg = tiny_config();
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        build(trainable, random_weights(&cfg, 21), spec, None)
    }

    /// `steps` SPSA steps (ε 1e-2, 2 probes) on `objective`; its value before and after.
    fn spsa_train(
        m: &mut QatModel,
        lr: f64,
        seed: u64,
        steps: u64,
        objective: impl Fn(&QatModel) -> Result<f32>,
    ) -> (f32, f32) {
        let start = objective(m).unwrap();
        let cfg = SpsaConfig {
            eps: 1e-2,
            lr,
            n_spsa: 2,
            seed,
            grad_clip: 20.0,
            ..Default::default()
        };
        for step in 0..steps {
            spsa_step(m, &cfg, step, steps, &mut |m: &QatModel| objective(m)).unwrap();
        }
        (start, objective(m).unwrap())
    }

    fn batch() -> Vec<Vec<u32>> {
        (0..2)
            .map(|b| (0..24).map(|i| ((i * 7 + b * 3) % 40) as u32 + 5).collect())
            .collect()
    }

    #[test]
    fn zeroth_order_steps_lower_the_fake_quantized_loss() {
        // ε = 1e-2: the finite difference must reach across the fake quantizers'
        // rounding steps (at 1e-3 it mostly measures rounding flips on this tiny model).
        for (trainable, lr) in [(Trainable::Lightweight, 3e-2), (Trainable::Full, 1e-3)] {
            let mut m = model(trainable);
            let data = batch();
            let (start, end) = spsa_train(&mut m, lr, 5, 40, |m| m.loss(&data));
            assert!(end < start - 0.01, "{trainable:?}: loss {start} → {end}");
        }
    }

    fn lora_model(device: Device) -> QatModel {
        let cfg = tiny_config();
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        let mut freeze = FreezeLinears::new(&spec, &cfg, std::path::Path::new("start.oqt"));
        for (n, t, source) in random_weights(&cfg, 21).into_tensors() {
            freeze.add(&n, t, source).unwrap();
        }
        let (start, frozen) = freeze.finish().unwrap();
        let adapter = LoraAdapter::init(&cfg, 2, 4.0, &[LoraModule::Q, LoraModule::Down], 3, "tiny").unwrap();
        let llama = oqt_model::llama_from_weights(&cfg, start, &device);
        QatModel::new_lora(llama, spec, frozen, None, &adapter).unwrap()
    }

    /// A fresh adapter (B = 0) computes the frozen base; only the adapter
    /// trains, first- and zeroth-order, and it is handed back with its values.
    #[test]
    fn lora_trains_only_the_adapter_and_starts_as_the_base() {
        let data = batch();
        let base = model(Trainable::Lightweight).loss(&data).unwrap();
        let mut m = lora_model(Device::flex());
        assert_eq!(m.loss(&data).unwrap(), base, "B = 0: the adapted model is the base");
        let names = m.tensor_names();
        assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
        assert_eq!(names[0], "model.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(names[1], "model.layers.0.self_attn.q_proj.lora_B.weight");
        let (start, end) = spsa_train(&mut m, 3e-2, 5, 30, |m| m.loss(&data));
        assert!(end < start - 0.01, "zeroth-order: {start} → {end}");

        let mut m = lora_model(Device::flex().autodiff());
        let mut opt = FirstOrder::new(0.0);
        let mut losses = Vec::new();
        for _ in 0..10 {
            let (next, loss) = m.first_order_step(&data, None, 1e-2, &mut opt).unwrap();
            m = next;
            losses.push(loss);
        }
        assert!(losses[9] < losses[0] - 0.05, "first-order: {losses:?}");
        let norm_before = to_vec(lora_model(Device::flex()).llama.norm.gamma.val());
        assert_eq!(
            to_vec(m.llama.norm.gamma.val()),
            norm_before,
            "the base's gains stay frozen"
        );
        let adapter = m.adapter().unwrap();
        let b = &adapter.pairs[&(1, LoraModule::Down)].b;
        assert!(b.iter().any(|&v| v != 0.0), "B trained");
    }

    #[test]
    fn per_window_loss_is_the_batch_loss() {
        let m = model(Trainable::Full);
        let data = batch();
        let whole = to_vec(m.loss_tensor(&data, None).unwrap())[0];
        let windowed = m.loss(&data).unwrap();
        assert!((whole - windowed).abs() < 1e-5, "{whole} vs {windowed}");
    }

    #[test]
    fn distillation_toward_the_float_teacher_lowers_the_kl() {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, 21);
        let teacher = oqt_model::llama_from_weights(&cfg, weights.clone(), &Device::flex());
        let data = batch();
        let targets: Vec<_> = data
            .iter()
            .map(|w| crate::distill::teacher_targets(&teacher, w, 8).unwrap())
            .collect();
        let d = Distill {
            targets: &targets,
            weight: 1.0,
            hidden: None,
        };
        let mut m = model(Trainable::Lightweight);
        let (start, end) = spsa_train(&mut m, 3e-2, 2, 30, |m| m.objective(&data, Some(d)));
        assert!(
            start > 0.0 && start.is_finite(),
            "quantized student differs from the float teacher: {start}"
        );
        assert!(end < start, "KL {start} → {end}");
    }

    #[test]
    fn lightweight_stores_the_integers_the_full_model_computes_with() {
        // Same start, same grid: the frozen integers' forward equals the fake quantizers'.
        let (full, light) = (model(Trainable::Full), model(Trainable::Lightweight));
        let data = batch();
        let (a, b) = (full.loss(&data).unwrap(), light.loss(&data).unwrap());
        assert!((a - b).abs() < 1e-4, "full {a} vs lightweight {b}");
        let trained = light.into_trained(&BTreeMap::new());
        assert_eq!(trained.quantized.len(), tiny_config().num_layers * 7);
        let q = &trained.quantized[&Proj::Q.weight_name(0)];
        assert!(q.q.iter().any(|&v| v != 0));
    }

    #[test]
    fn channel_scales_train_and_fold_into_the_exported_scales() {
        let mut m = model(Trainable::Lightweight);
        let names = m.tensor_names();
        let scales = names.iter().filter(|n| n.ends_with(".weight.log_scale")).count();
        assert_eq!(scales, tiny_config().num_layers * 7, "{names:?}");
        let start = model(Trainable::Lightweight).into_trained(&BTreeMap::new()).quantized;
        let data = batch();
        spsa_train(&mut m, 3e-2, 4, 20, |m| m.loss(&data));
        let trained_loss = m.loss(&data).unwrap();
        let trained = m.into_trained(&BTreeMap::new());
        assert!(
            trained.weights.get(&Proj::Q.weight_name(0)).is_none(),
            "frozen linears are handed over as integers only"
        );
        for (name, q) in &trained.quantized {
            assert_eq!(q.q, start[name].q, "{name}: the integers stay frozen");
        }
        let moved = trained
            .quantized
            .iter()
            .filter(|(n, q)| q.scales != start[*n].scales)
            .count();
        assert_eq!(moved, trained.quantized.len(), "every linear's scales trained");
        // The exported integers and scales compute what training computed.
        let mut weights = trained.weights;
        for (name, q) in &trained.quantized {
            weights.insert(
                name.clone(),
                TensorF32::new(vec![q.rows, q.cols], dequantize_weight(q)),
                "f32",
            );
        }
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        let reloaded = build(Trainable::Lightweight, weights, spec, None).loss(&data).unwrap();
        assert!(
            (reloaded - trained_loss).abs() < 1e-4,
            "trained {trained_loss} vs exported {reloaded}"
        );
    }

    #[test]
    fn first_order_lightweight_steps_train_the_channel_scales() {
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        let weights = random_weights(&tiny_config(), 21);
        let mut m = build_on(Trainable::Lightweight, weights, spec, None, Device::flex().autodiff());
        let i = m.tensor_names().iter().position(|n| n.ends_with(".log_scale")).unwrap();
        let mut opt = FirstOrder::new(0.0);
        let data = batch();
        let mut losses = Vec::new();
        for _ in 0..15 {
            let (next, loss) = m.first_order_step(&data, None, 1e-2, &mut opt).unwrap();
            m = next;
            losses.push(loss);
        }
        assert!(losses[14] < losses[0] - 0.01, "loss {losses:?}");
        assert!(
            m.tensor_values(i).iter().any(|&d| d != 0.0),
            "backprop reached the channel scales"
        );
    }

    /// Training only layer 1 (tail distillation): layer 0's tensors leave the
    /// trainable set and first-order steps leave them untouched while layer 1
    /// moves; a layer the model lacks is refused. On a float student too.
    #[test]
    fn training_only_some_layers_leaves_the_others_untouched() {
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        let device = Device::flex().autodiff();
        let quantized = build_on(
            Trainable::Full,
            random_weights(&tiny_config(), 5),
            spec,
            None,
            device.clone(),
        );
        let float = QatModel::new_float(oqt_model::llama_from_weights(
            &tiny_config(),
            random_weights(&tiny_config(), 5),
            &device,
        ))
        .unwrap();
        for mut m in [quantized, float] {
            assert!(m.train_only_layers(&[2]).is_err());
            m.train_only_layers(&[1]).unwrap();
            let names = m.tensor_names();
            assert!(names.iter().all(|n| !n.starts_with("model.layers.0.")), "{names:?}");
            assert!(names.iter().any(|n| n.starts_with("model.layers.1.")), "{names:?}");
            let q = |m: &QatModel, l: usize| to_vec(m.llama.decoder_linear(l, Proj::Q).weight.val());
            let (before0, before1) = (q(&m, 0), q(&m, 1));
            let mut opt = FirstOrder::new(0.0);
            let data = batch();
            let (m, _) = m.first_order_step(&data, None, 1e-2, &mut opt).unwrap();
            assert_eq!(q(&m, 0), before0, "layer 0 is frozen");
            assert_ne!(q(&m, 1), before1, "layer 1 trains");
        }
    }

    /// A float student computes exactly the float model: no quantizer on any
    /// weight or activation.
    #[test]
    fn a_float_student_computes_the_float_model() {
        let llama = oqt_model::llama_from_weights(&tiny_config(), random_weights(&tiny_config(), 8), &Device::flex());
        let data = batch();
        let w = &data[0];
        let plain = {
            let logits = llama.forward(llama.tokens_tensor(w), None);
            let lp = to_vec(log_softmax(logits, 2));
            let v = llama.vocab_size();
            (0..w.len() - 1)
                .map(|i| -lp[i * v + w[i + 1] as usize] as f64)
                .sum::<f64>()
                / (w.len() - 1) as f64
        };
        let m = QatModel::new_float(llama).unwrap();
        let loss = m.loss(std::slice::from_ref(w)).unwrap() as f64;
        assert!((loss - plain).abs() < 1e-4, "{loss} vs {plain}");
    }

    #[test]
    fn a_first_order_model_evaluates_off_the_graph_as_the_plain_model_does() {
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        let weights = random_weights(&tiny_config(), 21);
        let on_graph = build_on(
            Trainable::Lightweight,
            weights.clone(),
            spec.clone(),
            None,
            Device::flex().autodiff(),
        );
        let view = on_graph.without_autodiff();
        assert!(!view.llama.device().is_autodiff());
        let data = batch();
        let plain = build(Trainable::Lightweight, weights, spec, None).loss(&data).unwrap();
        assert_eq!(view.loss(&data).unwrap(), plain);
        assert_eq!(
            on_graph.loss(&data).unwrap(),
            plain,
            "loss evaluates off the graph itself"
        );
    }

    #[test]
    fn per_tensor_and_llama_cpp_grids_keep_their_scales() {
        for recipe in ["gguf-q4_0", "gguf-q8_0"] {
            let spec = builtin_recipe(recipe).unwrap().unwrap().spec;
            let m = build(Trainable::Lightweight, random_weights(&tiny_config(), 2), spec, None);
            assert!(
                m.tensor_names().iter().all(|n| !n.ends_with(".log_scale")),
                "{recipe}: f16 block scales are not trained"
            );
        }
        let mut spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        spec.weights.granularity = oqt_core::quant::Granularity::PerTensor;
        assert!(!trains_channel_scales(&spec.weights));
    }

    #[test]
    fn freezing_names_the_tensor_of_a_wrong_or_missing_shape() {
        let cfg = tiny_config();
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        let path = std::path::Path::new("start.oqt");
        let mut freeze = FreezeLinears::new(&spec, &cfg, path);
        let name = Proj::Down.weight_name(1);
        let err = freeze
            .add(&name, TensorF32::new(vec![2, 3], vec![0.0; 6]), "F32".into())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&name) && err.contains("start.oqt") && err.contains("[2, 3]"),
            "{err}"
        );
        let weights = random_weights(&cfg, 1);
        let mut freeze = FreezeLinears::new(&spec, &cfg, path);
        for n in weights.names().filter(|n| **n != name) {
            freeze.add(n, weights.get(n).unwrap().clone(), "F32".into()).unwrap();
        }
        let err = freeze.finish().expect_err("a linear is missing").to_string();
        assert!(err.contains(&name) && err.contains("start.oqt"), "{err}");
    }

    fn static_model(trainable: Trainable, seed: u64) -> (QatModel, BTreeMap<String, ActGrid>) {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, seed);
        let device = Device::flex();
        let llama = oqt_model::llama_from_weights(&cfg, weights.clone(), &device);
        let recipe = builtin_recipe("w4a8").unwrap().unwrap();
        let windows: Vec<Vec<u32>> = batch();
        let grids =
            crate::stats::calibrate::calibrate(&llama, &recipe.spec, &recipe.calibration, &windows, |_, _| {}).unwrap();
        (build(trainable, weights, recipe.spec, Some(&grids)), grids)
    }

    #[test]
    fn static_recipes_train_their_activation_ranges() {
        let (mut m, start_grids) = static_model(Trainable::Lightweight, 3);
        assert_eq!(m.tensor_names().last().unwrap(), ACT_RANGES_NAME);
        assert_eq!(
            m.act_grids().unwrap(),
            start_grids,
            "untrained ranges are the starting grids"
        );
        let data = batch();
        let (start, end) = spsa_train(&mut m, 3e-2, 1, 40, |m| m.loss(&data));
        assert!(end < start - 0.01, "loss {start} → {end}");
        let trained = m.act_grids().unwrap();
        assert!(trained.iter().any(|(k, g)| g.scale != start_grids[k].scale));
        assert!(trained.iter().all(|(k, g)| g.zero_point == start_grids[k].zero_point));
    }

    #[test]
    fn static_recipes_without_grids_are_refused_with_a_reason() {
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 1), &Device::flex());
        let spec = builtin_recipe("w4a8").unwrap().unwrap().spec;
        let e = QatModel::new(llama, spec, None).err().unwrap().to_string();
        assert!(e.contains("--from"), "{e}");
    }
}
