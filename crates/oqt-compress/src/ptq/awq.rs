//! AWQ's activation-aware scale search (Lin et al. 2023), the numeric core only.
//!
//! Linears that read the same input `X` (q/k/v; gate/up; down; o) share one
//! scale per input channel. Multiplying a weight's input column by `s_j` and
//! dividing the input channel by `s_j` leaves the float product unchanged, but
//! moves where the weight grid spends its resolution: channels with large
//! activations ("salient" ones) get their weight columns scaled up, so their
//! rounding error shrinks relative to the signal they carry.
//!
//! The scales follow one statistic, the mean magnitude of each channel over the
//! calibration sample, raised to a power α searched on the grid
//! `0, 1/n_grid, …, (n_grid − 1)/n_grid`:
//!
//! ```text
//! s_j = max(mean_t |X_tj|^α, 1e-4) / sqrt(max_j(·) · min_j(·))
//! ```
//!
//! The clamp comes before the normalisation so that a dead channel cannot make
//! the normaliser zero; the normalisation centres the scales around 1
//! geometrically, so neither the weights nor the activations drift in overall
//! magnitude. α = 0 gives `s = 1` exactly, plain round-to-nearest, which is
//! always on the grid: the search can never do worse than RTN on the sample.
//!
//! Each α is scored by the output error of the whole group against the float
//! output, summed over the sample's tokens:
//!
//! ```text
//! err(α) = Σ_linears ‖ X Wᵀ − A(X / s) · Q(W · diag(s))ᵀ ‖²
//! ```
//!
//! where `Q` is the weight grid of each linear's spec (the reference quantizer
//! in `oqt_core::quant::weights`, so the searched and the shipped weights are
//! the same) and `A` is the identity, or, when [`AwqOptions::act_bits`] is set,
//! the deployed static activation quantizer: one asymmetric per-tensor grid
//! ([`ActGrid::from_range`] over the min/max of `X / s` on the sample, applied
//! with [`ActGrid::fake`]). Making the objective see the activation grid
//! matters for static NPU-style layouts: outlier channels stretch the
//! per-tensor range and dividing them by `s` shrinks it, which weight-only AWQ
//! would not credit (nor penalise when `s < 1` blows small channels up).
//!
//! The caller folds `1/s` into the op producing `X` (norm weight, or the rows of
//! up/v) and `s` into the weights' input columns.
//!
//! The products are f32 GEMMs on packed panels (AVX2+FMA micro-kernel when the
//! CPU has it, a portable one otherwise), parallel over groups of output rows;
//! the squared error is accumulated in f64, and the float reference `X Wᵀ` is
//! computed once per search.

use crate::ptq::smoothing::LayerScales;
use crate::ptq::{MethodInput, Progress};
use crate::stats::inputs::Gather;
use oqt_core::Result;
use oqt_core::quant::{ActGrid, Granularity, WeightSpec, dequantize_weight, quantize_weight};
use oqt_kernels::f32_tiles::{TileIsa, for_each_tile, pack_panels};
use oqt_model::Proj;
use rayon::prelude::*;

