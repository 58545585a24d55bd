//! 4 KiB durable writes at concurrency 1 and 32: Lifeboat (three voters at
//! one site, written through the PG leader's NBD port, every write FUA)
//! beside a three-member etcd cluster (Debian's `etcd-server`, puts of
//! 4 KiB values to the leader over gRPC), both on the disk of the work
//! directory, in one run. Each acknowledgement means the same thing: the
//! write is in the logs of a majority of three members, fsynced.
//!
//! Members of both talk TLS to each other (etcd with `--peer-auto-tls`,
//! unless `--etcd-plain-peers`).
//!
//! The workloads alternate between the two systems for `--rounds` rounds,
//! so a slow spell of the shared machine hits both; every round is printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lifeboat_benches::cluster::Cluster;
use lifeboat_benches::etcd::{PutRequest, StatusRequest};
use lifeboat_benches::etcd::{kv_client::KvClient, maintenance_client::MaintenanceClient};
use lifeboat_benches::nbd_workload::{self, Durability, Pattern, Throughput, Workload};
use lifeboat_benches::{DataKind, data};
use lifeboat_chaos_tests::harness::free_port;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
struct Args {
    /// Work directory (on the disk being measured).
    #[arg(long, default_value_os_t = lifeboat_benches::default_work_dir())]
    work_dir: PathBuf,
    /// Seconds per workload, system and round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of (Lifeboat, etcd) per queue depth.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Lifeboat volume size in MiB (writes land on random 4 KiB blocks of it).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// etcd keys written (random among them), the same count as the
    /// volume's 4 KiB blocks unless given.
    #[arg(long)]
    keys: Option<u64>,
    /// The etcd server binary.
    #[arg(long, default_value = "etcd")]
    etcd: String,
    /// etcd members talk plain HTTP to each other instead of TLS. By default
    /// they use TLS (`--peer-auto-tls`), as Lifeboat's members always do
    /// (mutual TLS on the Raft port), so both pay for encryption.
    #[arg(long)]
    etcd_plain_peers: bool,
    /// Concurrencies to run, comma-separated (the issue asks for 1 and 32).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32])]
    depths: Vec<usize>,
}

const VALUE_BYTES: usize = 4096;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work_dir)?;
    let work = tempfile::tempdir_in(&args.work_dir)?;
    let payload = Arc::new(data(DataKind::Random, 64 << 20));
    let size = args.size_mib << 20;
    let keys = args.keys.unwrap_or(size / VALUE_BYTES as u64);

    let mut cluster = Cluster::start(work.path(), &["primary"; 3], args.size_mib)?;
    let leader_nbd = cluster.leader()?.nbd;
    let etcd = EtcdCluster::start(
        &args.etcd,
        &work.path().join("etcd"),
        !args.etcd_plain_peers,
    )?;
    let etcd_leader = etcd.leader().await?;
    eprintln!("etcd leader: {etcd_leader}");

    println!("| workload | round | Lifeboat (3 voters) | etcd (3 members) | Lifeboat ÷ etcd |");
    println!("|---|---|---|---|---|");
    let limit = Duration::from_secs(args.seconds);
    for &depth in &args.depths {
        let w = Workload {
            name: "4 KiB durable writes",
            pattern: Pattern::RandWrite,
            block: VALUE_BYTES,
            depth,
            durability: Durability::Fua,
        };
        for round in 1..=args.rounds {
            let lb = nbd_workload::run(leader_nbd, "bench/v", &w, size, limit, &payload).await?;
            let et = etcd_puts(etcd_leader, depth, keys, limit, &payload).await?;
            println!(
                "| {}, concurrency {depth} | {round} | {:.0} writes/s | {:.0} puts/s | {:.2}× |",
                w.name,
                lb.iops(),
                et.iops(),
                lb.iops() / et.iops()
            );
        }
    }
    cluster.stop()?;
    drop(etcd);
    Ok(())
}

/// Puts of 4 KiB values to random keys at `depth` in flight, one HTTP/2
/// connection per 8 in flight (as the NBD workload uses one connection
/// per 8).
async fn etcd_puts(
    addr: SocketAddr,
    depth: usize,
    keys: u64,
    limit: Duration,
    payload: &Arc<Vec<u8>>,
) -> Result<Throughput> {
    let connections = depth.div_ceil(8);
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(KvClient::new(connect(addr).await?));
    }
    let deadline = Instant::now() + limit;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..depth {
        let mut client = clients[t % connections].clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            let mut ops = 0u64;
            while Instant::now() < deadline {
                let n = rng.gen_range(0..keys);
                let at = (n as usize * 4096) % (payload.len() - VALUE_BYTES);
                client
                    .put(PutRequest {
                        key: format!("bench/{n:016x}").into_bytes(),
                        value: payload[at..at + VALUE_BYTES].to_vec(),
                        ..Default::default()
                    })
                    .await
                    .context("etcd put")?;
                ops += 1;
            }
            Ok::<u64, anyhow::Error>(ops)
        }));
    }
    Throughput::of_tasks(tasks, start, VALUE_BYTES as u64).await
}

async fn connect(addr: SocketAddr) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Three etcd members on loopback, each with its data dir under `dir`.
struct EtcdCluster {
    members: Vec<(SocketAddr, Child)>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// With `peer_tls`, members talk TLS to each other (self-signed
    /// certificates, `--peer-auto-tls`); clients always talk plain HTTP/2,
    /// like the benchmark's NBD client to Lifeboat on loopback.
    fn start(binary: &str, dir: &Path, peer_tls: bool) -> Result<EtcdCluster> {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let scheme = if peer_tls { "https" } else { "http" };
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}={scheme}://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.join(format!("m{i}"));
            std::fs::create_dir_all(&data)?;
            let log = std::fs::File::create(dir.join(format!("m{i}.log")))?;
            let child = Command::new(binary)
                .arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls={scheme}://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls={scheme}://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg(format!("--peer-auto-tls={peer_tls}"))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=lifeboat-bench")
                // Room for every round's history without compaction.
                .arg("--quota-backend-bytes=8589934592")
                .arg("--logger=zap")
                .arg("--log-level=error")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {binary} (apt-get install etcd-server)"))?;
            members.push((SocketAddr::from(([127, 0, 0, 1], *client)), child));
        }
        Ok(EtcdCluster {
            members,
            dir: dir.to_owned(),
        })
    }

    /// The client address of the member that leads, once one does.
    async fn leader(&self) -> Result<SocketAddr> {
        let started = Instant::now();
        loop {
            let mut leaders = Vec::new();
            for (addr, _) in &self.members {
                let Ok(channel) = connect(*addr).await else {
                    continue;
                };
                let Ok(status) = MaintenanceClient::new(channel)
                    .status(StatusRequest {})
                    .await
                else {
                    continue;
                };
                let status = status.into_inner();
                let me = status.header.map_or(0, |h| h.member_id);
                if me != 0 && status.leader == me {
                    leaders.push(*addr);
                }
            }
            match leaders.as_slice() {
                [one] => return Ok(*one),
                [] if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                [] => bail!(
                    "no etcd member became leader within 30 s; m0.log:\n{}",
                    std::fs::read_to_string(self.dir.join("m0.log")).unwrap_or_default()
                ),
                many => bail!("several etcd members claim to lead: {many:?}"),
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.members {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
