//! End-to-end NBD load generator: runs the same workloads against a
//! Lifeboat node and against `nbdkit file` on the same disk, in one run, and
//! prints a markdown table with the ratio. Timings are noisy on a shared
//! two-core machine: compare the ratio, not the absolute figures.
//!
//! Workloads: sequential 1 MiB writes and reads; 4 KiB random writes and
//! reads at queue depth 1 and 32, with a FLUSH after every 32 writes.
//! Each runs `--passes` times per target (default 2), Lifeboat first, then
//! nbdkit first, and so on; the table gives the averages.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lifeboat_benches::cluster::Cluster;
use lifeboat_benches::nbd_workload::{
    Durability, Pattern, Throughput, Workload, run as run_workload, run_paced,
};
use lifeboat_benches::{DataKind, data};
use lifeboat_chaos_tests::harness::{TestNode, free_port};

/// How nbdkit's image starts (see `--nbdkit-image`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum NbdkitImage {
    Sparse,
    Written,
}

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
    /// Measurements of each workload and target (one node beside nbdkit),
    /// alternating which goes first (Lifeboat, then nbdkit first, ...);
    /// the table shows their average and each pass's ratio. How fast this
    /// disk takes writes changes from one minute to the next, and a
    /// second pass writes over what the first one wrote (nbdkit over
    /// allocated blocks, Lifeboat a new version of each block).
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// nbdkit's image: `sparse` (made by truncate; its first writes also
    /// allocate the filesystem's blocks) or `written` (filled with zeros
    /// and synced before the run, as a volume in use would be).
    #[arg(long, value_enum, default_value_t = NbdkitImage::Sparse)]
    nbdkit_image: NbdkitImage,
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
    let file = std::fs::File::create(&image)?;
    match args.nbdkit_image {
        NbdkitImage::Sparse => file.set_len(size)?,
        NbdkitImage::Written => {
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..size.div_ceil(zeros.len() as u64) {
                (&file).write_all(&zeros)?;
            }
            file.set_len(size)?;
            file.sync_all()?;
        }
    }
    drop(file);
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
            durability: Durability::FlushEvery32,
        },
        Workload {
            name: "seq read 1 MiB",
            pattern: Pattern::SeqRead,
            block: 1 << 20,
            depth: args.seq_depth,
            durability: Durability::FlushEvery32,
        },
        Workload {
            name: "rand write 4 KiB QD1",
            pattern: Pattern::RandWrite,
            block: 4096,
            depth: 1,
            durability: Durability::FlushEvery32,
        },
        Workload {
            name: "rand write 4 KiB QD32",
            pattern: Pattern::RandWrite,
            block: 4096,
            depth: 32,
            durability: Durability::FlushEvery32,
        },
        Workload {
            name: "rand read 4 KiB QD1",
            pattern: Pattern::RandRead,
            block: 4096,
            depth: 1,
            durability: Durability::FlushEvery32,
        },
        Workload {
            name: "rand read 4 KiB QD32",
            pattern: Pattern::RandRead,
            block: 4096,
            depth: 32,
            durability: Durability::FlushEvery32,
        },
    ];
    let limit = Duration::from_secs(args.seconds);
    if args.replicated {
        let mut cluster = Cluster::start(
            work.path(),
            &["primary", "primary", "primary", "dr"],
            args.size_mib,
        )?;
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
            let pick = |r: &Throughput| {
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
        cluster.stop()?;
        return Ok(());
    }
    let passes = if args.no_baseline {
        1
    } else {
        args.passes.max(1)
    };
    if args.no_baseline {
        println!("| workload | Lifeboat |");
        println!("|---|---|");
    } else {
        println!("| workload | Lifeboat | nbdkit file | ratio | each pass |");
        println!("|---|---|---|---|---|");
    }
    for w in workloads.iter().filter(|w| w.name.contains(&args.only)) {
        let (rate, unit): (fn(&Throughput) -> f64, _) = if w.block >= 1 << 20 {
            (Throughput::mb_s, "MB/s")
        } else {
            (Throughput::iops, "IOPS")
        };
        let (mut lb_sum, mut kit_sum, mut ratios) = (0.0, 0.0, Vec::new());
        for pass in 0..passes {
            let lifeboat_first = pass % 2 == 0;
            let mut lb = None;
            let mut kit = None;
            for lifeboat in [lifeboat_first, !lifeboat_first] {
                if lifeboat {
                    lb = Some(rate(
                        &run_workload(node.nbd, "bench/v", w, size, limit, &payload).await?,
                    ));
                } else if !args.no_baseline {
                    kit = Some(rate(
                        &run_workload(kit_addr, "", w, size, limit, &payload).await?,
                    ));
                }
            }
            let lb = lb.expect("Lifeboat runs in every pass");
            lb_sum += lb;
            if let Some(kit) = kit {
                kit_sum += kit;
                ratios.push(format!("{:.2}×", lb / kit));
            }
        }
        let n = passes as f64;
        if args.no_baseline {
            println!("| {} | {:.0} {unit} |", w.name, lb_sum / n);
        } else {
            println!(
                "| {} | {:.0} {unit} | {:.0} {unit} | {:.2}× | {} |",
                w.name,
                lb_sum / n,
                kit_sum / n,
                lb_sum / kit_sum,
                ratios.join(", ")
            );
        }
    }
    node.stop()?;
    Ok(())
}

/// The DR learner's lag in seconds from the leader's /metrics: the worst
/// over the PGs the leader leads there. There is more than one (the
/// catalog's as well as `bench/main`), in an order that changes from one
/// process to the next, so taking the first series measured the idle
/// catalog in some runs (all samples 0.000 s).
fn dr_lag_seconds(leader_http: SocketAddr) -> Option<f64> {
    let (_, body) = lifeboat_chaos_tests::harness::http_get(leader_http, "/metrics").ok()?;
    body.lines()
        .filter(|l| l.starts_with("lifeboat_replication_lag_seconds{") && l.contains("site=\"dr\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
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
    let load = run_paced(
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
