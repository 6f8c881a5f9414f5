//! The Hessian of a linear layer's reconstruction error, `H = 2/n · XᵀX` over
//! its calibration inputs: what GPTQ (and SparseGPT, which prunes with the same
//! matrix) needs from calibration.

use rayon::prelude::*;

/// Running `H = Σ xᵀx` (f64) over calibration rows for one linear input width.
#[derive(Debug, Clone)]
pub struct HessianAccumulator {
    cols: usize,
    /// Row-major `cols × cols`, the full symmetric matrix.
    sum: Vec<f64>,
    rows_seen: usize,
}

impl HessianAccumulator {
    pub fn new(cols: usize) -> Self {
        assert!(cols > 0, "a Hessian needs at least one input column");
        Self {
            cols,
            sum: vec![0.0; cols * cols],
            rows_seen: 0,
        }
    }

    /// `x` row-major `[n, cols]` activations (the linear's inputs).
    pub fn add(&mut self, x: &[f32]) {
        let c = self.cols;
        assert!(
            x.len().is_multiple_of(c),
            "{} activations are not whole rows of {c}",
            x.len()
        );
        // A few hundred input rows at a time stay in cache while every
        // output row of the sum (one per thread task) is updated from them.
        const ROWS_PER_PASS: usize = 256;
        for part in x.chunks(ROWS_PER_PASS * c) {
            self.sum.par_chunks_mut(c).enumerate().for_each(|(i, out)| {
                for xr in part.chunks_exact(c) {
                    let xi = xr[i] as f64;
                    if xi != 0.0 {
                        for (o, &v) in out.iter_mut().zip(xr) {
                            *o += xi * v as f64;
                        }
                    }
                }
            });
        }
        self.rows_seen += x.len() / c;
    }

    /// Add an already-computed `XᵀX` (`cols × cols`, row-major) of `n` rows.
    pub fn add_gram(&mut self, gram: &[f32], n: usize) {
        assert_eq!(
            gram.len(),
            self.cols * self.cols,
            "Gram matrix has {} values, not {c} × {c}",
            gram.len(),
            c = self.cols
        );
        for (s, &g) in self.sum.iter_mut().zip(gram) {
            *s += g as f64;
        }
        self.rows_seen += n;
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn rows_seen(&self) -> usize {
        self.rows_seen
    }

    /// The reference's Hessian `2/n · Σ xᵀx` (`cols × cols`, row-major); all
    /// zeros before any row was added. GPTQ's result does not depend on the
    /// scale of `H` (damping is relative to its mean diagonal), so the factor
    /// only matters when reading [`crate::ptq::gptq::output_error`].
    pub fn hessian(&self) -> Vec<f64> {
        if self.rows_seen == 0 {
            return self.sum.clone();
        }
        let f = 2.0 / self.rows_seen as f64;
        self.sum.iter().map(|&s| s * f).collect()
    }
}
