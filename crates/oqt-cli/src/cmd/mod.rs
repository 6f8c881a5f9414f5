pub mod bench;
pub mod cluster;
pub mod distill;
pub mod eval;
pub mod eval_recipe;
pub mod export;
pub mod fetch;
pub mod finetune;
pub mod fold;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod prune;
pub mod qat;
pub mod quantize;
pub mod run;
pub mod sensitivity;

use anyhow::Context;
use clap::Args;
use oqt_core::LoadedModel;
use oqt_model::{DeviceKind, Llama};
use std::path::{Path, PathBuf};

/// Calibration options that override a recipe's `[calibration]` (quantize, cluster).
#[derive(Args, Debug, Clone)]
pub struct CalibOverrides {
    /// Calibration dataset (a training-role name or a text file) instead of the recipe's.
    #[arg(long, value_name = "DATASET")]
    pub calib_data: Option<String>,
    /// Number of calibration windows instead of the recipe's.
    #[arg(long, value_name = "N")]
    pub calib_samples: Option<usize>,
    /// Tokens per calibration window instead of the recipe's.
    #[arg(long, value_name = "N")]
    pub calib_seq_len: Option<usize>,
}

impl CalibOverrides {
    /// `c` with the options given on the command line in place of its own.
    pub fn apply(&self, c: &mut oqt_core::quant::CalibrationSpec) {
        if let Some(d) = &self.calib_data {
            c.dataset = d.clone();
        }
        c.samples = self.calib_samples.unwrap_or(c.samples);
        c.seq_len = self.calib_seq_len.unwrap_or(c.seq_len);
    }
}

/// `output`, or `default()` when it is absent, with its folder created.
pub fn output_path(output: Option<&Path>, default: impl FnOnce() -> PathBuf) -> anyhow::Result<PathBuf> {
    let output = output.map_or_else(default, Path::to_path_buf);
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(output)
}

/// `exports/<model>-<name>`: the default output of a command on `model`
/// (its spec with path separators replaced).
pub fn exports_path(model: &str, name: &str) -> PathBuf {
    PathBuf::from("exports").join(format!("{}-{name}", model.replace(['/', '\\'], "_")))
}

/// Where tensor math runs.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu` (Burn Flex) or `wgpu` (needs a build with `--features wgpu` and a GPU or lavapipe).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
}

/// Whether `path` is an oqt bundle (a safetensors file carrying the oqt manifest).
pub fn is_bundle(path: &std::path::Path) -> bool {
    path.is_file() && !matches!(oqt_core::load::detect_format(path), Ok(oqt_core::ModelFormat::Gguf))
}

/// The runtime on an oqt bundle, or on a GGUF file (its Q4_0/Q8_0 blocks run
/// on the integer kernels with llama.cpp's Q8_0 activations); with the model's name.
pub fn load_runtime(path: &std::path::Path) -> anyhow::Result<(oqt_runtime::RuntimeModel, String)> {
    use anyhow::Context;
    if matches!(oqt_core::load::detect_format(path), Ok(oqt_core::ModelFormat::Gguf)) {
        let rt = oqt_runtime::RuntimeModel::from_gguf(path)
            .with_context(|| format!("loading {} into the runtime", path.display()))?;
        let name = oqt_core::gguf::GgufFile::open(path)?
            .opt_str("general.name")?
            .map_or_else(|| path.display().to_string(), str::to_string);
        return Ok((rt, name));
    }
    let bundle = oqt_core::bundle::Bundle::open(path)?;
    let rt = oqt_runtime::RuntimeModel::load(&bundle)?;
    Ok((rt, bundle.manifest.model_name.clone()))
}

/// A runtime model that owns the LoRA adapter it applies to every call (`--adapter`).
pub struct AdaptedRuntime {
    pub model: oqt_runtime::RuntimeModel,
    pub adapter: oqt_core::lora::LoraAdapter,
}

impl AdaptedRuntime {
    /// Read the PEFT adapter in `dir` and check it fits `model`.
    pub fn load(model: oqt_runtime::RuntimeModel, dir: &std::path::Path) -> anyhow::Result<Self> {
        let adapter = oqt_core::lora::LoraAdapter::read_peft(dir)?;
        model.check_adapter(&adapter, &dir.join(oqt_core::lora::PEFT_WEIGHTS_FILE))?;
        Ok(Self { model, adapter })
    }
}

