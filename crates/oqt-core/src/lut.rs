//! Palettized weights: the `lut` encoding
//! ([`crate::encoding::TensorEncoding::Lut`]).
//!
//! Each weight is a `bits`-bit index into a table of `2^bits` f16 values;
//! `group_rows` consecutive output rows share one table (coremltools'
//! "grouped channel" palettization; `group_rows = rows` is per-tensor).
//! Stored as `NAME.indices` U8 — every row's indices as a bit stream from
//! the low bit of each byte, rows padded to whole bytes — and `NAME.lut` F16
//! `[rows / group_rows, 2^bits]`.
//!
//! **Deployed arithmetic.** Each table is rounded once, at load, onto a
//! symmetric 8-bit grid of its own scale (`max |t| / 127`, half to even), so a
//! LUT weight runs as the per-channel int8 weight [`Palettized::kernel_view`]
//! returns: on the int8 kernels with integer inputs, dequantized (each weight
//! within half an int8 step of its f16 value) with float inputs. The
//! simulation multiplies the same view, so runtime = simulation holds by
//! construction; GGUF and HF export write the f16 values themselves.

use crate::quant::{Granularity, QuantizedWeight, WeightSpec};
use half::f16;

/// Index widths a `lut` encoding stores.
pub const LUT_BITS: std::ops::RangeInclusive<u8> = 1..=8;

/// A palettized weight `[rows, cols]`, indices unpacked one per byte.
#[derive(Debug, Clone, PartialEq)]
pub struct Palettized {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    /// Output rows sharing one table.
    pub group_rows: usize,
    /// `[rows / group_rows, 2^bits]`.
    pub tables: Vec<f16>,
    /// `[rows, cols]`, each `< 2^bits`.
    pub indices: Vec<u8>,
}

/// Problems with a palette's shape: bits outside 1–8, a group of rows that
/// does not divide the output rows.
pub fn shape_problems(rows: usize, bits: u8, group_rows: usize) -> Option<String> {
    if !LUT_BITS.contains(&bits) {
        return Some(format!("bits: expected 1–8, found {bits}"));
    }
    if rows == 0 {
        return Some("rows: expected at least 1".into());
    }
    if group_rows == 0 || !rows.is_multiple_of(group_rows) {
        return Some(format!(
            "group of output channels: expected a divisor of the {rows} output channels, found {group_rows}"
        ));
    }
    None
}

impl Palettized {
    /// Entries per table.
    pub fn entries(&self) -> usize {
        1 << self.bits
    }

    /// Tables stored.
    pub fn table_count(&self) -> usize {
        self.rows / self.group_rows
    }

    /// The table row `r` reads.
    pub fn table_of_row(&self, r: usize) -> &[f16] {
        let e = self.entries();
        let t = r / self.group_rows;
        &self.tables[t * e..(t + 1) * e]
    }

    /// Problems with the fields' sizes and values (hostile bundles).
    pub fn problems(&self) -> Option<String> {
        if let Some(p) = shape_problems(self.rows, self.bits, self.group_rows) {
            return Some(p);
        }
        if self.tables.len() != self.table_count() * self.entries() {
            return Some(format!(
                "tables: expected {} f16 values ([{}, {}]), found {}",
                self.table_count() * self.entries(),
                self.table_count(),
                self.entries(),
                self.tables.len()
            ));
        }
        if let Some(t) = self.tables.iter().find(|t| !t.is_finite()) {
            return Some(format!("tables: expected finite values, found {t}"));
        }
        if self.cols == 0 {
            return Some("cols: expected at least 1".into());
        }
        if let Some(i) = self.indices.iter().find(|&&i| i as usize >= self.entries()) {
            return Some(format!("indices: expected values below {}, found {i}", self.entries()));
        }
        if Some(self.indices.len()) != self.rows.checked_mul(self.cols) {
            return Some(format!(
                "indices: expected {} ([{}, {}]), found {}",
                self.rows * self.cols,
                self.rows,
                self.cols,
                self.indices.len()
            ));
        }
        None
    }

    /// The float weight `[rows, cols]` (each weight its f16 table value).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let t = self.table_of_row(r);
            out.extend(
                self.indices[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .map(|&i| t[i as usize].to_f32()),
            );
        }
        out
    }

    /// Each table on its int8 grid: `(scale, codes)` per table.
    pub fn int8_tables(&self) -> Vec<(f32, Vec<i8>)> {
        self.tables
            .chunks(self.entries())
            .map(|t| {
                let amax = t.iter().fold(0f32, |a, v| a.max(v.to_f32().abs()));
                let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                let codes = t
                    .iter()
                    .map(|v| (v.to_f32() / scale).round_ties_even().clamp(-127.0, 127.0) as i8)
                    .collect();
                (scale, codes)
            })
            .collect()
    }

    /// The int8 per-channel weight the integer kernels multiply (module docs).
    pub fn kernel_view(&self) -> QuantizedWeight {
        let tables = self.int8_tables();
        let mut q = Vec::with_capacity(self.rows * self.cols);
        let mut scales = Vec::with_capacity(self.rows);
        for r in 0..self.rows {
            let (scale, codes) = &tables[r / self.group_rows];
            q.extend(
                self.indices[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .map(|&i| codes[i as usize]),
            );
            scales.push(*scale);
        }
        QuantizedWeight {
            rows: self.rows,
            cols: self.cols,
            group: self.cols,
            q,
            scales,
            zero_points: None,
            spec: kernel_spec(),
            multipliers: None,
        }
    }
}

