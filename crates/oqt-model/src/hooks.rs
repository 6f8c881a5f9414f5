//! Points where a method changes the forward pass without its own copy of the
//! model: every linear layer, every activation site of
//! [`oqt_core::quant::sites`] and the attention probabilities. The plain model
//! uses [`NoHooks`]; calibration observes through them and the fake-quant
//! simulation quantizes through them.

use burn::tensor::Tensor;
use oqt_core::quant::ActSite;
use oqt_core::weights::names;

/// A linear layer of a decoder layer, or the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Head,
}

impl Proj {
    pub const PER_LAYER: [Proj; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The activation site this layer reads.
    pub fn input_site(self) -> ActSite {
        match self {
            Self::Q | Self::K | Self::V => ActSite::AttnIn,
            Self::O => ActSite::AttnOut,
            Self::Gate | Self::Up => ActSite::MlpIn,
            Self::Down => ActSite::DownIn,
            Self::Head => ActSite::FinalIn,
        }
    }

    /// Canonical weight name (for the head: the separate head's name).
    pub fn weight_name(self, layer: usize) -> String {
        let suffix = match self {
            Self::Q => names::Q,
            Self::K => names::K,
            Self::V => names::V,
            Self::O => names::O,
            Self::Gate => names::GATE,
            Self::Up => names::UP,
            Self::Down => names::DOWN,
            Self::Head => return names::LM_HEAD.to_string(),
        };
        names::layer(layer, suffix)
    }
}

pub trait ForwardHooks {
    /// The output of linear `proj` of `layer` for input `x`; `float` computes
    /// the unmodified layer (weights and bias as the model holds them).
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let _ = (layer, proj);
        float(x)
    }

    /// The tensor at `site` (of `layer` for per-layer sites). Linear inputs are
    /// not passed here: [`ForwardHooks::linear`] sees them.
    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        let _ = (layer, site);
        x
    }

    /// Use the reference float arithmetic (`crate::reference_ops`) between
    /// quantizers: order-independent reductions that the runtime computes bit
    /// for bit. Quantized simulations need it (one flipped rounding cascades
    /// through every later grid); the plain float model does not.
    fn reference_arithmetic(&self) -> bool {
        false
    }

    /// Attention probabilities `[batch, heads, queries, keys]` after softmax.
    fn probs(&self, layer: usize, p: Tensor<4>) -> Tensor<4> {
        let _ = layer;
        p
    }
}

/// The unmodified forward pass.
pub struct NoHooks;

impl ForwardHooks for NoHooks {}
