//! `oqt distill --teacher T --student S`: teach a student (float, folded or
//! quantized) the teacher's next-token distribution, first-order or
//! zeroth-order, on all of its layers or a chosen few.

use super::qat::{Reporter, TrainingArgs};
use crate::output::print_json;
use anyhow::{Context, bail};
use clap::Args;
use oqt_compress::distill::job::{self as distill_job, DistillJob};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  # heal a folded model by training its last 6 blocks on the full model's distribution
  oqt distill --teacher smollm2-135m --student exports/fold8.oqt --train last:6 \\
      --steps 200 --output exports/fold8-healed.oqt
  # a quantized student trains through its recipe's fake quantizers, forward passes only
  oqt distill --teacher smollm2-135m --student exports/w4a8-dyn.oqt --zeroth-order \\
      --lightweight --steps 100 --output exports/w4a8-dyn-distilled.oqt")]
pub struct DistillArgs {
    /// The teacher: a model alias, GGUF file, HF directory, hub id or any bundle (dequantized).
    #[arg(long)]
    pub teacher: String,
    /// The student: a model, a float bundle (folded) or a quantized bundle
    /// (trained through its recipe's fake quantizers, written on the same grids).
    #[arg(long)]
    pub student: String,
    /// Forward-only training (ZeroQAT's SPSA): memory of inference. Without it:
    /// backprop and AdamW.
    #[arg(long)]
    pub zeroth_order: bool,
    /// Weight w of the KL term: loss = (1 − w)·cross-entropy + w·KL(teacher ‖ student).
    #[arg(long, default_value_t = 1.0)]
    pub distill_weight: f32,
    /// Teacher tokens kept per position (the targets are computed once, before training).
    #[arg(long, default_value_t = 32)]
    pub top_k: usize,
    /// Also pull each student block's output toward its teacher block's
    /// (normalized MSE, this weight; first-order only). 0: off.
    #[arg(long, value_name = "W", default_value_t = 0.0)]
    pub hidden_weight: f32,
    /// Student → teacher blocks for --hidden-weight: `auto` (a folded
    /// student's kept blocks with their places before folding; the identity
    /// for a student as deep as the teacher) or `S:T,S:T,…` (e.g. `12:15,13:19`).
    #[arg(long, value_name = "MAP", default_value = "auto")]
    pub layer_map: String,
    /// Do not read or write the teacher-targets cache (`$OQT_CACHE/teacher-targets`:
    /// one file per teacher, training text and batch options).
    #[arg(long)]
    pub no_targets_cache: bool,
    #[command(flatten)]
    pub training: TrainingArgs,
    /// WikiText-2 chunks (ctx 512) to evaluate a float student on, before and after.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub eval_chunks: usize,
    /// Skip the WikiText-2 evaluation.
    #[arg(long)]
    pub no_eval: bool,
    /// Where to write the trained student (a bundle).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print one JSON object (held-out curve, perplexities, timing, peak memory).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DistillArgs) -> anyhow::Result<()> {
    let step = a.training.step(a.zeroth_order, a.distill_weight, a.top_k);
    let option_name = |f: &str| match f {
        "distill" => "--distill-weight".to_string(),
        f => format!("--{}", f.replace('_', "-")),
    };
    if let Some(p) = step.problems(option_name).first() {
        bail!("{p}");
    }
    let resolve =
        |spec: &str, role: &str| oqt_hub::resolve_model(spec).with_context(|| format!("resolving the {role} `{spec}`"));
    let teacher = resolve(&a.teacher, "teacher")?.path;
    let student = resolve(&a.student, "student")?.path;
    let created_by = concat!("oqt ", env!("CARGO_PKG_VERSION"));
    let hidden = if a.hidden_weight != 0.0 {
        let map = oqt_compress::distill::hidden::LayerMap::parse(&a.layer_map)
            .map_err(|e| anyhow::anyhow!("--layer-map: {e}"))?;
        Some(oqt_compress::distill::job::HiddenOptions {
            weight: a.hidden_weight,
            map,
        })
    } else {
        if a.layer_map != "auto" {
            anyhow::bail!("--layer-map pairs blocks for --hidden-weight: give a positive --hidden-weight too");
        }
        None
    };
    let job = DistillJob {
        teacher: &teacher,
        student: &student,
        training: &step,
        option_name: &option_name,
        output: &a.output,
        checkpoint_dir: a.training.checkpoint_dir.clone(),
        resume: a.training.resume.as_deref(),
        created_by,
        hidden,
        targets_cache: (!a.no_targets_cache).then(|| oqt_compress::distill::cache::dir_in(&oqt_hub::oqt_cache_dir())),
    };
    let float_student = !a.no_eval && is_float(&student);
    let mut reporter = Reporter::new(a.zeroth_order, a.training.tensorboard.as_deref())?;
    let t0 = std::time::Instant::now();
    let report = distill_job::run(&job, &mut reporter)?;
    drop(reporter);
    let wall_s = t0.elapsed().as_secs_f64();
    let outcome = &report.outcome;
    if report.interrupted {
        super::qat::print_interrupted(outcome.next_step, &report.checkpoint_dir);
        return Ok(());
    }
    // Evaluated after the run, so bad inputs fail at once (a student
    // overwritten by its own output has no "before").
    let before = (float_student && student != a.output)
        .then(|| super::eval::float_wikitext_perplexity(&student, a.eval_chunks, "evaluating the student"))
        .transpose()?;
    let after = float_student
        .then(|| super::eval::float_wikitext_perplexity(&a.output, a.eval_chunks, "evaluating the distilled student"))
        .transpose()?;
    if a.json {
        return print_json(&serde_json::json!({
            "output": a.output,
            "report": report,
            "steps": outcome.next_step,
            "held_out_perplexity": outcome.evals,
            "kept": outcome.best,
            "wikitext2_before": before,
            "wikitext2_after": after,
            "eval_chunks": after.map(|_| a.eval_chunks),
            "wall_s": wall_s,
            "peak_rss_mib": oqt_core::sys::peak_rss_mib(),
        }));
    }
    let held = |e: Option<&(u64, f64)>| e.map_or("-".into(), |e| format!("{:.4}", e.1));
    println!(
        "wrote {} ({} student, {} of {} blocks trained, {}) after {} steps ({wall_s:.0} s); held-out perplexity {} → {}",
        a.output.display(),
        report.student_kind,
        report.trained_layers.len(),
        report.student_blocks,
        report.method,
        outcome.next_step,
        held(outcome.evals.first()),
        held(outcome.evals.last()),
    );
    if let (Some(b), Some(f)) = (before, after) {
        println!(
            "WikiText-2 perplexity (ctx 512, {} chunks, f32): {b:.4} → {f:.4}",
            a.eval_chunks
        );
    } else if !a.no_eval {
        println!(
            "evaluate the quantized student with `oqt eval --bundle {}`",
            a.output.display()
        );
    }
    Ok(())
}

/// A model or float bundle (the quantized ones are evaluated by the runtime).
fn is_float(path: &std::path::Path) -> bool {
    match oqt_core::load::detect_format(path) {
        Ok(oqt_core::ModelFormat::Bundle) => oqt_core::bundle::Bundle::open(path)
            .map(|b| b.manifest.deployment.tensors.values().all(|e| e.int_grid().is_none()))
            .unwrap_or(false),
        Ok(_) => true,
        Err(_) => false,
    }
}
