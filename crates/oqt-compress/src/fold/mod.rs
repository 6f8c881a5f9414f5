//! Depth compression (FoldGPT and its baselines): which decoder blocks a
//! model can lose, and the model without them.
//!
//! * [`influence`] — ShortGPT's Block Influence (a one-shot score);
//! * [`gates`] — FoldGPT's learned block gates under an exact budget;
//! * [`remove`] — the model without the chosen blocks;
//! * [`share`] — blocks that use the block before them's linears, row-scaled;
//! * [`job`] — one `oqt fold` run: choose (`foldgpt`, `shortgpt` or
//!   `last-n`), remove, write a float bundle that `oqt distill` heals.

pub mod gates;
pub mod influence;
pub mod job;
pub mod remove;
pub mod share;

pub use influence::block_influence;
