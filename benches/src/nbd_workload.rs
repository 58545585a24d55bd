//! NBD workloads for the load generators: sequential and random reads and
//! writes at a queue depth, optionally paced, against any NBD server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use lifeboat_chaos_tests::nbd_client::NbdClient;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    SeqWrite,
    SeqRead,
    RandWrite,
    RandRead,
}

/// How writes are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// A FLUSH after every 32 writes, counted across the queue (what a
    /// file system or a backup tool issues).
    FlushEvery32,
    /// Every write carries FUA: durable when acknowledged, like a put to a
    /// consensus store.
    Fua,
}

pub struct Workload {
    pub name: &'static str,
    pub pattern: Pattern,
    /// Bytes per request.
    pub block: usize,
    /// Requests in flight.
    pub depth: usize,
    pub durability: Durability,
}

/// What one run of a workload did.
pub struct Throughput {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Waits for `tasks` (each returns how many operations it did) and
    /// sums them into one throughput since `start`.
    pub async fn of_tasks(
        tasks: Vec<tokio::task::JoinHandle<Result<u64>>>,
        start: Instant,
        op_bytes: u64,
    ) -> Result<Throughput> {
        let mut ops = 0;
        for t in tasks {
            ops += t.await??;
        }
        Ok(Throughput {
            ops,
            bytes: ops * op_bytes,
            elapsed: start.elapsed(),
        })
    }
}

/// Runs `w` on `export` at `addr` for at most `limit` (sequential
/// workloads stop at the end of the export, `size` bytes).
pub async fn run(
    addr: SocketAddr,
    export: &str,
    w: &Workload,
    size: u64,
    limit: Duration,
    payload: &Arc<Vec<u8>>,
) -> Result<Throughput> {
    crate::settle_disk().await?;
    run_paced(addr, export, w, size, limit, payload, None).await
}

/// Like [`run`]; with `rate`, the queue together issues at most that many
/// operations per second.
pub async fn run_paced(
    addr: SocketAddr,
    export: &str,
    w: &Workload,
    size: u64,
    limit: Duration,
    payload: &Arc<Vec<u8>>,
    rate: Option<f64>,
) -> Result<Throughput> {
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
        let (pattern, block, durability) = (w.pattern, w.block, w.durability);
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
                        let fua = durability == Durability::Fua;
                        client
                            .write(offset, &payload[at..at + block], fua)
                            .await?
                            .map_err(anyhow::Error::from)?;
                        if durability == Durability::FlushEvery32
                            && written.fetch_add(1, Ordering::Relaxed) % 32 == 31
                        {
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
    Throughput::of_tasks(tasks, start, w.block as u64).await
}
