//! ShortGPT's Block Influence (Men et al. 2024): for each decoder block,
//! `BI = 1 − E[cos(x_in, x_out)]` over calibration tokens, the expectation
//! over every token of every window. A block whose output barely turns its
//! input (BI near 0) changes the residual stream least, and ShortGPT removes
//! the blocks of lowest BI first.

use crate::stats::inputs::to_vec;
use oqt_core::{CoreError, Result};
use oqt_model::llama::Llama;

/// Each block's influence on `windows` (one value per block, in order).
pub fn block_influence(model: &Llama, windows: &[Vec<u32>]) -> Result<Vec<f64>> {
    if windows.iter().all(|w| w.is_empty()) {
        return Err(CoreError::Other("block influence needs calibration tokens".into()));
    }
    let device = model.device();
    let n = model.n_layers();
    let (mut sums, mut tokens) = (vec![0f64; n], 0usize);
    for w in windows.iter().filter(|w| !w.is_empty()) {
        let pos = model.positions(w.len(), &device);
        let mut x = model.embed_with(model.tokens_tensor(w), &oqt_model::NoHooks);
        for (layer, sum) in sums.iter_mut().enumerate() {
            let y = model.layer_with(layer, x.clone(), &pos, &oqt_model::NoHooks);
            let [_, s, d] = y.dims();
            let (a, b) = (to_vec(x.reshape([s, d])), to_vec(y.clone().reshape([s, d])));
            for (ra, rb) in a.chunks(d).zip(b.chunks(d)) {
                let dot: f64 = ra.iter().zip(rb).map(|(p, q)| *p as f64 * *q as f64).sum();
                let na: f64 = ra.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = rb.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
                // A zero row (no direction) counts as unturned.
                *sum += if na > 0.0 && nb > 0.0 { dot / (na * nb) } else { 1.0 };
            }
            x = y;
        }
        tokens += w.len();
    }
    Ok(sums.into_iter().map(|s| 1.0 - s / tokens as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use oqt_core::testing::{random_weights, tiny_config};
    use oqt_model::hooks::Proj;

    /// A block whose residual branches write nothing (attention output and
    /// down projections zero) passes its input through: influence 0; the
    /// other blocks turn the stream (influence > 0); empty input is refused.
    #[test]
    fn a_block_that_writes_nothing_has_no_influence() {
        let cfg = tiny_config();
        let mut model = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 3), &Device::flex());
        let (o, down) = (model.decoder_linear(1, Proj::O), model.decoder_linear(1, Proj::Down));
        let (o_len, down_len) = (
            o.weight.val().dims().iter().product::<usize>(),
            down.weight.val().dims().iter().product::<usize>(),
        );
        oqt_model::set_decoder_weight(&mut model, 1, Proj::O, &vec![0.0; o_len]);
        oqt_model::set_decoder_weight(&mut model, 1, Proj::Down, &vec![0.0; down_len]);
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|s| (0..20).map(|i| ((i * 7 + s * 5) % 300) as u32).collect())
            .collect();
        let bi = block_influence(&model, &windows).unwrap();
        assert_eq!(bi.len(), cfg.num_layers);
        assert!(bi[1].abs() < 1e-6, "{bi:?}");
        assert!(bi[0] > 1e-3, "{bi:?}");
        assert!(block_influence(&model, &[vec![]]).is_err());
    }
}
