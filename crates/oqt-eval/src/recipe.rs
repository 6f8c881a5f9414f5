//! Evaluation recipes (`recipes/eval-*.toml`): which model, which
//! quantization recipes × methods, which evaluation set, and the value each
//! result is expected to reach with its tolerance. Running one (`oqt eval
//! --recipe`) measures every check and fails when any regresses; this module
//! is the file format and the verdict, independent of how results are measured.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRecipe {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Model alias, file or directory (as `oqt quantize` takes it).
    pub model: String,
    pub eval: EvalSet,
    /// Calibration budget for every quantized check (instead of each recipe's).
    #[serde(default)]
    pub calibration: Option<CalibrationBudget>,
    #[serde(rename = "check")]
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSet {
    pub dataset: String,
    pub ctx: usize,
    pub chunks: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationBudget {
    pub samples: usize,
    pub seq_len: usize,
}

/// One measured result and what it must stay within.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Quantization recipe (e.g. `w4a8`); absent for the float model.
    #[serde(default)]
    pub recipe: Option<String>,
    /// `float`, or a method of `oqt quantize` (`rtn`, `smoothquant`, `gptq`, `awq`, `mobilequant`).
    pub method: String,
    /// Optimizer steps for methods that train (MobileQuant), instead of the recipe's.
    #[serde(default)]
    pub steps: Option<usize>,
    /// Only `perplexity` (lower is better) so far.
    #[serde(default = "perplexity")]
    pub metric: String,
    pub expected: f64,
    /// Allowed relative worsening: the check fails above `expected · (1 + tolerance)`.
    pub tolerance: f64,
}

fn perplexity() -> String {
    "perplexity".into()
}

impl Check {
    /// `recipe/method`, or `float`.
    pub fn label(&self) -> String {
        match &self.recipe {
            Some(r) => format!("{r}/{}", self.method),
            None => self.method.clone(),
        }
    }

    pub fn is_float(&self) -> bool {
        self.method == "float"
    }

    /// The largest value that still passes.
    pub fn limit(&self) -> f64 {
        self.expected * (1.0 + self.tolerance)
    }

    /// Judge a measured value.
    pub fn verdict(&self, measured: f64) -> Verdict {
        if !measured.is_finite() || measured > self.limit() {
            Verdict::Regressed
        } else if measured < self.expected * (1.0 - self.tolerance) {
            Verdict::Improved
        } else {
            Verdict::Pass
        }
    }
}

/// How a measured value compares with its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    /// Better than expected beyond the tolerance: passes; update `expected`.
    Improved,
    /// Worse than `expected · (1 + tolerance)`, or not a number: fails.
    Regressed,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("reading eval recipe {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("eval recipe {path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl EvalRecipe {
    pub fn parse(text: &str, origin: &Path) -> Result<Self, RecipeError> {
        let invalid = |reason: String| RecipeError::Invalid {
            path: origin.display().to_string(),
            reason,
        };
        let r: EvalRecipe = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut problems = Vec::new();
        if r.checks.is_empty() {
            problems.push("expected at least one [[check]]".to_string());
        }
        if r.eval.ctx < 2 || r.eval.chunks == 0 {
            problems.push(format!(
                "eval: expected ctx ≥ 2 and chunks ≥ 1, found ctx {} and chunks {}",
                r.eval.ctx, r.eval.chunks
            ));
        }
        for (i, c) in r.checks.iter().enumerate() {
            let at = format!("check[{i}] ({})", c.label());
            if c.metric != "perplexity" {
                problems.push(format!("{at}.metric: expected `perplexity`, found `{}`", c.metric));
            }
            if !(c.expected.is_finite() && c.expected > 0.0) {
                problems.push(format!(
                    "{at}.expected: expected a positive number, found {}",
                    c.expected
                ));
            }
            if !(0.0..1.0).contains(&c.tolerance) {
                problems.push(format!(
                    "{at}.tolerance: expected a fraction in [0, 1), found {}",
                    c.tolerance
                ));
            }
            if c.is_float() != c.recipe.is_none() {
                problems.push(format!(
                    "{at}: `float` checks take no recipe; every other method needs one"
                ));
            }
        }
        if problems.is_empty() {
            Ok(r)
        } else {
            Err(invalid(problems.join("; ")))
        }
    }

    pub fn load(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CI: &str = include_str!("../../../recipes/eval-ci.toml");

    #[test]
    fn the_ci_recipe_parses() {
        let r = EvalRecipe::parse(CI, Path::new("recipes/eval-ci.toml")).unwrap();
        assert!(r.checks.iter().any(|c| c.method == "mobilequant"));
        assert!(r.checks.iter().any(|c| c.is_float()));
    }

    #[test]
    fn a_worse_result_than_the_tolerance_allows_is_a_regression() {
        let c = Check {
            recipe: Some("w4a8".into()),
            method: "mobilequant".into(),
            steps: None,
            metric: "perplexity".into(),
            expected: 40.0,
            tolerance: 0.05,
        };
        assert_eq!(c.verdict(40.0), Verdict::Pass);
        assert_eq!(c.verdict(41.9), Verdict::Pass);
        assert_eq!(c.verdict(42.1), Verdict::Regressed);
        assert_eq!(c.verdict(f64::NAN), Verdict::Regressed);
        assert_eq!(c.verdict(30.0), Verdict::Improved);
    }

    #[test]
    fn bad_fields_are_named() {
        let text = r#"
name = "x"
model = "m"
[eval]
dataset = "wikitext2"
ctx = 256
chunks = 2
[[check]]
method = "rtn"
expected = -1.0
tolerance = 2.0
"#;
        let e = EvalRecipe::parse(text, Path::new("bad.toml")).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        assert!(e.contains("check[0] (rtn).expected"), "{e}");
        assert!(e.contains("check[0] (rtn).tolerance"), "{e}");
        assert!(e.contains("needs one"), "{e}");
        let unknown = text.replace("tolerance = 2.0", "tolerance = 0.1\ncolour = 1");
        let e = EvalRecipe::parse(&unknown, Path::new("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
