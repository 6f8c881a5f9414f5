//! DKM/eDKM checkpoints: after every layer, that layer's palettes and what
//! the run was started with, in a directory: `layer-NNN.safetensors` per
//! finished layer (per linear `NAME.indices` U8 `[rows, cols]`, one index a
//! byte, and `NAME.lut` F16 `[tables, 2^bits]`), then `state.json` listing
//! the finished layers. Each file is written beside its place and renamed
//! into it, the state last, so a stop at any moment leaves the last finished
//! layer readable, and a save costs one layer, not every layer so far.
//! A resumed run checks that its options, model and calibration are the
//! checkpoint's, then trains the remaining layers only; layer-by-layer
//! training makes the result the same as a run that never stopped.

use super::edkm::{EdkmLayer, EdkmOptions, NamedPalettes};
use half::f16;
use oqt_core::lut::Palettized;
use oqt_core::{CoreError, Result};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::path::Path;

const STATE_FILE: &str = "state.json";

fn layer_file(layer: usize) -> String {
    format!("layer-{layer:03}.safetensors")
}

/// Make `dir` ready for a fresh run: an old checkpoint there is removed; a
/// directory that is not a checkpoint is refused (nothing of the user's is deleted).
pub fn start_fresh(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e));
    }
    let entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| CoreError::io(dir, e))?
        .filter_map(|e| e.ok())
        .collect();
    let ours = |n: &str| n == STATE_FILE || (n.starts_with("layer-") && n.ends_with(".safetensors"));
    if let Some(other) = entries.iter().find(|e| !ours(&e.file_name().to_string_lossy())) {
        return Err(CoreError::Other(format!(
            "{}: not a cluster checkpoint (it holds {}); choose another --checkpoint-dir",
            dir.display(),
            other.file_name().to_string_lossy()
        )));
    }
    for e in entries {
        std::fs::remove_file(e.path()).map_err(|err| CoreError::io(e.path(), err))?;
    }
    Ok(())
}

/// Write `bytes` to `path` through a temporary file beside it and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| CoreError::io(dir, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| CoreError::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| CoreError::io(path, e))?;
    tmp.persist(path).map_err(|e| CoreError::io(path, e.error))?;
    Ok(())
}

/// What a run was started with and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterCheckpoint {
    /// `dkm` or `edkm`.
    pub method: String,
    pub options: EdkmOptions,
    pub importance: bool,
    /// The model file's sha256 (or its name when it is not one file).
    pub model: String,
    /// sha256 of the calibration windows' token ids.
    pub calibration: String,
    /// Every finished layer's errors, in order.
    pub layers: Vec<EdkmLayer>,
}

