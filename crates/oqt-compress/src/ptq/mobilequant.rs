//! MobileQuant: post-training quantization for integer-only (NPU) graphs that
//! learns, jointly and end to end over the whole decoder stack,
//!
//! 1. equivalent transformations ([`crate::ptq::smoothing`]: norm → q/k/v,
//!    norm → gate/up, up → down, v → o), initialised at 1 on top of a
//!    closed-form pass: SmoothQuant (the paper's, α = 0.5) or, by default,
//!    AWQ's searched scales — on SmolLM2 w4a8 the activation-aware search
//!    starts far closer to the optimum (16 chunks: 76.7 vs 122 perplexity)
//!    than the few hundred steps a CPU affords could take SmoothQuant's start;
//! 2. weight clipping: one logit `γ` per output channel, clip ratio `σ(γ)`
//!    (initialised at 4, σ ≈ 0.982). Symmetric grids have one bound, so one
//!    parameter per channel (the paper's second, for the minimum, would only
//!    matter on asymmetric grids);
//! 3. activation ranges: the scale and zero point of every static activation
//!    quantizer, initialised from calibration min/max.
//!
//! The loss is the MSE between the float and the fake-quantized output of the
//! last decoder layer (or, `[mobilequant] loss = "final-norm"`, of that output
//! through the final RMSNorm; or `"logits-kl"`, the KL divergence of the
//! next-token distributions through the float head — neither better on
//! SmolLM2, so not the default);
//! AdamW (no weight decay), one learning rate per group with cosine decay, one
//! window per step. Afterwards the transformations are
//! folded into the weights and the clips into the weight grids, so the
//! exported bundle is a plain static model the runtime runs as is.
//!
//! Training runs the plain Burn ops with straight-through fake quantizers (fast,
//! differentiable); the exported bundle is then what the exact simulation and
//! the runtime evaluate.
//!
//! Memory: the whole stack's graph keeps ~5 weight-sized tensors per linear
//! (6.1 GiB peak on SmolLM2-135M; out of 24 GiB on Llama-3.2-1B's shapes). With
//! per-layer checkpointing (`[mobilequant] checkpointing`, automatic above 300 M
//! decoder parameters) the forward keeps only each layer's input and the
//! backward recomputes one layer at a time: the same gradients (a test
//! compares both), one layer's graph in memory, ~50% more time per step.

use crate::ptq::smoothing::{LayerScales, fold, kv_channel};
use crate::ptq::{MethodInput, MethodOutput, Progress};
use crate::stats::inputs::{group_index, to_vec};
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Gradients;
use burn::tensor::activation::{log_softmax, sigmoid};
use burn::tensor::{Device, Int, Tensor, TensorData};
use oqt_core::quant::{
    ActGrid, ActSite, Checkpointing, LayerLoss, MobileQuantSpec, QuantSpec, TransformInit, WeightSpec,
    quantize_weight_rows, static_sites,
};
use oqt_core::weights::ModelWeights;
use oqt_core::{CoreError, LlamaConfig, Result};
use oqt_model::fake_quant::{ActQuantizer, fake_quant_weight_learned};
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use oqt_model::quant_sim::fake_quant_static;
use std::collections::BTreeMap;

/// Smoothing divisors, one set per decoder layer.
#[derive(Module, Debug)]
pub struct SmoothParams {
    pub attn: Vec<Param<Tensor<1>>>,
    pub mlp: Vec<Param<Tensor<1>>>,
    pub down: Vec<Param<Tensor<1>>>,
    pub vo: Vec<Param<Tensor<1>>>,
}

/// Clip logits, `[d_out]` per linear, indexed `layer · 7 + position in Proj::PER_LAYER`.
#[derive(Module, Debug)]
pub struct ClipParams {
    pub logits: Vec<Param<Tensor<1>>>,
}

/// The trained activation quantizers (keys in [`MobileQuant::range_keys`]).
#[derive(Module, Debug)]
pub struct RangeParams {
    pub sites: Vec<ActQuantizer>,
}

