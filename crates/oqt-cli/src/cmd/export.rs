//! `oqt export`: a bundle or a model as GGUF (llama.cpp) or a Hugging Face directory.

use crate::output::{mib, print_json};
use anyhow::Context;
use clap::{Args, ValueEnum};
use oqt_export::ExportSource;
use oqt_export::gguf::{Encoding, GgufOptions, TypeOverride, export_gguf, parse_type};
use oqt_export::hf::{HfDtype, export_hf};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// A single .gguf file llama.cpp loads.
    Gguf,
    /// A Hugging Face directory: config.json, model.safetensors, tokenizer files.
    Hf,
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  oqt quantize --recipe gguf-q4_0 smollm2-135m --output m.oqt
  oqt export --format gguf m.oqt --output m.gguf            # lossless: the integers oqt trained
  oqt export --format gguf smollm2-135m --type q8_0 --output m-q8.gguf
  oqt export --format gguf m.oqt --type q4_0 --tensor-type 'ffn_down=q8_0' --output m.gguf
  oqt export --format hf m.oqt --output m-hf/                # dequantized float weights")]
pub struct ExportArgs {
    /// An oqt bundle, or a model (alias, GGUF file, HF directory, hub id).
    pub input: String,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Where to write (a file for gguf, a new directory for hf).
    #[arg(long, short)]
    pub output: PathBuf,
    /// GGUF type of 2-D tensors: auto, f32, f16, q8_0, q4_0, q4_1. `auto`: a
    /// bundle's integers in the type that holds their grid exactly (error if none
    /// does), float weights in f16. 4-bit types keep token_embd/output at q8_0.
    #[arg(long = "type", default_value = "auto")]
    pub ty: String,
    /// Per-tensor type, PATTERN=TYPE (regex over GGUF names), repeatable; first match wins.
    #[arg(long = "tensor-type", value_name = "PATTERN=TYPE")]
    pub tensor_type: Vec<TypeOverride>,
    /// Re-round bundle weights whose grid the chosen type cannot hold (lossy) instead of failing.
    #[arg(long)]
    pub allow_requantize: bool,
    /// Element type of the HF weights (f32 keeps dequantized values exact).
    #[arg(long, default_value = "f32")]
    pub dtype: HfDtype,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let input = PathBuf::from(&a.input);
    let src = if super::is_bundle(&input) {
        let b = oqt_core::bundle::Bundle::open(&input)?;
        ExportSource::from_bundle(&b).with_context(|| format!("reading bundle {}", input.display()))?
    } else {
        ExportSource::from_model(super::load(&a.input)?)
    };
    match a.format {
        Format::Gguf => {
            let default_type = match a.ty.as_str() {
                "auto" => None,
                t => Some(parse_type(t).map_err(anyhow::Error::msg).context("--type")?),
            };
            let opts = GgufOptions {
                default_type,
                overrides: a.tensor_type,
                allow_requantize: a.allow_requantize,
            };
            let pb = crate::output::spinner(&format!("writing {}", a.output.display()));
            let report = export_gguf(&src, &opts, &a.output)?;
            pb.finish_and_clear();
            for n in &report.notes {
                tracing::warn!("{n}");
            }
            if a.json {
                return print_json(&report);
            }
            let mut by_type: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
            for t in &report.tensors {
                let e = by_type.entry(t.ty).or_default();
                e.0 += 1;
                e.1 += t.bytes;
            }
            println!(
                "wrote {} ({}, {} tensors, file type {})",
                report.path.display(),
                mib(report.bytes),
                report.tensors.len(),
                report.file_type
            );
            for (ty, (n, bytes)) in by_type {
                println!("  {ty:>5}: {n:>4} tensors, {}", mib(bytes as u64));
            }
            println!(
                "  values: {} tensors exact, {} quantized from float, {} re-rounded",
                report.count(Encoding::Exact),
                report.count(Encoding::Quantized),
                report.count(Encoding::Requantized)
            );
            for n in &report.notes {
                println!("  note: {n}");
            }
        }
        Format::Hf => {
            let report = export_hf(&src, a.dtype, &a.output)?;
            if a.json {
                return print_json(&report);
            }
            println!(
                "wrote {} ({} tensors, {} of {:?} weights)",
                report.path.display(),
                report.tensors,
                mib(report.bytes),
                report.dtype
            );
        }
    }
    Ok(())
}
