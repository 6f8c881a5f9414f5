//! Depth compression (issue 40, in progress): which decoder blocks a model
//! can lose. So far [`influence`] — ShortGPT's Block Influence, the baseline
//! FoldGPT is compared against; block removal, sharing and healing follow.

pub mod influence;

pub use influence::block_influence;
