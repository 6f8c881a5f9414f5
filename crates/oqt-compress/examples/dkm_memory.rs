//! Peak memory of one DKM training step on SmolLM2's largest decoder linear
//! (a 576 × 1536 down projection, 884,736 weights), naive against eDKM's
//! uniquified form (issue 39). Only that tensor is read (the GGUF is mapped),
//! so the process's peak RSS is the step's:
//!
//!     cargo build --release -p oqt-compress --example dkm_memory
//!     /usr/bin/time -v target/release/examples/dkm_memory naive|unique [K]

use burn::tensor::{Device, Tensor, TensorData};
use oqt_compress::cluster::dkm::{DkmOptions, dkm_naive, dkm_uniquified, uniquify};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("unique");
    let k: usize = args.get(1).map_or(Ok(16), |v| v.parse())?;
    let path = oqt_hub::resolve_model("smollm2-135m")?.path;
    let gguf = oqt_core::gguf::GgufFile::open(&path)?;
    let info = gguf
        .tensor_info("blk.15.ffn_down.weight")
        .ok_or("no blk.15.ffn_down.weight")?;
    // On f16 values, as eDKM trains them.
    let w: Vec<f32> = gguf
        .dequantize(info)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let n = w.len();
    let mut sorted = w.clone();
    sorted.sort_by(f32::total_cmp);
    let c0: Vec<f32> = (0..k).map(|j| sorted[(2 * j + 1) * n / (2 * k)]).collect();
    drop(sorted);
    let g = oqt_core::testing::pseudo_random(n, 3, 1.0);
    let before = oqt_core::sys::peak_rss_mib().unwrap_or(0.0);
    let device = Device::flex().autodiff();
    let tensor = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    let t0 = std::time::Instant::now();
    let wt = tensor(&w).require_grad();
    let ct = tensor(&c0).require_grad();
    let opts = DkmOptions {
        tau: 2e-5,
        iterations: 3,
    };
    let (w_hat, _) = match mode {
        "naive" => dkm_naive(wt.clone(), ct.clone(), &opts),
        "unique" => {
            let uq = uniquify(&w);
            eprintln!("{} distinct values", uq.values.len());
            dkm_uniquified(wt.clone(), &uq, ct.clone(), &opts)
        }
        other => return Err(format!("mode `{other}`: expected naive or unique").into()),
    };
    let grads = (w_hat * tensor(&g)).sum().backward();
    let gw = wt.grad(&grads).ok_or("w untracked")?;
    let gc = ct.grad(&grads).ok_or("c untracked")?;
    let norm = |t: Tensor<1>| t.powi_scalar(2).sum().into_scalar::<f32>().sqrt();
    println!(
        "{mode} K={k}: N={n}, one step in {:.2} s; |∂L/∂w| {:.4e}, |∂L/∂c| {:.4e}; peak RSS before the step {:.1} MiB, after {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        norm(gw),
        norm(gc),
        before,
        oqt_core::sys::peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}
