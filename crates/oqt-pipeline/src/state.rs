//! The run directory's `state.json`: which recipe on which model, and the
//! steps finished so far with their bundles' hashes.

use oqt_core::{CoreError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

const STATE_FILE: &str = "state.json";

/// One finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishedStep {
    pub kind: String,
    /// The step's bundle, relative to the run directory.
    pub bundle: String,
    pub sha256: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The recipe as run (a resume must run the same one).
    pub recipe: serde_json::Value,
    pub model: String,
    pub finished: Vec<FinishedStep>,
}

impl RunState {
    pub fn new(recipe: serde_json::Value, model: &str) -> Self {
        Self {
            recipe,
            model: model.to_string(),
            finished: Vec::new(),
        }
    }

    /// The state in `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| CoreError::Malformed {
            path,
            format: "pipeline run state",
            reason: e.to_string(),
        })
    }

    /// Write atomically: a kill leaves the old state or the new one.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let json = serde_json::to_string_pretty(self).map_err(|e| CoreError::Other(format!("run state: {e}")))?;
        std::fs::write(&tmp, json).map_err(|e| CoreError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| CoreError::io(&path, e))
    }

    /// Refuse to resume another recipe or model.
    pub fn check_same_run(&self, dir: &Path, recipe: &serde_json::Value, model: &str) -> Result<()> {
        let path = dir.join(STATE_FILE);
        if &self.recipe != recipe {
            return Err(CoreError::BadField {
                path,
                field: "recipe".into(),
                expected: "the recipe being resumed (its file changed since the run began)".into(),
                found: format!(
                    "the run of recipe `{}`",
                    self.recipe.get("name").and_then(|n| n.as_str()).unwrap_or("?")
                ),
            });
        }
        if self.model != model {
            return Err(CoreError::BadField {
                path,
                field: "model".into(),
                expected: format!("`{model}`"),
                found: format!("`{}`", self.model),
            });
        }
        Ok(())
    }

    /// Every finished step's bundle is still there, unchanged.
    pub fn check_bundles(&self, dir: &Path) -> Result<()> {
        for f in &self.finished {
            let path = dir.join(&f.bundle);
            let sha = oqt_core::datasets::sha256_file(&path)?;
            if sha != f.sha256 {
                return Err(CoreError::HashMismatch {
                    path,
                    expected: f.sha256.clone(),
                    found: sha,
                });
            }
        }
        Ok(())
    }
}
