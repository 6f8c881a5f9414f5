//! A linear layer as the runtime stores it, and how its input is quantized.

use oqt_core::encoding::{ActInput, KernelChoice, TensorEncoding, choose_kernel};
use oqt_core::lut::Palettized;
use oqt_core::quant::{ActGrid, QuantizedWeight, dequantize_weight};
use oqt_kernels::panels::has_panel_kernel;
use oqt_kernels::{
    Int4Panels, Isa, PackedInt4, PackedInt8, by_weight_rows, concat_panels, dot_wide, has_lut_kernel,
    lut_panel_problem, matmul_int4, matmul_int4_panels, matmul_int8, quantize_row, quantize_rows, quantize_rows_q8_0,
    quantize_rows_static, repack_int4, repack_int4_lpbq, repack_lut,
};

/// The weights and the kernel that multiplies them.
pub enum Kernel {
    /// `[out, in]` row-major f32.
    F32 { w: Vec<f32>, out: usize, inp: usize },
    /// Int8 activations × int4 weights, row kernels (the scalar and NEON paths).
    Int4(PackedInt4),
    /// Int8 activations × int4 weights repacked into panels at load
    /// ([`repack_int4`]), or palettized weights as LUT panels
    /// ([`repack_lut`]): the register-tiled x86 kernels.
    Int4Panels(Int4Panels),
    /// Int8 activations × int8 weights.
    Int8(PackedInt8),
    /// 16-bit static activations × int4/int8 weights (a W8A16-style layer):
    /// exact integer dots per group (i64), then the kernels' scale-and-sum.
    Int16Input(WideWeights),
}

/// Integer weights for [`Kernel::Int16Input`]: `q` `[rows, cols]`, one scale per
/// row and group of `group` columns (`groups` per row).
pub struct WideWeights {
    pub q: Vec<i8>,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub groups: usize,
    pub scales: Vec<f32>,
}

impl WideWeights {
    /// `x` `[m, cols]` on grid `g` → `[m, rows]`: per group `v = (s_a·s_w)·dot`
    /// (the dot exact in i64, rounded once to f32), groups summed in eight
    /// interleaved partial sums finished pairwise — the Int4/Int8 kernels'
    /// contract, which the simulation follows.
    fn forward(&self, isa: Isa, x: &[f32], m: usize, g: ActGrid) -> Vec<f32> {
        let inv = g.inv_scale();
        let xq: Vec<i32> = x.iter().map(|&v| g.quantize(v, inv) - g.zero_point).collect();
        let mut y = vec![0f32; m * self.rows];
        by_weight_rows(m, self.rows, &mut y, |i, n| {
            let (xr, wr) = (
                &xq[i * self.cols..(i + 1) * self.cols],
                &self.q[n * self.cols..(n + 1) * self.cols],
            );
            let mut lanes = [0f32; 8];
            for gi in 0..self.groups {
                let lo = gi * self.group;
                let hi = ((gi + 1) * self.group).min(self.cols);
                let dot: i64 = if lo < hi {
                    dot_wide(isa, &xr[lo..hi], &wr[lo..hi])
                } else {
                    0
                };
                let v = (g.scale * self.scales[n * self.groups + gi]) * dot as f32;
                if self.groups == 1 {
                    return v;
                }
                lanes[gi % 8] += v;
            }
            ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        });
        y
    }
}

/// What happens to a linear layer's input before the multiply: its input
/// site's quantizer as the deployment spec resolves it.
pub type InputQuant = ActInput;

pub struct Linear {
    pub kernel: Kernel,
    pub input: InputQuant,
}

impl Linear {
    pub fn out_dim(&self) -> usize {
        match &self.kernel {
            Kernel::F32 { out, .. } => *out,
            Kernel::Int4(w) => w.rows,
            Kernel::Int4Panels(w) => w.rows,
            Kernel::Int8(w) => w.rows,
            Kernel::Int16Input(w) => w.rows,
        }
    }

