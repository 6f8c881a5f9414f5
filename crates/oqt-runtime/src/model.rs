//! The Llama-family forward pass over a bundle (or a GGUF file's Q4_0/Q8_0 blocks).

use crate::attention::{HeadCache, Scratch, attend};
use crate::linear::{InputQuant, Linear, ProjectedRows, Projections};
use crate::reference::{rms_norm, silu_mul};
use oqt_core::bundle::Bundle;
use oqt_core::encoding::TensorEncoding;
use oqt_core::gguf::GgufFile;
use oqt_core::gguf::encode::decode_quantized;
use oqt_core::lora::{LoraAdapter, LoraModule};
use oqt_core::lut::Palettized;
use oqt_core::quant::{ActMode, ActSite, QuantizedWeight, SiteGrids, dequantize_weight};
use oqt_core::scoring::{CausalLm, WindowScores, log_softmax_row};
use oqt_core::weights::{names, rotary_hf_order};
use oqt_core::{CoreError, LlamaConfig, Result, Tokenizer};
use oqt_kernels::Isa;
use oqt_kernels::team::Team;
use rayon::prelude::*;
use std::sync::Arc;

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v. A block that shares another block's weights holds the
    /// same kernels (one copy in memory) and its own [`RowScales`].
    qkv: Arc<Projections>,
    o: Arc<Linear>,
    mlp_norm: Vec<f32>,
    /// gate and up.
    gate_up: Arc<Projections>,
    down: Arc<Linear>,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    /// A shared block's per-output-row scales (`None`: the block's own weights).
    row_scales: Option<RowScales>,
}

/// The output-row scales of a block whose linears are another block's
/// (the `shared` encoding): applied to each kernel's outputs, before biases.
struct RowScales {
    /// q, k, v.
    qkv: [Vec<f32>; 3],
    o: Vec<f32>,
    /// gate, up.
    gate_up: [Vec<f32>; 2],
    down: Vec<f32>,
}

/// Multiply every `width`-wide row of `y` elementwise by `scales`.
fn scale_rows(y: &mut [f32], scales: &[f32]) {
    for row in y.chunks_mut(scales.len()) {
        row.iter_mut().zip(scales).for_each(|(v, s)| *v *= s);
    }
}

/// Multiply part `p` of every projected row by `scales[p]`.
fn scale_parts(y: &mut ProjectedRows, scales: &[Vec<f32>]) {
    for i in 0..y.rows() {
        for (p, s) in scales.iter().enumerate() {
            y.row_mut(p, i).iter_mut().zip(s).for_each(|(v, s)| *v *= s);
        }
    }
}

pub struct RuntimeModel {
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    pub isa: Isa,
    /// Embedding rows, dequantized on lookup: `(q, scale per row)` or f32.
    /// The embedding table as the head's kernel stores it (tied heads share
    /// it); lookups dequantize one row at a time.
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// Separate head, or `None` to use the (tied) embedding.
    head: Option<Linear>,
    rope_inv_freq: Vec<f64>,
    /// Static activation grids (NPU-style recipes).
    grids: Option<SiteGrids>,
    /// Bytes of weights held (what a device stores).
    pub weight_bytes: usize,
}

