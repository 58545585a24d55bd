//! S3 PUT and GET throughput, with the AWS SDK for Rust, against Lifeboat
//! (one node; three primary nodes and two DR nodes) and, in the same run,
//! `s3s-fs` on the same disk as the reference (a single-node, unencrypted
//! S3 server over a directory, which does not fsync: Lifeboat acknowledges
//! only durable, replicated writes).
//!
//! For each object size and concurrency: writers PUT fresh keys for
//! `--seconds`, then readers GET those keys round-robin for `--seconds`.
//! Every phase runs `--passes` times, the targets in the given order and
//! then in reverse, since on this disk the order moves the ratio (a phase
//! writes gigabytes; on 2026-12-04 Lifeboat's 4 MiB PUT at 16 measured
//! 0.37–0.43× of s3s-fs when second and 0.60× when first). Prints
//! each measurement as it is made, then ops/s and MB/s per target averaged
//! over the passes, and the ratio to s3s-fs.
//!
//! ```text
//! s3-load [--seconds 10] [--sizes 64KiB,4MiB] [--concurrency 1,16]
//!         [--targets single,cluster,s3s-fs] [--passes 2]
//! ```

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use clap::Parser;
use lifeboat_benches::cluster::Cluster;

#[derive(Parser)]
struct Args {
    /// Seconds per PUT phase and per GET phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Object sizes, in KiB or MiB (e.g. 64KiB,4MiB).
    #[arg(long, value_delimiter = ',', default_value = "64KiB,4MiB")]
    sizes: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Any of single (one Lifeboat node), cluster (3 primary + 2 DR) and
    /// s3s-fs (the reference; `cargo install s3s-fs@0.14.1 --locked
    /// --features binary`).
    #[arg(long, value_delimiter = ',', default_value = "s3s-fs,single,cluster")]
    targets: Vec<String>,
    /// Measurements of each phase and target, alternating the order of
    /// the targets (forward, reverse, forward, ...).
    #[arg(long, default_value_t = 2)]
    passes: usize,
}

fn parse_size(s: &str) -> Result<usize> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, ""));
    let n: usize = n.parse().with_context(|| format!("size {s}"))?;
    Ok(match unit {
        "" | "B" => n,
        "KiB" | "K" | "k" => n << 10,
        "MiB" | "M" => n << 20,
        other => bail!("unknown unit {other} in {s}"),
    })
}

/// An S3 endpoint under test and its credential.
struct Target {
    name: String,
    endpoint: String,
    key: String,
    secret: String,
    bucket: String,
    /// Its server processes, so that the others can be left idle while
    /// it is measured.
    pids: Vec<u32>,
}

fn client(t: &Target) -> Client {
    lifeboat_chaos_tests::s3_client::client(&t.endpoint, &t.key, &t.secret)
}

#[derive(Clone, Copy, Default)]
struct Rate {
    ops_per_s: f64,
    mb_per_s: f64,
}

/// A target's PUT and GET rates in one phase, summed over the passes.
#[derive(Clone, Copy, Default)]
struct Totals {
    put: Rate,
    get: Rate,
}

impl Totals {
    fn add(&mut self, put: Rate, get: Rate) {
        self.put.ops_per_s += put.ops_per_s;
        self.put.mb_per_s += put.mb_per_s;
        self.get.ops_per_s += get.ops_per_s;
        self.get.mb_per_s += get.mb_per_s;
    }
}

/// Runs `op(worker, seq)` on `concurrency` workers for `seconds`.
async fn run<F, Fut>(concurrency: usize, seconds: u64, bytes_per_op: usize, op: F) -> Result<Rate>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (op, done, stop) = (op.clone(), done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                op(w, seq).await?;
                done.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            anyhow::Ok(seq)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let ops = done.load(Ordering::Relaxed) as f64;
    Ok(Rate {
        ops_per_s: ops / secs,
        mb_per_s: ops * bytes_per_op as f64 / secs / 1e6,
    })
}

