//! Outlier channel splitting of the down projection's input, an equivalent
//! transformation for static per-tensor activation grids.
//!
//! SmolLM2's down-projection input `silu(gate)·up` carries massive activations
//! in one or two channels of a few layers (layer 11: 3,047 against a bulk
//! below 20). A static per-tensor 8-bit grid must either cover them (and round
//! every other channel to zero) or clip them (and break the tokens that carry
//! them). Smoothing moves the range into the down projection's weight column,
//! which then coarsens that weight row's grid for all other columns.
//!
//! Splitting channel `j` into `k` copies is exact in float: the gate row is
//! copied, the up row divided by `k` and copied, the down column copied, so
//! `Σ_k silu(g_j)·(u_j/k)·w_j = silu(g_j)·u_j·w_j`. Each copy's range is `1/k`
//! of the original, no weight grows, and the deployed kernels need nothing new:
//! the layer's intermediate size grows by `k − 1`.

use crate::stats::inputs::InputStats;
use oqt_core::weights::{ModelWeights, TensorF32};
use oqt_core::{CoreError, LlamaConfig, Result};
use oqt_model::Proj;

/// How many copies each of a layer's intermediate channels becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitPlan {
    /// `[layer][channel]`: copies (1 = unchanged).
    pub copies: Vec<Vec<u32>>,
}

impl SplitPlan {
    /// Channels added to layer `l`.
    pub fn extra(&self, l: usize) -> usize {
        self.copies[l].iter().map(|&k| k as usize - 1).sum()
    }

    pub fn total_extra(&self) -> usize {
        (0..self.copies.len()).map(|l| self.extra(l)).sum()
    }
}

/// Split every down-projection input channel whose calibration maximum exceeds
/// `ratio` × the layer's reference channel maximum (the `reference_rank`-th
/// largest, i.e. where the bulk begins) into as many copies as bring it under
/// that threshold; at most `max_extra` channels per layer (the largest
/// channels are served first). Each layer's new width is then rounded up to a
/// multiple of `align` (LPBQ blocks tile the down projection's inputs) by
/// adding copies to the channel whose share is then largest: rounding down
/// would undo a layer's few splits, and those layers carry the outliers.
pub fn plan(stats: &[[InputStats; 4]], ratio: f32, reference_rank: usize, max_extra: usize, align: usize) -> SplitPlan {
    let copies = stats
        .iter()
        .map(|groups| {
            let m = &groups[3].abs_max;
            let mut sorted = m.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let reference = sorted[reference_rank.min(sorted.len() - 1)].max(f32::MIN_POSITIVE);
            let threshold = ratio * reference;
            let mut k: Vec<u32> = m.iter().map(|&v| (v / threshold).ceil().max(1.0) as u32).collect();
            // Over budget: give copies back from the channel whose share is
            // then smallest, until the layer fits.
            while k.iter().map(|&c| c as usize - 1).sum::<usize>() > max_extra {
                let (j, _) = k
                    .iter()
                    .enumerate()
                    .filter(|&(_, &c)| c > 1)
                    .map(|(j, &c)| (j, m[j] / (c - 1) as f32))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .expect("over budget means some channel is split");
                k[j] -= 1;
            }
            let mut extra = k.iter().map(|&c| c as usize - 1).sum::<usize>();
            let target = (m.len() + extra).next_multiple_of(align.max(1));
            while m.len() + extra < target {
                let (j, _) = k
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| (j, m[j] / c as f32))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .expect("a layer has channels");
                k[j] += 1;
                extra += 1;
            }
            k
        })
        .collect();
    SplitPlan { copies }
}

