use super::load;
use crate::output::{mib, print_json};
use anyhow::{Context, bail};
use clap::Args;
use indicatif::ProgressBar;
use oqt_compress::ptq::{Method, Progress, PtqOptions};
use oqt_core::quant::Recipe;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// Recipe name (w4a8, w8a8, w4a8-dyn, w4a16, w4a16-g128, w8a16) or a recipe file.
    #[arg(long)]
    pub recipe: String,
    /// mobilequant, rtn, smoothquant, gptq or awq; defaults to the recipe's.
    #[arg(long)]
    pub method: Option<Method>,
    /// Also run these methods (comma-separated, e.g. rtn,smoothquant,gptq,awq) and
    /// compare them in the report; their bundles go next to the output as `<stem>.<method>.oqt`.
    #[arg(long, value_delimiter = ',', value_name = "METHODS")]
    pub compare: Vec<Method>,
    /// RTN: search each row's clip ratio for the lowest weight MSE.
    #[arg(long)]
    pub clip_search: bool,
    #[command(flatten)]
    pub calib: super::CalibOverrides,
    /// How static activation ranges are taken: `minmax`, `percentile` or `search` (instead of the recipe's).
    #[arg(long, value_name = "RULE")]
    pub act_range: Option<oqt_core::quant::ActRange>,
    /// The percentile kept with `--act-range percentile` (e.g. 99.99).
    #[arg(long)]
    pub percentile: Option<f64>,
    /// MobileQuant optimizer steps instead of the recipe's `[mobilequant] steps`.
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// Split the down projection's outlier input channels above RATIO × the
    /// layer's 16th-largest (an exact transformation for static grids; any
    /// method; 0 = off). Default: the recipe's `[mobilequant] split_down_ratio`
    /// for mobilequant, off for the other methods.
    #[arg(long, value_name = "RATIO")]
    pub split_down: Option<f32>,
    /// SmoothQuant's migration strength α (smoothquant, and MobileQuant's initialisation).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// GPTQ's diagonal damping, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// GPTQ: the paper's Hessian `XᵀX` instead of the default over unit-length
    /// token rows (which keeps a few huge-norm tokens from dominating it).
    #[arg(long)]
    pub gptq_raw_hessian: bool,
    /// Mixed precision under a size budget (`87.5MiB`, `5.45bpw`): each
    /// decoder layer's q/k/v, o, gate/up and down weights stay on the recipe's
    /// grid or move to 8-bit per-channel, most sensitive per byte first, while
    /// the bundle fits (instead of the recipe's `[mixed_precision] size_budget`).
    #[arg(long, value_name = "SIZE")]
    pub size_budget: Option<oqt_core::quant::SizeBudget>,
    /// With a size budget: how many linear inputs (the most sensitive) may move
    /// from 8 to 16 bits (A16 layers; instead of the recipe's `max_act16_inputs`).
    #[arg(long, value_name = "N")]
    pub max_act16_inputs: Option<usize>,
    /// Evaluation chunks for the report instead of the recipe's `[eval] chunks`.
    #[arg(long, value_name = "N")]
    pub eval_chunks: Option<usize>,
    /// Skip the evaluation report (just write the bundle).
    #[arg(long)]
    pub no_eval: bool,
    /// Where to write the bundle (default: exports/<model>-<recipe>.oqt).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Where to save the report (default: the output path with `.report.json`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Progress bars for the phases of one method (`label`: its name).
pub struct Bars {
    pub label: String,
    pub pb: Option<ProgressBar>,
}

impl Progress for Bars {
    fn phase(&mut self, name: &str, total: usize) {
        if let Some(pb) = self.pb.take() {
            pb.finish_and_clear();
        }
        tracing::info!(method = %self.label, phase = name, "started");
        self.pb = Some(crate::output::bar(total as u64, &format!("{}: {name}", self.label)));
    }

    fn set(&mut self, done: usize) {
        if let Some(pb) = &self.pb {
            pb.set_position(done as u64);
        }
    }

