//! `oqt cluster`: palettize every decoder linear (each weight a `bits`-bit
//! index into a table shared by a group of output channels) into a `lut`
//! bundle, embedding, head and activations on a recipe's grids; then score it
//! on WikiText-2 in the runtime.

use super::load;
use super::quantize::Bars;
use crate::output::{mib, print_json};
use anyhow::Context;
use clap::Args;
use oqt_compress::cluster::edkm::{EdkmLayer, EdkmObserver};
use oqt_compress::cluster::{ClusterReport, ClusterRun, cluster_to_bundle};
use oqt_core::lut::Palettized;
use oqt_core::quant::ClusterStep;
use oqt_core::tensorboard::TbWriter;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Model alias, GGUF file, HF directory or hub id (or a pruned float bundle).
    pub model: String,
    /// `kmeans` (post-training weighted k-means, k-means++ initialised),
    /// `edkm` (DKM training layer by layer, uniquified, from the k-means
    /// palettes) or `dkm` (the same training with DKM's naive `[N, K]` soft
    /// assignment: the same numbers, far more memory).
    #[arg(long, default_value = "kmeans")]
    pub method: String,
    /// Index width: 2^B table entries (1–8).
    #[arg(long, default_value_t = 4, value_name = "B")]
    pub bits: u8,
    /// Output channels sharing one table (0: one table per tensor); must
    /// divide every decoder linear's output channels.
    #[arg(long, default_value_t = 16, value_name = "G")]
    pub group_channels: usize,
    /// k-means: Lloyd iterations at most.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub iterations: usize,
    /// Count every weight the same (no calibration), instead of by its input
    /// channel's energy on calibration text.
    #[arg(long)]
    pub no_importance: bool,
    /// eDKM: Adam steps per layer (each over every calibration window).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub steps: usize,
    /// eDKM: Adam learning rate on weights and centroids.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// eDKM: DKM's temperature relative to each linear's mean squared weight.
    #[arg(long, default_value_t = 0.01)]
    pub tau: f32,
    /// The recipe whose activations, embedding/head grids and calibration the
    /// bundle takes (dynamic or float activations).
    #[arg(long, default_value = "lut4-a8-dyn")]
    pub recipe: String,
    #[command(flatten)]
    pub calib: super::CalibOverrides,
    /// WikiText-2 chunks (ctx 512) to evaluate the bundle on, in the runtime.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub eval_chunks: usize,
    /// Skip the evaluation (just write the bundle).
    #[arg(long)]
    pub no_eval: bool,
    /// dkm/edkm: checkpoint directory, one file added after every layer
    /// (default: the output path with `.ckpt`); removed once the bundle is written.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// dkm/edkm: continue a stopped run from its checkpoint directory (same
    /// options, model and calibration; the result equals an uninterrupted run).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// dkm/edkm: write TensorBoard scalars here (each layer's loss per step,
    /// its k-means and trained output errors).
    #[arg(long, value_name = "DIR")]
    pub tensorboard: Option<PathBuf>,
    /// dkm/edkm: where the training runs.
    #[command(flatten)]
    pub device: super::DeviceArgs,
    /// Where to write the bundle (default: exports/<model>-<method>-lut<B>-g<G>.oqt).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON (every linear's error included).
    #[arg(long)]
    pub json: bool,
}

/// TensorBoard scalars of a DKM/eDKM run: `dkm/loss` at step
/// `layer · steps + step`, `dkm/kmeans_error` and `dkm/trained_error` per layer.
struct Scalars {
    tb: Option<TbWriter>,
    steps: usize,
    /// The first write that failed (training goes on; a warning at the end).
    error: Option<String>,
}

impl Scalars {
    fn write(&mut self, tag: &str, step: usize, value: f64) {
        if let Some(tb) = &mut self.tb
            && let Err(e) = tb.scalar(tag, step as u64, value as f32)
        {
            self.error.get_or_insert(e.to_string());
        }
    }
}

impl EdkmObserver for Scalars {
    fn step(&mut self, layer: usize, step: usize, loss: f64) {
        self.write("dkm/loss", layer * self.steps + step, loss);
    }

