//! Register-tiled f32 GEMM for compression searches (AWQ's scale search
//! evaluates `X · Q(W·diag(s))ᵀ` hundreds of times per layer): operands packed
//! into panels once, `MR × NR` output tiles accumulated in registers over the
//! whole depth. Float, not part of the deployed integer contract: the portable
//! path is the reference, the x86 path (AVX2 + FMA, in `x86.rs`) agrees with it
//! to float rounding (FMA contracts the multiply-add).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Which micro-kernel runs the tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileIsa {
    /// Built only after runtime detection of AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    Portable,
}

impl TileIsa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Self::Avx2Fma;
        }
        Self::Portable
    }

    /// Micro-tile `(MR tokens, NR outputs)`: 6 × 16 fills 12 of AVX2's 16
    /// registers with accumulators; 4 × 8 suits 128-bit SIMD.
    pub fn tile(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => (6, 16),
            Self::Portable => (4, 8),
        }
    }
}

/// Pack row-major `m` (`[rows, k]`) into panels of `width` rows, each stored
/// `k`-major (`panel[c · width + r]`), zero-padded to a whole panel; each value
/// passes through `map(value, column)` on the way.
pub fn pack_panels(m: &[f32], rows: usize, k: usize, width: usize, map: impl Fn(f32, usize) -> f32 + Sync) -> Vec<f32> {
    let panels = rows.div_ceil(width);
    let mut out = vec![0f32; panels * k * width];
    out.par_chunks_mut(k * width).enumerate().for_each(|(p, panel)| {
        let first = p * width;
        let last = (first + width).min(rows);
        for (r, row) in m[first * k..last * k].chunks_exact(k).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                panel[c * width + r] = map(v, c);
            }
        }
    });
    out
}

/// Every (token panel × weight panel) tile of `ap` against the group `bg`;
/// `sink(weight panel in group, first token, tile as [MR][NR] row-major)`.
pub fn for_each_tile(isa: TileIsa, ap: &[f32], bg: &[f32], k: usize, sink: &mut dyn FnMut(usize, usize, &[f32])) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `TileIsa::Avx2Fma` is only built after detecting AVX2 and FMA.
        TileIsa::Avx2Fma => unsafe { x86::tiles_avx2_fma(ap, bg, k, sink) },
        TileIsa::Portable => tiles::<4, 8, false>(ap, bg, k, sink),
    }
}

/// Token panels outside, the group's weight panels inside: the group stays in
/// L2 while one token panel at a time streams through.
#[inline(always)]
fn tiles<const MR: usize, const NR: usize, const FMA: bool>(
    ap: &[f32],
    bg: &[f32],
    k: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
) {
    for (ia, pa) in ap.chunks_exact(k * MR).enumerate() {
        for (jb, pb) in bg.chunks_exact(k * NR).enumerate() {
            let acc = micro::<MR, NR, FMA>(pa, pb);
            sink(jb, ia * MR, acc.as_flattened());
        }
    }
}

/// One `MR × NR` tile over the whole depth, kept in registers. `mul_add` only
/// where the caller enabled FMA (elsewhere it would call libm).
#[inline(always)]
fn micro<const MR: usize, const NR: usize, const FMA: bool>(pa: &[f32], pb: &[f32]) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (a, b) in pa.as_chunks::<MR>().0.iter().zip(pb.as_chunks::<NR>().0) {
        for (row, &ai) in acc.iter_mut().zip(a) {
            for (c, &bj) in row.iter_mut().zip(b) {
                *c = if FMA { ai.mul_add(bj, *c) } else { *c + ai * bj };
            }
        }
    }
    acc
}
