//! Weight clustering (palettization): every weight an index into a small
//! table of values, stored as the `lut` encoding (`oqt_core::lut`).
//!
//! * [`kmeans`] — post-training k-means per tensor or per group of output
//!   channels, importance-weighted by calibration (coremltools' baseline);
//! * [`dkm`] — DKM's differentiable soft assignment, naive and in eDKM's
//!   uniquified form (`[U, K]` tables in place of `[N, K]`, same gradients);
//! * [`edkm`] — DKM/eDKM training layer by layer, with [`checkpoint`]s;
//! * [`job`] — a whole model into a bundle (the `cluster` recipe step).

pub mod checkpoint;
pub mod dkm;
pub mod edkm;
pub mod kmeans;

pub use kmeans::{KmeansOptions, palettize};
pub mod job;

pub use job::{ClusterReport, ClusterRun, cluster_to_bundle};