    /// Weight row `n` in f32 (`out.len()` = the input width): what
    /// `dequantize_weight` gives for that row, read from the kernel's own
    /// storage — so a tied embedding is looked up without an f32 copy of it.
    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        match &self.kernel {
            Kernel::F32 { w, inp, .. } => out.copy_from_slice(&w[n * inp..(n + 1) * inp]),
            Kernel::Int4(w) => {
                let groups = w.groups();
                for (c, o) in out.iter_mut().enumerate() {
                    *o = w.value(n, c) as i32 as f32 * w.scales[n * groups + c / w.group];
                }
            }
            Kernel::Int4Panels(w) => {
                for (c, o) in out.iter_mut().enumerate() {
                    *o = w.weight(n, c) as f32 * w.scale(n, c);
                }
            }
            Kernel::Int8(w) => {
                let groups = w.groups();
                for (c, o) in out.iter_mut().enumerate() {
                    *o = w.data[n * w.k_pad + c] as i32 as f32 * w.scales[n * groups + c / w.group];
                }
            }
            Kernel::Int16Input(w) => {
                for (c, o) in out.iter_mut().enumerate() {
                    *o = w.q[n * w.cols + c] as i32 as f32 * w.scales[n * w.groups + c / w.group];
                }
            }
        }
    }

    pub fn float(w: Vec<f32>, out: usize, inp: usize) -> Self {
        Self {
            kernel: Kernel::F32 { w, out, inp },
            input: InputQuant::Float,
        }
    }

    /// From a bundle's quantized weight whose input is quantized as `input`
    /// says; the encoding table ([`choose_kernel`]) picks the kernel, as it does
    /// for the simulation. int4 weights are repacked into panels when `isa`
    /// has a panel kernel (one named load-time step, [`repack_int4`]).
    pub fn from_quantized(qw: &QuantizedWeight, input: InputQuant, isa: Isa) -> Self {
        let group = (qw.group != qw.cols).then_some(qw.group);
        let kernel = match choose_kernel(&TensorEncoding::of_quantized(qw), input) {
            KernelChoice::Int16Input { group: kg } => {
                let k_pad = oqt_core::quant::pack::padded_len(qw.cols);
                Kernel::Int16Input(WideWeights {
                    q: qw.q.clone(),
                    rows: qw.rows,
                    cols: qw.cols,
                    group: kg,
                    groups: k_pad / kg,
                    scales: qw.scales.clone(),
                })
            }
            KernelChoice::Int8Input { weight_bits: 4, .. } => {
                let packed = PackedInt4::pack(&qw.q, qw.rows, qw.cols, group, qw.scales.clone());
                if has_panel_kernel(isa) {
                    Kernel::Int4Panels(repack_int4(&packed))
                } else {
                    Kernel::Int4(packed)
                }
            }
            // LPBQ: the expanded grid is int8 per channel; on panel ISAs the
            // 4-bit factors run in panels with their block multipliers (half
            // the bytes, the same outputs bit for bit).
            KernelChoice::Int8Input { .. }
                if has_panel_kernel(isa)
                    && input != InputQuant::Q8Blocks
                    && let (Some(block), Some(m)) = (qw.spec.granularity.lpbq_block(), &qw.multipliers)
                    && block.is_multiple_of(oqt_kernels::BLOCK) =>
            {
                let q4 = qw.lpbq_factors().expect("an LPBQ weight");
                let per_block = qw
                    .scales
                    .iter()
                    .flat_map(|&s| std::iter::repeat_n(s, qw.cols / block))
                    .collect();
                let packed = PackedInt4::pack(&q4, qw.rows, qw.cols, Some(block), per_block);
                Kernel::Int4Panels(repack_int4_lpbq(&packed, m))
            }
            KernelChoice::Int8Input { .. } => {
                Kernel::Int8(PackedInt8::pack(&qw.q, qw.rows, qw.cols, group, qw.scales.clone()))
            }
            KernelChoice::Dequantized | KernelChoice::Float => Kernel::F32 {
                w: dequantize_weight(qw),
                out: qw.rows,
                inp: qw.cols,
            },
        };
        Self { kernel, input }
    }

    /// From a palettized (`lut`) weight: with integer inputs on an ISA with
    /// LUT panels ([`repack_lut`]) and a palette they fit (≤ 16 entries,
    /// tables shared by multiples of four rows, whole 32-column blocks), the
    /// indices stay 4-bit and are looked up in register; otherwise the int8
    /// kernel view runs as any quantized weight. Both compute the kernel
    /// view's int8 per-channel arithmetic, bit for bit.
    pub fn from_palettized(p: &Palettized, input: InputQuant, isa: Isa) -> Self {
        // The encoding table decides, as for the simulation (a `lut` encoding's
        // grid is its int8 view); the view itself is built only when it runs.
        let encoding = TensorEncoding::Lut {
            rows: p.rows,
            cols: p.cols,
            bits: p.bits,
            group_rows: p.group_rows,
        };
        let integer_input = matches!(choose_kernel(&encoding, input), KernelChoice::Int8Input { .. });
        if integer_input
            && input != InputQuant::Q8Blocks
            && has_lut_kernel(isa)
            && lut_panel_problem(p.rows, p.cols, p.entries(), p.group_rows).is_none()
        {
            let (scales, codes): (Vec<f32>, Vec<Vec<i8>>) = p.int8_tables().into_iter().unzip();
            let panels = repack_lut(&p.indices, p.rows, p.cols, p.group_rows, &codes, &scales);
            return Self {
                kernel: Kernel::Int4Panels(panels),
                input,
            };
        }
        Self::from_quantized(&p.kernel_view(), input, isa)
    }

    /// `x` `[m, in]` → `[m, out]`.
    pub fn forward(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.out_dim()];
        let quantized = |k: usize| match self.input {
            InputQuant::Static(g) => quantize_rows_static(isa, x, m, k, g.scale, g.zero_point),
            InputQuant::Q8Blocks => quantize_rows_q8_0(isa, x, m, k),
            _ => quantize_rows(isa, x, m, k),
        };
        match &self.kernel {
            Kernel::F32 { w, out, inp } => {
                let x = self.fake_quant_input(isa, x, *inp);
                // Bands of weight rows against every activation row: each weight row
                // is read from memory once per call, not once per token.
                by_weight_rows(m, *out, &mut y, |i, n| {
                    dot(&x[i * inp..(i + 1) * inp], &w[n * inp..(n + 1) * inp])
                });
            }
            Kernel::Int4(w) => matmul_int4(isa, &quantized(w.k), w, &mut y),
            Kernel::Int4Panels(w) => matmul_int4_panels(isa, &quantized(w.k), w, &mut y),
            Kernel::Int8(w) => matmul_int8(isa, &quantized(w.k), w, &mut y),
            Kernel::Int16Input(w) => match self.input {
                InputQuant::Static(g) => return w.forward(isa, x, m, g),
                _ => unreachable!("16-bit input kernels are built for static grids only"),
            },
        }
        y
    }

    /// The input as the f32 kernel reads it: quantized and dequantized when the
    /// recipe quantizes activations (same grids and rounding as the integer path).
    fn fake_quant_input<'a>(&self, isa: Isa, x: &'a [f32], k: usize) -> std::borrow::Cow<'a, [f32]> {
        match self.input {
            InputQuant::Float => std::borrow::Cow::Borrowed(x),
            InputQuant::Static(g) => {
                let mut v = x.to_vec();
                g.fake(&mut v);
                std::borrow::Cow::Owned(v)
            }
            InputQuant::Q8Blocks => {
                let q = quantize_rows_q8_0(isa, x, x.len() / k, k);
                let d = q.block_scales.as_deref().expect("Q8_0 rows carry block scales");
                let v = (0..x.len())
                    .map(|i| {
                        let (r, c) = (i / k, i % k);
                        q.q[r * q.k_pad + c] as f32 * d[(r * q.k_pad + c) / oqt_kernels::BLOCK]
                    })
                    .collect();
                std::borrow::Cow::Owned(v)
            }
            InputQuant::Dynamic => {
                let mut v = x.to_vec();
                let mut q = vec![0i8; k];
                for row in v.chunks_mut(k) {
                    let (scale, zp) = quantize_row(isa, row, &mut q);
                    for (o, &qv) in row.iter_mut().zip(&q) {
                        *o = (qv as i32 - zp) as f32 * scale;
                    }
                }
                std::borrow::Cow::Owned(v)
            }
        }
    }
}