    fn loss(&mut self, step: usize, steps: usize, loss: f32) {
        if let Some(pb) = &self.pb {
            pb.set_position(step as u64);
            pb.set_message(format!("loss {loss:.4e}"));
        }
        if step == 1 || step == steps || step.is_multiple_of(10) {
            tracing::info!(step, steps, loss, "MobileQuant");
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(pb) = self.pb.take() {
            pb.finish_and_clear();
        }
    }
}

/// One row of the report.
#[derive(Debug, Serialize)]
pub struct ReportRow {
    pub method: String,
    pub bundle: Option<PathBuf>,
    pub perplexity: Option<f64>,
    pub bytes: u64,
    pub bits_per_weight: f64,
    pub quantize_seconds: f64,
    pub eval_seconds: Option<f64>,
    /// MobileQuant's first and last loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<(f32, f32)>,
    /// The mixed-precision plan (size-budget recipes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<oqt_compress::ptq::mixed_precision::MixedPrecisionPlan>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub recipe: String,
    pub eval: Option<EvalSetting>,
    pub rows: Vec<ReportRow>,
    pub peak_rss_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct EvalSetting {
    pub dataset: String,
    pub ctx: usize,
    pub chunks: usize,
}

fn default_method(recipe: &Recipe) -> anyhow::Result<Method> {
    recipe
        .default_method
        .parse::<Method>()
        .map_err(|e| anyhow::anyhow!("recipe `{}`: default_method: {e}", recipe.name))
}

fn options(a: &QuantizeArgs, recipe: &Recipe) -> anyhow::Result<PtqOptions> {
    let mut o = PtqOptions::for_recipe(recipe);
    let c = &mut o.calibration;
    a.calib.apply(c);
    c.act_range = a.act_range.unwrap_or(c.act_range);
    c.percentile = a.percentile.unwrap_or(c.percentile);
    if !(50.0..=100.0).contains(&c.percentile) {
        bail!("--percentile must be in [50, 100]");
    }
    if c.samples == 0 || c.seq_len < 2 {
        bail!("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2");
    }
    o.rtn.clip_search = a.clip_search;
    if !(a.damp >= 0.0 && a.damp.is_finite()) {
        bail!("--damp must be a non-negative number");
    }
    o.gptq.damp_percent = a.damp;
    o.gptq.unit_token_rows = !a.gptq_raw_hessian;
    if let Some(s) = a.steps {
        o.mobilequant.steps = s;
    }
    if let Some(r) = a.split_down {
        if !(r == 0.0 || r >= 1.0) || !r.is_finite() {
            bail!("--split-down must be 0 (off) or a ratio ≥ 1, found {r}");
        }
        o.split_down_ratio = Some(r);
    }
    if let Some(alpha) = a.alpha {
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--alpha must be in [0, 1]");
        }
        o.smooth_alpha = alpha;
    }
    Ok(o)
}

/// `exports/x.oqt` → `exports/x.gptq.oqt`.
fn sibling(output: &Path, method: Method) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!("{stem}.{method}.oqt"))
}

/// Perplexity of `lm` on the recipe's evaluation set.
fn evaluate(
    lm: &dyn oqt_core::scoring::CausalLm,
    tokens: &[u32],
    bos: Option<u32>,
    setting: &EvalSetting,
    what: &str,
) -> anyhow::Result<oqt_eval::PerplexityReport> {
    let opts = oqt_eval::PerplexityOptions {
        ctx: setting.ctx,
        max_chunks: Some(setting.chunks),
        bos,
    };
    let pb = crate::output::bar(setting.chunks as u64, &format!("evaluating {what}"));
    let r = oqt_eval::perplexity(lm, tokens, &opts, |p| {
        pb.set_position(p.chunk as u64);
        pb.set_message(format!("ppl {:.4}", p.running_perplexity));
    })?;
    pb.finish_and_clear();
    Ok(r)
}

