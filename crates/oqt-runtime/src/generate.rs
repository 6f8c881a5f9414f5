//! Prefill once, then decode token by token with the KV cache.

use crate::model::{KvCache, RuntimeModel};
use oqt_core::Result;
use oqt_core::sampling::{Sampler, SamplingOptions};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Seconds from the start until the first generated token was sampled.
    pub time_to_first_token_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// Generate up to `max_new` tokens after `prompt`; stops before a token for which `is_stop` holds.
pub fn generate(
    model: &RuntimeModel,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingOptions,
    is_stop: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(oqt_core::CoreError::Other("the prompt is empty".into()));
    }
    let h = model.config.hidden_size;
    let mut cache = KvCache::new(model.config.num_layers);
    let mut sampler = Sampler::new(sampling);
    let t0 = Instant::now();
    let hidden = model.forward_hidden(prompt, &mut cache)?;
    let mut logits = model.logits(&hidden[(prompt.len() - 1) * h..], 1);
    let prefill = t0.elapsed().as_secs_f64();
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
        let hidden = model.forward_hidden(&[next], &mut cache)?;
        logits = model.logits(&hidden, 1);
        steps += 1;
    }
    let decode = t1.elapsed().as_secs_f64();
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        time_to_first_token_s: ttft.unwrap_or(prefill),
        prefill_tok_s: prompt.len() as f64 / prefill.max(1e-9),
        decode_tok_s: steps as f64 / decode.max(1e-9),
    })
}
