//! GGUF v3 writer: metadata in insertion order, tensors aligned, written to a
//! temporary file and renamed into place so a failed write leaves nothing behind.

use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GgmlType, MetaValue};
use crate::error::{CoreError, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

/// A tensor to write: ggml-order dims (`dims[0]` is the row length) and encoded bytes.
pub struct GgufTensorOut {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<GgufTensorOut>,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&[*x]),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[*x as u8]),
        MetaValue::String(s) => put_str(w, s),
        MetaValue::Array(items) => {
            let item_ty = items.first().map_or(4, type_id);
            w.write_all(&item_ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| put_value(w, i))
        }
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.into(), value));
        self
    }

    /// Add a tensor; its byte length must match its type and dims.
    pub fn tensor(&mut self, t: GgufTensorOut) -> Result<&mut Self> {
        let n: u64 = t.dims.iter().product();
        if t.ty.bytes_for(n as usize) != Some(t.data.len()) {
            return Err(CoreError::Other(format!(
                "tensor `{}`: {} bytes do not hold {n} values of {}",
                t.name,
                t.data.len(),
                t.ty.name()
            )));
        }
        self.tensors.push(t);
        Ok(self)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| CoreError::io(dir, e))?;
        let io = |e| CoreError::io(path, e);
        {
            let mut w = BufWriter::new(tmp.as_file());
            w.write_all(GGUF_MAGIC).map_err(io)?;
            w.write_all(&3u32.to_le_bytes()).map_err(io)?;
            w.write_all(&(self.tensors.len() as u64).to_le_bytes()).map_err(io)?;
            w.write_all(&(self.metadata.len() as u64).to_le_bytes()).map_err(io)?;
            for (k, v) in &self.metadata {
                put_str(&mut w, k).map_err(io)?;
                w.write_all(&type_id(v).to_le_bytes()).map_err(io)?;
                put_value(&mut w, v).map_err(io)?;
            }
            let align = DEFAULT_ALIGNMENT;
            let mut offset = 0u64;
            let mut offsets = Vec::with_capacity(self.tensors.len());
            for t in &self.tensors {
                put_str(&mut w, &t.name).map_err(io)?;
                w.write_all(&(t.dims.len() as u32).to_le_bytes()).map_err(io)?;
                for d in &t.dims {
                    w.write_all(&d.to_le_bytes()).map_err(io)?;
                }
                w.write_all(&t.ty.to_u32().to_le_bytes()).map_err(io)?;
                w.write_all(&offset.to_le_bytes()).map_err(io)?;
                offsets.push(offset);
                offset = (offset + t.data.len() as u64).div_ceil(align) * align;
            }
            // BufWriter does not expose its position; the header's length is computed.
            let pos = header_len(&self.metadata, &self.tensors);
            let pad = (pos as u64).div_ceil(align) * align - pos as u64;
            w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            let mut written = 0u64;
            for (t, off) in self.tensors.iter().zip(offsets) {
                w.write_all(&vec![0u8; (off - written) as usize]).map_err(io)?;
                w.write_all(&t.data).map_err(io)?;
                written = off + t.data.len() as u64;
            }
            w.flush().map_err(io)?;
        }
        tmp.as_file().sync_all().map_err(io)?;
        // Temporary files are private (0600); the written model is an ordinary file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(io)?;
        }
        tmp.persist(path).map_err(|e| CoreError::io(path, e.error))?;
        Ok(())
    }
}

fn value_len(v: &MetaValue) -> usize {
    match v {
        MetaValue::U8(_) | MetaValue::I8(_) | MetaValue::Bool(_) => 1,
        MetaValue::U16(_) | MetaValue::I16(_) => 2,
        MetaValue::U32(_) | MetaValue::I32(_) | MetaValue::F32(_) => 4,
        MetaValue::U64(_) | MetaValue::I64(_) | MetaValue::F64(_) => 8,
        MetaValue::String(s) => 8 + s.len(),
        MetaValue::Array(items) => 4 + 8 + items.iter().map(value_len).sum::<usize>(),
    }
}

fn header_len(meta: &[(String, MetaValue)], tensors: &[GgufTensorOut]) -> usize {
    let mut n = 4 + 4 + 8 + 8;
    for (k, v) in meta {
        n += 8 + k.len() + 4 + value_len(v);
    }
    for t in tensors {
        n += 8 + t.name.len() + 4 + 8 * t.dims.len() + 4 + 8;
    }
    n
}
