//! The model quantization-aware training moves: a float [`Llama`] whose
//! linear layers compute through the recipe's fake quantizers (weights on the
//! recipe's grid, inputs quantized as the recipe says), trained on next-token
//! cross-entropy. [`QatModel`] exposes its trainable tensors to the
//! zeroth-order optimizer ([`crate::zeroqat`]).
//!
//! Which tensors train ([`Trainable`]):
//! * `Full`: every decoder linear weight (the latent float weights under the
//!   fake quantizer) and every RMSNorm gain;
//! * `Lightweight`: the RMSNorm gains only (~0.03% of SmolLM2's parameters).
//!   A gain scales the input channels of the q/k/v or gate/up projections
//!   before their inputs are quantized, so it acts as a learned per-channel
//!   smoothing of every quantized matmul — the quantizer-facing parameters —
//!   while the frozen weights could stay stored as integers.
//!
//! Dynamic (per-token), llama.cpp Q8_0-block and float activations are
//! simulated; static NPU grids are not trained here yet.

use crate::zeroqat::ZoTrainable;
use burn::module::Param;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use oqt_core::quant::{ActMode, QuantSpec};
use oqt_core::weights::{ModelWeights, TensorF32, names};
use oqt_core::{CoreError, Result};
use oqt_model::fake_quant::{fake_quant_dynamic_rows, fake_quant_q8_0_blocks, fake_quant_weight};
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use std::collections::BTreeMap;

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
}

pub struct QatModel {
    pub llama: Llama,
    pub spec: QuantSpec,
    targets: Vec<Target>,
    /// The head's weights on their grid, `[in, out]`: never trained, quantized once.
    head: Tensor<2>,
    /// Decoder linears already on their grid (lightweight runs freeze them so).
    prequantized: bool,
}

struct QatHooks<'a> {
    llama: &'a Llama,
    spec: &'a QuantSpec,
    head: &'a Tensor<2>,
    prequantized: bool,
}

impl ForwardHooks for QatHooks<'_> {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, _float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let x = match self.spec.activations.mode {
            ActMode::Dynamic => fake_quant_dynamic_rows(x),
            ActMode::LlamaCppQ8_0 => fake_quant_q8_0_blocks(x),
            ActMode::None | ActMode::Static => x,
        };
        let w = match proj {
            Proj::Head => self.head.clone(),
            p if self.prequantized => self.llama.decoder_linear(layer, p).weight.val(),
            p => fake_quant_weight(
                self.llama.decoder_linear(layer, p).weight.val(),
                &self.spec.weights_for(&p.weight_name(layer)),
                1.0,
            ),
        };
        let [b, t, d_in] = x.dims();
        let d_out = w.dims()[1];
        x.reshape([b * t, d_in]).matmul(w).reshape([b, t, d_out])
    }
}

impl QatModel {
    pub fn new(llama: Llama, spec: QuantSpec, trainable: Trainable) -> Result<Self> {
        if spec.activations.mode == ActMode::Static {
            return Err(CoreError::Other(
                "QAT of static (NPU) activation grids is not implemented yet; use a dynamic recipe such as w4a8-dyn"
                    .into(),
            ));
        }
        if llama.layers.iter().any(|b| b.attn.q_proj.bias.is_some()) {
            return Err(CoreError::Other(
                "QAT of models with q/k/v biases is not implemented yet".into(),
            ));
        }
        let n = llama.layers.len();
        let mut targets = Vec::new();
        if trainable == Trainable::Full {
            for l in 0..n {
                targets.extend(Proj::PER_LAYER.iter().map(|&p| Target::Linear(l, p)));
            }
        }
        for l in 0..n {
            targets.push(Target::AttnNorm(l));
            targets.push(Target::MlpNorm(l));
        }
        targets.push(Target::FinalNorm);
        let head = match &llama.lm_head {
            Some(h) => fake_quant_weight(h.weight.val(), &spec.weights_for(names::LM_HEAD), 1.0),
            None => fake_quant_weight(
                llama.embed_tokens.weight.val().transpose(),
                &spec.weights_for(names::EMBED),
                1.0,
            ),
        };
        let mut llama = llama;
        let prequantized = trainable == Trainable::Lightweight;
        if prequantized {
            // Frozen weights go onto their grid once; the forward then skips their quantizers.
            for l in 0..n {
                for &p in Proj::PER_LAYER.iter() {
                    let spec_w = spec.weights_for(&p.weight_name(l));
                    let lin = llama.decoder_linear_mut(l, p);
                    lin.weight = Param::from_tensor(fake_quant_weight(lin.weight.val(), &spec_w, 1.0));
                }
            }
        }
        Ok(Self {
            llama,
            spec,
            targets,
            head,
            prequantized,
        })
    }

