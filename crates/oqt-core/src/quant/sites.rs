//! Where a static (NPU-style) integer graph quantizes activations, and the
//! arithmetic of one static grid. The Burn simulation and the runtime both
//! quantize at exactly these sites with exactly [`ActGrid::fake`], so they agree.
//!
//! One decoder layer, with the site applied to each tensor in brackets:
//!
//! ```text
//! x [residual] ─ RMSNorm ─ [attn_in] ─ q/k/v ─ RoPE ─ softmax(qkᵀ) [probs] · v ─ [attn_out] ─ o ─ [o_out]
//!   x + o [attn_residual] ─ RMSNorm ─ [mlp_in] ─ gate, up ─ silu(gate)·up [down_in] ─ down ─ [down_out]
//!   x + down [mlp_residual]
//! ```
//!
//! plus `embed` (the embedding rows, the first residual) and `final_in` (the
//! final norm's output, the LM head's input). The inputs of linear layers
//! (`attn_in`, `attn_out`, `mlp_in`, `down_in`, `final_in`) are the integer
//! tensors the GEMMs read. q/k/v and gate/up outputs, RoPE, the attention
//! scores and SiLU stay in f32 (an NPU keeps them at 16 bits or fuses them).
//! The norm input *is* the residual tensor, so `norm_input` in a recipe's
//! `act16_sites` widens the residual grids just as `residual` does.
//!
//! `act16_sites` may also widen linear inputs (`qkv_input`, `o_proj_input`,
//! `gate_up_input`, `down_proj_input`, `lm_head_input`): W8A16-style layers
//! an NPU runs with 16-bit activations. The runtime multiplies those in f32 on
//! the 16-bit grid's values (no int16 kernel yet), exactly as the simulation
//! does; the main use today is finding which inputs an 8-bit layout loses most on.
//!
//! Grids are stored signed: 8-bit values in `[−128, 127]`, 16-bit in
//! `[−32768, 32767]`, with a zero point; an unsigned NPU grid is the same grid
//! shifted by `2^(b−1)` (value and zero point alike).

use super::spec::{ActMode, QuantSpec};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActSite {
    Embed,
    AttnIn,
    Probs,
    AttnOut,
    OOut,
    AttnResidual,
    MlpIn,
    DownIn,
    DownOut,
    MlpResidual,
    FinalIn,
}

impl ActSite {
    /// Sites inside every decoder layer, in forward order.
    pub const PER_LAYER: [ActSite; 9] = [
        Self::AttnIn,
        Self::Probs,
        Self::AttnOut,
        Self::OOut,
        Self::AttnResidual,
        Self::MlpIn,
        Self::DownIn,
        Self::DownOut,
        Self::MlpResidual,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Embed => "embed",
            Self::AttnIn => "attn_in",
            Self::Probs => "probs",
            Self::AttnOut => "attn_out",
            Self::OOut => "o_out",
            Self::AttnResidual => "attn_residual",
            Self::MlpIn => "mlp_in",
            Self::DownIn => "down_in",
            Self::DownOut => "down_out",
            Self::MlpResidual => "mlp_residual",
            Self::FinalIn => "final_in",
        }
    }

    /// The manifest key of this site in `layer` (ignored for model-level sites).
    pub fn key(self, layer: usize) -> String {
        match self {
            Self::Embed | Self::FinalIn => self.name().to_string(),
            _ => format!("layers.{layer}.{}", self.name()),
        }
    }

    /// The names a recipe's `act16_sites` may use for this site.
    fn recipe_names(self) -> &'static [&'static str] {
        match self {
            Self::Embed | Self::AttnResidual | Self::MlpResidual => &["residual", "norm_input"],
            Self::OOut => &["o_proj_output"],
            Self::DownOut => &["down_proj_output"],
            Self::Probs => &["softmax"],
            Self::AttnIn => &["qkv_input"],
            Self::AttnOut => &["o_proj_input"],
            Self::MlpIn => &["gate_up_input"],
            Self::DownIn => &["down_proj_input"],
            Self::FinalIn => &["lm_head_input"],
        }
    }

    /// Bits of this site's grid under `spec` (static recipes), for sites the
    /// model has once (embedding, head input, softmax) or in every layer alike.
    pub fn bits(self, spec: &QuantSpec) -> u8 {
        self.bits_in(None, spec)
    }

    /// Bits of this site's grid in decoder layer `layer`: `act16_sites` entries
    /// `name` widen it in every layer, `name@layer` in that layer only.
    pub fn bits_at(self, layer: usize, spec: &QuantSpec) -> u8 {
        self.bits_in(Some(layer), spec)
    }

    fn bits_in(self, layer: Option<usize>, spec: &QuantSpec) -> u8 {
        // The embedding and the head input exist once: `name@layer` never names them.
        let layer = layer.filter(|_| !matches!(self, Self::Embed | Self::FinalIn));
        let wide = spec.act16_sites.iter().any(|entry| {
            let (name, at) = split_layer(entry);
            self.recipe_names().contains(&name)
                && match at {
                    None => true,
                    Some(l) => layer.is_some_and(|layer| l == Ok(layer)),
                }
        });
        if wide { 16 } else { spec.activations.bits }
    }

    /// Softmax probabilities live in `[0, 1]`: their grid needs no calibration.
    pub fn is_fixed(self) -> bool {
        self == Self::Probs
    }
}

