//! Hugging Face hub models through `hf-hub`, with the cache and offline mode
//! resolved here so that a machine without hub access still works from a
//! cache laid out like the hub's (`$HF_HOME/hub/models--ORG--NAME/...`).

use crate::{HubError, Result};
use std::path::PathBuf;

/// Files an HF model directory needs (the weights are added from the index when sharded).
pub const HF_MODEL_FILES: &[&str] = &["config.json", "tokenizer.json"];
/// Fetched when present, not required.
const OPTIONAL_FILES: &[&str] = &["tokenizer_config.json", "generation_config.json"];

/// `HF_HUB_OFFLINE` set to 1/true/yes: never touch the network.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

fn cache() -> hf_hub_cache::Cache {
    hf_hub_cache::Cache::from_env()
}

/// Resolve a hub repository to its local snapshot directory, downloading
/// missing files unless offline. A snapshot already in the cache is used as it
/// is: optional files are not fetched for it, so a machine without hub access
/// never waits on the network for a cached model.
pub fn resolve_hub_model(repo_id: &str, revision: &str) -> Result<PathBuf> {
    let mut getter = Getter::new(repo_id, revision)?;
    let cached_snapshot = getter.cached("config.json").is_some();
    let config = getter.get("config.json", true)?.expect("required");
    for f in &HF_MODEL_FILES[1..] {
        getter.get(f, true)?;
    }
    for f in OPTIONAL_FILES {
        if !cached_snapshot {
            getter.get(f, false)?;
        }
    }
    // Weights: one file, or the shards listed in the index.
    let single = match getter.cached("model.safetensors") {
        Some(p) => Some(p),
        None if getter.cached("model.safetensors.index.json").is_some() => None,
        None => getter.get("model.safetensors", false)?,
    };
    if single.is_none() {
        let index = getter
            .get("model.safetensors.index.json", false)?
            .ok_or_else(|| getter.not_cached("model.safetensors (or model.safetensors.index.json)"))?;
        let text = std::fs::read_to_string(&index).map_err(|e| HubError::Io {
            path: index.clone(),
            source: e,
        })?;
        let mut shards: Vec<String> = text
            .split('"')
            .filter(|s| s.ends_with(".safetensors"))
            .map(str::to_string)
            .collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            getter.get(&s, true)?;
        }
    }
    Ok(config.parent().expect("snapshot dir").to_path_buf())
}

/// hf-hub's cache types, re-exported under one name whether or not the
/// download feature is built.
mod hf_hub_cache {
    #[cfg(feature = "hub")]
    pub use hf_hub::{Cache, Repo};

    #[cfg(not(feature = "hub"))]
    pub use fallback::{Cache, Repo};

    /// Minimal reader of the hub cache layout for builds without `hf-hub`.
    #[cfg(not(feature = "hub"))]
    mod fallback {
        use std::path::PathBuf;
        pub struct Cache(PathBuf);
        pub struct Repo(String, String);
        impl Repo {
            pub fn with_revision(id: String, _t: (), rev: String) -> Self {
                Self(id, rev)
            }
        }
        pub struct CacheRepo(PathBuf, String);
        impl Cache {
            pub fn from_env() -> Self {
                let home = std::env::var_os("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/huggingface")
                });
                Self(home.join("hub"))
            }
            pub fn path(&self) -> &PathBuf {
                &self.0
            }
            pub fn repo(&self, r: Repo) -> CacheRepo {
                CacheRepo(self.0.join(format!("models--{}", r.0.replace('/', "--"))), r.1)
            }
        }
        impl CacheRepo {
            pub fn get(&self, file: &str) -> Option<PathBuf> {
                let commit = std::fs::read_to_string(self.0.join("refs").join(&self.1)).ok()?;
                let p = self.0.join("snapshots").join(commit.trim()).join(file);
                p.exists().then_some(p)
            }
        }
    }
}

struct Getter {
    repo_id: String,
    revision: String,
    cache: hf_hub_cache::Cache,
    #[cfg(feature = "hub")]
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl Getter {
    fn new(repo_id: &str, revision: &str) -> Result<Self> {
        let cache = cache();
        #[cfg(feature = "hub")]
        let api = if hub_offline() {
            None
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                .with_progress(true)
                .build()
                .map_err(|e| HubError::Fetch {
                    what: repo_id.into(),
                    detail: e.to_string(),
                })?;
            Some(api.repo(hf_hub::Repo::with_revision(
                repo_id.into(),
                hf_hub::RepoType::Model,
                revision.into(),
            )))
        };
        Ok(Self {
            repo_id: repo_id.into(),
            revision: revision.into(),
            cache,
            #[cfg(feature = "hub")]
            api,
        })
    }

    fn repo(&self) -> hf_hub_cache::Repo {
        #[cfg(feature = "hub")]
        {
            hf_hub::Repo::with_revision(self.repo_id.clone(), hf_hub::RepoType::Model, self.revision.clone())
        }
        #[cfg(not(feature = "hub"))]
        {
            hf_hub_cache::Repo::with_revision(self.repo_id.clone(), (), self.revision.clone())
        }
    }

    fn not_cached_because(&self, file: &str, why: String) -> HubError {
        HubError::NotCached {
            repo: self.repo_id.clone(),
            file: file.into(),
            cache: self.cache.path().clone(),
            why,
        }
    }

    fn not_cached(&self, file: &str) -> HubError {
        let why = if hub_offline() {
            "HF_HUB_OFFLINE is set".to_string()
        } else {
            "the hub does not have it either".to_string()
        };
        self.not_cached_because(file, why)
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache.repo(self.repo()).get(file)
    }

    /// The local path of `file`: from the cache, else downloaded. `Ok(None)` when
    /// an optional file is not available.
    fn get(&mut self, file: &str, required: bool) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        #[cfg(feature = "hub")]
        if let Some(api) = &self.api {
            return match api.download(file) {
                Ok(p) => Ok(Some(p)),
                // A 404 on an optional file is normal; anything else is reported
                // once, then the rest is resolved from the cache alone.
                Err(hf_hub::api::sync::ApiError::RequestError(e))
                    if matches!(*e, ureq_status::Error::Status(404, _)) && !required =>
                {
                    Ok(None)
                }
                Err(e) => {
                    let why = format!("downloading it failed ({e})");
                    tracing::warn!(repo = %self.repo_id, %file, "hub unreachable: {e}");
                    self.api = None;
                    if required {
                        Err(self.not_cached_because(file, why))
                    } else {
                        Ok(None)
                    }
                }
            };
        }
        if required { Err(self.not_cached(file)) } else { Ok(None) }
    }
}

#[cfg(feature = "hub")]
use ureq as ureq_status;