/// The grid of [`Palettized::kernel_view`]: 8-bit symmetric per-channel.
pub fn kernel_spec() -> WeightSpec {
    WeightSpec::new(8, Granularity::PerChannel, true)
}

/// Bytes of one row of `bits`-bit indices.
pub fn index_row_bytes(cols: usize, bits: u8) -> usize {
    (cols * bits as usize).div_ceil(8)
}

/// Pack `[rows, cols]` indices, `bits` each, from the low bit of each byte,
/// every row starting on a byte.
pub fn pack_indices(indices: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let rb = index_row_bytes(cols, bits);
    let mut out = vec![0u8; rows * rb];
    for (row, dst) in indices.chunks(cols).zip(out.chunks_mut(rb)) {
        for (c, &v) in row.iter().enumerate() {
            let bit = c * bits as usize;
            let word = (v as u16) << (bit % 8);
            dst[bit / 8] |= word as u8;
            if bit % 8 + bits as usize > 8 {
                dst[bit / 8 + 1] |= (word >> 8) as u8;
            }
        }
    }
    out
}

/// Unpack [`pack_indices`]'s bytes; `Err` says what size was expected (also
/// for shapes whose sizes overflow: a hostile manifest).
pub fn unpack_indices(bytes: &[u8], rows: usize, cols: usize, bits: u8) -> Result<Vec<u8>, String> {
    let sizes = cols
        .checked_mul(bits as usize)
        .and_then(|b| rows.checked_mul(b.div_ceil(8)))
        .zip(rows.checked_mul(cols));
    let Some((total, _)) = sizes.filter(|_| cols > 0 && (1..=8).contains(&bits)) else {
        return Err(format!(
            "a [{rows}, {cols}] shape of {bits}-bit indices that fits in memory"
        ));
    };
    let rb = index_row_bytes(cols, bits);
    if bytes.len() != total {
        return Err(format!("{} bytes ({bits}-bit indices of [{rows}, {cols}])", rows * rb));
    }
    let mask = (1u16 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for src in bytes.chunks(rb.max(1)).take(rows) {
        for c in 0..cols {
            let bit = c * bits as usize;
            let lo = src[bit / 8] as u16;
            let hi = if bit % 8 + bits as usize > 8 {
                src[bit / 8 + 1] as u16
            } else {
                0
            };
            out.push((((lo | hi << 8) >> (bit % 8)) & mask) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_round_trip_at_every_width() {
        for bits in LUT_BITS {
            let (rows, cols) = (3, 13);
            let idx: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let packed = pack_indices(&idx, rows, cols, bits);
            assert_eq!(packed.len(), rows * index_row_bytes(cols, bits));
            assert_eq!(unpack_indices(&packed, rows, cols, bits).unwrap(), idx, "{bits} bits");
            assert!(unpack_indices(&packed[1..], rows, cols, bits).is_err());
        }
    }

    #[test]
    fn the_kernel_view_is_each_table_on_its_int8_grid() {
        let p = Palettized {
            rows: 4,
            cols: 2,
            bits: 1,
            group_rows: 2,
            tables: [0.5f32, -1.0, 0.25, 0.0].map(f16::from_f32).to_vec(),
            indices: vec![0, 1, 1, 0, 0, 0, 1, 1],
        };
        assert_eq!(p.problems(), None);
        assert_eq!(p.dequantize(), vec![0.5, -1.0, -1.0, 0.5, 0.25, 0.25, 0.0, 0.0]);
        let qw = p.kernel_view();
        assert_eq!(qw.q, vec![64, -127, -127, 64, 127, 127, 0, 0]);
        assert_eq!(qw.scales, vec![1.0 / 127.0, 1.0 / 127.0, 0.25 / 127.0, 0.25 / 127.0]);
        assert!(shape_problems(4, 0, 2).unwrap().contains("1–8"));
        // Hostile shapes and values are errors, not panics.
        assert!(unpack_indices(&[], 1, 1 << 61, 8).is_err());
        assert!(unpack_indices(&[], 1, 0, 4).is_err());
        let mut bad = p.clone();
        bad.indices[0] = 2;
        assert!(bad.problems().unwrap().contains("below 2"));
        bad.indices[0] = 0;
        bad.cols = 0;
        assert!(bad.problems().unwrap().contains("cols"));
        assert!(shape_problems(4, 4, 3).unwrap().contains("divisor"));
    }
}
