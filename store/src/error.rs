//! The store's one error type. Variants carry the facts an operator needs;
//! [`Error::code`] gives the stable code used in logs, CLI output and metric
//! labels.

use std::path::PathBuf;

use crate::frame::FrameError;
use crate::keyring::KeyringError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// RocksDB refused an operation. The RocksDB error is kept as text so
    /// that no `rocksdb` type leaks out of [`crate::db`].
    #[error("rocksdb {op} failed: {reason}")]
    Rocks { op: &'static str, reason: String },

    /// A stored frame failed its CRC, its AEAD tag or its decoding.
    #[error("corrupt frame in {cf} at key {key}: {cause}")]
    CorruptFrame {
        cf: &'static str,
        key: String,
        cause: FrameError,
    },

    /// A stored record (not a frame) does not decode.
    #[error("corrupt record in {cf} at key {key}: {reason}")]
    CorruptRecord {
        cf: &'static str,
        key: String,
        reason: String,
    },

    /// The data directory's filesystem is at or below the free-space reserve:
    /// writes are refused before RocksDB would turn read-only.
    #[error("no space: {free_bytes} bytes free, reserve is {reserve_bytes} bytes")]
    NoSpace { free_bytes: u64, reserve_bytes: u64 },

    #[error(transparent)]
    Keyring(#[from] KeyringError),

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Stable code for logs, CLI output and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Rocks { .. } => "store.rocksdb",
            Error::CorruptFrame { .. } => "store.corrupt_frame",
            Error::CorruptRecord { .. } => "store.corrupt_record",
            Error::NoSpace { .. } => "store.no_space",
            Error::Keyring(_) => "store.keyring",
            Error::Io { .. } => "store.io",
        }
    }

    pub(crate) fn corrupt_record(cf: &'static str, key: &[u8], reason: impl Into<String>) -> Error {
        Error::CorruptRecord {
            cf,
            key: hex::encode(key),
            reason: reason.into(),
        }
    }
}