/// Keys and values seen so far, per layer: `[t, kv_heads × head_dim]`.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
            len: 0,
        }
    }

    /// A cache with room for `tokens` positions of `model`, reserved once:
    /// appending up to that many never reallocates (no copy of the cache
    /// mid-generation, no doubled buffer in the peak memory). Untouched pages
    /// of the reservation cost no resident memory.
    pub fn with_capacity(model: &RuntimeModel, tokens: usize) -> Self {
        let cfg = &model.config;
        let width = tokens * cfg.num_kv_heads * cfg.head_dim;
        let buffers = || (0..cfg.num_layers).map(|_| Vec::with_capacity(width)).collect();
        Self {
            k: buffers(),
            v: buffers(),
            len: 0,
        }
    }

    /// Where each layer's keys and values live: unchanged while the cache
    /// stays within its reservation.
    pub fn buffers(&self) -> Vec<(*const f32, *const f32)> {
        self.k
            .iter()
            .zip(&self.v)
            .map(|(k, v)| (k.as_ptr(), v.as_ptr()))
            .collect()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A weight as a source provides it.
enum SourceWeight {
    Quantized(QuantizedWeight),
    /// A `lut` weight: indices and tables (LUT panels where the ISA has them).
    Palettized(Palettized),
    /// Row-major values and shape.
    F32(Vec<f32>, Vec<usize>),
    /// A `shared` weight: its source's name and its row scales.
    Shared {
        of: String,
        row_scales: Vec<f32>,
    },
}

/// A tensor by canonical name (`None` when the file has none).
type TensorLookup<'a> = Box<dyn Fn(&str) -> Result<Option<SourceWeight>> + 'a>;

/// What the builder needs from a file: config, tokenizer, activation mode,
/// grids, and each tensor by canonical name.
struct Parts<'a> {
    config: LlamaConfig,
    tokenizer: Tokenizer,
    acts: ActMode,
    grids: Option<SiteGrids>,
    tensor: TensorLookup<'a>,
    path: std::path::PathBuf,
}

impl RuntimeModel {
    pub fn load(bundle: &Bundle) -> Result<Self> {
        let m = &bundle.manifest;
        if m.deployment.kv_cache.is_some() {
            return Err(CoreError::Unsupported {
                path: bundle.path.clone(),
                what: "quantization",
                detail: "a quantized KV cache is not run by the runtime yet".into(),
            });
        }
        Self::build(Parts {
            config: m.config.clone(),
            tokenizer: bundle.tokenizer()?,
            acts: m.deployment.activations,
            grids: bundle.site_grids()?,
            tensor: Box::new(|name| {
                let weight = match m.deployment.tensors.get(name) {
                    Some(TensorEncoding::Shared { .. }) => {
                        let (of, row_scales) = bundle.shared(name)?.expect("a shared encoding");
                        Some(SourceWeight::Shared {
                            of: of.to_string(),
                            row_scales,
                        })
                    }
                    Some(TensorEncoding::Lut { .. }) => Some(SourceWeight::Palettized(bundle.palettized(name)?)),
                    Some(e) if e.int_grid().is_some() => Some(SourceWeight::Quantized(bundle.quantized(name)?)),
                    Some(e) => Some(SourceWeight::F32(bundle.f32_tensor(name)?, e.shape())),
                    None => None,
                };
                // Copied out: the file's pages are no longer needed in memory.
                bundle.release(name);
                Ok(weight)
            }),
            path: bundle.path.clone(),
        })
    }

    /// Run a GGUF file as llama.cpp's CPU backend does: Q4_0 / Q8_0 weights on the
    /// integer kernels with their inputs quantized to Q8_0 blocks; every other
    /// type dequantized to f32 with float inputs.
    pub fn from_gguf(path: &std::path::Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let cfg = oqt_core::load::gguf_config(&g)?;
        let mut by_canonical = std::collections::HashMap::new();
        for info in &g.tensors {
            if let Some(c) = oqt_core::load::canonical_gguf_name(&info.name) {
                by_canonical.insert(c, info);
            }
        }
        let (g, cfg2) = (&g, cfg.clone());
        Self::build(Parts {
            config: cfg,
            tokenizer: Tokenizer::from_gguf(g)?,
            acts: ActMode::LlamaCppQ8_0,
            grids: None,
            tensor: Box::new(move |name| {
                let Some(info) = by_canonical.get(name) else {
                    return Ok(None);
                };
                let shape = info.shape();
                // Back from llama.cpp's rotary row order to the canonical one.
                let heads = cfg2.rotary_heads(name);
                if shape.len() == 2
                    && let Some(qw) = decode_quantized(g.tensor_bytes(info), info.ty, shape[0], shape[1])
                {
                    let qw = match heads {
                        Some(h) => qw.reorder_rows(&rotary_hf_order(qw.rows, h)),
                        None => qw,
                    };
                    return Ok(Some(SourceWeight::Quantized(qw)));
                }
                let mut t = oqt_core::TensorF32::new(shape.clone(), g.dequantize(info));
                if let Some(h) = heads {
                    t = oqt_core::weights::unpermute_rotary_rows(&t, h);
                }
                Ok(Some(SourceWeight::F32(t.data, shape)))
            }),
            path: path.into(),
        })
    }