/// What training learned, ready to fold and export.
#[derive(Debug, Clone)]
pub struct Learned {
    pub scales: Vec<LayerScales>,
    /// Clip ratio per output row, by canonical weight name.
    pub clips: BTreeMap<String, Vec<f32>>,
    /// Every static site's grid (trained ones replaced).
    pub grids: BTreeMap<String, ActGrid>,
    /// Loss after each step.
    pub losses: Vec<f32>,
}

/// Progress of training: `(step, steps, loss)`.
pub type StepCallback<'a> = dyn FnMut(usize, usize, f32) + 'a;

struct TrainHooks<'a> {
    model: &'a Llama,
    smooth: &'a SmoothParams,
    clip: &'a ClipParams,
    ranges: &'a RangeParams,
    /// `[layer][site]` → index into `ranges.sites` (linear inputs included).
    site_index: &'a [BTreeMap<ActSite, usize>],
    embed_index: Option<usize>,
    probs: Option<ActGrid>,
    specs: &'a [[WeightSpec; 7]],
    /// Attention-output channel → KV channel (v → o scales on o's inputs).
    vo_expand: &'a Tensor<1, Int>,
}

fn proj_position(p: Proj) -> usize {
    Proj::PER_LAYER.iter().position(|&q| q == p).expect("decoder linear")
}

impl TrainHooks<'_> {
    fn quantize_site(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        match self.site_index[layer].get(&site) {
            Some(&i) => self.ranges.sites[i].forward(x),
            None => x,
        }
    }

    fn weight(&self, layer: usize, proj: Proj) -> Tensor<2> {
        self.model.decoder_linear(layer, proj).weight.val()
    }
}

impl ForwardHooks for TrainHooks<'_> {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        if proj == Proj::Head {
            return float(x);
        }
        let s = &self.smooth;
        let divisor = match group_index(proj).expect("decoder linear") {
            0 => s.attn[layer].val(),
            1 => s.vo[layer].val().select(0, self.vo_expand.clone()),
            2 => s.mlp[layer].val(),
            _ => s.down[layer].val(),
        };
        let [b, t, d_in] = x.dims();
        let x = x / divisor.clone().reshape([1, 1, d_in]);
        let x = self.quantize_site(layer, proj.input_site(), x);
        let mut w = self.weight(layer, proj) * divisor.reshape([d_in, 1]);
        let d_out = w.dims()[1];
        // Producers of a smoothed pair: their output channels carry the divisor.
        match proj {
            Proj::V => w = w / s.vo[layer].val().reshape([1, d_out]),
            Proj::Up => w = w / s.down[layer].val().reshape([1, d_out]),
            _ => {}
        }
        let clip = sigmoid(self.clip.logits[layer * 7 + proj_position(proj)].val()).reshape([1, d_out]);
        let w = fake_quant_weight_learned(w, &self.specs[layer][proj_position(proj)], clip);
        x.reshape([b * t, d_in]).matmul(w).reshape([b, t, d_out])
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        if site == ActSite::Embed {
            return match self.embed_index {
                Some(i) => self.ranges.sites[i].forward(x),
                None => x,
            };
        }
        self.quantize_site(layer, site, x)
    }

    fn probs(&self, _layer: usize, p: Tensor<4>) -> Tensor<4> {
        match &self.probs {
            Some(g) => fake_quant_static(p, g),
            None => p,
        }
    }
}

fn param1(v: &[f32], device: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device))
}

/// Above this many decoder-linear parameters `checkpointing = "auto"` goes
/// per layer: the whole-stack graph of SmolLM2-135M (106 M) peaks near 6 GiB,
/// Llama-3.2-1B's (973 M) ran out of 24 GiB.
const AUTO_CHECKPOINT_PARAMS: usize = 300_000_000;

