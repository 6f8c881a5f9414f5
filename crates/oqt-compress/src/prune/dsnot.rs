//! DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): move a pruning
//! mask's kept weights around inside each output row, without training, so
//! that the row's expected reconstruction error shrinks.
//!
//! With `m_j = W_j · E[x_j]` for one row, pruning leaves the expected output
//! error `r = Σ_{j pruned} m_j` (`E[x_j]` on the authors' scale for the
//! threshold: the sum over a 2048-token sequence, i.e. 2048 × the mean).
//! Each cycle, while `|r| > threshold`, one weight grows and one is pruned:
//! * **grow** the next pruned weight in the order of `m_j / Var(x_j)`: the
//!   largest when `r > 0`, the smallest when `r < 0` (an input that varies
//!   little makes its expectation a safe bet);
//! * **prune**, unstructured: the next kept weight whose `m_k` has the sign
//!   opposite to `r`, lowest Wanda score `|W_k|·‖x_k‖` first, so that the swap
//!   moves `r` towards zero from both ends; N:M: the kept weight of lowest
//!   Wanda score inside the grown weight's `M`-block (the block must keep `N`).
//! * with the sign check (always for N:M; the authors' unstructured default
//!   leaves it off, `--without_same_sign`), a row stops instead of making a
//!   swap that would flip `r`'s initial sign.
//!
//! Each candidate list is walked once from its ends, so no swap is undone.
//! Sparsity never changes: every grown weight is paid for by a pruned one.
//! At most `max_cycles` swaps per row. No weight value changes: a grown weight
//! takes its dense value back. This follows the authors' code
//! (zyxxmu/DSnoT, `prune_DSnoT`), which differs from the paper's prose.

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
    /// Stop a row rather than flip its error's initial sign, on unstructured
    /// masks too (the authors skip it there: `--without_same_sign`); N:M
    /// always checks.
    pub sign_check: bool,
    /// Take `E[x]` and `Var(x)` over token rows scaled to unit length: raw
    /// moments are dominated by the few tokens of huge norm (SmolLM2's first
    /// positions carry activations hundreds of times the others'), and DSnoT
    /// then fits the mask to them (BENCHMARKS.md, issue 38).
    pub unit_token_rows: bool,
    /// What a swap is judged by.
    pub criterion: DsnotCriterion,
}

/// The error a DSnoT swap is chosen to shrink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DsnotCriterion {
    /// The paper's and authors' criterion: the expected error `r` (first
    /// moment), with the variance only as a tie-breaker for growth.
    #[default]
    Expectation,
    /// The error DSnoT's expectation stands in for: the row's squared output
    /// error on the calibration inputs, `eᵀ·XᵀX·e` with `e` the pruned part of
    /// the row. Each cycle grows the pruned weight and prunes the kept weight
    /// (N:M: in the grown weight's block) that lower it most, and the row
    /// stops when the best swap would not lower it.
    Exact,
}

