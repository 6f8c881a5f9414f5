//! Post-training palettization by weighted k-means (coremltools'
//! `kmeans` mode): every group of `group_rows` output rows gets its own table
//! of `2^bits` centroids, found by 1-D k-means on the group's weights,
//! k-means++ initialised, each weight counted by the importance of the input
//! it multiplies (`E[x_j²]` from calibration, or 1).
//!
//! One dimension makes Lloyd's iterations cheap: with the values sorted and
//! prefix sums of weight and weight × value, the clusters are the runs between
//! the midpoints of neighbouring centroids, and each mean is two lookups.

use half::f16;
use oqt_core::lut::{Palettized, shape_problems};
use rand::{Rng, SeedableRng};

/// Options of k-means palettization.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct KmeansOptions {
    /// Index width: `2^bits` centroids per table (1–8).
    pub bits: u8,
    /// Output rows sharing a table (`rows` for one table per tensor).
    pub group_rows: usize,
    /// Lloyd iterations at most (it stops earlier when no centroid moves).
    pub iterations: usize,
    /// Keep exact zeros exact (a pruned model): zeros get a table entry of
    /// their own and take no part in the clustering.
    pub keep_zeros: bool,
    pub seed: u64,
}

impl Default for KmeansOptions {
    fn default() -> Self {
        Self {
            bits: 4,
            group_rows: 16,
            iterations: 50,
            keep_zeros: false,
            seed: 0,
        }
    }
}

/// Palettize `w` (`[rows, cols]`); `importance` (`cols` values, one per
/// input channel) weighs each weight's squared error. `Err` for bits outside
/// 1–8 or a group not dividing the rows.
pub fn palettize(
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
    opts: &KmeansOptions,
) -> Result<Palettized, String> {
    if let Some(p) = shape_problems(rows, opts.bits, opts.group_rows) {
        return Err(p);
    }
    assert_eq!(w.len(), rows * cols, "weight shape");
    if let Some(imp) = importance {
        assert_eq!(imp.len(), cols, "one importance per input channel");
    }
    use rayon::prelude::*;
    let k = 1usize << opts.bits;
    let group_len = opts.group_rows * cols;
    let parts: Vec<(Vec<f16>, Vec<u8>)> = w
        .par_chunks(group_len)
        .enumerate()
        .map(|(g, values)| {
            let weight = |i: usize| importance.map_or(1.0, |imp| imp[i % cols].max(0.0) as f64);
            let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let zeros = opts.keep_zeros && values.contains(&0.0);
            let points: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .filter(|&(_, &v)| !(zeros && v == 0.0))
                .map(|(i, &v)| (v as f64, weight(i)))
                .collect();
            let mut centroids = weighted_kmeans_1d(points, k - zeros as usize, opts.iterations, &mut rng);
            if zeros {
                centroids.push(0.0);
            }
            let table = to_table(&centroids, k);
            let indices = assign(values, &table);
            (table, indices)
        })
        .collect();
    let mut tables = Vec::with_capacity(rows / opts.group_rows * k);
    let mut indices = Vec::with_capacity(rows * cols);
    for (t, i) in parts {
        tables.extend(t);
        indices.extend(i);
    }
    Ok(Palettized {
        rows,
        cols,
        bits: opts.bits,
        group_rows: opts.group_rows,
        tables,
        indices,
    })
}

/// The centroids rounded to f16, sorted, padded to `k` entries by repeating
/// the last (a group with fewer distinct values than entries).
fn to_table(centroids: &[f64], k: usize) -> Vec<f16> {
    let mut t: Vec<f16> = centroids.iter().map(|&c| f16::from_f64(c)).collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t.dedup();
    if t.is_empty() {
        t.push(f16::ZERO);
    }
    let last = *t.last().expect("non-empty");
    t.resize(k, last);
    t
}

/// Each value's nearest table entry (ties to the lower), the table sorted.
pub fn assign(values: &[f32], table: &[f16]) -> Vec<u8> {
    let t: Vec<f32> = table.iter().map(|v| v.to_f32()).collect();
    values
        .iter()
        .map(|&v| {
            let hi = t.partition_point(|&c| c < v).min(t.len() - 1);
            let lo = hi.saturating_sub(1);
            if (v - t[lo]).abs() <= (t[hi] - v).abs() {
                lo as u8
            } else {
                hi as u8
            }
        })
        .collect()
}

