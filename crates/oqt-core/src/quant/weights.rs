//! Reference weight quantization (round-to-nearest on a spec's grid).
//! The fake quantizers and the bundle writer follow these formulas exactly.

use super::spec::{Granularity, ScaleRule, WeightSpec};

/// Integer weights `[rows, cols]` with one scale (and zero point, when
/// asymmetric) per (row, group); per-tensor specs have a single scale.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub rows: usize,
    pub cols: usize,
    /// Columns per scale (`cols` for per-channel and per-tensor).
    pub group: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub zero_points: Option<Vec<i32>>,
    pub spec: WeightSpec,
    /// LPBQ grids only: each (row, block)'s integer multiplier in [1, 16]
    /// (`[rows, cols / block]`). `q` then holds the expanded 8-bit values
    /// `q4 · m` and `scales` one float per row: the per-channel int8 weight
    /// every kernel and the simulation multiply; the bundle stores `q4` and `m`.
    pub multipliers: Option<Vec<u8>>,
}

impl QuantizedWeight {
    /// Replace row `r` with the single row of `row` (same columns and grid).
    fn set_row(&mut self, r: usize, row: &QuantizedWeight) {
        let (cols, per_row) = (self.cols, self.scales.len() / self.rows);
        self.q[r * cols..(r + 1) * cols].copy_from_slice(&row.q);
        self.scales[r * per_row..(r + 1) * per_row].copy_from_slice(&row.scales);
        if let (Some(z), Some(zr)) = (self.zero_points.as_mut(), &row.zero_points) {
            z[r * per_row..(r + 1) * per_row].copy_from_slice(zr);
        }
        if let (Some(m), Some(mr)) = (self.multipliers.as_mut(), &row.multipliers) {
            let blocks = mr.len();
            m[r * blocks..(r + 1) * blocks].copy_from_slice(mr);
        }
    }

    /// `parts` (row blocks of one weight, same columns and grid) stacked in
    /// order: every per-row array — values, scales, zero points, LPBQ
    /// multipliers — follows its rows. `None` for no parts.
    pub fn stack_rows(parts: Vec<QuantizedWeight>) -> Option<QuantizedWeight> {
        let mut parts = parts.into_iter();
        let mut all = parts.next()?;
        for p in parts {
            assert_eq!(
                (p.cols, p.group, p.spec),
                (all.cols, all.group, all.spec),
                "stacking different grids"
            );
            all.rows += p.rows;
            all.q.extend_from_slice(&p.q);
            all.scales.extend_from_slice(&p.scales);
            if let (Some(z), Some(pz)) = (all.zero_points.as_mut(), &p.zero_points) {
                z.extend_from_slice(pz);
            }
            if let (Some(m), Some(pm)) = (all.multipliers.as_mut(), &p.multipliers) {
                m.extend_from_slice(pm);
            }
        }
        Some(all)
    }

    /// Every 4-bit value of an LPBQ weight (`q / m`), row-major: what the
    /// bundle stores and the panel kernels multiply.
    pub fn lpbq_factors(&self) -> Option<Vec<i8>> {
        let block = self.spec.granularity.lpbq_block()?;
        let m = self.multipliers.as_ref()?;
        let blocks = self.cols / block;
        Some(
            self.q
                .iter()
                .enumerate()
                .map(|(i, &q)| q / m[(i / self.cols) * blocks + (i % self.cols) / block] as i8)
                .collect(),
        )
    }

    /// Row `i` of the result is row `order[i]` of `self`, scales and zero points with it.
    pub fn reorder_rows(&self, order: &[usize]) -> QuantizedWeight {
        fn gather<T: Copy>(v: &[T], per_row: usize, order: &[usize]) -> Vec<T> {
            order
                .iter()
                .flat_map(|&r| v[r * per_row..(r + 1) * per_row].iter().copied())
                .collect()
        }
        let per_row = self.scales.len() / self.rows;
        QuantizedWeight {
            q: gather(&self.q, self.cols, order),
            scales: gather(&self.scales, per_row, order),
            zero_points: self.zero_points.as_ref().map(|z| gather(z, per_row, order)),
            multipliers: self.multipliers.as_ref().map(|m| gather(m, m.len() / self.rows, order)),
            ..self.clone()
        }
    }