    fn layer_done(&mut self, _: &[(String, Palettized)], layers: &[EdkmLayer]) -> oqt_core::Result<()> {
        if let Some(l) = layers.last() {
            self.write("dkm/kmeans_error", l.layer, l.kmeans_error);
            self.write("dkm/trained_error", l.layer, l.edkm_error);
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Output {
    model: String,
    bundle: PathBuf,
    bundle_bytes: u64,
    #[serde(flatten)]
    report: ClusterReport,
    /// WikiText-2 perplexity of the bundle in the runtime, when evaluated.
    perplexity: Option<f64>,
    eval_chunks: Option<usize>,
    peak_rss_mib: Option<f64>,
}

pub fn run(a: ClusterArgs) -> anyhow::Result<()> {
    let step = ClusterStep {
        method: a.method.clone(),
        bits: a.bits,
        group_channels: a.group_channels,
        iterations: a.iterations,
        importance: !a.no_importance,
        steps: a.steps,
        lr: a.lr,
        tau: a.tau,
    };
    let problems = step.problems(|f| format!("--{}", f.replace('_', "-")));
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let mut recipe = oqt_core::quant::load_recipe(&a.recipe)?;
    a.calib.apply(&mut recipe.calibration);
    if recipe.calibration.samples == 0 || recipe.calibration.seq_len < 2 {
        anyhow::bail!("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2");
    }
    let model = load(&a.model)?;
    let output = super::output_path(a.output.as_deref(), || {
        let path = std::path::Path::new(&a.model);
        let stem = match path.file_stem() {
            Some(s) if path.exists() => s.to_string_lossy().into_owned(),
            _ => a.model.replace(['/', '\\'], "_"),
        };
        PathBuf::from("exports").join(format!("{stem}-{}-lut{}-g{}.oqt", a.method, a.bits, a.group_channels))
    })?;
    let created_by = format!("oqt {}", env!("CARGO_PKG_VERSION"));
    let trains = step.method != "kmeans";
    if !trains && (a.resume.is_some() || a.checkpoint_dir.is_some() || a.tensorboard.is_some()) {
        anyhow::bail!(
            "--resume, --checkpoint-dir and --tensorboard are for --method dkm or edkm (k-means does not train)"
        );
    }
    let checkpoint = trains.then(|| {
        a.resume
            .clone()
            .or_else(|| a.checkpoint_dir.clone())
            .unwrap_or_else(|| output.with_extension("ckpt"))
    });
    let mut scalars = Scalars {
        tb: a.tensorboard.as_deref().map(TbWriter::create).transpose()?,
        steps: step.steps,
        error: None,
    };
    let (writer, report) = {
        let mut bars = Bars {
            label: "cluster".into(),
            pb: None,
        };
        let run = ClusterRun {
            device: trains
                .then(|| oqt_model::select_device(a.device.device, true))
                .transpose()?,
            checkpoint: checkpoint.as_deref(),
            resume: a.resume.is_some(),
            observer: &mut scalars,
        };
        cluster_to_bundle(&model, &recipe, &step, &created_by, &mut bars, run).context("clustering")?
    };
    if let Some(e) = scalars.error {
        tracing::warn!("TensorBoard scalars were not all written: {e}");
    }
    writer
        .write(&output)
        .with_context(|| format!("writing {}", output.display()))?;
    if let Some(dir) = checkpoint.filter(|d| d.is_dir()) {
        // The bundle holds everything the checkpoint did.
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the checkpoint {}", dir.display()))?;
    }
    let perplexity = if a.no_eval {
        None
    } else {
        let (rt, _) = super::load_runtime(&output)?;
        let (_, tokens) = super::eval::dataset_tokens(&model.tokenizer, "wikitext2")?;
        let opts = oqt_eval::PerplexityOptions {
            ctx: 512,
            max_chunks: Some(a.eval_chunks),
            bos: model.tokenizer.document_bos(),
        };
        let pb = crate::output::bar(a.eval_chunks as u64, "evaluating the bundle (runtime)");
        let r = oqt_eval::perplexity(&rt, &tokens, &opts, |p| pb.set_position(p.chunk as u64))?;
        pb.finish_and_clear();
        Some(r.perplexity)
    };
    let out = Output {
        model: model.name.clone(),
        bundle_bytes: std::fs::metadata(&output)?.len(),
        bundle: output,
        report,
        perplexity,
        eval_chunks: perplexity.map(|_| a.eval_chunks),
        peak_rss_mib: oqt_core::sys::peak_rss_mib(),
    };
    if a.json {
        return print_json(&out);
    }
    let r = &out.report;
    println!(
        "{} · {} {} bits, {} · mean weighted weight error {:.5}",
        out.model,
        r.method,
        r.bits,
        if r.group_channels == 0 {
            "one table per tensor".to_string()
        } else {
            format!("{} channels a table", r.group_channels)
        },
        r.mean_relative_error
    );
    println!(
        "decoder linears {:.3} bits/weight (tables included); stored {} ({:.2} bits/weight over the model); bundle {} ({}) · clustered in {:.0} s",
        r.linear_bits_per_weight,
        mib(r.stored_bytes),
        r.bits_per_weight,
        out.bundle.display(),
        mib(out.bundle_bytes),
        r.seconds
    );
    if let Some(p) = out.perplexity {
        println!(
            "WikiText-2 perplexity (runtime, ctx 512, {} chunks): {p:.4}",
            a.eval_chunks
        );
    }
    Ok(())
}