/// Weighted 1-D k-means on `(value, weight)` points: `k` centroids (fewer
/// when there are fewer distinct values), k-means++ initialised.
pub fn weighted_kmeans_1d(mut points: Vec<(f64, f64)>, k: usize, iterations: usize, rng: &mut impl Rng) -> Vec<f64> {
    if points.is_empty() || k == 0 {
        return Vec::new();
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = points.len();
    // Prefix sums: cw[i] = Σ_{<i} w, cwx[i] = Σ_{<i} w·x.
    let mut cw = vec![0.0f64; n + 1];
    let mut cwx = vec![0.0f64; n + 1];
    for (i, &(x, w)) in points.iter().enumerate() {
        cw[i + 1] = cw[i] + w;
        cwx[i + 1] = cwx[i] + w * x;
    }
    if cw[n] <= 0.0 {
        // No importance anywhere: count every weight once.
        for (i, &(x, _)) in points.iter().enumerate() {
            cw[i + 1] = cw[i] + 1.0;
            cwx[i + 1] = cwx[i] + x;
        }
        points.iter_mut().for_each(|p| p.1 = 1.0);
    }
    let mut centroids = kmeans_plus_plus(&points, k, &cw, rng);
    for _ in 0..iterations {
        centroids.sort_by(f64::total_cmp);
        centroids.dedup();
        let mut moved = false;
        let mut start = 0;
        let mut next = Vec::with_capacity(centroids.len());
        for (c, &centre) in centroids.iter().enumerate() {
            let end = match centroids.get(c + 1) {
                Some(&right) => {
                    let mid = 0.5 * (centre + right);
                    start + points[start..].partition_point(|p| p.0 <= mid)
                }
                None => n,
            };
            let w = cw[end] - cw[start];
            let mean = if w > 0.0 { (cwx[end] - cwx[start]) / w } else { centre };
            moved |= mean != centre;
            next.push(mean);
            start = end;
        }
        centroids = next;
        if !moved {
            break;
        }
    }
    centroids.sort_by(f64::total_cmp);
    centroids.dedup();
    centroids
}

/// k-means++ seeding: each next centroid drawn with probability ∝ weight ×
/// squared distance to the nearest centroid so far.
fn kmeans_plus_plus(points: &[(f64, f64)], k: usize, cw: &[f64], rng: &mut impl Rng) -> Vec<f64> {
    let n = points.len();
    let draw = |total: f64, rng: &mut dyn rand::RngCore| rng.random::<f64>() * total;
    let first = cw.partition_point(|&c| c <= draw(cw[n], rng)).clamp(1, n) - 1;
    let mut centroids = vec![points[first].0];
    let mut d2: Vec<f64> = points.iter().map(|&(x, _)| (x - centroids[0]).powi(2)).collect();
    while centroids.len() < k {
        let total: f64 = points.iter().zip(&d2).map(|(p, d)| p.1 * d).sum();
        if total <= 0.0 {
            break; // every point sits on a centroid
        }
        let mut target = draw(total, rng);
        let mut pick = n - 1;
        for (i, (p, d)) in points.iter().zip(&d2).enumerate() {
            target -= p.1 * d;
            if target <= 0.0 && p.1 * d > 0.0 {
                pick = i;
                break;
            }
        }
        let c = points[pick].0;
        centroids.push(c);
        for (d, p) in d2.iter_mut().zip(points) {
            *d = d.min((p.0 - c).powi(2));
        }
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_separated_clusters_are_found_and_indexed() {
        // Four tight clusters around -3, -1, 1, 3.
        let centres = [-3.0f32, -1.0, 1.0, 3.0];
        let w: Vec<f32> = (0..64)
            .map(|i| centres[i % 4] + 0.01 * ((i / 4) as f32 - 8.0) / 8.0)
            .collect();
        let opts = KmeansOptions {
            bits: 2,
            group_rows: 4,
            ..Default::default()
        };
        let p = palettize(&w, 4, 16, None, &opts).unwrap();
        assert_eq!(p.problems(), None);
        let t: Vec<f32> = p.tables.iter().map(|v| v.to_f32()).collect();
        for (c, want) in t.iter().zip(centres) {
            assert!((c - want).abs() < 0.01, "{t:?}");
        }
        let deq = p.dequantize();
        for (a, b) in deq.iter().zip(&w) {
            assert!((a - b).abs() < 0.02);
        }
    }

    #[test]
    fn importance_pulls_centroids_and_zeros_stay_exact() {
        // Two entries for three values: the important one pulls its neighbour.
        let w = [1.0f32, 2.0, 10.0];
        let opts = KmeansOptions {
            bits: 1,
            group_rows: 1,
            ..Default::default()
        };
        let p = palettize(&w, 1, 3, Some(&[1.0, 99.0, 1.0]), &opts).unwrap();
        let deq = p.dequantize();
        assert!((deq[2] - 10.0).abs() < 1e-2 && (deq[0] - 1.99).abs() < 1e-2, "{deq:?}");
        let p = palettize(&w, 1, 3, None, &opts).unwrap();
        assert!((p.dequantize()[0] - 1.5).abs() < 1e-2);
        // Pruned zeros keep an exact zero entry.
        let sparse = [0.0f32, 0.7, 0.0, -0.9, 0.0, 0.8, 0.0, -0.6];
        let p = palettize(
            &sparse,
            1,
            8,
            None,
            &KmeansOptions {
                bits: 2,
                keep_zeros: true,
                ..opts
            },
        )
        .unwrap();
        let deq = p.dequantize();
        for (a, b) in deq.iter().zip(&sparse) {
            assert_eq!(*a == 0.0, *b == 0.0, "{deq:?}");
        }
        assert!(palettize(&w, 1, 2, None, &KmeansOptions { bits: 9, ..opts }).is_err());
    }
}
