//! Quantization specs: bits, granularity, symmetry, scale rule, rounding, and
//! static or dynamic activations, written in recipes and bundle manifests.

use serde::{Deserialize, Serialize};

/// Which values share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    PerTensor,
    /// One scale per output row.
    PerChannel,
    /// One scale per `size` consecutive input columns of an output row.
    PerGroup(usize),
    /// Qualcomm's low-power block quantization (LPBQ): 4-bit values in blocks
    /// of `size` input columns, each block's scale an integer in [1, 16] times
    /// one float scale per output row. `q4 · m` is an 8-bit per-channel
    /// integer weight, so kernels keep per-channel integer arithmetic
    /// (`Σ_b m_b · dot_b` exact, one float scale per row).
    Lpbq(usize),
}

/// Largest LPBQ block multiplier: 4-bit values × [1, 16] span the int8 grid.
pub const LPBQ_MAX_MULTIPLIER: u8 = 16;

impl Granularity {
    /// The LPBQ block size, for LPBQ grids.
    pub fn lpbq_block(self) -> Option<usize> {
        match self {
            Self::Lpbq(b) => Some(b),
            _ => None,
        }
    }
}

/// How a symmetric grid's scale follows from the absolute maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleRule {
    /// `amax / (2^(b−1) − 1)`: `−amax` and `+amax` both land on the grid (−8 unused at 4 bits).
    AmaxOverQmax,
    /// `amax / ((qmax − qmin) / 2)`, torchao's choice: `amax / 7.5` at 4 bits.
    AmaxOverHalfRange,
    /// llama.cpp's Q8_0 reference quantizer (8 bits, blocks of 32): `d = amax / 127`,
    /// `q = roundf(x · (1/d))` (half away from zero); `d` is stored as f16, so the
    /// grid is `f16(d) · q`. The scale rule fixes the rounding (`rounding` is ignored).
    #[serde(rename = "llama.cpp-q8_0")]
    LlamaCppQ8_0,
    /// llama.cpp's Q4_0 reference quantizer (4 bits, blocks of 32): `d = max / −8`
    /// with `max` the *signed* value of largest magnitude (first one on ties),
    /// `q = min(15, ⌊x · (1/d) + 8.5⌋) − 8`; the grid is `f16(d) · q`, its
    /// orientation flipping with the sign of `max`.
    #[serde(rename = "llama.cpp-q4_0")]
    LlamaCppQ4_0,
}

impl ScaleRule {
    /// True for the rules that reproduce a llama.cpp block format bit for bit.
    pub fn is_llama_cpp(self) -> bool {
        matches!(self, Self::LlamaCppQ8_0 | Self::LlamaCppQ4_0)
    }
}

/// Rounding of `x / scale` to the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rounding {
    /// What SIMD float→int conversion does; oqt's kernels use it.
    HalfToEven,
    /// C `roundf`, llama.cpp's scalar reference quantizers.
    HalfAwayFromZero,
}

