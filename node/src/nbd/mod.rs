//! NBD (Network Block Device) server: how tenants mount Lifeboat volumes.
//!
//! Owns the NBD protocol and nothing else: a protocol-only server, generic
//! over an [`ExportProvider`] that finds exports (`tenant/volume`) and an
//! [`Export`] that reads and writes bytes. It must not know how volumes are
//! stored, encrypted or replicated; the daemon plugs those in.
//!
//! Files:
//! - `protocol.rs`: constants, byte layouts (with diagrams), parsing,
//!   validation and encoding; pure, unit-tested.
//! - `server.rs`: tokio shell: accept loop, handshake, reader task, request
//!   tasks, single writer task.
//! - `errno.rs`: the one place failures become NBD error values
//!   ([`Errno`], [`OpenError`]).
//! - `backend.rs`: the [`ExportProvider`] / [`Export`] contract.
//! - `stats.rs`: counters for metrics ([`NbdStats`]).
//!
//! Protocol support (authority: `doc/proto.md` of `NetworkBlockDevice/nbd`):
//! - Fixed newstyle handshake with `NO_ZEROES`. Options: `EXPORT_NAME`
//!   (kernel, nbd-client), `ABORT`, `LIST`, `INFO`, `GO` (with
//!   `NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`,
//!   `NBD_INFO_BLOCK_SIZE`: minimum 1, preferred 4096, maximum
//!   `request_bytes_max`), `STRUCTURED_REPLY`. `STARTTLS` is refused with
//!   `NBD_REP_ERR_POLICY` until TLS lands; other options get
//!   `NBD_REP_ERR_UNSUP`.
//! - Commands `READ`, `WRITE` (FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES`
//!   (`NO_HOLE` accepted), `DISC`; many requests in flight per connection,
//!   replies out of order; `CAN_MULTI_CONN`.
//! - Not supported (clients fall back): block status / meta contexts,
//!   extended headers, `CACHE`, fast zero, resize.
//!
//! Usage:
//! ```ignore
//! let stats = Arc::new(NbdStats::default());
//! let listener = TcpListener::bind(("127.0.0.1", 10809)).await?;
//! nbd::serve(listener, provider, NbdServerConfig::default(), stats.clone(), shutdown).await?;
//! ```

mod backend;
pub mod errno;
pub mod protocol;
mod server;
mod stats;

#[cfg(test)]
#[path = "interop_test.rs"]
mod interop_tests;
#[cfg(test)]
mod test_provider;

pub use backend::{Export, ExportInfo, ExportProvider};
pub use errno::{Errno, OpenError};
pub use protocol::{NBD_BLOCK_SIZE_PREFERRED, NBD_REQUEST_BYTES_MAX};
pub use server::{
    NBD_BYTES_IN_FLIGHT_MAX_DEFAULT, NBD_HANDSHAKE_TIMEOUT_MS_DEFAULT,
    NBD_REQUESTS_IN_FLIGHT_MAX_DEFAULT, NbdConfigError, NbdServerConfig, NbdTls, TlsRequired,
    serve, serve_with_tls,
};
pub use stats::{NbdStats, NbdStatsSnapshot};