/// AWQ scales for every layer's q/k/v, gate/up and down inputs (v → o is left
/// at 1: under grouped-query attention the o columns do not map one to one
/// onto v's rows, and the reference implementation skips it too). The search
/// replays `awq_sample_rows` calibration rows spread over the windows.
pub(crate) fn model_scales(input: &MethodInput, progress: &mut dyn Progress) -> Result<Vec<LayerScales>> {
    let gather = Gather {
        sample_rows_per_window: input.opts.awq_sample_rows.div_ceil(input.windows.len().max(1)),
        gram: false,
        gram_unit_rows: false,
    };
    let stats = input.input_stats(gather, progress)?;
    let model = input.model;
    let cfg = &model.config;
    let spec = &input.recipe.spec;
    let act_bits = input.is_static().then_some(spec.activations.bits);
    let opts = AwqOptions {
        act_bits,
        ..AwqOptions::default()
    };
    progress.phase("AWQ search", cfg.num_layers * 3);
    let mut out = Vec::with_capacity(cfg.num_layers);
    let mut done = 0;
    for (l, groups) in stats.iter().enumerate() {
        let mut s = LayerScales::identity(cfg, l);
        for (gi, projs) in [
            (0usize, &[Proj::Q, Proj::K, Proj::V][..]),
            (2, &[Proj::Gate, Proj::Up][..]),
            (3, &[Proj::Down][..]),
        ] {
            let names: Vec<String> = projs.iter().map(|p| p.weight_name(l)).collect();
            let linears: Vec<AwqLinear> = names
                .iter()
                .map(|n| {
                    let t = model.weights.get(n).expect("validated");
                    AwqLinear {
                        weight: &t.data,
                        rows: t.shape[0],
                        spec: spec.weights_for(n),
                    }
                })
                .collect();
            let g = &groups[gi];
            let r = search_scales(&g.sample, g.width, &linears, &opts);
            tracing::debug!(
                layer = l,
                input = gi,
                alpha = r.alpha,
                gain = r.error / r.rtn_error.max(1e-30),
                "AWQ"
            );
            match gi {
                0 => s.attn = r.scales,
                2 => s.mlp = r.scales,
                _ => s.down = r.scales,
            }
            done += 1;
            progress.set(done);
        }
        out.push(s);
    }
    Ok(out)
}

/// One linear of a group sharing an input: row-major `[rows, cols]` weight
/// (`rows` outputs, `cols` inputs) and the spec it will be quantized with.
#[derive(Debug, Clone, Copy)]
pub struct AwqLinear<'a> {
    pub weight: &'a [f32],
    pub rows: usize,
    pub spec: WeightSpec,
}

#[derive(Debug, Clone, Copy)]
pub struct AwqOptions {
    /// Number of α values tried: `i / n_grid` for `i` in `0..n_grid` (20 in the paper).
    pub n_grid: usize,
    /// Bits of the static per-tensor activation grid the input is fake-quantized
    /// on inside the objective; `None` for weight-only layouts.
    pub act_bits: Option<u8>,
}

impl Default for AwqOptions {
    fn default() -> Self {
        Self {
            n_grid: 20,
            act_bits: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AwqResult {
    /// One scale per input channel: weights' columns are multiplied by it, the input divided.
    pub scales: Vec<f32>,
    /// The exponent chosen (0 means `scales` are all 1).
    pub alpha: f32,
    /// Objective at the chosen scales (sum of squared output errors over the sample).
    pub error: f64,
    /// Objective at `s = 1` (plain round-to-nearest, with the activation grid if any).
    pub rtn_error: f64,
}

/// Search AWQ's per-channel scales for the `linears` reading `x`, row-major
/// `[n, cols]` (a sample of `n` calibration tokens of the shared input).
pub fn search_scales(x: &[f32], cols: usize, linears: &[AwqLinear], opts: &AwqOptions) -> AwqResult {
    assert!(opts.n_grid >= 1, "AWQ needs at least one grid point");
    let objective = Objective::new(x, cols, linears, opts.act_bits, TileIsa::detect());
    let means = channel_means(x, cols);
    let mut best: Option<(f64, f32, Vec<f32>)> = None;
    let mut rtn_error = f64::NAN;
    for i in 0..opts.n_grid {
        let alpha = i as f32 / opts.n_grid as f32;
        let scales = scales_for_alpha(&means, alpha);
        let err = objective.error(&scales);
        if i == 0 {
            rtn_error = err;
        }
        // Strictly lower: ties keep the smaller α (the gentler transform).
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, alpha, scales));
        }
    }
    let (error, alpha, scales) = best.expect("n_grid >= 1");
    AwqResult {
        scales,
        alpha,
        error,
        rtn_error,
    }
}

/// The AWQ objective for given `scales` (see the module docs): the summed squared
/// output error of `linears` over the sample `x` (`[n, cols]`).
pub fn output_error(x: &[f32], cols: usize, linears: &[AwqLinear], scales: &[f32], act_bits: Option<u8>) -> f64 {
    Objective::new(x, cols, linears, act_bits, TileIsa::detect()).error(scales)
}

