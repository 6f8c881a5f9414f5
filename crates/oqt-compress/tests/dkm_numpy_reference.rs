//! One DKM step on a slice of a real SmolLM2 layer agrees with a numpy
//! implementation written from the paper (`tests/python/dkm_reference.py`):
//! the soft-assigned weights, the updated centroids and both gradients (numpy
//! takes them by finite differences), for the naive and the uniquified form.

use burn::tensor::{Device, Tensor, TensorData};
use oqt_compress::cluster::dkm::{DkmOptions, dkm_naive, dkm_uniquified, uniquify};
use oqt_compress::stats::inputs::to_vec;

fn write_f32(path: &std::path::Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn read_f32(path: std::path::PathBuf) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn one_dkm_step_matches_the_numpy_reference() {
    let model = oqt_core::load_model(&oqt_hub::resolve_model("smollm2-135m").unwrap().path).unwrap();
    let t = model.weights.get("model.layers.3.self_attn.k_proj.weight").unwrap();
    // Two output rows, on f16 values (as eDKM trains them).
    let w: Vec<f32> = t.data[..2 * t.shape[1]]
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let n = w.len();
    // 16 starting centroids at evenly spaced quantiles.
    let mut sorted = w.clone();
    sorted.sort_by(f32::total_cmp);
    let c0: Vec<f32> = (0..16).map(|j| sorted[(2 * j + 1) * n / 32]).collect();
    let g: Vec<f32> = oqt_core::testing::pseudo_random(n, 7, 1.0);
    let opts = DkmOptions {
        tau: 2e-5,
        iterations: 3,
    };

    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    write_f32(&p("w.f32"), &w);
    write_f32(&p("c.f32"), &c0);
    write_f32(&p("g.f32"), &g);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/dkm_reference.py");
    let status = std::process::Command::new("python3")
        .arg(script)
        .args([p("w.f32"), p("c.f32"), p("g.f32")])
        .args([opts.tau.to_string(), opts.iterations.to_string()])
        .arg(p("ref"))
        .status()
        .expect("python3 with numpy runs");
    assert!(status.success(), "dkm_reference.py failed");
    let reference = |ext: &str| read_f32(dir.path().join(format!("ref.{ext}")));
    let (w_hat_ref, c_ref, gw_ref, gc_ref) = (reference("what"), reference("c"), reference("gw"), reference("gc"));

    let device = Device::flex().autodiff();
    let tensor = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    for uniquified in [false, true] {
        let wt = tensor(&w).require_grad();
        let ct = tensor(&c0).require_grad();
        let (w_hat, c) = if uniquified {
            dkm_uniquified(wt.clone(), &uniquify(&w), ct.clone(), &opts)
        } else {
            dkm_naive(wt.clone(), ct.clone(), &opts)
        };
        let grads = (w_hat.clone() * tensor(&g)).sum().backward();
        let got = [
            ("ŵ", to_vec(w_hat.detach()), &w_hat_ref),
            ("centroids", to_vec(c.detach()), &c_ref),
            ("∂L/∂w", to_vec(wt.grad(&grads).unwrap()), &gw_ref),
            ("∂L/∂c", to_vec(ct.grad(&grads).unwrap()), &gc_ref),
        ];
        for (what, ours, theirs) in got {
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = ours
                .iter()
                .zip(theirs.iter())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!(
                "uniquified {uniquified}: {what} within {:.2e} of the largest ({scale:.3e})",
                worst / scale
            );
            // f32 (Burn) against f64 (numpy); gradients against finite differences.
            let tol = if what.starts_with('∂') { 5e-4 } else { 1e-5 };
            assert!(
                worst <= tol * scale,
                "uniquified {uniquified}: {what} off by {worst} (scale {scale})"
            );
        }
    }
}
