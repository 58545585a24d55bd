//! The one place where failures become NBD wire values.
//!
//! Owns [`Errno`] (the error field of a transmission reply) and [`OpenError`]
//! (why an export cannot be opened during the handshake, which becomes an
//! `NBD_REP_ERR_*` option reply). Backends return these types; the server
//! never invents an errno anywhere else, so the complete mapping from a
//! failure to what a client sees can be read in this file.
//!
//! The daemon's volume backend maps its domain errors (store, replication)
//! into [`Errno`] / [`OpenError`] with `From` impls that belong here too, so
//! that STYLE.md's "each protocol's mapping in one place" stays true.
//!
//! Must not know: sockets, the handshake state machine, any backend type.

use std::io;

use super::protocol::{
    NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM,
    NBD_ESHUTDOWN, NBD_REP_ERR_POLICY, NBD_REP_ERR_SHUTDOWN, NBD_REP_ERR_UNKNOWN,
};

/// An NBD error value, as sent in the error field of a simple reply or an
/// `NBD_REPLY_TYPE_ERROR` chunk.
///
/// The wire values are fixed by the NBD protocol ("Error values" in
/// `doc/proto.md`), not by the host's `errno.h`: never convert with a cast
/// from a libc value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Errno {
    /// `NBD_EPERM` (1): a write, trim or write-zeroes on a read-only export.
    #[error("EPERM: operation not permitted")]
    Perm,
    /// `NBD_EIO` (5): the backend failed to read or persist data.
    #[error("EIO: input/output error")]
    Io,
    /// `NBD_ENOMEM` (12): the spec asks servers to avoid this one.
    #[error("ENOMEM: cannot allocate memory")]
    NoMem,
    /// `NBD_EINVAL` (22): a malformed request: bad flags, unknown command,
    /// read or trim past the end, a payload over the advertised maximum.
    #[error("EINVAL: invalid argument")]
    Inval,
    /// `NBD_ENOSPC` (28): a write or write-zeroes past the end of the export,
    /// or the backend is out of space (including quota).
    #[error("ENOSPC: no space left on device")]
    NoSpc,
    /// `NBD_EOVERFLOW` (75): a structured read longer than the maximum
    /// payload (the spec allows this only for reads and payload-less commands).
    #[error("EOVERFLOW: value too large")]
    Overflow,
    /// `NBD_ENOTSUP` (95): reserved by the spec for `NBD_CMD_FLAG_FAST_ZERO`,
    /// which this server does not advertise; kept for completeness.
    #[error("ENOTSUP: operation not supported")]
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the server (or this volume's node) is shutting
    /// down; the client must disconnect softly and may retry elsewhere.
    #[error("ESHUTDOWN: server is shutting down")]
    Shutdown,
}

impl Errno {
    /// Every variant, in wire-value order (for metrics and tests).
    pub const ALL: [Errno; 8] = [
        Errno::Perm,
        Errno::Io,
        Errno::NoMem,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
        Errno::Shutdown,
    ];

    /// The 32-bit value sent on the wire.
    pub const fn wire(self) -> u32 {
        match self {
            Errno::Perm => NBD_EPERM,
            Errno::Io => NBD_EIO,
            Errno::NoMem => NBD_ENOMEM,
            Errno::Inval => NBD_EINVAL,
            Errno::NoSpc => NBD_ENOSPC,
            Errno::Overflow => NBD_EOVERFLOW,
            Errno::NotSup => NBD_ENOTSUP,
            Errno::Shutdown => NBD_ESHUTDOWN,
        }
    }

    /// The variant for a wire value; `None` for values the spec does not
    /// define (a client treats those as `EINVAL`).
    pub const fn from_wire(value: u32) -> Option<Errno> {
        match value {
            NBD_EPERM => Some(Errno::Perm),
            NBD_EIO => Some(Errno::Io),
            NBD_ENOMEM => Some(Errno::NoMem),
            NBD_EINVAL => Some(Errno::Inval),
            NBD_ENOSPC => Some(Errno::NoSpc),
            NBD_EOVERFLOW => Some(Errno::Overflow),
            NBD_ENOTSUP => Some(Errno::NotSup),
            NBD_ESHUTDOWN => Some(Errno::Shutdown),
            _ => None,
        }
    }

    /// A stable lower-case code for logs and metric labels.
    pub const fn code(self) -> &'static str {
        match self {
            Errno::Perm => "eperm",
            Errno::Io => "eio",
            Errno::NoMem => "enomem",
            Errno::Inval => "einval",
            Errno::NoSpc => "enospc",
            Errno::Overflow => "eoverflow",
            Errno::NotSup => "enotsup",
            Errno::Shutdown => "eshutdown",
        }
    }

    /// Index into [`Errno::ALL`] (and into per-errno counters).
    pub const fn index(self) -> usize {
        match self {
            Errno::Perm => 0,
            Errno::Io => 1,
            Errno::NoMem => 2,
            Errno::Inval => 3,
            Errno::NoSpc => 4,
            Errno::Overflow => 5,
            Errno::NotSup => 6,
            Errno::Shutdown => 7,
        }
    }
}

/// For file- or socket-backed exports (and tests): the spec asks for
/// `EDQUOT` and `EFBIG` to become `ENOSPC`; anything unrecognised is `EIO`.
impl From<io::Error> for Errno {
    fn from(error: io::Error) -> Errno {
        match error.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Errno::Perm,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => Errno::NoSpc,
            io::ErrorKind::InvalidInput => Errno::Inval,
            io::ErrorKind::OutOfMemory => Errno::NoMem,
            io::ErrorKind::Unsupported => Errno::NotSup,
            _ => Errno::Io,
        }
    }
}

