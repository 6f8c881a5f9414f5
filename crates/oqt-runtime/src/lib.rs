//! oqt-runtime: runs an oqt bundle the way a phone would — plain Rust, the
//! integer kernels of `oqt-kernels` for quantized linears, f32 for norms,
//! RoPE, attention and the KV cache. No Burn.
//!
//! Runs bundles whose linears are f32, quantized with dynamic int8
//! activations (`w4a8-dyn`), static NPU-style grids (`w4a8`, `w8a8`, 16-bit
//! inputs) or weight-only (dequantized at load), and GGUF Q4_0/Q8_0 files.
//! Parallel loops run on `oqt_kernels::team` (threads that spin between ops).

mod attention;
pub mod finetune;
pub mod generate;
pub mod linear;
mod model;
pub mod reference;

pub use model::{KvCache, RuntimeModel};