    /// Mean next-token cross-entropy over `windows` (equal lengths, one batch).
    pub fn loss(&self, windows: &[Vec<u32>]) -> Result<f32> {
        let (b, s) = (windows.len(), windows.first().map_or(0, Vec::len));
        if b == 0 || s < 2 || windows.iter().any(|w| w.len() != s) {
            return Err(CoreError::Other(format!(
                "a training batch needs equal windows of at least 2 tokens, found {b} windows"
            )));
        }
        let device = self.llama.device();
        let ids: Vec<i64> = windows.iter().flatten().map(|&t| t as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
        let hooks = QatHooks {
            llama: &self.llama,
            spec: &self.spec,
            head: &self.head,
            prequantized: self.prequantized,
        };
        let hidden = self.llama.forward_hidden_with(tokens.clone(), None, &hooks);
        let d = hidden.dims()[2];
        let hidden = hidden.slice([0..b, 0..s - 1, 0..d]);
        let lp = log_softmax(self.llama.logits_with(hidden, &hooks), 2);
        let targets = tokens.slice([0..b, 1..s]).reshape([b, s - 1, 1]);
        let nll = lp.gather(2, targets).neg().mean();
        let v = nll
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| CoreError::Other(format!("reading the loss: {e:?}")))?;
        Ok(v[0])
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
            })
            .collect()
    }

    /// Tensor `i` as it stands (Burn layout, flattened).
    pub fn tensor_values(&self, i: usize) -> Vec<f32> {
        self.values_of(self.targets[i])
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 parameters")
    }

    /// Replace tensor `i` (checkpoint restore): `θ_i ← values`.
    pub fn set_tensor(&mut self, i: usize, values: &[f32]) {
        self.update(i, 0.0, 1.0, values);
    }

    /// The model's weights in canonical layout (trainable tensors as trained;
    /// everything else as loaded, or on its grid when pre-quantized), with the
    /// storage type each name had when loaded (`source_types`; "f32" otherwise).
    pub fn float_weights(&self, source_types: &BTreeMap<String, String>) -> ModelWeights {
        fn read(t: Tensor<2>) -> (Vec<usize>, Vec<f32>) {
            let [r, c] = t.dims();
            let v = t
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 weights");
            (vec![r, c], v)
        }
        // Burn keeps linears as [in, out]; canonical is [out, in].
        let linear = |w: Tensor<2>| {
            let (shape, v) = read(w.transpose());
            TensorF32::new(shape, v)
        };
        let vector = |g: Tensor<1>| {
            let v = g
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 weights");
            TensorF32::new(vec![v.len()], v)
        };
        let mut out = ModelWeights::default();
        let mut put = |name: String, t: TensorF32| {
            let source = source_types.get(&name).map_or("f32", String::as_str).to_string();
            out.insert(name, t, source);
        };
        let (shape, v) = read(self.llama.embed_tokens.weight.val());
        put(names::EMBED.to_string(), TensorF32::new(shape, v));
        if let Some(h) = &self.llama.lm_head {
            put(names::LM_HEAD.to_string(), linear(h.weight.val()));
        }
        put(names::FINAL_NORM.to_string(), vector(self.llama.norm.gamma.val()));
        for (l, b) in self.llama.layers.iter().enumerate() {
            put(names::layer(l, names::ATTN_NORM), vector(b.input_layernorm.gamma.val()));
            put(
                names::layer(l, names::MLP_NORM),
                vector(b.post_attention_layernorm.gamma.val()),
            );
            for &p in Proj::PER_LAYER.iter() {
                put(p.weight_name(l), linear(self.llama.decoder_linear(l, p).weight.val()));
            }
        }
        out
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
        }
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
        let device = self.llama.device();
        let z = Tensor::<1>::from_data(TensorData::new(z.to_vec(), [z.len()]), &device);
        match self.targets[i] {
            Target::Linear(l, p) => {
                let lin = self.llama.decoder_linear_mut(l, p);
                let w = lin.weight.val();
                let dims = w.dims();
                lin.weight = Param::from_tensor(w * a + z.reshape(dims) * b);
            }
            Target::AttnNorm(l) => {
                let g = &mut self.llama.layers[l].input_layernorm.gamma;
                *g = Param::from_tensor(g.val() * a + z * b);
            }
            Target::MlpNorm(l) => {
                let g = &mut self.llama.layers[l].post_attention_layernorm.gamma;
                *g = Param::from_tensor(g.val() * a + z * b);
            }
            Target::FinalNorm => {
                let g = &mut self.llama.norm.gamma;
                *g = Param::from_tensor(g.val() * a + z * b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zeroqat::{SpsaConfig, spsa_step};
    use burn::tensor::Device;
    use oqt_core::quant::builtin_recipe;
    use oqt_core::testing::{random_weights, tiny_config};

    fn model(trainable: Trainable) -> QatModel {
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 21), &Device::flex());
        let spec = builtin_recipe("w4a8-dyn").unwrap().unwrap().spec;
        QatModel::new(llama, spec, trainable).unwrap()
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
            let start = m.loss(&data).unwrap();
            let cfg = SpsaConfig {
                eps: 1e-2,
                lr,
                n_spsa: 2,
                seed: 5,
                grad_clip: 20.0,
                ..Default::default()
            };
            for step in 0..40 {
                spsa_step(&mut m, &cfg, step, 40, &mut |m: &QatModel| m.loss(&data)).unwrap();
            }
            let end = m.loss(&data).unwrap();
            assert!(end < start - 0.01, "{trainable:?}: loss {start} → {end}");
        }
    }

    #[test]
    fn static_recipes_are_refused_with_a_reason() {
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 1), &Device::flex());
        let spec = builtin_recipe("w4a8").unwrap().unwrap().spec;
        let e = QatModel::new(llama, spec, Trainable::Full).err().unwrap().to_string();
        assert!(e.contains("static"), "{e}");
    }
}