/// PUT then GET at one size and concurrency; returns (put, get).
async fn measure(
    t: &Target,
    size: usize,
    concurrency: usize,
    seconds: u64,
) -> Result<(Rate, Rate)> {
    lifeboat_benches::settle_disk().await?;
    let c = client(t);
    let body = bytes::Bytes::from(lifeboat_chaos_tests::data::pseudo_random(size as u64, size));
    let prefix = format!("{size}-{concurrency}-{}", rand::random::<u32>());
    let written: Arc<Vec<AtomicU64>> =
        Arc::new((0..concurrency).map(|_| AtomicU64::new(0)).collect());
    let (bucket, put_client, put_prefix, put_written) =
        (t.bucket.clone(), c.clone(), prefix.clone(), written.clone());
    let put = run(concurrency, seconds, size, move |w, seq| {
        let (c, bucket, body) = (put_client.clone(), bucket.clone(), body.clone());
        let key = format!("{put_prefix}/{w}/{seq}");
        let written = put_written.clone();
        async move {
            c.put_object()
                .bucket(bucket)
                .key(key)
                .body(ByteStream::from(body))
                .send()
                .await
                .context("PUT")?;
            written[w].fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    let bucket = t.bucket.clone();
    let get = run(concurrency, seconds, size, move |w, seq| {
        let (c, bucket) = (c.clone(), bucket.clone());
        let n = written[w].load(Ordering::Relaxed).max(1);
        let key = format!("{prefix}/{w}/{}", seq % n);
        async move {
            let out = c
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .context("GET")?;
            let data = out.body.collect().await.context("GET body")?.into_bytes();
            if data.len() != size {
                bail!("GET returned {} bytes, not {size}", data.len());
            }
            Ok(())
        }
    })
    .await?;
    Ok((put, get))
}

/// A Lifeboat cluster with bucket `bench-bucket` and a full credential,
/// served by the PG's leader.
fn lifeboat(dir: &std::path::Path, name: &str, sites: &[&str]) -> Result<(Cluster, Target)> {
    let cluster = Cluster::start(dir, sites, 64)?;
    let leader = cluster.leader()?;
    leader.must_cli(&["bucket", "create", "bench/bench-bucket"]);
    let (key, secret) = leader.must_create_credential("bench");
    let target = Target {
        name: name.into(),
        endpoint: format!("http://{}", leader.s3),
        key,
        secret,
        bucket: "bench-bucket".into(),
        pids: cluster.nodes.iter().filter_map(|n| n.pid()).collect(),
    };
    Ok((cluster, target))
}

/// `s3s-fs` over a directory beside Lifeboat's, with a bucket.
async fn s3s_fs(dir: &std::path::Path) -> Result<(Child, Target)> {
    let root = dir.join("s3s-fs");
    std::fs::create_dir_all(root.join("bench-bucket"))?;
    let port = lifeboat_chaos_tests::harness::free_port();
    let child = Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "BENCHKEY", "--secret-key", "BENCHSECRET"])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start s3s-fs (cargo install s3s-fs@0.14.1 --locked --features binary)")?;
    let target = Target {
        name: "s3s-fs".into(),
        endpoint: format!("http://127.0.0.1:{port}"),
        key: "BENCHKEY".into(),
        secret: "BENCHSECRET".into(),
        bucket: "bench-bucket".into(),
        pids: vec![child.id()],
    };
    let c = client(&target);
    let started = Instant::now();
    while c
        .list_objects_v2()
        .bucket("bench-bucket")
        .send()
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("s3s-fs did not answer on {}", target.endpoint);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((child, target))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let sizes: Vec<usize> = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<_>>()?;
    // Beside the cargo target directory: the same disk as the builds.
    let dir = tempfile::tempdir()?;
    let mut targets = Vec::new();
    let mut clusters = Vec::new();
    let mut children = Vec::new();
    for name in &args.targets {
        match name.as_str() {
            "s3s-fs" => {
                let (child, t) = s3s_fs(dir.path()).await?;
                children.push(child);
                targets.push(t);
            }
            "single" => {
                let (c, t) = lifeboat(&dir.path().join("single"), "lifeboat 1 node", &["primary"])?;
                clusters.push(c);
                targets.push(t);
            }
            "cluster" => {
                let sites = ["primary", "primary", "primary", "dr", "dr"];
                let (c, t) = lifeboat(&dir.path().join("cluster"), "lifeboat 3+2", &sites)?;
                clusters.push(c);
                targets.push(t);
            }
            other => bail!("unknown target {other}"),
        }
    }
    let passes = args.passes.max(1);
    // (size index, concurrency index) → per target, the sums over passes.
    let mut sums =
        vec![vec![vec![Totals::default(); targets.len()]; args.concurrency.len()]; sizes.len()];
    println!(
        "{:<18} {:>7} {:>4} {:>4} | {:>9} {:>9}",
        "target", "size", "conc", "pass", "PUT MB/s", "GET MB/s"
    );
    for (si, &size) in sizes.iter().enumerate() {
        for (ci, &concurrency) in args.concurrency.iter().enumerate() {
            for pass in 0..passes {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if pass % 2 == 1 {
                    order.reverse();
                }
                for ti in order {
                    let t = &targets[ti];
                    let others: Vec<u32> = targets
                        .iter()
                        .filter(|o| o.name != t.name)
                        .flat_map(|o| o.pids.iter().copied())
                        .collect();
                    match lifeboat_benches::quiesce(&others, Duration::from_secs(120)).await {
                        Ok(waited) if waited > Duration::from_secs(2) => eprintln!(
                            "{}: waited {:.0} s for the other targets to go idle",
                            t.name,
                            waited.as_secs_f64()
                        ),
                        Ok(_) => {}
                        Err(e) => eprintln!("warning: measuring {} while {e}", t.name),
                    }
                    let (put, get) = measure(t, size, concurrency, args.seconds).await?;
                    println!(
                        "{:<18} {:>7} {:>4} {:>4} | {:>9.1} {:>9.1}",
                        t.name,
                        args.sizes[si],
                        concurrency,
                        pass + 1,
                        put.mb_per_s,
                        get.mb_per_s
                    );
                    sums[si][ci][ti].add(put, get);
                }
            }
        }
    }
    println!();
    println!("Averaged over {passes} passes:");
    println!(
        "{:<18} {:>7} {:>4} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "target", "size", "conc", "PUT op/s", "PUT MB/s", "×ref", "GET op/s", "GET MB/s", "×ref"
    );
    let reference = targets.iter().position(|t| t.name == "s3s-fs");
    let n = passes as f64;
    for (si, by_conc) in sums.iter().enumerate() {
        for (ci, by_target) in by_conc.iter().enumerate() {
            for (ti, t) in by_target.iter().enumerate() {
                let ratio = |mine: f64, pick: fn(&Totals) -> f64| {
                    reference.map_or("-".to_string(), |r| {
                        format!("{:.2}", mine / pick(&by_target[r]))
                    })
                };
                println!(
                    "{:<18} {:>7} {:>4} | {:>9.0} {:>9.1} {:>6} | {:>9.0} {:>9.1} {:>6}",
                    targets[ti].name,
                    args.sizes[si],
                    args.concurrency[ci],
                    t.put.ops_per_s / n,
                    t.put.mb_per_s / n,
                    ratio(t.put.mb_per_s, |s| s.put.mb_per_s),
                    t.get.ops_per_s / n,
                    t.get.mb_per_s / n,
                    ratio(t.get.mb_per_s, |s| s.get.mb_per_s),
                );
            }
        }
    }
    for mut c in clusters {
        c.stop()?;
    }
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}
