//! `load_model_meta` reads what a run needs besides the weights, and reads it
//! the way the full load does.

#[test]
fn smollm2_metadata_matches_the_full_load() {
    let path = oqt_hub::resolve_model("smollm2-135m").expect("default model").path;
    let full = oqt_core::load_model(&path).unwrap();
    let (meta, types) = oqt_core::load::load_model_meta(&path).unwrap();
    assert!(meta.weights.is_empty());
    assert_eq!(meta.config, full.config);
    assert_eq!(meta.name, full.name);
    assert_eq!(meta.path, full.path);
    let text = "Shall I compare thee to a summer's day?";
    assert_eq!(
        meta.tokenizer.encode(text, false).unwrap(),
        full.tokenizer.encode(text, false).unwrap()
    );
    let full_types: std::collections::BTreeMap<String, String> = full
        .weights
        .names()
        .map(|n| (n.clone(), full.weights.source_type(n).unwrap().to_string()))
        .collect();
    assert_eq!(types, full_types);
    // The storage types the bundle will record: SmolLM2's linears are Q4_1.
    assert_eq!(types["model.layers.0.self_attn.q_proj.weight"], "Q4_1");
}
