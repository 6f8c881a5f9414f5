use super::load;
use crate::output::print_json;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SensitivityArgs {
    /// Model alias, GGUF file, HF directory or hub id.
    pub model: String,
    /// Recipe whose weight grids and activation quantization are applied one layer at a time.
    #[arg(long)]
    pub recipe: String,
    /// Calibration windows (from the recipe's calibration set).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub calib_seq_len: usize,
    /// Per unit instead of per layer: each layer's q/k/v, o, gate/up and down
    /// weights alone on the recipe's grid, and (static recipes) their 8-bit
    /// inputs alone — what `--size-budget` plans mixed precision from.
    #[arg(long)]
    pub units: bool,
    /// Where to save the report (JSON); default `exports/<model>-<recipe>.sensitivity.json`.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SensitivityArgs) -> anyhow::Result<()> {
    let recipe = oqt_core::quant::load_recipe(&a.recipe)?;
    if a.calib_samples == 0 || a.calib_seq_len < 2 {
        anyhow::bail!("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2");
    }
    let model = load(&a.model)?;
    let mut calibration = recipe.calibration.clone();
    calibration.samples = a.calib_samples;
    calibration.seq_len = a.calib_seq_len;
    let (_, windows) = oqt_compress::stats::calibrate::load_windows(&model.tokenizer, &calibration)?;
    if a.units {
        return run_units(&a, &recipe, &model, &calibration, &windows);
    }
    let pb = crate::output::bar(model.config.num_layers as u64, "layer sensitivity");
    let layers = oqt_compress::stats::sensitivity::layer_sensitivity(
        &model.config,
        &model.weights,
        &recipe.spec,
        &calibration,
        &windows,
        |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    let report = report(
        &model,
        &recipe,
        &calibration,
        "relative MSE of the last decoder layer's output with only this layer quantized",
        ("layers", serde_json::to_value(&layers)?),
    );
    let output = save(&a, &recipe.name, &report)?;
    if a.json {
        return print_json(&report);
    }
    println!("{} · {} · one layer quantized at a time", model.name, recipe.name);
    println!("{:>5} {:>14} {:>16}  ", "layer", "rel. MSE", "weights only");
    let worst = layers.iter().map(|l| l.relative_mse).fold(0f64, f64::max).max(1e-30);
    for l in &layers {
        let bar = "#".repeat(((l.relative_mse / worst) * 30.0).round() as usize);
        println!(
            "{:>5} {:>14.4e} {:>16.4e}  {bar}",
            l.layer, l.relative_mse, l.weights_only_relative_mse
        );
    }
    println!("report: {}", output.display());
    Ok(())
}

/// The report: what was measured on what, and the results under `key`.
fn report(
    model: &oqt_core::LoadedModel,
    recipe: &oqt_core::quant::Recipe,
    calibration: &oqt_core::quant::CalibrationSpec,
    metric: &str,
    (key, results): (&str, serde_json::Value),
) -> serde_json::Value {
    let mut report = serde_json::json!({
        "model": model.name,
        "recipe": recipe.name,
        "calibration": {"dataset": calibration.dataset, "samples": calibration.samples, "seq_len": calibration.seq_len},
        "metric": metric,
    });
    report[key] = results;
    report
}

/// Write the report where `--output` says (default under `exports/`).
fn save(a: &SensitivityArgs, recipe: &str, report: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let kind = if a.units { "units" } else { "sensitivity" };
    let output = super::output_path(a.output.as_deref(), || {
        super::exports_path(&a.model, &format!("{recipe}.{kind}.json"))
    })?;
    crate::output::write_json_atomic(&output, report)?;
    Ok(output)
}

fn run_units(
    a: &SensitivityArgs,
    recipe: &oqt_core::quant::Recipe,
    model: &oqt_core::LoadedModel,
    calibration: &oqt_core::quant::CalibrationSpec,
    windows: &[Vec<u32>],
) -> anyhow::Result<()> {
    use oqt_compress::stats::sensitivity::{LinearUnit, unit_sensitivity};
    let total = model.config.num_layers * LinearUnit::ALL.len();
    let pb = crate::output::bar(total as u64, "unit sensitivity");
    let units = unit_sensitivity(
        &model.config,
        &model.weights,
        &recipe.spec,
        calibration,
        windows,
        |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    let report = report(
        model,
        recipe,
        calibration,
        "relative MSE of the final-normed hidden state with only this unit's weights (or only its 8-bit input) quantized",
        ("units", serde_json::to_value(&units)?),
    );
    let output = save(a, &recipe.name, &report)?;
    if a.json {
        return print_json(&report);
    }
    println!(
        "{} · {} · one unit quantized at a time (weights / 8-bit input)",
        model.name, recipe.name
    );
    print!("{:>5}", "layer");
    for u in LinearUnit::ALL {
        print!(" {:>21}", u.label());
    }
    println!();
    for layer in 0..model.config.num_layers {
        print!("{layer:>5}");
        for unit in LinearUnit::ALL {
            let cell = units
                .iter()
                .find(|s| s.layer == layer && s.unit == unit)
                .map_or("-".into(), |s| {
                    let input = s.input_error.map_or("-".into(), |e| format!("{e:.2e}"));
                    format!("{:.2e} / {input}", s.weights_error)
                });
            print!(" {cell:>21}");
        }
        println!();
    }
    println!("report: {}", output.display());
    Ok(())
}
