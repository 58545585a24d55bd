//! Integration tests of replication over a real RocksDB in a temp dir:
//! openraft's own storage conformance suite, and protection groups that
//! propose, apply, refuse and survive restarts.

mod cluster;
mod conformance;
mod group;
