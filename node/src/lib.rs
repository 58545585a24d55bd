//! The Lifeboat daemon: configuration, the node's state and operations
//! ([`core`]), the NBD server and its volume backend, the S3 gateway
//! ([`s3`]), the admin gRPC service, metrics.
//!
//! Must not know RocksDB or openraft directly: it works through `store` and
//! `replication`. Protocol error mappings live in one place each:
//! [`admin::status`] for gRPC, [`nbd::errno`] for NBD and
//! [`s3::errors`] for S3.

pub mod admin;
pub mod auto_failover;
pub mod catalog_lost;
pub mod config;
pub mod core;
pub mod drills;
pub mod error;
pub mod events;
pub mod failback;
pub mod failover;
pub mod fencing;
pub mod gc;
pub mod history;
pub mod leases;
pub mod locks;
pub mod metrics;
pub mod names;
pub mod nbd;
pub mod pki;
pub mod quota;
pub mod restore;
pub mod s3;
pub mod schedules;
pub mod server;
pub mod tokens;
pub mod volume_io;

pub use config::NodeConfig;
pub use error::{NodeError, NodeResult};