/// An `act16_sites` entry as `(name, layer)`: `"down_proj_input@11"` →
/// `("down_proj_input", Some(Ok(11)))`; the layer is `Err` when not a number.
pub fn split_layer(entry: &str) -> (&str, Option<std::result::Result<usize, std::num::ParseIntError>>) {
    match entry.split_once('@') {
        Some((name, layer)) => (name, Some(layer.parse())),
        None => (entry, None),
    }
}

/// The `act16_sites` names that may name one layer (`name@layer`): those of
/// per-layer sites except the softmax, whose fixed grid is one per model.
pub fn act16_per_layer_names() -> Vec<&'static str> {
    recipe_names_of(ActSite::PER_LAYER.into_iter().filter(|s| !s.is_fixed()))
}

/// The names `act16_sites` accepts: every site's recipe names,
/// in forward order, each once.
pub fn act16_site_names() -> Vec<&'static str> {
    recipe_names_of(
        [ActSite::Embed]
            .into_iter()
            .chain(ActSite::PER_LAYER)
            .chain([ActSite::FinalIn]),
    )
}

/// The recipe names of `sites`, in order, each once.
fn recipe_names_of(sites: impl Iterator<Item = ActSite>) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for name in sites.flat_map(|s| s.recipe_names().iter().copied()) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// One static per-tensor grid: `q = clamp(round_half_even(x · (1/scale)) + zp, qmin, qmax)`,
/// value `(q − zp) · scale`, with `1/scale` computed once in f32.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActGrid {
    pub scale: f32,
    pub zero_point: i32,
    pub bits: u8,
}

impl ActGrid {
    pub fn qmin(&self) -> i32 {
        -(1 << (self.bits - 1))
    }

    pub fn qmax(&self) -> i32 {
        (1 << (self.bits - 1)) - 1
    }

    /// The grid covering `[min, max]` (widened to contain 0, so zero is exact);
    /// for 8 bits this is the dynamic quantizer's per-row formula.
    pub fn from_range(min: f32, max: f32, bits: u8) -> Self {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let qmin = -(1i64 << (bits - 1)) as f32;
        let qmax = ((1i64 << (bits - 1)) - 1) as f32;
        if max == min || !min.is_finite() || !max.is_finite() {
            return Self {
                scale: 1.0,
                zero_point: qmin as i32,
                bits,
            };
        }
        let scale = (max - min) / (qmax - qmin);
        let zero_point = (qmin - min / scale).round_ties_even().clamp(qmin, qmax) as i32;
        Self {
            scale,
            zero_point,
            bits,
        }
    }

    /// Softmax probabilities: `[0, 1]` on `bits` bits.
    pub fn probabilities(bits: u8) -> Self {
        Self::from_range(0.0, 1.0, bits)
    }

    pub fn inv_scale(&self) -> f32 {
        1.0 / self.scale
    }

    /// The integer of `x` on this grid.
    #[inline]
    pub fn quantize(&self, x: f32, inv: f32) -> i32 {
        ((x * inv).round_ties_even() as i32 + self.zero_point).clamp(self.qmin(), self.qmax())
    }

