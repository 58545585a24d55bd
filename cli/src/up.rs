//! `lifeboat up`: a local cluster on loopback for trying Lifeboat out and
//! for tests. For now one node (the multi-site layout comes with
//! replication). Layout under `--data-dir DIR`:
//!
//! ```text
//! DIR/nodes/0/node.toml   the node's config (made once, then reused)
//! DIR/nodes/0/db …        its data directory
//! DIR/nodes/0/node.log    its log
//! DIR/keys/master.key     the cluster master key (outside every data dir)
//! DIR/keys/operator.token the operator token
//! DIR/up.env              endpoints and credentials, KEY=VALUE lines
//! ```
//!
//! A second `up` on the same DIR resumes the cluster with its data.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use lifeboat_node::NodeConfig;
use lifeboat_proto::admin as api;

use crate::Client;

/// How long a node may take to start answering its admin API.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node may take to stop after SIGTERM before it is killed.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct UpArgs {
    /// Where the cluster's nodes, keys and up.env live.
    #[arg(long, default_value = "lifeboat-data")]
    data_dir: PathBuf,
    /// Added to every default port (7700, 10809, 9100), to run several
    /// clusters side by side.
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Start, set up and print, then exit and leave the node running
    /// (stop it with `kill $PID_0`).
    #[arg(long)]
    detach: bool,
    /// Raft timers for the local cluster, in milliseconds.
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
}

pub fn write_secret(path: &Path, secret: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    Ok(())
}

struct NodeProcess {
    child: Child,
    config: NodeConfig,
    endpoint: String,
}

fn node_config(index: u16, args: &UpArgs) -> NodeConfig {
    let port =
        |base: u16| std::net::SocketAddr::from(([127, 0, 0, 1], base + args.port_offset + index));
    let mut c = NodeConfig {
        node_id: u64::from(index) + 1,
        site: "primary".into(),
        data_dir: PathBuf::from("."),
        master_key_file: PathBuf::from("../../keys/master.key"),
        ..NodeConfig::default()
    };
    c.admin.listen = port(7700);
    c.nbd.listen = port(10809);
    c.http.listen = port(9100);
    c.raft.heartbeat_interval_ms = args.heartbeat_ms;
    c.raft.election_timeout_min_ms = args.heartbeat_ms * 4;
    c.raft.election_timeout_max_ms = args.heartbeat_ms * 8;
    c
}

fn start_node(dir: &Path, index: u16, args: &UpArgs) -> Result<NodeProcess> {
    let node_dir = dir.join("nodes").join(index.to_string());
    std::fs::create_dir_all(&node_dir).with_context(|| format!("create {}", node_dir.display()))?;
    let config_path = node_dir.join("node.toml");
    if !config_path.exists() {
        let c = node_config(index, args);
        std::fs::write(&config_path, c.to_toml())
            .with_context(|| format!("write {}", config_path.display()))?;
    }
    let config = NodeConfig::load(&config_path)?;
    let log_path = node_dir.join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("find the lifeboat binary")?;
    let child = Command::new(exe)
        .arg("node")
        .arg("start")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start lifeboat node")?;
    let endpoint = format!("http://{}", config.admin.listen);
    Ok(NodeProcess {
        child,
        config,
        endpoint,
    })
}