impl Default for DsnotOptions {
    fn default() -> Self {
        Self {
            max_cycles: 50,
            threshold: 0.1,
            skip_mlp: true,
            sign_check: false,
            unit_token_rows: false,
            criterion: DsnotCriterion::Expectation,
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
    /// `XᵀX` (`[cols, cols]`), needed by [`DsnotCriterion::Exact`] only.
    pub gram: Option<&'a [f64]>,
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
        .map(|(row, kept)| match opts.criterion {
            DsnotCriterion::Expectation => refine_row(row, kept, pattern, x, opts),
            DsnotCriterion::Exact => {
                let gram = x.gram.expect("the exact criterion needs the inputs' XᵀX");
                refine_row_exact(row, kept, pattern, gram, opts)
            }
        })
        .sum()
}

fn refine_row(w: &[f32], kept: &mut [bool], pattern: Pattern, x: &InputMoments, opts: &DsnotOptions) -> usize {
    let cols = w.len();
    let m: Vec<f64> = w.iter().zip(x.mean).map(|(&v, &e)| v as f64 * e).collect();
    let wanda = |k: usize| (w[k] as f64).abs() * x.norm[k];
    let mut r: f64 = (0..cols).filter(|&j| !kept[j]).map(|j| m[j]).sum();
    let initial_sign = r.signum();
    // Pruned weights by `m / Var(x)`, ascending: `r > 0` grows from the top,
    // `r < 0` from the bottom.
    let mut grow: Vec<usize> = (0..cols).filter(|&j| !kept[j]).collect();
    let grow_score = |j: usize| m[j] / x.var[j].max(1e-12);
    grow.sort_by(|&a, &b| grow_score(a).total_cmp(&grow_score(b)).then(a.cmp(&b)));
    let (mut grow_lo, mut grow_hi) = (0usize, grow.len());
    // Unstructured: kept weights with m < 0 (pruned while r > 0) and m > 0
    // (while r < 0), each by Wanda score ascending.
    let by_wanda = |mut v: Vec<usize>| {
        v.sort_by(|&a, &b| wanda(a).total_cmp(&wanda(b)).then(a.cmp(&b)));
        v
    };
    let prune_neg = by_wanda((0..cols).filter(|&k| kept[k] && m[k] < 0.0).collect());
    let prune_pos = by_wanda((0..cols).filter(|&k| kept[k] && m[k] > 0.0).collect());
    let (mut next_neg, mut next_pos) = (0usize, 0usize);
    // N:M: a grown weight is never pruned again within its block.
    let mut grown = vec![false; cols];
    let same_sign = opts.sign_check || matches!(pattern, Pattern::NOfM { .. });
    let mut swaps = 0;
    for _ in 0..opts.max_cycles {
        if r.abs() <= opts.threshold || grow_lo >= grow_hi {
            break;
        }
        let j = if r > 0.0 { grow[grow_hi - 1] } else { grow[grow_lo] };
        // Only a weight on r's side shrinks it; the list has run out of them.
        if m[j] * r <= 0.0 {
            break;
        }
        let k = match pattern {
            Pattern::Unstructured { .. } => {
                let (list, next) = if r > 0.0 {
                    (&prune_neg, &mut next_neg)
                } else {
                    (&prune_pos, &mut next_pos)
                };
                let Some(&k) = list.get(*next) else { break };
                *next += 1;
                k
            }
            Pattern::NOfM { m: block, .. } => {
                let b0 = j / block * block;
                let Some(k) = (b0..b0 + block)
                    .filter(|&k| kept[k] && !grown[k])
                    .min_by(|&a, &b| wanda(a).total_cmp(&wanda(b)))
                else {
                    break;
                };
                k
            }
        };
        let next = r - m[j] + m[k];
        if same_sign && next * initial_sign < 0.0 {
            break;
        }
        if r > 0.0 {
            grow_hi -= 1;
        } else {
            grow_lo += 1;
        }
        kept[j] = true;
        kept[k] = false;
        grown[j] = true;
        r = next;
        swaps += 1;
    }
    swaps
}

/// One row under [`DsnotCriterion::Exact`]: greedy swaps on `eᵀGe`.
fn refine_row_exact(w: &[f32], kept: &mut [bool], pattern: Pattern, gram: &[f64], opts: &DsnotOptions) -> usize {
    let cols = w.len();
    let wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let diag: Vec<f64> = (0..cols).map(|j| gram[j * cols + j]).collect();
    // g = G·e, e = the row's pruned part.
    let mut g = vec![0.0f64; cols];
    for j in (0..cols).filter(|&j| !kept[j] && wd[j] != 0.0) {
        for (gi, &h) in g.iter_mut().zip(&gram[j * cols..(j + 1) * cols]) {
            *gi += h * wd[j];
        }
    }
    let error: f64 = (0..cols).filter(|&j| !kept[j]).map(|j| wd[j] * g[j]).sum();
    // Change of eᵀGe when weight j grows back (e_j: w_j → 0) or k is pruned (e_k: 0 → w_k).
    let grow_gain = |j: usize, g: &[f64]| -2.0 * wd[j] * g[j] + wd[j] * wd[j] * diag[j];
    let prune_cost = |k: usize, g: &[f64]| 2.0 * wd[k] * g[k] + wd[k] * wd[k] * diag[k];
    let mut grown = vec![false; cols];
    let mut swaps = 0;
    for _ in 0..opts.max_cycles {
        let best = match pattern {
            Pattern::Unstructured { .. } => {
                let j = (0..cols)
                    .filter(|&j| !kept[j])
                    .min_by(|&a, &b| grow_gain(a, &g).total_cmp(&grow_gain(b, &g)));
                let k = (0..cols)
                    .filter(|&k| kept[k] && !grown[k])
                    .min_by(|&a, &b| prune_cost(a, &g).total_cmp(&prune_cost(b, &g)));
                j.zip(k)
            }
            Pattern::NOfM { m: block, .. } => (0..cols)
                .filter(|&j| !kept[j])
                .filter_map(|j| {
                    let b0 = j / block * block;
                    (b0..b0 + block)
                        .filter(|&k| kept[k] && !grown[k])
                        .min_by(|&a, &b| prune_cost(a, &g).total_cmp(&prune_cost(b, &g)))
                        .map(|k| (j, k))
                })
                .min_by(|a, b| {
                    let pair = |(j, k): (usize, usize)| grow_gain(j, &g) + prune_cost(k, &g);
                    pair(*a).total_cmp(&pair(*b))
                }),
        };
        let Some((j, k)) = best else { break };
        let delta = grow_gain(j, &g) + prune_cost(k, &g) - 2.0 * wd[j] * wd[k] * gram[j * cols + k];
        // A swap must lower the error by more than rounding.
        if delta >= -1e-12 * error.abs().max(f64::MIN_POSITIVE) {
            break;
        }
        for (i, gi) in g.iter_mut().enumerate() {
            *gi += gram[k * cols + i] * wd[k] - gram[j * cols + i] * wd[j];
        }
        kept[j] = true;
        kept[k] = false;
        grown[j] = true;
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
            gram: None,
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
