//! Pruning masks from scores. Every rule here ranks the weights of one output
//! row against each other (Wanda's comparison group; magnitude pruning per
//! row as Wanda's tables use it) and keeps the highest scores.

use std::fmt;
use std::str::FromStr;

/// Which weights of a row survive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// Zero the `sparsity` fraction (rounded down) of every row with the lowest scores.
    Unstructured { sparsity: f32 },
    /// In every block of `m` consecutive inputs keep the `n` highest scores (2:4, 4:8).
    NOfM { n: usize, m: usize },
}

impl Pattern {
    /// Problems with this pattern on rows `cols` wide, naming the option.
    pub fn problems(&self, cols: usize) -> Option<String> {
        match *self {
            Self::Unstructured { sparsity } if !(sparsity > 0.0 && sparsity < 1.0) => {
                Some(format!("sparsity: expected a fraction in (0, 1), found {sparsity}"))
            }
            Self::NOfM { n, m } if n == 0 || n >= m => Some(format!("N:M {n}:{m}: expected 0 < N < M (e.g. 2:4)")),
            Self::NOfM { n, m } if !cols.is_multiple_of(m) => Some(format!(
                "N:M {n}:{m}: blocks of {m} do not divide the row length {cols}"
            )),
            _ => None,
        }
    }

    /// The fraction of weights a mask of this pattern zeroes on rows `cols` wide.
    pub fn sparsity(&self, cols: usize) -> f64 {
        match *self {
            Self::Unstructured { sparsity } => pruned_per_row(sparsity, cols) as f64 / cols as f64,
            Self::NOfM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }
}

/// `N:M` (kept of each block), as written on the command line and in recipes.
impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, m) = oqt_core::quant::PruneStep::parse_nm(s)?;
        Ok(Self::NOfM { n, m })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unstructured { sparsity } => write!(f, "{:.0}% unstructured", sparsity * 100.0),
            Self::NOfM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// `⌊cols · sparsity⌋`, read as the decimal the user wrote: 0.7 is stored as
/// 0.69999999 in f32, and 70 × 0.7 must prune 49, not 48.
fn pruned_per_row(sparsity: f32, cols: usize) -> usize {
    (cols as f64 * sparsity as f64 + 1e-4).floor() as usize
}

/// `|W_ij|`: magnitude pruning's score.
pub fn magnitude_scores(w: &[f32]) -> Vec<f32> {
    w.iter().map(|v| v.abs()).collect()
}

/// Wanda's score `|W_ij| · ‖X_j‖₂` for `w` `[rows, cols]` and the calibration
/// inputs' per-channel L2 norms `input_norms` (`cols`).
pub fn wanda_scores(w: &[f32], cols: usize, input_norms: &[f32]) -> Vec<f32> {
    assert_eq!(input_norms.len(), cols, "one input norm per column");
    w.chunks_exact(cols)
        .flat_map(|row| row.iter().zip(input_norms).map(|(v, n)| v.abs() * n))
        .collect()
}

/// The mask (`true` = kept) of `scores` `[rows, cols]` under `pattern`
/// (checked with [`Pattern::problems`] first). Ties go to the earlier column:
/// the lower index is kept.
pub fn mask_from_scores(scores: &[f32], cols: usize, pattern: Pattern) -> Vec<bool> {
    assert!(pattern.problems(cols).is_none(), "pattern checked by the caller");
    let mut keep = vec![true; scores.len()];
    // Lowest score first; among equal scores the later column goes first.
    let order = |s: &[f32]| {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(b.cmp(&a)));
        idx
    };
    for (row, kept) in scores.chunks_exact(cols).zip(keep.chunks_exact_mut(cols)) {
        match pattern {
            Pattern::Unstructured { sparsity } => {
                for &j in order(row).iter().take(pruned_per_row(sparsity, cols)) {
                    kept[j] = false;
                }
            }
            Pattern::NOfM { n, m } => {
                for (block, kb) in row.chunks_exact(m).zip(kept.chunks_exact_mut(m)) {
                    for &j in order(block).iter().take(m - n) {
                        kb[j] = false;
                    }
                }
            }
        }
    }
    keep
}

