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
    #[arg(long, default_value_os_t = default_work_dir())]
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
}

fn default_work_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/lifeboat/bench")
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
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            let mut ops = 0u64;
            while Instant::now() < deadline {
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
