use super::{BUNDLE_FORMAT_VERSION, MANIFEST_KEY, Manifest, TensorEntry};
use crate::error::{CoreError, Result};
use crate::quant::QuantizedWeight;
use crate::quant::pack::{pack_int4_rows, padded_len};
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
        manifest.tensors.clear();
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
            .tensors
            .insert(name.into(), TensorEntry::F32 { shape: shape.clone() });
        self.tensors
            .push((name.into(), Dtype::F32, shape, le_bytes(data, f32::to_le_bytes)));
    }

    /// Add quantized weights: int4 and narrower are packed two per byte in the
    /// kernels' layout, 8-bit as i8; rows are padded to a multiple of 32 columns.
    pub fn add_quantized(&mut self, name: &str, qw: &QuantizedWeight) {
        let k_pad = padded_len(qw.cols);
        let groups_per_row = qw.scales.len()
            / if qw.spec.granularity == crate::quant::Granularity::PerTensor {
                1
            } else {
                qw.rows
            };
        let (dtype, bytes, shape) = if qw.spec.bits <= 4 {
            // Symmetric grids are stored offset by 8; asymmetric ones are already in [0, 15].
            let offset = if qw.spec.symmetric { 8 } else { 0 };
            (
                Dtype::U8,
                pack_int4_rows(&qw.q, qw.rows, qw.cols, offset),
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
        self.tensors.push((format!("{name}.qweight"), dtype, shape, bytes));
        let scale_shape = if groups_per_row == 1 && qw.scales.len() == 1 {
            vec![1]
        } else {
            vec![qw.rows, groups_per_row]
        };
        self.tensors.push((
            format!("{name}.scales"),
            Dtype::F32,
            scale_shape.clone(),
            le_bytes(&qw.scales, f32::to_le_bytes),
        ));
        if let Some(z) = &qw.zero_points {
            self.tensors.push((
                format!("{name}.zero_points"),
                Dtype::I32,
                scale_shape,
                le_bytes(z, i32::to_le_bytes),
            ));
        }
        self.manifest.tensors.insert(
            name.into(),
            TensorEntry::Quantized {
                rows: qw.rows,
                cols: qw.cols,
                group: qw.group,
                spec: qw.spec,
            },
        );
    }

    /// Write atomically (temporary file + rename): a failed write leaves nothing behind.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(&self.manifest).map_err(|e| CoreError::Other(format!("manifest: {e}")))?;
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
