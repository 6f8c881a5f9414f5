//! oqt-eval: evaluations that work on any [`CausalLm`] — the Burn model, the
//! fake-quantized model, the integer runtime — so their numbers are comparable.

pub mod perplexity;

pub use perplexity::{ChunkProgress, PerplexityOptions, PerplexityReport, perplexity};
pub mod recipe;

pub use recipe::{Check, EvalRecipe, Verdict};
