//! Perplexity with llama.cpp's `llama-perplexity` protocol, so figures compare
//! directly with llama.cpp's: tokenize the whole text once, cut consecutive
//! non-overlapping chunks of `ctx` tokens, score each chunk's second half
//! (positions `ctx/2 ..= ctx-2`, each predicting the next token), report
//! `exp(mean NLL)` over all scored predictions.

use oqt_core::scoring::CausalLm;
use oqt_core::{CoreError, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct PerplexityOptions {
    pub ctx: usize,
    pub max_chunks: Option<usize>,
    /// Replace each chunk's first token with BOS (llama.cpp does when the model adds BOS).
    pub bos: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    /// Share of scored positions whose most likely token was the actual next token.
    pub top1_accuracy: f64,
    pub ctx: usize,
    pub chunks: usize,
    pub chunks_available: usize,
    pub scored_tokens: usize,
    pub dataset_tokens: usize,
    /// Running perplexity after each chunk (what llama.cpp prints as `[i]ppl`).
    pub running_perplexity: Vec<f64>,
    pub seconds: f64,
    /// Tokens pushed through the model per second (ctx × chunks / seconds).
    pub tokens_per_second: f64,
}

/// Progress after each chunk.
#[derive(Debug, Clone, Copy)]
pub struct ChunkProgress {
    pub chunk: usize,
    pub chunks: usize,
    pub running_perplexity: f64,
}

pub fn perplexity(
    lm: &dyn CausalLm,
    tokens: &[u32],
    opts: &PerplexityOptions,
    mut on_chunk: impl FnMut(ChunkProgress),
) -> Result<PerplexityReport> {
    let ctx = opts.ctx;
    if ctx < 4 {
        return Err(CoreError::Other(format!("--ctx {ctx} is too small; use at least 4")));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(CoreError::Other(format!(
            "the text has {} tokens, fewer than one chunk of --ctx {ctx}",
            tokens.len()
        )));
    }
    let chunks = opts.max_chunks.map_or(available, |m| m.min(available));
    let first = ctx / 2;
    let start = Instant::now();
    let (mut nll_sum, mut count, mut correct) = (0f64, 0usize, 0usize);
    let mut running = Vec::with_capacity(chunks);
    let mut window = vec![0u32; ctx];
    for c in 0..chunks {
        window.copy_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(b) = opts.bos {
            window[0] = b;
        }
        let s = lm.score_window(&window, first)?;
        nll_sum += s.nll.iter().map(|&v| v as f64).sum::<f64>();
        count += s.nll.len();
        correct += s
            .argmax
            .iter()
            .zip(&window[first + 1..])
            .filter(|(a, b)| a == b)
            .count();
        let ppl = (nll_sum / count as f64).exp();
        running.push(ppl);
        on_chunk(ChunkProgress {
            chunk: c + 1,
            chunks,
            running_perplexity: ppl,
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    let mean_nll = nll_sum / count as f64;
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        top1_accuracy: correct as f64 / count as f64,
        ctx,
        chunks,
        chunks_available: available,
        scored_tokens: count,
        dataset_tokens: tokens.len(),
        running_perplexity: running,
        seconds,
        tokens_per_second: (chunks * ctx) as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::scoring::WindowScores;

    /// A model that assigns NLL = ln(2) to every prediction and predicts token 7.
    struct Coin;
    impl CausalLm for Coin {
        fn score_window(&self, tokens: &[u32], first: usize) -> Result<WindowScores> {
            let n = tokens.len() - 1 - first;
            Ok(WindowScores {
                nll: vec![std::f32::consts::LN_2; n],
                argmax: vec![7; n],
            })
        }
        fn log_probs(&self, _: &[u32]) -> Result<Vec<Vec<f32>>> {
            unimplemented!()
        }
    }

    #[test]
    fn protocol_counts_and_values() {
        let tokens: Vec<u32> = (0..2100).map(|i| if i % 2 == 0 { 7 } else { 1 }).collect();
        let opts = PerplexityOptions {
            ctx: 512,
            max_chunks: None,
            bos: None,
        };
        let mut seen = 0;
        let r = perplexity(&Coin, &tokens, &opts, |_| seen += 1).unwrap();
        assert_eq!((r.chunks, seen), (4, 4));
        // 255 predictions per chunk of 512, as llama-perplexity scores.
        assert_eq!(r.scored_tokens, 4 * 255);
        assert!((r.perplexity - 2.0).abs() < 1e-6);
        // Targets at odd offsets within a chunk are 1, even are 7: scored targets are
        // positions 257..=511, of which 127 are even.
        assert!((r.top1_accuracy - 127.0 / 255.0).abs() < 1e-9);
    }

    #[test]
    fn max_chunks_caps_and_short_text_errors() {
        let tokens = vec![1u32; 2048];
        let opts = PerplexityOptions {
            ctx: 512,
            max_chunks: Some(2),
            bos: None,
        };
        assert_eq!(perplexity(&Coin, &tokens, &opts, |_| {}).unwrap().chunks, 2);
        let msg = perplexity(&Coin, &tokens[..100], &opts, |_| {})
            .unwrap_err()
            .to_string();
        assert!(msg.contains("fewer than one chunk"), "{msg}");
    }
}
