//! oqt-kernels: the integer arithmetic phone CPU kernels perform (XNNPACK
//! "qd8", ExecuTorch 8da4w, KleidiAI), in plain Rust with no Burn.
//!
//! **The contract** every path implements, bit for bit:
//!
//! * Activations are quantized per row (token), asymmetric int8, by
//!   [`act_quant::quantize_row`]: `scale = (max − min) / 255` over the row with
//!   `min ≤ 0 ≤ max`; `zp = clamp(round(−128 − min / scale), −128, 127)`;
//!   `q = clamp(round(x · (1/scale)) + zp, −128, 127)`, rounding half to even
//!   (what SIMD float→int conversion does).
//! * Weights are symmetric int4 in `[−8, 7]` or int8 in `[−128, 127]`, one f32
//!   scale per output row and group of `group` input columns.
//! * Per group, the integer dot `Σ (q_a − zp) · q_w` is exact in i32, and
//!   `v_g = (s_a · s_w[g]) · dot_g` in f32; the output sums the `v_g` in eight
//!   interleaved partial sums (`p[g mod 8]`, group order) finished pairwise —
//!   the order eight SIMD lanes produce (see [`dot`]).
//!
//! SIMD paths (AVX2, AVX-512 VNNI; chosen at run time) follow that order
//! exactly, so every path equals the scalar reference bit for bit. Property
//! tests check it.

pub mod act_quant;
pub mod dot;
pub mod f32_tiles;
pub mod gemm;
pub mod pack;
pub mod panels;
pub mod requant;
pub mod team;

pub use act_quant::{QuantizedRows, quantize_row, quantize_rows, quantize_rows_q8_0, quantize_rows_static};
pub use dot::{ActRow, WeightRow, dot_wide};
pub use gemm::{by_weight_rows, matmul_int4, matmul_int8};
pub use pack::{BLOCK, PackedInt4, PackedInt8};
pub use panels::{
    Int4Panels, concat_panels, has_lut_kernel, lut_panel_problem, matmul_int4_panels, repack_int4, repack_int4_lpbq,
    repack_lut,
};

/// Instruction-set paths, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
    /// AArch64 with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    /// The best path this CPU supports (overridable with `OQT_ISA=scalar|avx2|avx512vnni`).
    pub fn detect() -> Self {
        let best = Self::best_supported();
        match std::env::var("OQT_ISA").ok().as_deref() {
            Some("scalar") => Self::Scalar,
            Some("avx2") if best != Self::Scalar => Self::Avx2,
            _ => best,
        }
    }

    fn best_supported() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Self::Avx512Vnni;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                return Self::NeonDot;
            }
        }
        Self::Scalar
    }

    /// Every path this CPU can run (the tests compare them all).
    pub fn available() -> Vec<Self> {
        let best = Self::best_supported();
        if best == Self::NeonDot {
            return vec![Self::Scalar, Self::NeonDot];
        }
        [Self::Scalar, Self::Avx2, Self::Avx512Vnni]
            .into_iter()
            .filter(|&i| i as u8 <= best as u8)
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
            Self::NeonDot => "neon-dotprod",
        }
    }
}
