//! [`CausalLm`] for the Burn model: perplexity windows and fixture comparisons.

use crate::hooks::{ForwardHooks, NoHooks};
use crate::llama::Llama;
use crate::quant_sim::SimulatedModel;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use oqt_core::scoring::{CausalLm, WindowScores};
use oqt_core::{CoreError, Result};

fn to_vec(t: Tensor<3>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| CoreError::Other(format!("reading tensor data: {e:?}")))
}

impl CausalLm for Llama {
    fn score_window(&self, tokens: &[u32], first: usize) -> Result<WindowScores> {
        score_window_with(self, &NoHooks, tokens, first)
    }

    fn log_probs(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        log_probs_with(self, &NoHooks, tokens)
    }
}

impl CausalLm for SimulatedModel {
    fn score_window(&self, tokens: &[u32], first: usize) -> Result<WindowScores> {
        score_window_with(&self.llama, &self.sim, tokens, first)
    }

    fn log_probs(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        log_probs_with(&self.llama, &self.sim, tokens)
    }
}

/// Negative log-likelihoods of `tokens[first+1..]` under `model` through `hooks`.
pub fn score_window_with(
    model: &Llama,
    hooks: &dyn ForwardHooks,
    tokens: &[u32],
    first: usize,
) -> Result<WindowScores> {
    let n = tokens.len();
    if n < 2 || first >= n - 1 {
        return Err(CoreError::Other(format!(
            "cannot score positions {first}.. of a {n}-token window"
        )));
    }
    let hidden = model.forward_hidden_with(model.tokens_tensor(tokens), None, hooks);
    let [b, _, d] = hidden.dims();
    // Only the scored positions go through the LM head (half the head's cost in perplexity).
    let hidden = hidden.slice([0..b, first..n - 1, 0..d]);
    let lp = log_softmax(model.logits_with(hidden, hooks), 2);
    let argmax = lp.clone().argmax(2).into_data().convert::<i64>().try_into_vec::<i64>();
    let targets: Vec<i64> = tokens[first + 1..].iter().map(|&t| t as i64).collect();
    let m = targets.len();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(targets, [1, m, 1]), &model.device());
    let picked = to_vec(lp.gather(2, idx))?;
    let argmax = argmax.map_err(|e| CoreError::Other(format!("reading argmax: {e:?}")))?;
    Ok(WindowScores {
        nll: picked.into_iter().map(|v| -v).collect(),
        argmax: argmax.into_iter().map(|v| v as u32).collect(),
    })
}

/// Next-token log-probabilities at every position of `tokens`.
pub fn log_probs_with(model: &Llama, hooks: &dyn ForwardHooks, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let hidden = model.forward_hidden_with(model.tokens_tensor(tokens), None, hooks);
    let logits = model.logits_with(hidden, hooks);
    let v = model.vocab_size();
    let flat = to_vec(log_softmax(logits, 2))?;
    Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
}