/// Mean `|x|` of every column of `x` (`[n, cols]`), accumulated in f64.
pub fn channel_means(x: &[f32], cols: usize) -> Vec<f32> {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "{} values are not rows of {cols}",
        x.len()
    );
    let n = x.len() / cols;
    let mut sums = vec![0f64; cols];
    for row in x.chunks_exact(cols) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v.abs() as f64;
        }
    }
    sums.iter().map(|&s| (s / n.max(1) as f64) as f32).collect()
}

/// AWQ's scales for exponent `alpha`: `max(mean^α, 1e-4)`, divided by the
/// geometric mean of their extremes (α = 0 gives exactly 1).
pub fn scales_for_alpha(means: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = means.iter().map(|&m| m.powf(alpha).max(1e-4)).collect();
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if s.is_empty() || !hi.is_finite() {
        return vec![1.0; means.len()];
    }
    // f64: the product of the extremes may overflow f32 for extreme α and inputs.
    let norm = ((hi as f64) * (lo as f64)).sqrt() as f32;
    for v in &mut s {
        *v /= norm;
    }
    s
}

/// Floats of packed weight panels one task keeps hot (≈ 512 KiB, within a core's L2).
const PANEL_BUDGET_FLOATS: usize = 1 << 17;

/// The objective of one search: the float reference output is computed once.
struct Objective<'s, 'w> {
    x: &'s [f32],
    n: usize,
    cols: usize,
    linears: &'s [AwqLinear<'w>],
    act_bits: Option<u8>,
    isa: TileIsa,
    /// Output rows of all linears stacked.
    rows: usize,
    /// Tokens rounded up to a multiple of MR (padding rows are zero).
    n_pad: usize,
    /// Weight panels (of NR output rows) per parallel task.
    group: usize,
    /// `X Wᵀ` panel-major: panel `p`, token `t`, output `j` at `(p · n_pad + t) · NR + j`.
    reference: Vec<f32>,
}

