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

/// Resident memory in bytes and CPU time (user + system) in seconds of
/// a process.
pub fn process_usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(") ").context("stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    Ok((rss_kib * 1024, ticks as f64 / hz))
}

/// Waits until the processes `pids` together use less than a tenth of a
/// core over a second, for at most `limit`; returns how long it waited,
/// or an error naming the CPU still in use at the limit. Targets stay up
/// beside the one measured, and one still busy with its own phase (a
/// five-node cluster flushing, compacting, its learners catching up)
/// would take CPU and disk from the run. In the runs of 2026-12-04 they
/// were idle within a second.
pub async fn quiesce(
    pids: &[u32],
    limit: std::time::Duration,
) -> anyhow::Result<std::time::Duration> {
    const IDLE_CORES: f64 = 0.1;
    let started = std::time::Instant::now();
    let total = || -> anyhow::Result<f64> { pids.iter().map(|p| Ok(process_usage(*p)?.1)).sum() };
    loop {
        let before = total()?;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let cores = total()? - before;
        if cores < IDLE_CORES {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= limit {
            anyhow::bail!(
                "the other targets still use {cores:.2} cores after {:?}",
                started.elapsed()
            );
        }
    }
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