/// `--size-budget` / `--max-act16-inputs` written into the recipe's `[mixed_precision]`.
fn with_budget(mut recipe: Recipe, a: &QuantizeArgs) -> anyhow::Result<Recipe> {
    if let Some(budget) = a.size_budget {
        match &mut recipe.mixed_precision {
            Some(mp) => mp.size_budget = budget,
            None => {
                recipe.mixed_precision = Some(oqt_core::quant::MixedPrecisionSpec::with_budget(budget));
            }
        }
    }
    if let Some(n) = a.max_act16_inputs {
        let Some(mp) = &mut recipe.mixed_precision else {
            bail!(
                "--max-act16-inputs chooses inputs under a size budget: give --size-budget too (recipe `{}` has none)",
                recipe.name
            );
        };
        if n > 0 && recipe.spec.activations.mode != oqt_core::quant::ActMode::Static {
            bail!(
                "--max-act16-inputs: recipe `{}` has no static 8-bit inputs to widen",
                recipe.name
            );
        }
        mp.max_act16_inputs = n;
    }
    Ok(recipe)
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let recipe = with_budget(oqt_core::quant::load_recipe(&a.recipe)?, &a)?;
    // A pipeline recipe's later steps would be silently skipped here.
    if recipe
        .steps
        .iter()
        .any(|s| !matches!(s, oqt_core::quant::Step::Quantize(_)))
    {
        let kinds: Vec<_> = recipe.steps.iter().map(|s| s.kind()).collect();
        bail!(
            "recipe `{}` is a pipeline of {} steps ({}): run it with `oqt run {} {}`",
            recipe.name,
            kinds.len(),
            kinds.join(", "),
            a.recipe,
            a.model
        );
    }
    let method = match a.method {
        Some(m) => m,
        None => default_method(&recipe)?,
    };
    let opts = options(&a, &recipe)?;
    let model = load(&a.model)?;
    let output = super::output_path(a.output.as_deref(), || {
        super::exports_path(&a.model, &format!("{}.oqt", recipe.name))
    })?;
    let mut methods = vec![method];
    for m in &a.compare {
        if !methods.contains(m) {
            methods.push(*m);
        }
    }
    let setting = (!a.no_eval).then(|| EvalSetting {
        dataset: recipe.eval.dataset.clone(),
        ctx: recipe.eval.ctx,
        chunks: a.eval_chunks.unwrap_or(recipe.eval.chunks),
    });
    let f16_bytes = model.config.n_params() as f64 * 2.0;
    let n_params = model.config.n_params() as f64;
    let created_by = format!("oqt {}", env!("CARGO_PKG_VERSION"));

    let mut rows = Vec::new();
    for (i, &m) in methods.iter().enumerate() {
        let path = if i == 0 { output.clone() } else { sibling(&output, m) };
        let start = std::time::Instant::now();
        let outcome = {
            let mut bars = Bars {
                label: m.to_string(),
                pb: None,
            };
            oqt_compress::ptq::quantize(&model, &recipe, m, &opts, &created_by, &mut bars)
                .with_context(|| format!("quantizing with {m}"))?
        };
        outcome
            .writer
            .write(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        let seconds = start.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&path)?.len();
        tracing::info!(method = %m, path = %path.display(), seconds, "bundle written");
        rows.push(ReportRow {
            method: m.to_string(),
            bundle: Some(path),
            perplexity: None,
            bytes,
            bits_per_weight: bytes as f64 * 8.0 / n_params,
            quantize_seconds: seconds,
            eval_seconds: None,
            loss: outcome.losses.first().zip(outcome.losses.last()).map(|(a, b)| (*a, *b)),
            mixed_precision: outcome.mixed_precision,
        });
    }

    let mut report = Report {
        model: model.name.clone(),
        recipe: recipe.name.clone(),
        eval: None,
        rows: Vec::new(),
        peak_rss_mib: None,
    };
    if let Some(setting) = setting {
        let (_, tokens) = super::eval::dataset_tokens(&model.tokenizer, &setting.dataset)?;
        let bos = model.tokenizer.document_bos();
        let mut float_row = float_report_row(f16_bytes, n_params);
        {
            let device = oqt_model::select_device(oqt_model::DeviceKind::Cpu, false)?;
            let llama = oqt_model::llama_from_weights(&model.config, model.weights.clone(), &device);
            let r = evaluate(&llama, &tokens, bos, &setting, "f32")?;
            float_row.perplexity = Some(r.perplexity);
            float_row.eval_seconds = Some(r.seconds);
        }
        report.rows.push(float_row);
        for row in &mut rows {
            let path = row.bundle.as_ref().expect("written");
            let rt = oqt_runtime::RuntimeModel::load(&oqt_core::bundle::Bundle::open(path)?)?;
            let r = evaluate(&rt, &tokens, bos, &setting, &row.method)?;
            row.perplexity = Some(r.perplexity);
            row.eval_seconds = Some(r.seconds);
        }
        report.eval = Some(setting);
    }
    report.rows.extend(rows);
    report.peak_rss_mib = oqt_core::sys::peak_rss_mib();
    let report_path = a.report.clone().unwrap_or_else(|| output.with_extension("report.json"));
    crate::output::write_json_atomic(&report_path, &report)?;
    if a.json {
        return print_json(&report);
    }
    print_table(&report, f16_bytes);
    for r in &report.rows {
        if let Some(plan) = &r.mixed_precision {
            print_plan(&r.method, plan);
        }
    }
    println!("report: {}", report_path.display());
    Ok(())
}

