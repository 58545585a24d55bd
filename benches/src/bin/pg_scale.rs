//! Many protection groups per node: starts a cluster (three nodes at one
//! site by default, so every PG has three voters and every node hosts a
//! member of every PG), creates N PGs with a volume each, and measures each
//! node process's resident memory and CPU, idle and under a light write
//! load spread over every PG. Prints per-PG figures.
//!
//! Timers are the production defaults (heartbeat 500 ms, election 2–4 s).
//! `--heartbeats both` (the default) runs the whole measurement twice, side
//! by side: with per-node beats (`[raft] node_heartbeats = true`, the
//! default) and with openraft's own per-group heartbeats and election
//! timers, the baseline they replace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lifeboat_benches::process_usage;
use lifeboat_chaos_tests::harness::TestNode;
use lifeboat_chaos_tests::nbd_client::NbdClient;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_os_t = lifeboat_benches::default_work_dir())]
    work_dir: PathBuf,
    /// Node processes (all at one site: every PG has a member on each).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Protection groups to create (each with a 1 MiB volume).
    #[arg(long, default_value_t = 500)]
    pgs: u64,
    /// Length of each measurement window, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The light load: 4 KiB writes per second, spread round-robin over
    /// every PG's volume.
    #[arg(long, default_value_t = 100)]
    writes_per_second: u64,
    /// Which liveness to measure: node (one beat per node pair), group
    /// (openraft's per-group heartbeats) or both, one after the other.
    #[arg(long, default_value = "both")]
    heartbeats: String,
}

/// Per node: average RSS over the window and CPU share (1.0 = one core).
async fn measure(nodes: &[TestNode], window: Duration) -> Result<Vec<(u64, f64)>> {
    let pids: Vec<u32> = nodes
        .iter()
        .map(|n| n.pid().context("node not running"))
        .collect::<Result<_>>()?;
    let before: Vec<(u64, f64)> = pids
        .iter()
        .map(|p| process_usage(*p))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let mut rss_sum = vec![0u64; pids.len()];
    let mut samples = 0u64;
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, p) in pids.iter().enumerate() {
            rss_sum[i] += process_usage(*p)?.0;
        }
        samples += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after: Vec<(u64, f64)> = pids
        .iter()
        .map(|p| process_usage(*p))
        .collect::<Result<_>>()?;
    Ok((0..pids.len())
        .map(|i| {
            (
                rss_sum[i] / samples.max(1),
                (after[i].1 - before[i].1) / elapsed,
            )
        })
        .collect())
}

fn report(mode: &str, label: &str, base: &[(u64, f64)], now: &[(u64, f64)], pgs: u64) {
    for (i, (b, n)) in base.iter().zip(now).enumerate() {
        println!(
            "| {mode} | node {} | {label} | {:.0} MiB | {:.1}% | {:.0} KiB | {:.3}% |",
            i + 1,
            n.0 as f64 / (1 << 20) as f64,
            n.1 * 100.0,
            (n.0 as f64 - b.0 as f64) / pgs as f64 / 1024.0,
            (n.1 - b.1) * 100.0 / pgs as f64,
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work_dir)?;
    let modes: &[bool] = match args.heartbeats.as_str() {
        "node" => &[true],
        "group" => &[false],
        "both" => &[true, false],
        other => bail!("--heartbeats {other}: use node, group or both"),
    };
    let mut tables = Vec::new();
    for &node_heartbeats in modes {
        tables.push((node_heartbeats, run(&args, node_heartbeats).await?));
    }
    println!(
        "{} PGs, {} nodes (every node a member of every PG), {} s windows, light load {} writes/s of 4 KiB",
        args.pgs, args.nodes, args.seconds, args.writes_per_second
    );
    println!("| heartbeats | node | state | RSS | CPU (of one core) | RSS per PG | CPU per PG |");
    println!("|---|---|---|---|---|---|---|");
    for (node_heartbeats, t) in &tables {
        let mode = if *node_heartbeats {
            "per node"
        } else {
            "per group"
        };
        report(mode, "before (catalog + main)", &t.base, &t.base, args.pgs);
        report(mode, "idle", &t.base, &t.idle, args.pgs);
        report(mode, "light load", &t.base, &t.loaded, args.pgs);
    }
    for (node_heartbeats, t) in &tables {
        eprintln!(
            "node_heartbeats = {node_heartbeats}: created {} PGs in {:?}, {} writes under load",
            args.pgs, t.create, t.writes
        );
    }
    Ok(())
}

/// One measurement: before the PGs, idle with them, under the light load.
struct Table {
    base: Vec<(u64, f64)>,
    idle: Vec<(u64, f64)>,
    loaded: Vec<(u64, f64)>,
    create: Duration,
    writes: u64,
}

async fn run(args: &Args, node_heartbeats: bool) -> Result<Table> {
    let work = tempfile::tempdir_in(&args.work_dir)?;
    let sites = vec!["primary"; args.nodes as usize];
    let mut nodes = lifeboat_chaos_tests::harness::start_nodes(
        work.path(),
        &sites,
        &format!(
            "[store]\nreserve_bytes = 67108864\n[raft]\nnode_heartbeats = {node_heartbeats}\n"
        ),
    )?;
    lifeboat_chaos_tests::harness::form_cluster(&mut nodes);
    nodes[0].must_cli(&["tenant", "create", "scale"]);
    let window = Duration::from_secs(args.seconds);
    let base = measure(&nodes, window).await?;

    let started = Instant::now();
    for i in 0..args.pgs {
        nodes[0].must_cli(&["pg", "create", &format!("scale/pg{i}")]);
        nodes[0].must_cli(&[
            "volume",
            "create",
            &format!("scale/v{i}"),
            "--size",
            "1MiB",
            "--pg",
            &format!("pg{i}"),
        ]);
    }
    let create = started.elapsed();
    eprintln!("created {} PGs with a volume each in {create:?}", args.pgs);
    // Every node runs a member of every PG once its health says so.
    for n in &mut nodes {
        n.wait_healthy()?;
    }
    let idle = measure(&nodes, window).await?;

    // The light load, on node 1's NBD port (forwarded to each PG's leader).
    let nbd: SocketAddr = nodes[0].nbd;
    let mut clients = Vec::new();
    for i in 0..args.pgs {
        clients.push(NbdClient::connect(nbd, &format!("scale/v{i}")).await?);
    }
    let pgs = args.pgs;
    let per_write = Duration::from_secs_f64(1.0 / args.writes_per_second as f64);
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(per_write);
        let block = vec![0x5au8; 4096];
        let mut n = 0u64;
        let end = Instant::now() + window + Duration::from_secs(2);
        while Instant::now() < end {
            tick.tick().await;
            let c = &clients[(n % pgs) as usize];
            c.write((n / pgs % 256) * 4096, &block, false)
                .await?
                .map_err(anyhow::Error::from)?;
            n += 1;
        }
        Ok::<u64, anyhow::Error>(n)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = measure(&nodes, window).await?;
    let writes = load.await??;
    if writes == 0 {
        bail!("the light load wrote nothing");
    }

    for n in &mut nodes {
        n.stop()?;
    }
    Ok(Table {
        base,
        idle,
        loaded,
        create,
        writes,
    })
}
