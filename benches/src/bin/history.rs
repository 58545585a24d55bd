//! The cost of history, on one node:
//!
//! - snapshot creation in a PG holding a 1 GiB volume beside one holding a
//!   16 GiB volume, both written in full (the same, within noise, if a
//!   snapshot is O(1) in the data);
//! - from `volume clone --snapshot` to the clone's first NBD read;
//! - from `bucket clone --snapshot` to the clone's first GET, for a bucket
//!   of one object beside one of many, and a full listing of the big
//!   bucket beside one of its clone (which reads through to the source);
//! - reads of a volume whose every block was overwritten 10 times, at the
//!   latest state and at a snapshot of the first pass, beside a volume
//!   written once (read amplification);
//! - the history's GC: versions and bytes reclaimed per second once a
//!   volume overwritten four times leaves the window, and the write
//!   throughput of another PG on the node while GC runs, beside the same
//!   writes with no GC (measured first).
//!
//! Volumes are filled with compressible log-like data so 17 GiB of writes
//! fit the disk; the write path still encodes and replicates every block.
//!
//! ```text
//! history [--big-gib 16] [--rounds 20] [--amp-mib 256] [--seconds 5] [--gc-mib 256]
//!         [--objects 20000] [--only-gc] [--only-buckets]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use lifeboat_benches::cluster::Cluster;
use lifeboat_benches::{DataKind, data};
use lifeboat_chaos_tests::harness::TestNode;
use lifeboat_chaos_tests::nbd_client::NbdClient;

#[derive(Parser)]
struct Args {
    /// Size of the big volume (the small one is 1 GiB).
    #[arg(long, default_value_t = 16)]
    big_gib: u64,
    /// Snapshots created per volume.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Size of the read-amplification volumes.
    #[arg(long, default_value_t = 256)]
    amp_mib: u64,
    /// Seconds per read phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Size of the volume whose old versions GC reclaims (0: skip).
    #[arg(long, default_value_t = 256)]
    gc_mib: u64,
    /// Objects in the big bucket of the bucket-clone phase (0: skip).
    #[arg(long, default_value_t = 20_000)]
    objects: usize,
    /// Run the GC phase only.
    #[arg(long)]
    only_gc: bool,
    /// Run the bucket-clone phase only.
    #[arg(long)]
    only_buckets: bool,
}

const WRITE_BYTES: usize = 4 << 20;
/// Fill requests in flight.
const WRITERS: u64 = 4;

