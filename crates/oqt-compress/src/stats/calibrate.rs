//! Calibration: run the float model over calibration text and record the
//! range of every static activation site, then turn the ranges into grids.
//!
//! Windows are `seq_len` tokens taken at evenly spaced offsets across the whole
//! text (deterministic, and covering more than its beginning).

use crate::stats::inputs::to_vec;
use burn::tensor::Tensor;
use oqt_core::datasets::ResolvedDataset;
use oqt_core::quant::{ActGrid, ActRange, ActSite, CalibrationSpec, QuantSpec, static_sites};
use oqt_core::{CoreError, Result, Tokenizer};
use oqt_model::hooks::{ForwardHooks, Proj};
use oqt_model::llama::Llama;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Token windows for calibration from `text`.
pub fn calibration_windows(tokenizer: &Tokenizer, text: &str, samples: usize, seq_len: usize) -> Result<Vec<Vec<u32>>> {
    let tokens = tokenizer.encode(text, false)?;
    if tokens.len() < seq_len {
        return Err(CoreError::Other(format!(
            "calibration text has {} tokens; a window needs {seq_len}",
            tokens.len()
        )));
    }
    let last = tokens.len() - seq_len;
    let stride = if samples > 1 { last / (samples - 1) } else { 0 };
    Ok((0..samples)
        .map(|i| tokens[i * stride..i * stride + seq_len].to_vec())
        .collect())
}

/// The windows of `spec` from its dataset (`samples`/`seq_len` may be overridden).
pub fn load_windows(tokenizer: &Tokenizer, spec: &CalibrationSpec) -> Result<(ResolvedDataset, Vec<Vec<u32>>)> {
    let data = oqt_core::datasets::resolve(&spec.dataset)?;
    if data.is_eval_set() {
        return Err(CoreError::Other(format!(
            "calibration dataset `{}` is an evaluation set; calibrate on a training set (e.g. tinyshakespeare)",
            data.name
        )));
    }
    let windows = calibration_windows(tokenizer, &data.read_text()?, spec.samples, spec.seq_len)?;
    Ok((data, windows))
}

#[derive(Debug, Clone, Copy)]
struct SiteStats {
    min: f32,
    max: f32,
    pmin_sum: f64,
    pmax_sum: f64,
    windows: usize,
}

/// Records per-site ranges through the forward hooks (the model output is unchanged).
pub struct RangeObserver {
    percentile: Option<f64>,
    stats: RefCell<BTreeMap<String, SiteStats>>,
    /// Sites whose input rows are sampled for a range search, and the rows
    /// kept so far: every `stride`-th position of the windows taken end to
    /// end, so no position within a window is favoured.
    sampled: BTreeMap<String, RefCell<Vec<f32>>>,
    stride: usize,
    /// Positions in the windows observed before the current one.
    seen: std::cell::Cell<usize>,
}

impl RangeObserver {
    pub fn new(range: ActRange, percentile: f64) -> Self {
        Self {
            percentile: (range == ActRange::Percentile).then_some(percentile),
            stats: RefCell::new(BTreeMap::new()),
            sampled: BTreeMap::new(),
            stride: 1,
            seen: std::cell::Cell::new(0),
        }
    }

    /// Also keep every `stride`-th input row of the sites `keys` (call
    /// [`RangeObserver::window_done`] after each window).
    fn sampling(mut self, keys: impl IntoIterator<Item = String>, stride: usize) -> Self {
        self.sampled = keys.into_iter().map(|k| (k, RefCell::new(Vec::new()))).collect();
        self.stride = stride.max(1);
        self
    }

    /// The window just observed had `positions` positions.
    fn window_done(&self, positions: usize) {
        self.seen.set(self.seen.get() + positions);
    }

    fn record<const D: usize>(&self, key: String, x: &Tensor<D>) {
        self.record_values(key, to_vec(x.clone()));
    }

