//! Node processes for tests: config in a temp dir, free loopback ports,
//! start / SIGTERM / SIGKILL / restart, and the CLI against them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a node may take to become healthy after start.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The `lifeboat` binary: `LIFEBOAT_BIN`, else beside the test executable's
/// directory (`target/PROFILE/deps/test-…` → `target/PROFILE/lifeboat`).
pub fn lifeboat_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LIFEBOAT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/PROFILE/deps");
    profile_dir.join("lifeboat")
}

/// A loopback port for a test node to listen on, free a moment ago.
///
/// Ports come from below the kernel's ephemeral range (32768–60999 on
/// Debian). A port in that range can become the local end of any outgoing
/// connection, so while a node is down its own port could be taken and its
/// restart fail with "Address already in use" (seen in CI: a node killed,
/// then started again, never came up). A process-wide counter keeps the tests
/// of one binary from being handed the same port; the chaos tests' `lifeboat
/// up` port offsets put its ports at 24700 and above, past this range.
pub fn free_port() -> u16 {
    const FIRST: u32 = 11_000;
    const SPAN: u32 = 13_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Each test binary starts somewhere else in the range, so ports of nodes
    // a previous binary left behind are not the first ones tried.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// Whether a Debian tool is installed (tests that need it say so and fail
/// loudly when it is missing: `make test` installs them).
pub fn must_have_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run `make test`, which installs it"
    );
}

pub struct TestNode {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub node_id: u64,
    pub site: String,
    pub raft: SocketAddr,
    pub admin: SocketAddr,
    pub nbd: SocketAddr,
    pub http: SocketAddr,
    pub s3: SocketAddr,
    pub token: Option<String>,
    child: Option<Child>,
    /// (data dir, master key file, extra TOML) the config is made from.
    config_base: (PathBuf, PathBuf, String),
    /// Once a node has run, its addresses are known to its cluster and
    /// never change.
    ever_started: bool,
}

impl TestNode {
    /// Writes a config under `dir` with free ports; `extra` is appended as
    /// TOML (it may set `[store]` or `[raft]` keys).
    pub fn new(dir: &Path, data_dir: &Path, extra: &str) -> Result<TestNode> {
        TestNode::member(
            dir,
            data_dir,
            1,
            "primary",
            &dir.join("keys/master.key"),
            extra,
        )
    }

    /// Like [`TestNode::new`] for node `node_id` of a cluster: nodes of one
    /// cluster share `master_key_file`.
    pub fn member(
        dir: &Path,
        data_dir: &Path,
        node_id: u64,
        site: &str,
        master_key_file: &Path,
        extra: &str,
    ) -> Result<TestNode> {
        std::fs::create_dir_all(dir)?;
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut node = TestNode {
            dir: dir.to_owned(),
            config_path: dir.join("node.toml"),
            node_id,
            site: site.to_owned(),
            raft: unbound,
            admin: unbound,
            nbd: unbound,
            http: unbound,
            s3: unbound,
            token: None,
            child: None,
            config_base: (
                data_dir.to_owned(),
                master_key_file.to_owned(),
                extra.to_owned(),
            ),
            ever_started: false,
        };
        node.write_config()?;
        Ok(node)
    }

    /// Picks free ports and writes the config with them.
    fn write_config(&mut self) -> Result<()> {
        let port = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        (self.raft, self.admin, self.nbd, self.http, self.s3) =
            (port(), port(), port(), port(), port());
        self.write_config_file()
    }

    /// Appends TOML to the config (for example a `[raft.dial]` table); the
    /// node's ports stay. Takes effect at its next start.
    pub fn add_config(&mut self, toml: &str) -> Result<()> {
        self.config_base.2.push('\n');
        self.config_base.2.push_str(toml);
        self.write_config_file()
    }