/// Writes `bytes` of compressible data from offset 0 through `client`, in
/// 4 MiB requests, four in flight; returns MB/s.
async fn fill(client: &Arc<NbdClient>, bytes: u64, pass: u8) -> Result<f64> {
    let mut chunk = data(DataKind::Compressible, WRITE_BYTES);
    // Each pass writes different bytes, so every block gets a new version.
    chunk[0] = pass;
    let chunk = Arc::new(chunk);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, chunk) = (client.clone(), chunk.clone());
            tokio::spawn(async move {
                let mut offset = w * WRITE_BYTES as u64;
                while offset < bytes {
                    client
                        .write(offset, &chunk, false)
                        .await?
                        .map_err(|e| anyhow::anyhow!("write at {offset}: {e:?}"))?;
                    offset += WRITERS * WRITE_BYTES as u64;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e6)
}

fn cli_ms(node: &TestNode, args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let out = node.cli(args);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        out.status.success(),
        "lifeboat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(ms)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Random 4 KiB reads at QD1 and 1 MiB sequential reads of `export` for
/// `seconds` each: (4 KiB reads/s, 1 MiB MB/s).
async fn read_rates(node: &TestNode, export: &str, bytes: u64, seconds: u64) -> Result<(f64, f64)> {
    let client = NbdClient::connect(node.nbd, export).await?;
    let blocks = bytes / 4096;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let started = Instant::now();
    let mut reads = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        client
            .read((x % blocks) * 4096, 4096)
            .await?
            .map_err(|e| anyhow::anyhow!("read: {e:?}"))?;
        reads += 1;
    }
    let iops = reads as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut read_bytes = 0u64;
    let mut offset = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        client
            .read(offset, 1 << 20)
            .await?
            .map_err(|e| anyhow::anyhow!("read: {e:?}"))?;
        read_bytes += 1 << 20;
        offset = (offset + (1 << 20)) % bytes;
    }
    Ok((
        iops,
        read_bytes as f64 / started.elapsed().as_secs_f64() / 1e6,
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = lifeboat_benches::default_work_dir().join("history");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut cluster = Cluster::start(&work, &["primary"], 64)?;
    let node = &cluster.nodes[0];
    if !args.only_gc && !args.only_buckets {
        snapshots_clones_and_reads(node, &args).await?;
    }
    if args.objects > 0 && !args.only_gc {
        bucket_clones(node, args.objects).await?;
    }
    if args.gc_mib > 0 && !args.only_buckets {
        gc_phase(node, &args).await?;
    }
    cluster.stop()?;
    Ok(())
}

/// Bucket clones against data size: from `bucket clone --snapshot` to the
/// clone's first GET, for a bucket of one object beside one of `objects`
/// (interleaved, median of 5), then a full ListObjectsV2 walk of the big
/// bucket beside one of a clone of it.
async fn bucket_clones(node: &TestNode, objects: usize) -> Result<()> {
    for bucket in ["bench/one-object", "bench/many-objects"] {
        node.must_cli(&["bucket", "create", bucket]);
    }
    let (key, secret) = node.must_create_credential("bench");
    let s3 = lifeboat_chaos_tests::s3_client::client(&format!("http://{}", node.s3), &key, &secret);
    let body = data(DataKind::Compressible, 1000);
    s3.put_object()
        .bucket("one-object")
        .key("k/0")
        .body(body.clone().into())
        .send()
        .await?;
    let started = Instant::now();
    let keys = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let putters: Vec<_> = (0..8)
        .map(|_| {
            let (s3, body, keys) = (s3.clone(), body.clone(), keys.clone());
            tokio::spawn(async move {
                loop {
                    let k = keys.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= objects {
                        return anyhow::Ok(());
                    }
                    s3.put_object()
                        .bucket("many-objects")
                        .key(format!("k/{k}"))
                        .body(body.clone().into())
                        .send()
                        .await?;
                }
            })
        })
        .collect();
    for p in putters {
        p.await??;
    }
    println!(
        "put {objects} objects of 1000 B in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    node.must_cli(&["snapshot", "create", "bench/main", "--name", "objects"]);
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for i in 0..5 {
        for (source, times) in [("one-object", &mut one), ("many-objects", &mut many)] {
            let clone = format!("{source}-c{i}");
            let started = Instant::now();
            node.must_cli(&[
                "bucket",
                "clone",
                &format!("bench/{source}"),
                &format!("bench/{clone}"),
                "--snapshot",
                "objects",
            ]);
            let cloned = started.elapsed().as_secs_f64() * 1e3;
            s3.get_object()
                .bucket(&clone)
                .key("k/0")
                .send()
                .await?
                .body
                .collect()
                .await?;
            times.push((cloned, started.elapsed().as_secs_f64() * 1e3));
        }
    }
    for (what, times) in [("1 object", one), (&format!("{objects} objects"), many)] {
        let mut cloned: Vec<f64> = times.iter().map(|t| t.0).collect();
        let mut first_get: Vec<f64> = times.iter().map(|t| t.1).collect();
        println!(
            "bucket clone --snapshot of {what} (median of 5): CLI done {:.1} ms, first GET served {:.1} ms",
            median(&mut cloned),
            median(&mut first_get)
        );
    }
    for bucket in ["many-objects", "many-objects-c0"] {
        let started = Instant::now();
        let mut listed = 0;
        let mut pages = s3.list_objects_v2().bucket(bucket).into_paginator().send();
        while let Some(page) = pages.next().await {
            listed += page?.contents().len();
        }
        anyhow::ensure!(listed == objects, "{bucket} listed {listed} of {objects}");
        println!(
            "ListObjectsV2 of {bucket} ({listed} keys, pages of 1000): {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// A counter from the node's /metrics (0 when absent).
fn metric(http: std::net::SocketAddr, name: &str) -> Result<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http)?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0))
}

/// Writes through `client` over `bytes` for at least `seconds` and until
/// `until` says stop; returns MB/s.
async fn write_load(
    client: &Arc<NbdClient>,
    bytes: u64,
    seconds: u64,
    mut until: impl FnMut() -> bool,
) -> Result<f64> {
    let started = Instant::now();
    let mut written = 0u64;
    let mut pass = 1u8;
    while started.elapsed() < Duration::from_secs(seconds) || !until() {
        pass = pass.wrapping_add(1);
        let mb_s = fill(client, bytes, pass).await?;
        written += bytes;
        let _ = mb_s;
    }
    Ok(written as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// Creates PG `pg` (TENANT/NAME) and volume `volume` of `bytes` in it.
fn create_in_new_pg(node: &TestNode, pg: &str, volume: &str, bytes: u64) -> Result<()> {
    node.must_cli(&["pg", "create", pg]);
    let pg_name = pg.split_once('/').context("pg name")?.1;
    let size = bytes.to_string();
    node.must_cli(&["volume", "create", volume, "--size", &size, "--pg", pg_name]);
    Ok(())
}

async fn gc_phase(node: &TestNode, args: &Args) -> Result<()> {
    let bytes = args.gc_mib << 20;
    let blocks = bytes / 4096;
    create_in_new_pg(node, "bench/old", "bench/old-v", bytes)?;
    create_in_new_pg(node, "bench/live", "bench/live-v", bytes)?;
    let old = Arc::new(NbdClient::connect(node.nbd, "bench/old-v").await?);
    for pass in 1..=5 {
        fill(&old, bytes, pass).await?;
    }
    let live = Arc::new(NbdClient::connect(node.nbd, "bench/live-v").await?);
    fill(&live, bytes, 1).await?;
    let seconds = args.seconds.max(5);
    let baseline = write_load(&live, bytes, seconds, || true).await?;
    println!("writes to another PG, no GC: {baseline:.0} MB/s");

    // Four of the five passes leave the window; GC reclaims them while
    // the other PG takes the same writes.
    node.must_cli(&["pg", "set-window", "bench/old", "1s"]);
    let expected = 4 * blocks;
    // A poller notes when the counters first and last moved.
    let http = node.http;
    let poller = tokio::task::spawn_blocking(move || -> Result<(f64, f64, f64)> {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut first: Option<Instant> = None;
        let (mut last_at, mut versions, mut gc_bytes) = (Instant::now(), 0.0, 0.0);
        while versions < expected as f64 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "GC reclaimed only {versions} versions"
            );
            let v = metric(http, "lifeboat_gc_versions_reclaimed_total")?;
            if v > versions {
                let now = Instant::now();
                first.get_or_insert(now);
                last_at = now;
                versions = v;
                gc_bytes = metric(http, "lifeboat_gc_bytes_reclaimed_total")?;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = last_at.duration_since(first.expect("moved")).as_secs_f64();
        Ok((versions, gc_bytes, secs.max(0.05)))
    });
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = {
        let (live, done) = (live.clone(), done.clone());
        tokio::spawn(async move {
            write_load(&live, bytes, 0, || {
                done.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await
        })
    };
    let (versions, gc_bytes, secs) = poller.await??;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = writes.await??;
    println!(
        "GC of {} MiB x 4 old passes: {versions:.0} versions, {:.1} MB reclaimed in {secs:.1} s: {:.0} versions/s, {:.1} MB/s",
        args.gc_mib,
        gc_bytes / 1e6,
        versions / secs,
        gc_bytes / secs / 1e6
    );
    println!(
        "writes to another PG while GC runs: {during:.0} MB/s ({:.2}x of no GC)",
        during / baseline
    );
    Ok(())
}

async fn snapshots_clones_and_reads(node: &TestNode, args: &Args) -> Result<()> {
    let big = args.big_gib << 30;
    for (pg, volume, bytes) in [
        ("bench/small", "bench/small-v", 1u64 << 30),
        ("bench/big", "bench/big-v", big),
    ] {
        create_in_new_pg(node, pg, volume, bytes)?;
        let client = Arc::new(NbdClient::connect(node.nbd, volume).await?);
        let mb_s = fill(&client, bytes, 1).await?;
        println!("filled {volume} ({} GiB) at {mb_s:.0} MB/s", bytes >> 30);
    }

    // Snapshot creation, interleaved so drift hits both alike.
    let (mut small, mut big_ms) = (Vec::new(), Vec::new());
    for i in 0..args.rounds {
        let name = format!("s{i}");
        small.push(cli_ms(
            node,
            &["snapshot", "create", "bench/small", "--name", &name],
        )?);
        big_ms.push(cli_ms(
            node,
            &["snapshot", "create", "bench/big", "--name", &name],
        )?);
    }
    let (small_ms, big_med) = (median(&mut small), median(&mut big_ms));
    println!(
        "snapshot create (CLI round trip, median of {}): 1 GiB PG {small_ms:.1} ms, {} GiB PG {big_med:.1} ms, ratio {:.2}",
        args.rounds,
        args.big_gib,
        big_med / small_ms
    );

    // From clone to first read, at a far block of the big volume.
    let mut first_read = Vec::new();
    for i in 0..5 {
        let clone = format!("bench/big-c{i}");
        let started = Instant::now();
        node.must_cli(&["volume", "clone", "bench/big-v", &clone, "--snapshot", "s0"]);
        let client = NbdClient::connect(node.nbd, &clone).await?;
        client
            .read(big - (1 << 20), 4096)
            .await?
            .map_err(|e| anyhow::anyhow!("read: {e:?}"))?;
        first_read.push(started.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "volume clone --snapshot to first NBD read ({} GiB volume, median of 5): {:.1} ms",
        args.big_gib,
        median(&mut first_read)
    );

    // Read amplification: written once, beside overwritten 10 times.
    let amp = args.amp_mib << 20;
    for volume in ["bench/once", "bench/ten"] {
        node.must_cli(&["volume", "create", volume, "--size", &format!("{amp}")]);
    }
    let once = Arc::new(NbdClient::connect(node.nbd, "bench/once").await?);
    fill(&once, amp, 1).await?;
    let ten = Arc::new(NbdClient::connect(node.nbd, "bench/ten").await?);
    fill(&ten, amp, 1).await?;
    node.must_cli(&["snapshot", "create", "bench/main", "--name", "first-pass"]);
    for pass in 2..=10 {
        fill(&ten, amp, pass).await?;
    }
    let (once_iops, once_mb) = read_rates(node, "bench/once", amp, args.seconds).await?;
    let (ten_iops, ten_mb) = read_rates(node, "bench/ten", amp, args.seconds).await?;
    let (old_iops, old_mb) = read_rates(node, "bench/ten@first-pass", amp, args.seconds).await?;
    println!(
        "reads of {} MiB (4 KiB random QD1 reads/s, 1 MiB sequential MB/s):",
        args.amp_mib
    );
    println!("  written once                 {once_iops:>8.0}  {once_mb:>7.0}");
    println!(
        "  overwritten 10x, latest      {ten_iops:>8.0}  {ten_mb:>7.0}   ({:.2}x, {:.2}x of once)",
        ten_iops / once_iops,
        ten_mb / once_mb
    );
    println!(
        "  overwritten 10x, first pass  {old_iops:>8.0}  {old_mb:>7.0}   ({:.2}x, {:.2}x of once)",
        old_iops / once_iops,
        old_mb / once_mb
    );
    Ok(())
}
