//! GGUF for llama.cpp: `llama` architecture metadata, the tokenizer, tensors
//! under llama.cpp's names with Q/K rows in its rotary order, each tensor in a
//! ggml type chosen by the options — and, for a bundle, its integers written
//! unchanged whenever a ggml type holds that grid exactly (a `gguf-*` recipe's
//! always does).

use crate::{ExportSource, SourceTensor, reorder_rows};
use oqt_core::gguf::encode::{encode_exact, quantize_ggml};
use oqt_core::gguf::{GgmlType, GgufTensorOut, GgufWriter, MetaValue};
use oqt_core::load::gguf_tensor_name;
use oqt_core::quant::{ActMode, QuantizedWeight};
use oqt_core::tokenizer_gguf::gguf_tokenizer_metadata;
use oqt_core::weights::{names, rotary_gguf_order};
use oqt_core::{CoreError, Result};
use regex::Regex;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The ggml types `--type` accepts, by llama.cpp's lower-case names.
pub const TYPE_NAMES: [(&str, GgmlType); 5] = [
    ("f32", GgmlType::F32),
    ("f16", GgmlType::F16),
    ("q8_0", GgmlType::Q8_0),
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
];

pub fn parse_type(name: &str) -> std::result::Result<GgmlType, String> {
    TYPE_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            format!(
                "unknown GGUF tensor type `{name}`; oqt writes {}",
                TYPE_NAMES.map(|(n, _)| n).join(", ")
            )
        })
}

/// `PATTERN=TYPE`, like llama-quantize's `--tensor-type`: a regular expression
/// over GGUF tensor names (`blk\.\d+\.ffn_down`, `token_embd`, …).
#[derive(Debug, Clone)]
pub struct TypeOverride {
    pub pattern: Regex,
    pub ty: GgmlType,
}

impl std::str::FromStr for TypeOverride {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (pattern, ty) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("`{s}`: expected PATTERN=TYPE, e.g. `ffn_down=q8_0`"))?;
        let pattern = Regex::new(pattern).map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))?;
        Ok(Self {
            pattern,
            ty: parse_type(ty)?,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct GgufOptions {
    /// Type of every 2-D tensor; `None` ("auto"): a bundle's integer weights in
    /// the type that holds their grid exactly, float weights in F16.
    pub default_type: Option<GgmlType>,
    /// First match wins; 1-D tensors (norms, biases) are always F32.
    pub overrides: Vec<TypeOverride>,
    /// Re-round integer weights whose grid the chosen type cannot hold (lossy)
    /// instead of refusing.
    pub allow_requantize: bool,
}

/// How a tensor's values reached the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// Every value as oqt computed with it (bundle integers, or f32 values in F32).
    Exact,
    /// Float weights quantized with ggml's reference quantizer.
    Quantized,
    /// Integer weights re-rounded onto another grid (lossy; `--allow-requantize`).
    Requantized,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: &'static str,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub encoding: Encoding,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GgufReport {
    pub path: PathBuf,
    pub file_type: &'static str,
    pub bytes: u64,
    pub tensors: Vec<TensorReport>,
    /// Things the user should know (e.g. activation arithmetic llama.cpp does differently).
    pub notes: Vec<String>,
}

impl GgufReport {
    pub fn count(&self, e: Encoding) -> usize {
        self.tensors.iter().filter(|t| t.encoding == e).count()
    }
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) of a file whose block weights are `ty`.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        GgmlType::Q4K => 15,
        GgmlType::Q6K => 18,
    }
}

/// The type whose grid a bundle weight may already be on.
fn natural_type(q: &QuantizedWeight) -> Option<GgmlType> {
    oqt_core::encoding::natural_gguf_type(&q.spec)
}

fn unsupported(path: &Path, what: &'static str, detail: String) -> CoreError {
    CoreError::Unsupported {
        path: path.into(),
        what,
        detail,
    }
}

/// The converter's tensor order: token_embd, blocks in order, output_norm, output.
fn tensor_order(canonical: &str) -> (usize, String) {
    match canonical {
        names::EMBED => (0, String::new()),
        names::FINAL_NORM => (2, String::new()),
        names::LM_HEAD => (3, String::new()),
        n => {
            let layer = n
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            (1, format!("{layer:08}{n}"))
        }
    }
}