/// Apply `plan` to the float weights; returns the per-layer intermediate sizes.
pub fn apply(cfg: &LlamaConfig, weights: &mut ModelWeights, plan: &SplitPlan) -> Result<Vec<usize>> {
    if plan.copies.len() != cfg.num_layers {
        return Err(CoreError::Other(format!(
            "split plan covers {} layers; the model has {}",
            plan.copies.len(),
            cfg.num_layers
        )));
    }
    let h = cfg.hidden_size;
    let mut sizes = Vec::with_capacity(cfg.num_layers);
    for (l, copies) in plan.copies.iter().enumerate() {
        let inter = cfg.intermediate_size_of(l);
        if copies.len() != inter {
            return Err(CoreError::Other(format!(
                "split plan for layer {l} has {} channels; the layer has {inter}",
                copies.len()
            )));
        }
        let new_inter: usize = copies.iter().map(|&k| k as usize).sum();
        let take = |w: &mut ModelWeights, p: Proj| -> Result<(TensorF32, String)> {
            let name = p.weight_name(l);
            let source = w.source_type(&name).unwrap_or("f32").to_string();
            let t = w
                .take(&name)
                .ok_or_else(|| CoreError::Other(format!("channel splitting needs `{name}`, which the model lacks")))?;
            Ok((t, source))
        };
        let ((gate, gate_src), (up, up_src), (down, down_src)) = (
            take(weights, Proj::Gate)?,
            take(weights, Proj::Up)?,
            take(weights, Proj::Down)?,
        );
        let mut g = Vec::with_capacity(new_inter * h);
        let mut u = Vec::with_capacity(new_inter * h);
        for (j, &k) in copies.iter().enumerate() {
            let row = j * h..(j + 1) * h;
            for _ in 0..k {
                g.extend_from_slice(&gate.data[row.clone()]);
                u.extend(up.data[row.clone()].iter().map(|&x| x / k as f32));
            }
        }
        let mut d = Vec::with_capacity(h * new_inter);
        for r in 0..h {
            let src = &down.data[r * inter..(r + 1) * inter];
            for (j, &k) in copies.iter().enumerate() {
                d.extend(std::iter::repeat_n(src[j], k as usize));
            }
        }
        weights.insert(
            Proj::Gate.weight_name(l),
            TensorF32::new(vec![new_inter, h], g),
            gate_src,
        );
        weights.insert(Proj::Up.weight_name(l), TensorF32::new(vec![new_inter, h], u), up_src);
        weights.insert(
            Proj::Down.weight_name(l),
            TensorF32::new(vec![h, new_inter], d),
            down_src,
        );
        sizes.push(new_inter);
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::inputs::{Gather, gather_inputs};
    use oqt_core::testing::{random_weights, tiny_config};

    fn stats_with_down_max(abs_max: Vec<f32>) -> [InputStats; 4] {
        let s = |width: usize, abs_max: Vec<f32>| InputStats {
            width,
            abs_max,
            abs_sum: vec![0.0; width],
            unit_sq_sum: vec![0.0; width],
            tokens: 1,
            sample: Vec::new(),
            gram: None,
        };
        [
            s(1, vec![1.0]),
            s(1, vec![1.0]),
            s(1, vec![1.0]),
            s(abs_max.len(), abs_max),
        ]
    }

    #[test]
    fn plan_splits_only_the_outliers_and_keeps_to_the_budget() {
        // Reference = the 16th-largest (index 16) = 1.0; ratio 2 → threshold 2.
        let mut m = vec![1.0f32; 40];
        m[3] = 9.0; // 5 copies (9 / 2 = 4.5)
        m[7] = 2.5; // 2 copies
        m[20] = 2.0; // at the threshold: unchanged
        let plan = plan(&[stats_with_down_max(m.clone())], 2.0, 16, 100, 1);
        assert_eq!(plan.copies[0][3], 5);
        assert_eq!(plan.copies[0][7], 2);
        assert_eq!(plan.copies[0][20], 1);
        assert_eq!(plan.extra(0), 5);
        // A budget of 3: the largest channel keeps what it can.
        let tight = super::plan(&[stats_with_down_max(m)], 2.0, 16, 3, 1);
        assert_eq!(tight.extra(0), 3);
        assert_eq!((tight.copies[0][3], tight.copies[0][7]), (4, 1));
    }

    #[test]
    fn plan_rounds_each_layer_width_up_to_the_lpbq_block() {
        // 32 channels + 5 wanted copies = 37 wide: 48 with blocks of 16, the
        // added copies going to the channel with the largest share.
        let mut m = vec![1.0f32; 32];
        m[3] = 9.0;
        m[7] = 2.5;
        let p16 = plan(&[stats_with_down_max(m.clone())], 2.0, 16, 100, 16);
        assert_eq!(p16.extra(0), 16);
        let p8 = plan(&[stats_with_down_max(m.clone())], 2.0, 16, 100, 8);
        assert_eq!(p8.extra(0), 8);
        assert_eq!((p8.copies[0][3], p8.copies[0][7]), (8, 2));
        // A layer without outliers stays as it is.
        let flat = plan(&[stats_with_down_max(vec![1.0; 32])], 2.0, 16, 100, 16);
        assert_eq!(flat.extra(0), 0);
    }

    #[test]
    fn splitting_leaves_the_float_model_unchanged_and_narrows_the_range() {
        let cfg = tiny_config();
        let mut weights = random_weights(&cfg, 5);
        // A massive channel: scale up row 10 of layer 0's up projection.
        let up = weights.get_mut(&Proj::Up.weight_name(0)).unwrap();
        for v in &mut up.data[10 * cfg.hidden_size..11 * cfg.hidden_size] {
            *v *= 40.0;
        }
        let device = burn::tensor::Device::flex();
        let windows: Vec<Vec<u32>> = (0..2)
            .map(|w| (0..16).map(|i| ((i * 11 + w * 5) % cfg.vocab_size) as u32).collect())
            .collect();
        let run = |cfg: &LlamaConfig, w: &ModelWeights| {
            let llama = oqt_model::llama_from_weights(cfg, w.clone(), &device);
            let logits = crate::stats::inputs::to_vec(llama.forward(llama.tokens_tensor(&windows[0]), None));
            let stats = gather_inputs(&llama, &windows, Gather::default(), |_, _| {}).unwrap();
            (logits, stats)
        };
        let (before, stats) = run(&cfg, &weights);
        let widest = |s: &[[InputStats; 4]]| s[0][3].abs_max.iter().copied().fold(0f32, f32::max);
        let plan = plan(&stats, 2.0, 16, 64, 1);
        assert!(
            plan.copies[0][10] > 2,
            "the massive channel is split: {:?}",
            plan.copies[0]
        );

        let mut split = weights.clone();
        let sizes = apply(&cfg, &mut split, &plan).unwrap();
        let mut split_cfg = cfg.clone();
        split_cfg.layer_intermediate_sizes = Some(sizes.clone());
        assert_eq!(sizes[0], cfg.intermediate_size + plan.extra(0));
        split.validate(&split_cfg, std::path::Path::new("split")).unwrap();

        let (after, split_stats) = run(&split_cfg, &split);
        let worst = oqt_core::testing::max_abs_diff(&before, &after);
        assert!(worst < 1e-3, "logits moved by {worst}");
        assert!(
            widest(&split_stats) < widest(&stats) / 2.0,
            "range {} → {}",
            widest(&stats),
            widest(&split_stats)
        );
    }

    #[test]
    fn a_plan_for_another_model_is_refused() {
        let cfg = tiny_config();
        let mut weights = random_weights(&cfg, 1);
        let wrong = SplitPlan {
            copies: vec![vec![1; cfg.intermediate_size + 1]; cfg.num_layers],
        };
        let err = apply(&cfg, &mut weights, &wrong).unwrap_err().to_string();
        assert!(err.contains("layer 0"), "{err}");
    }
}