fn float_report_row(f16_bytes: f64, n_params: f64) -> ReportRow {
    ReportRow {
        method: "f16 (reference, evaluated in f32)".into(),
        bundle: None,
        perplexity: None,
        bytes: f16_bytes as u64,
        bits_per_weight: f16_bytes * 8.0 / n_params,
        quantize_seconds: 0.0,
        eval_seconds: None,
        loss: None,
        mixed_precision: None,
    }
}

fn print_table(report: &Report, f16_bytes: f64) {
    if let Some(e) = &report.eval {
        println!(
            "{} · {} · {} (ctx {}, first {} chunks)",
            report.model, report.recipe, e.dataset, e.ctx, e.chunks
        );
    } else {
        println!("{} · {}", report.model, report.recipe);
    }
    let float_ppl = report
        .rows
        .iter()
        .find(|r| r.bundle.is_none())
        .and_then(|r| r.perplexity);
    println!(
        "{:<34} {:>11} {:>8} {:>10} {:>7} {:>6} {:>10}",
        "method", "perplexity", "vs f32", "size", "× f16", "bits/w", "time"
    );
    for r in &report.rows {
        let ppl = r.perplexity.map_or("-".into(), |p| format!("{p:.4}"));
        let rel = match (r.perplexity, float_ppl) {
            (Some(p), Some(f)) if r.bundle.is_some() => format!("{:+.1}%", 100.0 * (p / f - 1.0)),
            _ => "".into(),
        };
        let time = if r.bundle.is_some() {
            format!("{:.1} s", r.quantize_seconds)
        } else {
            "".into()
        };
        println!(
            "{:<34} {:>11} {:>8} {:>10} {:>7.3} {:>6.2} {:>10}",
            r.method,
            ppl,
            rel,
            mib(r.bytes),
            r.bytes as f64 / f16_bytes,
            r.bits_per_weight,
            time
        );
    }
    if let Some(p) = report.peak_rss_mib {
        println!("peak RSS {p:.0} MiB");
    }
}

/// The plan as a table: one row per decoder layer, one column per unit;
/// `4`/`8` the weight grid's bits, `+a16` a 16-bit input.
fn print_plan(method: &str, plan: &oqt_compress::ptq::mixed_precision::MixedPrecisionPlan) {
    use oqt_compress::stats::sensitivity::LinearUnit;
    println!(
        "{method}: mixed precision under {} — {} of {} units' weights on {}-bit per-channel, {} inputs at 16 bits; tensors {} (all narrow {}) + {} reserved of {}",
        plan.budget,
        plan.wide_count(),
        plan.units.len(),
        plan.wide_weights.bits,
        plan.act16_count(),
        mib(plan.planned_bytes),
        mib(plan.base_bytes),
        mib(plan.reserved_bytes),
        mib(plan.budget_bytes),
    );
    print!("{:>5}", "layer");
    for u in LinearUnit::ALL {
        print!(" {:>12}", u.label());
    }
    println!();
    let layers = plan.units.iter().map(|u| u.layer + 1).max().unwrap_or(0);
    for layer in 0..layers {
        print!("{layer:>5}");
        for unit in LinearUnit::ALL {
            let cell = plan
                .units
                .iter()
                .find(|u| u.layer == layer && u.unit == unit)
                .map_or("-".to_string(), |u| {
                    let bits = if u.wide_weights {
                        &plan.wide_weights
                    } else {
                        &plan.narrow_weights
                    }
                    .bits;
                    format!("w{bits}{}", if u.act16_input { " a16" } else { "" })
                });
            print!(" {cell:>12}");
        }
        println!();
    }
}
