//! Integration tests of the node: an in-process node on loopback ports in a
//! temp dir, a real RocksDB, and real NBD clients (qemu-img, qemu-io,
//! nbdinfo, nbdcopy) or the harness's independent NBD client.

mod admin;
mod bad_input;
mod buckets;
mod confidentiality;
mod credentials;
mod gc;
mod history;
mod integrity;
mod log;
mod membership;
mod pgs;
mod quota;
mod real_clients;
mod restore;
mod s3;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

pub use lifeboat_chaos_tests::data::pseudo_random;
use lifeboat_chaos_tests::nbd_client::NbdClient;
use lifeboat_node::NodeConfig;
use lifeboat_node::server::{self, RunningNode};

pub const VOLUME: &str = "demo/disk0";
pub const VOLUME_BYTES: u64 = 64 << 20;

/// A running in-process node with tenant `demo` and volume `demo/disk0`.
pub struct TestNode {
    pub node: Option<RunningNode>,
    pub dir: tempfile::TempDir,
    pub token: String,
}

impl TestNode {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn running(&self) -> &RunningNode {
        self.node.as_ref().expect("node running")
    }

    pub fn nbd(&self) -> SocketAddr {
        self.running().nbd_addr
    }

    pub fn nbd_uri(&self) -> String {
        format!("nbd://{}/{VOLUME}", self.nbd())
    }

    pub async fn client(&self) -> NbdClient {
        NbdClient::connect(self.nbd(), VOLUME)
            .await
            .expect("open demo/disk0")
    }

    pub async fn stop(mut self) {
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }
}

pub fn test_config(dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig {
        data_dir: dir.join("data"),
        master_key_file: dir.join("keys/master.key"),
        ..NodeConfig::default()
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    c.admin.listen = any;
    c.nbd.listen = any;
    c.http.listen = any;
    c.s3.listen = any;
    c.raft.listen = any;
    // Small reserve: test machines may have little free disk.
    c.store.reserve_bytes = 16 << 20;
    c.raft.heartbeat_interval_ms = 50;
    c.raft.election_timeout_min_ms = 200;
    c.raft.election_timeout_max_ms = 400;
    c.raft.remote_timeout_ms = 300;
    c
}

static LOGS: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
    std::sync::OnceLock::new();

#[derive(Clone)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a subscriber that keeps every log line of this test
/// binary, so tests can assert what an operator would see.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = LogBuffer(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

pub fn captured_logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().expect("log buffer")).into_owned())
        .unwrap_or_default()
}

/// `msg` with `authorization: Bearer TOKEN`.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub async fn must_start() -> TestNode {
    must_start_with(|_, _| {}).await
}

/// [`must_start`] with the test config changed by `adjust` (given the
/// node's temporary directory).
pub async fn must_start_with(adjust: impl FnOnce(&mut NodeConfig, &std::path::Path)) -> TestNode {
    capture_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(dir.path());
    adjust(&mut config, dir.path());
    let node = server::start(config).await.expect("start node");
    let (_, token) = node
        .core
        .cluster_init("primary")
        .await
        .expect("cluster init");
    node.core
        .create_tenant("demo")
        .await
        .expect("create tenant");
    node.core
        .create_volume(VOLUME, VOLUME_BYTES, "")
        .await
        .expect("create volume");
    TestNode {
        node: Some(node),
        dir,
        token,
    }
}

/// An S3 client with a new full credential of tenant `demo`.
pub async fn demo_s3(node: &TestNode) -> aws_sdk_s3::Client {
    let (credential, secret) = node
        .running()
        .core
        .create_credential("demo", lifeboat_node::core::CredentialMode::Full, None)
        .await
        .expect("create credential");
    lifeboat_chaos_tests::s3_client::client(
        &format!("http://{}", node.running().s3_addr),
        &credential.access_key,
        &secret,
    )
}

/// Panics with a clear message unless `program` (installed by `make test`)
/// is on the PATH.
pub fn must_have(program: &str) {
    lifeboat_chaos_tests::harness::must_have_tool(program);
}

/// Runs a tool (installed by `make test`) and returns its stdout; panics
/// with its output if it fails.
pub fn must_run(program: &str, args: &[&str]) -> String {
    lifeboat_chaos_tests::harness::must_have_tool(program);
    let out = Command::new(program).args(args).output().expect("run tool");
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
