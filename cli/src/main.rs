//! `lifeboat`: the operator's and tenant's command line, the node daemon
//! (`node start`) and the local cluster launcher (`up`).
//!
//! Exit codes (stable, for scripts):
//! 0 success · 1 failure · 2 usage · 3 not found · 4 already exists ·
//! 5 unauthenticated or permission denied · 6 unavailable or not initialised ·
//! 7 invalid argument · 8 out of space · 74 stdout could not be written ·
//! 141 stdout's reader went away (as a shell reports a SIGPIPE death).

/// `println!` for a command's output. A reader that went away (`lifeboat
/// node list | head -1`) ends the command quietly with the status a shell
/// reports for a SIGPIPE death, where `println!` would panic on EPIPE
/// (Rust ignores SIGPIPE, and restoring it would take `unsafe`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::output::stdout_failed(e);
        }
    }};
}

/// `print!` for a command's output, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            $crate::output::stdout_failed(e);
        }
    }};
}

mod drill;
mod output;
mod size;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lifeboat_proto::admin as api;
use lifeboat_proto::admin::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::output::{Output, Table};

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Lifeboat: replicated, encrypted disaster-recovery storage"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct GlobalArgs {
    /// Admin API of any node.
    #[arg(
        long,
        global = true,
        env = "LIFEBOAT_ENDPOINT",
        default_value = "http://127.0.0.1:7700"
    )]
    endpoint: String,
    /// File holding the bearer token (else LIFEBOAT_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Tables for people, JSON for scripts.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local two-site cluster (3 primary + 2 DR nodes by default),
    /// print its endpoints, write up.env.
    Up(up::UpArgs),
    /// Run or manage nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create or inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Manage tenants (hosted departments).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage block volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Manage S3 buckets (names are unique in the cluster).
    #[command(subcommand)]
    Bucket(BucketCommand),
    /// The sites of the cluster: nodes, catalog voters, active PGs.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Manage protection groups (a tenant's unit of replication, ack policy
    /// and history).
    #[command(subcommand)]
    Pg(PgCommand),
    /// Named restore points of a whole protection group: every volume and
    /// bucket at one moment, kept until deleted, lockable until a date.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Roll every volume and bucket of a protection group back to a restore
    /// point, in place: one log entry whatever the data size, nothing
    /// deleted, undone by `restore TENANT/PG --undo`. Shows the plan and
    /// asks before it acts.
    Restore(RestoreArgs),
    /// Move protection groups' voters and leadership to another site.
    /// `--planned` is the switchover of a healthy cluster: nothing
    /// acknowledged is lost (RPO 0) and clients see a pause, not errors.
    /// Waits until every PG is led from the target site.
    Failover(FailoverArgs),
    /// Going back to a site after a forced failover away from it.
    #[command(subcommand)]
    Failback(FailbackCommand),
    /// Failover drills: rehearse a failover at a standby site while
    /// production runs, and report the measured RPO and RTO.
    #[command(subcommand)]
    Drill(drill::DrillCommand),
    /// What this node has reported to operators (ack policy degradations,
    /// lease expiries, switchover steps, …), oldest first.
    Events {
        /// Keep printing new events as they come (JSON: one per line).
        #[arg(long)]
        follow: bool,
    },
    /// This node, its protection groups and their progress.
    Status,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Run a node in the foreground until SIGINT or SIGTERM.
    Start {
        #[arg(long)]
        config: PathBuf,
        /// `witness`: only vote in the catalog from a third location (no
        /// data, no keys, no clients); overrides the config's `role`.
        #[arg(long, value_parser = ["data", "witness"])]
        role: Option<String>,
    },
    /// Add a started node that is in no cluster yet: makes a join token
    /// here and tells the new node (at its admin endpoint) to join with it.
    Add {
        /// The new node's admin endpoint, like http://10.0.2.11:7700.
        new_node: String,
        /// The site it must be at (default: whatever its config says).
        #[arg(long, default_value = "")]
        site: String,
    },
    /// Make a one-time token with which one new node joins (`node join`).
    JoinToken {
        /// The joining node's site must be this one (default: any).
        #[arg(long, default_value = "")]
        site: String,
        /// Seconds the token may be used.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Join the cluster a token names; run against the NEW node's endpoint.
    Join { token: String },
    /// Every node of the cluster, with its catalog role and reachability.
    List,
    /// Retire a node for ever (dead or decommissioned): its members leave
    /// every PG and are re-placed on other nodes. Its id is never reused.
    Remove { node_id: u64 },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Initialise a new cluster on an uninitialised node: makes the master
    /// key file and prints the operator token (once: keep it).
    Init {
        /// The site of the first node (default: its configured site).
        #[arg(long, default_value = "")]
        site: String,
        /// Also write the token to this file (mode 0600).
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
    /// The cluster as seen by the node.
    Status,
}

#[derive(Subcommand)]
enum TenantCommand {
    Create {
        name: String,
    },
    /// Issue a tenant's NBD client certificate.
    #[command(subcommand)]
    Cert(TenantCertCommand),
    /// A tenant's S3 credentials (access key and secret).
    #[command(subcommand)]
    Credential(TenantCredentialCommand),
    /// A tenant's admin tokens: its department manages its own snapshots
    /// (and volumes and buckets) with one, and nothing else.
    #[command(subcommand)]
    Token(TenantTokenCommand),
    List,
    /// Start a new data-encryption key for new writes; old data stays readable.
    RotateDek {
        name: String,
    },
    /// Cap what a tenant's PGs may store together (live data, history and
    /// snapshots all count). At the quota, writes that add data are
    /// refused (NBD ENOSPC, S3 QuotaExceeded); history is never dropped
    /// to make room.
    Quota {
        name: String,
        /// The quota, e.g. 500GiB or 2TiB.
        #[arg(long, value_parser = parse_quota, required_unless_present = "none")]
        bytes: Option<u64>,
        /// Remove the quota.
        #[arg(long, conflicts_with = "bytes")]
        none: bool,
    },
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Every site that has nodes, with how many answer now, its catalog
    /// voters and the PGs active there.
    List,
}

#[derive(Subcommand)]
enum TenantCredentialCommand {
    /// Create a credential for TENANT and print its access key and secret
    /// (shown this once; the cluster keeps the secret sealed).
    Create {
        tenant: String,
        /// Read and list only.
        #[arg(long, conflicts_with = "append_only")]
        read_only: bool,
        /// Read, list and create; no overwrite or delete outside
        /// --writable-prefix (what restic needs, so a backup client cannot
        /// destroy its own history).
        #[arg(long)]
        append_only: bool,
        /// With --append-only: where overwrite and delete stay allowed.
        #[arg(long, requires = "append_only")]
        writable_prefix: Option<String>,
    },
    /// Credentials (never their secrets), of TENANT or of every tenant the
    /// token may see.
    List { tenant: Option<String> },
    /// Refuse every later request signed with ACCESS_KEY.
    Revoke { access_key: String },
}

#[derive(Subcommand)]
enum TenantTokenCommand {
    /// Create a token for TENANT and print it (shown this once; the
    /// cluster keeps only its hash). Use it as LIFEBOAT_TOKEN.
    Create { tenant: String },
    /// Tokens (never the tokens themselves): id, role, created.
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Refuse every later request with the token of this id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum TenantCertCommand {
    /// Make a key here and have the cluster CA sign a client certificate
    /// for TENANT: writes ca-cert.pem, client-cert.pem and client-key.pem
    /// (mode 0600) into --out, the layout qemu and libnbd read.
    Create {
        tenant: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PgCommand {
    /// Create TENANT/NAME: voters at the cluster's site, learners at every
    /// other site.
    Create {
        name: String,
        /// `local`: acknowledged once a quorum of the active site has a
        /// write; `remote`: also once a standby site has it (degrades to
        /// local after raft.remote_timeout_ms, returns after catch-up).
        #[arg(long, default_value = "local", value_parser = ["local", "remote"])]
        ack: String,
    },
    /// Every protection group (of one tenant with --tenant).
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// One protection group: members, ack policy, and its progress here.
    Show { name: String },
    /// A digest of this node's replica of a protection group: replicas at
    /// the same applied index must print the same.
    Digest { name: String },
    /// Set how far back every moment stays restorable (like 24h, 7d);
    /// older versions that no snapshot, clone or restore needs are deleted.
    SetWindow { name: String, window: String },
    /// Change a protection group's ack policy.
    SetAck {
        name: String,
        #[arg(value_parser = ["local", "remote"])]
        ack: String,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Pin the state of TENANT/PG now (or at --at) under a name.
    Create {
        /// TENANT/PG
        pg: String,
        /// Default: snap-YYYYMMDD-HHMMSS (UTC).
        #[arg(long, default_value = "")]
        name: String,
        /// A past moment instead of now: RFC 3339 (2026-11-28T10:13:00Z)
        /// or relative (-15m, -2h).
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        at: String,
        /// Lock it against deletion until then: RFC 3339 or +30d.
        #[arg(long, default_value = "")]
        lock_until: String,
    },
    /// Every snapshot of TENANT/PG; with --divergence, what old active
    /// sites wrote after a forced failover's fork (every PG when none is
    /// named).
    List {
        /// TENANT/PG
        #[arg(required_unless_present = "divergence", default_value = "")]
        pg: String,
        /// List divergence snapshots: read-only clones of the volumes an
        /// old site changed after the fork, as it left them.
        #[arg(long)]
        divergence: bool,
    },
    /// One snapshot: TENANT/PG@NAME.
    Show { snapshot: String },
    /// Delete TENANT/PG@NAME (refused while locked, but to an operator).
    Delete { snapshot: String },
    /// Snapshot TENANT/PG every period (named auto-YYYYMMDD-HHMMSS) and
    /// keep the scheduled snapshots restic's rules keep; --off stops it.
    Schedule {
        /// TENANT/PG
        pg: String,
        /// Like 1h, 30m, 1d.
        #[arg(long, conflicts_with = "off", required_unless_present = "off")]
        every: Option<String>,
        #[arg(long)]
        off: bool,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
    },
    /// Lock TENANT/PG@NAME until a date (RFC 3339 or +30d). Anyone may
    /// extend a lock; only an operator may shorten one that holds.
    Lock {
        snapshot: String,
        #[arg(long)]
        until: String,
    },
}

#[derive(Subcommand)]
enum FailbackCommand {
    /// Re-protect: wait until every PG active at another site has a
    /// caught-up member at SITE (the old site's nodes rejoin on their own
    /// once back, by a delta resync of what changed since the fork), and
    /// show what each resync moved. Then `lifeboat failover --planned --to
    /// SITE` goes back with nothing lost.
    Prepare {
        /// The site the PGs go back to.
        #[arg(long)]
        site: String,
        /// TENANT/PG (repeatable; default: every PG active elsewhere).
        #[arg(long = "pg")]
        pgs: Vec<String>,
        /// Seconds to wait for every member to catch up.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(clap::Args)]
struct FailoverArgs {
    /// A planned switchover: both sites are up; nothing is lost.
    #[arg(long, required_unless_present = "force", conflicts_with = "force")]
    planned: bool,
    /// A forced failover: the active site is lost. Refused while this node
    /// still reaches a majority of a PG's voters. Waits out the old site's
    /// lease, then starts a new generation at the target from the standby
    /// that holds the most, and prints what may have been lost.
    #[arg(long)]
    force: bool,
    /// With --force, when the catalog has lost its quorum too (the active
    /// site and the witness are gone, or there was no witness): rebuild the
    /// catalog at the target site as a new cluster generation with a new
    /// CA, fail every PG over, and remove the nodes that did not answer.
    /// Run it on a node of the target site. Refused while that node reaches
    /// a majority of the catalog's voters. The old site's nodes must then
    /// be kept down or wiped.
    #[arg(long, requires = "force", conflicts_with = "pgs")]
    catalog_lost: bool,
    /// The site that takes the PGs over.
    #[arg(long)]
    to: String,
    /// TENANT/PG to move (repeatable; default: every PG).
    #[arg(long = "pg")]
    pgs: Vec<String>,
    /// Seconds to wait for every PG to be led from the target site.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// What `failover --force --catalog-lost` did, and what it leaves to the
/// operator.
fn print_catalog_rebuild(b: &api::CatalogRebuild) {
    outln!(
        "the catalog was rebuilt at {} from node {}'s replica (its last index {}): cluster {} is now cluster {}, generation {}, with a new CA; nodes in it: {:?}",
        b.site,
        b.catalog_node,
        b.catalog_fork_index,
        b.previous_cluster_id,
        b.cluster_id,
        b.generation,
        b.survivors
    );
    if !b.removed.is_empty() {
        outln!(
            "removed from the cluster: nodes {:?}. KEEP THEM DOWN OR WIPE THEM: if they come back they still form the old cluster with its own catalog and serve their own clients, and nothing here can stop that. The rebuilt cluster refuses them (another CA, another cluster id); a wiped node comes back with `lifeboat node add` under a new node id",
            b.removed
        );
    }
    outln!(
        "tenant NBD client certificates of the old CA no longer verify: issue new ones with `lifeboat tenant cert create`; join tokens made before are void"
    );
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// TENANT/PG
    pg: String,
    /// RFC 3339 (2026-11-28T10:13:00Z) or relative (-15m).
    #[arg(long, allow_hyphen_values = true, required_unless_present_any = ["snapshot", "undo"], conflicts_with_all = ["snapshot", "undo"])]
    at: Option<String>,
    /// A snapshot of the PG (its name, without TENANT/PG@).
    #[arg(long, conflicts_with = "undo")]
    snapshot: Option<String>,
    /// Undo the newest restore (back to the state just before it).
    #[arg(long)]
    undo: bool,
    /// Show what would change, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

/// `TENANT/PG@NAME` as (TENANT/PG, NAME).
fn split_snapshot_ref(text: &str) -> anyhow::Result<api::SnapshotRef> {
    match text.split_once('@') {
        Some((pg, name)) if !pg.is_empty() && !name.is_empty() => Ok(api::SnapshotRef {
            pg: pg.to_owned(),
            name: name.to_owned(),
        }),
        _ => anyhow::bail!("{text:?} is not a snapshot: write TENANT/PG@NAME"),
    }
}

/// The restore point a clone starts from: exactly one of a time and a
/// snapshot.
#[derive(clap::Args)]
struct ClonePoint {
    /// RFC 3339 (2026-11-28T10:13:00Z) or relative (-15m).
    #[arg(
        long,
        conflicts_with = "snapshot",
        required_unless_present = "snapshot",
        allow_hyphen_values = true
    )]
    at: Option<String>,
    /// A snapshot of the source's protection group.
    #[arg(long)]
    snapshot: Option<String>,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Bring back the most recently deleted volume TENANT/VOLUME, with its
    /// data and history (its name must be free).
    Undelete {
        name: String,
    },
    /// Clone SOURCE as NEW (same tenant and protection group) at a restore
    /// point: writable, copy-on-write, ready at once whatever the size.
    Clone {
        source: String,
        new: String,
        #[command(flatten)]
        point: ClonePoint,
    },
    /// Create TENANT/VOLUME of SIZE (like 10GiB).
    Create {
        name: String,
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        /// Protection group within the tenant.
        #[arg(long, default_value = "main")]
        pg: String,
    },
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Grow a volume (shrinking is refused: it would drop data).
    Resize {
        name: String,
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum BucketCommand {
    /// Create TENANT/BUCKET; BUCKET follows S3's naming rules.
    Create {
        name: String,
        /// Protection group within the tenant.
        #[arg(long, default_value = "main")]
        pg: String,
    },
    List {
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Delete an empty bucket (refused while it holds objects).
    Delete { name: String },
    /// Bring back the most recently deleted bucket TENANT/BUCKET with its
    /// history (its name must be free): clone or restore it at a time
    /// before its objects were deleted to see them again.
    Undelete { name: String },
    /// A clone NEW of SOURCE (both TENANT/BUCKET) as it was at a restore
    /// point, ready at once whatever its size: S3 reads and lists show that
    /// moment's objects. It takes writes and deletes of its own
    /// (copy-on-write) that never touch SOURCE, unless --read-only.
    Clone {
        source: String,
        new: String,
        #[command(flatten)]
        point: ClonePoint,
        /// Refuse every write and delete through S3.
        #[arg(long)]
        read_only: bool,
    },
}

/// An error that carries its exit code.
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}
impl std::error::Error for Exit {}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
        return *code;
    }
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        use tonic::Code;
        return match status.code() {
            Code::NotFound => 3,
            Code::AlreadyExists => 4,
            Code::Unauthenticated | Code::PermissionDenied => 5,
            Code::Unavailable | Code::FailedPrecondition => 6,
            Code::InvalidArgument => 7,
            Code::ResourceExhausted => 8,
            _ => 1,
        };
    }
    1
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // s3s logs every S3 client error (a wrong signature, a missing key) at
    // ERROR; the gateway logs its own faults, so s3s is quiet by default.
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,s3s=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build tokio runtime");
    let result = runtime.block_on(run(cli));
    // Drop every task (and its database handles) and wait for blocking
    // work before the process exits, so RocksDB closes on this thread.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code_of(&e);
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                eprintln!("error: {}", status.message());
            } else {
                // An Exit carries only the code; its context says why (a
                // bare Exit has already said it).
                let why: Vec<String> = e
                    .chain()
                    .filter(|c| c.downcast_ref::<Exit>().is_none())
                    .map(|c| c.to_string())
                    .collect();
                if !why.is_empty() {
                    eprintln!("error: {}", why.join(": "));
                }
            }
            ExitCode::from(code)
        }
    }
}

pub(crate) fn read_token(global: &GlobalArgs) -> Result<Option<String>> {
    if let Some(path) = &global.token_file {
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("read token file {}", path.display()))?;
        return Ok(Some(t.trim().to_owned()));
    }
    Ok(std::env::var("LIFEBOAT_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned()))
}

pub(crate) struct Client {
    inner: AdminClient<Channel>,
    token: Option<String>,
}

impl Client {
    pub(crate) async fn connect(endpoint: &str, token: Option<String>) -> Result<Client> {
        let channel = Channel::from_shared(endpoint.to_owned())
            .with_context(|| {
                format!("endpoint {endpoint:?} is not a URL like http://127.0.0.1:7700")
            })?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                anyhow::Error::new(Exit(6))
                    .context(format!("connect to {endpoint}: {e}; is the node running?"))
            })?;
        Ok(Client {
            inner: AdminClient::new(channel),
            token,
        })
    }

    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    pub(crate) fn token(&self) -> &Option<String> {
        &self.token
    }

    pub(crate) fn api(&mut self) -> &mut AdminClient<Channel> {
        &mut self.inner
    }
}

async fn run(cli: Cli) -> Result<()> {
    let out = Output::new(cli.global.output == OutputFormat::Json);
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Node(NodeCommand::Start { config, role }) => node_start(config, role).await,
        command => {
            let token = read_token(&cli.global)?;
            let mut client = Client::connect(&cli.global.endpoint, token).await?;
            admin_command(&mut client, command, &out).await
        }
    }
}

async fn node_start(config_path: PathBuf, role: Option<String>) -> Result<()> {
    let mut config = lifeboat_node::NodeConfig::load(&config_path)?;
    match role.as_deref() {
        Some("witness") => config.role = lifeboat_node::config::NodeRole::Witness,
        Some("data") => config.role = lifeboat_node::config::NodeRole::Data,
        _ => {}
    }
    let shutdown = tokio_util_shutdown();
    lifeboat_node::server::run(config, shutdown).await?;
    Ok(())
}

/// A token cancelled on SIGINT or SIGTERM.
fn tokio_util_shutdown() -> lifeboat_node::server::Shutdown {
    let token = lifeboat_node::server::Shutdown::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        t.cancel();
    });
    token
}

