use std::path::PathBuf;

/// oqt's own cache: `$OQT_CACHE`, else `$XDG_CACHE_HOME/oqt`, else `~/.cache/oqt`.
pub fn oqt_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OQT_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("oqt");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("oqt")
}
