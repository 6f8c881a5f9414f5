//! The one table of weight encodings.
//!
//! Every way a bundle can hold a weight is a variant of [`TensorEncoding`], and
//! everything that depends on the encoding is decided here, once:
//!
//! | encoding | storage (safetensors tensors)                                   | activation pairing                                   | kernel ([`choose_kernel`])          |
//! |----------|-----------------------------------------------------------------|------------------------------------------------------|-------------------------------------|
//! | `f32`    | `NAME` F32, canonical shape                                     | float input                                          | [`KernelChoice::Float`]             |
//! | `int4`   | `NAME.qweight` U8 `[rows, k_pad/2]` (two values a byte, [`pack`] block order), `NAME.scales` F32, `NAME.zero_points` I32 if asymmetric | int8 (dynamic rows, 8-bit static grid, Q8_0 blocks with groups of 32) or a 16-bit static grid | [`KernelChoice::Int8Input`] / [`KernelChoice::Int16Input`], else [`KernelChoice::Dequantized`] |
//! | `int8`   | `NAME.qweight` I8 `[rows, k_pad]`, scales and zero points as `int4` | as `int4`                                         | as `int4`                           |
//! | `int4-lpbq` | `NAME.qweight` U8 nibbles as `int4` (the 4-bit values), `NAME.multipliers` U8 `[rows, cols/block]` (each in [1, 16]), `NAME.scales` F32 `[rows, 1]` | as `int4` | as an int8 per-channel weight of values `q4 · m` ([`KernelChoice::Int8Input`] with `weight_bits` 8; the runtime keeps the nibbles and multiplies each block's exact dot by `m`) |
//!
//! | `sparse` | a pruned weight ([`crate::sparse`]): its kept values in an inner encoding — `f32` `[nnz]` after a `NAME.mask` U8 bitmap `[rows, ⌈cols/8⌉]`, or (`n-of-m`) `f32` / `int4` / `int8` over the compacted `[rows, cols·n/m]` (groups shrink by `n/m`, scales unchanged) with `NAME.indices` U8 positions (2 bits each for `m ≤ 4`, else 4) | as its inner encoding on the dense weight | as the dense weight it expands to on load (zeros exact; the kernels run it dense) |
//!
//! | `lut`    | a palettized weight ([`crate::lut`]): `NAME.indices` U8, every row's `bits`-bit indices as a bit stream (`⌈cols·bits/8⌉` bytes a row), `NAME.lut` F16 `[rows / group_rows, 2^bits]` | as `int8` per-channel, on each table's int8 grid ([`crate::lut::Palettized::kernel_view`]) | as that int8 weight ([`KernelChoice::Int8Input`] with `weight_bits` 8; float inputs: [`KernelChoice::Dequantized`] on it) |
//!
//! | `shared` | a weight that is another weight of the same shape, each output row scaled (FoldGPT's block sharing): `NAME.row_scales` F32 `[rows]` and, in the manifest, the source's name (`of`, itself not shared) | as its source | as its source, the outputs multiplied by the row scales after the kernel (the runtime holds the source's kernel once) |
//!
//! (`k_pad` is the row padded to whole blocks of 32.) Later encodings —
//! adapters — join as variants with their own rows in this table.
//!
//! Each kernel's scalar reference and its SIMD paths live in `oqt-kernels`
//! (`dot` for one weight row, `gemm` for a matrix, per-architecture modules
//! beside the scalar code); [`KernelChoice`] is the name both the runtime
//! (`oqt-runtime`'s `Linear`) and the Burn simulation (`oqt-model`'s
//! `quant_sim`) take from [`choose_kernel`], so the two always run the same
//! arithmetic. The bundle writer and reader store and load through
//! [`TensorEncoding::store`] and [`TensorEncoding::load_values`]: the stored
//! layout is the kernels' layout.

use crate::quant::pack::{BLOCK, int4_nibble, pack_int4_rows, padded_len};
use crate::quant::{ActGrid, ActMode, Granularity, QuantizedWeight, WeightSpec};
use crate::sparse::SparseLayout;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