    /// Index into `scales` of (row, col).
    pub fn scale_index(&self, r: usize, c: usize) -> usize {
        match self.spec.granularity {
            Granularity::PerTensor => 0,
            _ => r * self.cols.div_ceil(self.group) + c / self.group,
        }
    }
}

/// Scale and zero point of one group of values (after clipping by `clip` ∈ (0, 1]).
/// For llama.cpp's grids this is the f32 block scale the quantizer divides by
/// (possibly 0 or, for Q4_0, negative); the stored scale is its f16 rounding
/// ([`WeightSpec::stored_scale`]).
pub fn group_params(values: impl Iterator<Item = f32> + Clone, spec: &WeightSpec, clip: f32) -> (f32, i32) {
    let (qmin, qmax) = spec.qrange();
    match spec.scale_rule {
        ScaleRule::LlamaCppQ8_0 => {
            let amax = values.fold(0f32, |m, v| m.max(v.abs()));
            return (amax * clip / 127.0, 0);
        }
        ScaleRule::LlamaCppQ4_0 => {
            // The signed value of largest magnitude; the first one wins ties, as in ggml.
            let (mut amax, mut max) = (0f32, 0f32);
            for v in values {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            return (max * clip / -8.0, 0);
        }
        _ => {}
    }
    if spec.symmetric {
        let amax = values.fold(0f32, |m, v| m.max(v.abs())) * clip;
        if amax == 0.0 {
            return (1.0, 0);
        }
        let scale = match spec.scale_rule {
            ScaleRule::AmaxOverQmax => amax / qmax as f32,
            ScaleRule::AmaxOverHalfRange => amax / ((qmax - qmin) as f32 / 2.0),
            ScaleRule::LlamaCppQ8_0 | ScaleRule::LlamaCppQ4_0 => unreachable!("handled above"),
        };
        (scale, 0)
    } else {
        let (mut lo, mut hi) = (0f32, 0f32);
        for v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let (lo, hi) = (lo * clip, hi * clip);
        if hi == lo {
            return (1.0, 0);
        }
        let scale = (hi - lo) / (qmax - qmin) as f32;
        let zp = spec.rounding.round(-lo / scale).clamp(qmin as f32, qmax as f32) as i32;
        (scale, zp)
    }
}

/// `clamp(round(w / scale) + zp, qmin, qmax)`; llama.cpp's grids multiply by
/// the reciprocal and round their own way, exactly as ggml's reference quantizers.
#[inline]
pub fn quantize_value(w: f32, scale: f32, zp: i32, spec: &WeightSpec) -> i8 {
    let (qmin, qmax) = spec.qrange();
    let inverse = || if scale == 0.0 { 0.0 } else { 1.0 / scale };
    match spec.scale_rule {
        // `f32::round` is C's `roundf`: half away from zero.
        ScaleRule::LlamaCppQ8_0 => (w * inverse()).round().clamp(-127.0, 127.0) as i8,
        // ggml truncates `x/d + 8.5` to an int8 and caps it at 15; the value is ≥ 0
        // on ggml's own range, where truncation is the floor.
        ScaleRule::LlamaCppQ4_0 => ((w * inverse() + 8.5).floor().clamp(0.0, 15.0) as i32 - 8) as i8,
        _ => (spec.rounding.round(w / scale) as i32 + zp).clamp(qmin, qmax) as i8,
    }
}

/// Quantize `w` (`[rows, cols]`, row-major) on `spec`'s grid, with the range of
/// every group shrunk by `clip` (1.0 = min/max; smaller values clip outliers).
pub fn quantize_weight(w: &[f32], rows: usize, cols: usize, spec: &WeightSpec, clip: f32) -> QuantizedWeight {
    assert_eq!(
        w.len(),
        rows * cols,
        "weight has {} values, not {rows} × {cols}",
        w.len()
    );
    assert!(clip > 0.0 && clip <= 1.0, "clip ratio {clip} outside (0, 1]");
    if let Granularity::Lpbq(block) = spec.granularity {
        return quantize_lpbq(w, rows, cols, block, clip, spec);
    }
    let group = spec.group_len(cols);
    let mut q = vec![0i8; w.len()];
    let mut scales = Vec::new();
    let mut zps = Vec::new();
    if spec.granularity == Granularity::PerTensor {
        let (s, z) = group_params(w.iter().copied(), spec, clip);
        for (o, &v) in q.iter_mut().zip(w) {
            *o = quantize_value(v, s, z, spec);
        }
        scales.push(spec.stored_scale(s));
        zps.push(z);
    } else {
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            for (g, chunk) in row.chunks(group).enumerate() {
                let (s, z) = group_params(chunk.iter().copied(), spec, clip);
                let out = &mut q[r * cols + g * group..][..chunk.len()];
                for (o, &v) in out.iter_mut().zip(chunk) {
                    *o = quantize_value(v, s, z, spec);
                }
                scales.push(spec.stored_scale(s));
                zps.push(z);
            }
        }
    }
    QuantizedWeight {
        rows,
        cols,
        group,
        q,
        scales,
        zero_points: (!spec.symmetric).then_some(zps),
        spec: *spec,
        multipliers: None,
    }
}

