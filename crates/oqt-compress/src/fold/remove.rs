//! Block removal: a model without some of its decoder blocks. The kept
//! blocks keep their weights and order and are renumbered `0..kept`; the
//! residual stream simply skips the removed ones.

use oqt_core::weights::{ModelWeights, names};
use oqt_core::{CoreError, LlamaConfig, Result};

/// Which blocks to remove: checked against a model of `n_layers` blocks
/// (in range, no repeats, at least one block left). Returns them sorted.
pub fn check_removal(removed: &[usize], n_layers: usize) -> Result<Vec<usize>> {
    let mut sorted = removed.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != removed.len() {
        return Err(CoreError::Other(format!(
            "blocks to remove {removed:?}: a block is named twice"
        )));
    }
    if let Some(&bad) = sorted.iter().find(|&&b| b >= n_layers) {
        return Err(CoreError::Other(format!(
            "block {bad} is out of range: the model has {n_layers} blocks (0..={})",
            n_layers.saturating_sub(1)
        )));
    }
    if sorted.len() >= n_layers {
        return Err(CoreError::Other(format!(
            "removing {} of {n_layers} blocks leaves none: keep at least one",
            sorted.len()
        )));
    }
    Ok(sorted)
}

/// `config` and `weights` without the blocks `removed` (canonical names, the
/// kept blocks renumbered in order). Per-layer MLP widths follow their blocks.
pub fn remove_blocks(
    config: &LlamaConfig,
    mut weights: ModelWeights,
    removed: &[usize],
) -> Result<(LlamaConfig, ModelWeights)> {
    let removed = check_removal(removed, config.num_layers)?;
    let kept: Vec<usize> = (0..config.num_layers).filter(|l| !removed.contains(l)).collect();
    let mut out = ModelWeights::default();
    // Every per-layer tensor is renamed to its block's new index; the rest moves as is.
    let mut layer_names: Vec<(usize, String, String)> = Vec::new();
    for name in weights.names() {
        match layer_of(name) {
            Some((l, suffix)) => layer_names.push((l, name.clone(), suffix.to_string())),
            None => layer_names.push((usize::MAX, name.clone(), String::new())),
        }
    }
    for (l, name, suffix) in layer_names {
        let source = weights.source_type(&name).unwrap_or("f32").to_string();
        let t = weights.take(&name).expect("listed");
        if l == usize::MAX {
            out.insert(name, t, source);
        } else if let Some(new) = kept.iter().position(|&k| k == l) {
            out.insert(names::layer(new, &suffix), t, source);
        }
    }
    let mut cfg = config.clone();
    cfg.num_layers = kept.len();
    cfg.layer_intermediate_sizes = config
        .layer_intermediate_sizes
        .as_ref()
        .map(|w| kept.iter().map(|&l| w[l]).collect());
    Ok((cfg, out))
}

/// `model.layers.N.suffix` → `(N, suffix)`.
pub fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (n, suffix) = rest.split_once('.')?;
    Some((n.parse().ok()?, suffix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oqt_core::testing::random_weights;

    fn four_layers() -> LlamaConfig {
        LlamaConfig {
            num_layers: 4,
            ..oqt_core::testing::tiny_config()
        }
    }

    /// Removing blocks 1 and 2 of 4 keeps 0 and 3 as 0 and 1, weights intact;
    /// the result is a complete model of the new config.
    #[test]
    fn kept_blocks_are_renumbered_in_order() {
        let cfg = four_layers();
        let w = random_weights(&cfg, 5);
        let block3 = w.get(&names::layer(3, names::DOWN)).unwrap().clone();
        let (c2, w2) = remove_blocks(&cfg, w, &[2, 1]).unwrap();
        assert_eq!(c2.num_layers, 2);
        w2.validate(&c2, std::path::Path::new("folded")).unwrap();
        assert_eq!(w2.get(&names::layer(1, names::DOWN)).unwrap(), &block3);
        assert!(w2.get(&names::layer(2, names::DOWN)).is_none());
    }

    #[test]
    fn removing_every_block_or_an_absent_one_is_refused() {
        let cfg = four_layers();
        let e = remove_blocks(&cfg, random_weights(&cfg, 5), &[0, 1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("leaves none"), "{e}");
        let e = check_removal(&[4], 4).unwrap_err();
        assert!(e.to_string().contains("block 4 is out of range"), "{e}");
        assert!(check_removal(&[1, 1], 4).is_err());
    }
}
