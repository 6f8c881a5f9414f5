//! Where a pruned weight's kept values sit: the layouts of the `sparse`
//! encoding ([`crate::encoding::TensorEncoding::Sparse`]).
//!
//! * `bitmap` — one bit per weight, row by row (`⌈cols/8⌉` bytes a row, bit
//!   `c % 8` of byte `c / 8`, set = kept), then the kept values in order;
//!   any unstructured mask.
//! * `n-of-m` — every block of `m` consecutive inputs keeps `n` values (2:4,
//!   4:8): the kept values compacted to `[rows, cols·n/m]` and, for each, its
//!   position inside its block (2 bits for `m ≤ 4`, 4 bits up to 16), packed
//!   from the low bits of each byte, rows padded to whole bytes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest N:M block a `n-of-m` layout stores (4-bit positions).
pub const MAX_BLOCK: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SparseLayout {
    Bitmap,
    NOfM { n: usize, m: usize },
}

impl fmt::Display for SparseLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bitmap => f.write_str("bitmap"),
            Self::NOfM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

impl SparseLayout {
    /// Problems with this layout on rows `cols` wide.
    pub fn problems(&self, cols: usize) -> Option<String> {
        match *self {
            Self::Bitmap => None,
            Self::NOfM { n, m } if n == 0 || n >= m || m > MAX_BLOCK => {
                Some(format!("N:M {n}:{m}: expected 0 < N < M ≤ {MAX_BLOCK}"))
            }
            Self::NOfM { n, m } if !cols.is_multiple_of(m) => Some(format!(
                "N:M {n}:{m}: blocks of {m} do not divide the row length {cols}"
            )),
            Self::NOfM { .. } => None,
        }
    }

    /// The name of the tensor holding the positions (`NAME.indices` / `NAME.mask`).
    pub fn positions_name(&self, name: &str) -> String {
        match self {
            Self::Bitmap => format!("{name}.mask"),
            Self::NOfM { .. } => format!("{name}.indices"),
        }
    }

    /// Bytes of one row of positions.
    pub fn positions_row_bytes(&self, cols: usize) -> usize {
        match *self {
            Self::Bitmap => cols.div_ceil(8),
            Self::NOfM { n, m } => (cols / m * n * index_bits(m)).div_ceil(8),
        }
    }

    /// Kept values per row (N:M only; a bitmap's rows vary).
    pub fn kept_per_row(&self, cols: usize) -> Option<usize> {
        match *self {
            Self::Bitmap => None,
            Self::NOfM { n, m } => Some(cols / m * n),
        }
    }
}

fn index_bits(m: usize) -> usize {
    if m <= 4 { 2 } else { 4 }
}

/// Every row's bitmap (`[rows, ⌈cols/8⌉]`) of the weights `kept(i)` says stay.
pub fn bitmap(rows: usize, cols: usize, kept: impl Fn(usize) -> bool) -> Vec<u8> {
    let rb = cols.div_ceil(8);
    let mut out = vec![0u8; rows * rb];
    for r in 0..rows {
        for c in (0..cols).filter(|&c| kept(r * cols + c)) {
            out[r * rb + c / 8] |= 1 << (c % 8);
        }
    }
    out
}