/// `w` with the weights `keep` drops set to exactly zero.
pub fn apply_mask(w: &mut [f32], keep: &[bool]) {
    for (v, &k) in w.iter_mut().zip(keep) {
        if !k {
            *v = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::pseudo_random;

    #[test]
    fn unstructured_masks_drop_exactly_the_lowest_share_of_every_row() {
        let (rows, cols) = (5, 70);
        let w = pseudo_random(rows * cols, 1, 1.0);
        for sparsity in [0.5f32, 0.6, 0.7] {
            let keep = mask_from_scores(&magnitude_scores(&w), cols, Pattern::Unstructured { sparsity });
            let drop = [35, 42, 49][((sparsity - 0.5) * 10.0).round() as usize];
            for (row, kept) in w.chunks_exact(cols).zip(keep.chunks_exact(cols)) {
                assert_eq!(kept.iter().filter(|k| !**k).count(), drop);
                let max_dropped = row
                    .iter()
                    .zip(kept)
                    .filter(|(_, k)| !**k)
                    .map(|(v, _)| v.abs())
                    .fold(0f32, f32::max);
                let min_kept = row
                    .iter()
                    .zip(kept)
                    .filter(|(_, k)| **k)
                    .map(|(v, _)| v.abs())
                    .fold(f32::MAX, f32::min);
                assert!(max_dropped <= min_kept);
            }
        }
    }

    #[test]
    fn n_of_m_keeps_n_in_every_block_and_wanda_weighs_by_input_norm() {
        let cols = 8;
        // One row: magnitudes 1..8; the inputs of columns 0 and 4 are loud.
        let w: Vec<f32> = (1..=8)
            .map(|v| v as f32 * if v % 2 == 0 { -1.0 } else { 1.0 })
            .collect();
        let norms = [100.0, 1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0];
        let two_of_four = "2:4".parse::<Pattern>().unwrap();
        let by_magnitude = mask_from_scores(&magnitude_scores(&w), cols, two_of_four);
        assert_eq!(by_magnitude, [false, false, true, true, false, false, true, true]);
        let by_wanda = mask_from_scores(&wanda_scores(&w, cols, &norms), cols, two_of_four);
        assert_eq!(by_wanda, [true, false, false, true, true, false, false, true]);
        assert_eq!(two_of_four.sparsity(cols), 0.5);
        let mut pruned = w.clone();
        apply_mask(&mut pruned, &by_wanda);
        assert_eq!(pruned, [1.0, 0.0, 0.0, -4.0, 5.0, 0.0, 0.0, -8.0]);
        // Ties keep the earlier column.
        let keep = mask_from_scores(&[1.0; 4], 4, Pattern::NOfM { n: 2, m: 4 });
        assert_eq!(keep, [true, true, false, false]);
    }

    #[test]
    fn bad_patterns_are_named() {
        let p = |s: &str| s.parse::<Pattern>().unwrap().problems(576).unwrap();
        assert!(p("2:5").contains("do not divide the row length 576"));
        assert!("4:4".parse::<Pattern>().unwrap_err().contains("0 < N < M"));
        assert!("0:4".parse::<Pattern>().unwrap_err().contains("0 < N < M"));
        assert!(
            Pattern::NOfM { n: 4, m: 4 }
                .problems(576)
                .unwrap()
                .contains("0 < N < M")
        );
        assert!("24".parse::<Pattern>().unwrap_err().contains("N:M"));
        assert!("a:4".parse::<Pattern>().unwrap_err().contains("whole numbers"));
        for s in [0.0f32, 1.0, -0.5, f32::NAN] {
            let e = Pattern::Unstructured { sparsity: s }.problems(576).unwrap();
            assert!(e.contains("(0, 1)"), "{e}");
        }
        assert!(Pattern::Unstructured { sparsity: 0.5 }.problems(576).is_none());
    }
}
