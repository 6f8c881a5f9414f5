use crate::output::{mib, print_json};
use anyhow::Context;
use clap::Args;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
    /// Print all metadata keys.
    #[arg(long)]
    pub metadata: bool,
    /// Print JSON (everything).
    #[arg(long)]
    pub json: bool,
}

fn inspect_bundle(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use oqt_core::bundle::Bundle;
    let b = Bundle::open(path)?;
    let m = &b.manifest;
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in m.deployment.tensors.values() {
        *kinds.entry(e.describe()).or_default() += 1;
    }
    if json {
        return print_json(&serde_json::json!({
            "path": path,
            "format": "oqt-bundle",
            "format_version": m.format_version,
            "created_by": m.created_by,
            "model_name": m.model_name,
            "method": m.provenance.method,
            "recipe": m.provenance.recipe,
            "activations": m.deployment.activations,
            "config": m.config,
            "tensor_kinds": kinds,
            "data_bytes": b.data_bytes(),
            "inputs": m.inputs,
            "evaluation": m.evaluation,
        }));
    }
    println!(
        "{}  (oqt bundle v{}, {})",
        path.display(),
        m.format_version,
        mib(b.data_bytes() as u64)
    );
    println!(
        "model {}, method {}, recipe {}",
        m.model_name,
        m.provenance.method.as_deref().unwrap_or("-"),
        m.recipe_name().unwrap_or("-")
    );
    println!(
        "activations {}",
        serde_json::to_value(m.deployment.activations)?.as_str().unwrap_or("-")
    );
    println!("MLP {}", mlp_widths(&m.config));
    for (k, n) in &kinds {
        println!("  {n:>4} tensors {k}");
    }
    for e in &m.evaluation {
        println!(
            "  {} ctx {} × {} chunks: perplexity {:.4} ({})",
            e.dataset, e.ctx, e.chunks, e.perplexity, e.engine
        );
    }
    Ok(())
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let r = oqt_hub::resolve_model(&a.model)?;
    if super::is_bundle(&r.path) {
        return inspect_bundle(&r.path, a.json);
    }
    let s = oqt_core::inspect::inspect_model(&r.path).with_context(|| format!("inspecting {}", r.path.display()))?;
    if a.json {
        return print_json(&s);
    }
    let c = &s.config;
    println!("{}  ({:?}, {})", s.path, s.format, mib(s.file_bytes));
    let mlp = mlp_widths(c);
    println!(
        "architecture: llama-family, {} layers, hidden {}, MLP {mlp}, heads {} / kv {} of {}, vocab {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    );
    println!(
        "rope theta {}{}, rms eps {:e}, context {}, {} embeddings{}",
        c.rope_theta,
        if c.rope_scaling.is_some() || c.rope_freq_factors.is_some() {
            " (llama3 scaling)"
        } else {
            ""
        },
        c.rms_norm_eps,
        c.max_position_embeddings,
        if c.tie_word_embeddings { "tied" } else { "untied" },
        if c.attention_bias { ", q/k/v biases" } else { "" }
    );
    println!(
        "parameters: {:.1} M, {:.2} bits/weight",
        s.parameters as f64 / 1e6,
        s.bits_per_weight
    );
    println!("tensor types:");
    for (ty, st) in &s.types {
        println!(
            "  {ty:<6} {:>4} tensors {:>12} values {:>12}",
            st.tensors,
            st.elements,
            mib(st.bytes)
        );
    }
    let t = &s.tokenizer;
    println!(
        "tokenizer: {}, vocab {}, bos {}, eos {}, add_bos {}, chat template {}",
        t.kind,
        t.vocab_size,
        t.bos.as_deref().unwrap_or("-"),
        t.eos.as_deref().unwrap_or("-"),
        t.add_bos,
        if t.has_chat_template { "yes" } else { "no" }
    );
    if a.metadata {
        println!("metadata:");
        for (k, v) in &s.metadata {
            println!("  {k} = {v}");
        }
    }
    if a.tensors {
        println!("tensors:");
        for t in &s.tensors {
            println!("  {:<40} {:<6} {:?} {}", t.name, t.dtype, t.shape, mib(t.bytes));
        }
    }
    Ok(())
}

/// The MLP width, or the range of per-layer widths and what splitting added.
fn mlp_widths(c: &oqt_core::LlamaConfig) -> String {
    match &c.layer_intermediate_sizes {
        None => c.intermediate_size.to_string(),
        Some(sizes) => format!(
            "{}–{} per layer (outlier channels split: +{} in all)",
            sizes.iter().min().unwrap_or(&0),
            sizes.iter().max().unwrap_or(&0),
            sizes
                .iter()
                .sum::<usize>()
                .saturating_sub(c.intermediate_size * c.num_layers)
        ),
    }
}
