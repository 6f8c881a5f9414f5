//! Named datasets: manifests live in the repository's `datasets/` folder and
//! are compiled in; the text is found on disk and hash-checked before use.

use crate::error::{CoreError, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
pub struct DatasetManifest {
    pub name: String,
    pub description: String,
    pub dir: String,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub license: String,
    pub source: String,
    /// `eval` datasets must never be used for calibration or training.
    pub role: String,
}

const MANIFESTS: &[&str] = &[
    include_str!("../../../datasets/wikitext2.toml"),
    include_str!("../../../datasets/tinyshakespeare.toml"),
];

pub fn manifests() -> Vec<DatasetManifest> {
    MANIFESTS
        .iter()
        .map(|t| toml::from_str(t).expect("built-in dataset manifest is valid TOML"))
        .collect()
}

pub fn manifest(name: &str) -> Option<DatasetManifest> {
    manifests().into_iter().find(|m| m.name == name)
}

/// A dataset resolved to a file on disk.
#[derive(Debug, Clone)]
pub struct ResolvedDataset {
    pub name: String,
    pub path: PathBuf,
    /// `None` for ad-hoc files that have no manifest.
    pub manifest: Option<DatasetManifest>,
}

impl ResolvedDataset {
    /// An evaluation set: never calibrated or trained on.
    pub fn is_eval_set(&self) -> bool {
        self.manifest.as_ref().is_some_and(|m| m.role == "eval")
    }

    /// The raw bytes as text. Bytes are kept as they are (WikiText-2 has CRLF line ends
    /// that change the token count if translated).
    pub fn read_text(&self) -> Result<String> {
        let bytes = std::fs::read(&self.path).map_err(|e| CoreError::io(&self.path, e))?;
        String::from_utf8(bytes).map_err(|e| CoreError::Malformed {
            path: self.path.clone(),
            format: "text",
            reason: format!("not UTF-8 (first bad byte at offset {})", e.utf8_error().valid_up_to()),
        })
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| CoreError::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

/// `shared/<sub>` in the current directory, the source tree, or any parent of
/// either (a checkout has the team's `shared/` folder beside it).
pub fn find_shared(sub: &str) -> Option<PathBuf> {
    shared_candidates(sub).into_iter().next()
}

fn shared_candidates(sub: &str) -> Vec<PathBuf> {
    shared_candidates_with(std::env::var_os("OQT_DATA").map(PathBuf::from).as_deref(), sub)
}

/// `$OQT_DATA` names the shared datasets folder; the shared folder around it
/// (its parent, which holds `fixtures/` beside `datasets/`) comes first, so a
/// checkout far from `shared/` finds the fixtures through the same variable.
fn shared_candidates_with(oqt_data: Option<&Path>, sub: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Some(cand) = oqt_data.and_then(Path::parent).map(|shared| shared.join(sub))
        && cand.is_dir()
    {
        found.push(cand);
    }
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    // The source tree this binary was built from: keeps tests and `cargo run`
    // working from any directory.
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for start in starts {
        for dir in start.ancestors() {
            let cand = dir.join("shared").join(sub);
            if cand.is_dir() && !found.contains(&cand) {
                found.push(cand);
            }
        }
    }
    found
}

/// Where named datasets are searched, in order (explicit paths aside).
pub fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(d) = std::env::var_os("OQT_DATA") {
        roots.push(PathBuf::from(d));
    }
    for cand in shared_candidates("datasets") {
        if !roots.contains(&cand) {
            roots.push(cand);
        }
    }
    roots
}

/// Resolve `spec` — a dataset name or a path to a text file.
pub fn resolve(spec: &str) -> Result<ResolvedDataset> {
    if let Some(m) = manifest(spec) {
        let roots = search_roots();
        for root in &roots {
            let path = root.join(&m.dir).join(&m.file);
            if path.is_file() {
                let found = sha256_file(&path)?;
                if found != m.sha256 {
                    return Err(CoreError::HashMismatch {
                        path,
                        expected: m.sha256.clone(),
                        found,
                    });
                }
                return Ok(ResolvedDataset {
                    name: m.name.clone(),
                    path,
                    manifest: Some(m),
                });
            }
        }
        let looked: Vec<String> = roots
            .iter()
            .map(|r| r.join(&m.dir).join(&m.file).display().to_string())
            .collect();
        return Err(CoreError::Other(format!(
            "dataset `{}` ({}) not found; looked in: {}. Put `{}/{}` under $OQT_DATA or pass a file path",
            m.name,
            m.description,
            if looked.is_empty() {
                "(no search roots)".into()
            } else {
                looked.join(", ")
            },
            m.dir,
            m.file
        )));
    }
    let path = PathBuf::from(spec);
    if path.is_file() {
        return Ok(ResolvedDataset {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
            manifest: None,
        });
    }
    let names: Vec<String> = manifests().into_iter().map(|m| m.name).collect();
    Err(CoreError::Other(format!(
        "dataset `{spec}` is neither a known name ({}) nor an existing file",
        names.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_have_hashes() {
        let ms = manifests();
        assert_eq!(ms.len(), 2);
        for m in ms {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
        }
    }

    #[test]
    fn fixtures_are_found_beside_the_oqt_data_folder_first() {
        let far = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(far.path().join("datasets")).unwrap();
        std::fs::create_dir_all(far.path().join("fixtures/m")).unwrap();
        let found = shared_candidates_with(Some(&far.path().join("datasets")), "fixtures/m");
        assert_eq!(found.first(), Some(&far.path().join("fixtures/m")));
        // Without the folder there, the search falls back to `shared/` near the checkout.
        let found = shared_candidates_with(Some(&far.path().join("datasets")), "fixtures/none");
        assert!(found.iter().all(|p| !p.starts_with(far.path())), "{found:?}");
    }

    #[test]
    fn named_datasets_resolve_from_shared_and_verify() {
        let d = resolve("wikitext2").expect("wikitext2 available from ../shared/datasets");
        assert_eq!(d.manifest.as_ref().unwrap().role, "eval");
        assert_eq!(d.read_text().unwrap().len(), 1_290_547);
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let msg = resolve("no-such-set").unwrap_err().to_string();
        assert!(msg.contains("wikitext2") && msg.contains("tinyshakespeare"), "{msg}");
    }

    #[test]
    fn explicit_path_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("my.txt");
        std::fs::write(&p, "hello").unwrap();
        let d = resolve(p.to_str().unwrap()).unwrap();
        assert_eq!(d.name, "my");
        assert!(d.manifest.is_none());
    }
}
