//! Distillation: a teacher's next-token distribution taught to a student.
//!
//! * [`targets`] — the teacher's top-k log-probabilities per position,
//!   computed once before the student exists (ZeroQAT's `--distill` and
//!   `oqt distill` both train on them);
//! * [`cache`] — those targets kept on disk, keyed by teacher, text and batches;
//! * [`hidden`] — block outputs matched to the teacher's through a layer map;
//! * [`job`] — `oqt distill --teacher T --student S`: any loadable model or
//!   bundle as the teacher, a float, folded or quantized student, trained
//!   first-order or zeroth-order on all of its layers or a chosen few.

pub mod cache;
pub mod hidden;
pub mod job;
pub mod targets;

pub use targets::{WindowTargets, kl_to_targets, teacher_targets};