    /// [`RangeObserver::record`] of activations already read out of their tensor.
    fn record_values(&self, key: String, mut v: Vec<f32>) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &a in &v {
            lo = lo.min(a);
            hi = hi.max(a);
        }
        let (plo, phi) = match self.percentile {
            Some(p) if v.len() > 1 => {
                let n = v.len();
                let k_hi = (((p / 100.0) * (n - 1) as f64).round() as usize).min(n - 1);
                let k_lo = n - 1 - k_hi;
                let hi_v = *v.select_nth_unstable_by(k_hi, f32::total_cmp).1;
                let lo_v = *v.select_nth_unstable_by(k_lo, f32::total_cmp).1;
                (lo_v as f64, hi_v as f64)
            }
            _ => (lo as f64, hi as f64),
        };
        let mut stats = self.stats.borrow_mut();
        let s = stats.entry(key).or_insert(SiteStats {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            pmin_sum: 0.0,
            pmax_sum: 0.0,
            windows: 0,
        });
        s.min = s.min.min(lo);
        s.max = s.max.max(hi);
        s.pmin_sum += plo;
        s.pmax_sum += phi;
        s.windows += 1;
    }

    /// `(min, max)` per site key: the extremes, or the averaged percentiles.
    pub fn ranges(&self) -> BTreeMap<String, (f32, f32)> {
        self.stats
            .borrow()
            .iter()
            .map(|(k, s)| {
                let r = match self.percentile {
                    Some(_) => (
                        (s.pmin_sum / s.windows as f64) as f32,
                        (s.pmax_sum / s.windows as f64) as f32,
                    ),
                    None => (s.min, s.max),
                };
                (k.clone(), r)
            })
            .collect()
    }
}

