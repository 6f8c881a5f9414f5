//! Pruning (issue 38): which weights to zero, and how the rest compensate.
//!
//! * [`mask`] — scores and the masks they induce (magnitude, Wanda;
//!   unstructured per output row and N:M);
//! * [`sparsegpt`] — OBS pruning with weight reconstruction (GPTQ's sweep);
//! * [`dsnot`] — training-free prune-and-grow on top of a base mask;
//! * [`model`] — every decoder linear of a model, layer after layer, with the
//!   per-linear report;
//! * [`job`] — one run from a float model to a float bundle with the pruned
//!   linears stored sparse (`oqt prune`, the recipes' `prune` step).

pub mod dsnot;
pub mod job;
pub mod mask;
pub mod model;
pub mod sparsegpt;

pub use dsnot::{DsnotCriterion, DsnotOptions};
pub use job::{PruneOutcome, PruneReport, prune_to_bundle};
pub use mask::Pattern;
pub use model::{PruneMethod, PruneOptions, PrunedLinear, prune_model};
pub use sparsegpt::SparseGptOptions;
