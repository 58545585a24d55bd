//! Cluster-level fault tests against the built `lifeboat` binary: SIGKILL
//! during writes, concurrent sub-block writes, a full disk, `lifeboat up`.

mod durability;
mod full_disk;
mod lost_updates;
mod up;

use std::path::Path;

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

/// The content a test writes to `block` at sequence `seq`: every byte
/// depends on both, so any mix-up shows.
pub fn block_content(block: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut x =
        (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}
