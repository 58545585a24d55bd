//! openraft integration: the type configuration, the RocksDB log store and
//! state machine over `store`, and protection groups (one Raft group each,
//! many per node, the catalog being PG 0).
//!
//! Must not know: NBD, S3, `snapshot` or `node`; RocksDB only through
//! `store`. Only this crate imports openraft.

pub mod ack;
pub(crate) mod apply;
pub mod catalog;
pub mod coalesce;
pub mod error;
pub mod group;
pub mod lease;
pub mod liveness;
pub mod log_files;
pub mod log_store;
pub mod members;
pub mod placement;
pub mod resync;
pub mod state_machine;
pub mod transport;
pub mod types;
pub mod wire;

pub use error::{Error, Result};
pub use group::{
    Clock, DesiredMember, GroupMetrics, GroupStart, Heartbeats, Leadership, LogStatus, MemberLag,
    ProtectionGroup, RaftTimers, Retention, SystemClock,
};
pub use types::{Applied, Command, CommandResponse, MemberNode, Rejection, TypeConfig};