/// Linears that read the same input (q, k, v; gate, up). Int4 panel weights
/// are concatenated at load and multiplied as one: the input is quantized once
/// and the threads meet once, not once per projection — on a decode step the
/// meetings, not the arithmetic, are what several small matmuls cost. Each
/// output is computed exactly as its own linear would.
pub enum Projections {
    Fused {
        linear: Linear,
        /// `(first column, width)` of each part in the fused output.
        parts: Vec<(usize, usize)>,
    },
    Separate(Vec<Linear>),
}

impl Projections {
    pub fn new(parts: Vec<Linear>) -> Self {
        let input = parts[0].input;
        let panels: Option<Vec<&Int4Panels>> = parts
            .iter()
            .map(|l| match &l.kernel {
                Kernel::Int4Panels(w) if l.input == input => Some(w),
                _ => None,
            })
            .collect();
        let Some(fused) = panels.as_deref().and_then(concat_panels) else {
            return Self::Separate(parts);
        };
        let mut first = 0;
        let spans = panels
            .unwrap()
            .iter()
            .map(|w| {
                let span = (first, w.rows);
                first += w.panels() * oqt_kernels::panels::PANEL;
                span
            })
            .collect();
        Self::Fused {
            linear: Linear {
                kernel: Kernel::Int4Panels(fused),
                input,
            },
            parts: spans,
        }
    }

