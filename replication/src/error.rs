//! The replication layer's one error type.

use std::io;

use crate::types::Rejection;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("protection group {pg}: storage: {source}")]
    Storage { pg: u64, source: io::Error },

    #[error("protection group {pg}: this node is not the leader (leader: {leader:?})")]
    NotLeader { pg: u64, leader: Option<u64> },

    #[error("protection group {pg}: {rejection}")]
    Rejected { pg: u64, rejection: Rejection },

    #[error("protection group {pg}: raft: {reason}")]
    Raft { pg: u64, reason: String },

    #[error(
        "protection group {pg}: this node holds no site lease for it at generation {generation} (cut off from the catalog, or the PG is active at another site)"
    )]
    NoLease { pg: u64, generation: u64 },

    #[error("protection group {pg}: no leader answered within {waited_ms} ms (last: {last})")]
    NoLeader {
        pg: u64,
        waited_ms: u64,
        last: String,
    },
}

impl Error {
    /// The same error again, for each of several callers that share one
    /// failed proposal (an `io::Error` is not `Clone`: its kind and message
    /// are kept).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Storage { pg, source } => Error::Storage {
                pg: *pg,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::NotLeader { pg, leader } => Error::NotLeader {
                pg: *pg,
                leader: *leader,
            },
            Error::Rejected { pg, rejection } => Error::Rejected {
                pg: *pg,
                rejection: rejection.clone(),
            },
            Error::Raft { pg, reason } => Error::Raft {
                pg: *pg,
                reason: reason.clone(),
            },
            Error::NoLease { pg, generation } => Error::NoLease {
                pg: *pg,
                generation: *generation,
            },
            Error::NoLeader {
                pg,
                waited_ms,
                last,
            } => Error::NoLeader {
                pg: *pg,
                waited_ms: *waited_ms,
                last: last.clone(),
            },
        }
    }

    /// Stable code for logs, CLI output and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Storage { .. } => "replication.storage",
            Error::NotLeader { .. } => "replication.not_leader",
            Error::Rejected { .. } => "replication.rejected",
            Error::Raft { .. } => "replication.raft",
            Error::NoLeader { .. } => "replication.no_leader",
            Error::NoLease { .. } => "replication.no_lease",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every writer of a merged entry that failed gets the error the entry
    /// got: the same code, message and, for storage, the same I/O kind.
    #[test]
    fn a_duplicate_is_the_same_error() {
        let errors = [
            Error::Storage {
                pg: 1,
                source: io::Error::new(io::ErrorKind::StorageFull, "no space left"),
            },
            Error::NotLeader {
                pg: 2,
                leader: Some(3),
            },
            Error::Rejected {
                pg: 4,
                rejection: Rejection::VolumeNotFound { volume: 5 },
            },
            Error::Raft {
                pg: 6,
                reason: "shut down".into(),
            },
            Error::NoLease {
                pg: 7,
                generation: 8,
            },
            Error::NoLeader {
                pg: 9,
                waited_ms: 15_000,
                last: "no leader known".into(),
            },
        ];
        for e in &errors {
            let copy = e.duplicate();
            assert_eq!((copy.code(), copy.to_string()), (e.code(), e.to_string()));
            if let (Error::Storage { source: a, .. }, Error::Storage { source: b, .. }) = (e, &copy)
            {
                assert_eq!(a.kind(), b.kind());
            }
        }
        // Each variant once.
        let codes: std::collections::HashSet<_> = errors.iter().map(Error::code).collect();
        assert_eq!(codes.len(), errors.len());
    }
}