impl oqt_core::scoring::CausalLm for AdaptedRuntime {
    fn score_window(&self, tokens: &[u32], first: usize) -> oqt_core::Result<oqt_core::scoring::WindowScores> {
        self.model.with_adapter(Some(&self.adapter)).score_window(tokens, first)
    }

    fn log_probs(&self, tokens: &[u32]) -> oqt_core::Result<Vec<Vec<f32>>> {
        self.model.with_adapter(Some(&self.adapter)).log_probs(tokens)
    }
}

/// Resolve, fetch if needed, and load a model into float weights.
pub fn load(spec: &str) -> anyhow::Result<LoadedModel> {
    let pb = crate::output::spinner(&format!("resolving {spec}"));
    let resolved = oqt_hub::resolve_model(spec).with_context(|| format!("resolving model `{spec}`"))?;
    tracing::info!(path = %resolved.path.display(), origin = %resolved.origin, "model resolved");
    pb.set_message(format!("loading {}", resolved.path.display()));
    let loaded = oqt_core::load_model(&resolved.path).with_context(|| format!("loading model `{spec}`"))?;
    pb.finish_and_clear();
    Ok(loaded)
}

/// Load a model and build it on the chosen device.
pub fn load_burn(spec: &str, dev: &DeviceArgs) -> anyhow::Result<(LoadedModel, Llama)> {
    let device = oqt_model::select_device(dev.device, false)?;
    let mut loaded = load(spec)?;
    let model = oqt_model::llama_from_loaded(&mut loaded, &device);
    Ok((loaded, model))
}

/// Who runs a model for `generate` and `bench`: the f32 Burn model or the
/// integer runtime on a bundle.
pub enum Engine {
    /// The model and its f32 weight bytes.
    Burn(Box<Llama>, usize),
    /// The runtime, with the LoRA adapter it applies (unmerged), if any.
    Runtime(Box<oqt_runtime::RuntimeModel>, Option<Box<oqt_core::lora::LoraAdapter>>),
}

impl Engine {
    /// The runtime on `bundle`, else `model` in f32 on Burn; with its tokenizer.
    pub fn load(
        model: Option<&str>,
        bundle: Option<&std::path::Path>,
        dev: &DeviceArgs,
    ) -> anyhow::Result<(oqt_core::Tokenizer, Self)> {
        match (bundle, model) {
            (Some(b), _) => {
                let (rt, _) = load_runtime(b)?;
                Ok((rt.tokenizer.clone(), Self::Runtime(Box::new(rt), None)))
            }
            (None, Some(m)) => {
                let (loaded, model) = load_burn(m, dev)?;
                let bytes = loaded.config.n_params() * 4;
                Ok((loaded.tokenizer, Self::Burn(Box::new(model), bytes)))
            }
            (None, None) => unreachable!("clap requires a model or --bundle"),
        }
    }

    /// Apply the PEFT adapter in `dir` (runtime engines only).
    pub fn with_adapter(self, dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let Some(dir) = dir else { return Ok(self) };
        match self {
            Self::Runtime(rt, _) => {
                let a = AdaptedRuntime::load(*rt, dir)?;
                Ok(Self::Runtime(Box::new(a.model), Some(Box::new(a.adapter))))
            }
            Self::Burn(..) => anyhow::bail!("--adapter applies to a quantized bundle run by the runtime (--bundle)"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Burn(..) => "burn-f32",
            Self::Runtime(_, None) => "runtime",
            Self::Runtime(_, Some(_)) => "runtime+lora",
        }
    }

    /// Bytes of weights the engine holds for the model (the runtime: as a device stores them).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Burn(_, bytes) => *bytes,
            Self::Runtime(rt, _) => rt.weight_bytes,
        }
    }

    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampling: oqt_core::sampling::SamplingOptions,
        is_stop: impl Fn(u32) -> bool,
        on_token: impl FnMut(u32),
    ) -> oqt_core::Result<oqt_core::generation::GenerationStats> {
        match self {
            Self::Burn(m, _) => oqt_model::generate::generate(m, prompt, max_new, sampling, is_stop, on_token),
            Self::Runtime(rt, adapter) => oqt_runtime::generate::generate_adapted(
                rt,
                adapter.as_deref(),
                prompt,
                max_new,
                sampling,
                is_stop,
                on_token,
            ),
        }
    }
}
