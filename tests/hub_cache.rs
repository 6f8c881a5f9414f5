//! Hub ids resolve through a cache laid out like the Hugging Face hub's
//! (`$HF_HOME/hub/models--ORG--NAME/{refs,snapshots}`), without a network.

use assert_cmd::Command;
use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf, write_tiny_hf_dir};
use predicates::prelude::*;
use predicates::str::contains;
use std::path::Path;

/// A hub-style cache holding `org/tiny` at commit `abc123`.
fn hub_cache(home: &Path) -> std::path::PathBuf {
    let repo = home.join("hub").join("models--org--tiny");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
    let cfg = tiny_config();
    let w = random_weights(&cfg, 3);
    let gguf = home.join("tiny.gguf");
    write_tiny_gguf(&gguf, &cfg, &w).unwrap();
    write_tiny_hf_dir(&snap, &cfg, &w, &gguf).unwrap();
    snap
}

fn oqt(home: &Path) -> Command {
    let mut c = Command::cargo_bin("oqt").unwrap();
    c.env("HF_HOME", home).env("HF_HUB_OFFLINE", "1");
    c
}

#[test]
fn hub_id_resolves_from_the_local_cache() {
    let home = tempfile::tempdir().unwrap();
    let snap = hub_cache(home.path());
    oqt(home.path())
        .args(["fetch", "org/tiny"])
        .assert()
        .success()
        .stdout(contains(snap.to_str().unwrap()));
    oqt(home.path())
        .args(["inspect", "org/tiny"])
        .assert()
        .success()
        .stdout(contains("2 layers"));
    // The cached snapshot is complete: no network is needed even when online is allowed.
    Command::cargo_bin("oqt")
        .unwrap()
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_OFFLINE")
        .args(["fetch", "org/tiny"])
        .assert()
        .success();
}

#[test]
fn missing_cached_file_says_which_and_how_to_provide_it() {
    let home = tempfile::tempdir().unwrap();
    let snap = hub_cache(home.path());
    std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
    oqt(home.path()).args(["fetch", "org/tiny"]).assert().failure().stderr(
        contains("`tokenizer.json`")
            .and(contains("HF_HUB_OFFLINE"))
            .and(contains("huggingface-cli download org/tiny")),
    );
    oqt(home.path())
        .args(["fetch", "org/absent"])
        .assert()
        .failure()
        .stderr(contains("`config.json`"));
}
