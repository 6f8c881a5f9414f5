//! What a recipe's `[mixed_precision]` asks for: a size budget, the wider
//! weight grid a sensitive layer may move to, and how many linear inputs may
//! move to 16 bits. The planner that meets it lives in
//! `oqt_compress::ptq::mixed_precision`.

use super::spec::{Granularity, WeightSpec};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A bundle size limit: `87.5MiB`, `91750400B` or `5.45bpw` (bits per weight
/// over every parameter of the model, embedding included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeBudget {
    Bytes(u64),
    BitsPerWeight(f64),
}

impl SizeBudget {
    /// The limit in bytes for a model of `n_params` parameters.
    pub fn bytes(self, n_params: usize) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::BitsPerWeight(bpw) => (bpw * n_params as f64 / 8.0).floor() as u64,
        }
    }
}

impl FromStr for SizeBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let number = |n: &str| -> Result<f64, String> {
            n.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("size budget `{s}`: expected a positive number before the unit"))
        };
        for (suffix, scale) in [("gib", 1u64 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("b", 1)] {
            if let Some(n) = lower.strip_suffix(suffix) {
                return Ok(Self::Bytes((number(n)? * scale as f64).floor() as u64));
            }
        }
        if let Some(n) = lower.strip_suffix("bpw") {
            let bpw = number(n)?;
            if bpw > 32.0 {
                return Err(format!("size budget `{s}`: {bpw} bits per weight is more than f32"));
            }
            return Ok(Self::BitsPerWeight(bpw));
        }
        Err(format!(
            "size budget `{s}`: expected a size with its unit, e.g. `87.5MiB`, `91750400B` or `5.45bpw`"
        ))
    }
}

impl fmt::Display for SizeBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Whole thousandths of a MiB read back exactly (87.5MiB, not 91750400B).
            Self::Bytes(b) if (*b as u128 * 1000).is_multiple_of(1 << 20) => write!(f, "{}MiB", *b as f64 / 1048576.0),
            Self::Bytes(b) => write!(f, "{b}B"),
            Self::BitsPerWeight(bpw) => write!(f, "{bpw}bpw"),
        }
    }
}

impl Serialize for SizeBudget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SizeBudget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn wide_default() -> WeightSpec {
    WeightSpec::new(8, Granularity::PerChannel, true)
}
fn samples_default() -> usize {
    2
}
fn seq_len_default() -> usize {
    256
}

/// `[mixed_precision]`: automatic per-layer precision under a size budget.
/// Each decoder layer's linears come in four units (q/k/v, o, gate/up, down);
/// a unit's weights stay on the recipe's grid or move to `wide_weights`, and
/// (static recipes) its input stays 8-bit or moves to 16 bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixedPrecisionSpec {
    /// The bundle may not be larger (tensor data and manifest).
    pub size_budget: SizeBudget,
    /// The grid a sensitive unit's weights move to.
    #[serde(default = "wide_default")]
    pub wide_weights: WeightSpec,
    /// How many linear inputs may move from 8 to 16 bits (A16 layers; 0 = none).
    #[serde(default)]
    pub max_act16_inputs: usize,
    /// Calibration windows (of the recipe's calibration set) the sensitivities are measured on.
    #[serde(default = "samples_default")]
    pub samples: usize,
    #[serde(default = "seq_len_default")]
    pub seq_len: usize,
}

impl MixedPrecisionSpec {
    /// The defaults around `size_budget` (what `--size-budget` on a recipe without
    /// `[mixed_precision]` means).
    pub fn with_budget(size_budget: SizeBudget) -> Self {
        Self {
            size_budget,
            wide_weights: wide_default(),
            max_act16_inputs: 0,
            samples: samples_default(),
            seq_len: seq_len_default(),
        }
    }

    /// Problems with the spec, each naming its field under `mixed_precision`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let w = &self.wide_weights;
        if w.bits != 8 || !w.symmetric || !matches!(w.granularity, Granularity::PerChannel) {
            out.push(format!(
                "mixed_precision.wide_weights: the wide grid is 8-bit symmetric per-channel (the integer kernels' A8W8/A16W8 layout), found {}-bit {:?}{}",
                w.bits,
                w.granularity,
                if w.symmetric { "" } else { " asymmetric" }
            ));
        }
        if self.samples == 0 || self.seq_len < 2 {
            out.push("mixed_precision: samples must be ≥ 1 and seq_len ≥ 2".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_their_units_and_refuse_the_rest() {
        assert_eq!("87.5MiB".parse(), Ok(SizeBudget::Bytes(91_750_400)));
        assert_eq!("87.5 mib".parse(), Ok(SizeBudget::Bytes(91_750_400)));
        assert_eq!("1000B".parse(), Ok(SizeBudget::Bytes(1000)));
        assert_eq!("5.45bpw".parse(), Ok(SizeBudget::BitsPerWeight(5.45)));
        assert_eq!(SizeBudget::BitsPerWeight(8.0).bytes(1000), 1000);
        for bad in ["87.5", "MiB", "-3MiB", "0bpw", "40bpw", "nanMiB", "3 parsecs"] {
            let e = bad.parse::<SizeBudget>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(SizeBudget::Bytes(91_750_400).to_string(), "87.5MiB");
        assert_eq!(SizeBudget::Bytes(u64::MAX).to_string(), format!("{}B", u64::MAX));
        let round: SizeBudget = SizeBudget::Bytes(91_750_400).to_string().parse().unwrap();
        assert_eq!(round, SizeBudget::Bytes(91_750_400));
    }
}
