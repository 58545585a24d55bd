//! Counters the NBD server keeps for the daemon's metrics.
//!
//! Plain relaxed atomics: each counter is independently monotonic (except
//! the `connections_active` gauge); no two are read as a consistent pair.
//! The daemon owns the `Arc<NbdStats>`, passes it to
//! [`serve`](super::serve), and exports a [`NbdStats::snapshot`] however it
//! likes (Prometheus labels: [`Command::name`], [`Errno::code`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::errno::Errno;
use super::protocol::Command;

#[derive(Debug, Default)]
pub struct NbdStats {
    /// TCP connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections currently open (gauge).
    pub connections_active: AtomicU64,
    /// Connections that reached the transmission phase.
    pub sessions_started: AtomicU64,
    /// Connections closed during the handshake other than by `NBD_OPT_ABORT`
    /// (garbage, timeout, unknown export after EXPORT_NAME, bad flags).
    pub handshakes_failed: AtomicU64,
    /// Connections the server closed because the client broke the protocol
    /// in the transmission phase (bad request magic, unskippable payload).
    pub protocol_violations: AtomicU64,
    pub requests_read: AtomicU64,
    pub requests_write: AtomicU64,
    pub requests_flush: AtomicU64,
    pub requests_trim: AtomicU64,
    pub requests_write_zeroes: AtomicU64,
    pub requests_disc: AtomicU64,
    /// Unknown or unsupported commands (answered with `EINVAL`).
    pub requests_other: AtomicU64,
    /// Error replies, indexed by [`Errno::index`].
    pub errors: [AtomicU64; Errno::ALL.len()],
    /// Payload bytes returned by successful reads.
    pub bytes_read: AtomicU64,
    /// Payload bytes accepted by successful writes.
    pub bytes_written: AtomicU64,
}

/// A point-in-time copy of [`NbdStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NbdStatsSnapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub sessions_started: u64,
    pub handshakes_failed: u64,
    pub protocol_violations: u64,
    pub requests_read: u64,
    pub requests_write: u64,
    pub requests_flush: u64,
    pub requests_trim: u64,
    pub requests_write_zeroes: u64,
    pub requests_disc: u64,
    pub requests_other: u64,
    /// Indexed by [`Errno::index`]; see [`NbdStatsSnapshot::errors_for`].
    pub errors: [u64; Errno::ALL.len()],
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl NbdStatsSnapshot {
    pub fn errors_for(&self, errno: Errno) -> u64 {
        self.errors[errno.index()]
    }
}

impl NbdStats {
    pub fn snapshot(&self) -> NbdStatsSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        NbdStatsSnapshot {
            connections_accepted: load(&self.connections_accepted),
            connections_active: load(&self.connections_active),
            sessions_started: load(&self.sessions_started),
            handshakes_failed: load(&self.handshakes_failed),
            protocol_violations: load(&self.protocol_violations),
            requests_read: load(&self.requests_read),
            requests_write: load(&self.requests_write),
            requests_flush: load(&self.requests_flush),
            requests_trim: load(&self.requests_trim),
            requests_write_zeroes: load(&self.requests_write_zeroes),
            requests_disc: load(&self.requests_disc),
            requests_other: load(&self.requests_other),
            errors: std::array::from_fn(|i| load(&self.errors[i])),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
        }
    }

    pub(crate) fn count_request(&self, command: Command) {
        let counter = match command {
            Command::Read => &self.requests_read,
            Command::Write => &self.requests_write,
            Command::Flush => &self.requests_flush,
            Command::Trim => &self.requests_trim,
            Command::WriteZeroes => &self.requests_write_zeroes,
            Command::Disc => &self.requests_disc,
            Command::Other(_) => &self.requests_other,
        };
        add(counter, 1);
    }

    pub(crate) fn count_error(&self, errno: Errno) {
        add(&self.errors[errno.index()], 1);
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Keeps `connections_active` right on every exit path of a connection task,
/// including a panic.
pub(crate) struct ActiveConnection<'a>(&'a NbdStats);

impl<'a> ActiveConnection<'a> {
    pub(crate) fn enter(stats: &'a NbdStats) -> ActiveConnection<'a> {
        add(&stats.connections_accepted, 1);
        add(&stats.connections_active, 1);
        ActiveConnection(stats)
    }
}

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}