    /// `x` `[m, in]` → every part's outputs, side by side in each row.
    pub fn forward(&self, isa: Isa, x: &[f32], m: usize) -> ProjectedRows {
        match self {
            Self::Fused { linear, parts } => ProjectedRows {
                data: linear.forward(isa, x, m),
                stride: linear.out_dim(),
                parts: parts.clone(),
            },
            Self::Separate(linears) => {
                let outs: Vec<Vec<f32>> = linears.iter().map(|l| l.forward(isa, x, m)).collect();
                let mut parts = Vec::with_capacity(outs.len());
                let mut stride = 0;
                for l in linears {
                    parts.push((stride, l.out_dim()));
                    stride += l.out_dim();
                }
                let mut data = Vec::with_capacity(m * stride);
                for i in 0..m {
                    for (out, &(_, width)) in outs.iter().zip(&parts) {
                        data.extend_from_slice(&out[i * width..(i + 1) * width]);
                    }
                }
                ProjectedRows { data, stride, parts }
            }
        }
    }
}

/// The outputs of [`Projections`]: `m` rows of `stride` values, part `p` at
/// columns `parts[p].0..parts[p].0 + parts[p].1` of each row. Consumers read
/// and update the parts in place, so no part is copied out of the matmul's
/// output (a prompt's gate/up outputs are megabytes).
pub struct ProjectedRows {
    pub data: Vec<f32>,
    pub stride: usize,
    pub parts: Vec<(usize, usize)>,
}

impl ProjectedRows {
    pub fn rows(&self) -> usize {
        self.data.len() / self.stride
    }

    /// Row `i` of part `p`.
    pub fn row(&self, p: usize, i: usize) -> &[f32] {
        let (first, width) = self.parts[p];
        &self.data[i * self.stride + first..][..width]
    }

    pub fn row_mut(&mut self, p: usize, i: usize) -> &mut [f32] {
        let (first, width) = self.parts[p];
        &mut self.data[i * self.stride + first..][..width]
    }

    /// The first part as `[m, width]` rows, moved to the front of the same
    /// buffer (no new allocation); the other parts are dropped.
    pub fn into_first_part(mut self) -> Vec<f32> {
        let ((first, width), m) = (self.parts[0], self.rows());
        // Row `i` moves from `i · stride + first` to `i · width` (≤ it): in
        // ascending order no row is overwritten before it is moved.
        for i in 0..m {
            self.data
                .copy_within(i * self.stride + first..i * self.stride + first + width, i * width);
        }
        self.data.truncate(m * width);
        self.data
    }
}

/// f32 dot product in eight independent lanes (vectorizes; a plain `sum()` is
/// one serial dependency chain).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail
}