fn check_finite(step: usize, loss: f32) -> Result<()> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(CoreError::Other(format!(
            "MobileQuant diverged at step {step} (loss {loss}); lower the learning rates in the recipe's [mobilequant] table"
        )))
    }
}

/// Everything training updates.
struct Params {
    smooth: SmoothParams,
    clip: ClipParams,
    ranges: RangeParams,
}

/// One AdamW per parameter group (each has its own learning rate).
struct Optimizers {
    smooth: ModuleOptimizer,
    clip: ModuleOptimizer,
    range: ModuleOptimizer,
}

impl Optimizers {
    fn new() -> Self {
        let adam = AdamWConfig::new().with_weight_decay(0.0);
        Self {
            smooth: adam.init(),
            clip: adam.init(),
            range: adam.init(),
        }
    }

    /// Steps every parameter that has a gradient in `grads` (`lrs`: smooth, clip, range).
    fn step(&mut self, lrs: [f64; 3], p: Params, grads: &mut Gradients) -> Params {
        let g = GradientsParams::from_module(grads, &p.smooth);
        let smooth = self.smooth.step(lrs[0], p.smooth, g);
        let g = GradientsParams::from_module(grads, &p.clip);
        let clip = self.clip.step(lrs[1], p.clip, g);
        let g = GradientsParams::from_module(grads, &p.ranges);
        let ranges = self.range.step(lrs[2], p.ranges, g);
        Params { smooth, clip, ranges }
    }
}

/// MobileQuant on the whole model: the closed-form initialisation, grids
/// calibrated on it, training, then the learned transformations folded into
/// the weights and the learned clips into their grids.
pub(crate) fn quantize_model(input: &MethodInput, progress: &mut dyn Progress) -> Result<MethodOutput> {
    let (model, spec, opts) = (input.model, &input.recipe.spec, &input.opts.mobilequant);
    if !input.is_static() {
        return Err(CoreError::Other(format!(
            "MobileQuant targets static (NPU) activation grids; recipe `{}` has {:?} activations — use rtn, gptq or awq",
            input.recipe.name, spec.activations.mode
        )));
    }
    let init = match opts.init {
        TransformInit::Smoothquant => crate::ptq::smoothing::model_scales(input, progress)?,
        TransformInit::Awq => crate::ptq::awq::model_scales(input, progress)?,
    };
    // The calibration model owns its fold of the weights and training gets a
    // fresh one, so the two never coexist: one weight copy fewer at this
    // phase's peak (~4.6 GiB at 1B).
    let grids = {
        let llama = oqt_model::llama_from_weights(&model.config, input.folded(&init)?, &Device::flex());
        input.calibrate(&llama, "calibrating", progress)?
    };
    let weights = input.folded(&init)?;
    progress.phase("MobileQuant", opts.steps);
    // Training takes the weights; they are rebuilt (the same fold) afterwards
    // rather than kept: one copy fewer while a 1B model trains.
    let learned = train(
        &model.config,
        weights,
        spec,
        &grids,
        input.windows,
        opts,
        &mut |s, n, loss| progress.loss(s, n, loss),
    )?;
    let mut weights = input.folded(&init)?;
    fold(&model.config, &mut weights, &learned.scales)?;
    let mut quantized = BTreeMap::new();
    for (name, c) in &learned.clips {
        let t = weights.get(name).expect("validated");
        let qw = quantize_weight_rows(&t.data, t.shape[0], t.shape[1], &spec.weights_for(name), c);
        quantized.insert(name.clone(), qw);
    }
    Ok(MethodOutput {
        weights: Some(weights),
        quantized,
        grids: Some(learned.grids),
        losses: learned.losses,
    })
}

/// Cosine decay from `lr[0]` to `lr[1]` over `steps`.
pub fn cosine_lr(lr: [f64; 2], step: usize, steps: usize) -> f64 {
    let t = if steps > 1 {
        step as f64 / (steps - 1) as f64
    } else {
        1.0
    };
    lr[1] + 0.5 * (lr[0] - lr[1]) * (1.0 + (std::f64::consts::PI * t).cos())
}

