//! Benchmarks: `benches/codec.rs` (criterion: the frame codec beside bare
//! AES-256-GCM and zstd), `nbd-load` (end to end: the same NBD workload
//! against Lifeboat and against `nbdkit file` on the same disk, in one run),
//! `durable-writes` (4 KiB durable writes beside a three-member etcd) and
//! `pg-scale` (hundreds of PGs per node). Figures and how to reproduce them
//! are in BENCHMARKS.md.

pub mod cluster;
pub mod nbd_workload;

/// The etcd v3 client (KV.Put and Maintenance.Status only).
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Where the load generators put their clusters and images: on the disk
/// being measured, outside the clone (`~/.cache/lifeboat/bench`).
pub fn default_work_dir() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| "/tmp".into(), std::path::PathBuf::from);
    home.join(".cache/lifeboat/bench")
}

/// Writes back every dirty page on the machine (`sync`) and waits for it,
/// before a measurement starts, so that no run pays for the write-back of
/// the one before (s3s-fs never fsyncs, and the page cache holds
/// gigabytes). It makes the runs fairer; it did not remove the order
/// effect noted in BENCHMARKS.md (2026-12-04).
pub async fn settle_disk() -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sync").status().await?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// Test data of a given kind, deterministic.
pub fn data(kind: DataKind, len: usize) -> Vec<u8> {
    match kind {
        DataKind::Random => lifeboat_chaos_tests::data::pseudo_random(0x9E37_79B9_7F4A_7C15, len),
        // Log-like text: what backup targets often hold before the backup
        // tool compresses it; compresses about 4:1 with zstd level 1.
        DataKind::Compressible => {
            let line =
                b"2026-11-28T10:13:00Z payroll-svc INFO request handled status=200 ms=12 user=";
            let mut out = Vec::with_capacity(len);
            let mut n: u32 = 0;
            while out.len() < len {
                out.extend_from_slice(line);
                out.extend_from_slice(n.to_string().as_bytes());
                out.push(b'\n');
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345) % 100_000;
            }
            out.truncate(len);
            out
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum DataKind {
    Random,
    Compressible,
}