/// The LPBQ parameters of one row (after clipping by `clip`): each block's
/// 4-bit scale `s_b = clip · amax_b / 7` is expressed as `m_b · s_row` with
/// `s_row = max_b s_b / 16` and `m_b = clamp(round(s_b / s_row), 1, 16)`
/// (AIMET's 4-bit values on an 8-bit per-channel grid). Returns
/// `(s_row, multipliers)`; an all-zero row gets `s_row = 1`, multipliers 1.
pub fn lpbq_row_params(row: &[f32], block: usize, clip: f32) -> (f32, Vec<u8>) {
    let qmax = 7.0f32;
    let block_scales: Vec<f32> = row
        .chunks(block)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) * clip / qmax)
        .collect();
    let largest = block_scales.iter().fold(0f32, |m, &v| m.max(v));
    if largest == 0.0 {
        return (1.0, vec![1; block_scales.len()]);
    }
    let s_row = largest / super::spec::LPBQ_MAX_MULTIPLIER as f32;
    let multipliers = block_scales
        .iter()
        .map(|&s| {
            (s / s_row)
                .round_ties_even()
                .clamp(1.0, super::spec::LPBQ_MAX_MULTIPLIER as f32) as u8
        })
        .collect();
    (s_row, multipliers)
}

/// One row on its LPBQ grid with the given parameters: the expanded values
/// `clamp(round(w / (m_b · s_row)), −8, 7) · m_b`.
pub fn lpbq_quantize_row(row: &[f32], block: usize, s_row: f32, multipliers: &[u8], out: &mut [i8]) {
    for ((chunk, o), &m) in row.chunks(block).zip(out.chunks_mut(block)).zip(multipliers) {
        let scale = m as f32 * s_row;
        for (o, &v) in o.iter_mut().zip(chunk) {
            *o = ((v / scale).round_ties_even().clamp(-8.0, 7.0) as i32 * m as i32) as i8;
        }
    }
}

fn quantize_lpbq(w: &[f32], rows: usize, cols: usize, block: usize, clip: f32, spec: &WeightSpec) -> QuantizedWeight {
    assert!(
        cols.is_multiple_of(block),
        "LPBQ blocks of {block} do not divide {cols} input channels"
    );
    let mut q = vec![0i8; w.len()];
    let mut scales = Vec::with_capacity(rows);
    let mut multipliers = Vec::with_capacity(rows * cols / block);
    for (row, out) in w.chunks(cols).zip(q.chunks_mut(cols)) {
        let (s_row, m) = lpbq_row_params(row, block, clip);
        lpbq_quantize_row(row, block, s_row, &m, out);
        scales.push(s_row);
        multipliers.extend(m);
    }
    QuantizedWeight {
        rows,
        cols,
        group: cols,
        q,
        scales,
        zero_points: None,
        spec: *spec,
        multipliers: Some(multipliers),
    }
}

