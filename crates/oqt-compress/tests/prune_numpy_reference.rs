//! Each pruning method on one real SmolLM2 layer agrees with a numpy
//! implementation written from its paper (`tests/python/prune_reference.py`):
//! the same mask and the same pruned (for SparseGPT: reconstructed) weights.

use oqt_compress::prune::dsnot::{DsnotOptions, InputMoments, dsnot_refine};
use oqt_compress::prune::mask::{Pattern, apply_mask, magnitude_scores, mask_from_scores, wanda_scores};
use oqt_compress::prune::sparsegpt::{SparseGptOptions, relative_output_error, sparsegpt_prune};

fn write_f32(path: &std::path::Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

/// numpy's mask and weights for `method` on `pattern` (`0.5`, `2:4`).
fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, method: &str, pattern: &str) -> (Vec<bool>, Vec<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let (wp, xp, out) = (
        dir.path().join("w.f32"),
        dir.path().join("x.f32"),
        dir.path().join("ref"),
    );
    write_f32(&wp, w);
    write_f32(&xp, x);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/prune_reference.py");
    let status = std::process::Command::new("python3")
        .arg(script)
        .args([&wp, &xp])
        .args([rows.to_string(), cols.to_string(), method.into(), pattern.into()])
        .arg(&out)
        .status()
        .expect("python3 with numpy runs");
    assert!(status.success(), "prune_reference.py {method} {pattern} failed");
    let read = |ext: &str| {
        let mut p = out.clone().into_os_string();
        p.push(ext);
        std::fs::read(p).unwrap()
    };
    let keep = read(".keep").into_iter().map(|b| b == 1).collect();
    let wr = read(".w")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (keep, wr)
}

#[test]
fn every_method_on_a_real_layer_matches_the_numpy_reference() {
    let model = oqt_core::load_model(&oqt_hub::resolve_model("smollm2-135m").unwrap().path).unwrap();
    let name = "model.layers.3.self_attn.k_proj.weight";
    let t = model.weights.get(name).unwrap();
    let (rows, cols) = (t.shape[0], t.shape[1]);
    // Fixed calibration inputs: channels of unequal scale, two massive ones and
    // a shared component (so that inputs correlate and have non-zero means).
    let n = 512;
    let z = oqt_core::testing::pseudo_random(n * cols, 41, 1.0);
    let mut x = vec![0f32; n * cols];
    for t_ in 0..n {
        let shared = z[t_ * cols];
        for c in 0..cols {
            let mut v = (z[t_ * cols + c] + 0.5 * shared + 0.1) * (0.2 + (c % 13) as f32 * 0.3);
            if c == 17 || c == 300 {
                v *= 40.0;
            }
            x[t_ * cols + c] = v;
        }
    }
    let mut gram = vec![0f64; cols * cols];
    let (mut sum, mut sum_sq) = (vec![0f64; cols], vec![0f64; cols]);
    for row in x.chunks_exact(cols) {
        for i in 0..cols {
            let xi = row[i] as f64;
            sum[i] += xi;
            sum_sq[i] += xi * xi;
            for j in 0..cols {
                gram[i * cols + j] += xi * row[j] as f64;
            }
        }
    }
    let norm: Vec<f64> = sum_sq.iter().map(|s| s.sqrt()).collect();
    let norm32: Vec<f32> = norm.iter().map(|&v| v as f32).collect();
    let var: Vec<f64> = sum
        .iter()
        .zip(&sum_sq)
        .map(|(s, q)| q / n as f64 - (s / n as f64).powi(2))
        .collect();
    let mean: Vec<f64> = sum.iter().map(|s| s / n as f64 * 2048.0).collect();
    let moments = InputMoments {
        mean: &mean,
        var: &var,
        norm: &norm,
        gram: None,
    };
    let w = &t.data;
    let masked = |keep: &[bool]| {
        let mut v = w.clone();
        apply_mask(&mut v, keep);
        v
    };
    for (pattern_arg, pattern) in [
        ("0.5", Pattern::Unstructured { sparsity: 0.5 }),
        ("0.6", Pattern::Unstructured { sparsity: 0.6 }),
        ("2:4", Pattern::NOfM { n: 2, m: 4 }),
    ] {
        let magnitude = mask_from_scores(&magnitude_scores(w), cols, pattern);
        let wanda = mask_from_scores(&wanda_scores(w, cols, &norm32), cols, pattern);
        let mut dsnot = wanda.clone();
        let swaps = dsnot_refine(w, &mut dsnot, cols, pattern, &moments, &DsnotOptions::default());
        let (sgpt_w, sgpt_keep) = sparsegpt_prune(w, rows, cols, &gram, pattern, &SparseGptOptions::default()).unwrap();
        for (method, keep, values) in [
            ("magnitude", &magnitude, masked(&magnitude)),
            ("wanda", &wanda, masked(&wanda)),
            ("dsnot", &dsnot, masked(&dsnot)),
            ("sparsegpt", &sgpt_keep, sgpt_w.clone()),
        ] {
            let (keep_ref, w_ref) = reference(w, &x, rows, cols, method, pattern_arg);
            let agree = keep.iter().zip(&keep_ref).filter(|(a, b)| a == b).count() as f64 / keep.len() as f64;
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = values.iter().zip(&w_ref).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            eprintln!(
                "{method} {pattern}: masks agree on {agree:.5}, weights within {:.2e} of the largest",
                worst / scale
            );
            // f32 (oqt) and f64 (numpy) scores may order a near-tie differently.
            assert!(agree >= 0.999, "{method} {pattern}: masks agree on only {agree:.5}");
            if agree == 1.0 {
                assert!(worst <= 1e-4 * scale, "{method} {pattern}: weights differ by {worst}");
            }
        }
        // The methods do what they are for, on this layer.
        let err = |v: &[f32]| relative_output_error(w, v, cols, &gram);
        let (e_mag, e_wanda, e_dsnot, e_sgpt) = (
            err(&masked(&magnitude)),
            err(&masked(&wanda)),
            err(&masked(&dsnot)),
            err(&sgpt_w),
        );
        eprintln!(
            "{pattern}: output error magnitude {e_mag:.4}, Wanda {e_wanda:.4}, DSnoT {e_dsnot:.4} ({swaps} swaps), SparseGPT {e_sgpt:.4}"
        );
        assert!(e_wanda < e_mag && e_sgpt < e_wanda, "{pattern}");
        assert!(swaps > 0);
    }
}