    /// Quantize and dequantize `x` in place (the reference every path follows):
    /// `(quantize(x) − zp) · scale`.
    ///
    /// Written so it vectorizes without a libm call per element: `x · inv` is
    /// first clamped to one step past the grid on each side (the integer is
    /// clamped to the grid after rounding anyway, so no result changes), which
    /// keeps it under 2^22 in magnitude, where adding and subtracting 1.5 · 2^23
    /// rounds half to even exactly.
    pub fn fake(&self, x: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present, checked just above.
            return unsafe { self.fake_avx2(x) };
        }
        self.fake_elementwise(x)
    }

    /// [`ActGrid::fake`] compiled for AVX2: the same element-wise IEEE
    /// operations, eight at a time, so the same results.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fake_avx2(&self, x: &mut [f32]) {
        self.fake_elementwise(x)
    }

    #[inline(always)]
    fn fake_elementwise(&self, x: &mut [f32]) {
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
        let inv = self.inv_scale();
        let (zp, qmin, qmax) = (self.zero_point as f32, self.qmin() as f32, self.qmax() as f32);
        let (lo, hi) = (qmin - zp - 1.0, qmax - zp + 1.0);
        // All in f32 on small integers (exact), so no float → int conversion:
        // that one does not vectorize. A NaN input maps to the integer 0 (the
        // zero point), as `quantize`'s saturating cast does.
        for v in x {
            let t = (*v * inv).clamp(lo, hi);
            let r = if t.is_nan() { 0.0 } else { (t + MAGIC) - MAGIC };
            *v = ((r + zp).clamp(qmin, qmax) - zp) * self.scale;
        }
    }
}

/// Which sites a spec quantizes, with their bits; empty unless activations are static.
pub fn static_sites(spec: &QuantSpec, n_layers: usize) -> Vec<(String, ActSite, u8)> {
    if spec.activations.mode != ActMode::Static {
        return Vec::new();
    }
    let mut out = vec![("embed".to_string(), ActSite::Embed, ActSite::Embed.bits(spec))];
    for l in 0..n_layers {
        for s in ActSite::PER_LAYER {
            out.push((s.key(l), s, s.bits_at(l, spec)));
        }
    }
    out.push(("final_in".into(), ActSite::FinalIn, ActSite::FinalIn.bits(spec)));
    out
}

/// Every site's grid of a static model, looked up without string keys in the forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteGrids {
    embed: ActGrid,
    layers: Vec<[ActGrid; 9]>,
    final_in: ActGrid,
}

impl SiteGrids {
    /// Gather the grids of `spec`'s sites from `grids` (a manifest's `act_grids`);
    /// the fixed probability grids come from the spec. Errors name the missing key.
    pub fn from_map(
        spec: &QuantSpec,
        n_layers: usize,
        grids: &std::collections::BTreeMap<String, ActGrid>,
    ) -> std::result::Result<Self, String> {
        let get = |site: ActSite, layer: usize| -> std::result::Result<ActGrid, String> {
            let bits = site.bits_at(layer, spec);
            if site.is_fixed() {
                return Ok(ActGrid::probabilities(bits));
            }
            let key = site.key(layer);
            let g = grids
                .get(&key)
                .ok_or_else(|| format!("act_grids: no grid for site `{key}`"))?;
            if g.bits != bits || !(g.scale.is_finite() && g.scale > 0.0) {
                return Err(format!(
                    "act_grids.{key}: expected a {bits}-bit grid with a positive scale, found {} bits, scale {}",
                    g.bits, g.scale
                ));
            }
            Ok(*g)
        };
        Self::gather(n_layers, get)
    }

