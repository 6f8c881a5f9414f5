//! `oqt run RECIPE MODEL`: a recipe's whole pipeline from one command.

use super::qat::Reporter;
use super::quantize::Bars;
use crate::output::print_json;
use anyhow::Context;
use clap::Args;
use oqt_compress::ptq::{Method, Progress};
use oqt_compress::qat::QatObserver;
use oqt_core::quant::{QatStep, Step};
use oqt_pipeline::{FinishedStep, PipelineJob, PipelineObserver};
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(
    after_help = "A recipe lists its steps as [[steps]] tables, each with a `kind` and that kind's options:

  [[steps]]
  kind = \"quantize\"          # method = \"rtn\" | \"gptq\" | …; default: the recipe's default_method
  [[steps]]
  kind = \"qat\"               # every `oqt qat` option, in snake_case
  zeroth_order = true
  lightweight = true
  steps = 150

A recipe without [[steps]] is one quantize step. Each step's bundle is kept in
the run directory (OUTPUT.run/); a run that stopped (killed, Ctrl-C, --stop-after)
continues with --resume after its last finished step.

Example:
  oqt run recipes/w4a8-dyn-zeroqat.toml smollm2-135m --output exports/zq.oqt"
)]
pub struct RunArgs {
    /// Recipe name or recipe file.
    pub recipe: String,
    /// The float model: alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// Where the final bundle goes (default: exports/<model>-<recipe>.oqt).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Where each step's bundle and the run's state are kept (default: the output path with `.run`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in the run directory after its last finished step.
    #[arg(long)]
    pub resume: bool,
    /// Run only the first N steps (continue later with --resume).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<usize>,
    /// Print one JSON object (the steps with their bundles and times) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Bars for each step, a line per step boundary.
struct Observer {
    bars: Bars,
    reporter: Option<Reporter>,
}

impl PipelineObserver for Observer {
    fn step_started(&mut self, index: usize, total: usize, step: &Step, resumed: bool) {
        let what = match step {
            Step::Quantize(q) => format!("quantize ({})", q.method.as_deref().unwrap_or("the recipe's method")),
            Step::Qat(q) => format!("qat ({})", if q.zeroth_order { "zeroth-order" } else { "first-order" }),
            Step::Prune(p) => {
                self.bars.label = "prune".into();
                format!(
                    "prune ({}, {}{})",
                    p.method,
                    p.nm.clone()
                        .unwrap_or_else(|| format!("{:.0}%", p.sparsity.unwrap_or(0.0) * 100.0)),
                    if p.dsnot { ", DSnoT" } else { "" }
                )
            }
            Step::Cluster(c) => {
                self.bars.label = "cluster".into();
                format!(
                    "cluster ({}, {} bits, {} channels a table)",
                    c.method, c.bits, c.group_channels
                )
            }
            Step::Fold(f) => {
                self.bars.label = "fold".into();
                let budget = match (f.remove, f.budget) {
                    (Some(n), _) => format!("{n} blocks"),
                    (None, b) => format!("{:.0}% of decoder parameters", b.unwrap_or(0.0) * 100.0),
                };
                format!("fold ({}, {budget})", f.method)
            }
            Step::Distill(q) => format!(
                "distill ({}, layers {})",
                if q.zeroth_order { "zeroth-order" } else { "first-order" },
                q.train
            ),
            Step::Lora(l) => format!(
                "lora (rank {}, {}, {}), merged",
                l.rank,
                l.targets,
                if l.training.zeroth_order {
                    "zeroth-order"
                } else {
                    "first-order"
                }
            ),
        };
        if let Step::Quantize(q) = step {
            self.bars.label = q.method.clone().unwrap_or_else(|| "quantize".into());
        }
        let state = if resumed { "done earlier" } else { "running" };
        eprintln!("step {}/{total}: {what} — {state}", index + 1);
        tracing::info!(step = index + 1, total, kind = step.kind(), resumed, "step");
    }
    fn step_finished(&mut self, index: usize, record: &FinishedStep) {
        if let Some(pb) = self.bars.pb.take() {
            pb.finish_and_clear();
        }
        self.reporter = None;
        eprintln!("step {}: {} ({:.0} s)", index + 1, record.bundle, record.seconds);
    }
    fn ptq(&mut self) -> &mut dyn Progress {
        &mut self.bars
    }
    fn qat(&mut self, step: &QatStep) -> &mut dyn QatObserver {
        self.reporter
            .insert(Reporter::new(step.zeroth_order, None).expect("a reporter without TensorBoard"))
    }
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let recipe = oqt_core::quant::load_recipe(&a.recipe)?;
    let resolved = oqt_hub::resolve_model(&a.model).with_context(|| format!("resolving model `{}`", a.model))?;
    let output = a.output.clone().unwrap_or_else(|| {
        let stem = a.model.replace(['/', '\\'], "_");
        PathBuf::from("exports").join(format!("{stem}-{}.oqt", recipe.name))
    });
    let method = recipe.default_method.parse::<Method>().unwrap_or(Method::Rtn);
    let mut observer = Observer {
        bars: Bars {
            label: method.to_string(),
            pb: None,
        },
        reporter: None,
    };
    let job = PipelineJob {
        recipe: &recipe,
        model_path: &resolved.path,
        model_label: &a.model,
        output: &output,
        run_dir: a
            .run_dir
            .clone()
            .unwrap_or_else(|| oqt_pipeline::default_run_dir(&output)),
        resume: a.resume,
        stop_after: a.stop_after,
        created_by: concat!("oqt ", env!("CARGO_PKG_VERSION")),
    };
    let t0 = std::time::Instant::now();
    let report = oqt_pipeline::run(&job, &mut observer)?;
    drop(observer);
    if a.json {
        return print_json(&serde_json::json!({
            "recipe": recipe.name,
            "report": report,
            "wall_s": t0.elapsed().as_secs_f64(),
            "peak_rss_mib": oqt_core::sys::peak_rss_mib(),
        }));
    }
    match &report.output {
        Some(out) => println!(
            "wrote {} ({} steps, {:.0} s)",
            out.display(),
            report.steps.len(),
            t0.elapsed().as_secs_f64()
        ),
        None => println!(
            "stopped after {} step(s); continue with `oqt run {} {} --resume` (run directory {})",
            report.steps.len(),
            a.recipe,
            a.model,
            report.run_dir.display()
        ),
    }
    Ok(())
}