/// The static sites training adjusts: every one with a calibrated grid except
/// the head's input (outside the loss) and the fixed softmax grid.
struct TrainedSites {
    /// Site keys, in the order of `quantizers`.
    keys: Vec<String>,
    quantizers: Vec<ActQuantizer>,
    /// `[layer][site]` → index into `quantizers`.
    index: Vec<BTreeMap<ActSite, usize>>,
    embed: Option<usize>,
}

impl TrainedSites {
    fn new(spec: &QuantSpec, grids: &BTreeMap<String, ActGrid>, n_layers: usize, device: &Device) -> Result<Self> {
        let mut sites = Self {
            keys: Vec::new(),
            quantizers: Vec::new(),
            index: vec![BTreeMap::new(); n_layers],
            embed: None,
        };
        for (key, site, _) in static_sites(spec, n_layers) {
            if site.is_fixed() || site == ActSite::FinalIn {
                continue;
            }
            let g = grids
                .get(&key)
                .ok_or_else(|| CoreError::Other(format!("no calibrated grid for site `{key}`")))?;
            let i = sites.quantizers.len();
            sites.quantizers.push(ActQuantizer::from_grid(g, device));
            if site == ActSite::Embed {
                sites.embed = Some(i);
            } else {
                let layer: usize = key
                    .split('.')
                    .nth(1)
                    .and_then(|l| l.parse().ok())
                    .expect("per-layer key");
                sites.index[layer].insert(site, i);
            }
            sites.keys.push(key);
        }
        Ok(sites)
    }
}

/// The frozen model, its float targets and what the hooks need, for one
/// training run.
struct Trainer<'a> {
    model: Llama,
    opts: &'a MobileQuantSpec,
    site_index: Vec<BTreeMap<ActSite, usize>>,
    embed_index: Option<usize>,
    probs: Option<ActGrid>,
    specs: Vec<[WeightSpec; 7]>,
    vo_expand: Tensor<1, Int>,
    tokens: Vec<Tensor<2, Int>>,
    /// The float model's compared output per window (see [`Trainer::compared`]).
    targets: Vec<Tensor<3>>,
}

