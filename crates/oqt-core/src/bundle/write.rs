use super::{
    BUNDLE_FORMAT_VERSION, DENSE_FORMAT_VERSION, LUT_FORMAT_VERSION, MANIFEST_KEY, Manifest, SHARED_FORMAT_VERSION,
    SPARSE_FORMAT_VERSION,
};
use crate::encoding::TensorEncoding;
use crate::error::{CoreError, Result};
use crate::quant::QuantizedWeight;
use crate::sparse::SparseLayout;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// Collects tensors, then writes the bundle in one atomic step.
pub struct BundleWriter {
    manifest: Manifest,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl BundleWriter {
    /// Start from a manifest; its `tensors` map is filled as tensors are added.
    pub fn new(mut manifest: Manifest) -> Self {
        manifest.format_version = BUNDLE_FORMAT_VERSION;
        manifest.deployment.tensors.clear();
        Self {
            manifest,
            tensors: Vec::new(),
        }
    }

    pub fn manifest_mut(&mut self) -> &mut Manifest {
        &mut self.manifest
    }

    pub fn add_f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        self.manifest
            .deployment
            .tensors
            .insert(name.into(), TensorEncoding::F32 { shape: shape.clone() });
        self.tensors
            .push((name.into(), Dtype::F32, shape, le_bytes(data, f32::to_le_bytes)));
    }

    /// Add quantized weights, stored as their encoding says
    /// ([`TensorEncoding::store`]: the kernels' layout).
    pub fn add_quantized(&mut self, name: &str, qw: &QuantizedWeight) {
        let encoding = TensorEncoding::of_quantized(qw);
        for t in encoding.store(name, qw) {
            self.tensors.push((t.name, t.dtype, t.shape, t.bytes));
        }
        self.manifest.deployment.tensors.insert(name.into(), encoding);
    }

    /// Add a pruned float weight `[rows, cols]` stored as `layout` (its zeros
    /// are the pruned weights); an N:M layout it does not fit is an error naming the tensor.
    pub fn add_sparse_f32(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        data: &[f32],
        layout: SparseLayout,
    ) -> Result<()> {
        let (encoding, stored) = TensorEncoding::store_sparse_f32(name, rows, cols, data, layout)
            .map_err(|e| CoreError::Other(format!("{name}: {e}")))?;
        self.push(name, encoding, stored);
        Ok(())
    }

    /// Add a pruned quantized weight stored N:M ([`TensorEncoding::store_sparse_quantized`]).
    pub fn add_sparse_quantized(&mut self, name: &str, qw: &QuantizedWeight, layout: SparseLayout) -> Result<()> {
        let (encoding, stored) = TensorEncoding::store_sparse_quantized(name, qw, layout)
            .map_err(|e| CoreError::Other(format!("{name}: {e}")))?;
        self.push(name, encoding, stored);
        Ok(())
    }

    /// Add a palettized weight ([`TensorEncoding::store_lut`]); a malformed
    /// palette is an error naming the tensor.
    pub fn add_lut(&mut self, name: &str, p: &crate::lut::Palettized) -> Result<()> {
        let (encoding, stored) =
            TensorEncoding::store_lut(name, p).map_err(|e| CoreError::Other(format!("{name}: {e}")))?;
        self.push(name, encoding, stored);
        Ok(())
    }

    /// Add weight `name` `[rows, cols]` as row `r` of weight `of` times
    /// `row_scales[r]` (the `shared` encoding): only the scales are stored.
    /// The source must be added too, under its own (unshared) encoding.
    pub fn add_shared(&mut self, name: &str, rows: usize, cols: usize, of: &str, row_scales: &[f32]) {
        assert_eq!(row_scales.len(), rows, "one row scale per row of {name}");
        let encoding = TensorEncoding::Shared {
            rows,
            cols,
            of: of.into(),
        };
        self.push(
            name,
            encoding,
            vec![crate::encoding::StoredTensor {
                name: TensorEncoding::row_scales_name(name),
                dtype: Dtype::F32,
                shape: vec![rows],
                bytes: le_bytes(row_scales, f32::to_le_bytes),
            }],
        );
    }

    fn push(&mut self, name: &str, encoding: TensorEncoding, stored: Vec<crate::encoding::StoredTensor>) {
        for t in stored {
            self.tensors.push((t.name, t.dtype, t.shape, t.bytes));
        }
        self.manifest.deployment.tensors.insert(name.into(), encoding);
    }

    /// Write atomically (temporary file + rename): a failed write leaves nothing behind.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut manifest = self.manifest.clone();
        // The oldest version that holds every encoding used, so older oqt
        // releases keep reading what they can.
        manifest.format_version = manifest
            .deployment
            .tensors
            .values()
            .map(|e| match e {
                TensorEncoding::Shared { .. } => SHARED_FORMAT_VERSION,
                TensorEncoding::Lut { .. } => LUT_FORMAT_VERSION,
                TensorEncoding::Sparse { .. } => SPARSE_FORMAT_VERSION,
                _ => DENSE_FORMAT_VERSION,
            })
            .max()
            .unwrap_or(DENSE_FORMAT_VERSION);
        let json = serde_json::to_string(&manifest).map_err(|e| CoreError::Other(format!("manifest: {e}")))?;
        let metadata = HashMap::from([
            (MANIFEST_KEY.to_string(), json),
            ("format".to_string(), "oqt-bundle".to_string()),
        ]);
        let views = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| CoreError::Other(format!("tensor `{n}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let target = if path.parent().is_some_and(|p| p.as_os_str().is_empty()) {
            Path::new(".").join(path)
        } else {
            path.to_path_buf()
        };
        safetensors::serialize_to_file(views, Some(metadata), &target).map_err(|e| CoreError::Io {
            path: target.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}
