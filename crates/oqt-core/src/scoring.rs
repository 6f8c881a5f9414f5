//! What an evaluator needs from a language model, whichever engine runs it
//! (the Burn model, the integer runtime): next-token scores over a window.

/// Scores of the predictions at positions `first..n-1` of an `n`-token window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowScores {
    /// Negative log-likelihood (nats) of `tokens[p + 1]` given `tokens[..=p]`.
    pub nll: Vec<f32>,
    /// The most likely next token at each scored position.
    pub argmax: Vec<u32>,
}

pub trait CausalLm {
    /// Score one window of tokens. `first` must be `< tokens.len() - 1`.
    fn score_window(&self, tokens: &[u32], first: usize) -> crate::Result<WindowScores>;

    /// Full log-probability rows at every position of the window, `[n][vocab]`
    /// (used by fixture comparisons and generation; may be expensive).
    fn log_probs(&self, tokens: &[u32]) -> crate::Result<Vec<Vec<f32>>>;
}

/// Log-softmax of one row, in f64 accumulation for stability.
pub fn log_softmax_row(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + logits.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
    logits.iter().map(|&v| (v as f64 - lse) as f32).collect()
}
