//! One error type for everything the core reads, so callers can tell the user
//! *which file*, *which field* and *what was expected*.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file exists but its bytes are not what the format requires.
    #[error("{path}: malformed {format} file: {reason}")]
    Malformed {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    /// A required field (metadata key, config entry, tensor) is absent.
    #[error("{path}: missing {what} `{name}`")]
    Missing {
        path: PathBuf,
        what: &'static str,
        name: String,
    },

    /// A field is present but holds something we cannot use.
    #[error("{path}: field `{field}`: expected {expected}, found {found}")]
    BadField {
        path: PathBuf,
        field: String,
        expected: String,
        found: String,
    },

    #[error("{path}: unsupported {what}: {detail}")]
    Unsupported {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },

    #[error("{path}: sha256 mismatch: expected {expected}, found {found}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
