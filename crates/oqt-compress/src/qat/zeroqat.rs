//! ZeroQAT's optimizer (SPSA with the seed trick) lives in [`oqt_core::zo`],
//! Burn-free, so the runtime's own fine-tuning runs the very same steps.

pub use oqt_core::zo::*;
