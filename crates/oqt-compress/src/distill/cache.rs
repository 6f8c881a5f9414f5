//! The teacher's targets cached on disk: computing them is a teacher
//! forward over every training batch, the same for every run that
//! distills the same teacher on the same batches (benchmarks comparing
//! students, reruns, resumed runs). One safetensors file per
//! (teacher, training tokens, batch options), named by the hash of that key
//! and carrying the key in its metadata; written atomically. A file that does
//! not read back as the expected key's targets is reported and recomputed.

use crate::distill::WindowTargets;
use crate::qat::TeacherTargets;
use oqt_core::{CoreError, Result};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

const KEY_METADATA: &str = "oqt.teacher-targets";

/// What the targets depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetsKey {
    /// The teacher file's sha256.
    pub teacher_sha256: String,
    /// sha256 of the training tokens (u32 little-endian).
    pub tokens_sha256: String,
    pub seed: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub top_k: usize,
    pub vocab_size: usize,
}

impl TargetsKey {
    /// The key of `tokens` (the training stream the batches are drawn from).
    pub fn tokens_sha256(tokens: &[u32]) -> String {
        let mut h = Sha256::new();
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        format!("{:x}", h.finalize())
    }

    /// The cache file for this key in `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        let json = serde_json::to_string(self).expect("a key serializes");
        let hash = format!("{:x}", Sha256::digest(json.as_bytes()));
        dir.join(format!("{}.safetensors", &hash[..24]))
    }
}

/// The cache folder inside oqt's cache root (`oqt_hub::oqt_cache_dir`).
pub fn dir_in(cache_root: &Path) -> PathBuf {
    cache_root.join("teacher-targets")
}

fn malformed(path: &Path, reason: String) -> CoreError {
    CoreError::Malformed {
        path: path.into(),
        format: "oqt teacher-targets cache",
        reason,
    }
}

/// The cached targets of `steps` under `key` at `path`: `Ok(None)` when the
/// file is absent or lacks one of the steps; an error naming the file when it
/// is not what it claims (another key, wrong shapes, ids outside the vocabulary).
pub fn load(path: &Path, key: &TargetsKey, steps: Range<u64>) -> Result<Option<TeacherTargets>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CoreError::io(path, e)),
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| malformed(path, format!("not a readable safetensors file: {e}")))?;
    let stored: TargetsKey = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(KEY_METADATA))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| malformed(path, format!("no readable `{KEY_METADATA}` metadata")))?;
    if &stored != key {
        return Err(malformed(
            path,
            "made for another teacher, text or batch options than its name says".into(),
        ));
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| malformed(path, format!("{e}")))?;
    let positions = key.seq_len.saturating_sub(1);
    let k = key.top_k.min(key.vocab_size);
    let mut out = BTreeMap::new();
    for step in steps {
        let (Ok(tokens), Ok(log_probs)) = (
            st.tensor(&format!("step.{step}.tokens")),
            st.tensor(&format!("step.{step}.log_probs")),
        ) else {
            return Ok(None);
        };
        let want = vec![key.batch, positions, k];
        if tokens.dtype() != Dtype::I64
            || log_probs.dtype() != Dtype::F32
            || tokens.shape() != want.as_slice()
            || log_probs.shape() != want.as_slice()
        {
            return Err(malformed(
                path,
                format!("step {step}: expected I64 tokens and F32 log-probabilities of shape {want:?}"),
            ));
        }
        let ids: Vec<i64> = tokens
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= key.vocab_size) {
            return Err(malformed(
                path,
                format!(
                    "step {step}: token id {bad} outside the vocabulary ({})",
                    key.vocab_size
                ),
            ));
        }
        let lp: Vec<f32> = log_probs
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if lp.iter().any(|v| !v.is_finite() || *v > 0.0) {
            return Err(malformed(
                path,
                format!("step {step}: log-probabilities must be finite and ≤ 0"),
            ));
        }
        let per = positions * k;
        let windows = (0..key.batch)
            .map(|w| WindowTargets {
                positions,
                k,
                tokens: ids[w * per..(w + 1) * per].to_vec(),
                log_probs: lp[w * per..(w + 1) * per].to_vec(),
            })
            .collect();
        out.insert(step, windows);
    }
    Ok(Some(out))
}

/// Write `targets` under `key` at `path` (atomically: a temporary file renamed).
pub fn store(path: &Path, key: &TargetsKey, targets: &TeacherTargets) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (step, windows) in targets {
        let (p, k) = windows.first().map_or((0, 0), |w| (w.positions, w.k));
        let shape = vec![windows.len(), p, k];
        let tokens = windows
            .iter()
            .flat_map(|w| w.tokens.iter().flat_map(|t| t.to_le_bytes()))
            .collect();
        let lp = windows
            .iter()
            .flat_map(|w| w.log_probs.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        owned.push((format!("step.{step}.tokens"), Dtype::I64, shape.clone(), tokens));
        owned.push((format!("step.{step}.log_probs"), Dtype::F32, shape, lp));
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| CoreError::Other(format!("teacher targets `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([(
        KEY_METADATA.to_string(),
        serde_json::to_string(key).expect("a key serializes"),
    )]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| CoreError::Other(format!("{e}")))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| CoreError::io(dir, e))?;
    std::fs::write(tmp.path(), bytes).map_err(|e| CoreError::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| CoreError::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TargetsKey {
        TargetsKey {
            teacher_sha256: "ab".into(),
            tokens_sha256: TargetsKey::tokens_sha256(&[1, 2, 3]),
            seed: 7,
            batch: 2,
            seq_len: 3,
            top_k: 2,
            vocab_size: 10,
        }
    }

    fn targets() -> TeacherTargets {
        (3..5u64)
            .map(|step| {
                let windows = (0..2)
                    .map(|w| WindowTargets {
                        positions: 2,
                        k: 2,
                        tokens: vec![step as i64, w, 9, 0],
                        log_probs: vec![-0.1, -2.5, -0.3, -1.5],
                    })
                    .collect();
                (step, windows)
            })
            .collect()
    }

    #[test]
    fn targets_round_trip_and_hostile_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = key().path_in(dir.path());
        assert_eq!(load(&path, &key(), 3..5).unwrap(), None, "absent: a miss");
        store(&path, &key(), &targets()).unwrap();
        assert_eq!(load(&path, &key(), 3..5).unwrap(), Some(targets()));
        assert_eq!(load(&path, &key(), 4..5).unwrap().unwrap().len(), 1);
        assert_eq!(load(&path, &key(), 3..6).unwrap(), None, "a missing step: a miss");
        // Another key's file under this name, a truncated file, bad ids.
        let other = TargetsKey { seed: 8, ..key() };
        let e = load(&path, &other, 3..5).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("another teacher"),
            "{e}"
        );
        let small = TargetsKey { vocab_size: 5, ..key() };
        let small_path = small.path_in(dir.path());
        store(&small_path, &small, &targets()).unwrap();
        let e = load(&small_path, &small, 3..5).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&path, &key(), 3..5).unwrap_err().to_string();
        assert!(e.contains("teacher-targets cache"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&path, &key(), 3..5).is_err());
    }
}
