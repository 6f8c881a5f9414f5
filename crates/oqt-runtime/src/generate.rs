//! Generation on the runtime: the shared loop of `oqt_core::generation` over
//! the runtime's KV-cached forward pass.

use crate::model::{KvCache, RuntimeModel};
use oqt_core::Result;
use oqt_core::generation::{GenerationStats, run_generation};
use oqt_core::lora::LoraAdapter;
use oqt_core::sampling::SamplingOptions;
use std::cell::RefCell;

/// Generate up to `max_new` tokens after `prompt`; stops before a token for which `is_stop` holds.
pub fn generate(
    model: &RuntimeModel,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingOptions,
    is_stop: impl Fn(u32) -> bool,
    on_token: impl FnMut(u32),
) -> Result<GenerationStats> {
    generate_adapted(model, None, prompt, max_new, sampling, is_stop, on_token)
}

/// [`generate`] with a LoRA adapter applied unmerged (`None`: the base).
pub fn generate_adapted(
    model: &RuntimeModel,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingOptions,
    is_stop: impl Fn(u32) -> bool,
    on_token: impl FnMut(u32),
) -> Result<GenerationStats> {
    let h = model.config.hidden_size;
    // Prefill and step share the cache; the loop calls them one after the other.
    let cache = RefCell::new(KvCache::with_capacity(model, prompt.len() + max_new));
    run_generation(
        prompt,
        max_new,
        sampling,
        is_stop,
        on_token,
        |p| {
            let hidden = model.forward_hidden_adapted(p, &mut cache.borrow_mut(), adapter)?;
            Ok(model.logits(&hidden[(p.len() - 1) * h..], 1))
        },
        |t| {
            let hidden = model.forward_hidden_adapted(&[t], &mut cache.borrow_mut(), adapter)?;
            Ok(model.logits(&hidden, 1))
        },
    )
}