impl Trainer<'_> {
    fn hooks<'b>(&'b self, p: &'b Params) -> TrainHooks<'b> {
        TrainHooks {
            model: &self.model,
            smooth: &p.smooth,
            clip: &p.clip,
            ranges: &p.ranges,
            site_index: &self.site_index,
            embed_index: self.embed_index,
            probs: self.probs,
            specs: &self.specs,
            vo_expand: &self.vo_expand,
        }
    }

    /// What the loss compares (see `MobileQuantSpec::loss`).
    fn compared(&self, out: Tensor<3>) -> Tensor<3> {
        match self.opts.loss {
            LayerLoss::LastLayer => out,
            LayerLoss::FinalNorm | LayerLoss::LogitsKl => self.model.final_norm(out),
        }
    }

    /// The loss between a compared output and its float target: mean squared
    /// error, or KL(float ‖ quantized) of the next-token distributions per position.
    fn loss(&self, out: Tensor<3>, target: Tensor<3>) -> Tensor<1> {
        match self.opts.loss {
            LayerLoss::LastLayer | LayerLoss::FinalNorm => (out - target).powi_scalar(2).mean(),
            LayerLoss::LogitsKl => {
                // The teacher's log-probabilities are recomputed from the stored
                // final-norm target each step: kept, they would be 32 × 512 ×
                // 49,152 floats (~3.2 GB) for SmolLM2's calibration set.
                let [b, s, _] = out.dims();
                let teacher = log_softmax(self.model.logits(target), 2).detach();
                let student = log_softmax(self.model.logits(out), 2);
                (teacher.clone().exp() * (teacher - student))
                    .sum()
                    .div_scalar((b * s) as f32)
            }
        }
    }

    /// One step on window `i` through the whole stack's graph.
    fn step_whole(
        &self,
        i: usize,
        step: usize,
        lrs: [f64; 3],
        p: Params,
        opt: &mut Optimizers,
    ) -> Result<(Params, f32)> {
        let loss = {
            let out = self.compared(
                self.model
                    .forward_residual_with(self.tokens[i].clone(), None, &self.hooks(&p)),
            );
            self.loss(out, self.targets[i].clone())
        };
        let value = to_vec(loss.clone().detach().reshape([1]))[0];
        check_finite(step, value)?;
        let mut grads = loss.backward();
        Ok((opt.step(lrs, p, &mut grads), value))
    }

    /// One step on window `i`, one layer's graph at a time: forward without
    /// keeping graphs, saving each layer's input; then backward one layer at a
    /// time from the last, recomputing that layer's forward and injecting the
    /// gradient of its output. Each layer's parameters step as soon as their
    /// gradient is known: AdamW is per parameter and no later layer's gradient
    /// depends on them.
    fn step_per_layer(
        &self,
        i: usize,
        step: usize,
        lrs: [f64; 3],
        positions: &oqt_model::llama::Positions,
        mut p: Params,
        opt: &mut Optimizers,
    ) -> Result<(Params, f32)> {
        let n_layers = self.site_index.len();
        let mut inputs = Vec::with_capacity(n_layers + 1);
        {
            // Parameters off the autodiff graph: a detached output alone
            // would not free the graph recorded behind it.
            let detached = Params {
                smooth: p.smooth.valid(),
                clip: p.clip.valid(),
                ranges: p.ranges.valid(),
            };
            let h = self.hooks(&detached);
            inputs.push(self.model.embed_with(self.tokens[i].clone(), &h));
            for l in 0..n_layers {
                let y = self.model.layer_with(l, inputs[l].clone(), positions, &h);
                inputs.push(y);
            }
        }
        let out = inputs.pop().expect("n_layers + 1 inputs");
        let target = self.targets[i].clone();
        let (value, mut upstream) = match self.opts.loss {
            LayerLoss::LastLayer => {
                let n = target.shape().num_elements() as f32;
                let diff = (out - target).inner();
                let value = to_vec(diff.clone().powi_scalar(2).mean().reshape([1]))[0];
                (value, diff.mul_scalar(2.0 / n))
            }
            LayerLoss::FinalNorm | LayerLoss::LogitsKl => {
                // The loss's gradient at the last layer's output, through the norm.
                let out = out.inner().autodiff().require_grad();
                let loss = self.loss(self.compared(out.clone()), target);
                let value = to_vec(loss.clone().detach().reshape([1]))[0];
                let grads = loss.backward();
                (value, out.grad(&grads).expect("the output is tracked"))
            }
        };
        check_finite(step, value)?;
        for l in (0..n_layers).rev() {
            let x = inputs.pop().expect("layer input").autodiff().require_grad();
            let mut grads = (self.model.layer_with(l, x.clone(), positions, &self.hooks(&p)) * upstream)
                .sum()
                .backward();
            upstream = x.grad(&grads).expect("the layer input is tracked");
            p = opt.step(lrs, p, &mut grads);
        }
        if self.embed_index.is_some() {
            let mut grads = (self.model.embed_with(self.tokens[i].clone(), &self.hooks(&p)) * upstream)
                .sum()
                .backward();
            p = opt.step(lrs, p, &mut grads);
        }
        Ok((p, value))
    }
}

