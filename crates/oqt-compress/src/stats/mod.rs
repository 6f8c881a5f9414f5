//! What methods measure on calibration data and share: activation ranges and
//! static grids ([`calibrate`]), per-linear input statistics ([`inputs`]:
//! channel maxima and means, Hessians `XᵀX` for GPTQ — and SparseGPT, which
//! reuses them), and per-layer sensitivity ([`sensitivity`]).

pub mod calibrate;
pub mod hessian;
pub mod inputs;
pub mod sensitivity;
