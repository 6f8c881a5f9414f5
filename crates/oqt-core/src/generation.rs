//! The generation loop every engine shares: prefill the prompt once, then
//! sample and decode one token at a time. Engines supply the two forward passes.

use crate::sampling::{Sampler, SamplingOptions};
use crate::{CoreError, Result};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Seconds from the start until the first generated token was sampled.
    pub time_to_first_token_s: f64,
    pub prefill_tok_s: f64,
    /// Decode forward passes per second.
    pub decode_tok_s: f64,
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` for each;
/// stops before a token for which `is_stop` holds (the stop token is not emitted).
/// `prefill(prompt)` and `step(token)` return the logits of the last position,
/// continuing the engine's KV cache.
pub fn run_generation(
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingOptions,
    is_stop: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32),
    prefill: impl FnOnce(&[u32]) -> Result<Vec<f32>>,
    mut step: impl FnMut(u32) -> Result<Vec<f32>>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(CoreError::Other("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(sampling);
    let t0 = Instant::now();
    let mut logits = prefill(prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut ttft = None;
    let t1 = Instant::now();
    let (mut generated, mut steps) = (0, 0);
    while generated < max_new {
        let next = sampler.sample(&logits);
        ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if is_stop(next) {
            break;
        }
        on_token(next);
        generated += 1;
        if generated == max_new {
            break;
        }
        logits = step(next)?;
        steps += 1;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        time_to_first_token_s: ttft.unwrap_or(prefill_s),
        prefill_tok_s: prompt.len() as f64 / prefill_s.max(1e-9),
        decode_tok_s: steps as f64 / decode_s.max(1e-9),
    })
}
