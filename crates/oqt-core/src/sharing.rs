//! Shared weights (FoldGPT's block sharing): a weight that is another weight
//! of the same shape with each output row scaled, `W[r, :] = s[r] · W_of[r, :]`.
//! Bundles store it as the `shared` encoding ([`crate::encoding`]); the
//! runtime holds the source's kernel once and scales the outputs.

/// One shared weight: its source and per-row scales.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedWeight {
    /// The canonical name of the source weight (itself not shared).
    pub of: String,
    pub row_scales: Vec<f32>,
}

impl SharedWeight {
    /// The dense weight it stands for, from its source's values `[rows, cols]`.
    pub fn expand(&self, source: &[f32]) -> Vec<f32> {
        let mut w = source.to_vec();
        scale_rows(&mut w, &self.row_scales);
        w
    }
}

/// Multiply row `r` of `w` (`row_scales.len()` rows, row-major) by `row_scales[r]`, in place.
pub fn scale_rows(w: &mut [f32], row_scales: &[f32]) {
    let cols = w.len() / row_scales.len().max(1);
    for (row, s) in w.chunks_mut(cols.max(1)).zip(row_scales) {
        row.iter_mut().for_each(|v| *v *= s);
    }
}

/// The row scales that bring `source` closest to `target` (both `[rows, cols]`
/// row-major) in the least-squares sense, row by row: `s[r] = ⟨t_r, w_r⟩ / ⟨w_r, w_r⟩`
/// (0 for an all-zero source row).
pub fn fit_row_scales(source: &[f32], target: &[f32], cols: usize) -> Vec<f32> {
    source
        .chunks(cols)
        .zip(target.chunks(cols))
        .map(|(w, t)| {
            let (mut wt, mut ww) = (0f64, 0f64);
            for (&a, &b) in w.iter().zip(t) {
                wt += a as f64 * b as f64;
                ww += a as f64 * a as f64;
            }
            if ww > 0.0 { (wt / ww) as f32 } else { 0.0 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitted_scales_recover_a_scaled_copy_and_expand_to_it() {
        let w: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) * 0.1).collect();
        let scales = [2.0f32, -0.5, 0.25];
        let t: Vec<f32> = w
            .chunks(4)
            .zip(scales)
            .flat_map(|(r, s)| r.iter().map(move |v| v * s))
            .collect();
        let fit = fit_row_scales(&w, &t, 4);
        for (a, b) in fit.iter().zip(scales) {
            assert!((a - b).abs() < 1e-6, "{fit:?}");
        }
        let shared = SharedWeight {
            of: "w".into(),
            row_scales: fit,
        };
        for (a, b) in shared.expand(&w).iter().zip(&t) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(fit_row_scales(&[0.0; 4], &[1.0; 4], 4), vec![0.0]);
    }
}