/// Why [`ExportProvider::open`](super::ExportProvider::open) refused an export.
///
/// During `NBD_OPT_INFO` / `NBD_OPT_GO` this becomes an option error reply
/// carrying `Display` as the human-readable message; after
/// `NBD_OPT_EXPORT_NAME`, which cannot carry an error, the server can only
/// close the connection (the spec requires that).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No export has this name (`tenant/volume`).
    #[error("no export named {name:?}")]
    NotFound { name: String },
    /// The export exists but this client may not use it.
    #[error("export {name:?} refused: {reason}")]
    Denied { name: String, reason: String },
    /// The export exists but cannot be served from this node right now
    /// (e.g. fenced, or its placement group has no quorum).
    #[error("export {name:?} unavailable: {reason}")]
    Unavailable { name: String, reason: String },
    /// The server is shutting down; the client must disconnect.
    #[error("server is shutting down")]
    ShuttingDown,
}

impl OpenError {
    /// The `NBD_REP_ERR_*` option reply type for this error.
    pub const fn reply_type(&self) -> u32 {
        match self {
            // The spec defines NBD_REP_ERR_UNKNOWN as "the requested export is
            // not available", which covers both "no such name" and "not here now".
            OpenError::NotFound { .. } | OpenError::Unavailable { .. } => NBD_REP_ERR_UNKNOWN,
            OpenError::Denied { .. } => NBD_REP_ERR_POLICY,
            OpenError::ShuttingDown => NBD_REP_ERR_SHUTDOWN,
        }
    }
}

/// The errno a client sees for a failure of the daemon's volume backend.
///
/// Out of space (the free-space reserve) and a tenant at its quota are
/// `ENOSPC`, so clients report a full device; a write past the end that apply refused is `ENOSPC` too (the
/// spec's answer for writes beyond the size); a node shutting down or a
/// group without a leader is `ESHUTDOWN`, so a client reconnects rather than
/// treating it as media failure; everything else — a corrupt frame, a
/// storage error — is `EIO`.
pub fn from_node_error(e: &crate::error::NodeError) -> Errno {
    use crate::error::NodeError;
    use lifeboat_replication::{Error as R, Rejection};
    match e {
        NodeError::Store(lifeboat_store::Error::NoSpace { .. })
        | NodeError::QuotaExceeded { .. } => Errno::NoSpc,
        NodeError::Replication(R::Rejected {
            rejection: Rejection::BlockOutOfRange { .. },
            ..
        }) => Errno::NoSpc,
        NodeError::Replication(R::NotLeader { .. } | R::NoLeader { .. } | R::NoLease { .. }) => {
            Errno::Shutdown
        }
        _ => Errno::Io,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_match_the_spec() {
        let wire: Vec<u32> = Errno::ALL.iter().map(|e| e.wire()).collect();
        assert_eq!(wire, [1, 5, 12, 22, 28, 75, 95, 108]);
        for (i, errno) in Errno::ALL.iter().enumerate() {
            assert_eq!(errno.index(), i);
            assert_eq!(Errno::from_wire(errno.wire()), Some(*errno));
        }
        assert_eq!(Errno::from_wire(0), None);
        assert_eq!(Errno::from_wire(2), None);
    }

    #[test]
    fn io_errors_map_quota_and_size_to_enospc() {
        let map = |kind| Errno::from(io::Error::from(kind));
        assert_eq!(map(io::ErrorKind::StorageFull), Errno::NoSpc);
        assert_eq!(map(io::ErrorKind::QuotaExceeded), Errno::NoSpc);
        assert_eq!(map(io::ErrorKind::FileTooLarge), Errno::NoSpc);
        assert_eq!(map(io::ErrorKind::PermissionDenied), Errno::Perm);
        assert_eq!(map(io::ErrorKind::UnexpectedEof), Errno::Io);
    }

    #[test]
    fn node_errors_map_to_what_a_client_can_act_on() {
        use crate::error::NodeError;
        use lifeboat_replication::{Error as R, Rejection};
        let map = |e: R| from_node_error(&NodeError::Replication(e));
        // No leader anywhere within the wait: the client should reconnect.
        let no_leader = R::NoLeader {
            pg: 3,
            waited_ms: 15_000,
            last: "no leader known".into(),
        };
        assert_eq!(map(no_leader), Errno::Shutdown);
        let past_end = R::Rejected {
            pg: 3,
            rejection: Rejection::BlockOutOfRange {
                volume: 1,
                block: 9,
                blocks: 8,
            },
        };
        assert_eq!(map(past_end), Errno::NoSpc);
        let fatal = R::Raft {
            pg: 3,
            reason: "raft stopped".into(),
        };
        assert_eq!(map(fatal), Errno::Io);
    }

    #[test]
    fn open_errors_map_to_option_replies() {
        let name = "t/v".to_string();
        assert_eq!(
            OpenError::NotFound { name: name.clone() }.reply_type(),
            NBD_REP_ERR_UNKNOWN
        );
        let reason = "fenced".to_string();
        let unavailable = OpenError::Unavailable {
            name: name.clone(),
            reason: reason.clone(),
        };
        assert_eq!(unavailable.reply_type(), NBD_REP_ERR_UNKNOWN);
        assert_eq!(
            OpenError::Denied { name, reason }.reply_type(),
            NBD_REP_ERR_POLICY
        );
        assert_eq!(OpenError::ShuttingDown.reply_type(), NBD_REP_ERR_SHUTDOWN);
    }
}
