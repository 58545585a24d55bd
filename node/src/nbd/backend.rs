//! The contract between the NBD server and whatever stores the blocks.
//!
//! The server is generic over [`ExportProvider`]: the daemon plugs in its
//! encrypted, Raft-replicated volumes; tests plug in memory. Everything here
//! is protocol-free: offsets and lengths in bytes, errors as [`Errno`].
//!
//! Invariants the server guarantees to a backend:
//! - every `read`/`write`/`trim`/`write_zeroes` range lies inside
//!   `0..size_bytes()` (checked just before the call) and has length > 0;
//! - `write`'s `data.len()` equals the request length, at most the
//!   configured `request_bytes_max`;
//! - `write`, `trim` and `write_zeroes` are never called while
//!   `read_only()` is true;
//! - calls for one connection run concurrently and may complete in any order
//!   (NBD does not order requests that are in flight together).
//!
//! Invariants a backend must keep:
//! - `read` returns exactly `len` bytes (anything else becomes `EIO`, logged
//!   as a backend bug);
//! - when an operation with `fua == true` returns `Ok`, its effect is durable;
//! - when `flush` returns `Ok`, every write that had already returned `Ok`
//!   (on any connection to the same export) is durable;
//! - effects are visible to every connection once the call returns: the
//!   server advertises `NBD_FLAG_CAN_MULTI_CONN`, so there must be no
//!   per-connection cache.

use std::future::Future;

use bytes::Bytes;

use super::errno::{Errno, OpenError};

/// One export as listed by `NBD_OPT_LIST` (and described by `NBD_OPT_INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// `tenant/volume`; the name a client passes to GO / EXPORT_NAME.
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// Free text for humans (shown by `nbdinfo --list`); may be empty.
    pub description: String,
}

/// Finds exports by name. One provider serves every connection of a server.
pub trait ExportProvider: Send + Sync + 'static {
    type Export: Export;

    /// Exports this client may see, for `NBD_OPT_LIST`.
    fn list(&self) -> impl Future<Output = Vec<ExportInfo>> + Send;

    /// Open an export for `NBD_OPT_INFO`, `NBD_OPT_GO` or
    /// `NBD_OPT_EXPORT_NAME`. An INFO opens and drops the export without
    /// any I/O, so opening should be cheap.
    fn open(&self, name: &str) -> impl Future<Output = Result<Self::Export, OpenError>> + Send;
}

/// An open export: a byte range with block-device operations. Cloned once per
/// in-flight request, so a clone should be a reference-count bump.
pub trait Export: Clone + Send + Sync + 'static {
    /// Current size; requests are bounds-checked against it.
    fn size_bytes(&self) -> u64;

    /// Whether writes are refused (`EPERM`); e.g. a snapshot export.
    fn read_only(&self) -> bool;

    /// Shown for `NBD_INFO_DESCRIPTION` when a client asks; empty means
    /// "no description" and the info item is omitted.
    fn description(&self) -> String {
        String::new()
    }

    /// Read `len` bytes at `offset`; must return exactly `len` bytes.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, Errno>> + Send;

    /// Write `data` at `offset`; durable on return if `fua`.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;

    /// Make `len` bytes at `offset` read back as zeroes; durable on return if
    /// `fua`. The client's `NBD_CMD_FLAG_NO_HOLE` is not passed on: Lifeboat
    /// volumes have no preallocation to preserve, so "zero with a hole" and
    /// "zero without a hole" are the same operation.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;

    /// The client no longer needs these bytes; afterwards their content is
    /// unspecified until rewritten (a backend may do nothing). Durable on
    /// return if `fua` (the spec counts TRIM as a write for FUA and FLUSH).
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;

    /// Make every write that has already returned `Ok` durable.
    fn flush(&self) -> impl Future<Output = Result<(), Errno>> + Send;
}
