use super::{BUNDLE_FORMAT_VERSION, MANIFEST_KEY, Manifest};
use crate::encoding::TensorEncoding;
use crate::error::{CoreError, Result};
use crate::quant::{ActMode, QuantizedWeight, SiteGrids};
use crate::sparse::SparseLayout;
use crate::tokenizer::Tokenizer;
use crate::weights::TensorF32;
use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::Metadata;
use std::path::{Path, PathBuf};

/// An opened bundle: the manifest plus memory-mapped tensor bytes.
pub struct Bundle {
    pub path: PathBuf,
    pub manifest: Manifest,
    mmap: Mmap,
    header: Metadata,
    data_start: usize,
}

/// A tensor's raw view.
pub struct BundleTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("path", &self.path)
            .field("tensors", &self.manifest.deployment.tensors.len())
            .finish()
    }
}

/// The file's first four bytes, printable ASCII as text, anything else as hex.
fn first_bytes(data: &[u8]) -> String {
    let head = &data[..data.len().min(4)];
    if !head.is_empty() && head.iter().all(|b| b.is_ascii_graphic()) {
        format!("`{}`", String::from_utf8_lossy(head))
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes [{}]", hex.join(" "))
    }
}

impl Bundle {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let malformed = |reason: String| CoreError::Malformed {
            path: path.into(),
            format: "oqt bundle",
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
        // SAFETY: read-only map; oqt never modifies a bundle in place (writes are temp + rename).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CoreError::io(path, e))?;
        let (header_len, header) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => malformed(format!(
                "the file is truncated ({} bytes; its header describes more)",
                mmap.len()
            )),
            e => malformed(format!(
                "neither of the formats oqt reads by content: as an oqt bundle, not a readable \
                 safetensors file ({e}; expected an 8-byte little-endian header length, then a \
                 JSON header); as GGUF, expected the magic `GGUF` at byte 0, found {}",
                first_bytes(&mmap)
            )),
        })?;
        let data_start = 8 + header_len;
        if mmap.len() < data_start + header.data_len() {
            return Err(malformed(format!(
                "the file is truncated: {} bytes, the header describes {}",
                mmap.len(),
                data_start + header.data_len()
            )));
        }
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(MANIFEST_KEY))
            .ok_or_else(|| {
                malformed(format!(
                    "no `{MANIFEST_KEY}` metadata: a safetensors file, but not an oqt bundle"
                ))
            })?;
        // Check the version before the rest of the manifest, so a newer bundle says so.
        let version = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("format_version")?.as_u64())
            .ok_or_else(|| malformed("manifest has no numeric `format_version`".into()))?;
        if version > BUNDLE_FORMAT_VERSION as u64 {
            return Err(CoreError::Unsupported {
                path: path.into(),
                what: "bundle format version",
                detail: format!("{version}; this oqt reads up to version {BUNDLE_FORMAT_VERSION} — upgrade oqt"),
            });
        }
        let manifest: Manifest = if version < 2 {
            super::v1::upgrade(json).map_err(malformed)?
        } else {
            serde_json::from_str(json).map_err(|e| malformed(format!("manifest: {e}")))?
        };
        let bundle = Self {
            path: path.into(),
            manifest,
            mmap,
            header,
            data_start,
        };
        bundle.check_tensors()?;
        Ok(bundle)
    }

    fn check_tensors(&self) -> Result<()> {
        for (name, encoding) in &self.manifest.deployment.tensors {
            if let Some(reason) = encoding.field_problems() {
                return Err(CoreError::Malformed {
                    path: self.path.clone(),
                    format: "oqt bundle manifest",
                    reason: format!("deployment.tensors.{name}: {reason}"),
                });
            }
            if let TensorEncoding::Shared { of, .. } = encoding {
                let problem = match self.manifest.deployment.tensors.get(of) {
                    None => Some(format!("its source `{of}` is not in the bundle")),
                    Some(TensorEncoding::Shared { .. }) => Some(format!(
                        "its source `{of}` is itself shared (one level of sharing only)"
                    )),
                    Some(source) if source.shape() != encoding.shape() => Some(format!(
                        "shape {:?}, but its source `{of}` has shape {:?}",
                        encoding.shape(),
                        source.shape()
                    )),
                    Some(_) => None,
                };
                if let Some(reason) = problem {
                    return Err(CoreError::Malformed {
                        path: self.path.clone(),
                        format: "oqt bundle manifest",
                        reason: format!("deployment.tensors.{name}: {reason}"),
                    });
                }
            }
            for (n, dtype) in encoding.stored_names(name) {
                match self.header.info(&n) {
                    None => {
                        return Err(CoreError::Missing {
                            path: self.path.clone(),
                            what: "tensor",
                            name: n,
                        });
                    }
                    Some(i) if i.dtype != dtype => {
                        return Err(CoreError::BadField {
                            path: self.path.clone(),
                            field: n,
                            expected: format!("{dtype:?}"),
                            found: format!("{:?}", i.dtype),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    pub fn tensor(&self, name: &str) -> Option<BundleTensor<'_>> {
        let info = self.header.info(name)?;
        let (a, b) = info.data_offsets;
        Some(BundleTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &self.mmap[self.data_start + a..self.data_start + b],
        })
    }

    /// Drop the resident pages of tensor `name` (all its stored parts) once a
    /// loader has copied it into its own layout: a runtime that converts every
    /// weight would otherwise hold the file's pages and its converted weights
    /// at once. Only whole pages inside the tensor's bytes are dropped; reading
    /// them again later faults them back in from the file.
    pub fn release(&self, name: &str) {
        let Some(encoding) = self.manifest.deployment.tensors.get(name) else {
            return;
        };
        let page = page_size();
        for (stored, _) in encoding.stored_names(name) {
            let Some(info) = self.header.info(&stored) else {
                continue;
            };
            let (a, b) = info.data_offsets;
            let (start, end) = (
                (self.data_start + a).next_multiple_of(page),
                (self.data_start + b) / page * page,
            );
            if end > start {
                // SAFETY: the map is read-only and file-backed, so dropped pages are
                // read back from the file on the next access; no reference into
                // this range is used for writing.
                let _ = unsafe {
                    self.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_stored(&self.manifest.tokenizer, &self.path)
    }

    /// The first tensor stored as `shared` (a block using another's linears), if any.
    pub fn first_shared(&self) -> Option<&str> {
        self.manifest
            .deployment
            .tensors
            .iter()
            .find_map(|(n, e)| matches!(e, TensorEncoding::Shared { .. }).then_some(n.as_str()))
    }

    /// A shared weight's source and row scales (`None` for any other tensor).
    pub fn shared(&self, name: &str) -> Result<Option<(&str, Vec<f32>)>> {
        let Some(TensorEncoding::Shared { rows, of, .. }) = self.manifest.deployment.tensors.get(name) else {
            return Ok(None);
        };
        let field = TensorEncoding::row_scales_name(name);
        let scales = self.stored_f32(&field)?;
        if scales.len() != *rows {
            return Err(CoreError::BadField {
                path: self.path.clone(),
                field,
                expected: format!("{rows} row scales"),
                found: format!("{} values", scales.len()),
            });
        }
        Ok(Some((of.as_str(), scales)))
    }

    /// A weight's values as f32 in canonical layout whatever its encoding
    /// (quantized ones dequantized, shared ones expanded from their source).
    pub fn dense(&self, name: &str) -> Result<Vec<f32>> {
        if let Some((of, scales)) = self.shared(name)? {
            let mut w = self.dense(of)?;
            crate::sharing::scale_rows(&mut w, &scales);
            return Ok(w);
        }
        match self.manifest.deployment.tensors.get(name).and_then(|e| e.int_grid()) {
            Some(_) => Ok(crate::quant::dequantize_weight(&self.quantized(name)?)),
            None => self.f32_tensor(name),
        }
    }

    /// A float tensor by name: a stored F32 tensor, or a manifest tensor of
    /// encoding `sparse` with f32 values, expanded to its dense shape (or a
    /// shared weight, expanded from its source).
    pub fn f32_tensor(&self, name: &str) -> Result<Vec<f32>> {
        if let Some(TensorEncoding::Shared { .. }) = self.manifest.deployment.tensors.get(name) {
            return self.dense(name);
        }
        if let Some(TensorEncoding::Sparse {
            rows,
            cols,
            layout,
            values,
        }) = self.manifest.deployment.tensors.get(name)
            && values.int_grid().is_none()
        {
            return self.sparse_f32(name, *rows, *cols, *layout);
        }
        self.stored_f32(name)
    }

    fn sparse_f32(&self, name: &str, rows: usize, cols: usize, layout: SparseLayout) -> Result<Vec<f32>> {
        let kept = self.stored_f32(name)?;
        let field = layout.positions_name(name);
        let raw = self.tensor(&field).expect("checked at open");
        let bad = |expected: String| CoreError::BadField {
            path: self.path.clone(),
            field: field.clone(),
            expected,
            found: format!("{} bytes", raw.bytes.len()),
        };
        match layout {
            SparseLayout::Bitmap => {
                let mask = crate::sparse::read_bitmap(raw.bytes, rows, cols).map_err(bad)?;
                let set = mask.iter().filter(|k| **k).count();
                if set != kept.len() {
                    return Err(CoreError::BadField {
                        path: self.path.clone(),
                        field: name.into(),
                        expected: format!("{set} values (the bits set in {field})"),
                        found: format!("{} values", kept.len()),
                    });
                }
                let mut it = kept.into_iter();
                Ok(mask
                    .iter()
                    .map(|&k| if k { it.next().expect("counted") } else { 0.0 })
                    .collect())
            }
            SparseLayout::NOfM { n, m } => {
                let pos = crate::sparse::unpack_positions(raw.bytes, rows, cols, layout).map_err(bad)?;
                if kept.len() != pos.len() {
                    return Err(CoreError::BadField {
                        path: self.path.clone(),
                        field: name.into(),
                        expected: format!("{} values", pos.len()),
                        found: format!("{} values", kept.len()),
                    });
                }
                Ok(crate::sparse::scatter_n_of_m(&kept, &pos, rows, cols, n, m, |_| 0.0))
            }
        }
    }

    fn stored_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| CoreError::Missing {
            path: self.path.clone(),
            what: "tensor",
            name: name.into(),
        })?;
        Ok(t.bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// A quantized weight back in unpacked form (`q` row-major `[rows, cols]`).
    pub fn quantized(&self, name: &str) -> Result<QuantizedWeight> {
        let found = self.manifest.deployment.tensors.get(name);
        let Some(encoding) = found.filter(|e| e.int_grid().is_some()) else {
            return Err(CoreError::Missing {
                path: self.path.clone(),
                what: "quantized tensor",
                name: name.into(),
            });
        };
        if let TensorEncoding::Lut { .. } = encoding {
            return Ok(self.palettized(name)?.kernel_view());
        }
        let TensorEncoding::Sparse {
            rows,
            cols,
            layout,
            values,
        } = encoding
        else {
            return self.quantized_as(name, encoding);
        };
        // N:M: the compacted codes, scattered back with the zero code between them.
        let (SparseLayout::NOfM { n, m }, &rows, &cols) = (*layout, rows, cols) else {
            unreachable!("only N:M sparse encodings have an integer grid");
        };
        let mut compact = self.quantized_as(name, values)?;
        let field = layout.positions_name(name);
        let raw = self.tensor(&field).expect("checked at open");
        let pos = crate::sparse::unpack_positions(raw.bytes, rows, cols, *layout).map_err(|expected| {
            CoreError::BadField {
                path: self.path.clone(),
                field,
                expected,
                found: format!("{} bytes", raw.bytes.len()),
            }
        })?;
        let kept = std::mem::take(&mut compact.q);
        let mut dense = QuantizedWeight {
            cols,
            group: encoding.int_grid().expect("checked above").group,
            ..compact
        };
        dense.q =
            crate::sparse::scatter_n_of_m(&kept, &pos, rows, cols, n, m, |i| crate::encoding::zero_code(&dense, i));
        Ok(dense)
    }

    /// A palettized weight (`lut` encoding): its indices unpacked and its f16
    /// tables, checked.
    pub fn palettized(&self, name: &str) -> Result<crate::lut::Palettized> {
        let found = self.manifest.deployment.tensors.get(name);
        let Some(&TensorEncoding::Lut {
            rows,
            cols,
            bits,
            group_rows,
        }) = found
        else {
            return Err(CoreError::Missing {
                path: self.path.clone(),
                what: "palettized tensor",
                name: name.into(),
            });
        };
        let bad = |field: String, expected: String, found: String| CoreError::BadField {
            path: self.path.clone(),
            field,
            expected,
            found,
        };
        let field = TensorEncoding::lut_indices_name(name);
        let raw = self.tensor(&field).expect("checked at open");
        let indices = crate::lut::unpack_indices(raw.bytes, rows, cols, bits)
            .map_err(|expected| bad(field.clone(), expected, format!("{} bytes", raw.bytes.len())))?;
        let field = TensorEncoding::lut_table_name(name);
        let raw = self.tensor(&field).expect("checked at open");
        let tables: Vec<half::f16> = raw
            .bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
            .collect();
        let p = crate::lut::Palettized {
            rows,
            cols,
            bits,
            group_rows,
            tables,
            indices,
        };
        if let Some(problem) = p.problems() {
            return Err(bad(field, "a well-formed palette".into(), problem));
        }
        Ok(p)
    }

    /// A quantized weight stored as `encoding` (not sparse) under `name`.
    fn quantized_as(&self, name: &str, encoding: &TensorEncoding) -> Result<QuantizedWeight> {
        let grid = encoding.int_grid().expect("an integer encoding");
        let (rows, cols, group, spec) = (grid.rows, grid.cols, grid.group, grid.spec);
        let raw = self.tensor(&format!("{name}.qweight")).expect("checked at open");
        let mut q = encoding
            .load_values(raw.bytes)
            .map_err(|expected| CoreError::BadField {
                path: self.path.clone(),
                field: format!("{name}.qweight"),
                expected,
                found: format!("{} bytes", raw.bytes.len()),
            })?;
        let multipliers = if grid.lpbq_block.is_some() {
            let field = TensorEncoding::multipliers_name(name);
            let m = self.tensor(&field).expect("checked at open").bytes.to_vec();
            encoding
                .expand_lpbq(&mut q, &m)
                .map_err(|expected| CoreError::BadField {
                    path: self.path.clone(),
                    field,
                    expected,
                    found: format!("{} bytes", m.len()),
                })?;
            Some(m)
        } else {
            None
        };
        let scales = self.f32_tensor(&format!("{name}.scales"))?;
        let groups = grid.scale_count();
        if scales.len() != groups {
            return Err(CoreError::BadField {
                path: self.path.clone(),
                field: format!("{name}.scales"),
                expected: format!("{groups} values"),
                found: format!("{} values", scales.len()),
            });
        }
        let zero_points = if spec.symmetric {
            None
        } else {
            let z = self.tensor(&format!("{name}.zero_points")).expect("checked at open");
            Some(
                z.bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        };
        Ok(QuantizedWeight {
            rows,
            cols,
            group,
            q,
            scales,
            zero_points,
            spec,
            multipliers,
        })
    }

    /// Every tensor as f32 in canonical layout, quantized ones dequantized: the
    /// model exactly as the bundle's grids represent it.
    pub fn dequantized_weights(&self) -> Result<crate::weights::ModelWeights> {
        let mut w = crate::weights::ModelWeights::default();
        self.for_each_dequantized(|name, t, source| {
            w.insert(name.to_string(), t, source);
            Ok(())
        })?;
        w.validate(&self.manifest.config, &self.path)?;
        Ok(w)
    }

    /// Hand each tensor, dequantized, with its storage type (`F32`, `int4`, …)
    /// to `f`, one at a time: a caller that keeps something smaller than f32
    /// never holds the whole model in float.
    pub fn for_each_dequantized(&self, mut f: impl FnMut(&str, TensorF32, String) -> Result<()>) -> Result<()> {
        for (name, encoding) in &self.manifest.deployment.tensors {
            if let TensorEncoding::Shared { of, .. } = encoding {
                f(
                    name,
                    TensorF32::new(encoding.shape(), self.dense(name)?),
                    format!("shared({of})"),
                )?;
                continue;
            }
            match encoding.int_grid() {
                None => {
                    f(
                        name,
                        TensorF32::new(encoding.shape(), self.f32_tensor(name)?),
                        "F32".into(),
                    )?;
                }
                Some(g) => {
                    let data = crate::quant::dequantize_weight(&self.quantized(name)?);
                    f(
                        name,
                        TensorF32::new(encoding.shape(), data),
                        format!("int{}", g.spec.bits),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The static activation grids, when the deployment's activations are static.
    pub fn site_grids(&self) -> Result<Option<SiteGrids>> {
        let d = &self.manifest.deployment;
        if d.activations != ActMode::Static {
            return Ok(None);
        }
        SiteGrids::from_deployment(self.manifest.config.num_layers, &d.act_grids)
            .map(Some)
            .map_err(|reason| CoreError::Malformed {
                path: self.path.clone(),
                format: "oqt bundle manifest",
                reason,
            })
    }

    /// Total bytes of tensor data (what a device stores).
    pub fn data_bytes(&self) -> usize {
        self.header.data_len()
    }
}

fn page_size() -> usize {
    // The smallest page any supported OS uses; a larger real page only makes
    // `release` skip a partial page more at each end.
    4096
}