impl<'s, 'w> Objective<'s, 'w> {
    fn new(x: &'s [f32], cols: usize, linears: &'s [AwqLinear<'w>], act_bits: Option<u8>, isa: TileIsa) -> Self {
        assert!(cols > 0, "AWQ needs at least one input channel");
        assert!(
            x.len().is_multiple_of(cols) && !x.is_empty(),
            "sample of {} values is not a non-empty set of rows of {cols}",
            x.len()
        );
        assert!(!linears.is_empty(), "AWQ needs at least one linear");
        for l in linears {
            assert!(
                l.rows > 0 && l.weight.len() == l.rows * cols,
                "weight has {} values, not {} × {cols}",
                l.weight.len(),
                l.rows
            );
        }
        if let Some(b) = act_bits {
            assert!((2..=16).contains(&b), "activation grid of {b} bits");
        }
        let (mr, nr) = isa.tile();
        let n = x.len() / cols;
        let rows: usize = linears.iter().map(|l| l.rows).sum();
        let panels = rows.div_ceil(nr);
        let by_cache = (PANEL_BUDGET_FLOATS / (cols * nr)).max(1);
        // Enough tasks for rayon to balance, even when the group is small.
        let by_threads = panels.div_ceil(4 * rayon::current_num_threads()).max(1);
        let mut objective = Self {
            x,
            n,
            cols,
            linears,
            act_bits,
            isa,
            rows,
            n_pad: n.div_ceil(mr) * mr,
            group: by_cache.min(by_threads),
            reference: Vec::new(),
        };
        let mut stacked = Vec::with_capacity(rows * cols);
        for l in linears {
            stacked.extend_from_slice(l.weight);
        }
        let bp = pack_panels(&stacked, rows, cols, nr, |v, _| v);
        let ap = pack_panels(x, n, cols, mr, |v, _| v);
        objective.reference = objective.gemm_reference(&ap, &bp);
        objective
    }

    fn error(&self, scales: &[f32]) -> f64 {
        assert_eq!(scales.len(), self.cols, "one scale per input channel");
        let (mr, nr) = self.isa.tile();
        let q = self.quantized_weights(scales);
        let bp = pack_panels(&q, self.rows, self.cols, nr, |v, _| v);
        let mut ap = pack_panels(self.x, self.n, self.cols, mr, |v, c| v / scales[c]);
        if let Some(bits) = self.act_bits {
            // Padding zeros cannot move the range: `from_range` widens it to hold 0
            // anyway, and 0 stays exactly 0 on the grid.
            let (lo, hi) = ap.par_chunks(1 << 14).map(min_max).reduce(
                || (f32::INFINITY, f32::NEG_INFINITY),
                |a, b| (a.0.min(b.0), a.1.max(b.1)),
            );
            let grid = ActGrid::from_range(lo, hi, bits);
            ap.par_chunks_mut(1 << 14).for_each(|c| grid.fake(c));
        }
        self.gemm_error(&ap, &bp)
    }

    /// `Q(W · diag(s))` of every linear, dequantized and stacked row-major `[rows, cols]`.
    fn quantized_weights(&self, scales: &[f32]) -> Vec<f32> {
        let cols = self.cols;
        let mut out = Vec::with_capacity(self.rows * cols);
        for l in self.linears {
            // Per-row grids are independent, so blocks of rows quantize in parallel
            // with the same result; a per-tensor grid needs the whole tensor.
            let block = if l.spec.granularity == Granularity::PerTensor {
                l.rows
            } else {
                64
            };
            let parts: Vec<Vec<f32>> = l
                .weight
                .par_chunks(block * cols)
                .map(|w| {
                    let scaled: Vec<f32> = w
                        .chunks_exact(cols)
                        .flat_map(|row| row.iter().zip(scales).map(|(a, s)| a * s))
                        .collect();
                    dequantize_weight(&quantize_weight(&scaled, w.len() / cols, cols, &l.spec, 1.0))
                })
                .collect();
            for p in parts {
                out.extend_from_slice(&p);
            }
        }
        out
    }

    /// `A Bᵀ` stored panel-major (the layout of `reference`).
    fn gemm_reference(&self, ap: &[f32], bp: &[f32]) -> Vec<f32> {
        let (mr, nr) = self.isa.tile();
        let panels = self.rows.div_ceil(nr);
        let mut y = vec![0f32; panels * self.n_pad * nr];
        let n_pad = self.n_pad;
        y.par_chunks_mut(n_pad * nr * self.group)
            .zip(bp.par_chunks(self.cols * nr * self.group))
            .for_each(|(yg, bg)| {
                for_each_tile(self.isa, ap, bg, self.cols, &mut |p, t0, acc| {
                    yg[(p * n_pad + t0) * nr..][..mr * nr].copy_from_slice(acc);
                });
            });
        y
    }

    /// `‖reference − A Bᵀ‖²`, in f64. Padding contributes nothing: padded tokens
    /// and outputs are zero in both products.
    fn gemm_error(&self, ap: &[f32], bp: &[f32]) -> f64 {
        let (mr, nr) = self.isa.tile();
        let n_pad = self.n_pad;
        let partial: Vec<f64> = self
            .reference
            .par_chunks(n_pad * nr * self.group)
            .zip(bp.par_chunks(self.cols * nr * self.group))
            .map(|(yg, bg)| {
                let mut sum = 0f64;
                for_each_tile(self.isa, ap, bg, self.cols, &mut |p, t0, acc| {
                    let y = &yg[(p * n_pad + t0) * nr..][..mr * nr];
                    for (&r, &a) in y.iter().zip(acc) {
                        let e = (r - a) as f64;
                        sum += e * e;
                    }
                });
                sum
            })
            .collect();
        // Summed in a fixed order so a search is reproducible run to run.
        partial.iter().sum()
    }
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
        (lo.min(x), hi.max(x))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::pseudo_random;

    fn spec(bits: u8, granularity: Granularity) -> WeightSpec {
        WeightSpec::new(bits, granularity, true)
    }

    /// `[n, cols]` activations in [−1, 1], with the `salient` channels ×`gain`.
    fn activations(n: usize, cols: usize, salient: &[usize], gain: f32, seed: u64) -> Vec<f32> {
        let mut x = pseudo_random(n * cols, seed, 1.0);
        for row in x.chunks_exact_mut(cols) {
            for &c in salient {
                row[c] *= gain;
            }
        }
        x
    }

    /// q/k/v-like group: three weights with `rows` outputs each.
    fn weights(rows: &[usize], cols: usize, seed: u64) -> Vec<Vec<f32>> {
        rows.iter()
            .enumerate()
            .map(|(i, &r)| pseudo_random(r * cols, seed + i as u64, 0.1))
            .collect()
    }

    fn linears<'a>(ws: &'a [Vec<f32>], cols: usize, spec: WeightSpec) -> Vec<AwqLinear<'a>> {
        ws.iter()
            .map(|w| AwqLinear {
                weight: w,
                rows: w.len() / cols,
                spec,
            })
            .collect()
    }

    /// The objective written out plainly: f64 triple loops, no packing.
    fn naive_error(x: &[f32], cols: usize, lins: &[AwqLinear], s: &[f32], act_bits: Option<u8>) -> f64 {
        let n = x.len() / cols;
        let mut a: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v / s[i % cols]).collect();
        if let Some(bits) = act_bits {
            let lo = a.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ActGrid::from_range(lo, hi, bits).fake(&mut a);
        }
        let mut err = 0f64;
        for l in lins {
            let scaled: Vec<f32> = l.weight.iter().enumerate().map(|(i, &w)| w * s[i % cols]).collect();
            let q = dequantize_weight(&quantize_weight(&scaled, l.rows, cols, &l.spec, 1.0));
            for t in 0..n {
                for r in 0..l.rows {
                    let (mut y, mut yq) = (0f64, 0f64);
                    for c in 0..cols {
                        y += x[t * cols + c] as f64 * l.weight[r * cols + c] as f64;
                        yq += a[t * cols + c] as f64 * q[r * cols + c] as f64;
                    }
                    err += (y - yq).powi(2);
                }
            }
        }
        err
    }

    #[test]
    fn salient_channels_get_scaled_and_beat_rtn() {
        let (n, cols) = (256, 64);
        let x = activations(n, cols, &[3, 17, 40, 58], 20.0, 7);
        let ws = weights(&[64, 32, 32], cols, 100);
        let lins = linears(&ws, cols, spec(4, Granularity::PerGroup(32)));
        for act_bits in [None, Some(8)] {
            let r = search_scales(&x, cols, &lins, &AwqOptions { n_grid: 20, act_bits });
            let ratio = r.error / r.rtn_error;
            println!(
                "act_bits {act_bits:?}: alpha {}, error {:.4e}, rtn {:.4e}, ratio {ratio:.3}",
                r.alpha, r.error, r.rtn_error
            );
            assert!(r.alpha > 0.0, "act_bits {act_bits:?}: α = 0 chosen");
            assert!(ratio < 0.8, "act_bits {act_bits:?}: AWQ/RTN error ratio {ratio}");
            // The salient channels are the ones scaled up.
            let others = r
                .scales
                .iter()
                .enumerate()
                .filter(|(c, _)| ![3, 17, 40, 58].contains(c))
                .map(|(_, &s)| s)
                .fold(0f32, f32::max);
            for c in [3, 17, 40, 58] {
                assert!(r.scales[c] > others, "salient channel {c}: {} ≤ {others}", r.scales[c]);
            }
        }
    }

    #[test]
    fn uniform_activations_are_never_worse_than_rtn() {
        let (n, cols) = (128, 96);
        let x = activations(n, cols, &[], 1.0, 3);
        let ws = weights(&[48, 24, 24], cols, 200);
        for (sp, act_bits) in [
            (spec(4, Granularity::PerGroup(32)), None),
            (spec(4, Granularity::PerChannel), Some(8)),
            (spec(3, Granularity::PerTensor), None),
        ] {
            let lins = linears(&ws, cols, sp);
            let r = search_scales(&x, cols, &lins, &AwqOptions { n_grid: 20, act_bits });
            println!(
                "{:?} act_bits {act_bits:?}: alpha {}, ratio {:.4}",
                sp.granularity,
                r.alpha,
                r.error / r.rtn_error
            );
            assert!(r.error <= r.rtn_error, "{} > {}", r.error, r.rtn_error);
            assert!(r.scales.iter().all(|s| s.is_finite() && *s > 0.0));
            // `rtn_error` really is the unscaled objective.
            let rtn = output_error(&x, cols, &lins, &vec![1.0; cols], act_bits);
            assert_eq!(rtn, r.rtn_error);
        }
    }

    #[test]
    fn error_matches_a_naive_evaluation_of_the_objective() {
        // Sizes off the tile multiples, so padding is exercised; 3-bit weights keep
        // the output error well above f32 rounding of the products.
        let (n, cols) = (13, 24);
        let x = activations(n, cols, &[5, 19], 12.0, 11);
        let ws = weights(&[5, 19, 3], cols, 300);
        let lins = linears(&ws, cols, spec(3, Granularity::PerGroup(8)));
        for act_bits in [None, Some(8)] {
            let r = search_scales(&x, cols, &lins, &AwqOptions { n_grid: 20, act_bits });
            let means = channel_means(&x, cols);
            for (what, s, got) in [
                ("chosen", r.scales.clone(), r.error),
                ("rtn", vec![1.0; cols], r.rtn_error),
                (
                    "alpha 0.5",
                    scales_for_alpha(&means, 0.5),
                    output_error(&x, cols, &lins, &scales_for_alpha(&means, 0.5), act_bits),
                ),
            ] {
                let want = naive_error(&x, cols, &lins, &s, act_bits);
                let rel = (got - want).abs() / want;
                println!("act_bits {act_bits:?} {what}: {got:.6e} vs naive {want:.6e} (rel {rel:.1e})");
                assert!(rel < 1e-6, "act_bits {act_bits:?} {what}: {got} vs naive {want}");
            }
        }
    }

    #[test]
    fn portable_and_simd_kernels_agree() {
        let (n, cols) = (37, 40);
        let x = activations(n, cols, &[1], 8.0, 5);
        let ws = weights(&[21, 11], cols, 400);
        let lins = linears(&ws, cols, spec(4, Granularity::PerChannel));
        let s = scales_for_alpha(&channel_means(&x, cols), 0.4);
        let fast = Objective::new(&x, cols, &lins, Some(8), TileIsa::detect()).error(&s);
        let portable = Objective::new(&x, cols, &lins, Some(8), TileIsa::Portable).error(&s);
        assert!((fast - portable).abs() <= 1e-5 * portable, "{fast} vs {portable}");
    }

    #[test]
    fn alpha_zero_gives_unit_scales_and_scales_are_centred() {
        let means = [0.0, 0.5, 2.0, 8.0];
        assert_eq!(scales_for_alpha(&means, 0.0), vec![1.0; 4]);
        let s = scales_for_alpha(&means, 0.5);
        let (lo, hi) = (s[0], s[3]);
        assert!(((lo * hi).sqrt() - 1.0).abs() < 1e-5, "{s:?}");
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }

    /// `cargo test -p oqt-compress --lib awq -- --ignored --nocapture`
    #[test]
    #[ignore = "timing of real-sized searches (a 576-wide model's q/k/v and gate/up)"]
    fn real_sized_search_timing() {
        let cols = 576;
        for (what, n, rows) in [("q/k/v", 512, vec![576, 192, 192]), ("gate/up", 2048, vec![1536, 1536])] {
            let x = activations(n, cols, &[10, 200, 333, 500], 20.0, 1);
            let ws = weights(&rows, cols, 500);
            let lins = linears(&ws, cols, spec(4, Granularity::PerGroup(32)));
            for act_bits in [None, Some(8)] {
                let t = std::time::Instant::now();
                let r = search_scales(&x, cols, &lins, &AwqOptions { n_grid: 20, act_bits });
                println!(
                    "{what}: n {n}, cols {cols}, rows {}, act_bits {act_bits:?}: {:.2} s ({} threads), alpha {}, ratio {:.3}",
                    rows.iter().sum::<usize>(),
                    t.elapsed().as_secs_f64(),
                    rayon::current_num_threads(),
                    r.alpha,
                    r.error / r.rtn_error
                );
            }
        }
    }
}