    fn build(parts: Parts<'_>) -> Result<Self> {
        let Parts {
            config: cfg,
            tokenizer,
            acts,
            grids,
            tensor,
            path,
        } = parts;
        let grid = |layer: usize, site: ActSite| grids.as_ref().map(|g| g.get(layer, site));
        let missing = |name: &str| CoreError::Missing {
            path: path.clone(),
            what: "tensor",
            name: name.into(),
        };
        let unshareable = |name: &str, of: &str| CoreError::Unsupported {
            path: path.clone(),
            what: "weight sharing",
            detail: format!(
                "{name} shares {of}: the runtime runs whole decoder blocks that share an earlier block's seven linears, nothing else"
            ),
        };
        let isa = Isa::detect();
        let mut weight_bytes = 0usize;
        // `weight`: tensor `name` as the source gave it (fetched by the caller,
        // which may have looked at it first: a shared block's q_proj).
        let mut linear = |name: &str, weight: Option<SourceWeight>, input: ActSite, layer: usize| -> Result<Linear> {
            match weight {
                Some(SourceWeight::Quantized(qw)) => {
                    // Nominal stored size: values at their bit width, f32 scales, LPBQ's u8 multipliers.
                    weight_bytes += qw.q.len() * qw.spec.bits as usize / 8
                        + qw.scales.len() * 4
                        + qw.multipliers.as_ref().map_or(0, Vec::len);
                    Ok(Linear::from_quantized(
                        &qw,
                        InputQuant::resolve(acts, grid(layer, input)),
                        isa,
                    ))
                }
                Some(SourceWeight::Palettized(p)) => {
                    // Stored size: the packed indices and the f16 tables.
                    weight_bytes += p.rows * oqt_core::lut::index_row_bytes(p.cols, p.bits) + p.tables.len() * 2;
                    Ok(Linear::from_palettized(
                        &p,
                        InputQuant::resolve(acts, grid(layer, input)),
                        isa,
                    ))
                }
                Some(SourceWeight::F32(w, shape)) => {
                    weight_bytes += w.len() * 4;
                    Ok(Linear::float(w, shape[0], shape[1]))
                }
                Some(SourceWeight::Shared { of, .. }) => Err(unshareable(name, &of)),
                None => Err(missing(name)),
            }
        };
        let f32s = |name: &str| -> Result<Vec<f32>> {
            match tensor(name)? {
                Some(SourceWeight::F32(w, _)) => Ok(w),
                Some(SourceWeight::Quantized(qw)) => Ok(dequantize_weight(&qw)),
                Some(SourceWeight::Palettized(p)) => Ok(dequantize_weight(&p.kernel_view())),
                Some(SourceWeight::Shared { of, .. }) => Err(unshareable(name, &of)),
                None => Err(missing(name)),
            }
        };
        // One copy of the embedding, in the kernels' layout: rows are dequantized
        // on lookup (a gather, not a matmul), and a tied head multiplies it directly.
        let embed = linear(names::EMBED, tensor(names::EMBED)?, ActSite::FinalIn, 0)?;
        let mut layers: Vec<Layer> = Vec::with_capacity(cfg.num_layers);
        let mut shared_bytes = 0usize;
        for i in 0..cfg.num_layers {
            let l = |s: &str| names::layer(i, s);
            let bias = |s: &str| -> Result<Option<Vec<f32>>> {
                if cfg.attention_bias {
                    f32s(&l(s)).map(Some)
                } else {
                    Ok(None)
                }
            };
            // A shared block: every linear refers to the same earlier,
            // unshared block; its kernels are that block's (no second copy).
            let q = tensor(&l(names::Q))?;
            if let Some(SourceWeight::Shared { of, .. }) = &q {
                let of = of.clone();
                let source = (0..i)
                    .find(|&j| names::layer(j, names::Q) == of && layers[j].row_scales.is_none())
                    .ok_or_else(|| unshareable(&l(names::Q), &of))?;
                let mut scales = |suffix: &str, site: ActSite| -> Result<Vec<f32>> {
                    let (name, want) = (l(suffix), names::layer(source, suffix));
                    match tensor(&name)? {
                        Some(SourceWeight::Shared { of, row_scales }) if of == want => {
                            shared_bytes += row_scales.len() * 4;
                            // The kernel carries its input quantizer: the source's must be this block's.
                            if InputQuant::resolve(acts, grid(i, site)) != InputQuant::resolve(acts, grid(source, site))
                            {
                                return Err(CoreError::Unsupported {
                                    path: path.clone(),
                                    what: "weight sharing",
                                    detail: format!("{name} shares {of}, whose input grid differs from its own"),
                                });
                            }
                            Ok(row_scales)
                        }
                        Some(SourceWeight::Shared { of, .. }) => Err(unshareable(&name, &of)),
                        Some(_) | None => Err(unshareable(
                            &name,
                            &format!("nothing (block {i} shares block {source}'s q_proj)"),
                        )),
                    }
                };
                let row_scales = RowScales {
                    qkv: [
                        scales(names::Q, ActSite::AttnIn)?,
                        scales(names::K, ActSite::AttnIn)?,
                        scales(names::V, ActSite::AttnIn)?,
                    ],
                    o: scales(names::O, ActSite::AttnOut)?,
                    gate_up: [scales(names::GATE, ActSite::MlpIn)?, scales(names::UP, ActSite::MlpIn)?],
                    down: scales(names::DOWN, ActSite::DownIn)?,
                };
                let src = &layers[source];
                let layer = Layer {
                    attn_norm: f32s(&l(names::ATTN_NORM))?,
                    qkv: src.qkv.clone(),
                    o: src.o.clone(),
                    mlp_norm: f32s(&l(names::MLP_NORM))?,
                    gate_up: src.gate_up.clone(),
                    down: src.down.clone(),
                    q_bias: bias(names::Q_BIAS)?,
                    k_bias: bias(names::K_BIAS)?,
                    v_bias: bias(names::V_BIAS)?,
                    row_scales: Some(row_scales),
                };
                layers.push(layer);
                continue;
            }
            layers.push(Layer {
                attn_norm: f32s(&l(names::ATTN_NORM))?,
                qkv: Arc::new(Projections::new(vec![
                    linear(&l(names::Q), q, ActSite::AttnIn, i)?,
                    linear(&l(names::K), tensor(&l(names::K))?, ActSite::AttnIn, i)?,
                    linear(&l(names::V), tensor(&l(names::V))?, ActSite::AttnIn, i)?,
                ])),
                o: Arc::new(linear(&l(names::O), tensor(&l(names::O))?, ActSite::AttnOut, i)?),
                mlp_norm: f32s(&l(names::MLP_NORM))?,
                gate_up: Arc::new(Projections::new(vec![
                    linear(&l(names::GATE), tensor(&l(names::GATE))?, ActSite::MlpIn, i)?,
                    linear(&l(names::UP), tensor(&l(names::UP))?, ActSite::MlpIn, i)?,
                ])),
                down: Arc::new(linear(&l(names::DOWN), tensor(&l(names::DOWN))?, ActSite::DownIn, i)?),
                q_bias: bias(names::Q_BIAS)?,
                k_bias: bias(names::K_BIAS)?,
                v_bias: bias(names::V_BIAS)?,
                row_scales: None,
            });
        }
        let head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(linear(names::LM_HEAD, tensor(names::LM_HEAD)?, ActSite::FinalIn, 0)?)
        };
        Ok(Self {
            rope_inv_freq: cfg.rope_inv_freq(),
            tokenizer,
            isa,
            embed,
            layers,
            norm: f32s(names::FINAL_NORM)?,
            head,
            grids,
            weight_bytes: weight_bytes + shared_bytes,
            config: cfg,
        })
    }

    /// Put `x` on the static grid of `site` (no-op unless activations are static).
    fn site(&self, layer: usize, site: ActSite, x: &mut [f32]) {
        if let Some(g) = &self.grids {
            let g = g.get(layer, site);
            by_rows(x, self.config.hidden_size, |_, rows| g.fake(rows));
        }
    }

    /// `(cos, sin)` of every rotary angle for positions `start..start + s`,
    /// `[s, head_dim / 2]` each: computed once per forward pass, shared by every
    /// layer and head.
    fn rope_table(&self, start: usize, s: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.rope_inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(s * half), Vec::with_capacity(s * half));
        for p in start..start + s {
            for &f in &self.rope_inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// Final hidden states `[s, hidden]` for `tokens`, continuing `cache`.
    pub fn forward_hidden(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_hidden_adapted(tokens, cache, None)
    }

    /// Whether `adapter` fits this model (layers, shapes); errors name `path`.
    pub fn check_adapter(&self, adapter: &LoraAdapter, path: &std::path::Path) -> Result<()> {
        adapter.check_base(&self.config, path)
    }

    /// [`Self::forward_hidden`] with a LoRA adapter applied unmerged: each
    /// adapted linear adds `s·(x·Aᵀ)·Bᵀ` in f32 on its float input to the
    /// integer kernel's output (after a shared block's row scales, before
    /// biases). The base's weights are untouched, so one loaded model serves
    /// any number of adapters, chosen per call. Check the adapter against
    /// the model first ([`Self::check_adapter`]).
    pub fn forward_hidden_adapted(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (h, s) = (cfg.hidden_size, tokens.len());
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps as f32;
        let mut x = vec![0f32; s * h];
        for (&t, row) in tokens.iter().zip(x.chunks_mut(h)) {
            let t = t as usize;
            if t >= cfg.vocab_size {
                return Err(CoreError::Other(format!(
                    "token id {t} is outside the vocabulary ({})",
                    cfg.vocab_size
                )));
            }
            self.embed.dequantize_row(t, row);
        }
        self.site(0, ActSite::Embed, &mut x);
        let start = cache.len;
        let rope_table = self.rope_table(start, s);
        let mut normed = vec![0f32; s * h];
        for (li, layer) in self.layers.iter().enumerate() {
            by_rows(&mut normed, h, |first, out| {
                rms_norm(&x[first..][..out.len()], &layer.attn_norm, eps, out)
            });
            let mut qkv = layer.qkv.forward(self.isa, &normed, s);
            if let Some(r) = &layer.row_scales {
                scale_parts(&mut qkv, &r.qkv);
            }
            if let Some(a) = adapter {
                add_lora_parts(
                    &mut qkv,
                    a,
                    li,
                    &[LoraModule::Q, LoraModule::K, LoraModule::V],
                    &normed,
                    s,
                );
            }
            for (p, b) in [&layer.q_bias, &layer.k_bias, &layer.v_bias].into_iter().enumerate() {
                if let Some(b) = b {
                    for i in 0..s {
                        qkv.row_mut(p, i).iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                }
            }
            for i in 0..s {
                let angles = (
                    &rope_table.0[i * hd / 2..][..hd / 2],
                    &rope_table.1[i * hd / 2..][..hd / 2],
                );
                rope_row(qkv.row_mut(0, i), hd, angles);
                rope_row(qkv.row_mut(1, i), hd, angles);
                cache.k[li].extend_from_slice(qkv.row(1, i));
                cache.v[li].extend_from_slice(qkv.row(2, i));
            }
            let q = qkv.into_first_part();
            let (kc, vc) = (&cache.k[li], &cache.v[li]);
            let group = nh / nkv;
            let scale = (1.0 / (hd as f64).sqrt()) as f32;
            let probs_grid = self.grids.as_ref().map(|g| g.get(li, ActSite::Probs));
            // Items of (query row, query heads sharing one KV head): all the
            // group's heads when there are rows enough to keep every thread
            // busy (they share the loads of the keys and values), one head each
            // for a decode step. Each head's arithmetic is the same whichever
            // split runs, so the result does not depend on it or on the threads.
            let team = Team::global();
            let heads_per_item = if s * nkv >= 8 * team.threads() { group } else { 1 };
            let per_row = nh / heads_per_item;
            let width = heads_per_item * hd;
            let mut attn = vec![0f32; s * nh * hd];
            // Small tasks: under the causal mask the last rows cost the most, and
            // the last task claimed must not be a long one.
            let per_task = (s * per_row).div_ceil(32 * team.threads());
            team.for_each_chunk_mut(&mut attn, per_task * width, |t, chunk| {
                let mut scratch = Scratch::default();
                for (j, o) in chunk.chunks_mut(width).enumerate() {
                    let item = t * per_task + j;
                    let (i, first_head) = (item / per_row, (item % per_row) * heads_per_item);
                    let head_cache = HeadCache {
                        k: kc,
                        v: vc,
                        stride: nkv * hd,
                        offset: (first_head / group) * hd,
                        head_dim: hd,
                    };
                    let qs = &q[i * nh * hd + first_head * hd..][..width];
                    attend(
                        qs,
                        &head_cache,
                        start + i + 1,
                        scale,
                        probs_grid.as_ref(),
                        &mut scratch,
                        o,
                    );
                }
            });
            let mut o = layer.o.forward(self.isa, &attn, s);
            if let Some(r) = &layer.row_scales {
                scale_rows(&mut o, &r.o);
            }
            if let Some(d) = adapter.and_then(|a| a.delta(li, LoraModule::O, &attn, s)) {
                o.iter_mut().zip(&d).for_each(|(y, d)| *y += d);
            }
            self.site(li, ActSite::OOut, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            self.site(li, ActSite::AttnResidual, &mut x);
            by_rows(&mut normed, h, |first, out| {
                rms_norm(&x[first..][..out.len()], &layer.mlp_norm, eps, out)
            });
            let mut gate_up = layer.gate_up.forward(self.isa, &normed, s);
            if let Some(r) = &layer.row_scales {
                scale_parts(&mut gate_up, &r.gate_up);
            }
            if let Some(a) = adapter {
                add_lora_parts(&mut gate_up, a, li, &[LoraModule::Gate, LoraModule::Up], &normed, s);
            }
            // SiLU(gate) · up in place in each row's gate part.
            let ((g_first, width), (u_first, _)) = (gate_up.parts[0], gate_up.parts[1]);
            let stride = gate_up.stride;
            by_rows(&mut gate_up.data, stride, |_, rows| {
                for row in rows.chunks_mut(stride) {
                    let (g, u) = if g_first < u_first {
                        let (a, b) = row.split_at_mut(u_first);
                        (&mut a[g_first..g_first + width], &b[..width])
                    } else {
                        let (a, b) = row.split_at_mut(g_first);
                        (&mut b[..width], &a[u_first..u_first + width])
                    };
                    silu_mul(g, u);
                }
            });
            let g = gate_up.into_first_part();
            let mut d = layer.down.forward(self.isa, &g, s);
            if let Some(r) = &layer.row_scales {
                scale_rows(&mut d, &r.down);
            }
            if let Some(delta) = adapter.and_then(|a| a.delta(li, LoraModule::Down, &g, s)) {
                d.iter_mut().zip(&delta).for_each(|(y, d)| *y += d);
            }
            self.site(li, ActSite::DownOut, &mut d);
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            self.site(li, ActSite::MlpResidual, &mut x);
        }
        cache.len += s;
        let mut out = vec![0f32; s * h];
        rms_norm(&x, &self.norm, eps, &mut out);
        Ok(out)
    }

    /// Logits `[rows, vocab]` for hidden rows `[rows, hidden]`.
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Vec<f32> {
        self.head
            .as_ref()
            .unwrap_or(&self.embed)
            .forward(self.isa, hidden, rows)
    }
}

/// Add each of `modules`' LoRA update (from input rows `x`) to its part of `y`.
fn add_lora_parts(y: &mut ProjectedRows, a: &LoraAdapter, layer: usize, modules: &[LoraModule], x: &[f32], s: usize) {
    for (p, &m) in modules.iter().enumerate() {
        if let Some(d) = a.delta(layer, m, x, s) {
            let w = d.len() / s.max(1);
            for i in 0..s {
                y.row_mut(p, i)
                    .iter_mut()
                    .zip(&d[i * w..(i + 1) * w])
                    .for_each(|(y, d)| *y += d);
            }
        }
    }
}

/// A runtime model with a LoRA adapter applied (unmerged) to every call: what
/// evaluation and generation score. Borrow as many as wanted over one model.
pub struct Adapted<'a> {
    pub model: &'a RuntimeModel,
    pub adapter: Option<&'a LoraAdapter>,
}

impl RuntimeModel {
    /// This model with `adapter` applied (`None`: the base).
    pub fn with_adapter<'a>(&'a self, adapter: Option<&'a LoraAdapter>) -> Adapted<'a> {
        Adapted { model: self, adapter }
    }
}

impl CausalLm for RuntimeModel {
    fn score_window(&self, tokens: &[u32], first: usize) -> Result<WindowScores> {
        self.with_adapter(None).score_window(tokens, first)
    }

    fn log_probs(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.with_adapter(None).log_probs(tokens)
    }
}

impl CausalLm for Adapted<'_> {
    fn score_window(&self, tokens: &[u32], first: usize) -> Result<WindowScores> {
        let n = tokens.len();
        if n < 2 || first >= n - 1 {
            return Err(CoreError::Other(format!(
                "cannot score positions {first}.. of a {n}-token window"
            )));
        }
        let m = self.model;
        let h = m.config.hidden_size;
        let hidden = m.forward_hidden_adapted(tokens, &mut KvCache::with_capacity(m, tokens.len()), self.adapter)?;
        let rows = n - 1 - first;
        let logits = m.logits(&hidden[first * h..(n - 1) * h], rows);
        let v = m.config.vocab_size;
        let (nll, argmax) = logits
            .par_chunks(v)
            .enumerate()
            .map(|(i, row)| {
                let lp = log_softmax_row(row);
                (-lp[tokens[first + i + 1] as usize], oqt_core::sampling::argmax(row))
            })
            .unzip();
        Ok(WindowScores { nll, argmax })
    }

    fn log_probs(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let m = self.model;
        let hidden = m.forward_hidden_adapted(tokens, &mut KvCache::with_capacity(m, tokens.len()), self.adapter)?;
        let v = m.config.vocab_size;
        Ok(m.logits(&hidden, tokens.len()).chunks(v).map(log_softmax_row).collect())
    }
}

/// A per-row step of a forward pass (`f(first element, rows)` on whole rows of
/// `row` elements): over the thread team for a prompt, on this thread for the
/// few rows of a decode step. Rows are independent, so the split changes no
/// result.
fn by_rows(x: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = x.len() / row.max(1);
    if rows < 8 {
        return f(0, x);
    }
    let team = Team::global();
    let per_task = rows.div_ceil(4 * team.threads()) * row;
    team.for_each_chunk_mut(x, per_task, |t, chunk| f(t * per_task, chunk));
}

/// Rotate-half RoPE in place on one row of heads of `hd`, with the row's
/// `(cos, sin)` angles (`hd / 2` each).
fn rope_row(row: &mut [f32], hd: usize, (cos, sin): (&[f32], &[f32])) {
    let half = hd / 2;
    for head in row.chunks_mut(hd) {
        let (x1s, x2s) = head.split_at_mut(half);
        for (((x1, x2), &c), &s) in x1s.iter_mut().zip(x2s.iter_mut()).zip(cos).zip(sin) {
            let (a, b) = (*x1, *x2);
            *x1 = a * c - b * s;
            *x2 = b * c + a * s;
        }
    }
}
