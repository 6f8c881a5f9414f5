//! Weight layouts the kernels read. The int4 byte layout is oqt-core's
//! (`oqt_core::quant::pack`), shared with bundles so a bundle's bytes are used
//! as they are; symmetric values are stored offset by 8. Each (row, group)
//! also carries `Σ q_w`, needed to remove the activation zero point exactly.

pub use oqt_core::quant::pack::{BLOCK, padded_len};
use oqt_core::quant::pack::{int4_nibble, pack_int4_rows};

/// int4 weights `[rows, k]` with one scale per (row, group).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedInt4 {
    pub rows: usize,
    /// Logical input width.
    pub k: usize,
    /// Padded input width (multiple of 32).
    pub k_pad: usize,
    /// Columns per scale; a multiple of 32 dividing `k_pad`.
    pub group: usize,
    /// `rows × k_pad / 2` bytes.
    pub data: Vec<u8>,
    /// `rows × groups` f32 scales.
    pub scales: Vec<f32>,
    /// `rows × groups` sums of the signed values.
    pub sums: Vec<i32>,
}

/// int8 weights `[rows, k]` (padded like [`PackedInt4`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedInt8 {
    pub rows: usize,
    pub k: usize,
    pub k_pad: usize,
    pub group: usize,
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
}

/// The group size actually used: `None` means one group per row (per-channel).
fn resolve_group(group: Option<usize>, k_pad: usize) -> usize {
    let g = group.unwrap_or(k_pad);
    assert!(
        g > 0 && g.is_multiple_of(BLOCK) && k_pad.is_multiple_of(g),
        "group {g} must be a multiple of {BLOCK} dividing the padded width {k_pad}"
    );
    g
}

impl PackedInt4 {
    /// Pack signed values in `[−8, 7]`, row-major `[rows, k]`, with `scales` per (row, group).
    pub fn pack(values: &[i8], rows: usize, k: usize, group: Option<usize>, scales: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * k);
        Self::from_packed(pack_int4_rows(values, rows, k, 8), rows, k, group, scales)
    }

    /// Wrap bytes already in the shared layout (a bundle's `.qweight`), computing the group sums.
    pub fn from_packed(data: Vec<u8>, rows: usize, k: usize, group: Option<usize>, scales: Vec<f32>) -> Self {
        let k_pad = padded_len(k);
        assert_eq!(data.len(), rows * k_pad / 2, "packed bytes do not match [{rows}, {k}]");
        let group = resolve_group(group, k_pad);
        let groups = k_pad / group;
        assert_eq!(scales.len(), rows * groups, "one scale per (row, group)");
        let mut sums = vec![0i32; rows * groups];
        for r in 0..rows {
            let row = &data[r * k_pad / 2..(r + 1) * k_pad / 2];
            for g in 0..groups {
                sums[r * groups + g] = (g * group..(g + 1) * group)
                    .map(|c| int4_nibble(row, c) as i32 - 8)
                    .sum();
            }
        }
        Self {
            rows,
            k,
            k_pad,
            group,
            data,
            scales,
            sums,
        }
    }

    pub fn groups(&self) -> usize {
        self.k_pad / self.group
    }

    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        self.k_pad / 2
    }

    /// Row `n` as the row kernels read it.
    pub fn row(&self, n: usize) -> crate::dot::WeightRow<'_, u8> {
        let groups = self.groups();
        crate::dot::WeightRow {
            data: &self.data[n * self.row_bytes()..(n + 1) * self.row_bytes()],
            sums: &self.sums[n * groups..(n + 1) * groups],
            scales: &self.scales[n * groups..(n + 1) * groups],
            group: self.group,
        }
    }

    /// Signed value at (row, col), for tests and dequantization.
    pub fn value(&self, r: usize, c: usize) -> i8 {
        int4_nibble(&self.data[r * self.row_bytes()..(r + 1) * self.row_bytes()], c) as i8 - 8
    }
}

impl PackedInt8 {
    /// Row `n` as the row kernels read it.
    pub fn row(&self, n: usize) -> crate::dot::WeightRow<'_, i8> {
        let groups = self.groups();
        crate::dot::WeightRow {
            data: &self.data[n * self.k_pad..(n + 1) * self.k_pad],
            sums: &self.sums[n * groups..(n + 1) * groups],
            scales: &self.scales[n * groups..(n + 1) * groups],
            group: self.group,
        }
    }

    /// Pack signed values (the whole i8 range, −128 included: clipped grids reach it), row-major `[rows, k]`.
    pub fn pack(values: &[i8], rows: usize, k: usize, group: Option<usize>, scales: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * k);
        let k_pad = padded_len(k);
        let group = resolve_group(group, k_pad);
        let groups = k_pad / group;
        assert_eq!(scales.len(), rows * groups, "one scale per (row, group)");
        let mut data = vec![0i8; rows * k_pad];
        let mut sums = vec![0i32; rows * groups];
        for r in 0..rows {
            data[r * k_pad..r * k_pad + k].copy_from_slice(&values[r * k..(r + 1) * k]);
            for g in 0..groups {
                sums[r * groups + g] = data[r * k_pad + g * group..r * k_pad + (g + 1) * group]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
            }
        }
        Self {
            rows,
            k,
            k_pad,
            group,
            data,
            scales,
            sums,
        }
    }

    pub fn groups(&self) -> usize {
        self.k_pad / self.group
    }
}
