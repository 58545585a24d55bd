//! The local storage engine of a Lifeboat node.
//!
//! Owns the one RocksDB instance per node (every `rocksdb::` import is in
//! [`db`]), the order-preserving key encoding ([`keys`]), the frame codec
//! ([`frame`]: zstd → AES-256-GCM → CRC-32), the keyring ([`keyring`]) and
//! versioned volume blocks ([`volumes`]), objects ([`objects`]) and a PG's
//! history: timeline and snapshots ([`history`]).
//!
//! Must not know: Raft, the network, NBD or S3. Callers hand it log indexes
//! and encoded frames; it never decides what is committed.

pub mod db;
pub mod error;
pub mod frame;
pub mod gc;
pub mod history;
pub mod ids;
pub mod keyring;
pub mod keys;
pub mod masks;
pub mod objects;
pub mod raft_snapshot;
pub mod resync;
pub mod uploads;
pub mod usage;
pub mod volumes;

pub use error::{Error, Result};
pub use ids::*;
