//! Generation on the Burn model: the shared loop of `oqt_core::generation`
//! over the KV-cached forward pass.

use crate::llama::{KvCache, Llama};
use burn::tensor::{Int, Tensor, TensorData};
use oqt_core::generation::{GenerationStats, run_generation};
use oqt_core::sampling::SamplingOptions;
use oqt_core::{CoreError, Result};
use std::cell::RefCell;

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
    on_token: impl FnMut(u32),
) -> Result<GenerationStats> {
    // Prefill and step share the cache; the loop calls them one after the other.
    let cache = RefCell::new(KvCache::new(model.n_layers()));
    run_generation(
        prompt,
        max_new,
        sampling,
        is_stop,
        on_token,
        |p| last_logits(model, p, &mut cache.borrow_mut()),
        |t| last_logits(model, &[t], &mut cache.borrow_mut()),
    )
}
