//! GGUF v2/v3 container: header, key/value metadata, tensor table, aligned data.
//!
//! The file is memory-mapped; tensors are decoded on demand. Every structural
//! check names the file and what was wrong, so a truncated download or a
//! foreign file is reported rather than read as garbage.

mod dequant;
pub mod encode;
mod ggml_type;
mod writer;

pub use dequant::dequantize;
pub use ggml_type::{GgmlType, raw_type_name};
pub use writer::{GgufTensorOut, GgufWriter};

use crate::error::{CoreError, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value as stored in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// Any integer type widened, when it is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v as i64),
            Self::I16(v) => Some(v as i64),
            Self::I32(v) => Some(v as i64),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short human rendering for `inspect`; long arrays are summarized.
    pub fn summary(&self) -> String {
        match self {
            Self::String(s) if s.len() > 80 => format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(77)], s.len()),
            Self::String(s) => format!("{s:?}"),
            Self::Array(a) if a.len() > 8 => {
                format!("[{} × {}]", a.len(), a.first().map(|v| v.type_name()).unwrap_or("?"))
            }
            Self::Array(a) => format!("[{}]", a.iter().map(|v| v.summary()).collect::<Vec<_>>().join(", ")),
            Self::F32(v) => format!("{v}"),
            Self::F64(v) => format!("{v}"),
            Self::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Row-major shape, outermost first (PyTorch order): the reverse of `dims`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_bytes(&self) -> usize {
        self.ty.bytes_for(self.n_elements()).unwrap_or(0)
    }
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    /// Metadata keys in file order (writers and `inspect` keep it).
    pub metadata_order: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian reader over the mapped header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl Into<String>) -> CoreError {
        CoreError::Malformed {
            path: self.path.to_path_buf(),
            format: "GGUF",
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "file ends at byte {} while reading {what} (needs {n} bytes at offset {}); the file is truncated",
                self.buf.len(),
                self.pos
            ))),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.buf.len() as u64 {
            return Err(self.err(format!("{what}: string length {len} exceeds the file size")));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what}: string is not UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8(what)?),
            1 => MetaValue::I8(self.u8(what)? as i8),
            2 => MetaValue::U16(self.u16(what)?),
            3 => MetaValue::I16(self.u16(what)? as i16),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => MetaValue::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(self.err(format!("{what}: arrays nested too deeply")));
                }
                let item_ty = self.u32(what)?;
                let len = self.u64(what)?;
                // Every item takes at least one byte: a larger count is corruption.
                if len > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(format!("{what}: array length {len} exceeds the file size")));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_ty, what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            other => return Err(self.err(format!("{what}: unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
        // SAFETY: the map is read-only; oqt never writes to a file it has mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CoreError::io(path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(c.err(format!(
                "bad magic {magic:02x?}, expected \"GGUF\"; this is not a GGUF file"
            )));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(CoreError::Unsupported {
                path: path.into(),
                what: "GGUF version",
                detail: format!("{version} (oqt reads versions 2 and 3)"),
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > 1 << 24 || n_kv > 1 << 24 {
            return Err(c.err(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata entries"
            )));
        }

        let mut metadata = BTreeMap::new();
        let mut metadata_order = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata `{key}`"))?;
            let value = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata_order.push(key.clone());
            metadata.insert(key, value);
        }

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let n_dims = c.u32(&format!("rank of tensor `{name}`"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(format!("tensor `{name}`: rank {n_dims}, expected 1 to 4")));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&format!("dims of tensor `{name}`")))
                .collect::<Result<Vec<_>>>()?;
            let raw_ty = c.u32(&format!("type of tensor `{name}`"))?;
            let ty = GgmlType::from_u32(raw_ty).ok_or_else(|| CoreError::Unsupported {
                path: path.into(),
                what: "tensor type",
                detail: format!(
                    "tensor `{name}` has type {} (oqt decodes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
                    raw_type_name(raw_ty)
                ),
            })?;
            let offset = c.u64(&format!("offset of tensor `{name}`"))?;
            tensors.push(TensorInfo { name, dims, ty, offset });
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(CoreError::BadField {
                        path: path.into(),
                        field: "general.alignment".into(),
                        expected: "a power of two".into(),
                        found: v.summary(),
                    });
                }
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (mmap.len() as u64).saturating_sub(data_start);

        for t in &tensors {
            let n = t.n_elements();
            let bytes = t.ty.bytes_for(n).ok_or_else(|| {
                c.err(format!(
                    "tensor `{}`: {} values is not a whole number of {} blocks of {}",
                    t.name,
                    n,
                    t.ty.name(),
                    t.ty.block_size()
                ))
            })?;
            if !(t.dims[0] as usize).is_multiple_of(t.ty.block_size()) {
                return Err(c.err(format!(
                    "tensor `{}`: row length {} is not a multiple of the {} block size {}",
                    t.name,
                    t.dims[0],
                    t.ty.name(),
                    t.ty.block_size()
                )));
            }
            if t.offset % alignment != 0 {
                return Err(c.err(format!(
                    "tensor `{}`: offset {} is not aligned to {alignment}",
                    t.name, t.offset
                )));
            }
            if t.offset.saturating_add(bytes as u64) > data_len {
                return Err(c.err(format!(
                    "tensor `{}` needs bytes {}..{} of the data section but it holds only {data_len}; the file is truncated",
                    t.name,
                    t.offset,
                    t.offset + bytes as u64
                )));
            }
        }

        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            metadata_order,
            tensors,
            alignment,
            data_start: data_start as usize,
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        &self.mmap[start..start + info.n_bytes()]
    }

    /// Decode a tensor to f32, row-major in [`TensorInfo::shape`] order.
    pub fn dequantize(&self, info: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0f32; info.n_elements()];
        dequantize(info.ty, self.tensor_bytes(info), &mut out);
        out
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> CoreError {
        CoreError::Missing {
            path: self.path.clone(),
            what: "metadata key",
            name: key.into(),
        }
    }

    pub(crate) fn bad(&self, key: &str, expected: &str, v: &MetaValue) -> CoreError {
        CoreError::BadField {
            path: self.path.clone(),
            field: key.into(),
            expected: expected.into(),
            found: format!("{} {}", v.type_name(), v.summary()),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_u64().ok_or_else(|| self.bad(key, "a non-negative integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_f64().ok_or_else(|| self.bad(key, "a number", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_str().ok_or_else(|| self.bad(key, "a string", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.as_bool().ok_or_else(|| self.bad(key, "a bool", v))
    }

    /// Optional variants: absent is `None`, present-but-wrong-type is an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|_| self.get_u64(key)).transpose()
    }
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|_| self.get_f64(key)).transpose()
    }
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.get_str(key)).transpose()
    }
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|_| self.get_bool(key)).transpose()
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let arr = v.as_array().ok_or_else(|| self.bad(key, "an array of strings", v))?;
        arr.iter()
            .map(|item| item.as_str().ok_or_else(|| self.bad(key, "an array of strings", v)))
            .collect()
    }

    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.as_array().ok_or_else(|| self.bad(key, "an array of integers", v))?;
        arr.iter()
            .map(|item| item.as_i64().ok_or_else(|| self.bad(key, "an array of integers", v)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
