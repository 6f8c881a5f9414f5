use super::{DeviceArgs, load_burn};
use crate::output::print_json;
use anyhow::Context;
use clap::Args;
use oqt_eval::{PerplexityOptions, perplexity};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model alias, GGUF file, HF directory or hub id (run in f32 on Burn).
    #[arg(required_unless_present_any = ["bundle", "recipe"], conflicts_with_all = ["bundle", "recipe"])]
    pub model: Option<String>,
    /// An evaluation recipe (recipes/eval-*.toml): quantize and measure every
    /// check it lists; exit non-zero when any result regresses beyond its tolerance.
    #[arg(long, conflicts_with = "bundle")]
    pub recipe: Option<std::path::PathBuf>,
    /// An oqt bundle — or a GGUF file (Q4_0/Q8_0 on the integer kernels, as
    /// llama.cpp's CPU backend computes them) — run by the integer runtime instead.
    #[arg(long)]
    pub bundle: Option<std::path::PathBuf>,
    /// With --bundle: run the bundle's fake-quantized simulation on Burn instead
    /// of the runtime (what compression optimized; the two should agree).
    #[arg(long, requires = "bundle")]
    pub simulate: bool,
    /// With --bundle: apply this LoRA adapter (a PEFT directory, e.g. from
    /// `oqt finetune`) at load, unmerged — the base's integers untouched.
    #[arg(long, requires = "bundle", conflicts_with = "simulate")]
    pub adapter: Option<std::path::PathBuf>,
    /// Dataset name (wikitext2, tinyshakespeare) or a text file.
    #[arg(long, default_value = "wikitext2")]
    pub dataset: String,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first N chunks.
    #[arg(long)]
    pub max_chunks: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Print one JSON object (with a numeric `perplexity` field) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The model to score: the f32 Burn model or the runtime on a bundle.
struct Scorer {
    lm: Box<dyn oqt_core::scoring::CausalLm>,
    tokenizer: oqt_core::Tokenizer,
    name: String,
    path: String,
    engine: &'static str,
}

fn scorer(a: &EvalArgs) -> anyhow::Result<Scorer> {
    if let Some(b) = &a.bundle {
        if !a.simulate {
            let (rt, name) = super::load_runtime(b)?;
            let tokenizer = rt.tokenizer.clone();
            let (lm, engine): (Box<dyn oqt_core::scoring::CausalLm>, _) = match &a.adapter {
                Some(dir) => (Box::new(super::AdaptedRuntime::load(rt, dir)?), "runtime+lora"),
                None => (Box::new(rt), "runtime"),
            };
            return Ok(Scorer {
                tokenizer,
                name,
                path: b.display().to_string(),
                engine,
                lm,
            });
        }
        let bundle = oqt_core::bundle::Bundle::open(b)?;
        let device = oqt_model::select_device(a.device.device, false)?;
        let sim = oqt_model::SimulatedModel::from_bundle(&bundle, &device)?;
        return Ok(Scorer {
            tokenizer: bundle.tokenizer()?,
            name: bundle.manifest.model_name.clone(),
            path: b.display().to_string(),
            engine: "burn-fake-quant",
            lm: Box::new(sim),
        });
    }
    let spec = a.model.as_deref().expect("clap requires a model or --bundle");
    let (loaded, model) = load_burn(spec, &a.device)?;
    Ok(Scorer {
        tokenizer: loaded.tokenizer,
        name: loaded.name,
        path: loaded.path.display().to_string(),
        engine: "burn-f32",
        lm: Box::new(model),
    })
}

/// A dataset (name or text file) and its tokens, without BOS.
/// WikiText-2 perplexity (ctx 512, the first `chunks` chunks) of a float
/// model or float bundle on Burn in f32: what prune, fold and distill report.
pub fn float_wikitext_perplexity(path: &std::path::Path, chunks: usize, label: &str) -> anyhow::Result<f64> {
    let model = oqt_core::load_model(path)?;
    let (_, tokens) = dataset_tokens(&model.tokenizer, "wikitext2")?;
    let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)?;
    let bos = model.tokenizer.document_bos();
    let llama = oqt_model::llama_from_weights(&model.config, model.weights, &device);
    let opts = oqt_eval::PerplexityOptions {
        ctx: 512,
        max_chunks: Some(chunks),
        bos,
    };
    let pb = crate::output::bar(chunks as u64, label);
    let r = oqt_eval::perplexity(&llama, &tokens, &opts, |p| pb.set_position(p.chunk as u64))?;
    pb.finish_and_clear();
    Ok(r.perplexity)
}

pub fn dataset_tokens(
    tokenizer: &oqt_core::Tokenizer,
    dataset: &str,
) -> anyhow::Result<(oqt_core::datasets::ResolvedDataset, Vec<u32>)> {
    let data = oqt_core::datasets::resolve(dataset)?;
    let tokens = tokenizer
        .encode(&data.read_text()?, false)
        .with_context(|| format!("tokenizing {}", data.name))?;
    Ok((data, tokens))
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if let Some(r) = &a.recipe {
        return super::eval_recipe::run(r, a.json);
    }
    let sc = scorer(&a)?;
    let (dataset, tokens) = dataset_tokens(&sc.tokenizer, &a.dataset)?;
    let opts = PerplexityOptions {
        ctx: a.ctx,
        max_chunks: a.max_chunks,
        bos: sc.tokenizer.document_bos(),
    };
    let chunks = opts
        .max_chunks
        .map_or(tokens.len() / a.ctx, |m| m.min(tokens.len() / a.ctx));
    let pb = crate::output::bar(chunks as u64, "perplexity");
    let report = perplexity(sc.lm.as_ref(), &tokens, &opts, |p| {
        pb.set_position(p.chunk as u64);
        pb.set_message(format!("ppl {:.4}", p.running_perplexity));
    })?;
    pb.finish_and_clear();
    let peak = oqt_core::sys::peak_rss_mib();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        let o = v.as_object_mut().expect("report is an object");
        o.insert("model".into(), sc.name.clone().into());
        o.insert("model_path".into(), sc.path.clone().into());
        o.insert("dataset".into(), dataset.name.clone().into());
        o.insert("engine".into(), sc.engine.into());
        o.insert("peak_rss_mib".into(), serde_json::json!(peak));
        return print_json(&v);
    }
    println!(
        "{} on {} (ctx {}, {} of {} chunks, {} predictions)",
        sc.name, dataset.name, report.ctx, report.chunks, report.chunks_available, report.scored_tokens
    );
    println!(
        "perplexity {:.4}   mean NLL {:.5}   top-1 {:.2}%",
        report.perplexity,
        report.mean_nll,
        100.0 * report.top1_accuracy
    );
    println!(
        "{:.1} s, {:.0} tokens/s{}",
        report.seconds,
        report.tokens_per_second,
        peak.map(|p| format!(", peak RSS {p:.0} MiB")).unwrap_or_default()
    );
    Ok(())
}