/// The GGUF type of tensor `name`: f32 for vectors; else the first matching
/// `--type-override`, the `--type` default (Q8_0 for a float embedding or head
/// under a 4-bit default, as llama-quantize does), f16 for float weights, or
/// the grid a quantized weight already sits on.
fn choose_type(
    src: &ExportSource,
    opts: &GgufOptions,
    canonical: &str,
    name: &str,
    t: &SourceTensor,
) -> Result<GgmlType> {
    if t.shape().len() != 2 {
        return Ok(GgmlType::F32);
    }
    if let Some(o) = opts.overrides.iter().find(|o| o.pattern.is_match(name)) {
        return Ok(o.ty);
    }
    let four_bit = |t: GgmlType| matches!(t, GgmlType::Q4_0 | GgmlType::Q4_1);
    let embed_or_head = matches!(canonical, names::EMBED | names::LM_HEAD);
    Ok(match (opts.default_type, t) {
        (Some(ty), SourceTensor::Float(_)) if four_bit(ty) && embed_or_head => GgmlType::Q8_0,
        (Some(ty), _) => ty,
        (None, SourceTensor::Float(_)) => GgmlType::F16,
        (None, SourceTensor::Quantized(q)) => natural_type(q).ok_or_else(|| {
            unsupported(
                &src.path,
                "tensor type",
                format!(
                    "tensor `{name}` holds {}-bit integers, which no GGUF type oqt writes can hold \
                     (Q8_0, Q4_0, Q4_1); pass `--type q4_0 --allow-requantize` to re-round it",
                    q.spec.bits
                ),
            )
        })?,
    })
}

/// Tensor `name`'s bytes as `ty`, and whether they hold its values exactly.
fn encode_tensor(
    src: &ExportSource,
    opts: &GgufOptions,
    name: &str,
    t: &SourceTensor,
    ty: GgmlType,
) -> Result<(Vec<u8>, Encoding)> {
    let as_type_error = |e: String| {
        unsupported(
            &src.path,
            "tensor type",
            format!("tensor `{name}` as {}: {e}", ty.name()),
        )
    };
    match t {
        SourceTensor::Float(f) => {
            let shape = t.shape();
            let cols = if shape.len() == 2 { shape[1] } else { shape[0] };
            let data = quantize_ggml(&f.data, f.data.len() / cols, cols, ty).map_err(as_type_error)?;
            let encoding = if ty == GgmlType::F32 {
                Encoding::Exact
            } else {
                Encoding::Quantized
            };
            Ok((data, encoding))
        }
        SourceTensor::Quantized(q) => match encode_exact(q, ty) {
            Ok(data) => Ok((data, Encoding::Exact)),
            Err(why) if opts.allow_requantize => {
                tracing::warn!(tensor = %name, ty = ty.name(), %why, "re-rounding (lossy)");
                let data = quantize_ggml(&t.values(), q.rows, q.cols, ty).map_err(as_type_error)?;
                Ok((data, Encoding::Requantized))
            }
            Err(why) => Err(unsupported(
                &src.path,
                "tensor type",
                format!(
                    "tensor `{name}` cannot be written as {} without changing it: {why}. \
                     Quantize with `--recipe gguf-q4_0` (or gguf-q8_0) for a lossless export, \
                     or pass `--allow-requantize` to re-round it",
                    ty.name()
                ),
            )),
        },
    }
}