/// How one tensor is stored in a bundle (the manifest's per-tensor entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TensorEncoding {
    /// Float32, canonical shape.
    F32 { shape: Vec<usize> },
    /// Integer weights `[rows, cols]` of at most 4 bits (`spec.bits` 2, 3 or 4),
    /// two per byte, `group` columns per scale.
    Int4 {
        rows: usize,
        cols: usize,
        group: usize,
        spec: WeightSpec,
    },
    /// 8-bit integer weights `[rows, cols]`, one byte each, `group` columns per scale.
    Int8 {
        rows: usize,
        cols: usize,
        group: usize,
        spec: WeightSpec,
    },
    /// LPBQ: 4-bit values two per byte, an integer multiplier per (row,
    /// block of `spec`'s block size) and one float scale per row.
    Int4Lpbq { rows: usize, cols: usize, spec: WeightSpec },
    /// A pruned weight `[rows, cols]`: its kept values in `values` (f32 `[nnz]`
    /// for a bitmap; f32 or integer over `[rows, cols·n/m]` for N:M) and their
    /// positions as `layout` says. Everything downstream sees the dense weight.
    Sparse {
        rows: usize,
        cols: usize,
        layout: SparseLayout,
        values: Box<TensorEncoding>,
    },
    /// A palettized weight `[rows, cols]`: `bits`-bit indices into one table
    /// of `2^bits` f16 values per `group_rows` output rows ([`crate::lut`]).
    Lut {
        rows: usize,
        cols: usize,
        bits: u8,
        group_rows: usize,
    },
    /// A shared weight `[rows, cols]`: row `r` is `row_scales[r]` times row
    /// `r` of tensor `of` (a weight of the same shape that is not itself
    /// shared). Only the row scales are stored under this name.
    Shared { rows: usize, cols: usize, of: String },
}

/// One safetensors tensor of an encoded weight: name, dtype, shape, bytes.
pub struct StoredTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The integer-grid fields of an `int4`/`int8` encoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntGrid {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub spec: WeightSpec,
    /// Storage width: 4 (nibbles) or 8 (bytes).
    pub width: u8,
    /// LPBQ grids: the block of input columns sharing one integer multiplier.
    pub lpbq_block: Option<usize>,
}

impl IntGrid {
    /// Scales stored: one per (row, group), or one for a per-tensor grid.
    pub fn scale_count(&self) -> usize {
        if self.spec.granularity == Granularity::PerTensor {
            1
        } else {
            self.rows * self.cols.div_ceil(self.group)
        }
    }

    /// Bytes of one stored row of values.
    pub fn row_bytes(&self) -> usize {
        let k_pad = padded_len(self.cols);
        if self.width == 4 { k_pad / 2 } else { k_pad }
    }

    /// Columns per scale as the integer kernels lay the weight out
    /// (`padded_len(cols)` for per-channel), when they can run it: symmetric
    /// grid, one scale per (row, group), groups a multiple of 32 that divide
    /// the padded row. `None`: the weight is multiplied dequantized, in f32.
    pub fn kernel_group(&self) -> Option<usize> {
        let k_pad = padded_len(self.cols);
        let group = if self.group == self.cols { k_pad } else { self.group };
        let aligned = group.is_multiple_of(BLOCK) && k_pad.is_multiple_of(group);
        (self.spec.symmetric && aligned && self.scale_count() == self.rows * (k_pad / group)).then_some(group)
    }
}

impl TensorEncoding {
    /// The encoding a quantized weight is stored in ([`Self::integer`]).
    pub fn of_quantized(qw: &QuantizedWeight) -> Self {
        Self::integer(qw.rows, qw.cols, qw.group, qw.spec)
    }

    /// A LUT weight's packed indices tensor.
    pub fn lut_indices_name(name: &str) -> String {
        format!("{name}.indices")
    }

    /// A LUT weight's tables tensor.
    pub fn lut_table_name(name: &str) -> String {
        format!("{name}.lut")
    }