/// sha256 of token windows (each window's length, then its ids, little-endian).
pub fn windows_fingerprint(windows: &[Vec<u32>]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for w in windows {
        h.update((w.len() as u64).to_le_bytes());
        for t in w {
            h.update(t.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// Add `state`'s last layer to the checkpoint at `dir` (made ready by
/// [`start_fresh`] or read by [`load`]): its palettes (`layer_palettes`, the
/// layer's linears), then the state.
pub fn save_layer(dir: &Path, state: &ClusterCheckpoint, layer_palettes: &[(String, Palettized)]) -> Result<()> {
    let layer = state.layers.len().checked_sub(1).expect("a finished layer");
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * layer_palettes.len());
    for (name, p) in layer_palettes {
        owned.push((
            format!("{name}.indices"),
            Dtype::U8,
            vec![p.rows, p.cols],
            p.indices.clone(),
        ));
        let bytes = p.tables.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((
            format!("{name}.lut"),
            Dtype::F16,
            vec![p.table_count(), p.entries()],
            bytes,
        ));
    }
    let views = owned
        .iter()
        .map(|(n, dt, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
                .map_err(|e| CoreError::Other(format!("{n}: {e}")))?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join(layer_file(layer));
    let bytes =
        safetensors::serialize(views, None).map_err(|e| CoreError::Other(format!("{}: {e}", path.display())))?;
    write_atomically(&path, &bytes)?;
    write_atomically(
        &dir.join(STATE_FILE),
        serde_json::to_string_pretty(state).expect("serializable").as_bytes(),
    )
}

/// Read the checkpoint at `dir` and check it against the run that resumes it
/// (`expected`, whose `layers` are ignored) and the model's linear shapes
/// (`shape_of(name)` → `(rows, group_rows)`): its palettes, in model order.
pub fn load(
    dir: &Path,
    expected: &ClusterCheckpoint,
    shape_of: impl Fn(&str) -> Option<(usize, usize, usize)>,
    names: &[String],
) -> Result<(ClusterCheckpoint, NamedPalettes)> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| CoreError::io(&state_path, e))?;
    let state: ClusterCheckpoint = serde_json::from_str(&text).map_err(|e| CoreError::Malformed {
        path: state_path.clone(),
        format: "cluster checkpoint state",
        reason: e.to_string(),
    })?;
    let differs = |field: &str, found: String, want: String| CoreError::BadField {
        path: state_path.clone(),
        field: field.into(),
        expected: format!("{want} (this run's; resume with the options the run started with)"),
        found,
    };
    if state.method != expected.method {
        return Err(differs("method", state.method.clone(), expected.method.clone()));
    }
    if state.options != expected.options {
        return Err(differs(
            "options",
            format!("{:?}", state.options),
            format!("{:?}", expected.options),
        ));
    }
    if state.importance != expected.importance {
        return Err(differs(
            "importance",
            state.importance.to_string(),
            expected.importance.to_string(),
        ));
    }
    if state.model != expected.model {
        return Err(differs("model", state.model.clone(), expected.model.clone()));
    }
    if state.calibration != expected.calibration {
        return Err(differs(
            "calibration",
            state.calibration.clone(),
            expected.calibration.clone(),
        ));
    }
    let per_layer = oqt_model::hooks::Proj::PER_LAYER.len();
    let count = state.layers.len() * per_layer;
    if count > names.len() {
        return Err(differs(
            "layers",
            state.layers.len().to_string(),
            format!("at most {}", names.len() / per_layer),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for (layer, layer_names) in names[..count].chunks(per_layer).enumerate() {
        let path = dir.join(layer_file(layer));
        let bytes = std::fs::read(&path).map_err(|e| CoreError::io(&path, e))?;
        out.extend(read_layer(&path, &bytes, layer_names, &state, &shape_of)?);
    }
    Ok((state, out))
}

/// One layer file's palettes, checked against the model's shapes.
fn read_layer(
    path: &Path,
    bytes: &[u8],
    names: &[String],
    state: &ClusterCheckpoint,
    shape_of: &impl Fn(&str) -> Option<(usize, usize, usize)>,
) -> Result<NamedPalettes> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| CoreError::Malformed {
        path: path.into(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    let bad = |field: String, expected: String, found: String| CoreError::BadField {
        path: path.into(),
        field,
        expected,
        found,
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let get = |suffix: &str, dtype: Dtype| {
            let key = format!("{name}.{suffix}");
            let t = st.tensor(&key).map_err(|_| CoreError::Missing {
                path: path.into(),
                what: "checkpoint tensor",
                name: key.clone(),
            })?;
            if t.dtype() != dtype {
                return Err(bad(key, format!("{dtype:?}"), format!("{:?}", t.dtype())));
            }
            Ok((t.shape().to_vec(), t.data().to_vec()))
        };
        let (ishape, indices) = get("indices", Dtype::U8)?;
        let (tshape, tables) = get("lut", Dtype::F16)?;
        let (rows, cols, group_rows) =
            shape_of(name).ok_or_else(|| CoreError::Other(format!("{name}: missing from the model")))?;
        if ishape != [rows, cols] {
            return Err(bad(
                format!("{name}.indices"),
                format!("shape [{rows}, {cols}]"),
                format!("{ishape:?}"),
            ));
        }
        let entries = 1usize << state.options.bits;
        if tshape != [rows / group_rows, entries] {
            return Err(bad(
                format!("{name}.lut"),
                format!("shape [{}, {entries}]", rows / group_rows),
                format!("{tshape:?}"),
            ));
        }
        let pal = Palettized {
            rows,
            cols,
            bits: state.options.bits,
            group_rows,
            tables: tables
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect(),
            indices,
        };
        if let Some(p) = pal.problems() {
            return Err(bad(name.clone(), "a valid palette".into(), p));
        }
        out.push((name.clone(), pal));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn palette(rows: usize, cols: usize, seed: u8) -> Palettized {
        Palettized {
            rows,
            cols,
            bits: 2,
            group_rows: 2,
            tables: (0..rows / 2 * 4)
                .map(|i| f16::from_f32(i as f32 * 0.01 - 0.02))
                .collect(),
            indices: (0..rows * cols).map(|i| (i as u8 + seed) % 4).collect(),
        }
    }

    fn state(layers: usize) -> ClusterCheckpoint {
        ClusterCheckpoint {
            method: "edkm".into(),
            options: EdkmOptions {
                bits: 2,
                group_rows: 2,
                ..Default::default()
            },
            importance: true,
            model: "abc".into(),
            calibration: windows_fingerprint(&[vec![1, 2, 3]]),
            layers: (0..layers)
                .map(|layer| EdkmLayer {
                    layer,
                    kmeans_error: 1.0,
                    edkm_error: 0.5,
                    kept_kmeans: false,
                })
                .collect(),
        }
    }

    /// A checkpoint reads back as written; one from another run (options,
    /// model, calibration), with a palette of the wrong shape, an index out
    /// of range or a missing file is refused with the field named.
    #[test]
    fn checkpoints_round_trip_and_refuse_another_runs_or_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("run.ckpt");
        let names: Vec<String> = (0..14).map(|i| format!("t{i}")).collect();
        let pals: NamedPalettes = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), palette(4, 3, i as u8)))
            .collect();
        start_fresh(&ckpt).unwrap();
        save_layer(&ckpt, &state(1), &pals[..7]).unwrap();
        let shape = |_: &str| Some((4, 3, 2));
        let (s, back) = load(&ckpt, &state(0), shape, &names).unwrap();
        assert_eq!((s, back), (state(1), pals[..7].to_vec()));
        save_layer(&ckpt, &state(2), &pals[7..]).unwrap();
        let (s, back) = load(&ckpt, &state(0), shape, &names).unwrap();
        assert_eq!((s, back), (state(2), pals.clone()));

        type Shapes<'a> = &'a dyn Fn(&str) -> Option<(usize, usize, usize)>;
        let refused = |expected: ClusterCheckpoint, shape: Shapes<'_>| {
            load(&ckpt, &expected, shape, &names).unwrap_err().to_string()
        };
        let mut other = state(0);
        other.options.lr = 1e-3;
        assert!(refused(other, &shape).contains("options"));
        let mut other = state(0);
        other.model = "def".into();
        assert!(refused(other, &shape).contains("model"));
        let mut other = state(0);
        other.calibration = windows_fingerprint(&[vec![1, 2]]);
        assert!(refused(other, &shape).contains("calibration"));
        let e = refused(state(0), &|_| Some((6, 3, 2)));
        assert!(e.contains("t0.indices") && e.contains("[6, 3]"), "{e}");

        let mut broken = pals.clone();
        broken[3].1.indices[0] = 9;
        save_layer(&ckpt, &state(1), &broken[..7]).unwrap();
        let e = refused(state(0), &shape);
        assert!(e.contains("t3") && e.contains("indices"), "{e}");

        save_layer(&ckpt, &state(1), &pals[..7]).unwrap();
        save_layer(&ckpt, &state(2), &pals[7..]).unwrap();
        std::fs::remove_file(ckpt.join(layer_file(1))).unwrap();
        assert!(refused(state(0), &shape).contains(&layer_file(1)));
        std::fs::write(ckpt.join(layer_file(0)), b"not safetensors").unwrap();
        assert!(refused(state(0), &shape).contains(&layer_file(0)));
        std::fs::write(ckpt.join(STATE_FILE), "{").unwrap();
        assert!(refused(state(0), &shape).contains("checkpoint state"));

        // A fresh run clears an old checkpoint, and refuses a directory that is not one.
        start_fresh(&ckpt).unwrap();
        assert_eq!(std::fs::read_dir(&ckpt).unwrap().count(), 0);
        let mine = dir.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), "keep").unwrap();
        assert!(
            start_fresh(&mine)
                .unwrap_err()
                .to_string()
                .contains("not a cluster checkpoint")
        );
        assert!(mine.join("notes.txt").exists());
    }
}
