//! End-to-end NBD load generator: runs the same workloads against a
//! Lifeboat node and against `nbdkit file` on the same disk, in one run, and
//! prints a markdown table with the ratio. Timings are noisy on a shared
//! two-core machine: compare the ratio, not the absolute figures.
//!
//! Workloads: sequential 1 MiB writes and reads; 4 KiB random writes and
//! reads at queue depth 1 and 32, with a FLUSH after every 32 writes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lifeboat_benches::{DataKind, data};
use lifeboat_chaos_tests::harness::{TestNode, free_port};
use lifeboat_chaos_tests::nbd_client::NbdClient;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    /// Work directory (on the disk being measured).
    #[arg(long, default_value_os_t = lifeboat_benches::default_work_dir())]
    work_dir: PathBuf,
    /// Export size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Longest time per workload and target, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Queue depth of the sequential workloads.
    #[arg(long, default_value_t = 8)]
    seq_depth: usize,
    /// Data for writes: random or compressible.
    #[arg(long, default_value = "random")]
    data: String,
    /// Run only the workloads whose name contains this (e.g. "seq write").
    #[arg(long, default_value = "")]
    only: String,
    /// Skip the nbdkit baseline (for profiling Lifeboat alone).
    #[arg(long)]
    no_baseline: bool,
    /// Also measure a replicated cluster: three voters at site primary and
    /// one learner at site dr, four processes on this machine, driven
    /// through the PG leader's NBD port.
    #[arg(long)]
    replicated: bool,
    /// With --replicated: then run 4 KiB random writes at half the
    /// measured QD32 maximum for this many seconds, sampling the DR
    /// learner's lag (lifeboat_replication_lag_seconds) every 100 ms.
    #[arg(long, default_value_t = 0)]
    lag_seconds: u64,
}

#[derive(Clone, Copy)]
enum Pattern {
    SeqWrite,
    SeqRead,
    RandWrite,
    RandRead,
}

struct Workload {
    name: &'static str,
    pattern: Pattern,
    block: usize,
    depth: usize,
}

struct Result1 {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Result1 {
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

async fn run_workload(
    addr: SocketAddr,
    export: &str,
    w: &Workload,
    size: u64,
    limit: Duration,
    payload: &Arc<Vec<u8>>,
) -> Result<Result1> {
    run_workload_paced(addr, export, w, size, limit, payload, None).await
}

/// Like [`run_workload`]; with `rate`, the queue together issues at most
/// that many operations per second.
async fn run_workload_paced(
    addr: SocketAddr,
    export: &str,
    w: &Workload,
    size: u64,
    limit: Duration,
    payload: &Arc<Vec<u8>>,
    rate: Option<f64>,
) -> Result<Result1> {
    // A permit per operation when paced, handed out at the rate.
    let permits = rate.map(|rate| {
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(w.depth);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.send(()).await.is_err() {
                    return;
                }
            }
        });
        Arc::new(tokio::sync::Mutex::new(rx))
    });
    let blocks = size / w.block as u64;
    let seq_cursor = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + limit;
    let start = Instant::now();
    let mut tasks = Vec::new();
    // One connection per 8 in flight, like a multi-queue client.
    let connections = w.depth.div_ceil(8);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(Arc::new(NbdClient::connect(addr, export).await?));
    }
    for t in 0..w.depth {
        let client = clients[t % connections].clone();
        let (cursor, written, payload) = (seq_cursor.clone(), written.clone(), payload.clone());
        let (pattern, block) = (w.pattern, w.block);
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            let mut ops = 0u64;
            while Instant::now() < deadline {
                if let Some(p) = &permits
                    && p.lock().await.recv().await.is_none()
                {
                    break;
                }
                let n = match pattern {
                    Pattern::SeqWrite | Pattern::SeqRead => {
                        let n = cursor.fetch_add(1, Ordering::Relaxed);
                        if n >= blocks {
                            break;
                        }
                        n
                    }
                    _ => rng.gen_range(0..blocks),
                };
                let offset = n * block as u64;
                match pattern {
                    Pattern::SeqWrite | Pattern::RandWrite => {
                        let at = (n as usize * 4096) % (payload.len() - block);
                        client
                            .write(offset, &payload[at..at + block], false)
                            .await?
                            .map_err(anyhow::Error::from)?;
                        // A FLUSH after every 32 writes (counted across the queue).
                        if written.fetch_add(1, Ordering::Relaxed) % 32 == 31 {
                            client.flush().await?.map_err(anyhow::Error::from)?;
                        }
                    }
                    Pattern::SeqRead | Pattern::RandRead => {
                        client
                            .read(offset, block as u32)
                            .await?
                            .map_err(anyhow::Error::from)?;
                    }
                }
                ops += 1;
            }
            Ok::<u64, anyhow::Error>(ops)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await??;
    }
    let elapsed = start.elapsed();
    Ok(Result1 {
        ops,
        bytes: ops * w.block as u64,
        elapsed,
    })
}

struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nbdkit(image: &std::path::Path, port: u16) -> Result<Nbdkit> {
    let child = Command::new("nbdkit")
        .args([
            "--foreground",
            "--ipaddr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "file",
        ])
        .arg(format!("file={}", image.display()))
        .stdout(Stdio::null())
        .spawn()
        .context("start nbdkit (apt-get install nbdkit)")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("nbdkit did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Nbdkit(child))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work_dir)?;
    let work = tempfile::tempdir_in(&args.work_dir)?;
    let size = args.size_mib << 20;
    let kind = match args.data.as_str() {
        "random" => DataKind::Random,
        "compressible" => DataKind::Compressible,
        other => bail!("--data {other}: use random or compressible"),
    };
    let payload = Arc::new(data(kind, 64 << 20));

    let image = work.path().join("nbdkit.img");
    std::fs::File::create(&image)?.set_len(size)?;
    let kit_port = free_port();
    let _kit = start_nbdkit(&image, kit_port)?;
    let kit_addr = SocketAddr::from(([127, 0, 0, 1], kit_port));

    let mut node = TestNode::new(
        &work.path().join("node"),
        &work.path().join("node/data"),
        "[store]\nreserve_bytes = 67108864\n",
    )?;
    node.start()?;
    node.must_init();
    node.must_cli(&["tenant", "create", "bench"]);
    node.must_cli(&[
        "volume",
        "create",
        "bench/v",
        "--size",
        &format!("{}MiB", args.size_mib),
    ]);

    let workloads = [
        Workload {
            name: "seq write 1 MiB",
            pattern: Pattern::SeqWrite,
            block: 1 << 20,
            depth: args.seq_depth,
        },
        Workload {
            name: "seq read 1 MiB",
            pattern: Pattern::SeqRead,
            block: 1 << 20,
            depth: args.seq_depth,
        },
        Workload {
            name: "rand write 4 KiB QD1",
            pattern: Pattern::RandWrite,
            block: 4096,
            depth: 1,
        },
        Workload {
            name: "rand write 4 KiB QD32",
            pattern: Pattern::RandWrite,
            block: 4096,
            depth: 32,
        },
        Workload {
            name: "rand read 4 KiB QD1",
            pattern: Pattern::RandRead,
            block: 4096,
            depth: 1,
        },
        Workload {
            name: "rand read 4 KiB QD32",
            pattern: Pattern::RandRead,
            block: 4096,
            depth: 32,
        },
    ];
    let limit = Duration::from_secs(args.seconds);
    if args.replicated {
        let cluster = start_cluster(work.path(), args.size_mib)?;
        let leader = cluster.leader()?;
        println!(
            "| workload | one node | 3 voters + 1 learner | nbdkit file | replicated ÷ one node | replicated ÷ nbdkit |"
        );
        println!("|---|---|---|---|---|---|");
        let mut qd32_iops = None;
        for w in workloads.iter().filter(|w| w.name.contains(&args.only)) {
            let one = run_workload(node.nbd, "bench/v", w, size, limit, &payload).await?;
            let rep = run_workload(leader.nbd, "bench/v", w, size, limit, &payload).await?;
            let kit = run_workload(kit_addr, "", w, size, limit, &payload).await?;
            let pick = |r: &Result1| {
                if w.block >= 1 << 20 {
                    r.mb_s()
                } else {
                    r.iops()
                }
            };
            let unit = if w.block >= 1 << 20 { "MB/s" } else { "IOPS" };
            let (a, b, c) = (pick(&one), pick(&rep), pick(&kit));
            println!(
                "| {} | {a:.0} {unit} | {b:.0} {unit} | {c:.0} {unit} | {:.2}× | {:.2}× |",
                w.name,
                b / a,
                b / c
            );
            if w.name == "rand write 4 KiB QD32" {
                qd32_iops = Some(b);
            }
        }
        if args.lag_seconds > 0 {
            let max = match qd32_iops {
                Some(v) => v,
                None => {
                    let w = workloads
                        .iter()
                        .find(|w| w.name == "rand write 4 KiB QD32")
                        .unwrap();
                    run_workload(leader.nbd, "bench/v", w, size, limit, &payload)
                        .await?
                        .iops()
                }
            };
            measure_lag(
                leader,
                &workloads[3],
                size,
                &payload,
                max / 2.0,
                args.lag_seconds,
            )
            .await?;
        }
        node.stop()?;
        return Ok(());
    }
    println!("| workload | Lifeboat | nbdkit file | ratio |");
    println!("|---|---|---|---|");
    for w in workloads.iter().filter(|w| w.name.contains(&args.only)) {
        let lb = run_workload(node.nbd, "bench/v", w, size, limit, &payload).await?;
        if args.no_baseline {
            let (v, unit) = if w.block >= 1 << 20 {
                (lb.mb_s(), "MB/s")
            } else {
                (lb.iops(), "IOPS")
            };
            println!("| {} | {v:.0} {unit} | - | - |", w.name);
            continue;
        }
        let kit = run_workload(kit_addr, "", w, size, limit, &payload).await?;
        let (a, b, unit) = if w.block >= 1 << 20 {
            (lb.mb_s(), kit.mb_s(), "MB/s")
        } else {
            (lb.iops(), kit.iops(), "IOPS")
        };
        println!(
            "| {} | {a:.0} {unit} | {b:.0} {unit} | {:.2}× |",
            w.name,
            a / b
        );
    }
    node.stop()?;
    Ok(())
}

/// Three voters at `primary` and one learner at `dr`, each its own process,
/// with tenant `bench` and volume `bench/v`.
struct Cluster {
    nodes: Vec<TestNode>,
}

fn start_cluster(dir: &std::path::Path, size_mib: u64) -> Result<Cluster> {
    let mut nodes = lifeboat_chaos_tests::harness::start_nodes(
        &dir.join("cluster"),
        &["primary", "primary", "primary", "dr"],
        "[store]\nreserve_bytes = 67108864\n",
    )?;
    lifeboat_chaos_tests::harness::form_cluster(&mut nodes);
    nodes[0].must_cli(&["tenant", "create", "bench"]);
    nodes[0].must_cli(&[
        "volume",
        "create",
        "bench/v",
        "--size",
        &format!("{size_mib}MiB"),
    ]);
    let cluster = Cluster { nodes };
    // Wait until the leader replicates to all three other members.
    let started = Instant::now();
    loop {
        let status = cluster.leader_status().unwrap_or_default();
        if status["lag"].as_array().is_some_and(|l| l.len() == 3) {
            return Ok(cluster);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("bench/main never had four members: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Cluster {
    /// `bench/main` as its leader reports it.
    fn leader_status(&self) -> Option<serde_json::Value> {
        let out = self.nodes[0].cli(&["status", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let main = v["pgs"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "bench/main")?;
        let leader = main["leader_node"].as_u64()?;
        let n = self.nodes.iter().find(|n| n.node_id == leader)?;
        let out = n.cli(&["status", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["pgs"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "bench/main")
            .cloned()
    }

    fn leader(&self) -> Result<&TestNode> {
        let status = self.leader_status().context("no status of bench/main")?;
        let id = status["leader_node"].as_u64().context("no leader")?;
        self.nodes
            .iter()
            .find(|n| n.node_id == id)
            .context("leader is not one of ours")
    }
}

/// The DR learner's lag in seconds from the leader's /metrics.
fn dr_lag_seconds(leader_http: SocketAddr) -> Option<f64> {
    let (_, body) = lifeboat_chaos_tests::harness::http_get(leader_http, "/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with("lifeboat_replication_lag_seconds{") && l.contains("site=\"dr\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn measure_lag(
    leader: &TestNode,
    w: &Workload,
    size: u64,
    payload: &Arc<Vec<u8>>,
    rate: f64,
    seconds: u64,
) -> Result<()> {
    let http = leader.http;
    let sampler = tokio::task::spawn_blocking(move || {
        let mut samples = Vec::new();
        let end = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < end {
            if let Some(v) = dr_lag_seconds(http) {
                samples.push(v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        samples
    });
    let load = run_workload_paced(
        leader.nbd,
        "bench/v",
        w,
        size,
        Duration::from_secs(seconds),
        payload,
        Some(rate),
    )
    .await?;
    let mut samples = sampler.await?;
    if samples.is_empty() {
        bail!("no lag samples from {http}");
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!();
    println!(
        "DR lag under {:.0} IOPS of 4 KiB writes (half the QD32 maximum; {:.0} IOPS achieved), {} samples over {seconds} s:",
        rate,
        load.iops(),
        samples.len()
    );
    println!(
        "| p50 | p99 | max |\n|---|---|---|\n| {:.3} s | {:.3} s | {:.3} s |",
        pct(0.5),
        pct(0.99),
        samples[samples.len() - 1]
    );
    Ok(())
}