    /// A palettized weight's encoding and stored tensors; `Err` names what is wrong.
    pub fn store_lut(name: &str, p: &crate::lut::Palettized) -> Result<(Self, Vec<StoredTensor>), String> {
        if let Some(problem) = p.problems() {
            return Err(problem);
        }
        let encoding = Self::Lut {
            rows: p.rows,
            cols: p.cols,
            bits: p.bits,
            group_rows: p.group_rows,
        };
        let stored = vec![
            StoredTensor {
                name: Self::lut_indices_name(name),
                dtype: Dtype::U8,
                shape: vec![p.rows, crate::lut::index_row_bytes(p.cols, p.bits)],
                bytes: crate::lut::pack_indices(&p.indices, p.rows, p.cols, p.bits),
            },
            StoredTensor {
                name: Self::lut_table_name(name),
                dtype: Dtype::F16,
                shape: vec![p.table_count(), p.entries()],
                bytes: p.tables.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ];
        Ok((encoding, stored))
    }

    /// A shared weight's row scales tensor.
    pub fn row_scales_name(name: &str) -> String {
        format!("{name}.row_scales")
    }

    /// The LPBQ multiplier tensor's name.
    pub fn multipliers_name(name: &str) -> String {
        format!("{name}.multipliers")
    }

    /// The encoding of integer weights on `spec`'s grid: values of at most 4
    /// bits are packed two per byte, 8-bit ones take a byte each.
    pub fn integer(rows: usize, cols: usize, group: usize, spec: WeightSpec) -> Self {
        if spec.granularity.lpbq_block().is_some() {
            Self::Int4Lpbq { rows, cols, spec }
        } else if spec.bits <= 4 {
            Self::Int4 {
                rows,
                cols,
                group,
                spec,
            }
        } else {
            Self::Int8 {
                rows,
                cols,
                group,
                spec,
            }
        }
    }

    /// The encoding's name in the manifest and in reports (`f32`, `int4`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::F32 { .. } => "f32",
            Self::Int4 { .. } => "int4",
            Self::Int8 { .. } => "int8",
            Self::Int4Lpbq { .. } => "int4-lpbq",
            Self::Sparse { .. } => "sparse",
            Self::Lut { .. } => "lut",
            Self::Shared { .. } => "shared",
        }
    }

    /// The canonical (dequantized) shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::F32 { shape } => shape.clone(),
            Self::Int4 { rows, cols, .. }
            | Self::Int8 { rows, cols, .. }
            | Self::Int4Lpbq { rows, cols, .. }
            | Self::Sparse { rows, cols, .. }
            | Self::Lut { rows, cols, .. }
            | Self::Shared { rows, cols, .. } => {
                vec![*rows, *cols]
            }
        }
    }

    /// The integer grid, for integer encodings (a sparse one's: the grid of
    /// the dense weight it expands to).
    pub fn int_grid(&self) -> Option<IntGrid> {
        let width = if matches!(self, Self::Int8 { .. }) { 8 } else { 4 };
        match *self {
            // A shared weight's grid is its source's: resolve `of` first.
            Self::F32 { .. } | Self::Shared { .. } => None,
            Self::Sparse {
                rows,
                cols,
                layout: SparseLayout::NOfM { n, m },
                ref values,
            } => values.int_grid().map(|g| IntGrid {
                rows,
                cols,
                group: if g.group == g.cols { cols } else { g.group * m / n },
                ..g
            }),
            Self::Sparse { .. } => None,
            // The kernels multiply a LUT weight as its int8 per-channel view.
            Self::Lut { rows, cols, .. } => Some(IntGrid {
                rows,
                cols,
                group: cols,
                spec: crate::lut::kernel_spec(),
                width: 8,
                lpbq_block: None,
            }),
            Self::Int4Lpbq { rows, cols, spec } => Some(IntGrid {
                rows,
                cols,
                group: cols,
                spec,
                width,
                lpbq_block: spec.granularity.lpbq_block(),
            }),
            Self::Int4 {
                rows,
                cols,
                group,
                spec,
            }
            | Self::Int8 {
                rows,
                cols,
                group,
                spec,
            } => Some(IntGrid {
                rows,
                cols,
                group,
                spec,
                width,
                lpbq_block: None,
            }),
        }
    }

    /// A short description for reports: `f32`, `int4 g32 sym`, `int8 per-channel sym`, …
    pub fn describe(&self) -> String {
        // One description for every shared weight (reports group by it); the
        // source is the manifest's `of`.
        if let Self::Shared { .. } = self {
            return "shared × row scales".into();
        }
        if let Self::Sparse { layout, .. } = self {
            let dense = match self.int_grid() {
                Some(g) => Self::integer(g.rows, g.cols, g.group, g.spec).describe(),
                None => "f32".into(),
            };
            return format!("{dense} {layout}");
        }
        if let Self::Lut {
            rows, bits, group_rows, ..
        } = *self
        {
            return if group_rows == rows {
                format!("lut{bits} per-tensor")
            } else {
                format!("lut{bits} g{group_rows}")
            };
        }
        match self.int_grid() {
            None => "f32".into(),
            Some(g) => {
                let gran = if let Some(b) = g.lpbq_block {
                    format!("lpbq{b}")
                } else if g.group == g.cols {
                    "per-channel".to_string()
                } else {
                    format!("g{}", g.group)
                };
                format!(
                    "int{} {gran} {}",
                    g.spec.bits,
                    if g.spec.symmetric { "sym" } else { "asym" }
                )
            }
        }
    }

    /// Bytes of the tensor data this encoding stores (what [`Self::store`]
    /// writes, headers aside): size budgets are planned on it.
    pub fn stored_bytes(&self) -> usize {
        if let Self::Sparse {
            rows,
            cols,
            layout,
            values,
        } = self
        {
            return values.stored_bytes() + rows * layout.positions_row_bytes(*cols);
        }
        if let Self::Lut {
            rows,
            cols,
            bits,
            group_rows,
        } = *self
        {
            return rows * crate::lut::index_row_bytes(cols, bits) + rows / group_rows.max(1) * (1 << bits) * 2;
        }
        if let Self::Shared { rows, .. } = *self {
            return rows * 4;
        }
        let Some(g) = self.int_grid() else {
            return self.shape().iter().product::<usize>() * 4;
        };
        let values = g.rows * g.row_bytes();
        let scales = g.scale_count() * 4;
        let zero_points = if g.spec.symmetric { 0 } else { g.scale_count() * 4 };
        let multipliers = g.lpbq_block.map_or(0, |b| g.rows * (g.cols / b));
        values + scales + zero_points + multipliers
    }

    /// The safetensors tensors (name, dtype) that hold tensor `name` in a bundle.
    pub fn stored_names(&self, name: &str) -> Vec<(String, Dtype)> {
        if let Self::Sparse { layout, values, .. } = self {
            let mut v = values.stored_names(name);
            v.push((layout.positions_name(name), Dtype::U8));
            return v;
        }
        if let Self::Lut { .. } = self {
            return vec![
                (Self::lut_indices_name(name), Dtype::U8),
                (Self::lut_table_name(name), Dtype::F16),
            ];
        }
        if let Self::Shared { .. } = self {
            return vec![(Self::row_scales_name(name), Dtype::F32)];
        }
        match self.int_grid() {
            None => vec![(name.to_string(), Dtype::F32)],
            Some(g) => {
                let mut v = vec![
                    (
                        format!("{name}.qweight"),
                        if g.width == 4 { Dtype::U8 } else { Dtype::I8 },
                    ),
                    (format!("{name}.scales"), Dtype::F32),
                ];
                if !g.spec.symmetric {
                    v.push((format!("{name}.zero_points"), Dtype::I32));
                }
                if g.lpbq_block.is_some() {
                    v.push((Self::multipliers_name(name), Dtype::U8));
                }
                v
            }
        }
    }

    /// The stored tensors of a quantized weight (this encoding must be
    /// [`Self::of_quantized`] of `qw`): values in the kernels' layout, rows padded
    /// to whole blocks of 32 (int4: symmetric values stored plus 8), scales F32,
    /// zero points I32.
    pub fn store(&self, name: &str, qw: &QuantizedWeight) -> Vec<StoredTensor> {
        let g = self.int_grid().expect("store() is for integer encodings");
        let k_pad = padded_len(qw.cols);
        let (dtype, bytes, shape) = if g.width == 4 {
            // Symmetric grids are stored offset by 8; asymmetric ones are already in [0, 15].
            let offset = if qw.spec.symmetric { 8 } else { 0 };
            // LPBQ stores the 4-bit factor of its expanded values.
            let values = match g.lpbq_block {
                Some(_) => std::borrow::Cow::Owned(qw.lpbq_factors().expect("an LPBQ weight")),
                None => std::borrow::Cow::Borrowed(&qw.q),
            };
            (
                Dtype::U8,
                pack_int4_rows(&values, qw.rows, qw.cols, offset),
                vec![qw.rows, k_pad / 2],
            )
        } else {
            let mut data = vec![0u8; qw.rows * k_pad];
            for r in 0..qw.rows {
                for c in 0..qw.cols {
                    data[r * k_pad + c] = qw.q[r * qw.cols + c] as u8;
                }
            }
            (Dtype::I8, data, vec![qw.rows, k_pad])
        };
        let groups_per_row = qw.scales.len()
            / if qw.spec.granularity == Granularity::PerTensor {
                1
            } else {
                qw.rows
            };
        let scale_shape = if groups_per_row == 1 && qw.scales.len() == 1 {
            vec![1]
        } else {
            vec![qw.rows, groups_per_row]
        };
        let mut out = vec![
            StoredTensor {
                name: format!("{name}.qweight"),
                dtype,
                shape,
                bytes,
            },
            StoredTensor {
                name: format!("{name}.scales"),
                dtype: Dtype::F32,
                shape: scale_shape.clone(),
                bytes: qw.scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ];
        if let (Some(block), Some(m)) = (g.lpbq_block, &qw.multipliers) {
            out.push(StoredTensor {
                name: Self::multipliers_name(name),
                dtype: Dtype::U8,
                shape: vec![qw.rows, qw.cols / block],
                bytes: m.clone(),
            });
        }
        if let Some(z) = &qw.zero_points {
            out.push(StoredTensor {
                name: format!("{name}.zero_points"),
                dtype: Dtype::I32,
                shape: scale_shape,
                bytes: z.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
        }
        out
    }

    /// An LPBQ weight's expanded values `q4 · m` from its stored 4-bit values
    /// ([`Self::load_values`]) and multiplier bytes; `Err` names what is wrong.
    pub fn expand_lpbq(&self, q4: &mut [i8], multipliers: &[u8]) -> Result<(), String> {
        let g = self.int_grid().expect("expand_lpbq() is for integer encodings");
        let block = g.lpbq_block.expect("expand_lpbq() is for LPBQ encodings");
        let blocks = g.cols / block;
        if multipliers.len() != g.rows * blocks {
            return Err(format!("{} multipliers ([{}, {blocks}])", g.rows * blocks, g.rows));
        }
        if let Some(bad) = multipliers
            .iter()
            .find(|&&m| m == 0 || m > crate::quant::spec::LPBQ_MAX_MULTIPLIER)
        {
            return Err(format!("multipliers in [1, 16], found {bad}"));
        }
        for (row, m) in q4.chunks_mut(g.cols).zip(multipliers.chunks(blocks)) {
            for (b, &m) in row.chunks_mut(block).zip(m) {
                b.iter_mut().for_each(|v| *v *= m as i8);
            }
        }
        Ok(())
    }

    /// The unpacked values `[rows, cols]` of an integer encoding from its stored
    /// `qweight` bytes (LPBQ: the 4-bit factors); `Err` says what size was expected.
    pub fn load_values(&self, qweight: &[u8]) -> Result<Vec<i8>, String> {
        let g = self.int_grid().expect("load_values() is for integer encodings");
        let (rows, cols) = (g.rows, g.cols);
        let row_bytes = g.row_bytes();
        if qweight.len() != rows * row_bytes {
            return Err(format!(
                "{} bytes for [{rows}, {cols}] at {} bits",
                rows * row_bytes,
                g.spec.bits
            ));
        }
        let mut q = vec![0i8; rows * cols];
        let offset = if g.spec.symmetric { 8 } else { 0 };
        for r in 0..rows {
            let row = &qweight[r * row_bytes..(r + 1) * row_bytes];
            for c in 0..cols {
                q[r * cols + c] = if g.width == 4 {
                    int4_nibble(row, c) as i8 - offset
                } else {
                    row[c] as i8
                };
            }
        }
        Ok(q)
    }
}

impl TensorEncoding {
    /// A pruned float weight `[rows, cols]` stored as `layout` (its zeros are
    /// the pruned weights): the encoding and its tensors. `Err` when an N:M
    /// block keeps more than `n` non-zeros.
    pub fn store_sparse_f32(
        name: &str,
        rows: usize,
        cols: usize,
        data: &[f32],
        layout: SparseLayout,
    ) -> Result<(Self, Vec<StoredTensor>), String> {
        use crate::sparse;
        if let Some(p) = layout.problems(cols) {
            return Err(p);
        }
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (values, positions, shape) = match layout {
            SparseLayout::Bitmap => {
                let kept: Vec<f32> = data.iter().copied().filter(|v| *v != 0.0).collect();
                let n = kept.len();
                (kept, sparse::bitmap(rows, cols, |i| data[i] != 0.0), vec![n])
            }
            SparseLayout::NOfM { n, m } => {
                let pos = sparse::n_of_m_positions(rows, cols, n, m, |i| data[i] != 0.0)
                    .ok_or_else(|| format!("more than {n} non-zeros in a block of {m}: not {n}:{m} sparse"))?;
                let kept = sparse::gather_n_of_m(data, &pos, n, m);
                (
                    kept,
                    sparse::pack_positions(&pos, rows, layout, cols),
                    vec![rows, cols / m * n],
                )
            }
        };
        let encoding = Self::Sparse {
            rows,
            cols,
            layout,
            values: Box::new(Self::F32 { shape: shape.clone() }),
        };
        let stored = vec![
            StoredTensor {
                name: name.into(),
                dtype: Dtype::F32,
                shape,
                bytes: f32_bytes(&values),
            },
            StoredTensor {
                name: layout.positions_name(name),
                dtype: Dtype::U8,
                shape: vec![rows, layout.positions_row_bytes(cols)],
                bytes: positions,
            },
        ];
        Ok((encoding, stored))
    }

    /// A pruned integer weight stored N:M: the kept codes compacted (groups
    /// shrink by `n/m`, scales and zero points unchanged) and their positions.
    /// `Err` when a block keeps more than `n` codes off the zero code, or the
    /// groups do not hold whole blocks.
    pub fn store_sparse_quantized(
        name: &str,
        qw: &QuantizedWeight,
        layout: SparseLayout,
    ) -> Result<(Self, Vec<StoredTensor>), String> {
        use crate::sparse;
        let SparseLayout::NOfM { n, m } = layout else {
            return Err("integer weights are stored sparse as N:M only".into());
        };
        if let Some(p) = layout.problems(qw.cols) {
            return Err(p);
        }
        if qw.multipliers.is_some() || !qw.group.is_multiple_of(m) {
            return Err(format!(
                "groups of {} columns (LPBQ or not a multiple of {m}) cannot be stored {n}:{m}",
                qw.group
            ));
        }
        let zero = |i: usize| zero_code(qw, i);
        let pos = sparse::n_of_m_positions(qw.rows, qw.cols, n, m, |i| qw.q[i] != zero(i))
            .ok_or_else(|| format!("more than {n} non-zero codes in a block of {m}: not {n}:{m} sparse"))?;
        let cols = qw.cols / m * n;
        let compact = QuantizedWeight {
            cols,
            group: if qw.group == qw.cols { cols } else { qw.group / m * n },
            q: sparse::gather_n_of_m(&qw.q, &pos, n, m),
            ..qw.clone()
        };
        let inner = Self::of_quantized(&compact);
        let mut stored = inner.store(name, &compact);
        stored.push(StoredTensor {
            name: layout.positions_name(name),
            dtype: Dtype::U8,
            shape: vec![qw.rows, layout.positions_row_bytes(qw.cols)],
            bytes: sparse::pack_positions(&pos, qw.rows, layout, qw.cols),
        });
        let encoding = Self::Sparse {
            rows: qw.rows,
            cols: qw.cols,
            layout,
            values: Box::new(inner),
        };
        Ok((encoding, stored))
    }

    /// Problems with an encoding's own fields: a sparse one's inner encoding
    /// against its layout, a LUT's bits and row groups; `None` for the others.
    pub fn field_problems(&self) -> Option<String> {
        if let Self::Shared { rows, cols, of } = self {
            return (*rows == 0 || *cols == 0 || of.is_empty())
                .then(|| "a shared weight needs rows, cols and the name of its source (`of`)".into());
        }
        if let Self::Lut {
            rows, bits, group_rows, ..
        } = *self
        {
            return crate::lut::shape_problems(rows, bits, group_rows);
        }
        let Self::Sparse {
            rows,
            cols,
            layout,
            values,
        } = self
        else {
            return None;
        };
        if let Some(p) = layout.problems(*cols) {
            return Some(p);
        }
        match (layout, values.as_ref()) {
            (_, Self::Sparse { .. } | Self::Int4Lpbq { .. } | Self::Lut { .. }) => Some(format!(
                "values: a `{}` encoding cannot hold sparse values",
                values.kind()
            )),
            (SparseLayout::Bitmap, Self::F32 { shape }) if shape.len() == 1 && shape[0] <= rows * cols => None,
            (SparseLayout::Bitmap, _) => {
                Some("values: a bitmap's values are f32 `[nnz]` with nnz ≤ rows × cols".into())
            }
            (SparseLayout::NOfM { .. }, v) => {
                let want = vec![*rows, layout.kept_per_row(*cols).expect("N:M")];
                (v.shape() != want).then(|| format!("values: shape {:?}, expected {want:?}", v.shape()))
            }
        }
    }
}

/// The code that dequantizes to exactly zero at weight index `i` (row-major).
pub fn zero_code(qw: &QuantizedWeight, i: usize) -> i8 {
    match &qw.zero_points {
        None => 0,
        Some(z) if z.len() == 1 => z[0] as i8,
        Some(z) => {
            let groups = qw.cols.div_ceil(qw.group);
            z[i / qw.cols * groups + i % qw.cols / qw.group] as i8
        }
    }
}

/// The 4-bit factors `q / m` of an LPBQ weight's expanded values.
/// The llama.cpp block type whose grid a weight on `spec` may already be on
/// (GGUF export keeps such weights exactly; the block size is checked when encoding).
pub fn natural_gguf_type(spec: &WeightSpec) -> Option<crate::gguf::GgmlType> {
    use crate::gguf::GgmlType;
    if spec.granularity.lpbq_block().is_some() {
        return None; // per-row float scales: no GGUF block type holds them exactly
    }
    match (spec.bits, spec.symmetric) {
        (8, true) => Some(GgmlType::Q8_0),
        (4, true) => Some(GgmlType::Q4_0),
        (4, false) => Some(GgmlType::Q4_1),
        _ => None,
    }
}

/// What feeds a linear layer: its input site's activation quantizer, as the
/// deployment spec resolves it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActInput {
    Float,
    /// Per row, asymmetric int8 from the row's range (CPU style).
    Dynamic,
    /// One calibrated grid for the whole tensor (NPU style), 8 or 16 bits.
    Static(ActGrid),
    /// llama.cpp's Q8_0 blocks of 32 along each row (its CPU dot products).
    Q8Blocks,
}

impl ActInput {
    /// The input of a linear layer under activation scheme `mode`, whose input
    /// site has grid `static_grid` in static graphs.
    pub fn resolve(mode: ActMode, static_grid: Option<ActGrid>) -> Self {
        match (mode, static_grid) {
            (ActMode::Static, Some(g)) => Self::Static(g),
            (ActMode::Dynamic, _) => Self::Dynamic,
            (ActMode::LlamaCppQ8_0, _) => Self::Q8Blocks,
            _ => Self::Float,
        }
    }

    /// Reaches the integer kernels as int8 values.
    fn is_int8(self) -> bool {
        match self {
            Self::Dynamic | Self::Q8Blocks => true,
            Self::Static(g) => g.bits == 8,
            Self::Float => false,
        }
    }
}

/// Which arithmetic multiplies a weight by its input; the runtime and the
/// simulation both follow it (see the module docs for the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// Float weights, float inputs, f32 GEMM.
    Float,
    /// Integer weights the kernels cannot pair with this input (asymmetric
    /// grids, unaligned groups, weight-only recipes): dequantized to f32, the
    /// input quantized and dequantized as its site says, f32 GEMM.
    Dequantized,
    /// Int8 inputs × `weight_bits`-wide stored weights (4: nibbles, 8: bytes):
    /// exact integer dots per group of `group` columns, the kernels' contract.
    Int8Input { weight_bits: u8, group: usize },
    /// 16-bit static inputs × int4/int8 weights: exact (i64) dots per group.
    Int16Input { group: usize },
}

