//! oqt-core: everything both worlds of oqt share and that needs no Burn —
//! model config, GGUF / safetensors I/O, tokenizer and chat template,
//! named datasets.

pub mod bundle;
pub mod chat;
pub mod config;
pub mod datasets;
pub mod encoding;
pub mod error;
pub mod fs;
pub mod generation;
pub mod gguf;
pub mod inspect;
pub mod load;
pub mod lora;
pub mod lut;
pub mod quant;
pub mod sampling;
pub mod scoring;
pub mod sharing;
pub mod sparse;
pub mod sys;
pub mod tensorboard;
pub mod testing;
pub mod tokenizer;
pub mod tokenizer_gguf;
pub mod weights;
pub mod zo;

pub use config::LlamaConfig;
pub use error::{CoreError, Result};
pub use load::{LoadedModel, ModelFormat, load_model};
pub use tokenizer::Tokenizer;
pub use weights::{ModelWeights, TensorF32};
