//! oqt-model: the Llama-family decoder on Burn. One implementation serves
//! every backend (Flex on CPU by default, wgpu behind the `wgpu` feature) and
//! every later method (fake quantization, autodiff, zeroth-order training).

pub mod device;
pub mod fake_quant;
pub mod generate;
pub mod hooks;
pub mod import;
pub mod llama;
pub mod lora;
pub mod quant_sim;
pub mod reference_ops;
pub mod scoring;

pub use device::{DeviceKind, select_device};
pub use hooks::{ForwardHooks, NoHooks, Proj};
pub use import::{llama_from_loaded, llama_from_weights, set_decoder_weight};
pub use llama::{KvCache, Llama};
pub use quant_sim::{QuantSim, SimulatedModel};
