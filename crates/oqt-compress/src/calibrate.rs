//! Calibration: run the float model over calibration text and record the
//! range of every static activation site, then turn the ranges into grids.
//!
//! Windows are `seq_len` tokens taken at evenly spaced offsets across the whole
//! text (deterministic, and covering more than its beginning).

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
}

impl RangeObserver {
    pub fn new(range: ActRange, percentile: f64) -> Self {
        Self {
            percentile: (range == ActRange::Percentile).then_some(percentile),
            stats: RefCell::new(BTreeMap::new()),
        }
    }

    fn record<const D: usize>(&self, key: String, x: &Tensor<D>) {
        let mut v: Vec<f32> = x
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 activations");
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
            self.record(proj.input_site().key(layer), &x);
        }
        float(x)
    }

    fn act(&self, layer: usize, site: ActSite, x: Tensor<3>) -> Tensor<3> {
        self.record(site.key(layer), &x);
        x
    }
}

/// Observe `windows` through `model` and return every static site's grid under
/// `spec`; `progress(done, total)` after each window.
pub fn calibrate(
    model: &Llama,
    spec: &QuantSpec,
    calibration: &CalibrationSpec,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<String, ActGrid>> {
    let observer = RangeObserver::new(calibration.act_range, calibration.percentile);
    for (i, w) in windows.iter().enumerate() {
        let hidden = model.forward_hidden_with(model.tokens_tensor(w), None, &observer);
        // The head's input (final_in) is recorded through the head hook; its logits are not needed,
        // but the hook sees the input only when called, so run the head on the last position.
        let [b, s, d] = hidden.dims();
        let _ = model.logits_with(hidden.slice([0..b, s - 1..s, 0..d]), &observer);
        progress(i + 1, windows.len());
    }
    grids_from_ranges(spec, model.n_layers(), &observer.ranges())
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
) -> Result<crate::rtn::Calibrated> {
    let (data, windows) = load_windows(&model.tokenizer, calibration)?;
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)
        .map_err(|e| CoreError::Other(format!("selecting the CPU device: {e}")))?;
    let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &device);
    let grids = calibrate(&llama, spec, calibration, &windows, progress)?;
    Ok(crate::rtn::Calibrated {
        grids,
        input: oqt_core::bundle::InputRecord {
            role: "calibration".into(),
            path: data.path.display().to_string(),
            sha256: oqt_core::datasets::sha256_file(&data.path)?,
        },
    })
}