impl Rounding {
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::HalfToEven => x.round_ties_even(),
            Self::HalfAwayFromZero => x.round(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightSpec {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    pub granularity: Granularity,
    #[serde(default = "yes")]
    pub symmetric: bool,
    #[serde(default = "default_scale_rule")]
    pub scale_rule: ScaleRule,
    #[serde(default = "default_rounding")]
    pub rounding: Rounding,
}

fn yes() -> bool {
    true
}
fn default_scale_rule() -> ScaleRule {
    ScaleRule::AmaxOverQmax
}
fn default_rounding() -> Rounding {
    Rounding::HalfToEven
}

impl WeightSpec {
    /// A grid with the default scale rule (`amax / qmax`) and rounding (half to even).
    pub fn new(bits: u8, granularity: Granularity, symmetric: bool) -> Self {
        Self {
            bits,
            granularity,
            symmetric,
            scale_rule: default_scale_rule(),
            rounding: default_rounding(),
        }
    }

    /// Integer range of the grid.
    pub fn qrange(&self) -> (i32, i32) {
        if self.symmetric {
            (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1)
        } else {
            (0, (1 << self.bits) - 1)
        }
    }

    /// The scale as stored and used for dequantization: llama.cpp's grids keep
    /// their block scale in f16, everything else in f32.
    pub fn stored_scale(&self, scale: f32) -> f32 {
        if self.scale_rule.is_llama_cpp() {
            half::f16::from_f32(scale).to_f32()
        } else {
            scale
        }
    }

    /// Columns per scale for a row of `cols` inputs.
    pub fn group_len(&self, cols: usize) -> usize {
        match self.granularity {
            Granularity::PerGroup(g) => g,
            // LPBQ's float scale is per row; its block multipliers are integers.
            Granularity::PerChannel | Granularity::PerTensor | Granularity::Lpbq(_) => cols,
        }
    }

    /// Problems of this grid on a weight `cols` inputs wide (`field` names it).
    pub fn width_problems(&self, field: &str, cols: usize) -> Option<String> {
        match self.granularity {
            Granularity::Lpbq(b) if !cols.is_multiple_of(b) => Some(format!(
                "{field}: LPBQ blocks of {b} do not divide its {cols} input channels; pick a block size that divides {cols} (16, 32 or 64 for this model's widths)"
            )),
            _ => None,
        }
    }
}

/// How activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActMode {
    /// Kept in floating point (weight-only recipes).
    None,
    /// One calibrated (scale, zero point) per tensor, fixed at export (NPU style).
    Static,
    /// Per token from the row's min/max at run time (CPU style).
    Dynamic,
    /// What llama.cpp's CPU dot products do to the input of a Q4_0/Q8_0 weight:
    /// Q8_0 blocks of 32 along each row, symmetric, `d = amax / 127` stored as
    /// f16, `q = round_half_even(x · (1/d))` (the Arm NEON quantizer; x86's
    /// AVX2 path computes `127 / amax` instead and may differ in the last unit
    /// for a few values). The block dot is `(d_a · d_w) · Σ q_a q_w`.
    #[serde(rename = "llama.cpp-q8_0")]
    LlamaCppQ8_0,
}

impl ActMode {
    /// Quantized from the values themselves at run time (no calibrated grids).
    pub fn is_runtime_computed(self) -> bool {
        matches!(self, Self::Dynamic | Self::LlamaCppQ8_0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActSpec {
    pub mode: ActMode,
    /// 8 or 16 (ignored when `mode` is `none`).
    #[serde(default = "eight")]
    pub bits: u8,
    #[serde(default)]
    pub symmetric: bool,
}

fn eight() -> u8 {
    8
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSpec {
    /// 8 or 16.
    pub bits: u8,
}

/// A different weight spec for tensors whose canonical name matches `pattern`
/// (a regular expression, like llama.cpp's `--tensor-type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorOverride {
    pub pattern: String,
    pub weights: WeightSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSpec {
    pub weights: WeightSpec,
    pub activations: ActSpec,
    /// Activation sites kept at 16 bits in static recipes (MobileQuant: the
    /// residual stream, norm inputs, o/down outputs, softmax).
    #[serde(default)]
    pub act16_sites: Vec<String>,
    #[serde(default)]
    pub kv_cache: Option<KvSpec>,
    /// Checked in order; the first match wins. Embedding and LM head default to
    /// 8-bit per-channel through the recipe's overrides.
    #[serde(default)]
    pub overrides: Vec<TensorOverride>,
}

impl QuantSpec {
    /// The weight spec of the tensor with canonical `name`.
    pub fn weights_for(&self, name: &str) -> WeightSpec {
        self.overrides
            .iter()
            .find(|o| regex::Regex::new(&o.pattern).is_ok_and(|re| re.is_match(name)))
            .map_or(self.weights, |o| o.weights)
    }

    /// Problems with the spec, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        fn check_weights(field: &str, w: &WeightSpec, out: &mut Vec<String>) {
            if !matches!(w.bits, 2 | 3 | 4 | 8) {
                out.push(format!("{field}.bits: expected 2, 3, 4 or 8, found {}", w.bits));
            }
            if let Granularity::PerGroup(g) = w.granularity
                && (g == 0 || !g.is_multiple_of(32))
            {
                out.push(format!(
                    "{field}.granularity: group size must be a positive multiple of 32, found {g}"
                ));
            }
            if let Granularity::Lpbq(b) = w.granularity {
                if !matches!(b, 16 | 32 | 64) {
                    out.push(format!(
                        "{field}.granularity: LPBQ block size must be 16, 32 or 64 input channels, found {b}"
                    ));
                }
                if w.bits != 4 || !w.symmetric || w.scale_rule != ScaleRule::AmaxOverQmax {
                    out.push(format!(
                        "{field}.granularity: LPBQ is a 4-bit symmetric grid with scale rule `amax-over-qmax` (its values expand to int8 by a multiplier in [1, 16]); set bits = 4, symmetric = true"
                    ));
                }
            }
            let llama_cpp_bits = match w.scale_rule {
                ScaleRule::LlamaCppQ8_0 => Some(8),
                ScaleRule::LlamaCppQ4_0 => Some(4),
                _ => None,
            };
            if let Some(bits) = llama_cpp_bits
                && (w.bits != bits || w.granularity != Granularity::PerGroup(32) || !w.symmetric)
            {
                out.push(format!(
                    "{field}.scale_rule: `{}` is a {bits}-bit symmetric grid with groups of 32; \
                     set bits = {bits}, granularity = {{ per-group = 32 }}, symmetric = true",
                    serde_json::to_value(w.scale_rule)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ));
            }
        }
        let mut out = Vec::new();
        check_weights("weights", &self.weights, &mut out);
        for (i, o) in self.overrides.iter().enumerate() {
            check_weights(&format!("overrides[{i}].weights"), &o.weights, &mut out);
            if let Err(e) = regex::Regex::new(&o.pattern) {
                out.push(format!("overrides[{i}].pattern: not a regular expression: {e}"));
            }
        }
        let a = &self.activations;
        if a.mode != ActMode::None && !matches!(a.bits, 8 | 16) {
            out.push(format!("activations.bits: expected 8 or 16, found {}", a.bits));
        }
        if a.mode == ActMode::LlamaCppQ8_0 && a.bits != 8 {
            out.push(format!(
                "activations.bits: `llama.cpp-q8_0` activations are 8-bit, found {}",
                a.bits
            ));
        }
        let known = super::sites::act16_site_names();
        let per_layer = super::sites::act16_per_layer_names();
        for (i, entry) in self.act16_sites.iter().enumerate() {
            let (site, layer) = super::sites::split_layer(entry);
            if !known.contains(&site) {
                out.push(format!(
                    "act16_sites[{i}]: unknown site `{site}`; expected one of {} (optionally `@LAYER` for one decoder layer)",
                    known.join(", ")
                ));
            } else if let Some(layer) = layer {
                if !per_layer.contains(&site) {
                    out.push(format!(
                        "act16_sites[{i}]: `{entry}`: `{site}` is one grid per model, it cannot be widened in one layer; per-layer names are {}",
                        per_layer.join(", ")
                    ));
                } else if layer.is_err() {
                    out.push(format!(
                        "act16_sites[{i}]: `{entry}`: expected a decoder layer number after `@`"
                    ));
                }
            }
        }
        if let Some(kv) = &self.kv_cache
            && !matches!(kv.bits, 8 | 16)
        {
            out.push(format!("kv_cache.bits: expected 8 or 16, found {}", kv.bits));
        }
        out
    }

    /// Problems with this spec on a model of `n_layers` decoder layers
    /// (`act16_sites` entries naming a layer it does not have).
    pub fn layer_problems(&self, n_layers: usize) -> Vec<String> {
        self.act16_sites
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| match super::sites::split_layer(entry) {
                (_, Some(Ok(l))) if l >= n_layers => Some(format!(
                    "act16_sites[{i}]: `{entry}`: the model has decoder layers 0..{n_layers}"
                )),
                _ => None,
            })
            .collect()
    }
}
