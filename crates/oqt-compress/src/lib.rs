//! oqt-compress: the methods that turn a float model into a compressed one.
//! Methods never print or parse arguments; they report progress through a callback.

pub mod awq;
pub mod calibrate;
pub mod distill;
pub mod gptq;
pub mod inputs;
pub mod mobilequant;
pub mod ptq;
pub mod qat;
pub mod qat_data;
pub mod qat_model;
pub mod rtn;
pub mod sensitivity;
pub mod smoothing;
pub mod split;
pub mod zeroqat;