/// Train MobileQuant's parameters on `windows` for the float model `weights`
/// (already transformed by the initialisation); `grids` are the calibrated
/// static grids of those weights. Returns what to fold and export. The weights
/// are taken by value: they become the frozen training model, so a 1B model
/// is not held twice while it trains.
#[allow(clippy::too_many_arguments)]
pub fn train(
    cfg: &LlamaConfig,
    weights: ModelWeights,
    spec: &QuantSpec,
    grids: &BTreeMap<String, ActGrid>,
    windows: &[Vec<u32>],
    opts: &MobileQuantSpec,
    on_step: &mut StepCallback<'_>,
) -> Result<Learned> {
    if cfg.attention_bias {
        return Err(CoreError::Other(
            "MobileQuant does not train models with attention biases yet".into(),
        ));
    }
    if windows.is_empty() {
        return Err(CoreError::Other(
            "MobileQuant needs at least one calibration window".into(),
        ));
    }
    let device = Device::flex().autodiff();
    let n_layers = cfg.num_layers;
    let rows = |l: usize, p: Proj| weights.get(&p.weight_name(l)).map(|t| t.shape[0]);
    let rows: Vec<[usize; 7]> = (0..n_layers)
        .map(|l| Proj::PER_LAYER.map(|p| rows(l, p).expect("validated")))
        .collect();
    let model = oqt_model::llama_from_weights(cfg, weights, &device).freeze();
    let sites = TrainedSites::new(spec, grids, n_layers, &device)?;

    let ones: Vec<LayerScales> = (0..n_layers).map(|l| LayerScales::identity(cfg, l)).collect();
    let mut params = Params {
        smooth: SmoothParams {
            attn: ones.iter().map(|o| param1(&o.attn, &device)).collect(),
            mlp: ones.iter().map(|o| param1(&o.mlp, &device)).collect(),
            down: ones.iter().map(|o| param1(&o.down, &device)).collect(),
            vo: ones.iter().map(|o| param1(&o.vo, &device)).collect(),
        },
        clip: ClipParams {
            logits: (0..n_layers)
                .flat_map(|l| rows[l].map(|r| param1(&vec![opts.clip_init; r], &device)))
                .collect(),
        },
        ranges: RangeParams {
            sites: sites.quantizers,
        },
    };
    let vo_expand: Tensor<1, Int> = Tensor::from_data(
        TensorData::new(
            (0..cfg.num_heads * cfg.head_dim)
                .map(|c| kv_channel(cfg, c) as i64)
                .collect::<Vec<_>>(),
            [cfg.num_heads * cfg.head_dim],
        ),
        &device,
    );
    let tokens: Vec<Tensor<2, Int>> = windows.iter().map(|w| model.tokens_tensor(w)).collect();
    let mut trainer = Trainer {
        model,
        opts,
        site_index: sites.index,
        embed_index: sites.embed,
        probs: (spec.activations.mode == oqt_core::quant::ActMode::Static)
            .then(|| ActGrid::probabilities(ActSite::Probs.bits(spec))),
        specs: (0..n_layers)
            .map(|l| Proj::PER_LAYER.map(|p| spec.weights_for(&p.weight_name(l))))
            .collect(),
        vo_expand,
        tokens,
        targets: Vec::new(),
    };
    // Float targets once: the model is frozen, so this builds no graph.
    trainer.targets = trainer
        .tokens
        .iter()
        .map(|t| {
            trainer
                .compared(
                    trainer
                        .model
                        .forward_residual_with(t.clone(), None, &oqt_model::NoHooks),
                )
                .detach()
        })
        .collect();

    let per_layer = match opts.checkpointing {
        Checkpointing::PerLayer => true,
        Checkpointing::Off => false,
        Checkpointing::Auto => cfg.decoder_linear_params() > AUTO_CHECKPOINT_PARAMS,
    };
    tracing::debug!(per_layer, "MobileQuant backward");
    let seq = windows[0].len();
    if per_layer && windows.iter().any(|w| w.len() != seq) {
        return Err(CoreError::Other(
            "per-layer checkpointing needs calibration windows of one length".into(),
        ));
    }
    let positions = trainer.model.positions(seq, &device);

    let mut opt = Optimizers::new();
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let i = step % trainer.tokens.len();
        let lrs = [
            cosine_lr(opts.lr_smooth, step, opts.steps),
            cosine_lr(opts.lr_clip, step, opts.steps),
            cosine_lr(opts.lr_range, step, opts.steps),
        ];
        let value;
        (params, value) = if per_layer {
            trainer.step_per_layer(i, step, lrs, &positions, params, &mut opt)?
        } else {
            trainer.step_whole(i, step, lrs, params, &mut opt)?
        };
        losses.push(value);
        on_step(step + 1, opts.steps, value);
    }
    Ok(learned(cfg, &params, &sites.keys, grids, losses))
}