async fn wait_ready(node: &mut NodeProcess, dir: &Path) -> Result<Client> {
    let started = Instant::now();
    loop {
        if let Some(status) = node.child.try_wait()? {
            bail!(
                "node exited during start ({status}); see {}",
                dir.join("nodes/0/node.log").display()
            );
        }
        if let Ok(mut c) = Client::connect(&node.endpoint, None).await {
            let req = c.request(api::StatusRequest {});
            match c.api().status(req).await {
                // An initialised node answers only with a token: it is up.
                Ok(_) => return Ok(c),
                Err(s) if s.code() == tonic::Code::Unauthenticated => return Ok(c),
                Err(_) => {}
            }
        }
        if started.elapsed() > NODE_START_TIMEOUT {
            bail!(
                "node did not answer on {} within {:?}",
                node.endpoint,
                NODE_START_TIMEOUT
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stop_node(node: &mut NodeProcess) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if node.child.try_wait().ok().flatten().is_some() {
        return;
    }
    let pid = Pid::from_raw(node.child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < NODE_STOP_TIMEOUT {
        if node.child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "node {} did not stop in {:?}; killing it",
        pid, NODE_STOP_TIMEOUT
    );
    let _ = node.child.kill();
    let _ = node.child.wait();
}

async fn set_up(client: &mut Client, endpoint: &str, dir: &Path) -> Result<String> {
    let token_path = dir.join("keys").join("operator.token");
    let req = client.request(api::StatusRequest {});
    let initialized = match client.api().status(req).await {
        Ok(s) => s.into_inner().initialized,
        Err(s) if s.code() == tonic::Code::Unauthenticated => true,
        Err(s) => return Err(s.into()),
    };
    if !initialized {
        let req = client.request(api::ClusterInitRequest {
            site: "primary".into(),
        });
        let r = client.api().cluster_init(req).await?.into_inner();
        write_secret(&token_path, &r.operator_token)?;
        println!("initialised cluster {}", r.cluster_id);
    }
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("read the operator token {}", token_path.display()))?
        .trim()
        .to_owned();
    let mut c = Client::connect(endpoint, Some(token.clone())).await?;
    let req = c.request(api::ListTenantsRequest {});
    let tenants = c.api().list_tenants(req).await?.into_inner().tenants;
    if !tenants.iter().any(|t| t.name == "demo") {
        let req = c.request(api::CreateTenantRequest {
            name: "demo".into(),
        });
        c.api().create_tenant(req).await?;
    }
    let req = c.request(api::ListVolumesRequest {
        tenant: "demo".into(),
    });
    let volumes = c.api().list_volumes(req).await?.into_inner().volumes;
    if !volumes.iter().any(|v| v.name == "demo/disk0") {
        let req = c.request(api::CreateVolumeRequest {
            name: "demo/disk0".into(),
            size_bytes: 1 << 30,
            pg: String::new(),
        });
        c.api().create_volume(req).await?;
    }
    Ok(token)
}

pub async fn run(args: UpArgs) -> Result<()> {
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir.join("keys"))
        .with_context(|| format!("create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let mut node = start_node(&dir, 0, &args)?;
    let result = async {
        let mut client = wait_ready(&mut node, &dir).await?;
        set_up(&mut client, &node.endpoint, &dir).await
    }
    .await;
    let token = match result {
        Ok(t) => t,
        Err(e) => {
            stop_node(&mut node);
            return Err(e);
        }
    };

    let c = &node.config;
    let nbd_uri = format!("nbd://{}/demo/disk0", c.nbd.listen);
    let env = [
        ("LIFEBOAT_ENDPOINT", node.endpoint.clone()),
        ("LIFEBOAT_TOKEN", token),
        ("NBD_URI", nbd_uri.clone()),
        ("SITE_0", c.site.clone()),
        ("ROLE_0", "data".into()),
        ("PID_0", node.child.id().to_string()),
        ("LIFEBOAT_ENDPOINT_0", node.endpoint.clone()),
        ("NBD_URI_0", nbd_uri.clone()),
        ("METRICS_URL_0", format!("http://{}/metrics", c.http.listen)),
    ];
    let env_text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let env_path = dir.join("up.env");
    write_secret(&env_path, env_text.trim_end())?;

    println!("Lifeboat is up: 1 node at site {}", c.site);
    println!("  admin API   {}", node.endpoint);
    println!("  NBD         {nbd_uri}   (volume demo/disk0, 1 GiB)");
    println!("  metrics     http://{}/metrics", c.http.listen);
    println!("  node log    {}", dir.join("nodes/0/node.log").display());
    println!(
        "  credentials {}   (source it: set -a; . {}; set +a)",
        env_path.display(),
        env_path.display()
    );

    if args.detach {
        println!("detached: stop with kill {}", node.child.id());
        return Ok(());
    }
    println!("Press Ctrl-C to stop.");
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let exited = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = term.recv() => break None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(status) = node.child.try_wait()? {
                    break Some(status);
                }
            }
        }
    };
    if let Some(status) = exited {
        bail!(
            "node 0 exited ({status}); see {}",
            dir.join("nodes/0/node.log").display()
        );
    }
    println!("stopping…");
    tokio::task::block_in_place(|| stop_node(&mut node));
    println!(
        "stopped; `lifeboat up --data-dir {}` resumes with the data intact",
        dir.display()
    );
    Ok(())
}
