pub mod bench;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod quantize;

use anyhow::Context;
use clap::Args;
use oqt_core::LoadedModel;
use oqt_model::{DeviceKind, Llama};

/// Where tensor math runs.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu` (Burn Flex) or `wgpu` (needs a build with `--features wgpu` and a GPU or lavapipe).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
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