    /// Every site's grid from `get(site, layer)`, in the forward order.
    fn gather(
        n_layers: usize,
        get: impl Fn(ActSite, usize) -> std::result::Result<ActGrid, String>,
    ) -> std::result::Result<Self, String> {
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let mut row = [ActGrid::probabilities(8); 9];
            for (i, s) in ActSite::PER_LAYER.into_iter().enumerate() {
                row[i] = get(s, l)?;
            }
            layers.push(row);
        }
        Ok(Self {
            embed: get(ActSite::Embed, 0)?,
            layers,
            final_in: get(ActSite::FinalIn, 0)?,
        })
    }

    /// Read every site's grid (softmax included) from a deployment spec's
    /// `act_grids`; errors name the missing or unusable key.
    pub fn from_deployment(
        n_layers: usize,
        grids: &std::collections::BTreeMap<String, ActGrid>,
    ) -> std::result::Result<Self, String> {
        let get = |site: ActSite, layer: usize| -> std::result::Result<ActGrid, String> {
            let key = site.key(layer);
            let g = grids
                .get(&key)
                .ok_or_else(|| format!("deployment.act_grids: no grid for site `{key}`"))?;
            if !(matches!(g.bits, 8 | 16) && g.scale.is_finite() && g.scale > 0.0) {
                return Err(format!(
                    "deployment.act_grids.{key}: expected an 8- or 16-bit grid with a positive scale, found {} bits, scale {}",
                    g.bits, g.scale
                ));
            }
            Ok(*g)
        };
        Self::gather(n_layers, get)
    }

    /// Every site's grid by key, fixed grids included: what a deployment spec stores.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, ActGrid> {
        let mut m = std::collections::BTreeMap::new();
        m.insert(ActSite::Embed.key(0), self.embed);
        for (l, row) in self.layers.iter().enumerate() {
            for (s, g) in ActSite::PER_LAYER.into_iter().zip(row) {
                m.insert(s.key(l), *g);
            }
        }
        m.insert(ActSite::FinalIn.key(0), self.final_in);
        m
    }

    /// The grid of `site` (in `layer` for per-layer sites).
    pub fn get(&self, layer: usize, site: ActSite) -> ActGrid {
        match site {
            ActSite::Embed => self.embed,
            ActSite::FinalIn => self.final_in,
            s => {
                let i = ActSite::PER_LAYER.iter().position(|&p| p == s).expect("per-layer site");
                self.layers[layer][i]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bit_grid_is_the_dynamic_row_formula() {
        // Same numbers as the kernels' row_params: [-1, 3] → scale 4/255, zp = round(-128 + 63.75) = -64.
        let g = ActGrid::from_range(-1.0, 3.0, 8);
        assert_eq!(g.scale, 4.0 / 255.0);
        assert_eq!(g.zero_point, -64);
        let mut x = [0.0, 3.0, -1.0, 10.0];
        g.fake(&mut x);
        assert_eq!(x[0], 0.0, "zero is exact");
        assert!((x[1] - 3.0).abs() < g.scale && (x[2] + 1.0).abs() < g.scale);
        assert!((x[3] - x[1]).abs() < 1e-6, "values past the range clamp");
    }

    #[test]
    fn fake_equals_quantize_then_dequantize_on_ties_extremes_and_infinities() {
        for g in [
            ActGrid::from_range(-1.0, 3.0, 8),
            ActGrid::from_range(-100.0, 50.0, 16),
            ActGrid::probabilities(8),
            ActGrid {
                scale: 0.5,
                zero_point: 3,
                bits: 8,
            },
        ] {
            let inv = g.inv_scale();
            // Exact half steps (ties both ways), the grid's edges, far outside, ±∞, NaN.
            let mut x: Vec<f32> = (-300..300).map(|i| (i as f32 + 0.5) * g.scale).collect();
            x.extend((-70_000..70_000).step_by(997).map(|i| i as f32 * g.scale * 0.37));
            x.extend([
                0.0,
                -0.0,
                1e30,
                -1e30,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MIN_POSITIVE,
                f32::NAN,
            ]);
            let want: Vec<f32> = x
                .iter()
                .map(|&v| {
                    let q =
                        ((v * inv).round_ties_even().clamp(-1e9, 1e9) as i32 + g.zero_point).clamp(g.qmin(), g.qmax());
                    (q - g.zero_point) as f32 * g.scale
                })
                .collect();
            let mut got = x.clone();
            g.fake(&mut got);
            for ((a, b), v) in got.iter().zip(&want).zip(&x) {
                assert_eq!(a.to_bits(), b.to_bits(), "{g:?} at {v}");
            }
        }
    }

    #[test]
    fn sixteen_bit_and_probability_grids() {
        let g = ActGrid::from_range(-100.0, 50.0, 16);
        assert_eq!((g.qmin(), g.qmax()), (-32768, 32767));
        let mut x = [12.345f32];
        g.fake(&mut x);
        assert!((x[0] - 12.345).abs() <= g.scale / 2.0 + 1e-6);
        let p = ActGrid::probabilities(8);
        assert_eq!(p.zero_point, -128);
        let mut x = [0.0, 1.0, 0.5];
        p.fake(&mut x);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn recipe_site_names_pick_the_wide_grids() {
        let w4a8 = crate::quant::load_recipe("w4a8").unwrap().spec;
        assert_eq!(ActSite::AttnResidual.bits(&w4a8), 16);
        assert_eq!(ActSite::OOut.bits(&w4a8), 16);
        assert_eq!(ActSite::Probs.bits(&w4a8), 16);
        assert_eq!(ActSite::AttnIn.bits(&w4a8), 8);
        let w8a8 = crate::quant::load_recipe("w8a8").unwrap().spec;
        assert_eq!(ActSite::DownOut.bits(&w8a8), 16);
        // w8a8's head takes a 16-bit input; w4a8's an 8-bit one.
        assert_eq!(ActSite::FinalIn.bits(&w8a8), 16);
        assert_eq!(ActSite::FinalIn.bits(&w4a8), 8);
        let mut residual_only = w8a8.clone();
        residual_only.act16_sites = vec!["residual".into()];
        assert_eq!(ActSite::MlpResidual.bits(&residual_only), 16);
        assert_eq!(ActSite::DownOut.bits(&residual_only), 8);
        assert_eq!(static_sites(&w8a8, 2).len(), 2 + 2 * 9);
        // A widened linear input: that site only, and its GEMM leaves the int8 kernels.
        let mut wide_down = w8a8.clone();
        wide_down.act16_sites.push("down_proj_input".into());
        assert!(wide_down.problems().is_empty(), "{:?}", wide_down.problems());
        let mut typo = w8a8.clone();
        typo.act16_sites.push("down_input".into());
        let problems = typo.problems();
        assert!(
            problems.len() == 1
                && problems[0].starts_with("act16_sites[6]: unknown site `down_input`")
                && problems[0].contains("down_proj_input"),
            "{problems:?}"
        );
        for site in ActSite::PER_LAYER.into_iter().chain([ActSite::Embed, ActSite::FinalIn]) {
            let widened = site == ActSite::DownIn;
            assert_eq!(site.bits(&wide_down) != site.bits(&w8a8), widened, "{site:?}");
        }
        let grid = |site: ActSite| Some(ActGrid::from_range(-1.0, 1.0, site.bits(&wide_down)));
        let input = |site| crate::encoding::ActInput::resolve(ActMode::Static, grid(site));
        let w = crate::encoding::TensorEncoding::integer(
            4,
            64,
            64,
            crate::quant::WeightSpec::new(4, crate::quant::Granularity::PerChannel, true),
        );
        let kernel = |site| crate::encoding::choose_kernel(&w, input(site));
        assert_eq!(
            kernel(ActSite::DownIn),
            crate::encoding::KernelChoice::Int16Input { group: 64 }
        );
        assert_eq!(
            kernel(ActSite::MlpIn),
            crate::encoding::KernelChoice::Int8Input {
                weight_bits: 4,
                group: 64
            }
        );
        let dynamic = crate::quant::load_recipe("w4a8-dyn").unwrap().spec;
        assert!(static_sites(&dynamic, 2).is_empty());
        // `name@layer` widens that layer only.
        let mut one_layer = w8a8.clone();
        one_layer.act16_sites.push("down_proj_input@1".into());
        assert!(one_layer.problems().is_empty(), "{:?}", one_layer.problems());
        assert!(one_layer.layer_problems(2).is_empty());
        let bits: Vec<(String, u8)> = static_sites(&one_layer, 3)
            .into_iter()
            .filter(|(_, s, _)| *s == ActSite::DownIn)
            .map(|(k, _, b)| (k, b))
            .collect();
        assert_eq!(
            bits,
            [
                ("layers.0.down_in".to_string(), 8),
                ("layers.1.down_in".to_string(), 16),
                ("layers.2.down_in".to_string(), 8)
            ]
        );
        assert_eq!(ActSite::DownIn.bits(&one_layer), 8);
        assert_eq!(ActSite::MlpIn.bits_at(1, &one_layer), 8);
        let e = one_layer.layer_problems(1);
        assert!(
            e.len() == 1 && e[0].contains("down_proj_input@1") && e[0].contains("0..1"),
            "{e:?}"
        );
        for (entry, want) in [
            ("softmax@1", "one grid per model"),
            ("down_proj_input@x", "decoder layer number"),
            ("down_input@1", "unknown site `down_input`"),
        ] {
            let mut bad = w8a8.clone();
            bad.act16_sites.push(entry.into());
            let p = bad.problems();
            assert!(p.len() == 1 && p[0].contains(want), "{entry}: {p:?}");
        }
        assert_eq!(
            act16_site_names(),
            [
                "residual",
                "norm_input",
                "qkv_input",
                "softmax",
                "o_proj_input",
                "o_proj_output",
                "gate_up_input",
                "down_proj_input",
                "down_proj_output",
                "lm_head_input"
            ]
        );
    }
}
