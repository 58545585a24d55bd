//! The multi-process test harness: runs the built `lifeboat` binary as
//! real node processes on loopback ports, drives them with the CLI and with
//! real protocol clients, and injects faults (SIGKILL, full disks).
//!
//! Must not know any crate's internals: only the binary, its CLI, its
//! config file format and the wire protocols.

pub mod data;
pub mod harness;
pub mod ledger;
pub mod nbd_client;
pub mod proxy;
pub mod s3_client;
