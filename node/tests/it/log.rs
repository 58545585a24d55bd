//! The Raft log's size on a node: a writer faster than the timed retention
//! check still finds the log cut back to `raft.log_retain_bytes`.

use std::time::{Duration, Instant};

use lifeboat_node::core::NodeCore;

use crate::{must_start_with, pseudo_random};

/// The bytes of the largest log on the node.
fn largest_log_bytes(core: &NodeCore) -> u64 {
    core.groups()
        .iter()
        .filter_map(|g| g.log_status().unwrap().span)
        .map(|s| s.bytes)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_wake_the_log_retention_check() {
    const LIMIT: u64 = 4 << 20;
    const WRITE: usize = 1 << 20;
    let node = must_start_with(|c, _| {
        c.raft.log_retain_bytes = LIMIT;
        // The timed check does not come during the test: only the bytes
        // appended can wake it.
        c.raft.log_check_interval_ms = 3_600_000;
    })
    .await;
    let core = node.running().core.clone();
    let client = node.client().await;
    // Six times the limit, in entries the log keeps in segment files.
    for i in 0..24u64 {
        client
            .write(i * WRITE as u64, &pseudo_random(i, WRITE), true)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(
        core.log_bytes_appended() >= 24 * WRITE as u64,
        "the meter counts what was appended"
    );
    // A purge may wait for the Raft snapshot it asked for: the check comes
    // back for it without more appends.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bytes = largest_log_bytes(&core);
        if bytes <= LIMIT {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log still holds {bytes} bytes, over its limit of {LIMIT}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What was written reads back from what the log no longer holds.
    for i in [0u64, 11, 23] {
        let got = client
            .read(i * WRITE as u64, WRITE as u32)
            .await
            .unwrap()
            .unwrap();
        assert!(got == pseudo_random(i, WRITE), "write {i} reads back");
    }
    node.stop().await;
}
