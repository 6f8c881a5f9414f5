use super::load;
use crate::output::{mib, print_json};
use anyhow::{Context, bail};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// Recipe name (w4a8, w8a8, w4a8-dyn, w4a16, w4a16-g128, w8a16) or a recipe file.
    #[arg(long)]
    pub recipe: String,
    /// Method; defaults to the recipe's. Available today: rtn.
    #[arg(long)]
    pub method: Option<String>,
    /// Search each row's clip ratio for the lowest weight MSE.
    #[arg(long)]
    pub clip_search: bool,
    /// Calibration dataset (a training-role name or a text file) instead of the recipe's.
    #[arg(long, value_name = "DATASET")]
    pub calib_data: Option<String>,
    /// Number of calibration windows instead of the recipe's.
    #[arg(long, value_name = "N")]
    pub calib_samples: Option<usize>,
    /// Tokens per calibration window instead of the recipe's.
    #[arg(long, value_name = "N")]
    pub calib_seq_len: Option<usize>,
    /// How static activation ranges are taken: `minmax` or `percentile` (instead of the recipe's).
    #[arg(long, value_name = "RULE")]
    pub act_range: Option<oqt_core::quant::ActRange>,
    /// The percentile kept with `--act-range percentile` (e.g. 99.99).
    #[arg(long)]
    pub percentile: Option<f64>,
    /// Where to write the bundle (default: exports/<model>-<recipe>.oqt).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let recipe = oqt_core::quant::load_recipe(&a.recipe)?;
    let method = match &a.method {
        Some(m) if m != "rtn" => bail!("method `{m}` is not available yet; available: rtn"),
        Some(m) => m.clone(),
        None if recipe.default_method != "rtn" => {
            // The recipe's own method lands later; say so loudly rather than refuse the job.
            eprintln!(
                "warning: recipe `{}` defaults to `{}`, which is not available yet; using rtn \
                 (pass --method rtn to silence this)",
                recipe.name, recipe.default_method
            );
            "rtn".to_string()
        }
        None => recipe.default_method.clone(),
    };
    let start = std::time::Instant::now();
    let model = load(&a.model)?;
    let output = a.output.clone().unwrap_or_else(|| {
        let stem = a.model.replace(['/', '\\'], "_");
        PathBuf::from("exports").join(format!("{stem}-{}.oqt", recipe.name))
    });
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut calibration = recipe.calibration.clone();
    if let Some(d) = &a.calib_data {
        calibration.dataset = d.clone();
    }
    calibration.samples = a.calib_samples.unwrap_or(calibration.samples);
    calibration.seq_len = a.calib_seq_len.unwrap_or(calibration.seq_len);
    calibration.act_range = a.act_range.unwrap_or(calibration.act_range);
    calibration.percentile = a.percentile.unwrap_or(calibration.percentile);
    if !(50.0..=100.0).contains(&calibration.percentile) {
        bail!("--percentile must be in [50, 100]");
    }
    if calibration.samples == 0 || calibration.seq_len < 2 {
        bail!("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2");
    }
    let calibrated = if recipe.spec.activations.mode == oqt_core::quant::ActMode::Static {
        let pb = crate::output::bar(calibration.samples as u64, "calibrating");
        let c = oqt_compress::calibrate::calibrate_model(&model, &recipe.spec, &calibration, |d, _| {
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        tracing::info!(
            sites = c.grids.len(),
            samples = calibration.samples,
            "calibrated activation grids"
        );
        Some(c)
    } else {
        None
    };
    let pb = crate::output::bar(model.weights.len() as u64, "quantizing");
    let opts = oqt_compress::rtn::RtnOptions {
        clip_search: a.clip_search,
    };
    let created_by = format!("oqt {}", env!("CARGO_PKG_VERSION"));
    let writer = oqt_compress::rtn::quantize_rtn(&model, &recipe, opts, calibrated, &created_by, |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    writer
        .write(&output)
        .with_context(|| format!("writing {}", output.display()))?;
    let bytes = std::fs::metadata(&output)?.len();
    let f16 = model.config.n_params() as u64 * 2;
    if a.json {
        return print_json(&serde_json::json!({
            "output": output,
            "recipe": recipe.name,
            "method": method,
            "bytes": bytes,
            "ratio_to_f16": bytes as f64 / f16 as f64,
            "seconds": start.elapsed().as_secs_f64(),
        }));
    }
    println!(
        "{} ({}, {:.3} × f16) in {:.1} s",
        output.display(),
        mib(bytes),
        bytes as f64 / f16 as f64,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