impl ForwardHooks for RangeObserver {
    fn linear(&self, layer: usize, proj: Proj, x: Tensor<3>, float: &dyn Fn(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        // q/k/v share one input and gate/up another: record each tensor once.
        if !matches!(proj, Proj::K | Proj::V | Proj::Up) {
            let key = proj.input_site().key(layer);
            let values = to_vec(x.clone());
            if let Some(rows) = self.sampled.get(&key) {
                let d = x.dims()[2];
                let first = (self.stride - self.seen.get() % self.stride) % self.stride;
                rows.borrow_mut()
                    .extend(values.chunks_exact(d).skip(first).step_by(self.stride).flatten());
            }
            self.record_values(key, values);
        }
        float(x)
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        self.record(site.key(layer), &x);
        x
    }
}

/// Observe `windows` through `model` and return every static site's grid under
/// `spec`; `progress(done, total)` after each window. Under the min/max rule
/// the head's input range is then narrowed by [`search_input_range`]; under
/// the search rule every 8-bit decoder linear input's range is too.
pub fn calibrate(
    model: &Llama,
    spec: &QuantSpec,
    calibration: &CalibrationSpec,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, ActGrid>> {
    let search_head = matches!(calibration.act_range, ActRange::Minmax | ActRange::Search);
    let searched_inputs: Vec<(usize, Proj)> = if calibration.act_range == ActRange::Search {
        (0..model.n_layers())
            .flat_map(|l| [Proj::Q, Proj::O, Proj::Gate, Proj::Down].map(|p| (l, p)))
            .filter(|&(l, p)| p.input_site().bits_at(l, spec) == 8)
            .collect()
    } else {
        Vec::new()
    };
    let total_tokens: usize = windows.iter().map(Vec::len).sum();
    let observer = RangeObserver::new(calibration.act_range, calibration.percentile).sampling(
        searched_inputs.iter().map(|&(l, p)| p.input_site().key(l)),
        total_tokens.div_ceil(LINEAR_INPUT_SAMPLES),
    );
    let stride = total_tokens.div_ceil(HEAD_INPUT_SAMPLES).max(1);
    let mut head_inputs = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let hidden = model.forward_hidden_with(model.tokens_tensor(w), None, &observer);
        // The head's input is the final norm's output at every position:
        // recorded directly (the logits are not needed) and, for the range
        // search below, sampled.
        let d = hidden.dims()[2];
        let rows = to_vec(hidden);
        if search_head {
            head_inputs.extend(rows.chunks_exact(d).step_by(stride).flatten());
        }
        observer.record_values(ActSite::FinalIn.key(0), rows);
        observer.window_done(w.len());
        progress(i + 1, windows.len());
    }
    let mut ranges = observer.ranges();
    if search_head && let Some(&(lo, hi)) = ranges.get(&ActSite::FinalIn.key(0)) {
        let bits = ActSite::FinalIn.bits(spec);
        let searched = search_input_range(&head_inputs, &head_column_weights(model), lo, hi, bits);
        ranges.insert(ActSite::FinalIn.key(0), searched);
    }
    for &(l, p) in &searched_inputs {
        let key = p.input_site().key(l);
        if let (Some(&(lo, hi)), Some(rows)) = (ranges.get(&key), observer.sampled.get(&key)) {
            let searched = search_input_range(&rows.take(), &input_column_weights(model, l, p.input_site()), lo, hi, 8);
            tracing::debug!(%key, ?searched, observed = ?(lo, hi), "searched input range");
            ranges.insert(key, searched);
        }
    }
    grids_from_ranges(spec, model.n_layers(), &ranges)
}

/// Input rows kept per decoder linear input for the search rule, all held
/// until the pass ends: ~6 MiB per site at SmolLM2's MLP width, ~380 MiB
/// for its 120 sites, ~0.9 GiB at Llama-3.2-1B's shapes.
const LINEAR_INPUT_SAMPLES: usize = 1024;

/// `Σ_o W[o, j]²` over every decoder linear reading `site` (q, k and v
/// share one input; gate and up another): how much an error in input channel
/// `j` moves their outputs.
fn input_column_weights(model: &Llama, layer: usize, site: ActSite) -> Vec<f32> {
    let squares = Proj::PER_LAYER
        .into_iter()
        .filter(|p| p.input_site() == site)
        .map(|p| input_channel_squares(model.decoder_linear(layer, p)))
        .reduce(|a, b| a + b)
        .expect("at least one reader");
    to_vec(squares)
}

/// `Σ_o W[o, j]²` of one linear layer, per input channel `j`.
fn input_channel_squares(linear: &burn::nn::Linear) -> Tensor<2> {
    // Burn's Linear stores `[d_in, d_out]`.
    let w = linear.weight.val();
    (w.clone() * w).sum_dim(1)
}

/// Head-input rows kept for the range search (~19 MiB at SmolLM2's width).
const HEAD_INPUT_SAMPLES: usize = 8192;

/// `Σ_v W[v, j]²` for each input channel `j` of the head (the tied embedding
/// when there is no separate head): how much an error in channel `j` moves
/// the logits.
fn head_column_weights(model: &Llama) -> Vec<f32> {
    let squares = match &model.lm_head {
        Some(head) => input_channel_squares(head),
        None => {
            let w = model.embed_tokens.weight.val(); // [vocab, d]
            (w.clone() * w).sum_dim(0)
        }
    };
    to_vec(squares)
}

/// The input range `[a·lo, b·hi]` (`a, b` on a 5% grid) whose static grid
/// gives the least output error `Σ_j w_j·(x_j − q(x_j))²` over `rows`, where
/// `w_j` is how much an error in channel `j` moves the consuming layer.
///
/// A min/max range is set by a handful of tokens. The head's input, where
/// this search began: on SmolLM2 the final norm's output spans ~82 where the
/// bulk is a few units, an 8-bit step of 0.32; MobileQuant does not train
/// the head's grid (its loss ends at the last decoder layer), so every
/// static method takes it from here. SmolLM2 `w8a8` RTN with a 16-bit
/// down-projection input, WikiText-2 16 chunks: min/max 30.95, searched
/// 30.67, the head input at 16 bits 30.26.
///
/// The error is summed over a channel-weighted histogram of the values
/// (2¹⁶ bins over `[lo, hi]`, each keeping `Σw`, `Σw·x`, `Σw·x²`), so each
/// of the 400 candidates costs one pass over the bins, not over the rows: it
/// is exact except in the bins a rounding boundary cuts — for 8-bit grids a
/// bin is under 1/12 of the narrowest candidate's step; for 16-bit grids
/// the rounding term is coarse but the clipping term, which decides there,
/// stays exact.
pub fn search_input_range(rows: &[f32], col_weights: &[f32], lo: f32, hi: f32, bits: u8) -> (f32, f32) {
    let d = col_weights.len();
    if rows.is_empty() || d == 0 || hi <= lo || !(lo.is_finite() && hi.is_finite()) {
        return (lo, hi);
    }
    let bins = weighted_histogram(rows, col_weights, lo, hi);
    let error = |lo: f32, hi: f32| binned_error(&bins, ActGrid::from_range(lo, hi, bits));
    let fractions: Vec<f32> = (1..=20).map(|k| k as f32 / 20.0).collect();
    // A grid always holds 0: an end on 0's side of it gains nothing by shrinking.
    let shrinks = |end: f32| if end < 0.0 { fractions.clone() } else { vec![1.0] };
    let (a_values, b_values) = (shrinks(lo), shrinks(-hi));
    let mut best = ((lo, hi), error(lo, hi));
    for &a in &a_values {
        for &b in &b_values {
            let candidate = (a * lo, b * hi);
            let e = error(candidate.0, candidate.1);
            if e < best.1 {
                best = (candidate, e);
            }
        }
    }
    best.0
}

const HISTOGRAM_BINS: usize = 1 << 16;

/// The non-empty bins of `rows`' values over `[lo, hi]`, value `x` of channel
/// `j` counted with weight `w_j`: `[Σw, Σw·x, Σw·x²]` per bin.
fn weighted_histogram(rows: &[f32], col_weights: &[f32], lo: f32, hi: f32) -> Vec<[f64; 3]> {
    debug_assert_eq!(rows.len() % col_weights.len(), 0, "rows of the weights' width");
    let mut bins = vec![[0f64; 3]; HISTOGRAM_BINS];
    let per_unit = HISTOGRAM_BINS as f64 / (hi as f64 - lo as f64);
    for row in rows.chunks_exact(col_weights.len()) {
        // A non-finite value has no bin (and would poison one).
        for (&x, &w) in row.iter().zip(col_weights).filter(|(x, _)| x.is_finite()) {
            let i = (((x as f64 - lo as f64) * per_unit) as usize).min(HISTOGRAM_BINS - 1);
            let (x, w) = (x as f64, w as f64);
            let b = &mut bins[i];
            b[0] += w;
            b[1] += w * x;
            b[2] += w * x * x;
        }
    }
    bins.retain(|b| b[0] > 0.0);
    bins
}

/// `Σ w·(x − q(x))²` over the histogram, each bin quantized at its mean.
fn binned_error(bins: &[[f64; 3]], grid: ActGrid) -> f64 {
    let inv = grid.inv_scale();
    bins.iter()
        .map(|&[s0, s1, s2]| {
            let mean = (s1 / s0) as f32;
            let q = ((grid.quantize(mean, inv) - grid.zero_point) as f32 * grid.scale) as f64;
            // Σw(x − q)² with q constant over the bin; clamp the rounding residue.
            (s2 - 2.0 * q * s1 + q * q * s0).max(0.0)
        })
        .sum()
}

/// Grids for every static site of `spec` from observed ranges.
pub fn grids_from_ranges(
    spec: &QuantSpec,
    n_layers: usize,
    ranges: &BTreeMap<String, (f32, f32)>,
) -> Result<BTreeMap<String, ActGrid>> {
    let mut out = BTreeMap::new();
    for (key, site, bits) in static_sites(spec, n_layers) {
        if site.is_fixed() {
            continue;
        }
        let &(lo, hi) = ranges
            .get(&key)
            .ok_or_else(|| CoreError::Other(format!("calibration saw no activations at site `{key}`")))?;
        out.insert(key, ActGrid::from_range(lo, hi, bits));
    }
    Ok(out)
}

/// Calibrate `model`'s float weights for `spec` on `calibration`'s windows:
/// builds a Burn copy of the model on the CPU, observes, and drops it.
pub fn calibrate_model(
    model: &oqt_core::LoadedModel,
    spec: &QuantSpec,
    calibration: &CalibrationSpec,
    progress: impl FnMut(usize, usize),
) -> Result<crate::ptq::rtn::Calibrated> {
    let (data, windows) = load_windows(&model.tokenizer, calibration)?;
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)
        .map_err(|e| CoreError::Other(format!("selecting the CPU device: {e}")))?;
    let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &device);
    let grids = calibrate(&llama, spec, calibration, &windows, progress)?;
    Ok(crate::ptq::rtn::Calibrated {
        grids,
        input: oqt_core::bundle::InputRecord::of_file("calibration", &data.path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::pseudo_random;

    /// `Σ_j w_j·(x_j − q(x_j))²` of `rows` on the grid over `[lo, hi]`.
    fn weighted_error(rows: &[f32], w: &[f32], (lo, hi): (f32, f32)) -> f32 {
        let mut q = rows.to_vec();
        ActGrid::from_range(lo, hi, 8).fake(&mut q);
        rows.iter()
            .zip(&q)
            .enumerate()
            .map(|(i, (x, y))| w[i % w.len()] * (x - y) * (x - y))
            .sum()
    }

    #[test]
    fn the_head_input_range_clips_a_rare_outlier_where_that_lowers_the_logit_error() {
        // 4 channels × 64k rows in [−1, 1]; one value of 3 in channel 0. Covering
        // it doubles every other value's rounding step; clipping it to ~2
        // costs less than that over 256k values.
        let d = 4;
        let mut rows = pseudo_random(64_000 * d, 3, 1.0);
        rows[0] = 3.0;
        let (lo, hi) = rows.iter().fold((0f32, 0f32), |(a, b), &x| (a.min(x), b.max(x)));
        let even = vec![1.0; d];
        let searched = search_input_range(&rows, &even, lo, hi, 8);
        assert!(
            searched.1 <= 0.7 * hi,
            "the outlier is clipped: {searched:?} of {:?}",
            (lo, hi)
        );
        assert!(
            weighted_error(&rows, &even, searched) < 0.9 * weighted_error(&rows, &even, (lo, hi)),
            "and the error falls"
        );
        // The same outlier in a channel the head weighs 100× more keeps more range.
        let heavy = vec![100.0, 1.0, 1.0, 1.0];
        let kept = search_input_range(&rows, &heavy, lo, hi, 8);
        assert!(
            kept.1 > searched.1,
            "a heavy channel's outlier keeps more: {kept:?} vs {searched:?}"
        );
        // Without samples the range is left as observed.
        assert_eq!(search_input_range(&[], &even, lo, hi, 8), (lo, hi));
    }

    #[test]
    fn the_binned_error_is_the_exact_error_to_within_a_part_in_a_thousand() {
        let d = 16;
        let mut rows = pseudo_random(4096 * d, 9, 2.0);
        rows[7] = 40.0;
        rows[100] = -15.0;
        let w = pseudo_random(d, 4, 1.0)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect::<Vec<_>>();
        let (lo, hi) = (-15.0, 40.0);
        let bins = weighted_histogram(&rows, &w, lo, hi);
        for (a, b) in [(1.0, 1.0), (0.5, 0.2), (0.05, 0.05), (1.0, 0.1)] {
            let exact = weighted_error(&rows, &w, (a * lo, b * hi)) as f64;
            let binned = binned_error(&bins, ActGrid::from_range(a * lo, b * hi, 8));
            assert!(
                (binned - exact).abs() <= 1e-3 * exact,
                "{a}·lo, {b}·hi: binned {binned} vs exact {exact}"
            );
        }
    }

    #[test]
    fn the_search_rule_narrows_only_the_eight_bit_linear_inputs() {
        use oqt_core::testing::{random_weights, tiny_config};
        let cfg = tiny_config();
        let llama = oqt_model::llama_from_weights(&cfg, random_weights(&cfg, 5), &burn::tensor::Device::flex());
        let mut recipe = oqt_core::quant::load_recipe("w8a8").unwrap();
        // One 16-bit linear input: not searched.
        recipe.spec.act16_sites.push("down_proj_input@0".into());
        let windows: Vec<Vec<u32>> = (0..3)
            .map(|w| (0..40).map(|i| ((i * 17 + w * 5) % cfg.vocab_size) as u32).collect())
            .collect();
        let with = |rule| {
            let c = CalibrationSpec {
                act_range: rule,
                ..recipe.calibration.clone()
            };
            calibrate(&llama, &recipe.spec, &c, &windows, |_, _| {}).unwrap()
        };
        let (minmax, searched) = (with(ActRange::Minmax), with(ActRange::Search));
        assert_eq!(minmax.keys().collect::<Vec<_>>(), searched.keys().collect::<Vec<_>>());
        let mut narrowed = 0;
        for (key, m) in &minmax {
            let s = &searched[key];
            let linear_input = ["attn_in", "attn_out", "mlp_in", "down_in"]
                .iter()
                .any(|n| key.ends_with(n));
            if key == "layers.0.down_in" {
                assert_eq!((m.bits, s), (16, m), "the 16-bit input keeps its min/max range");
            } else if linear_input && m.bits == 8 {
                let width = |g: &ActGrid| g.scale * ((1u32 << g.bits) - 1) as f32;
                assert!(width(s) <= width(m) * (1.0 + 1e-6), "{key}: {s:?} wider than {m:?}");
                narrowed += usize::from(width(s) < width(m));
            } else if key != "final_in" {
                assert_eq!(s, m, "{key} is not searched");
            }
        }
        assert!(narrowed > 0, "some 8-bit input range is narrowed");
    }
}
