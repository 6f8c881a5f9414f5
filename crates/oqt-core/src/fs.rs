//! Writing directories so that readers see them complete or not at all.

use crate::error::{CoreError, Result};
use std::path::Path;

/// Build a directory with `fill` in a temporary directory beside `target`,
/// then put it in place of `target` (replacing what was there). A failing
/// `fill` leaves `target` untouched and no temporary directory behind.
pub fn write_dir_atomically<T>(target: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".oqt-tmp-")
        .tempdir_in(parent)
        .map_err(|e| CoreError::io(parent, e))?;
    let value = fill(tmp.path())?;
    let built = tmp.keep();
    if target.exists() {
        std::fs::remove_dir_all(target).map_err(|e| CoreError::io(target, e))?;
    }
    std::fs::rename(&built, target).map_err(|e| CoreError::io(target, e))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_the_target_and_no_temporary() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        write_dir_atomically(&target, |d| {
            std::fs::write(d.join("a"), "1").map_err(|e| CoreError::io(d, e))
        })
        .unwrap();
        let e = write_dir_atomically(&target, |_| -> Result<()> { Err(CoreError::Other("no".into())) });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        write_dir_atomically(&target, |d| {
            std::fs::write(d.join("b"), "2").map_err(|e| CoreError::io(d, e))
        })
        .unwrap();
        assert!(!target.join("a").exists() && target.join("b").exists());
    }
}