/// [`quantize_weight`] with its own clip ratio for every output row (learned
/// clipping). Per-tensor grids have one range and cannot take per-row clips.
pub fn quantize_weight_rows(w: &[f32], rows: usize, cols: usize, spec: &WeightSpec, clips: &[f32]) -> QuantizedWeight {
    assert_eq!(clips.len(), rows, "{} clip ratios for {rows} rows", clips.len());
    assert!(
        spec.granularity != Granularity::PerTensor,
        "per-tensor grids take one clip ratio"
    );
    let mut out = quantize_weight(w, rows, cols, spec, 1.0);
    for (r, &clip) in clips.iter().enumerate() {
        out.set_row(r, &quantize_weight(&w[r * cols..(r + 1) * cols], 1, cols, spec, clip));
    }
    out
}

/// Clip ratios tried by [`quantize_weight_mse`]: 1.0 down to 0.50 in steps of 0.02.
pub fn clip_grid() -> impl Iterator<Item = f32> {
    (0..=25).map(|i| 1.0 - 0.02 * i as f32)
}

/// Round-to-nearest with the clip ratio chosen per output row from [`clip_grid`]
/// to minimize that row's squared weight error. Returns the weight and the
/// ratio chosen for each row. Per-tensor grids search one ratio for the tensor.
pub fn quantize_weight_mse(w: &[f32], rows: usize, cols: usize, spec: &WeightSpec) -> (QuantizedWeight, Vec<f32>) {
    if spec.granularity == Granularity::PerTensor {
        let best = clip_grid()
            .map(|clip| {
                let qw = quantize_weight(w, rows, cols, spec, clip);
                let err: f64 = dequantize_weight(&qw)
                    .iter()
                    .zip(w)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                (err, clip, qw)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .expect("non-empty grid");
        return (best.2, vec![best.1; rows]);
    }
    let mut out = quantize_weight(w, rows, cols, spec, 1.0);
    let mut ratios = vec![1.0; rows];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let mut best: Option<(f64, f32, QuantizedWeight)> = None;
        for clip in clip_grid() {
            let qw = quantize_weight(row, 1, cols, spec, clip);
            let err: f64 = dequantize_weight(&qw)
                .iter()
                .zip(row)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            if best.as_ref().is_none_or(|b| err < b.0) {
                best = Some((err, clip, qw));
            }
        }
        let (_, clip, qw) = best.expect("non-empty grid");
        ratios[r] = clip;
        out.set_row(r, &qw);
    }
    (out, ratios)
}

/// `(q − zp) · scale`, row-major `[rows, cols]`.
pub fn dequantize_weight(qw: &QuantizedWeight) -> Vec<f32> {
    let mut out = vec![0f32; qw.q.len()];
    for r in 0..qw.rows {
        for c in 0..qw.cols {
            let i = qw.scale_index(r, c);
            let zp = qw.zero_points.as_ref().map_or(0, |z| z[i]);
            out[r * qw.cols + c] = (qw.q[r * qw.cols + c] as i32 - zp) as f32 * qw.scales[i];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pseudo_random;

    fn spec(bits: u8, granularity: Granularity, symmetric: bool) -> WeightSpec {
        WeightSpec::new(bits, granularity, symmetric)
    }

    #[test]
    fn stacked_row_blocks_equal_the_whole_weight_for_every_row_wise_grid() {
        let (rows, cols) = (7, 128);
        let w = pseudo_random(rows * cols, 11, 1.0);
        for s in [
            spec(4, Granularity::PerChannel, true),
            spec(4, Granularity::PerGroup(32), false),
            spec(8, Granularity::PerChannel, true),
            spec(4, Granularity::Lpbq(32), true),
        ] {
            let whole = quantize_weight(&w, rows, cols, &s, 1.0);
            let parts = [0..3, 3..4, 4..7]
                .into_iter()
                .map(|r| quantize_weight(&w[r.start * cols..r.end * cols], r.len(), cols, &s, 1.0))
                .collect();
            assert_eq!(QuantizedWeight::stack_rows(parts).unwrap(), whole, "{s:?}");
        }
        assert!(QuantizedWeight::stack_rows(Vec::new()).is_none());
    }

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        let (rows, cols) = (7, 100);
        let w = pseudo_random(rows * cols, 11, 0.5);
        for s in [
            spec(4, Granularity::PerGroup(32), true),
            spec(4, Granularity::PerChannel, true),
            spec(8, Granularity::PerChannel, true),
            spec(4, Granularity::PerGroup(32), false),
            spec(3, Granularity::PerTensor, false),
        ] {
            let qw = quantize_weight(&w, rows, cols, &s, 1.0);
            let (qmin, qmax) = s.qrange();
            assert!(qw.q.iter().all(|&v| (qmin..=qmax).contains(&(v as i32))));
            let back = dequantize_weight(&qw);
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let step = qw.scales[qw.scale_index(i / cols, i % cols)];
                assert!((a - b).abs() <= step * 0.5001, "{s:?}: {a} vs {b} (step {step})");
            }
        }
    }

    #[test]
    fn scale_counts_follow_granularity_including_a_short_last_group() {
        let w = pseudo_random(3 * 70, 2, 1.0);
        assert_eq!(
            quantize_weight(&w, 3, 70, &spec(4, Granularity::PerGroup(32), true), 1.0)
                .scales
                .len(),
            9
        );
        assert_eq!(
            quantize_weight(&w, 3, 70, &spec(4, Granularity::PerChannel, true), 1.0)
                .scales
                .len(),
            3
        );
        assert_eq!(
            quantize_weight(&w, 3, 70, &spec(4, Granularity::PerTensor, true), 1.0)
                .scales
                .len(),
            1
        );
    }

    #[test]
    fn symmetric_grid_maps_the_extremes_and_zero_exactly() {
        let w = [-1.4, 0.0, 0.7, 1.4];
        let qw = quantize_weight(&w, 1, 4, &spec(4, Granularity::PerChannel, true), 1.0);
        assert_eq!(qw.q, vec![-7, 0, 4, 7]); // 0.7 / 0.2 = 3.5 rounds to even 4
        assert_eq!(qw.scales, vec![1.4 / 7.0]);
        let half_range = WeightSpec {
            scale_rule: ScaleRule::AmaxOverHalfRange,
            ..spec(4, Granularity::PerChannel, true)
        };
        let qw = quantize_weight(&w, 1, 4, &half_range, 1.0);
        // −1.4 / (1.4 / 7.5) = −7.5, which rounds half to even onto the grid's bottom, −8.
        assert_eq!(qw.q[0], -8);
    }

    #[test]
    fn mse_clip_search_beats_min_max_on_heavy_tailed_rows() {
        // Laplace-distributed weights (like trained LLM weights): the largest values are
        // rare, so a slightly clipped grid resolves the bulk better.
        let (rows, cols) = (6, 256);
        let u = pseudo_random(rows * cols, 9, 1.0);
        let w: Vec<f32> = u
            .iter()
            .map(|&v| v.signum() * -(1.0 - v.abs()).max(1e-6).ln() * 0.05)
            .collect();
        let s = spec(4, Granularity::PerChannel, true);
        let err = |qw: &QuantizedWeight| -> f64 {
            dequantize_weight(qw)
                .iter()
                .zip(&w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        let plain = quantize_weight(&w, rows, cols, &s, 1.0);
        let (searched, ratios) = quantize_weight_mse(&w, rows, cols, &s);
        assert!(
            err(&searched) < 0.9 * err(&plain),
            "{} vs {}",
            err(&searched),
            err(&plain)
        );
        assert!(ratios.iter().all(|&r| r < 1.0), "{ratios:?}");
        // Each row's result is exactly the plain quantizer at the chosen ratio.
        let row2 = quantize_weight(&w[2 * cols..3 * cols], 1, cols, &s, ratios[2]);
        assert_eq!(&searched.q[2 * cols..3 * cols], &row2.q[..]);
        assert_eq!(searched.scales[2], row2.scales[0]);
    }

    #[test]
    fn clipping_shrinks_the_scale() {
        let w = pseudo_random(64, 5, 1.0);
        let s = spec(4, Granularity::PerChannel, true);
        let full = quantize_weight(&w, 1, 64, &s, 1.0);
        let clipped = quantize_weight(&w, 1, 64, &s, 0.8);
        assert!((clipped.scales[0] - 0.8 * full.scales[0]).abs() < 1e-7);
    }
}