/// The one decision of which kernel multiplies `encoding` by `input`.
pub fn choose_kernel(encoding: &TensorEncoding, input: ActInput) -> KernelChoice {
    let Some(grid) = encoding.int_grid() else {
        return KernelChoice::Float;
    };
    let Some(group) = grid.kernel_group() else {
        return KernelChoice::Dequantized;
    };
    match input {
        ActInput::Static(g) if g.bits == 16 => KernelChoice::Int16Input { group },
        // Block activation scales pair with block weight scales only.
        ActInput::Q8Blocks if group != BLOCK => KernelChoice::Dequantized,
        // LPBQ multiplies as its expanded int8 per-channel values.
        i if i.is_int8() => KernelChoice::Int8Input {
            weight_bits: if grid.lpbq_block.is_some() { 8 } else { grid.width },
            group,
        },
        _ => KernelChoice::Dequantized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_weight;
    use crate::testing::pseudo_random;

    fn encoded(
        bits: u8,
        gran: Granularity,
        symmetric: bool,
        rows: usize,
        cols: usize,
    ) -> (QuantizedWeight, TensorEncoding) {
        let w = pseudo_random(rows * cols, 3, 0.5);
        let qw = quantize_weight(&w, rows, cols, &WeightSpec::new(bits, gran, symmetric), 1.0);
        let e = TensorEncoding::of_quantized(&qw);
        (qw, e)
    }

    #[test]
    fn stored_values_load_back_exactly() {
        for (bits, gran, sym) in [
            (4, Granularity::PerGroup(32), true),
            (4, Granularity::PerChannel, false),
            (3, Granularity::PerChannel, true),
            (8, Granularity::PerGroup(64), true),
            (8, Granularity::PerTensor, false),
        ] {
            let (qw, e) = encoded(bits, gran, sym, 5, 70);
            let stored = e.store("w", &qw);
            let names: Vec<_> = stored.iter().map(|t| (t.name.clone(), t.dtype)).collect();
            assert_eq!(names, e.stored_names("w"), "{bits} {gran:?} {sym}");
            assert_eq!(e.load_values(&stored[0].bytes).unwrap(), qw.q, "{bits} {gran:?} {sym}");
            assert!(
                e.load_values(&stored[0].bytes[1..])
                    .unwrap_err()
                    .contains("bytes for [5, 70]")
            );
        }
    }

    #[test]
    fn the_kernel_follows_the_grid_and_the_input() {
        let g8 = ActGrid::from_range(-1.0, 1.0, 8);
        let g16 = ActGrid::from_range(-1.0, 1.0, 16);
        let (_, w4) = encoded(4, Granularity::PerGroup(32), true, 4, 64);
        let (_, w8pc) = encoded(8, Granularity::PerChannel, true, 4, 70);
        let (_, asym) = encoded(4, Granularity::PerChannel, false, 4, 64);
        let (_, g64) = encoded(4, Granularity::PerGroup(64), true, 4, 128);
        let int8 = |weight_bits, group| KernelChoice::Int8Input { weight_bits, group };
        assert_eq!(choose_kernel(&w4, ActInput::Dynamic), int8(4, 32));
        assert_eq!(choose_kernel(&w4, ActInput::Static(g8)), int8(4, 32));
        assert_eq!(choose_kernel(&w4, ActInput::Q8Blocks), int8(4, 32));
        assert_eq!(
            choose_kernel(&w4, ActInput::Static(g16)),
            KernelChoice::Int16Input { group: 32 }
        );
        assert_eq!(choose_kernel(&w4, ActInput::Float), KernelChoice::Dequantized);
        // Per-channel: one group of the padded row (70 → 96).
        assert_eq!(choose_kernel(&w8pc, ActInput::Dynamic), int8(8, 96));
        assert_eq!(choose_kernel(&w8pc, ActInput::Q8Blocks), KernelChoice::Dequantized);
        assert_eq!(choose_kernel(&g64, ActInput::Q8Blocks), KernelChoice::Dequantized);
        assert_eq!(choose_kernel(&g64, ActInput::Dynamic), int8(4, 64));
        assert_eq!(choose_kernel(&asym, ActInput::Dynamic), KernelChoice::Dequantized);
        let f = TensorEncoding::F32 { shape: vec![4, 64] };
        assert_eq!(choose_kernel(&f, ActInput::Static(g8)), KernelChoice::Float);
    }

    #[test]
    fn manifest_names_of_encodings() {
        let (_, w4) = encoded(4, Granularity::PerGroup(32), true, 2, 64);
        let v = serde_json::to_value(&w4).unwrap();
        assert_eq!(v["kind"], "int4");
        assert_eq!(serde_json::from_value::<TensorEncoding>(v).unwrap(), w4);
        assert_eq!(w4.describe(), "int4 g32 sym");
    }
}
