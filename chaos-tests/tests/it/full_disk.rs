//! A full disk: on a size-limited tmpfs, writes fail with ENOSPC at the
//! reserve, reads keep working, and once space is freed writes resume with
//! nothing acknowledged lost.

use std::path::{Path, PathBuf};
use std::process::Command;

use lifeboat_chaos_tests::harness::{TestNode, http_get};
use lifeboat_chaos_tests::nbd_client::{NbdClient, NbdErrno};

use crate::{block_content, must_node_with_volume};

const TMPFS_BYTES: u64 = 320 << 20;
const RESERVE_BYTES: u64 = 96 << 20;
const CHUNK: usize = 1 << 20;
/// A log segment left in the node's pool for reuse.
const POOLED_BYTES: usize = 64 << 20;

/// A tmpfs mount that is unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_BYTES}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI and `make test` run as root here)"
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every acknowledged chunk reads back as written.
async fn must_read_back(client: &NbdClient, acked: &[u64], when: &str) {
    for i in acked {
        let got = client
            .read(i * CHUNK as u64, CHUNK as u32)
            .await
            .unwrap()
            .unwrap();
        assert!(
            got == block_content(*i, 1, CHUNK),
            "chunk {i} reads back {when}"
        );
    }
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_at_the_reserve_then_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"));
    let data_dir = fs.0.join("data");
    // No history GC pass: its space check would also give the log segment
    // pool back, and the last phase is about the write path's check.
    let extra = format!(
        "[store]\nreserve_bytes = {RESERVE_BYTES}\nblock_cache_bytes = 8388608\n\
         [history]\ngc_interval_ms = 3600000\n"
    );
    let mut node = must_node_with_volume(dir.path(), &data_dir, &extra, "1GiB");

    // Leave about 40 MiB above the reserve.
    let filler = fs.0.join("filler");
    let filler_bytes = free_bytes(&fs.0).saturating_sub(RESERVE_BYTES + (40 << 20));
    std::fs::write(&filler, vec![0xffu8; filler_bytes as usize]).unwrap();

    let client = NbdClient::connect(node.nbd, "t/v").await.unwrap();
    let mut acked = Vec::new();
    let mut refused = false;
    for i in 0..400u64 {
        let data = block_content(i, 1, CHUNK);
        match client.write(i * CHUNK as u64, &data, true).await.unwrap() {
            Ok(()) => acked.push(i),
            Err(e) => {
                assert_eq!(e, NbdErrno::ENOSPC, "a full disk is ENOSPC");
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "writes must be refused before the disk is full");
    assert!(!acked.is_empty(), "some writes fit before the reserve");
    // Refused again, and reads keep working.
    let next = *acked.last().unwrap() + 1;
    assert_eq!(
        client
            .write(next * CHUNK as u64, &[1u8; 4096], false)
            .await
            .unwrap(),
        Err(NbdErrno::ENOSPC)
    );
    must_read_back(&client, &acked, "while the disk is full").await;
    let status = node.cli(&["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("WRITES REFUSED"));

    // Free space: writes resume.
    std::fs::remove_file(&filler).unwrap();
    for i in next..next + 5 {
        client
            .write(i * CHUNK as u64, &block_content(i, 1, CHUNK), true)
            .await
            .unwrap()
            .unwrap();
        acked.push(i);
    }
    drop(client);
    // Nothing acknowledged was lost, across a restart too.
    node.kill9();
    node.start().unwrap();
    let client = NbdClient::connect(node.nbd, "t/v").await.unwrap();
    must_read_back(&client, &acked, "after restart").await;

    // Log segments kept for reuse are disk the node gives back before it
    // refuses a write: with one in the pool, and the disk at the reserve
    // only because of it, `status` does not say writes are refused, writes
    // go on, and the pooled file is gone.
    drop(client);
    node.kill9();
    let pooled = data_dir
        .join("raft-log")
        .join("free")
        .join(format!("{:016x}.seg", 1u64 << 40));
    std::fs::create_dir_all(pooled.parent().unwrap()).unwrap();
    std::fs::write(&pooled, vec![0xeeu8; POOLED_BYTES]).unwrap();
    let free = free_bytes(&fs.0);
    assert!(
        free > RESERVE_BYTES,
        "{free} bytes free: the test needs room above the reserve"
    );
    // 16 MiB under the reserve with the pooled file, 48 MiB over without.
    std::fs::write(
        &filler,
        vec![0xffu8; (free - (RESERVE_BYTES - (16 << 20))) as usize],
    )
    .unwrap();
    node.start().unwrap();
    let status = node.cli(&["status"]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains("WRITES REFUSED"));
    assert!(pooled.exists(), "status deletes nothing");
    // The operator sees the pooled bytes, in status and in the metrics.
    assert_eq!(pool_bytes_in_status(&node), POOLED_BYTES as u64);
    assert_eq!(pool_bytes_in_metrics(&node), POOLED_BYTES as u64);
    let client = NbdClient::connect(node.nbd, "t/v").await.unwrap();
    let next = *acked.last().unwrap() + 1;
    client
        .write(next * CHUNK as u64, &block_content(next, 1, CHUNK), true)
        .await
        .unwrap()
        .expect("a write that fits once the pooled segment is deleted");
    acked.push(next);
    assert!(!pooled.exists(), "the pooled segment was deleted");
    assert_eq!(pool_bytes_in_status(&node), 0);
    assert_eq!(pool_bytes_in_metrics(&node), 0);
    must_read_back(&client, &acked, "after the pool was given back").await;
    assert!(node.stop().unwrap());
}

/// `log_segment_pool_bytes` of `lifeboat status --output json`.
fn pool_bytes_in_status(node: &TestNode) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&node.must_cli(&["status", "--output", "json"])).unwrap();
    status["log_segment_pool_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no log_segment_pool_bytes in {status}"))
}

/// `lifeboat_log_segment_pool_bytes` of the node's `/metrics`.
fn pool_bytes_in_metrics(node: &TestNode) -> u64 {
    let (_, text) = http_get(node.http, "/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("lifeboat_log_segment_pool_bytes "))
        .unwrap_or_else(|| panic!("no lifeboat_log_segment_pool_bytes in\n{text}"))
        .parse()
        .unwrap()
}
