//! The wgpu backend runs the same model as the CPU backend. Built only with
//! `--features wgpu`; on a machine without a GPU it runs on lavapipe (Debian
//! `mesa-vulkan-drivers`, `CUBECL_WGPU_DEFAULT_DEVICE=Cpu`).
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, Int, Tensor, TensorData};
use oqt_core::testing::{random_weights, tiny_config};
use oqt_model::{DeviceKind, llama_from_weights, select_device};

fn logits(device: &Device) -> Vec<f32> {
    let cfg = tiny_config();
    let m = llama_from_weights(&cfg, random_weights(&cfg, 9), device);
    let ids: Vec<i64> = vec![3, 141, 59, 26, 5, 35, 89, 79];
    let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 8]), device);
    m.forward(t, None)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn wgpu_forward_matches_cpu() {
    let gpu = select_device(DeviceKind::Wgpu, false).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let a = logits(&Device::flex());
    let b = logits(&gpu);
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < 1e-3, "max |Δlogit| cpu vs wgpu = {d}");
}
