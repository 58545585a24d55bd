//! `lifeboat up`: a local cluster on loopback for trying Lifeboat out and
//! for tests: `--primary N` nodes at site `primary` and `--dr M` at site
//! `dr` (three and two by default), and last a witness at site `witness`
//! (unless `--no-witness`), each its own process. Node 0 initialises the
//! cluster and adds the others; the demo tenant's PG then has its voters at
//! `primary` and learners at `dr`, and the catalog's voters are two nodes of
//! each site and the witness. Layout under `--data-dir DIR`:
//!
//! ```text
//! DIR/nodes/i/node.toml   node i's config (made once, then reused)
//! DIR/nodes/i/db …        its data directory
//! DIR/nodes/i/node.log    its log
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
    /// Added to every default port (7700, 7800, 10809, 9100, 9000), to run
    /// several clusters side by side. Node i adds i.
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Nodes at site `primary` (the first is node 0).
    #[arg(long, default_value_t = 3)]
    primary: u16,
    /// Nodes at site `dr` (the disaster-recovery site).
    #[arg(long, default_value_t = 2)]
    dr: u16,
    /// Start no witness. By default the last node is a witness at site
    /// `witness`: it votes in the catalog, so that losing either site
    /// leaves the catalog a quorum.
    #[arg(long)]
    no_witness: bool,
    /// Start, set up and print, then exit and leave the nodes running
    /// (stop them with `kill $PID_0 $PID_1 …`).
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
    index: u16,
    child: Child,
    config: NodeConfig,
    endpoint: String,
}

impl UpArgs {
    fn nodes(&self) -> u16 {
        self.primary + self.dr + u16::from(!self.no_witness)
    }

    fn is_witness(&self, index: u16) -> bool {
        !self.no_witness && index == self.primary + self.dr
    }
}

