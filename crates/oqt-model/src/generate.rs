//! Autoregressive generation with a KV cache: prefill the prompt once, then
//! decode one token at a time.

use crate::llama::{KvCache, Llama};
use burn::tensor::{Int, Tensor, TensorData};
use oqt_core::sampling::{Sampler, SamplingOptions};
use oqt_core::{CoreError, Result};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

fn last_logits(model: &Llama, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &model.device());
    let hidden = model.forward_hidden(tokens, Some(cache));
    let [b, s, d] = hidden.dims();
    let logits = model.logits(hidden.slice([0..b, s - 1..s, 0..d]));
    logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| CoreError::Other(format!("reading logits: {e:?}")))
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` for each;
/// stops early when `is_stop` says so (the stop token is not emitted).
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingOptions,
    is_stop: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(CoreError::Other("the prompt is empty".into()));
    }
    let mut cache = KvCache::new(model.n_layers());
    let mut sampler = Sampler::new(sampling);
    let t0 = Instant::now();
    let mut logits = last_logits(model, prompt, &mut cache)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = 0;
    for _ in 0..max_new {
        let next = sampler.sample(&logits);
        if is_stop(next) {
            break;
        }
        on_token(next);
        generated += 1;
        if generated == max_new {
            break;
        }
        logits = last_logits(model, &[next], &mut cache)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated,
        prefill_seconds: prefill,
        decode_seconds: decode,
        prefill_tok_s: prompt.len() as f64 / prefill.max(1e-9),
        decode_tok_s: generated as f64 / decode.max(1e-9),
    })
}
