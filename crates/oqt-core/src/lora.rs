//! LoRA adapters: a low-rank update `W + s·B·A` (`A` `[r, in]`, `B` `[out, r]`,
//! `s = α / r`, or `α / √r` with rsLoRA) of some of a model's decoder
//! linears, kept beside a frozen base instead of merged into it.
//!
//! The adapter is read and written in the ecosystem's layouts:
//! * PEFT's (`adapter_config.json` + `adapter_model.safetensors`, tensors
//!   `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, …),
//!   which `peft.PeftModel.from_pretrained` loads;
//! * llama.cpp's GGUF adapter (`general.type = adapter`, `adapter.type = lora`,
//!   `blk.N.attn_q.weight.lora_a` / `.lora_b`), which `llama-cli --lora`
//!   applies to oqt's GGUF export of the base (q/k rows in its rotary order).
//!
//! The update is computed in f32 on a linear's float input (before the
//! recipe quantizes it), in the runtime and in training alike.

use crate::config::LlamaConfig;
use crate::error::{CoreError, Result};

use crate::gguf::{GgmlType, GgufTensorOut, GgufWriter, MetaValue};
use crate::weights::{ModelWeights, names, rotary_gguf_order};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// PEFT's adapter config file.
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A decoder linear an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraModule {
    pub const ALL: [Self; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// PEFT's (and Hugging Face's) module name.
    pub fn peft_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    fn block(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    /// llama.cpp's tensor name stem (`blk.N.<stem>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Q => "attn_q",
            Self::K => "attn_k",
            Self::V => "attn_v",
            Self::O => "attn_output",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
        }
    }

    /// The canonical name of the weight this module adapts in `layer`.
    pub fn weight_name(self, layer: usize) -> String {
        let suffix = match self {
            Self::Q => names::Q,
            Self::K => names::K,
            Self::V => names::V,
            Self::O => names::O,
            Self::Gate => names::GATE,
            Self::Up => names::UP,
            Self::Down => names::DOWN,
        };
        names::layer(layer, suffix)
    }

    /// `q`, `k`, `v`, `o`, `gate`, `up`, `down`, or PEFT's `q_proj`, …
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|m| m.peft_name() == s || m.peft_name().trim_end_matches("_proj") == s)
            .ok_or_else(|| {
                format!(
                    "unknown LoRA target `{s}`: expected one of q, k, v, o, gate, up, down (or q_proj, …, down_proj)"
                )
            })
    }

    /// A comma-separated list (`q,v`, `all`), each module once, in model order.
    pub fn parse_list(s: &str) -> std::result::Result<Vec<Self>, String> {
        if s.trim() == "all" {
            return Ok(Self::ALL.to_vec());
        }
        let mut out = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Self::parse)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err("no LoRA target given: expected e.g. q,v or all".into());
        }
        Ok(out)
    }
}

/// One adapted linear: `A` `[rank, cols]` and `B` `[rows, rank]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub rows: usize,
    pub cols: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A LoRA adapter for one base model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA scaling (`α / √r`) instead of `α / r`.
    pub rslora: bool,
    pub modules: Vec<LoraModule>,
    /// What the adapter was trained on (PEFT's `base_model_name_or_path`).
    pub base_model: String,
    pub pairs: BTreeMap<(usize, LoraModule), LoraPair>,
}

/// The `[rows, cols]` of `module` in `layer` under `cfg`.
fn shape_of(cfg: &LlamaConfig, layer: usize, module: LoraModule) -> (usize, usize) {
    let (h, q, kv) = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let inter = cfg.intermediate_size_of(layer);
    match module {
        LoraModule::Q => (q, h),
        LoraModule::K | LoraModule::V => (kv, h),
        LoraModule::O => (h, q),
        LoraModule::Gate | LoraModule::Up => (inter, h),
        LoraModule::Down => (h, inter),
    }
}

