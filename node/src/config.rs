//! The node's TOML configuration. Every key has a default and a comment in
//! `etc/lifeboat.example.toml`; a test proves the example equals the
//! defaults, so the two cannot drift.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    pub site: String,
    pub role: NodeRole,
    pub data_dir: PathBuf,
    pub master_key_file: PathBuf,
    pub admin: AdminConfig,
    pub nbd: NbdConfig,
    pub http: HttpConfig,
    pub s3: S3Config,
    pub store: StoreConfig,
    pub history: HistoryConfig,
    pub raft: RaftConfig,
}

/// What a node is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Stores volumes and buckets, serves NBD and S3.
    Data,
    /// Votes in the catalog only: no data, no keys, no clients.
    Witness,
}

impl NodeRole {
    pub fn is_witness(self) -> bool {
        self == NodeRole::Witness
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdConfig {
    pub listen: SocketAddr,
    pub requests_in_flight_max: usize,
    pub request_bytes_max: u32,
    /// Who must use TLS (STARTTLS with a tenant certificate, which then
    /// limits the connection to that tenant's volumes): "off-loopback"
    /// (clients not on a loopback address) or "always".
    pub tls_required: NbdTlsRequired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NbdTlsRequired {
    OffLoopback,
    Always,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    pub listen: SocketAddr,
    /// Domains for virtual-host-style addressing (`BUCKET.DOMAIN`);
    /// path-style requests work on any host.
    pub domains: Vec<String>,
    /// The region the gateway answers GetBucketLocation with (clients sign
    /// for a region; any is accepted).
    pub region: String,
    /// Object writes in flight per request: entries of up to 1 MiB being
    /// replicated while the next chunk is read.
    pub chunks_in_flight_max: usize,
    /// Multipart uploads not completed this long after they were created
    /// are aborted, their parts' space reclaimed.
    pub abandoned_upload_age_ms: u64,
    /// Object data written ahead of the entry that names it is released
    /// when its upload has written nothing for this long (its client or
    /// node died midway).
    pub abandoned_stream_age_ms: u64,
    /// How often each PG's leader looks for abandoned uploads and streams.
    pub sweep_interval_ms: u64,
    /// HTTPS: the certificate chain and key (PEM) the endpoint presents.
    /// Both set: the S3 port speaks only HTTPS; neither: plain HTTP.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub zstd_level: i32,
    pub reserve_bytes: u64,
    pub block_cache_bytes: usize,
}

/// The continuous-protection window and its GC (see `lifeboat_store::gc`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Every moment this recent stays restorable, for PGs that did not
    /// set their own window (`pg set-window`).
    pub window_ms: u64,
    /// How often PG leaders move their horizon and run the scanner.
    pub gc_interval_ms: u64,
    /// Version rows one scanner step reads (one log entry each).
    pub gc_step_rows: u32,
    /// Pause between scanner steps, so that writes always get through.
    pub gc_step_pause_ms: u64,
    /// A PG written to since its last census gets a new scanner pass (which
    /// counts its live, history and pinned bytes, reading every version it
    /// keeps) this often; passes that the horizon's moves start count too.
    pub census_interval_ms: u64,
    /// A PG leader reports its stored bytes to the catalog (how nodes
    /// that do not host a PG count it against its tenant's quota) when
    /// they have moved by 16 MiB, or moved at all and the last report is
    /// this old.
    pub usage_report_interval_ms: u64,
    /// Free space counts as short at or below the store's reserve plus
    /// this: the node raises `space_short` and follows `when_space_short`.
    pub space_short_bytes: u64,
    /// What to do when space runs short: keep every window and let writes
    /// stop at the reserve ("refuse-writes"), or halve the windows of the
    /// PGs this node leads, down to `window_min_ms`, each with an event
    /// ("shrink-windows"). Windows never shrink otherwise.
    pub when_space_short: SpaceShortPolicy,
    pub window_min_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpaceShortPolicy {
    RefuseWrites,
    ShrinkWindows,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub listen: SocketAddr,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub pg_voters: usize,
    pub pg_learners_per_site: usize,
    /// Bytes of log each PG member keeps at most. A standby further behind
    /// than the log reaches catches up through a Raft snapshot instead.
    pub log_retain_bytes: u64,
    /// How often each member checks its log against `log_retain_bytes`.
    pub log_check_interval_ms: u64,
    /// Deleted log segment files (64 MiB each) the node keeps for reuse by
    /// any PG: overwriting a file whose pages are cached and whose blocks
    /// are allocated is cheaper than writing a new one. 0 keeps none. They
    /// are deleted, and no more kept, while free space is short, and before
    /// a write is refused at the reserve.
    pub log_segment_pool: usize,
    /// Under the `remote` ack policy, how long a write waits for a standby
    /// site before the PG degrades to `local` (with an event and a metric).
    pub remote_timeout_ms: u64,
    /// Addresses this node dials instead of a peer's advertised Raft
    /// address (advertised → dialled), for NAT or a relay between sites.
    pub dial: std::collections::BTreeMap<String, String>,
    /// Keep protection groups alive with one beat per node pair every
    /// heartbeat interval (true), or with openraft's own per-group
    /// heartbeats and election timers (false: each idle PG then costs about
    /// 0.1% of a core per member; kept for comparison and as a fallback).
    /// The catalog always uses its own.
    pub node_heartbeats: bool,
    /// The site lease this node grants while it leads the catalog: a PG
    /// leader acknowledges only under one, so a site cut off from the
    /// catalog stops acknowledging within this long, and a forced failover
    /// waits this long (plus 1% for clock drift) before the new site
    /// serves. Renewed every quarter of it.
    pub lease_ms: u64,
    /// Automatic forced failover (0: off). While this node leads the
    /// catalog, when no data node of a PG's active site has renewed its
    /// lease for this long, it fails that site's PGs over to the site
    /// holding most of their standbys, as `lifeboat failover --force`
    /// (refused while a majority of a PG's voters answers; the old lease
    /// is waited out). At least the lease; a catalog that can outlive a
    /// site needs a witness.
    pub auto_failover_after_ms: u64,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            site: "primary".into(),
            role: NodeRole::Data,
            data_dir: PathBuf::from("data"),
            master_key_file: PathBuf::from("keys/master.key"),
            admin: AdminConfig::default(),
            nbd: NbdConfig::default(),
            http: HttpConfig::default(),
            s3: S3Config::default(),
            store: StoreConfig::default(),
            history: HistoryConfig::default(),
            raft: RaftConfig::default(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: loopback(7700),
        }
    }
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: loopback(10809),
            requests_in_flight_max: 64,
            request_bytes_max: 32 << 20,
            tls_required: NbdTlsRequired::OffLoopback,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: loopback(9100),
        }
    }
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            listen: loopback(9000),
            domains: vec!["localhost".into()],
            region: "us-east-1".into(),
            chunks_in_flight_max: 4,
            abandoned_upload_age_ms: 7 * 24 * 3600 * 1000,
            abandoned_stream_age_ms: 3600 * 1000,
            sweep_interval_ms: 60_000,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            zstd_level: 1,
            reserve_bytes: 256 << 20,
            block_cache_bytes: 256 << 20,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            window_ms: lifeboat_store::gc::DEFAULT_WINDOW_MS,
            gc_interval_ms: 2_000,
            gc_step_rows: 4096,
            gc_step_pause_ms: 20,
            census_interval_ms: 3_600_000,
            usage_report_interval_ms: 30_000,
            space_short_bytes: 1 << 30,
            when_space_short: SpaceShortPolicy::RefuseWrites,
            window_min_ms: 3_600_000,
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            listen: loopback(7800),
            heartbeat_interval_ms: 500,
            election_timeout_min_ms: 2000,
            election_timeout_max_ms: 4000,
            pg_voters: 3,
            pg_learners_per_site: 3,
            log_retain_bytes: 1 << 30,
            log_check_interval_ms: 5000,
            log_segment_pool: 16,
            remote_timeout_ms: 5000,
            dial: Default::default(),
            node_heartbeats: true,
            lease_ms: 4000,
            auto_failover_after_ms: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl NodeConfig {
    /// Reads, validates and resolves relative paths against the file's
    /// directory.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        config.data_dir = base.join(&config.data_dir);
        config.master_key_file = base.join(&config.master_key_file);
        for file in [&mut config.s3.tls_cert_file, &mut config.s3.tls_key_file]
            .into_iter()
            .flatten()
        {
            *file = base.join(&*file);
        }
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must be at least 1".into());
        }
        if !(0..=22).contains(&self.store.zstd_level) {
            return Err(format!(
                "store.zstd_level {} is outside 0..=22",
                self.store.zstd_level
            ));
        }
        if self.nbd.request_bytes_max < 4096 {
            return Err("nbd.request_bytes_max must be at least 4096".into());
        }
        if self.s3.chunks_in_flight_max == 0 {
            return Err("s3.chunks_in_flight_max must be at least 1".into());
        }
        if self.s3.tls_cert_file.is_some() != self.s3.tls_key_file.is_some() {
            return Err("s3.tls_cert_file and s3.tls_key_file go together".into());
        }
        if self.s3.sweep_interval_ms == 0 {
            return Err("s3.sweep_interval_ms must be positive".into());
        }
        if self.nbd.requests_in_flight_max == 0 {
            return Err("nbd.requests_in_flight_max must be at least 1".into());
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(
                "raft timers need 0 < heartbeat_interval_ms < election_timeout_min_ms".into(),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err("raft.election_timeout_max_ms must exceed election_timeout_min_ms".into());
        }
        if r.listen.ip().is_unspecified() {
            return Err(format!(
                "raft.listen {} is what other nodes dial: give this node's own address",
                r.listen
            ));
        }
        if r.log_retain_bytes < 64 << 10 {
            return Err("raft.log_retain_bytes must be at least 65536".into());
        }
        if r.log_check_interval_ms == 0 || r.remote_timeout_ms == 0 {
            return Err(
                "raft.log_check_interval_ms and raft.remote_timeout_ms must be positive".into(),
            );
        }
        if r.pg_voters == 0 || r.pg_voters.is_multiple_of(2) {
            return Err("raft.pg_voters must be odd (1, 3, 5)".into());
        }
        if r.auto_failover_after_ms != 0 && r.auto_failover_after_ms < r.lease_ms {
            return Err(
                "raft.auto_failover_after_ms must be 0 (off) or at least raft.lease_ms".into(),
            );
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_equals_the_defaults() {
        let text = include_str!("../../etc/lifeboat.example.toml");
        let parsed: NodeConfig = toml::from_str(text).unwrap();
        assert_eq!(parsed, NodeConfig::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<NodeConfig>("nod_id = 3").is_err());
        let c: NodeConfig = toml::from_str("[raft]\nelection_timeout_min_ms = 10").unwrap();
        assert!(c.validate().is_err());
        for (toml, says) in [
            ("[raft]\nlog_retain_bytes = 1000", "log_retain_bytes"),
            ("[raft]\nremote_timeout_ms = 0", "remote_timeout_ms"),
            ("[raft]\nlog_check_interval_ms = 0", "log_check_interval_ms"),
            ("[s3]\ntls_cert_file = \"c.pem\"", "tls_key_file"),
            ("[s3]\nchunks_in_flight_max = 0", "chunks_in_flight_max"),
            (
                "[raft]\nlease_ms = 2000\nauto_failover_after_ms = 1000",
                "auto_failover_after_ms",
            ),
        ] {
            let c: NodeConfig = toml::from_str(toml).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.contains(says), "{toml}: {e}");
        }
        assert!(toml::from_str::<NodeConfig>("[nbd]\ntls_required = \"never\"").is_err());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "data_dir = \"d\"\n").unwrap();
        let c = NodeConfig::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("d"));
        assert_eq!(c.master_key_file, dir.path().join("keys/master.key"));
    }
}