async fn admin_command(client: &mut Client, command: Command, out: &Output) -> Result<()> {
    match command {
        Command::Cluster(ClusterCommand::Init { site, token_out }) => {
            let req = client.request(api::ClusterInitRequest { site });
            let r = client.api().cluster_init(req).await?.into_inner();
            if let Some(path) = token_out {
                up::write_secret(&path, &r.operator_token)?;
            }
            if out.json {
                out.json_value(&serde_json::json!({
                    "cluster_id": r.cluster_id,
                    "operator_token": r.operator_token,
                    "master_key_file": r.master_key_file,
                }));
            } else {
                outln!("cluster {} initialised", r.cluster_id);
                outln!(
                    "master key file: {} (back it up; it never lives in a data directory)",
                    r.master_key_file
                );
                outln!("operator token (shown once, keep it): {}", r.operator_token);
            }
        }
        Command::Cluster(ClusterCommand::Status) | Command::Status => {
            let req = client.request(api::StatusRequest {});
            let s = client.api().status(req).await?.into_inner();
            if out.json {
                out.json_value(&serde_json::json!({
                    "initialized": s.initialized,
                    "cluster_id": s.cluster_id,
                    "cluster_generation": s.cluster_generation,
                    "node_id": s.node_id,
                    "site": s.site,
                    "version": s.version,
                    "data_dir_free_bytes": s.data_dir_free_bytes,
                    "reserve_bytes": s.reserve_bytes,
                    "writes_refused": s.writes_refused,
                    "log_segment_pool_bytes": s.log_segment_pool_bytes,
                    "lease_remaining_ms": s.lease_remaining_ms,
                    "lease_pgs": s.lease_pgs,
                    "pgs": s.pgs.iter().map(pg_status_json).collect::<Vec<_>>(),
                }));
            } else {
                outln!(
                    "node {} at site {} · cluster {}{} · lifeboat {}",
                    s.node_id,
                    s.site,
                    if s.initialized {
                        s.cluster_id.as_str()
                    } else {
                        "(not initialised)"
                    },
                    if s.cluster_generation > 0 {
                        format!(
                            " (rebuilt {} time(s) after a lost catalog)",
                            s.cluster_generation
                        )
                    } else {
                        String::new()
                    },
                    s.version
                );
                outln!(
                    "free space {} (reserve {}){}{}",
                    size::format_size(s.data_dir_free_bytes),
                    size::format_size(s.reserve_bytes),
                    if s.log_segment_pool_bytes > 0 {
                        format!(
                            " · {} more in log segments kept for reuse",
                            size::format_size(s.log_segment_pool_bytes)
                        )
                    } else {
                        String::new()
                    },
                    if s.writes_refused {
                        " · WRITES REFUSED: free space at reserve"
                    } else {
                        ""
                    }
                );
                outln!(
                    "site lease: {} · covers {} PG(s)",
                    if s.lease_remaining_ms == 0 {
                        "NONE (this node's PG leaders acknowledge nothing)".to_owned()
                    } else {
                        format!("{:.1} s left", s.lease_remaining_ms as f64 / 1000.0)
                    },
                    s.lease_pgs
                );
                let mut t = Table::new(&[
                    "PG",
                    "ID",
                    "GEN",
                    "HERE",
                    "LEADER",
                    "APPLIED",
                    "LOG",
                    "LOG BYTES",
                    "RAFT SNAPSHOT",
                    "VOLUMES",
                    "RESTORABLE FROM",
                ]);
                let mut usage = Table::new(&[
                    "PG",
                    "STORED",
                    "VERSIONS",
                    "LIVE",
                    "HISTORY",
                    "PINNED",
                    "COUNTED AT",
                ]);
                let mut tenants: std::collections::BTreeMap<String, u64> = Default::default();
                let mut lag = Table::new(&[
                    "PG",
                    "MEMBER",
                    "NODE",
                    "SITE",
                    "ROLE",
                    "MATCHED",
                    "LAG ENTRIES",
                    "LAG BYTES",
                    "LAG SECONDS",
                ]);
                for p in s.pgs {
                    if p.id != 0 {
                        let tenant = p.name.split('/').next().unwrap_or_default().to_string();
                        *tenants.entry(tenant).or_default() += p.stored_bytes;
                        let counted = p.census_ms != 0;
                        let census = |bytes: u64| {
                            if counted {
                                size::format_size(bytes)
                            } else {
                                "-".into()
                            }
                        };
                        usage.row(vec![
                            p.name.clone(),
                            size::format_size(p.stored_bytes),
                            p.versions.to_string(),
                            census(p.live_bytes),
                            census(p.history_bytes),
                            census(p.pinned_bytes),
                            if counted {
                                format_time_ms(p.census_ms)
                            } else {
                                "not yet".into()
                            },
                        ]);
                    }
                    for l in &p.lag {
                        lag.row(vec![
                            p.name.clone(),
                            l.member_id.to_string(),
                            l.node_id.to_string(),
                            l.site.clone(),
                            if l.voter { "voter" } else { "learner" }.into(),
                            l.matched_index.to_string(),
                            l.lag_entries.to_string(),
                            size::format_size(l.lag_bytes),
                            format!("{:.1}", l.lag_seconds),
                        ]);
                    }
                    t.row(vec![
                        p.name,
                        p.id.to_string(),
                        p.generation.to_string(),
                        if p.role.is_empty() {
                            "-".into()
                        } else {
                            p.role
                        },
                        if p.leader_node == 0 {
                            "-".into()
                        } else {
                            format!("node {}", p.leader_node)
                        },
                        p.applied_index.to_string(),
                        format!("{}..{}", p.log_first_index, p.last_log_index),
                        size::format_size(p.log_bytes),
                        p.snapshot_index.to_string(),
                        p.volumes.to_string(),
                        if p.oldest_restorable_ms == 0 {
                            "-".into()
                        } else {
                            format_time_ms(p.oldest_restorable_ms)
                        },
                    ]);
                }
                t.print();
                if !usage.is_empty() {
                    outln!();
                    outln!(
                        "data of the PGs here (stored: exact, what quotas count; live, history and pinned: as last counted):"
                    );
                    usage.print();
                    for (tenant, stored) in &tenants {
                        outln!(
                            "tenant {tenant}: {} stored in the PGs here",
                            size::format_size(*stored)
                        );
                    }
                }
                if !lag.is_empty() {
                    outln!();
                    outln!("replication lag of the PGs this node leads (the live RPO):");
                    lag.print();
                }
            }
        }
        Command::Tenant(TenantCommand::Create { name }) => {
            let req = client.request(api::CreateTenantRequest { name });
            let t = client.api().create_tenant(req).await?.into_inner();
            print_tenants(out, vec![t]);
        }
        Command::Tenant(TenantCommand::List) => {
            let req = client.request(api::ListTenantsRequest {});
            let r = client.api().list_tenants(req).await?.into_inner();
            print_tenants(out, r.tenants);
        }
        Command::Tenant(TenantCommand::Quota { name, bytes, none }) => {
            let quota_bytes = if none { 0 } else { bytes.unwrap_or(0) };
            let req = client.request(api::SetTenantQuotaRequest {
                tenant: name,
                quota_bytes,
            });
            let t = client.api().set_tenant_quota(req).await?.into_inner();
            print_tenants(out, vec![t]);
        }
        Command::Tenant(TenantCommand::RotateDek { name }) => {
            let req = client.request(api::RotateDekRequest { tenant: name });
            let t = client.api().rotate_dek(req).await?.into_inner();
            print_tenants(out, vec![t]);
        }
        Command::Volume(VolumeCommand::Create { name, size, pg }) => {
            let req = client.request(api::CreateVolumeRequest {
                name,
                size_bytes: size,
                pg,
            });
            let v = client.api().create_volume(req).await?.into_inner();
            print_volumes(out, vec![v]);
        }
        Command::Volume(VolumeCommand::Undelete { name }) => {
            let req = client.request(api::UndeleteVolumeRequest { name });
            let v = client.api().undelete_volume(req).await?.into_inner();
            print_volumes(out, vec![v]);
        }
        Command::Volume(VolumeCommand::Clone { source, new, point }) => {
            let req = client.request(api::CloneVolumeRequest {
                source,
                name: new,
                at: point.at.unwrap_or_default(),
                snapshot: point.snapshot.unwrap_or_default(),
            });
            let v = client.api().clone_volume(req).await?.into_inner();
            print_volumes(out, vec![v]);
        }
        Command::Volume(VolumeCommand::List { tenant }) => {
            let req = client.request(api::ListVolumesRequest { tenant });
            let r = client.api().list_volumes(req).await?.into_inner();
            print_volumes(out, r.volumes);
        }
        Command::Bucket(BucketCommand::Create { name, pg }) => {
            let req = client.request(api::CreateBucketRequest { name, pg });
            let b = client.api().create_bucket(req).await?.into_inner();
            print_buckets(out, vec![b]);
        }
        Command::Bucket(BucketCommand::Clone {
            source,
            new,
            point,
            read_only,
        }) => {
            let req = client.request(api::CloneBucketRequest {
                source,
                name: new,
                at: point.at.unwrap_or_default(),
                snapshot: point.snapshot.unwrap_or_default(),
                read_only,
            });
            let b = client.api().clone_bucket(req).await?.into_inner();
            print_buckets(out, vec![b]);
        }
        Command::Bucket(BucketCommand::List { tenant }) => {
            let req = client.request(api::ListBucketsRequest { tenant });
            let r = client.api().list_buckets(req).await?.into_inner();
            print_buckets(out, r.buckets);
        }
        Command::Bucket(BucketCommand::Undelete { name }) => {
            let req = client.request(api::UndeleteBucketRequest { name });
            let b = client.api().undelete_bucket(req).await?.into_inner();
            print_buckets(out, vec![b]);
        }
        Command::Bucket(BucketCommand::Delete { name }) => {
            let req = client.request(api::DeleteBucketRequest { name: name.clone() });
            client.api().delete_bucket(req).await?;
            if out.json {
                out.json_value(&serde_json::json!({ "deleted": name }));
            } else {
                outln!("bucket {name} deleted");
            }
        }
        Command::Volume(VolumeCommand::Resize { name, size }) => {
            let req = client.request(api::ResizeVolumeRequest {
                name,
                size_bytes: size,
            });
            let v = client.api().resize_volume(req).await?.into_inner();
            print_volumes(out, vec![v]);
        }
        Command::Volume(VolumeCommand::Delete { name }) => {
            let req = client.request(api::DeleteVolumeRequest { name: name.clone() });
            client.api().delete_volume(req).await?;
            if out.json {
                out.json_value(&serde_json::json!({ "deleted": name }));
            } else {
                outln!("volume {name} deleted");
            }
        }
        Command::Node(NodeCommand::Add { new_node, site }) => {
            // Ten minutes is plenty for the join that follows at once.
            let req = client.request(api::CreateJoinTokenRequest {
                site,
                ttl_seconds: 600,
            });
            let token = client
                .api()
                .create_join_token(req)
                .await?
                .into_inner()
                .token;
            let mut new = Client::connect(&new_node, None).await?;
            let req = new.request(api::JoinClusterRequest { token });
            let n = new.api().join_cluster(req).await?.into_inner();
            print_nodes(out, vec![n]);
        }
        Command::Node(NodeCommand::JoinToken { site, ttl_seconds }) => {
            let req = client.request(api::CreateJoinTokenRequest { site, ttl_seconds });
            let r = client.api().create_join_token(req).await?.into_inner();
            if out.json {
                out.json_value(&serde_json::json!({
                    "token": r.token, "expires_ms": r.expires_ms,
                }));
            } else {
                outln!("{}", r.token);
                eprintln!(
                    "one node may join with it until {} (lifeboat --endpoint NEW_NODE node join TOKEN)",
                    format_time_ms(r.expires_ms)
                );
            }
        }
        Command::Node(NodeCommand::Join { token }) => {
            let req = client.request(api::JoinClusterRequest { token });
            let n = client.api().join_cluster(req).await?.into_inner();
            print_nodes(out, vec![n]);
        }
        Command::Tenant(TenantCommand::Cert(TenantCertCommand::Create { tenant, out: dir })) => {
            let (key_pem, csr_pem) =
                lifeboat_node::pki::new_key_and_csr(&tenant).map_err(|e| anyhow::anyhow!("{e}"))?;
            let req = client.request(api::CreateTenantCertRequest {
                tenant: tenant.clone(),
                csr_pem,
            });
            let r = client.api().create_tenant_cert(req).await?.into_inner();
            write_cert_dir(&dir, &r.ca_cert_pem, &r.cert_pem, &key_pem)?;
            if out.json {
                out.json_value(&serde_json::json!({
                    "tenant": tenant, "dir": dir.display().to_string(),
                }));
            } else {
                outln!(
                    "wrote {}/{{ca-cert,client-cert,client-key}}.pem for tenant {tenant}",
                    dir.display()
                );
            }
        }
        Command::Tenant(TenantCommand::Credential(TenantCredentialCommand::Create {
            tenant,
            read_only,
            append_only,
            writable_prefix,
        })) => {
            let mode = if read_only {
                "read-only"
            } else if append_only {
                "append-only"
            } else {
                "full"
            };
            let req = client.request(api::CreateCredentialRequest {
                tenant,
                mode: mode.into(),
                writable_prefix,
            });
            let r = client.api().create_credential(req).await?.into_inner();
            let c = r.credential.unwrap_or_default();
            if out.json {
                out.json_value(&serde_json::json!({
                    "tenant": c.tenant, "access_key": c.access_key,
                    "secret_key": r.secret_key, "mode": c.mode,
                    "writable_prefix": c.writable_prefix,
                }));
            } else {
                outln!("AWS_ACCESS_KEY_ID={}", c.access_key);
                outln!("AWS_SECRET_ACCESS_KEY={}", r.secret_key);
                eprintln!(
                    "{} credential of tenant {}; the secret is not shown again",
                    c.mode, c.tenant
                );
            }
        }
        Command::Tenant(TenantCommand::Credential(TenantCredentialCommand::List { tenant })) => {
            let req = client.request(api::ListCredentialsRequest {
                tenant: tenant.unwrap_or_default(),
            });
            let r = client.api().list_credentials(req).await?.into_inner();
            print_credentials(out, r.credentials);
        }
        Command::Tenant(TenantCommand::Token(TenantTokenCommand::Create { tenant })) => {
            let req = client.request(api::CreateTenantTokenRequest {
                tenant,
                drill: false,
            });
            let r = client.api().create_tenant_token(req).await?.into_inner();
            let info = r.info.unwrap_or_default();
            if out.json {
                out.json_value(&serde_json::json!({
                    "token": r.token, "id": info.id, "role": info.role,
                    "created_ms": info.created_ms,
                }));
            } else {
                outln!("token {}", r.token);
                outln!("id    {} (role {})", info.id, info.role);
                outln!("This token is shown only now: keep it safe.");
            }
        }
        Command::Tenant(TenantCommand::Token(TenantTokenCommand::List { tenant })) => {
            let req = client.request(api::ListTokensRequest { tenant });
            let tokens = client.api().list_tokens(req).await?.into_inner().tokens;
            if out.json {
                out.json_value(&serde_json::Value::Array(
                    tokens
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "id": t.id, "role": t.role, "created_ms": t.created_ms,
                            })
                        })
                        .collect(),
                ));
            } else {
                let mut table = Table::new(&["ID", "ROLE", "CREATED"]);
                for t in tokens {
                    table.row(vec![t.id, t.role, format_time_ms(t.created_ms)]);
                }
                table.print();
            }
        }
        Command::Tenant(TenantCommand::Token(TenantTokenCommand::Revoke { id })) => {
            let req = client.request(api::RevokeTenantTokenRequest { id: id.clone() });
            client.api().revoke_tenant_token(req).await?;
            if out.json {
                out.json_value(&serde_json::json!({ "revoked": id }));
            } else {
                outln!("token {id} revoked");
            }
        }
        Command::Tenant(TenantCommand::Credential(TenantCredentialCommand::Revoke {
            access_key,
        })) => {
            let req = client.request(api::RevokeCredentialRequest {
                access_key: access_key.clone(),
            });
            client.api().revoke_credential(req).await?;
            if out.json {
                out.json_value(&serde_json::json!({ "revoked": access_key }));
            } else {
                outln!("access key {access_key} revoked");
            }
        }
        Command::Node(NodeCommand::List) => {
            let req = client.request(api::ListNodesRequest {});
            let r = client.api().list_nodes(req).await?.into_inner();
            print_nodes(out, r.nodes);
        }
        Command::Node(NodeCommand::Remove { node_id }) => {
            let req = client.request(api::RemoveNodeRequest { node_id });
            let n = client.api().remove_node(req).await?.into_inner();
            print_nodes(out, vec![n]);
        }
        Command::Pg(PgCommand::Create { name, ack }) => {
            let req = client.request(api::CreatePgRequest { name, ack });
            let p = client.api().create_pg(req).await?.into_inner();
            print_pgs(out, vec![p]);
        }
        Command::Pg(PgCommand::List { tenant }) => {
            let req = client.request(api::ListPgsRequest { tenant });
            let r = client.api().list_pgs(req).await?.into_inner();
            print_pgs(out, r.pgs);
        }
        Command::Pg(PgCommand::Show { name }) => {
            let req = client.request(api::ShowPgRequest { name });
            let p = client.api().show_pg(req).await?.into_inner();
            if out.json {
                out.json_value(&pg_json(&p));
            } else {
                let status = p.status.clone();
                let lineage = p.lineage.clone();
                let resyncs = p.resyncs.clone();
                print_pgs(out, vec![p]);
                match &status {
                    Some(s) => outln!(
                        "here: {} · leader node {} · applied {} · log {}..{} ({}) · raft snapshot {} ({} installed from a leader){}",
                        if s.role.is_empty() { "-" } else { &s.role },
                        s.leader_node,
                        s.applied_index,
                        s.log_first_index,
                        s.last_log_index,
                        size::format_size(s.log_bytes),
                        s.snapshot_index,
                        s.snapshots_installed,
                        if s.ack_degraded {
                            format!(" · ack degraded {} time(s)", s.ack_degradations)
                        } else {
                            String::new()
                        }
                    ),
                    None => outln!("here: this node hosts no member of it"),
                }
                for l in &lineage {
                    outln!(
                        "generation {} from index {} ({}), {} -> {}{}",
                        l.generation,
                        l.first_index,
                        format_time_ms(l.started_ms),
                        l.from_site,
                        l.to_site,
                        l.rpo.as_ref().map_or(String::new(), |r| format!(
                            ": forced; lost at least {} entries ({}), at most {}",
                            r.lower_entries,
                            size::format_size(r.lower_bytes),
                            if r.upper_ms > 0 {
                                format!("{} ms of writes", r.upper_ms)
                            } else {
                                "an unknown time of writes".into()
                            }
                        ))
                    );
                }
                for x in &resyncs {
                    outln!(
                        "node {} rejoined generation {} by a delta resync from node {}: received {} in {} rows ({} of {} segments) over the {} it kept, {} ms",
                        x.node_id,
                        x.generation,
                        x.from_node,
                        size::format_size(x.bytes_received),
                        x.rows_received,
                        x.replaced,
                        x.segments,
                        size::format_size(x.held_bytes),
                        x.took_ms
                    );
                }
                if let Some(s) = &status {
                    outln!(
                        "history: restorable from {} · window {} · {} snapshot(s) · {}",
                        if s.oldest_restorable_ms == 0 {
                            "-".into()
                        } else {
                            format_time_ms(s.oldest_restorable_ms)
                        },
                        describe_ms(s.window_ms),
                        s.snapshots,
                        describe_schedule(&s.schedule.unwrap_or_default())
                    );
                    outln!(
                        "data: {} stored in {} versions · {}",
                        size::format_size(s.stored_bytes),
                        s.versions,
                        if s.census_ms == 0 {
                            "not counted yet".to_string()
                        } else {
                            format!(
                                "live {}, history {}, pinned {} as counted at {}",
                                size::format_size(s.live_bytes),
                                size::format_size(s.history_bytes),
                                size::format_size(s.pinned_bytes),
                                format_time_ms(s.census_ms)
                            )
                        }
                    );
                }
            }
        }
        Command::Snapshot(SnapshotCommand::Create {
            pg,
            name,
            at,
            lock_until,
        }) => {
            let req = client.request(api::CreateSnapshotRequest {
                pg,
                name,
                at,
                lock_until,
            });
            let s = client.api().create_snapshot(req).await?.into_inner();
            print_snapshots(out, vec![s]);
        }
        Command::Snapshot(SnapshotCommand::Schedule {
            pg,
            every,
            off: _,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
        }) => {
            let req = client.request(api::SetSnapshotScheduleRequest {
                pg: pg.clone(),
                every: every.unwrap_or_default(),
                retention: Some(api::SnapshotSchedule {
                    every_ms: 0,
                    keep_last,
                    keep_hourly,
                    keep_daily,
                    keep_weekly,
                    keep_monthly,
                }),
            });
            let s = client.api().set_snapshot_schedule(req).await?.into_inner();
            if out.json {
                out.json_value(&schedule_json(&s));
            } else {
                outln!("{pg}: {}", describe_schedule(&s));
            }
        }
        Command::Snapshot(SnapshotCommand::List { pg, divergence }) => {
            let req = client.request(api::ListSnapshotsRequest { pg, divergence });
            let r = client.api().list_snapshots(req).await?.into_inner();
            if divergence {
                print_divergences(out, r.divergences);
            } else {
                print_snapshots(out, r.snapshots);
            }
        }
        Command::Snapshot(SnapshotCommand::Show { snapshot }) => {
            let req = client.request(split_snapshot_ref(&snapshot)?);
            let s = client.api().show_snapshot(req).await?.into_inner();
            print_snapshots(out, vec![s]);
        }
        Command::Snapshot(SnapshotCommand::Delete { snapshot }) => {
            let req = client.request(split_snapshot_ref(&snapshot)?);
            client.api().delete_snapshot(req).await?;
            if !out.json {
                outln!("deleted snapshot {snapshot}");
            }
        }
        Command::Snapshot(SnapshotCommand::Lock { snapshot, until }) => {
            let r = split_snapshot_ref(&snapshot)?;
            let req = client.request(api::LockSnapshotRequest {
                pg: r.pg,
                name: r.name,
                until,
            });
            let s = client.api().lock_snapshot(req).await?.into_inner();
            print_snapshots(out, vec![s]);
        }
        Command::Pg(PgCommand::Digest { name }) => {
            let req = client.request(api::PgDigestRequest { name: name.clone() });
            let d = client.api().pg_digest(req).await?.into_inner();
            if out.json {
                out.json_value(&serde_json::json!({
                    "pg": name, "applied_index": d.applied_index, "quiet": d.quiet,
                    "rows": d.rows, "versions": d.versions, "sha256": d.sha256,
                }));
            } else {
                outln!(
                    "{name}: applied index {}{} · {} rows · {} versions · sha256 {}",
                    d.applied_index,
                    if d.quiet { "" } else { " (moving)" },
                    d.rows,
                    d.versions,
                    d.sha256
                );
            }
        }
        Command::Pg(PgCommand::SetWindow { name, window }) => {
            let req = client.request(api::SetPgWindowRequest { name, window });
            let p = client.api().set_pg_window(req).await?.into_inner();
            print_pgs(out, vec![p]);
        }
        Command::Pg(PgCommand::SetAck { name, ack }) => {
            let req = client.request(api::SetPgAckRequest { name, ack });
            let p = client.api().set_pg_ack(req).await?.into_inner();
            print_pgs(out, vec![p]);
        }
        Command::Site(SiteCommand::List) => {
            let req = client.request(api::ListNodesRequest {});
            let nodes = client.api().list_nodes(req).await?.into_inner().nodes;
            let req = client.request(api::ListPgsRequest::default());
            let pgs = client.api().list_pgs(req).await?.into_inner().pgs;
            print_sites(out, &nodes, &pgs);
        }
        Command::Restore(args) => {
            let mut req = api::RestorePgRequest {
                pg: args.pg.clone(),
                at: args.at.unwrap_or_default(),
                snapshot: args.snapshot.unwrap_or_default(),
                undo: args.undo,
                dry_run: true,
            };
            let ask = client.request(req.clone());
            let plan = client.api().restore_pg(ask).await?.into_inner();
            if args.dry_run {
                print_restore_plan(out, &plan);
                return Ok(());
            }
            if !args.yes {
                print_restore_plan(out, &plan);
                confirm_restore(&plan)?;
            }
            req.dry_run = false;
            let go = client.request(req);
            let done = client.api().restore_pg(go).await?.into_inner();
            if out.json {
                print_restore_plan(out, &done);
            } else if done.undoes_index != 0 {
                outln!(
                    "{}: undid the restore at index {}, back to the state just before it (index {}); undo this with: lifeboat restore {} --undo",
                    done.pg,
                    done.undoes_index,
                    done.to_index,
                    done.pg
                );
            } else {
                outln!(
                    "{} restored in place to {} (index {}); undo with: lifeboat restore {} --undo",
                    done.pg,
                    format_time_ms(done.to_ms),
                    done.to_index,
                    done.pg
                );
            }
        }
        Command::Failover(args) => {
            let force = args.force;
            let req = client.request(api::SwitchoverRequest {
                to_site: args.to,
                pgs: args.pgs,
                timeout_ms: args.timeout.saturating_mul(1000),
                force,
                catalog_lost: args.catalog_lost,
            });
            let r = client.api().switchover(req).await?.into_inner();
            if out.json {
                out.json_value(&serde_json::json!({
                    "took_ms": r.took_ms,
                    "rebuild": r.rebuild.as_ref().map(|b| serde_json::json!({
                        "previous_cluster_id": b.previous_cluster_id,
                        "cluster_id": b.cluster_id, "generation": b.generation,
                        "site": b.site, "catalog_node": b.catalog_node,
                        "catalog_fork_index": b.catalog_fork_index,
                        "survivors": b.survivors, "removed": b.removed,
                    })),
                    "pgs": r.pgs.iter().map(|p| serde_json::json!({
                        "name": p.name, "from_site": p.from_site, "to_site": p.to_site,
                        "leader_node": p.leader_node, "last_index": p.last_index,
                        "took_ms": p.took_ms, "already": p.already,
                        "generation": p.generation, "fork_index": p.fork_index,
                        "rpo_upper_ms": p.rpo_upper_ms,
                        "rpo_lower_entries": p.rpo_lower_entries,
                        "rpo_lower_bytes": p.rpo_lower_bytes,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                let mut table =
                    Table::new(&["PG", "FROM", "TO", "LEADER NODE", "LAST INDEX", "TOOK"]);
                for p in &r.pgs {
                    table.row(vec![
                        p.name.clone(),
                        if p.already {
                            "(already there)".into()
                        } else {
                            p.from_site.clone()
                        },
                        p.to_site.clone(),
                        p.leader_node.to_string(),
                        p.last_index.to_string(),
                        format!("{} ms", p.took_ms),
                    ]);
                }
                table.print();
                if force {
                    for p in &r.pgs {
                        outln!(
                            "{}: generation {} from index {}; writes acknowledged at the old site in {} may be lost (they stay in its log when it returns); at least {} entries ({}) the old site applied are not here",
                            p.name,
                            p.generation,
                            p.fork_index + 1,
                            p.rpo_upper_ms.map_or("an unknown time".to_owned(), |ms| {
                                format!("the last {ms} ms before its lease ran out")
                            }),
                            p.rpo_lower_entries,
                            size::format_size(p.rpo_lower_bytes)
                        );
                    }
                    match &r.rebuild {
                        None => outln!(
                            "keep the old site's nodes down or cut off until they are re-protected"
                        ),
                        Some(b) => print_catalog_rebuild(b),
                    }
                }
                outln!(
                    "{} PGs led from their new site after {} ms",
                    r.pgs.len(),
                    r.took_ms
                );
            }
        }
        Command::Failback(FailbackCommand::Prepare { site, pgs, timeout }) => {
            let req = client.request(api::FailbackPrepareRequest {
                site: site.clone(),
                pgs,
                timeout_ms: timeout.saturating_mul(1000),
            });
            let r = client.api().failback_prepare(req).await?.into_inner();
            print_failback_prepared(out, &r, &site);
        }
        Command::Drill(command) => drill::run(client, command, out).await?,
        Command::Events { follow: true } => follow_events(client, out).await?,
        Command::Events { follow: false } => {
            let req = client.request(api::ListEventsRequest {});
            let r = client.api().list_events(req).await?.into_inner();
            if out.json {
                out.json_value(&serde_json::Value::Array(
                    r.events.iter().map(event_json).collect(),
                ));
            } else {
                let mut table = Table::new(&["TIME (UTC)", "NODE", "KIND", "PG", "MESSAGE"]);
                for e in r.events {
                    table.row(vec![
                        format_time_ms(e.time_ms),
                        e.node_id.to_string(),
                        e.kind,
                        e.pg_name,
                        e.message,
                    ]);
                }
                table.print();
            }
        }
        Command::Up(_) | Command::Node(NodeCommand::Start { .. }) => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

fn resync_json(x: &lifeboat_proto::raft::ResyncRecord) -> serde_json::Value {
    serde_json::json!({
        "from_node": x.from_node, "applied_index": x.applied_index,
        "held_rows": x.held_rows, "held_bytes": x.held_bytes,
        "offer_bytes": x.offer_bytes, "segments": x.segments,
        "replaced": x.replaced, "rows_received": x.rows_received,
        "bytes_received": x.bytes_received, "took_ms": x.took_ms,
    })
}

fn print_failback_prepared(out: &Output, r: &api::FailbackPrepareResponse, site: &str) {
    if out.json {
        out.json_value(&serde_json::json!({
            "took_ms": r.took_ms,
            "pgs": r.pgs.iter().map(|p| serde_json::json!({
                "name": p.name, "active_site": p.active_site,
                "generation": p.generation, "target_index": p.target_index,
                "took_ms": p.took_ms,
                "members": p.members.iter().map(|m| serde_json::json!({
                    "node": m.node_id, "applied_index": m.applied_index,
                    "resync": m.resync.as_ref().map(resync_json),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut table = Table::new(&[
        "PG",
        "NODE",
        "APPLIED",
        "JOINED BY",
        "HELD",
        "RECEIVED",
        "TOOK",
    ]);
    for p in &r.pgs {
        for m in &p.members {
            let (how, held, received) = match &m.resync {
                Some(x) => (
                    format!("delta from node {}", x.from_node),
                    size::format_size(x.held_bytes),
                    format!(
                        "{} ({} of {} segments)",
                        size::format_size(x.bytes_received),
                        x.replaced,
                        x.segments
                    ),
                ),
                None => ("new replica".to_owned(), "-".to_owned(), "-".to_owned()),
            };
            table.row(vec![
                p.name.clone(),
                m.node_id.to_string(),
                format!("{} of {}", m.applied_index, p.target_index),
                how,
                held,
                received,
                format!("{} ms", p.took_ms),
            ]);
        }
    }
    table.print();
    outln!(
        "{} PGs ready to go back after {} ms: run `lifeboat failover --planned --to {site}`",
        r.pgs.len(),
        r.took_ms
    );
}

fn event_json(e: &api::Event) -> serde_json::Value {
    serde_json::json!({
        "time_ms": e.time_ms, "node": e.node_id, "kind": e.kind,
        "pg": e.pg, "pg_name": e.pg_name, "message": e.message,
    })
}

/// `events --follow`: the events so far, then each new one as it comes,
/// until interrupted. The node keeps its newest events in order, so what
/// follows the last one printed is new.
async fn follow_events(client: &mut Client, out: &Output) -> Result<()> {
    let mut last: Option<api::Event> = None;
    loop {
        let req = client.request(api::ListEventsRequest {});
        let events = client.api().list_events(req).await?.into_inner().events;
        let start = match &last {
            Some(l) => events.iter().rposition(|e| e == l).map_or(0, |i| i + 1),
            None => 0,
        };
        for e in &events[start..] {
            if out.json {
                outln!("{}", event_json(e));
            } else {
                outln!(
                    "{}  node {}  {}  {}  {}",
                    format_time_ms(e.time_ms),
                    e.node_id,
                    e.kind,
                    if e.pg_name.is_empty() {
                        "-"
                    } else {
                        &e.pg_name
                    },
                    e.message
                );
            }
        }
        if let Some(e) = events.last() {
            last = Some(e.clone());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// Writes a client certificate directory: the CA, the certificate and the
/// key (0600, never overwritten: a key is not replaced by accident).
fn write_cert_dir(dir: &std::path::Path, ca: &str, cert: &str, key: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let key_path = dir.join("client-key.pem");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("create {} (it must not exist yet)", key_path.display()))?;
    f.write_all(key.as_bytes())?;
    f.sync_all()?;
    std::fs::write(dir.join("client-cert.pem"), cert)?;
    std::fs::write(dir.join("ca-cert.pem"), ca)?;
    Ok(())
}

fn pg_status_json(p: &api::PgStatus) -> serde_json::Value {
    serde_json::json!({
        "name": p.name, "id": p.id, "applied_index": p.applied_index,
        "last_log_index": p.last_log_index, "leader_member": p.leader,
        "leader_node": p.leader_node, "role": p.role,
        "generation": p.generation, "active_site": p.active_site,
        "volumes": p.volumes, "log_first_index": p.log_first_index,
        "log_bytes": p.log_bytes, "snapshot_index": p.snapshot_index,
        "snapshots_installed": p.snapshots_installed,
        "stored_bytes": p.stored_bytes, "versions": p.versions,
        "live_bytes": p.live_bytes, "history_bytes": p.history_bytes,
        "pinned_bytes": p.pinned_bytes, "census_ms": p.census_ms,
        "ack": p.ack, "ack_degraded": p.ack_degraded,
        "ack_degradations": p.ack_degradations,
        "oldest_restorable_ms": p.oldest_restorable_ms, "snapshots": p.snapshots,
        "window_ms": p.window_ms, "horizon_index": p.horizon_index,
        "schedule": p.schedule.as_ref().map(schedule_json),
        "lag": p.lag.iter().map(|l| serde_json::json!({
            "member": l.member_id, "node": l.node_id, "site": l.site,
            "voter": l.voter, "matched_index": l.matched_index,
            "entries": l.lag_entries, "bytes": l.lag_bytes,
            "seconds": l.lag_seconds,
        })).collect::<Vec<_>>(),
    })
}

fn pg_json(p: &api::Pg) -> serde_json::Value {
    serde_json::json!({
        "name": p.name, "id": p.id, "tenant": p.tenant, "ack": p.ack,
        "generation": p.generation, "active_site": p.active_site,
        "volumes": p.volumes, "created_ms": p.created_ms,
        "members": p.members.iter().map(|m| serde_json::json!({
            "member": m.member_id, "node": m.node_id, "site": m.site, "voter": m.voter,
        })).collect::<Vec<_>>(),
        "status": p.status.as_ref().map(pg_status_json),
        "progress": p.progress.as_ref().map(|g| serde_json::json!({
            "generation": g.generation, "applied_index": g.applied_index,
            "reported_ms": g.reported_ms, "tail_first_index": g.tail_first_index,
            "tail_entries": g.tail_bytes.len(),
            "tail_bytes": g.tail_bytes.iter().sum::<u64>(),
        })),
        "resyncs": p.resyncs.iter().map(|x| {
            let mut j = resync_json(x);
            j["node"] = x.node_id.into();
            j["generation"] = x.generation.into();
            j
        }).collect::<Vec<_>>(),
        "lineage": p.lineage.iter().map(|l| serde_json::json!({
            "generation": l.generation, "first_index": l.first_index,
            "started_ms": l.started_ms, "started": format_time_ms(l.started_ms),
            "from_site": l.from_site, "to_site": l.to_site,
            "rpo": l.rpo.as_ref().map(|r| serde_json::json!({
                "lower_entries": r.lower_entries, "lower_bytes": r.lower_bytes,
                "upper_ms": (r.upper_ms > 0).then_some(r.upper_ms),
            })),
        })).collect::<Vec<_>>(),
    })
}

fn print_pgs(out: &Output, pgs: Vec<api::Pg>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(pgs.iter().map(pg_json).collect()));
        return;
    }
    let mut table = Table::new(&[
        "PROTECTION GROUP",
        "ID",
        "ACK",
        "GEN",
        "ACTIVE SITE",
        "VOTERS",
        "LEARNERS",
        "VOLUMES",
    ]);
    for p in pgs {
        let members = |voter: bool| {
            p.members
                .iter()
                .filter(|m| m.voter == voter)
                .map(|m| format!("node {} ({})", m.node_id, m.site))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let degraded = p.status.as_ref().is_some_and(|s| s.ack_degraded);
        table.row(vec![
            p.name.clone(),
            p.id.to_string(),
            if degraded {
                format!("{} (DEGRADED to local)", p.ack)
            } else {
                p.ack.clone()
            },
            p.generation.to_string(),
            p.active_site.clone(),
            members(true),
            members(false),
            p.volumes.to_string(),
        ]);
    }
    table.print();
}

/// One row per site, from the node list and the PG list.
fn print_sites(out: &Output, nodes: &[api::Node], pgs: &[api::Pg]) {
    let mut sites: Vec<String> = nodes.iter().map(|n| n.site.clone()).collect();
    sites.sort();
    sites.dedup();
    let rows: Vec<serde_json::Value> = sites
        .iter()
        .map(|site| {
            let here: Vec<&api::Node> = nodes
                .iter()
                .filter(|n| &n.site == site && !n.removed)
                .collect();
            serde_json::json!({
                "site": site,
                "nodes": here.len(),
                "reachable": here.iter().filter(|n| n.reachable).count(),
                "catalog_voters": here.iter().filter(|n| n.catalog_role == "voter").count(),
                "active_pgs": pgs.iter().filter(|p| &p.active_site == site).count(),
                "standby_pgs": pgs
                    .iter()
                    .filter(|p| &p.active_site != site && p.members.iter().any(|m| &m.site == site))
                    .count(),
            })
        })
        .collect();
    if out.json {
        out.json_value(&serde_json::Value::Array(rows));
        return;
    }
    let mut table = Table::new(&[
        "SITE",
        "NODES",
        "UP",
        "CATALOG VOTERS",
        "ACTIVE PGS",
        "STANDBY PGS",
    ]);
    for r in rows {
        table.row(
            [
                "site",
                "nodes",
                "reachable",
                "catalog_voters",
                "active_pgs",
                "standby_pgs",
            ]
            .iter()
            .map(|k| match &r[k] {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .collect(),
        );
    }
    table.print();
}

fn print_nodes(out: &Output, nodes: Vec<api::Node>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            nodes
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "id": n.id, "site": n.site, "raft_addr": n.raft_addr,
                        "admin_addr": n.admin_addr, "nbd_addr": n.nbd_addr,
                        "removed": n.removed, "catalog_role": n.catalog_role,
                        "reachable": n.reachable, "pg_members": n.pg_members,
                        "role": n.role,
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&[
        "NODE",
        "SITE",
        "ROLE",
        "RAFT",
        "ADMIN",
        "NBD",
        "CATALOG",
        "PG MEMBERS",
        "STATE",
    ]);
    for n in nodes {
        let state = if n.removed {
            "removed"
        } else if n.reachable {
            "up"
        } else {
            "unreachable"
        };
        table.row(vec![
            n.id.to_string(),
            n.site,
            n.role,
            n.raft_addr,
            n.admin_addr,
            n.nbd_addr,
            if n.catalog_role.is_empty() {
                "-".into()
            } else {
                n.catalog_role
            },
            n.pg_members.to_string(),
            state.into(),
        ]);
    }
    table.print();
}

/// A quota: a size above zero (0 would refuse every write).
fn parse_quota(text: &str) -> Result<u64, String> {
    match size::parse_size(text)? {
        0 => Err("a quota of 0 would refuse every write; use --none to remove the quota".into()),
        bytes => Ok(bytes),
    }
}

fn print_tenants(out: &Output, tenants: Vec<api::Tenant>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            tenants
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "name": t.name, "id": t.id, "current_key_id": t.current_key_id,
                        "key_count": t.key_count, "pgs": t.pgs,
                        "stored_bytes": t.stored_bytes, "quota_bytes": t.quota_bytes,
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&[
        "TENANT",
        "ID",
        "KEY ID",
        "KEYS",
        "PROTECTION GROUPS",
        "STORED",
        "QUOTA",
    ]);
    for t in tenants {
        table.row(vec![
            t.name,
            t.id.to_string(),
            t.current_key_id.to_string(),
            t.key_count.to_string(),
            t.pgs.join(","),
            size::format_size(t.stored_bytes),
            if t.quota_bytes == 0 {
                "-".into()
            } else {
                format!(
                    "{} ({}%)",
                    size::format_size(t.quota_bytes),
                    t.stored_bytes * 100 / t.quota_bytes
                )
            },
        ]);
    }
    table.print();
}

fn print_volumes(out: &Output, volumes: Vec<api::Volume>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            volumes
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "name": v.name, "pg": v.pg, "id": v.id, "size_bytes": v.size_bytes,
                        "created_index": v.created_index,
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&[
        "VOLUME",
        "SIZE",
        "PROTECTION GROUP",
        "ID",
        "CREATED AT INDEX",
    ]);
    for v in volumes {
        table.row(vec![
            v.name,
            size::format_size(v.size_bytes),
            v.pg,
            v.id.to_string(),
            v.created_index.to_string(),
        ]);
    }
    table.print();
}

fn print_credentials(out: &Output, credentials: Vec<api::Credential>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            credentials
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "tenant": c.tenant, "access_key": c.access_key, "mode": c.mode,
                        "writable_prefix": c.writable_prefix, "created_ms": c.created_ms,
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&["ACCESS KEY", "TENANT", "MODE", "WRITABLE PREFIX", "CREATED"]);
    for c in credentials {
        table.row(vec![
            c.access_key,
            c.tenant,
            c.mode,
            c.writable_prefix,
            format_time_ms(c.created_ms),
        ]);
    }
    table.print();
}

fn print_buckets(out: &Output, buckets: Vec<api::Bucket>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            buckets
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "name": b.name, "pg": b.pg, "id": b.id, "created_ms": b.created_ms,
                        "clone_of": b.clone_of, "clone_index": b.clone_index,
                        "clone_writable": b.clone_writable,
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&["BUCKET", "PROTECTION GROUP", "ID", "CREATED", "CLONE OF"]);
    for b in buckets {
        let clone = match (b.clone_of, b.clone_writable) {
            (0, _) => "-".to_owned(),
            (of, true) => format!("{of} at index {}", b.clone_index),
            (of, false) => format!("{of} at index {} (read-only)", b.clone_index),
        };
        table.row(vec![
            b.name,
            b.pg,
            b.id.to_string(),
            format_time_ms(b.created_ms),
            clone,
        ]);
    }
    table.print();
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC.
pub(crate) fn format_time_ms(ms: u64) -> String {
    lifeboat_snapshot::format_ms(ms)
}

/// A duration in ms the way people write it: 24h, 90m, 2s.
fn describe_ms(ms: u64) -> String {
    match ms {
        0 => "-".into(),
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

fn schedule_json(s: &api::SnapshotSchedule) -> serde_json::Value {
    serde_json::json!({
        "every_ms": s.every_ms, "keep_last": s.keep_last, "keep_hourly": s.keep_hourly,
        "keep_daily": s.keep_daily, "keep_weekly": s.keep_weekly,
        "keep_monthly": s.keep_monthly,
    })
}

fn describe_schedule(s: &api::SnapshotSchedule) -> String {
    if s.every_ms == 0 {
        return "no snapshot schedule".into();
    }
    format!(
        "a snapshot every {} s; keep last {}, hourly {}, daily {}, weekly {}, monthly {}",
        s.every_ms / 1000,
        s.keep_last,
        s.keep_hourly,
        s.keep_daily,
        s.keep_weekly,
        s.keep_monthly
    )
}

fn print_restore_plan(out: &Output, plan: &api::RestorePlan) {
    if out.json {
        out.json_value(&serde_json::json!({
            "pg": plan.pg, "to_index": plan.to_index, "to_ms": plan.to_ms,
            "to": format_time_ms(plan.to_ms), "undoes_index": plan.undoes_index,
            "applied": plan.applied, "lock_overridden": plan.lock_overridden,
            "items": plan.items.iter().map(|i| serde_json::json!({
                "kind": i.kind, "name": i.name, "action": i.action, "state": i.state,
                "size_then": i.size_then, "size_now": i.size_now, "changed": i.changed,
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    if plan.undoes_index != 0 {
        outln!(
            "{}: undo the restore at index {}: back to the state just before it (index {})",
            plan.pg,
            plan.undoes_index,
            plan.to_index
        );
    } else {
        outln!(
            "{}: restore in place to {} (index {})",
            plan.pg,
            format_time_ms(plan.to_ms),
            plan.to_index
        );
    }
    let mut table = Table::new(&[
        "KIND",
        "NAME",
        "ACTION",
        "STATE",
        "SIZE THEN",
        "SIZE NOW",
        "WRITTEN SINCE",
    ]);
    for i in &plan.items {
        let sizes = i.kind == "volume";
        table.row(vec![
            i.kind.clone(),
            i.name.clone(),
            match i.action.as_str() {
                "restore" => "goes back".into(),
                "new" => "created since: left as is".into(),
                other => other.to_owned(),
            },
            i.state.clone(),
            if sizes {
                size::format_size(i.size_then)
            } else {
                "-".into()
            },
            if sizes {
                size::format_size(i.size_now)
            } else {
                "-".into()
            },
            format!(
                "{} {}{}",
                i.changed,
                if sizes { "block" } else { "key" },
                if i.changed == 1 { "" } else { "s" }
            ),
        ]);
    }
    if table.is_empty() {
        outln!("(no volumes or buckets)");
    } else {
        table.print();
    }
}

/// Asks on the terminal; without one, refuses (scripts pass --yes).
fn confirm_restore(plan: &api::RestorePlan) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "not restoring {} without confirmation: run it in a terminal, or pass --yes",
            plan.pg
        );
    }
    print!(
        "Writes to {} since then will be hidden (kept in the history; --undo brings them back). Type the PG name to go on: ",
        plan.pg
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != plan.pg {
        anyhow::bail!("not restored: the answer was not {}", plan.pg);
    }
    Ok(())
}

fn print_divergences(out: &Output, divergences: Vec<api::Divergence>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            divergences
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "pg": d.pg, "generation": d.generation, "fork_index": d.fork_index,
                        "last_index": d.last_index, "entries": d.last_index - d.fork_index,
                        "node": d.node_id, "fork_ms": d.fork_ms, "fork": format_time_ms(d.fork_ms),
                        "last_ms": d.last_ms,
                        "lost_ms": (d.fork_ms > 0 && d.last_ms > 0).then(|| d.last_ms.saturating_sub(d.fork_ms)),
                        "recorded_ms": d.recorded_ms,
                        "complete": d.complete, "covered_by": (d.covered_by != 0).then_some(d.covered_by),
                        "volumes": d.volumes.iter().map(|v| serde_json::json!({
                            "volume": v.volume, "clone": v.clone, "blocks": v.blocks,
                            "bytes": v.bytes, "deleted": v.deleted,
                        })).collect::<Vec<_>>(),
                        "buckets": d.buckets.iter().map(|b| serde_json::json!({
                            "bucket": b.bucket, "clone": b.clone, "objects": b.objects,
                            "bytes": b.bytes, "deleted": b.deleted,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&[
        "PG",
        "GENERATION",
        "ENTRIES",
        "NODE",
        "FORK",
        "VOLUME/BUCKET",
        "DIVERGENCE SNAPSHOT",
        "CHANGED",
    ]);
    for d in divergences {
        let entries = format!("{}..={}", d.fork_index + 1, d.last_index);
        let fork = format_time_ms(d.fork_ms);
        if d.volumes.is_empty() && d.buckets.is_empty() {
            let (snapshot, changed) = match (d.covered_by, d.complete) {
                (0, true) => ("-".to_owned(), "0".to_owned()),
                (0, false) => ("-".to_owned(), "(carrying)".to_owned()),
                (by, _) => (format!("in node {by}'s"), "-".to_owned()),
            };
            table.row(vec![
                d.pg.clone(),
                d.generation.to_string(),
                entries.clone(),
                d.node_id.to_string(),
                fork.clone(),
                "-".into(),
                snapshot,
                changed,
            ]);
        }
        for v in &d.volumes {
            table.row(vec![
                d.pg.clone(),
                d.generation.to_string(),
                entries.clone(),
                d.node_id.to_string(),
                fork.clone(),
                v.volume.clone(),
                if v.deleted {
                    "(deleted after the fork)".into()
                } else {
                    v.clone.clone()
                },
                format!("{} blocks", v.blocks),
            ]);
        }
        for b in &d.buckets {
            table.row(vec![
                d.pg.clone(),
                d.generation.to_string(),
                entries.clone(),
                d.node_id.to_string(),
                fork.clone(),
                format!("bucket {}", b.bucket),
                if b.deleted {
                    "(deleted after the fork)".into()
                } else {
                    format!("bucket {}", b.clone)
                },
                format!("{} keys", b.objects),
            ]);
        }
    }
    table.print();
}

fn print_snapshots(out: &Output, snapshots: Vec<api::Snapshot>) {
    if out.json {
        out.json_value(&serde_json::Value::Array(
            snapshots
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "pg": s.pg, "name": s.name, "index": s.index, "at_ms": s.at_ms,
                        "at": format_time_ms(s.at_ms), "created_ms": s.created_ms,
                        "locked_until_ms": s.locked_until_ms,
                    })
                })
                .collect(),
        ));
        return;
    }
    let mut table = Table::new(&["SNAPSHOT", "INDEX", "AT", "CREATED", "LOCKED UNTIL"]);
    for s in snapshots {
        table.row(vec![
            format!("{}@{}", s.pg, s.name),
            s.index.to_string(),
            format_time_ms(s.at_ms),
            format_time_ms(s.created_ms),
            if s.locked_until_ms == 0 {
                "-".into()
            } else {
                format_time_ms(s.locked_until_ms)
            },
        ]);
    }
    table.print();
}