    fn write_config_file(&self) -> Result<()> {
        let (data_dir, master_key_file, extra) = &self.config_base;
        // By this harness's convention a node at site `witness` is one.
        let role = if self.site == "witness" {
            "witness"
        } else {
            "data"
        };
        let config = format!(
            "node_id = {}\nsite = {:?}\nrole = {role:?}\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
             [raft]\nlisten = \"{}\"\n[admin]\nlisten = \"{}\"\n[nbd]\nlisten = \"{}\"\n\
             [http]\nlisten = \"{}\"\n[s3]\nlisten = \"{}\"\n{extra}\n",
            self.node_id,
            self.site,
            data_dir.display().to_string(),
            master_key_file.display().to_string(),
            self.raft,
            self.admin,
            self.nbd,
            self.http,
            self.s3,
        );
        std::fs::write(&self.config_path, merge_sections(&config))?;
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Starts the node process and waits until `/health` says ok.
    ///
    /// A free port can be taken by another test between `free_port` and the
    /// node's bind: before the node first ran, it then gets new ports and
    /// tries again.
    pub fn start(&mut self) -> Result<()> {
        let mut attempts = 0;
        loop {
            self.spawn()?;
            match self.wait_healthy() {
                Ok(()) => {
                    self.ever_started = true;
                    return Ok(());
                }
                Err(e)
                    if !self.ever_started
                        && attempts < 3
                        && e.to_string().contains("Address already in use") =>
                {
                    attempts += 1;
                    self.write_config()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Wipes the node's data and starts it as a node that never ran: a new
    /// machine given an old node's id. It gets new ports (its old ones may
    /// be taken while it was down) and is waited for like a new node.
    pub fn start_wiped(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "node still running");
        let data_dir = &self.config_base.0;
        if data_dir.exists() {
            std::fs::remove_dir_all(data_dir)?;
        }
        self.ever_started = false;
        self.write_config()?;
        self.start()
    }

    /// Starts the node process without waiting: a node of a cluster that is
    /// all down is healthy only once a quorum of its peers is back too.
    pub fn spawn(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))?;
        let child = Command::new(lifeboat_bin())
            .args(["node", "start", "--config"])
            .arg(&self.config_path)
            // LIFEBOAT_TEST_LOG=debug (or any filter) to see more of a
            // failing scenario in its nodes' logs.
            .env(
                "LIFEBOAT_LOG",
                std::env::var("LIFEBOAT_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", lifeboat_bin().display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/health` says ok (every PG on the node knows a leader).
    pub fn wait_healthy(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait()? {
                self.child = None;
                bail!(
                    "node exited during start: {status}; log:\n{}",
                    self.log_tail()
                );
            }
            if http_get(self.http, "/health").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if started.elapsed() > NODE_READY_TIMEOUT {
                bail!(
                    "node not healthy after {NODE_READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the process to exit; returns whether it exited
    /// 0, and says why not in the log.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let started = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                if !status.success() {
                    eprintln!(
                        "node exited with {status} after SIGTERM; log:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(status.success());
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                let _ = c.wait();
                bail!("node did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `lifeboat ARGS` against this node with its token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(self.token.as_deref(), args)
    }

    /// Runs the CLI against this node with another token (a tenant's).
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        self.cli_with(Some(token), args)
    }

    fn cli_with(&self, token: Option<&str>, args: &[&str]) -> Output {
        self.cli_command(token, args)
            .output()
            .expect("run lifeboat")
    }

    /// `lifeboat ARGS` against this node with `token`, not started (for a
    /// test that sets its own stdio).
    pub fn cli_command(&self, token: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = Command::new(lifeboat_bin());
        cmd.arg("--endpoint").arg(self.endpoint()).args(args);
        match token {
            Some(t) => cmd.env("LIFEBOAT_TOKEN", t),
            None => cmd.env_remove("LIFEBOAT_TOKEN"),
        };
        cmd
    }

    /// Starts `lifeboat ARGS` against this node with its token, its stdout
    /// piped, without waiting (for commands that run until stopped, like
    /// `events --follow`).
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        self.cli_command(self.token.as_deref(), args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lifeboat")
    }

    /// A new full S3 credential of `tenant`: (access key, secret).
    pub fn must_create_credential(&self, tenant: &str) -> (String, String) {
        let created: serde_json::Value = serde_json::from_str(&self.must_cli(&[
            "--output",
            "json",
            "tenant",
            "credential",
            "create",
            tenant,
        ]))
        .expect("credential create prints JSON");
        let field = |name: &str| {
            created[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {created}"))
                .to_owned()
        };
        (field("access_key"), field("secret_key"))
    }

    /// Runs the CLI and panics with its output unless it succeeds.
    pub fn must_cli(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "lifeboat {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `cluster init`, keeping the operator token for later CLI calls.
    pub fn must_init(&mut self) {
        let token_path = self.dir.join("operator.token");
        self.must_cli(&[
            "cluster",
            "init",
            "--token-out",
            token_path.to_str().expect("utf-8 path"),
        ]);
        self.token = Some(
            std::fs::read_to_string(&token_path)
                .expect("token file")
                .trim()
                .to_owned(),
        );
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts one node process per entry of `sites` (node ids 1, 2, …; node
/// `i` in `dir/n{i}`), all sharing the master key file `dir/keys/master.key`
/// and `extra` TOML, in no cluster yet.
pub fn start_nodes(dir: &Path, sites: &[&str], extra: &str) -> Result<Vec<TestNode>> {
    let key = dir.join("keys/master.key");
    let mut nodes = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        let node_dir = dir.join(format!("n{i}"));
        let mut n = TestNode::member(
            &node_dir,
            &node_dir.join("data"),
            i as u64 + 1,
            site,
            &key,
            extra,
        )?;
        n.start()?;
        nodes.push(n);
    }
    Ok(nodes)
}

/// `cluster init` on the first node, `node add` of the others at their
/// sites; every node then carries the operator token for CLI calls.
pub fn form_cluster(nodes: &mut [TestNode]) {
    nodes[0].must_init();
    let token = nodes[0].token.clone();
    for i in 1..nodes.len() {
        let (endpoint, site) = (nodes[i].endpoint(), nodes[i].site.clone());
        nodes[0].must_cli(&["node", "add", &endpoint, "--site", &site]);
        nodes[i].token = token.clone();
    }
}

/// Appends `extra` TOML sections without repeating a section header that the
/// base config already has (TOML forbids defining a table twice).
fn merge_sections(config: &str) -> String {
    let mut sections: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    for line in config.lines() {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            if let Some(i) = sections.iter().position(|(h, _)| h == t) {
                let s = sections.remove(i);
                sections.push(s);
            } else {
                sections.push((t.to_owned(), Vec::new()));
            }
        } else if !t.is_empty() {
            sections
                .last_mut()
                .expect("at least the root")
                .1
                .push(line.to_owned());
        }
    }
    let mut out = String::new();
    for (header, lines) in sections {
        if !header.is_empty() {
            out.push_str(&header);
            out.push('\n');
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// A plain HTTP/1.0 GET; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_sections_keeps_one_header_each() {
        let merged = merge_sections("a = 1\n[store]\nx = 1\n[raft]\ny = 2\n[store]\nz = 3\n");
        assert_eq!(merged.matches("[store]").count(), 1);
        let parsed: toml::Table = merged.parse().unwrap();
        assert_eq!(parsed["store"]["z"].as_integer(), Some(3));
        assert_eq!(parsed["store"]["x"].as_integer(), Some(1));
    }
}