impl LoraAdapter {
    /// A fresh adapter (PEFT's initialization: `A` uniform in `±1/√in`, `B`
    /// zero, so the adapted model starts as the base) on every layer of `cfg`.
    pub fn init(
        cfg: &LlamaConfig,
        rank: usize,
        alpha: f32,
        modules: &[LoraModule],
        seed: u64,
        base_model: &str,
    ) -> std::result::Result<Self, String> {
        if rank == 0 {
            return Err("--rank 0: a LoRA rank must be at least 1".into());
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(format!("--alpha {alpha}: expected a positive number"));
        }
        if modules.is_empty() {
            return Err("no LoRA target module given".into());
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x10FA_A11C);
        let mut pairs = BTreeMap::new();
        for layer in 0..cfg.num_layers {
            for &m in modules {
                let (rows, cols) = shape_of(cfg, layer, m);
                if rank > rows.min(cols) {
                    return Err(format!(
                        "--rank {rank} is larger than layer {layer}'s {} ({rows} × {cols}): a rank is at most {}",
                        m.peft_name(),
                        rows.min(cols)
                    ));
                }
                let bound = 1.0 / (cols as f32).sqrt();
                let a = (0..rank * cols).map(|_| rng.random_range(-bound..bound)).collect();
                pairs.insert(
                    (layer, m),
                    LoraPair {
                        rows,
                        cols,
                        a,
                        b: vec![0.0; rows * rank],
                    },
                );
            }
        }
        Ok(Self {
            rank,
            alpha,
            rslora: false,
            modules: modules.to_vec(),
            base_model: base_model.to_string(),
            pairs,
        })
    }

