//! The KV cache is reserved once for the whole generation: decode steps append
//! to it without moving it (no reallocation, no copy, no doubled buffer in the
//! peak memory), on a small synthetic model.

use oqt_core::testing::{random_weights, tiny_config, write_tiny_gguf};
use oqt_runtime::{KvCache, RuntimeModel};

#[test]
fn a_reserved_cache_never_moves_while_it_fills() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let cfg = tiny_config();
    write_tiny_gguf(&path, &cfg, &random_weights(&cfg, 7)).unwrap();
    let model = RuntimeModel::from_gguf(&path).unwrap();
    let (prompt, steps) = (vec![5u32, 17, 42, 99, 3], 20);
    let mut cache = KvCache::with_capacity(&model, prompt.len() + steps);
    let reserved = cache.buffers();
    model.forward_hidden(&prompt, &mut cache).unwrap();
    for t in 0..steps as u32 {
        model.forward_hidden(&[t % 300], &mut cache).unwrap();
        assert_eq!(cache.buffers(), reserved, "the cache moved at decode step {t}");
    }
    assert_eq!(cache.len(), prompt.len() + steps);
    // One token past the reservation still works: the cache grows.
    model.forward_hidden(&[1], &mut cache).unwrap();
    assert_eq!(cache.len(), prompt.len() + steps + 1);
}
