//! ZeroQAT's optimizer: zeroth-order (forward-only) training by SPSA with the
//! seed trick (MeZO). Per step and per probe `k` of `n`:
//!
//! 1. a seed `(seed, step, k)` names a direction `z ~ N(0, I)`, regenerated
//!    tensor by tensor whenever it is needed — never stored;
//! 2. `θ += ε z` → loss `L₊`; `θ −= 2ε z` → loss `L₋`; `θ += ε z` (restored);
//! 3. projected gradient `g_k = clamp((L₊ − L₋) / 2ε, ±clip)`;
//!
//! then `θ ← (1 − lr·λ) θ − lr · (1/n) Σ_k g_k z_k`. Memory is the model plus
//! one tensor-sized direction at a time; the state is the step counter and the
//! seed, so a run resumed from a checkpoint of `θ` and `step` continues on the
//! same seed stream and ends on the same weights bit for bit.
//!
//! The model side is [`ZoTrainable`]: anything whose trainable tensors can be
//! updated as `θ_i ← a·θ_i + b·z`.

use crate::Result;
use rand::{Rng, SeedableRng};

/// Learning-rate schedule over the run's steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl LrSchedule {
    /// The learning rate at `step` (0-based) of `total`.
    pub fn at(self, base: f64, step: u64, total: u64) -> f64 {
        let t = step as f64 / total.max(1) as f64;
        match self {
            Self::Constant => base,
            Self::Linear => base * (1.0 - t),
            Self::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpsaConfig {
    /// Perturbation size ε.
    pub eps: f32,
    pub lr: f64,
    pub schedule: LrSchedule,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// Directions averaged per step (n-SPSA).
    pub n_spsa: u32,
    /// Projected gradients are clamped to ±`grad_clip` (MeZO's 0.2/ε by default).
    pub grad_clip: f32,
    pub seed: u64,
}

impl Default for SpsaConfig {
    fn default() -> Self {
        let eps = 1e-3;
        Self {
            eps,
            lr: 1e-6,
            schedule: LrSchedule::Constant,
            weight_decay: 0.0,
            n_spsa: 1,
            grad_clip: 0.2 / eps,
            seed: 0,
        }
    }
}

/// A model whose trainable tensors SPSA may move.
pub trait ZoTrainable {
    /// Element count of each trainable tensor, in a fixed order.
    fn tensor_sizes(&self) -> Vec<usize>;
    /// `θ_i ← a·θ_i + b·z` (`z` has `tensor_sizes()[i]` values).
    fn update(&mut self, i: usize, a: f32, b: f32, z: &[f32]);
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SpsaStep {
    pub step: u64,
    /// Mean over the probes of `L₊` and `L₋`.
    pub loss_plus: f32,
    pub loss_minus: f32,
    /// Mean clamped projected gradient.
    pub projected_grad: f32,
    pub lr: f64,
}

/// The windows of `step`: `batch` random offsets into `tokens`, from `(seed, step)`.
pub fn batch_windows(tokens: &[u32], seed: u64, step: u64, batch: usize, seq_len: usize) -> Vec<Vec<u32>> {
    let span = tokens.len().saturating_sub(seq_len).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED_BA7C ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..batch)
        .map(|_| {
            let at = rng.random_range(0..span);
            tokens[at..(at + seq_len).min(tokens.len())].to_vec()
        })
        .collect()
}

/// The first `windows` non-overlapping `seq_len` windows of `tokens`: the
/// held-out set every training run evaluates on.
pub fn held_out_windows(tokens: &[u32], seq_len: usize, windows: usize) -> Result<Vec<Vec<u32>>> {
    let all: Vec<Vec<u32>> = tokens
        .chunks_exact(seq_len)
        .take(windows)
        .map(<[u32]>::to_vec)
        .collect();
    if all.is_empty() {
        return Err(crate::CoreError::Other(format!(
            "held-out text has {} tokens, fewer than one window of {seq_len}",
            tokens.len()
        )));
    }
    Ok(all)
}

/// SplitMix64: decorrelates the (seed, step, probe, tensor) counters.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The direction of probe `k` at `step` for tensor `tensor` (`n` standard
/// normal values, Box–Muller), a pure function of its arguments.
pub fn direction(seed: u64, step: u64, k: u32, tensor: usize, n: usize) -> Vec<f32> {
    let key = mix(mix(mix(mix(seed) ^ step) ^ k as u64) ^ tensor as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(key);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 ∈ (0, 1] keeps ln finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        out.push((r * c) as f32);
        out.push((r * s) as f32);
    }
    out.truncate(n);
    out
}

fn perturb<M: ZoTrainable + ?Sized>(m: &mut M, sizes: &[usize], seed: u64, step: u64, k: u32, scale: f32) {
    for (i, &n) in sizes.iter().enumerate() {
        m.update(i, 1.0, scale, &direction(seed, step, k, i, n));
    }
}

/// One SPSA step (`step` of `total`, 0-based): probe, then update in place.
/// `loss` evaluates the model as it stands (the same batch for every probe).
pub fn spsa_step<M: ZoTrainable>(
    m: &mut M,
    cfg: &SpsaConfig,
    step: u64,
    total: u64,
    loss: &mut dyn FnMut(&M) -> Result<f32>,
) -> Result<SpsaStep> {
    let sizes = m.tensor_sizes();
    let n = cfg.n_spsa.max(1);
    let mut grads = Vec::with_capacity(n as usize);
    let (mut lp_sum, mut lm_sum) = (0f32, 0f32);
    for k in 0..n {
        perturb(m, &sizes, cfg.seed, step, k, cfg.eps);
        let lp = loss(m)?;
        perturb(m, &sizes, cfg.seed, step, k, -2.0 * cfg.eps);
        let lm = loss(m)?;
        perturb(m, &sizes, cfg.seed, step, k, cfg.eps);
        let g = ((lp - lm) / (2.0 * cfg.eps)).clamp(-cfg.grad_clip, cfg.grad_clip);
        grads.push(g);
        lp_sum += lp;
        lm_sum += lm;
    }
    let lr = cfg.schedule.at(cfg.lr, step, total);
    let decay = (1.0 - lr * cfg.weight_decay) as f32;
    for (k, &g) in grads.iter().enumerate() {
        // Decay once (with the first probe's update), then add every probe's step.
        let a = if k == 0 { decay } else { 1.0 };
        let b = -(lr as f32) * g / n as f32;
        for (i, &len) in sizes.iter().enumerate() {
            m.update(i, a, b, &direction(cfg.seed, step, k as u32, i, len));
        }
    }
    Ok(SpsaStep {
        step,
        loss_plus: lp_sum / n as f32,
        loss_minus: lm_sum / n as f32,
        projected_grad: grads.iter().sum::<f32>() / n as f32,
        lr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `θ` in plain vectors; loss `Σ (θ − target)²`.
    struct Quadratic {
        theta: Vec<Vec<f32>>,
        target: Vec<Vec<f32>>,
    }

    impl ZoTrainable for Quadratic {
        fn tensor_sizes(&self) -> Vec<usize> {
            self.theta.iter().map(Vec::len).collect()
        }
        fn update(&mut self, i: usize, a: f32, b: f32, z: &[f32]) {
            for (t, &zv) in self.theta[i].iter_mut().zip(z) {
                *t = a * *t + b * zv;
            }
        }
    }

    impl Quadratic {
        fn loss(&self) -> f32 {
            self.theta
                .iter()
                .flatten()
                .zip(self.target.iter().flatten())
                .map(|(a, b)| (a - b) * (a - b))
                .sum()
        }
    }

    fn problem() -> Quadratic {
        Quadratic {
            theta: vec![vec![0.0; 7], vec![0.0; 5]],
            target: vec![(0..7).map(|i| i as f32 * 0.1 - 0.3).collect(), vec![0.5; 5]],
        }
    }

    fn run(m: &mut Quadratic, cfg: &SpsaConfig, steps: std::ops::Range<u64>, total: u64) {
        for s in steps {
            spsa_step(m, cfg, s, total, &mut |m: &Quadratic| Ok(m.loss())).unwrap();
        }
    }

    #[test]
    fn directions_are_standard_normal_and_reproducible() {
        let z = direction(7, 3, 0, 2, 20_001);
        assert_eq!(z, direction(7, 3, 0, 2, 20_001));
        assert_ne!(z, direction(7, 4, 0, 2, 20_001));
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    }

    #[test]
    fn spsa_minimizes_a_quadratic_with_n_probes_and_decay() {
        let cfg = SpsaConfig {
            eps: 1e-3,
            lr: 0.02,
            schedule: LrSchedule::Cosine,
            weight_decay: 1e-3,
            n_spsa: 4,
            grad_clip: 1e3,
            seed: 11,
        };
        let mut m = problem();
        let start = m.loss();
        run(&mut m, &cfg, 0..400, 400);
        assert!(m.loss() < start * 0.02, "{start} → {}", m.loss());
    }

    #[test]
    fn resuming_from_a_checkpoint_ends_on_the_same_weights_bit_for_bit() {
        let cfg = SpsaConfig {
            lr: 0.05,
            seed: 3,
            ..Default::default()
        };
        let mut straight = problem();
        run(&mut straight, &cfg, 0..30, 30);
        let mut first = problem();
        run(&mut first, &cfg, 0..13, 30);
        // The checkpoint: weights and the next step; nothing else.
        let mut resumed = Quadratic {
            theta: first.theta.clone(),
            target: first.target.clone(),
        };
        run(&mut resumed, &cfg, 13..30, 30);
        assert_eq!(straight.theta, resumed.theta);
    }

    #[test]
    fn schedules_start_at_the_base_rate_and_decay() {
        for s in [LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine] {
            assert_eq!(s.at(0.1, 0, 10), 0.1);
        }
        assert!((LrSchedule::Linear.at(0.1, 5, 10) - 0.05).abs() < 1e-12);
        assert!((LrSchedule::Cosine.at(0.1, 5, 10) - 0.05).abs() < 1e-12);
    }
}
