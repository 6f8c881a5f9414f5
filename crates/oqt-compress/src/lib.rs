//! oqt-compress: the methods that turn a float model into a compressed one,
//! laid out by family:
//!
//! * [`ptq`] — post-training quantization: RTN, SmoothQuant, AWQ, GPTQ,
//!   MobileQuant, outlier channel splitting, one entry point ([`ptq::quantize`]);
//! * [`qat`] — quantization-aware training: the fake-quantized trainable model,
//!   zeroth-order (SPSA) and first-order training, checkpoints, training data,
//!   and one run from start to bundle ([`qat::job`]);
//! * [`stats`] — calibration statistics shared by the methods (activation
//!   ranges, input statistics and Hessians, sensitivity);
//! * [`distill`] — the float teacher's targets;
//! * [`fold`] — depth compression (Block Influence so far).
//!
//! Methods never print or parse arguments; they report progress through a
//! callback. The pipeline that chains them (`oqt-pipeline`) registers each
//! family's entry point as a recipe step kind.

pub mod cluster;
pub mod distill;
pub mod fold;
pub mod lora;
pub mod prune;
pub mod ptq;
pub mod qat;
pub mod stats;
