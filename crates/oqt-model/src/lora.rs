//! A LoRA adapter on top of any forward pass ([`LoraHooks`]): each adapted
//! linear adds `s·(x·Aᵀ)·Bᵀ`, in f32 on the linear's float input, to what the
//! inner hooks compute — over [`crate::QuantSim`], the runtime's arithmetic
//! with the runtime's unmerged adapter ([`AdaptedSimulation`]).

use crate::hooks::{ForwardHooks, Proj};
use crate::quant_sim::SimulatedModel;
use crate::scoring::{log_probs_with, score_window_with};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use oqt_core::Result;
use oqt_core::lora::{LoraAdapter, LoraModule};
use oqt_core::quant::ActSite;
use oqt_core::scoring::{CausalLm, WindowScores};
use std::collections::HashMap;

/// The decoder linear a LoRA module adapts.
pub fn proj_of(m: LoraModule) -> Proj {
    match m {
        LoraModule::Q => Proj::Q,
        LoraModule::K => Proj::K,
        LoraModule::V => Proj::V,
        LoraModule::O => Proj::O,
        LoraModule::Gate => Proj::Gate,
        LoraModule::Up => Proj::Up,
        LoraModule::Down => Proj::Down,
    }
}

/// The LoRA module of a decoder linear (`None` for the head).
pub fn lora_module(p: Proj) -> Option<LoraModule> {
    Some(match p {
        Proj::Q => LoraModule::Q,
        Proj::K => LoraModule::K,
        Proj::V => LoraModule::V,
        Proj::O => LoraModule::O,
        Proj::Gate => LoraModule::Gate,
        Proj::Up => LoraModule::Up,
        Proj::Down => LoraModule::Down,
        Proj::Head => return None,
    })
}

/// An adapter's factors as tensors: `(Aᵀ [in, r], Bᵀ [r, out])` per linear.
pub struct LoraTensors {
    pairs: HashMap<(usize, Proj), (Tensor<2>, Tensor<2>)>,
    scaling: f32,
}

impl LoraTensors {
    pub fn new(adapter: &LoraAdapter, device: &Device) -> Self {
        let r = adapter.rank;
        let pairs = adapter
            .pairs
            .iter()
            .map(|(&(l, m), p)| {
                let a = Tensor::<2>::from_data(TensorData::new(p.a.clone(), [r, p.cols]), device).transpose();
                let b = Tensor::<2>::from_data(TensorData::new(p.b.clone(), [p.rows, r]), device).transpose();
                ((l, proj_of(m)), (a, b))
            })
            .collect();
        Self {
            pairs,
            scaling: adapter.scaling(),
        }
    }

    /// The update of `(layer, proj)` for input `x` `[b, t, in]`, if adapted.
    /// `exact`: both products accumulated in f64 and rounded once to f32, as
    /// the runtime's [`LoraAdapter::delta`] computes them (a last-bit
    /// difference here flips a later dynamic quantizer's rounding).
    pub fn delta(&self, layer: usize, proj: Proj, x: Tensor<3>, exact: bool) -> Option<Tensor<3>> {
        let (a, b) = self.pairs.get(&(layer, proj))?;
        let [bs, t, d] = x.dims();
        let out = b.dims()[1];
        let x = x.reshape([bs * t, d]);
        let y = if exact {
            let f64 = |t: Tensor<2>| t.cast(FloatDType::F64);
            let u = f64(x).matmul(f64(a.clone())).cast(FloatDType::F32) * self.scaling;
            f64(u).matmul(f64(b.clone())).cast(FloatDType::F32)
        } else {
            (x.matmul(a.clone()) * self.scaling).matmul(b.clone())
        };
        Some(y.reshape([bs, t, out]))
    }
}

/// `inner`'s forward with the adapter's update added to each adapted linear.
pub struct LoraHooks<'a> {
    pub inner: &'a dyn ForwardHooks,
    pub lora: &'a LoraTensors,
}

impl ForwardHooks for LoraHooks<'_> {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        match self
            .lora
            .delta(layer, proj, x.clone(), self.inner.reference_arithmetic())
        {
            Some(d) => self.inner.linear(layer, proj, x, float) + d,
            None => self.inner.linear(layer, proj, x, float),
        }
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        self.inner.act(layer, site, x)
    }

    fn reference_arithmetic(&self) -> bool {
        self.inner.reference_arithmetic()
    }

    fn probs(&self, layer: usize, p: Tensor<4>) -> Tensor<4> {
        self.inner.probs(layer, p)
    }
}

/// A bundle's simulation with a LoRA adapter: what the runtime computes with
/// the adapter applied unmerged.
pub struct AdaptedSimulation<'a> {
    pub model: &'a SimulatedModel,
    pub lora: LoraTensors,
}

impl<'a> AdaptedSimulation<'a> {
    pub fn new(model: &'a SimulatedModel, adapter: &LoraAdapter) -> Self {
        let lora = LoraTensors::new(adapter, &model.llama.device());
        Self { model, lora }
    }

    fn hooks(&self) -> LoraHooks<'_> {
        LoraHooks {
            inner: &self.model.sim,
            lora: &self.lora,
        }
    }
}

impl CausalLm for AdaptedSimulation<'_> {
    fn score_window(&self, tokens: &[u32], first: usize) -> Result<WindowScores> {
        score_window_with(&self.model.llama, &self.hooks(), tokens, first)
    }

    fn log_probs(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        log_probs_with(&self.model.llama, &self.hooks(), tokens)
    }
}
