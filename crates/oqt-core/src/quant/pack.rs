//! The int4 storage layout shared by bundles and the integer kernels.
//!
//! Rows are padded to a multiple of [`BLOCK`] columns. Per block of 32, byte
//! `i` holds value `i` in its low nibble and value `i + 16` in its high nibble
//! (llama.cpp's Q4_0 order: one load, a mask and a shift give two contiguous
//! runs of 16). Values are stored plus an offset (8 for symmetric grids, whose
//! values are in `[−8, 7]`; 0 for asymmetric ones in `[0, 15]`); padding holds
//! the stored form of 0.

pub const BLOCK: usize = 32;

/// Input width padded to whole blocks.
pub fn padded_len(k: usize) -> usize {
    k.div_ceil(BLOCK) * BLOCK
}

/// Pack `rows × cols` 4-bit values (row-major) into `rows × padded_len(cols) / 2` bytes.
pub fn pack_int4_rows(q: &[i8], rows: usize, cols: usize, offset: i8) -> Vec<u8> {
    assert_eq!(q.len(), rows * cols);
    let k_pad = padded_len(cols);
    let mut out = vec![0u8; rows * k_pad / 2];
    for r in 0..rows {
        let at = |c: usize| -> u8 {
            let v = if c < cols { q[r * cols + c] + offset } else { offset };
            assert!(
                (0..16).contains(&v),
                "4-bit value {} out of range at ({r}, {c})",
                v - offset
            );
            v as u8
        };
        for b in 0..k_pad / BLOCK {
            for i in 0..16 {
                out[(r * k_pad + b * BLOCK) / 2 + i] = at(b * BLOCK + i) | (at(b * BLOCK + 16 + i) << 4);
            }
        }
    }
    out
}

/// The stored nibble of column `c` in one packed row (before removing the offset).
#[inline]
pub fn int4_nibble(row: &[u8], c: usize) -> u8 {
    let byte = row[c / BLOCK * BLOCK / 2 + c % 16];
    if c % BLOCK < 16 { byte & 0x0F } else { byte >> 4 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_puts_columns_i_and_i_plus_16_in_one_byte() {
        let q: Vec<i8> = (0..40).map(|c| (c % 16) as i8 - 8).collect();
        let packed = pack_int4_rows(&q, 1, 40, 8);
        assert_eq!(packed.len(), 32);
        // Columns 0 and 16 are both −8 (stored 0); columns 1 and 17 are −7 (stored 1).
        assert_eq!(packed[0], 0x00);
        assert_eq!(packed[1], 0x11);
        for (c, &v) in q.iter().enumerate() {
            assert_eq!(int4_nibble(&packed, c) as i8 - 8, v);
        }
        // Padding (columns 40..64) stores zero as 8.
        assert_eq!(int4_nibble(&packed, 50), 8);
    }
}
