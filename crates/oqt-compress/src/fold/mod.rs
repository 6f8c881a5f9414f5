//! Depth compression (FoldGPT and its baselines): which decoder blocks a
//! model can lose, and the model without them.
//!
//! * [`influence`] — ShortGPT's Block Influence (a one-shot score);
//! * [`gates`] — FoldGPT's learned block gates under an exact budget;
//! * [`remove`] — the model without the chosen blocks;
//! * [`job`] — one `oqt fold` run: choose (`foldgpt`, `shortgpt` or
//!   `last-n`), remove, write a float bundle that `oqt distill` heals.

pub mod gates;
pub mod influence;
pub mod job;
pub mod remove;

pub use influence::block_influence;