    /// The factor `s` of `W + s·B·A`.
    pub fn scaling(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Trainable values (A and B of every pair).
    pub fn n_params(&self) -> usize {
        self.pairs.values().map(|p| p.a.len() + p.b.len()).sum()
    }

    /// Whether the adapter fits `cfg` (layers, shapes); errors name `path`
    /// (the adapter's file) and the first tensor that does not fit.
    pub fn check_base(&self, cfg: &LlamaConfig, path: &Path) -> Result<()> {
        for (&(layer, m), p) in &self.pairs {
            let field = format!("layers.{layer}.{}", m.peft_name());
            if layer >= cfg.num_layers {
                return Err(CoreError::BadField {
                    path: path.to_path_buf(),
                    field,
                    expected: format!("a layer of the base (it has {})", cfg.num_layers),
                    found: format!("layer {layer}"),
                });
            }
            let (rows, cols) = shape_of(cfg, layer, m);
            if (p.rows, p.cols) != (rows, cols) {
                return Err(CoreError::BadField {
                    path: path.to_path_buf(),
                    field,
                    expected: format!("an update of the base's {rows} × {cols} weight"),
                    found: format!("{} × {} (an adapter for another model)", p.rows, p.cols),
                });
            }
        }
        Ok(())
    }

    /// `s·(x·Aᵀ)·Bᵀ` for `rows` input rows `x` (`[rows, cols]`), `[rows, out]`,
    /// or `None` when `(layer, module)` is not adapted. Each product is
    /// accumulated in f64 and rounded once to f32 (`u = round(x·Aᵀ)·s`, then
    /// `round(u·Bᵀ)`): independent of summation order, so the simulation
    /// reproduces it bit for bit — a last-bit difference would flip a later
    /// dynamic quantizer's rounding. The rank is small; this costs little.
    pub fn delta(&self, layer: usize, module: LoraModule, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let p = self.pairs.get(&(layer, module))?;
        let (r, s) = (self.rank, self.scaling());
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
        let mut out = vec![0f32; rows * p.rows];
        let mut u = vec![0f32; r];
        for (xi, oi) in x.chunks_exact(p.cols).take(rows).zip(out.chunks_exact_mut(p.rows)) {
            for (uk, ak) in u.iter_mut().zip(p.a.chunks_exact(p.cols)) {
                *uk = dot(ak, xi) * s;
            }
            for (o, bo) in oi.iter_mut().zip(p.b.chunks_exact(r)) {
                *o = dot(bo, &u);
            }
        }
        Some(out)
    }

    /// `W ← W + s·B·A` for the weight of `(layer, module)` (`[rows, cols]`,
    /// row-major); false when that linear is not adapted.
    pub fn merge_into(&self, layer: usize, module: LoraModule, w: &mut [f32]) -> bool {
        let Some(p) = self.pairs.get(&(layer, module)) else {
            return false;
        };
        let (r, s) = (self.rank, self.scaling());
        for (wo, bo) in w.chunks_exact_mut(p.cols).zip(p.b.chunks_exact(r)) {
            for (k, &b) in bo.iter().enumerate() {
                let sb = s * b;
                if sb != 0.0 {
                    for (w, a) in wo.iter_mut().zip(&p.a[k * p.cols..(k + 1) * p.cols]) {
                        *w += sb * a;
                    }
                }
            }
        }
        true
    }

    fn peft_tensor(layer: usize, m: LoraModule, which: char) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
            m.block(),
            m.peft_name()
        )
    }

    /// Write the adapter as PEFT saves one: `dir/adapter_config.json` and
    /// `dir/adapter_model.safetensors` (f32), replacing `dir` atomically.
    pub fn write_peft(&self, dir: &Path) -> Result<()> {
        crate::fs::write_dir_atomically(dir, |tmp| self.write_peft_files(tmp))
    }

    /// PEFT's two files into the existing directory `dir` (for callers that
    /// add their own files to one atomic write, e.g. a checkpoint).
    pub fn write_peft_files(&self, dir: &Path) -> Result<()> {
        let config = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: self.rank,
            lora_alpha: self.alpha,
            target_modules: TargetModules::List(self.modules.iter().map(|m| m.peft_name().to_string()).collect()),
            base_model_name_or_path: Some(self.base_model.clone()),
            lora_dropout: 0.0,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            use_rslora: self.rslora,
            use_dora: false,
            init_lora_weights: serde_json::Value::Bool(true),
            modules_to_save: None,
            layers_to_transform: serde_json::Value::Null,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            revision: None,
        };
        let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (&(layer, m), p) in &self.pairs {
            bytes.push((Self::peft_tensor(layer, m, 'A'), vec![self.rank, p.cols], le(&p.a)));
            bytes.push((Self::peft_tensor(layer, m, 'B'), vec![p.rows, self.rank], le(&p.b)));
        }
        let views = bytes
            .iter()
            .map(|(n, s, b)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("shape matches its bytes");
                (n.clone(), v)
            })
            .collect::<Vec<_>>();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join(PEFT_WEIGHTS_FILE);
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| CoreError::Other(format!("{}: {e}", path.display())))?;
        let path = dir.join(PEFT_CONFIG_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&config).expect("serializable"))
            .map_err(|e| CoreError::io(&path, e))
    }

    /// Read a PEFT LoRA adapter directory (f32, f16 or bf16 tensors). Every
    /// refusal names the file and the field.
    pub fn read_peft(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(PEFT_CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
        let config: PeftConfig = serde_json::from_str(&text).map_err(|e| CoreError::Malformed {
            path: cfg_path.clone(),
            format: "PEFT adapter config",
            reason: e.to_string(),
        })?;
        let bad = |field: &str, expected: &str, found: String| CoreError::BadField {
            path: cfg_path.clone(),
            field: field.into(),
            expected: expected.into(),
            found,
        };
        if config.peft_type != "LORA" {
            return Err(bad("peft_type", "LORA", config.peft_type));
        }
        if config.r == 0 {
            return Err(bad("r", "a rank of at least 1", "0".into()));
        }
        if !(config.lora_alpha.is_finite() && config.lora_alpha > 0.0) {
            return Err(bad("lora_alpha", "a positive number", config.lora_alpha.to_string()));
        }
        if config.use_dora {
            return Err(bad("use_dora", "false (DoRA is not supported)", "true".into()));
        }
        if config.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out",
                "false (Conv1D layouts are not Llama's)",
                "true".into(),
            ));
        }
        if config.bias != "none" {
            return Err(bad("bias", "\"none\"", format!("{:?}", config.bias)));
        }
        if !config.rank_pattern.is_empty() {
            return Err(bad(
                "rank_pattern",
                "no per-module ranks (one r for every module)",
                format!("{:?}", config.rank_pattern),
            ));
        }
        if !config.alpha_pattern.is_empty() {
            return Err(bad(
                "alpha_pattern",
                "no per-module alphas (one lora_alpha for every module)",
                format!("{:?}", config.alpha_pattern),
            ));
        }
        // Initializations that rewrite the base weights (PiSSA, OLoRA, LoftQ, …)
        // make an adapter for a modified base; plain and gaussian ones do not.
        match &config.init_lora_weights {
            serde_json::Value::Bool(_) | serde_json::Value::Null => {}
            serde_json::Value::String(s) if s == "gaussian" => {}
            other => {
                return Err(bad(
                    "init_lora_weights",
                    "true, false or \"gaussian\" (other initializations change the base weights)",
                    other.to_string(),
                ));
            }
        }
        let modules = match &config.target_modules {
            TargetModules::List(l) => l
                .iter()
                .map(|m| LoraModule::parse(m).map_err(|e| bad("target_modules", "Llama decoder linears", e)))
                .collect::<Result<Vec<_>>>()?,
            TargetModules::Pattern(p) => {
                return Err(bad(
                    "target_modules",
                    "a list of module names",
                    format!("the pattern {p:?}"),
                ));
            }
        };
        let w_path = dir.join(PEFT_WEIGHTS_FILE);
        let file = std::fs::File::open(&w_path).map_err(|e| CoreError::io(&w_path, e))?;
        // SAFETY: read-only map of a file oqt never rewrites in place.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CoreError::io(&w_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| CoreError::Malformed {
            path: w_path.clone(),
            format: "safetensors",
            reason: e.to_string(),
        })?;
        let rank = config.r;
        let mut halves: BTreeMap<(usize, LoraModule), (Option<Half>, Option<Half>)> = BTreeMap::new();
        for (name, view) in st.tensors() {
            let (layer, module, which) = parse_peft_name(&name).ok_or_else(|| CoreError::BadField {
                path: w_path.clone(),
                field: name.clone(),
                expected: "a LoRA tensor `base_model.model.model.layers.N.{self_attn|mlp}.MODULE.lora_{A|B}.weight`"
                    .into(),
                found: "another tensor".into(),
            })?;
            if !modules.contains(&module) {
                return Err(CoreError::BadField {
                    path: w_path.clone(),
                    field: name,
                    expected: format!("one of target_modules {:?}", config.target_modules),
                    found: format!("a {} tensor", module.peft_name()),
                });
            }
            let values = floats(&view).map_err(|found| CoreError::BadField {
                path: w_path.clone(),
                field: name.clone(),
                expected: "F32, F16 or BF16 values".into(),
                found,
            })?;
            let shape = view.shape().to_vec();
            let entry = halves.entry((layer, module)).or_default();
            let slot = if which == 'A' { &mut entry.0 } else { &mut entry.1 };
            *slot = Some((shape, values));
        }
        if halves.is_empty() {
            return Err(CoreError::Missing {
                path: w_path,
                what: "tensor",
                name: "any lora_A / lora_B weight".into(),
            });
        }
        let mut pairs = BTreeMap::new();
        for ((layer, m), (a, b)) in halves {
            let missing = |which: char| CoreError::Missing {
                path: w_path.clone(),
                what: "tensor",
                name: Self::peft_tensor(layer, m, which),
            };
            let (a_shape, a) = a.ok_or_else(|| missing('A'))?;
            let (b_shape, b) = b.ok_or_else(|| missing('B'))?;
            let shape_err = |which: char, want: String, found: &[usize]| CoreError::BadField {
                path: w_path.clone(),
                field: Self::peft_tensor(layer, m, which),
                expected: want,
                found: format!("shape {found:?}"),
            };
            if a_shape.len() != 2 || a_shape[0] != rank || a_shape[1] == 0 {
                return Err(shape_err('A', format!("shape [r = {rank}, in]"), &a_shape));
            }
            if b_shape.len() != 2 || b_shape[1] != rank || b_shape[0] == 0 {
                return Err(shape_err('B', format!("shape [out, r = {rank}]"), &b_shape));
            }
            pairs.insert(
                (layer, m),
                LoraPair {
                    rows: b_shape[0],
                    cols: a_shape[1],
                    a,
                    b,
                },
            );
        }
        Ok(Self {
            rank,
            alpha: config.lora_alpha,
            rslora: config.use_rslora,
            modules,
            base_model: config.base_model_name_or_path.unwrap_or_default(),
            pairs,
        })
    }

    /// Write the adapter as a llama.cpp GGUF LoRA adapter for `cfg`'s model
    /// as oqt exports it (q/k output rows in llama.cpp's rotary order). The
    /// rsLoRA factor is folded into `adapter.lora.alpha` (llama.cpp scales by
    /// `α / r`).
    pub fn write_gguf(&self, cfg: &LlamaConfig, path: &Path) -> Result<()> {
        self.check_base(cfg, path)?;
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .meta("general.type", MetaValue::String("adapter".into()))
            .meta("general.name", MetaValue::String(format!("{} LoRA", self.base_model)))
            .meta("adapter.type", MetaValue::String("lora".into()))
            .meta("adapter.lora.alpha", MetaValue::F32(self.scaling() * self.rank as f32));
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (&(layer, m), p) in &self.pairs {
            let stem = format!("blk.{layer}.{}.weight", m.gguf_name());
            let b = match cfg.rotary_heads(&m.weight_name(layer)) {
                Some(heads) => rotary_gguf_order(p.rows, heads)
                    .into_iter()
                    .flat_map(|src| p.b[src * self.rank..(src + 1) * self.rank].iter().copied())
                    .collect(),
                None => p.b.clone(),
            };
            w.tensor(GgufTensorOut {
                name: format!("{stem}.lora_a"),
                dims: vec![p.cols as u64, self.rank as u64],
                ty: GgmlType::F32,
                data: f32_bytes(&p.a),
            })?;
            w.tensor(GgufTensorOut {
                name: format!("{stem}.lora_b"),
                dims: vec![self.rank as u64, p.rows as u64],
                ty: GgmlType::F32,
                data: f32_bytes(&b),
            })?;
        }
        w.write(path)
    }

    /// Every adapted weight of `weights` merged in float (`W + s·B·A`).
    pub fn merge_weights(&self, weights: &mut ModelWeights) -> Result<()> {
        for &(layer, m) in self.pairs.keys() {
            let name = m.weight_name(layer);
            let t = weights
                .get_mut(&name)
                .ok_or_else(|| CoreError::Other(format!("merging the adapter: the base has no `{name}`")))?;
            self.merge_into(layer, m, &mut t.data);
        }
        Ok(())
    }
}

