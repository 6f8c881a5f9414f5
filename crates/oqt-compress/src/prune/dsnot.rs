//! DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): move a pruning
//! mask's kept weights around inside each output row, without training, so
//! that the row's expected reconstruction error shrinks.
//!
//! With `m_j = W_j · E[x_j]` for one row, pruning leaves the expected output
//! error `r = Σ_{j pruned} m_j` (`E[x_j]` on the authors' scale for the
//! threshold: the sum over a 2048-token sequence, i.e. 2048 × the mean). Each cycle, while `|r| > threshold`:
//! * **grow** the pruned weight with `sign(m_j) = sign(r)` and the largest
//!   `|m_j| / Var(x_j)` (an input that varies little makes its expectation a
//!   safe bet);
//! * **prune** the kept weight with the lowest Wanda score `|W_k|·‖x_k‖`,
//!   among those whose `m_k` has the sign opposite to `r` when the sign check
//!   is on (always for N:M, where the pair must share an `M`-block);
//! * keep the swap only if it shrinks `|r|` (our reading of the authors'
//!   stop when the error's sign flips); otherwise the row stops.
//!
//! Sparsity never changes: every grown weight is paid for by a pruned one.
//! At most `max_cycles` swaps per row. No weight value changes: a grown weight
//! takes its dense value back.

use super::mask::Pattern;

/// DSnoT's options; the defaults are the authors' code.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DsnotOptions {
    /// Swaps per row at most (50).
    pub max_cycles: usize,
    /// A row stops when `|r| ≤ threshold` (0.1).
    pub threshold: f64,
    /// Leave gate/up/down on the base mask (the authors' `--skip_layer mlp`).
    pub skip_mlp: bool,
    /// Check the pruned weight's sign on unstructured masks too (the authors
    /// skip it: `--without_same_sign`); N:M always checks.
    pub sign_check: bool,
    /// Take `E[x]` and `Var(x)` over token rows scaled to unit length: raw
    /// moments are dominated by the few tokens of huge norm (SmolLM2's first
    /// positions carry activations hundreds of times the others'), and DSnoT
    /// then fits the mask to them (BENCHMARKS.md, issue 38).
    pub unit_token_rows: bool,
}

impl Default for DsnotOptions {
    fn default() -> Self {
        Self {
            max_cycles: 50,
            threshold: 0.1,
            skip_mlp: true,
            sign_check: false,
            unit_token_rows: false,
        }
    }
}

/// Calibration statistics of one linear input, per channel.
pub struct InputMoments<'a> {
    /// `E[x_j]` on the 2048-token sum scale (2048 × the mean).
    pub mean: &'a [f64],
    /// `Var(x_j)` over tokens.
    pub var: &'a [f64],
    /// `‖x_j‖₂` over every calibration token (Wanda's norm).
    pub norm: &'a [f64],
}

/// Rework `keep` (`[rows, cols]`, `true` = kept) for the dense weights `w`;
/// returns the swaps made.
pub fn dsnot_refine(
    w: &[f32],
    keep: &mut [bool],
    cols: usize,
    pattern: Pattern,
    x: &InputMoments,
    opts: &DsnotOptions,
) -> usize {
    use rayon::prelude::*;
    assert_eq!(x.mean.len(), cols, "one mean per input column");
    w.par_chunks(cols)
        .zip(keep.par_chunks_mut(cols))
        .map(|(row, kept)| refine_row(row, kept, pattern, x, opts))
        .sum()
}

fn refine_row(w: &[f32], kept: &mut [bool], pattern: Pattern, x: &InputMoments, opts: &DsnotOptions) -> usize {
    let cols = w.len();
    let m: Vec<f64> = w.iter().zip(x.mean).map(|(&v, &e)| v as f64 * e).collect();
    let grow_score = |j: usize| m[j].abs() / x.var[j].max(1e-12);
    let wanda = |k: usize| (w[k] as f64).abs() * x.norm[k];
    let mut r: f64 = (0..cols).filter(|&j| !kept[j]).map(|j| m[j]).sum();
    let mut swaps = 0;
    // Weights grown are not pruned again in this pass (and vice versa), so
    // no cycle undoes an earlier one.
    let mut touched = vec![false; cols];
    for _ in 0..opts.max_cycles {
        if r.abs() <= opts.threshold {
            break;
        }
        let sign = r.signum();
        let prunable = |k: usize, kept: &[bool], check: bool| kept[k] && !touched[k] && (!check || m[k] * sign < 0.0);
        let best_in = |range: std::ops::Range<usize>, kept: &[bool], check: bool| {
            range
                .filter(|&k| prunable(k, kept, check))
                .min_by(|&a, &b| wanda(a).total_cmp(&wanda(b)))
        };
        let pair = match pattern {
            Pattern::Unstructured { .. } => (0..cols)
                .filter(|&j| !kept[j] && !touched[j] && m[j] * sign > 0.0)
                .max_by(|&a, &b| grow_score(a).total_cmp(&grow_score(b)))
                .and_then(|j| best_in(0..cols, kept, opts.sign_check).map(|k| (j, k))),
            Pattern::NOfM { m: block, .. } => (0..cols)
                .filter(|&j| !kept[j] && !touched[j] && m[j] * sign > 0.0)
                .filter_map(|j| {
                    let b0 = j / block * block;
                    best_in(b0..b0 + block, kept, true).map(|k| (j, k))
                })
                .max_by(|a, b| grow_score(a.0).total_cmp(&grow_score(b.0))),
        };
        let Some((j, k)) = pair else { break };
        let next = r - m[j] + m[k];
        if next.abs() >= r.abs() {
            break;
        }
        kept[j] = true;
        kept[k] = false;
        touched[j] = true;
        touched[k] = true;
        r = next;
        swaps += 1;
    }
    swaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_shrink_the_expected_error_and_keep_the_sparsity() {
        // One row of 8: inputs have mean 1 and variance 1 except column 3 (quiet).
        let w = [0.9f32, -0.2, 0.3, 0.8, -0.1, 0.5, -0.4, 0.05];
        let mean = [1.0; 8];
        let mut var = [1.0; 8];
        var[3] = 0.01;
        let norm = [1.0; 8];
        let x = InputMoments {
            mean: &mean,
            var: &var,
            norm: &norm,
        };
        // A mask that drops the big positive weights: r = 0.8 + 0.5 + 0.3 + 0.05 = 1.65.
        let mut keep = [true, true, false, false, true, false, true, false];
        let opts = DsnotOptions {
            threshold: 0.1,
            ..Default::default()
        };
        let swaps = dsnot_refine(&w, &mut keep, 8, Pattern::Unstructured { sparsity: 0.5 }, &x, &opts);
        assert!(swaps >= 1);
        assert_eq!(keep.iter().filter(|k| !**k).count(), 4);
        // The quiet column 3 grows first; the lowest-Wanda kept weight (-0.1) goes.
        assert!(keep[3] && !keep[4], "{keep:?}");
        let r: f64 = (0..8).filter(|&j| !keep[j]).map(|j| w[j] as f64).sum();
        assert!(r.abs() < 1.65);
        // N:M: every block of 4 keeps 2.
        let mut keep = [true, true, false, false, true, true, false, false];
        dsnot_refine(&w, &mut keep, 8, Pattern::NOfM { n: 2, m: 4 }, &x, &opts);
        for b in keep.chunks_exact(4) {
            assert_eq!(b.iter().filter(|k| **k).count(), 2, "{keep:?}");
        }
    }
}