/// The kept flags `[rows, cols]` of a stored bitmap; `Err` says what size was expected.
pub fn read_bitmap(bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<bool>, String> {
    let rb = cols.div_ceil(8);
    if bytes.len() != rows * rb {
        return Err(format!("{} bytes ([{rows}, {rb}])", rows * rb));
    }
    Ok((0..rows * cols)
        .map(|i| bytes[i / cols * rb + (i % cols) / 8] >> (i % cols % 8) & 1 == 1)
        .collect())
}

/// The in-block positions (`[rows, cols·n/m]`) of an N:M layout holding every
/// weight `kept(i)` says stays: in each block its kept weights, then (if fewer
/// than `n`) the first pruned ones, ascending. `None` when a block keeps more than `n`.
pub fn n_of_m_positions(rows: usize, cols: usize, n: usize, m: usize, kept: impl Fn(usize) -> bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(rows * cols / m * n);
    for b in 0..rows * cols / m {
        let base = b * m;
        let live: Vec<usize> = (0..m).filter(|&j| kept(base + j)).collect();
        if live.len() > n {
            return None;
        }
        let mut pos: Vec<usize> = live.clone();
        pos.extend((0..m).filter(|j| !live.contains(j)).take(n - live.len()));
        pos.sort_unstable();
        out.extend(pos.iter().map(|&p| p as u8));
    }
    Some(out)
}

/// Positions packed as stored, rows of `per_row` positions.
pub fn pack_positions(pos: &[u8], rows: usize, layout: SparseLayout, cols: usize) -> Vec<u8> {
    let SparseLayout::NOfM { m, .. } = layout else {
        panic!("positions are for N:M layouts");
    };
    let (bits, per_row, rb) = (index_bits(m), pos.len() / rows.max(1), layout.positions_row_bytes(cols));
    let mut out = vec![0u8; rows * rb];
    for r in 0..rows {
        for (k, &p) in pos[r * per_row..(r + 1) * per_row].iter().enumerate() {
            let bit = k * bits;
            out[r * rb + bit / 8] |= p << (bit % 8);
        }
    }
    out
}

/// Stored positions back, checked: each block's positions strictly increase
/// and stay below `m`. `Err` says what was expected.
pub fn unpack_positions(bytes: &[u8], rows: usize, cols: usize, layout: SparseLayout) -> Result<Vec<u8>, String> {
    let SparseLayout::NOfM { n, m } = layout else {
        panic!("positions are for N:M layouts");
    };
    let (bits, per_row, rb) = (index_bits(m), cols / m * n, layout.positions_row_bytes(cols));
    if bytes.len() != rows * rb {
        return Err(format!("{} bytes ([{rows}, {rb}])", rows * rb));
    }
    let mask = (1u8 << bits) - 1;
    let mut out = Vec::with_capacity(rows * per_row);
    for r in 0..rows {
        for k in 0..per_row {
            let bit = k * bits;
            out.push(bytes[r * rb + bit / 8] >> (bit % 8) & mask);
        }
    }
    for block in out.chunks_exact(n) {
        if block.iter().any(|&p| p as usize >= m) || block.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "{n} increasing positions below {m} in every block, found {block:?}"
            ));
        }
    }
    Ok(out)
}

/// Scatter compacted rows `[rows, cols·n/m]` back to `[rows, cols]`, `fill` elsewhere.
pub fn scatter_n_of_m<T: Copy>(
    compact: &[T],
    pos: &[u8],
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
    fill: impl Fn(usize) -> T,
) -> Vec<T> {
    let mut out: Vec<T> = (0..rows * cols).map(&fill).collect();
    for (k, (&v, &p)) in compact.iter().zip(pos).enumerate() {
        let block = k / n;
        out[block * m + p as usize] = v;
    }
    out
}

/// Gather the values at `pos` (`[rows, cols]` → `[rows, cols·n/m]`).
pub fn gather_n_of_m<T: Copy>(dense: &[T], pos: &[u8], n: usize, m: usize) -> Vec<T> {
    pos.iter()
        .enumerate()
        .map(|(k, &p)| dense[k / n * m + p as usize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_bitmaps_round_trip_and_bad_ones_are_named() {
        // Two rows of 8, 2:4; the second row's first block keeps only one value.
        let w = [
            1.0f32, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 0.0, 0.0,
        ];
        let layout = SparseLayout::NOfM { n: 2, m: 4 };
        let pos = n_of_m_positions(2, 8, 2, 4, |i| w[i] != 0.0).unwrap();
        assert_eq!(pos, [0, 2, 1, 3, 0, 3, 0, 1]);
        let packed = pack_positions(&pos, 2, layout, 8);
        assert_eq!(packed.len(), 2 * layout.positions_row_bytes(8));
        assert_eq!(unpack_positions(&packed, 2, 8, layout).unwrap(), pos);
        let compact = gather_n_of_m(&w, &pos, 2, 4);
        assert_eq!(scatter_n_of_m(&compact, &pos, 2, 8, 2, 4, |_| 0.0), w);
        // Three kept in a block of 4 do not fit 2:4.
        assert!(n_of_m_positions(1, 4, 2, 4, |i| i < 3).is_none());
        // Repeated positions are refused, as is a short buffer.
        let e = unpack_positions(&[0], 1, 8, layout).unwrap_err();
        assert!(e.contains("increasing"), "{e}");
        assert!(unpack_positions(&[], 1, 8, layout).unwrap_err().contains("1 bytes"));
        let bits = bitmap(2, 8, |i| w[i] != 0.0);
        assert_eq!(bits, [0b1010_0101, 0b0011_1000]);
        let kept = read_bitmap(&bits, 2, 8).unwrap();
        assert_eq!(kept, w.iter().map(|v| *v != 0.0).collect::<Vec<_>>());
        assert!(read_bitmap(&bits[1..], 2, 8).unwrap_err().contains("2 bytes"));
        assert!(layout.problems(10).unwrap().contains("do not divide"));
        assert!(
            SparseLayout::NOfM { n: 2, m: 32 }
                .problems(64)
                .unwrap()
                .contains("≤ 16")
        );
    }
}