/// One factor as read: its shape and values.
type Half = (Vec<usize>, Vec<f32>);

/// `(layer, module, 'A' | 'B')` of a PEFT tensor name (with or without
/// PEFT's `base_model.model.` prefix and an adapter name such as `.default`).
fn parse_peft_name(name: &str) -> Option<(usize, LoraModule, char)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mut parts = rest.split('.');
    let block = parts.next()?;
    let module = LoraModule::parse(parts.next()?).ok()?;
    if block != module.block() {
        return None;
    }
    let which = match parts.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    let tail: Vec<&str> = parts.collect();
    match tail.as_slice() {
        ["weight"] | [_, "weight"] => Some((layer, module, which)),
        _ => None,
    }
}

fn floats(view: &safetensors::tensor::TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    let data = view.data();
    match view.dtype() {
        safetensors::Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        safetensors::Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        safetensors::Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(format!("{other:?}")),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// The fields of PEFT's `LoraConfig` oqt reads and writes (others are ignored on read).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f32,
    target_modules: TargetModules,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    lora_dropout: f32,
    #[serde(default = "bias_none")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default = "yes")]
    init_lora_weights: serde_json::Value,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    /// A layer or a list of them (the adapter then holds only those).
    #[serde(default)]
    layers_to_transform: serde_json::Value,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    revision: Option<String>,
}

fn bias_none() -> String {
    "none".into()
}

fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_config;

    fn trained(seed: u64) -> LoraAdapter {
        let cfg = tiny_config();
        let mut a = LoraAdapter::init(&cfg, 2, 4.0, &[LoraModule::Q, LoraModule::Down], seed, "tiny").unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for p in a.pairs.values_mut() {
            p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.1..0.1));
        }
        a
    }

    #[test]
    fn peft_files_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let a = trained(3);
        a.write_peft(&dir.path().join("ad")).unwrap();
        let back = LoraAdapter::read_peft(&dir.path().join("ad")).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn delta_is_the_merged_weight_s_difference() {
        let cfg = tiny_config();
        let a = trained(4);
        let (rows, cols) = shape_of(&cfg, 1, LoraModule::Down);
        let x: Vec<f32> = (0..2 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let d = a.delta(1, LoraModule::Down, &x, 2).unwrap();
        let mut w = vec![0f32; rows * cols];
        assert!(a.merge_into(1, LoraModule::Down, &mut w));
        for i in 0..2 {
            for o in 0..rows {
                let want: f32 = (0..cols).map(|c| w[o * cols + c] * x[i * cols + c]).sum();
                assert!((d[i * rows + o] - want).abs() < 1e-5, "{} vs {want}", d[i * rows + o]);
            }
        }
        assert!(a.delta(0, LoraModule::V, &x, 1).is_none());
    }

    #[test]
    fn bad_ranks_targets_and_bases_are_refused_with_the_reason() {
        let cfg = tiny_config();
        let e = LoraAdapter::init(&cfg, 0, 1.0, &[LoraModule::Q], 0, "x").unwrap_err();
        assert!(e.contains("--rank 0"), "{e}");
        let e = LoraAdapter::init(&cfg, 10_000, 1.0, &[LoraModule::Q], 0, "x").unwrap_err();
        assert!(e.contains("larger than") && e.contains("q_proj"), "{e}");
        let e = LoraModule::parse_list("q,attn").unwrap_err();
        assert!(e.contains("`attn`"), "{e}");
        assert_eq!(
            LoraModule::parse_list("v_proj,q").unwrap(),
            vec![LoraModule::Q, LoraModule::V]
        );
        let mut other = cfg.clone();
        other.hidden_size *= 2;
        let e = trained(1).check_base(&other, Path::new("ad")).unwrap_err().to_string();
        assert!(e.contains("another model") && e.contains("ad"), "{e}");
        let mut shallow = cfg.clone();
        shallow.num_layers = 1;
        let e = trained(1)
            .check_base(&shallow, Path::new("ad"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 1"), "{e}");
    }

    #[test]
    fn hostile_peft_files_are_refused_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let ad = dir.path().join("ad");
        trained(2).write_peft(&ad).unwrap();
        let cfg_path = ad.join(PEFT_CONFIG_FILE);
        let good = std::fs::read_to_string(&cfg_path).unwrap();
        let edit = |from: &str, to: &str| {
            assert!(good.contains(from), "{from}");
            std::fs::write(&cfg_path, good.replace(from, to)).unwrap();
            LoraAdapter::read_peft(&ad).unwrap_err().to_string()
        };
        let e = edit("\"r\": 2", "\"r\": 0");
        assert!(e.contains(PEFT_CONFIG_FILE) && e.contains("`r`"), "{e}");
        let e = edit("\"peft_type\": \"LORA\"", "\"peft_type\": \"IA3\"");
        assert!(e.contains("peft_type"), "{e}");
        let e = edit("\"q_proj\"", "\"qkv_proj\"");
        assert!(e.contains("target_modules") && e.contains("qkv_proj"), "{e}");
        let e = edit("\"r\": 2", "\"r\": 3");
        assert!(e.contains(PEFT_WEIGHTS_FILE) && e.contains("lora_A"), "{e}");
        let e = edit("\"use_dora\": false", "\"use_dora\": true");
        assert!(e.contains("use_dora"), "{e}");
        let e = edit("\"alpha_pattern\": {}", "\"alpha_pattern\": {\"q_proj\": 32}");
        assert!(e.contains("alpha_pattern"), "{e}");
        let e = edit("\"init_lora_weights\": true", "\"init_lora_weights\": \"pissa\"");
        assert!(e.contains("init_lora_weights") && e.contains("pissa"), "{e}");
        std::fs::write(
            &cfg_path,
            good.replace("\"init_lora_weights\": true", "\"init_lora_weights\": \"gaussian\""),
        )
        .unwrap();
        LoraAdapter::read_peft(&ad).expect("a gaussian-initialized adapter is an ordinary one");
        std::fs::write(&cfg_path, "{not json").unwrap();
        let e = LoraAdapter::read_peft(&ad).unwrap_err().to_string();
        assert!(e.contains("malformed PEFT adapter config"), "{e}");
        std::fs::write(&cfg_path, &good).unwrap();
        std::fs::write(ad.join(PEFT_WEIGHTS_FILE), b"\x08\0\0\0\0\0\0\0{}garbage").unwrap();
        let e = LoraAdapter::read_peft(&ad).unwrap_err().to_string();
        assert!(e.contains(PEFT_WEIGHTS_FILE), "{e}");
        let e = LoraAdapter::read_peft(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(PEFT_CONFIG_FILE), "{e}");
    }

    #[test]
    fn peft_names_parse_with_and_without_prefix_and_adapter_name() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"),
            Some((3, LoraModule::Down, 'B'))
        );
        assert_eq!(
            parse_peft_name("model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            Some((0, LoraModule::Q, 'A'))
        );
        assert_eq!(parse_peft_name("model.layers.0.mlp.q_proj.lora_A.weight"), None);
        assert_eq!(parse_peft_name("model.layers.x.self_attn.q_proj.lora_A.weight"), None);
        assert_eq!(parse_peft_name("lm_head.lora_A.weight"), None);
    }
}
