//! Cluster-level fault tests against the built `lifeboat` binary: SIGKILL
//! during writes, concurrent sub-block writes, a full disk, `lifeboat up`.

mod cli;
mod cluster;
mod drills;
mod durability;
mod failover;
mod full_disk;
mod history;
mod lost_updates;
mod partition;
mod s3;
mod up;

use std::path::Path;

pub use lifeboat_chaos_tests::data::block_content;
use lifeboat_chaos_tests::harness::TestNode;

/// Raft timers for tests: elections in a few hundred milliseconds.
pub const FAST_RAFT: &str = "[raft]\nheartbeat_interval_ms = 50\nelection_timeout_min_ms = 200\nelection_timeout_max_ms = 400\n";

/// A started, initialised node with tenant `t` and volume `t/v` of `size`.
pub fn must_node_with_volume(dir: &Path, data_dir: &Path, extra: &str, size: &str) -> TestNode {
    let mut node = TestNode::new(dir, data_dir, &format!("{FAST_RAFT}{extra}")).unwrap();
    node.start().unwrap();
    node.must_init();
    node.must_cli(&["tenant", "create", "t"]);
    node.must_cli(&["volume", "create", "t/v", "--size", size]);
    node
}
