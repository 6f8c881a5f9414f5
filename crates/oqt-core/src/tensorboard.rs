//! TensorBoard scalars: an `events.out.tfevents.*` file TensorBoard reads —
//! TFRecord framing (length, masked CRC-32C, payload, masked CRC-32C) around
//! `Event` protocol buffers, the few fields scalars need written by hand.

use crate::error::{CoreError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct TbWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event` with wall time, step, and either a file version or one scalar.
fn event(step: i64, file_version: Option<&str>, scalar: Option<(&str, f32)>) -> Vec<u8> {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut e = Vec::new();
    e.push(0x09); // field 1, fixed64: wall_time
    e.extend_from_slice(&wall.to_le_bytes());
    e.push(0x10); // field 2, varint: step
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        len_delimited(3, v.as_bytes(), &mut e);
    }
    if let Some((tag, value)) = scalar {
        let mut val = Vec::new();
        len_delimited(1, tag.as_bytes(), &mut val); // Summary.Value.tag
        val.push(0x15); // field 2, fixed32: simple_value
        val.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        len_delimited(1, &val, &mut summary); // Summary.value
        len_delimited(5, &summary, &mut e); // Event.summary
    }
    e
}

impl TbWriter {
    /// A new event file in `dir` (created if needed).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = dir.join(format!("events.out.tfevents.{secs}.oqt.{}", std::process::id()));
        let file = std::fs::File::create(&path).map_err(|e| CoreError::io(&path, e))?;
        let mut w = Self {
            path,
            file: std::io::BufWriter::new(file),
        };
        w.record(&event(0, Some("brain.Event:2"), None))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let io = |e| CoreError::io(&self.path, e);
        self.file.write_all(&len).map_err(io)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes()).map_err(io)?;
        self.file.write_all(data).map_err(io)?;
        self.file.write_all(&masked_crc(data).to_le_bytes()).map_err(io)?;
        // Flushed per record: TensorBoard follows the file while training runs.
        self.file.flush().map_err(io)
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> Result<()> {
        self.record(&event(step as i64, None, Some((tag, value))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(dir.path()).unwrap();
        w.scalar("loss", 3, 1.5).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut payloads = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
                masked_crc(&bytes[at..at + 8])
            );
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(
                u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()),
                masked_crc(data)
            );
            payloads.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(payloads.len(), 2);
        assert!(payloads[0].windows(13).any(|w| w == b"brain.Event:2"));
        let scalar = &payloads[1];
        assert!(scalar.windows(4).any(|w| w == b"loss"));
        assert!(scalar.windows(4).any(|w| w == 1.5f32.to_le_bytes()));
    }
}
