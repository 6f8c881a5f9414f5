//! oqt-runtime: runs an oqt bundle the way a phone would — plain Rust, the
//! integer kernels of `oqt-kernels` for quantized linears, f32 for norms,
//! RoPE, attention and the KV cache. No Burn.
//!
//! Supported today: bundles whose linears are f32, or quantized with
//! **dynamic** int8 activations (`w4a8-dyn`-style), or **weight-only** (`w4a16`,
//! `w8a16`: weights dequantized to f32 at load). Static NPU-style activation
//! grids (`w4a8`, `w8a8`) are refused with a clear error until calibration lands.

mod attention;
pub mod generate;
pub mod linear;
mod model;
pub mod reference;

pub use model::{KvCache, RuntimeModel};