fn node_config(index: u16, args: &UpArgs) -> NodeConfig {
    let port =
        |base: u16| std::net::SocketAddr::from(([127, 0, 0, 1], base + args.port_offset + index));
    let site = if args.is_witness(index) {
        "witness"
    } else if index < args.primary {
        "primary"
    } else {
        "dr"
    };
    let mut c = NodeConfig {
        node_id: u64::from(index) + 1,
        site: site.into(),
        role: if args.is_witness(index) {
            lifeboat_node::config::NodeRole::Witness
        } else {
            lifeboat_node::config::NodeRole::Data
        },
        data_dir: PathBuf::from("."),
        master_key_file: PathBuf::from("../../keys/master.key"),
        ..NodeConfig::default()
    };
    c.raft.listen = port(7800);
    c.admin.listen = port(7700);
    c.nbd.listen = port(10809);
    c.http.listen = port(9100);
    c.s3.listen = port(9000);
    c.raft.heartbeat_interval_ms = args.heartbeat_ms;
    c.raft.election_timeout_min_ms = args.heartbeat_ms * 4;
    c.raft.election_timeout_max_ms = args.heartbeat_ms * 8;
    // Leases of four heartbeats (2 s at the default): a cut-off site stops
    // acknowledging, and a forced failover can serve, that soon.
    c.raft.lease_ms = args.heartbeat_ms * 4;
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
        index,
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
                "node {} exited during start ({status}); see {}",
                node.index,
                dir.join(format!("nodes/{}/node.log", node.index)).display()
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

async fn set_up(client: &mut Client, nodes: &[NodeProcess], dir: &Path) -> Result<SetUp> {
    let endpoint = &nodes[0].endpoint;
    let token_path = dir.join("keys").join("operator.token");
    let req = client.request(api::StatusRequest {});
    let initialized = match client.api().status(req).await {
        Ok(s) => s.into_inner().initialized,
        Err(s) if s.code() == tonic::Code::Unauthenticated => true,
        Err(s) => return Err(s.into()),
    };
    if !initialized {
        let req = client.request(api::ClusterInitRequest {
            site: nodes[0].config.site.clone(),
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
    let req = c.request(api::ListNodesRequest {});
    let known = c.api().list_nodes(req).await?.into_inner().nodes;
    for n in &nodes[1..] {
        if known.iter().any(|k| k.id == n.config.node_id) {
            continue;
        }
        // A one-time token per node; the new node joins with it.
        let req = c.request(api::CreateJoinTokenRequest {
            site: n.config.site.clone(),
            ttl_seconds: 600,
        });
        let join_token = c.api().create_join_token(req).await?.into_inner().token;
        let mut new = Client::connect(&format!("http://{}", n.config.admin.listen), None).await?;
        let req = new.request(api::JoinClusterRequest { token: join_token });
        new.api().join_cluster(req).await.with_context(|| {
            format!("join node {} ({})", n.config.node_id, n.config.admin.listen)
        })?;
        println!("added node {} at site {}", n.config.node_id, n.config.site);
    }
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
    let req = c.request(api::ListBucketsRequest {
        tenant: "demo".into(),
    });
    let buckets = c.api().list_buckets(req).await?.into_inner().buckets;
    if !buckets.iter().any(|b| b.name == "demo/demo-backups") {
        let req = c.request(api::CreateBucketRequest {
            name: "demo/demo-backups".into(),
            pg: String::new(),
        });
        c.api().create_bucket(req).await?;
    }
    let s3 = demo_credential(&mut c, dir).await?;
    Ok(SetUp { token, s3 })
}

struct SetUp {
    token: String,
    /// The demo tenant's S3 access key and secret.
    s3: (String, String),
}

/// The demo tenant's S3 credential: the one made by an earlier `up` on
/// this data directory while it still exists (a secret is shown only once,
/// so it is kept beside the operator token), else a new one.
async fn demo_credential(c: &mut Client, dir: &Path) -> Result<(String, String)> {
    let path = dir.join("keys").join("demo-s3.credential");
    let req = c.request(api::ListCredentialsRequest {
        tenant: "demo".into(),
    });
    let existing = c
        .api()
        .list_credentials(req)
        .await?
        .into_inner()
        .credentials;
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some((key, secret)) = text.trim().split_once('\n')
        && existing.iter().any(|e| e.access_key == key)
    {
        return Ok((key.to_owned(), secret.to_owned()));
    }
    let req = c.request(api::CreateCredentialRequest {
        tenant: "demo".into(),
        mode: "full".into(),
        writable_prefix: None,
    });
    let created = c.api().create_credential(req).await?.into_inner();
    let key = created
        .credential
        .map(|c| c.access_key)
        .context("the new credential came back without its access key")?;
    write_secret(&path, &format!("{key}\n{}", created.secret_key))?;
    Ok((key, created.secret_key))
}

fn stop_all(nodes: &mut [NodeProcess]) {
    // SIGTERM everyone first, then wait: nodes stop in parallel.
    for n in nodes.iter_mut() {
        if n.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(n.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    for n in nodes.iter_mut() {
        stop_node(n);
    }
}

pub async fn run(args: UpArgs) -> Result<()> {
    if args.primary == 0 {
        bail!("--primary must be at least 1: node 0 is at the primary site");
    }
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir.join("keys"))
        .with_context(|| format!("create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let mut nodes = Vec::new();
    for i in 0..args.nodes() {
        match start_node(&dir, i, &args) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
    }
    let result = async {
        let mut first = None;
        for n in nodes.iter_mut() {
            let c = wait_ready(n, &dir).await?;
            first.get_or_insert(c);
        }
        let mut client = first.expect("at least one node");
        set_up(&mut client, &nodes, &dir).await
    }
    .await;
    let SetUp { token, s3 } = match result {
        Ok(t) => t,
        Err(e) => {
            stop_all(&mut nodes);
            return Err(e);
        }
    };

    let n0 = &nodes[0];
    let nbd_uri = |n: &NodeProcess| format!("nbd://{}/demo/disk0", n.config.nbd.listen);
    let s3_url = |n: &NodeProcess| format!("http://{}", n.config.s3.listen);
    let mut env = vec![
        ("LIFEBOAT_ENDPOINT".to_string(), n0.endpoint.clone()),
        ("LIFEBOAT_TOKEN".to_string(), token),
        ("NBD_URI".to_string(), nbd_uri(n0)),
        ("AWS_ENDPOINT_URL".to_string(), s3_url(n0)),
        ("AWS_ACCESS_KEY_ID".to_string(), s3.0),
        ("AWS_SECRET_ACCESS_KEY".to_string(), s3.1),
        (
            "AWS_DEFAULT_REGION".to_string(),
            n0.config.s3.region.clone(),
        ),
    ];
    for n in &nodes {
        let i = n.index;
        let witness = n.config.role.is_witness();
        env.push((format!("SITE_{i}"), n.config.site.clone()));
        env.push((
            format!("ROLE_{i}"),
            if witness { "witness" } else { "data" }.into(),
        ));
        env.push((format!("PID_{i}"), n.child.id().to_string()));
        env.push((format!("LIFEBOAT_ENDPOINT_{i}"), n.endpoint.clone()));
        if !witness {
            env.push((format!("NBD_URI_{i}"), nbd_uri(n)));
            env.push((format!("S3_ENDPOINT_{i}"), s3_url(n)));
        }
        env.push((
            format!("METRICS_URL_{i}"),
            format!("http://{}/metrics", n.config.http.listen),
        ));
    }
    let env_text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let env_path = dir.join("up.env");
    write_secret(&env_path, env_text.trim_end())?;

    println!(
        "Lifeboat is up: {} node(s) at site primary, {} at site dr{}",
        args.primary,
        args.dr,
        if args.no_witness {
            ""
        } else {
            ", a witness at site witness"
        }
    );
    for n in &nodes {
        if n.config.role.is_witness() {
            println!(
                "  node {} (witness) admin {}   catalog votes only   metrics http://{}/metrics",
                n.index, n.endpoint, n.config.http.listen
            );
            continue;
        }
        println!(
            "  node {} ({:<7}) admin {}   NBD {}   S3 {}   metrics http://{}/metrics",
            n.index,
            n.config.site,
            n.endpoint,
            nbd_uri(n),
            s3_url(n),
            n.config.http.listen
        );
    }
    println!(
        "  volume      demo/disk0, 1 GiB, in PG demo/main (voters at primary, learners at dr)"
    );
    println!("  bucket      demo-backups, in PG demo/main; S3 credential in up.env");
    println!("  node logs   {}", dir.join("nodes/*/node.log").display());
    println!(
        "  credentials {}   (source it: set -a; . {}; set +a)",
        env_path.display(),
        env_path.display()
    );

    if args.detach {
        let pids: Vec<String> = nodes.iter().map(|n| n.child.id().to_string()).collect();
        println!("detached: stop with kill {}", pids.join(" "));
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
                let mut gone = None;
                for n in nodes.iter_mut() {
                    if let Some(status) = n.child.try_wait()? {
                        gone = Some((n.index, status));
                    }
                }
                if gone.is_some() {
                    break gone;
                }
            }
        }
    };
    if let Some((index, status)) = exited {
        eprintln!(
            "node {index} exited ({status}); see {}",
            dir.join(format!("nodes/{index}/node.log")).display()
        );
        eprintln!("the other nodes keep running the cluster; stopping them too");
        tokio::task::block_in_place(|| stop_all(&mut nodes));
        bail!("node {index} exited");
    }
    println!("stopping…");
    tokio::task::block_in_place(|| stop_all(&mut nodes));
    println!(
        "stopped; `lifeboat up --data-dir {}` resumes with the data intact",
        dir.display()
    );
    Ok(())
}