/// The trained parameters as plain numbers: smoothing divisors, clip ratios
/// and every static site's grid (trained ones replaced).
fn learned(
    cfg: &LlamaConfig,
    p: &Params,
    keys: &[String],
    grids: &BTreeMap<String, ActGrid>,
    losses: Vec<f32>,
) -> Learned {
    let scales = (0..cfg.num_layers)
        .map(|l| LayerScales {
            attn: to_vec(p.smooth.attn[l].val()),
            mlp: to_vec(p.smooth.mlp[l].val()),
            down: to_vec(p.smooth.down[l].val()),
            vo: to_vec(p.smooth.vo[l].val()),
        })
        .collect();
    let mut clips = BTreeMap::new();
    for l in 0..cfg.num_layers {
        for (j, proj) in Proj::PER_LAYER.iter().enumerate() {
            let c: Vec<f32> = to_vec(sigmoid(p.clip.logits[l * 7 + j].val()));
            clips.insert(proj.weight_name(l), c);
        }
    }
    let mut out_grids = grids.clone();
    for (key, q) in keys.iter().zip(&p.ranges.sites) {
        out_grids.insert(key.clone(), q.grid());
    }
    Learned {
        scales,
        clips,
        grids: out_grids,
        losses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::{random_weights, tiny_config};

    /// A tiny random model (`seed`), `n` windows of `len` tokens (token `i` of
    /// window `w` is `i·mul + w·off` mod vocab) and its `w4a8` grids.
    fn calibrated_tiny_model(
        seed: u64,
        n: usize,
        len: usize,
        mul: usize,
        off: usize,
    ) -> (
        LlamaConfig,
        ModelWeights,
        oqt_core::quant::Recipe,
        Vec<Vec<u32>>,
        BTreeMap<String, ActGrid>,
    ) {
        let cfg = tiny_config();
        let weights = random_weights(&cfg, seed);
        let spec = oqt_core::quant::load_recipe("w4a8").unwrap();
        let windows: Vec<Vec<u32>> = (0..n)
            .map(|w| {
                (0..len)
                    .map(|i| ((i * mul + w * off) % cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        let llama = oqt_model::llama_from_weights(&cfg, weights.clone(), &Device::flex());
        let grids =
            crate::stats::calibrate::calibrate(&llama, &spec.spec, &spec.calibration, &windows, |_, _| {}).unwrap();
        (cfg, weights, spec, windows, grids)
    }

    #[test]
    fn cosine_schedule_runs_from_start_to_end() {
        assert!((cosine_lr([1e-2, 1e-3], 0, 11) - 1e-2).abs() < 1e-12);
        assert!((cosine_lr([1e-2, 1e-3], 10, 11) - 1e-3).abs() < 1e-12);
        assert!((cosine_lr([1e-2, 1e-3], 5, 11) - 5.5e-3).abs() < 1e-12);
    }

    #[test]
    fn per_layer_checkpointing_learns_what_the_whole_graph_learns_under_every_loss() {
        let raw = per_layer_checkpointing_matches_the_whole_graph(LayerLoss::LastLayer);
        let normed = per_layer_checkpointing_matches_the_whole_graph(LayerLoss::FinalNorm);
        // The norm is applied: same start, a different quantity compared.
        assert!(
            (normed[0] - raw[0]).abs() > 1e-3 * raw[0].abs(),
            "{normed:?} vs {raw:?}"
        );
        let kl = per_layer_checkpointing_matches_the_whole_graph(LayerLoss::LogitsKl);
        // A divergence: positive, and smaller as the quantizers learn.
        assert!(kl.iter().all(|&v| v > 0.0), "{kl:?}");
        assert!(kl[5] < kl[0], "{kl:?}");
    }

    /// Trains 6 steps with and without per-layer checkpointing, asserts the
    /// two agree, and returns the losses.
    fn per_layer_checkpointing_matches_the_whole_graph(loss: LayerLoss) -> Vec<f32> {
        let (cfg, weights, spec, windows, grids) = calibrated_tiny_model(7, 2, 24, 29, 13);
        let run = |checkpointing| {
            let opts = MobileQuantSpec {
                steps: 6,
                checkpointing,
                loss,
                ..MobileQuantSpec::default()
            };
            train(
                &cfg,
                weights.clone(),
                &spec.spec,
                &grids,
                &windows,
                &opts,
                &mut |_, _, _| {},
            )
            .unwrap()
        };
        let (whole, layered) = (run(Checkpointing::Off), run(Checkpointing::PerLayer));
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1e-3);
        for (a, b) in whole.losses.iter().zip(&layered.losses) {
            assert!(close(*a, *b), "losses {:?} vs {:?}", whole.losses, layered.losses);
        }
        // The last steps' losses differ from the first: the parameters moved.
        assert_ne!(whole.losses[0], whole.losses[5]);
        for (a, b) in whole.scales.iter().zip(&layered.scales) {
            for (x, y) in [(&a.attn, &b.attn), (&a.mlp, &b.mlp), (&a.down, &b.down), (&a.vo, &b.vo)] {
                assert!(x.iter().zip(y).all(|(p, q)| close(*p, *q)), "{x:?} vs {y:?}");
            }
            assert!(a.down.iter().any(|&v| v != 1.0));
        }
        for (k, c) in &whole.clips {
            assert!(c.iter().zip(&layered.clips[k]).all(|(p, q)| close(*p, *q)), "{k}");
        }
        for (k, g) in &whole.grids {
            let h = &layered.grids[k];
            assert!(
                close(g.scale, h.scale) && (g.zero_point - h.zero_point).abs() <= 1,
                "{k}: {g:?} vs {h:?}"
            );
        }
        assert!(whole.grids.iter().any(|(k, g)| grids[k] != *g), "the ranges moved");
        whole.losses
    }

    #[test]
    fn training_lowers_the_loss_and_exports_every_grid_and_clip() {
        let (cfg, weights, spec, windows, grids) = calibrated_tiny_model(12, 1, 32, 37, 11);
        let opts = MobileQuantSpec {
            steps: 30,
            ..MobileQuantSpec::default()
        };
        let mut seen = 0;
        let learned = train(
            &cfg,
            weights.clone(),
            &spec.spec,
            &grids,
            &windows,
            &opts,
            &mut |s, n, _| {
                assert_eq!(n, 30);
                seen = s;
            },
        )
        .unwrap();
        assert_eq!(seen, 30);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (first, last) = (mean(&learned.losses[..5]), mean(&learned.losses[25..]));
        assert!(last < 0.9 * first, "loss {first} → {last}: {:?}", learned.losses);
        assert_eq!(learned.scales.len(), cfg.num_layers);
        assert_eq!(learned.clips.len(), cfg.num_layers * 7);
        assert!(learned.clips.values().flatten().all(|&c| c > 0.0 && c <= 1.0));
        assert_eq!(learned.grids.len(), grids.len());
        assert!(learned.grids.values().all(|g| g.scale > 0.0 && g.scale.is_finite()));
        // Something was learned in each group.
        assert!(learned.scales.iter().any(|s| s.attn.iter().any(|&v| v != 1.0)));
        assert!(learned.grids.iter().any(|(k, g)| grids[k] != *g));
    }
}
