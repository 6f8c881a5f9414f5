//! Next-token sampling shared by every engine: greedy, temperature, nucleus (top-p).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        Self {
            rng: StdRng::seed_from_u64(opts.seed),
            opts,
        }
    }

    /// Pick the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.opts.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.opts.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        // Keep the smallest prefix whose mass reaches top_p.
        let cutoff = self.opts.top_p.clamp(0.0, 1.0) as f64 * total;
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            mass += p.1;
            kept += 1;
            if mass >= cutoff {
                break;
            }
        }
        let mut r = self.rng.random::<f64>() * mass;
        for p in &probs[..kept] {
            r -= p.1;
            if r <= 0.0 {
                return p.0;
            }
        }
        probs[kept - 1].0
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(SamplingOptions::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0]), 1);
    }

    #[test]
    fn tiny_top_p_is_greedy_and_sampling_is_seeded() {
        let logits = [1.0, 2.0, 1.5, 0.5];
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 7,
        });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        let draw = |seed| {
            let mut s = Sampler::new(SamplingOptions {
                temperature: 1.0,
                top_p: 1.0,
                seed,
            });
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        assert!(
            d.iter().any(|&t| t != 1),
            "temperature 1 should not always pick the max"
        );
    }
}
