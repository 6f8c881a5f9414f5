//! Backend selection at run time (Burn 0.22 chooses the backend through the `Device`).

use burn::tensor::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Burn's pure-Rust Flex backend (SIMD + rayon).
    Cpu,
    /// wgpu: Vulkan, Metal or DX12; needs the `wgpu` cargo feature.
    Wgpu,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "flex" => Ok(Self::Cpu),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            other => Err(format!("unknown device {other:?}; expected `cpu` or `wgpu`")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("this oqt was built without the `wgpu` feature; rebuild with `cargo build --features wgpu`")]
    WgpuNotBuilt,
    #[error(
        "no wgpu adapter is available: {0}. On a machine without a GPU install a software Vulkan driver (Debian: mesa-vulkan-drivers) or use --device cpu"
    )]
    NoAdapter(String),
}

/// The device for `kind`, with autodiff enabled when training needs gradients.
pub fn select_device(kind: DeviceKind, autodiff: bool) -> Result<Device, DeviceError> {
    let device = match kind {
        DeviceKind::Cpu => Device::flex(),
        DeviceKind::Wgpu => wgpu_device()?,
    };
    Ok(if autodiff { device.autodiff() } else { device })
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, DeviceError> {
    // wgpu initialization panics when no adapter exists; turn that into an error.
    let probe = std::panic::catch_unwind(|| {
        let d = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        let t = burn::tensor::Tensor::<1>::from_floats([1.0f32, 2.0], &d);
        let _ = t.sum().into_data();
        d
    });
    probe.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "adapter initialization panicked".into());
        DeviceError::NoAdapter(msg)
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, DeviceError> {
    Err(DeviceError::WgpuNotBuilt)
}
