//! Pruning (issue 38, in progress): which weights to zero. Today the scoring
//! rules and the masks they induce (magnitude, Wanda; unstructured per output
//! row and N:M); SparseGPT, DSnoT, the `prune` command and step, and sparse
//! encodings are still to come.

pub mod mask;
pub mod model;