/// Choose each tensor's type, encode it, and write the file atomically.
pub fn export_gguf(src: &ExportSource, opts: &GgufOptions, out: &Path) -> Result<GgufReport> {
    let cfg = &src.config;
    if cfg.attention_bias {
        return Err(unsupported(
            &src.path,
            "architecture",
            "q/k/v biases (Qwen2-style) need GGUF's `qwen2` architecture, which oqt does not write yet; \
             it writes `llama`"
                .into(),
        ));
    }
    let mut reports = Vec::new();
    let mut block_types = Vec::new();
    let mut names: Vec<&String> = src.tensors.keys().collect();
    names.sort_by_key(|n| tensor_order(n));
    let mut encoded: Vec<GgufTensorOut> = Vec::new();
    for canonical in names {
        let Some(name) = gguf_tensor_name(canonical) else {
            return Err(unsupported(
                &src.path,
                "tensor",
                format!("`{canonical}` has no llama.cpp GGUF name"),
            ));
        };
        let mut t = src.tensors[canonical].clone();
        if let Some(h) = cfg.rotary_heads(canonical) {
            t = reorder_rows(&t, &rotary_gguf_order(h * cfg.head_dim, h));
        }
        let dims: Vec<u64> = t.shape().iter().rev().map(|&d| d as u64).collect();
        let ty = choose_type(src, opts, canonical, &name, &t)?;
        let (data, encoding) = encode_tensor(src, opts, &name, &t, ty)?;
        if dims.len() == 2 && canonical.starts_with("model.layers.") {
            block_types.push(ty);
        }
        reports.push(TensorReport {
            name: name.clone(),
            ty: ty.name(),
            dims: dims.clone(),
            encoding,
            bytes: data.len(),
        });
        encoded.push(GgufTensorOut { name, dims, ty, data });
    }
    if let Some(factors) = rope_freq_factors(cfg) {
        let data: Vec<u8> = factors.iter().flat_map(|&f| (f as f32).to_le_bytes()).collect();
        let dims = vec![factors.len() as u64];
        reports.push(TensorReport {
            name: "rope_freqs.weight".into(),
            ty: "F32",
            dims: dims.clone(),
            encoding: Encoding::Exact,
            bytes: data.len(),
        });
        encoded.insert(
            1,
            GgufTensorOut {
                name: "rope_freqs.weight".into(),
                dims,
                ty: GgmlType::F32,
                data,
            },
        );
    }

    // The most common type of the block weights names the file, as llama-quantize's ftype does.
    let main_type = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::F32,
    ]
    .into_iter()
    .max_by_key(|t| block_types.iter().filter(|b| *b == t).count())
    .unwrap_or(GgmlType::F32);
    let mut writer = GgufWriter::new();
    write_metadata(&mut writer, src, main_type)?;
    if encoded.iter().any(|t| !matches!(t.ty, GgmlType::F32 | GgmlType::F16)) {
        writer.meta("general.quantization_version", MetaValue::U32(2));
    }
    for t in encoded {
        writer.tensor(t)?;
    }
    writer.write(out)?;

    let notes = export_notes(src, &reports);
    let bytes = std::fs::metadata(out).map_err(|e| CoreError::io(out, e))?.len();
    Ok(GgufReport {
        path: out.into(),
        file_type: main_type.name(),
        bytes,
        tensors: reports,
        notes,
    })
}

/// The general, model and tokenizer metadata llama.cpp reads.
fn write_metadata(writer: &mut GgufWriter, src: &ExportSource, main_type: GgmlType) -> Result<()> {
    writer
        .meta("general.architecture", MetaValue::String("llama".into()))
        .meta("general.type", MetaValue::String("model".into()))
        .meta("general.name", MetaValue::String(src.name.clone()))
        .meta("general.file_type", MetaValue::U32(file_type(main_type)));
    for (k, v) in src.config.gguf_metadata() {
        writer.meta(&k, v);
    }
    let tokenizer_meta = gguf_tokenizer_metadata(&src.tokenizer).map_err(|e| match e {
        CoreError::Unsupported { what, detail, .. } => unsupported(&src.path, what, detail),
        other => other,
    })?;
    for (k, v) in tokenizer_meta {
        writer.meta(&k, v);
    }
    Ok(())
}

/// What the user should know about the file: activation arithmetic llama.cpp
/// does differently, and lossy re-rounding.
fn export_notes(src: &ExportSource, reports: &[TensorReport]) -> Vec<String> {
    let mut notes = Vec::new();
    match src.activations {
        Some(ActMode::LlamaCppQ8_0) | None => {}
        Some(mode) => notes.push(format!(
            "the bundle quantizes activations as `{}`; llama.cpp quantizes the input of \
             every quantized matmul to Q8_0 blocks instead, so its results differ slightly from \
             oqt's simulation (a gguf-* recipe simulates exactly what llama.cpp does)",
            serde_json::to_value(mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        )),
    }
    if !src.palettized.is_empty() {
        notes.push(format!(
            "{} palettized (LUT) tensors were dequantized, as no GGUF type holds a palette: \
             F16 (the default) holds their f16 table values exactly, at 16 bits a weight, larger \
             than the bundle; any other type re-rounds them (lossy)",
            src.palettized.len()
        ));
    }
    let requantized = reports.iter().filter(|t| t.encoding == Encoding::Requantized).count();
    if requantized > 0 {
        notes.push(format!(
            "{requantized} tensors were re-rounded onto a different grid (lossy)"
        ));
    }
    notes
}

/// llama.cpp's `rope_freqs.weight`: per rotary pair, the divisor of its base frequency.
fn rope_freq_factors(cfg: &oqt_core::LlamaConfig) -> Option<Vec<f64>> {
    if let Some(f) = &cfg.rope_freq_factors {
        return Some(f.clone());
    }
    cfg.rope_scaling.as_ref()?;
    let scaled = cfg.rope_inv_freq();
    Some(
        scaled
            .iter()
            .enumerate()
            .map(|(i, s)| cfg.rope_theta.powf(-((2 * i) as f64) / cfg.head_dim as f64) / s)
            .collect(),
    )
}
