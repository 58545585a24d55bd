//! Prometheus metrics and the HTTP endpoints `/metrics` and `/health`.
//!
//! Counters the write and read paths bump directly live here; values owned
//! elsewhere (NBD statistics, Raft progress, free space) are copied into
//! gauges at scrape time, so nothing is sampled when nobody is looking.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::NodeCore;
use crate::nbd::{Errno, NbdStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PgLabels {
    pub pg: String,
}

/// A standby member as its PG's leader sees it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub pg: String,
    pub node: String,
    pub site: String,
}

/// One kind of a PG's bytes (see `lifeboat_store::usage`): "stored"
/// (exact), or "live", "history" and "pinned" from its last census.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PgBytesLabels {
    pub pg: String,
    /// TENANT/NAME, so that a tenant's bytes sum by label.
    pub name: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrnoLabels {
    pub errno: String,
}

pub struct Metrics {
    registry: Registry,
    /// Frames that failed CRC, AEAD or decoding on read.
    pub corrupt_frames: Counter,
    /// Writes refused because free space reached the reserve.
    pub writes_refused_no_space: Counter,
    pub writes_refused_quota: Counter,
    /// Multipart uploads aborted by the sweep for their age.
    pub s3_uploads_expired: Counter,
    /// Streams of chunks written ahead and never named, released by the
    /// sweep (an upload whose client or node died midway).
    pub s3_streams_released: Counter,
    /// Snapshots made by PG schedules, and scheduled ones their retention
    /// deleted.
    pub scheduled_snapshots: Counter,
    pub scheduled_snapshots_pruned: Counter,
    /// Versions and bytes the history's GC deleted (on PG leaders' steps;
    /// every replica deletes the same).
    pub gc_versions_reclaimed: Counter,
    pub gc_bytes_reclaimed: Counter,
    /// Delta resyncs of kept replicas done here, and the row bytes they
    /// received (see `crate::failback`).
    pub resyncs: Counter,
    pub resync_bytes_received: Counter,
    nbd_requests: Family<OpLabels, Gauge>,
    nbd_errors: Family<ErrnoLabels, Gauge>,
    nbd_bytes_read: Gauge,
    nbd_bytes_written: Gauge,
    nbd_connections_active: Gauge,
    pg_applied_index: Family<PgLabels, Gauge>,
    pg_last_log_index: Family<PgLabels, Gauge>,
    pg_is_leader: Family<PgLabels, Gauge>,
    pg_ack_degraded: Family<PgLabels, Gauge>,
    pg_ack_degradations: Family<PgLabels, Gauge>,
    pg_oldest_restorable_seconds: Family<PgLabels, Gauge>,
    pg_bytes: Family<PgBytesLabels, Gauge>,
    pg_versions: Family<PgLabels, Gauge>,
    replication_lag_entries: Family<LagLabels, Gauge>,
    replication_lag_bytes: Family<LagLabels, Gauge>,
    replication_lag_seconds: Family<LagLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    data_dir_free_bytes: Gauge,
    log_segment_pool_bytes: Gauge,
    lease_remaining_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("lifeboat");
        let m = Metrics {
            corrupt_frames: Counter::default(),
            writes_refused_no_space: Counter::default(),
            writes_refused_quota: Counter::default(),
            s3_uploads_expired: Counter::default(),
            s3_streams_released: Counter::default(),
            scheduled_snapshots: Counter::default(),
            scheduled_snapshots_pruned: Counter::default(),
            gc_versions_reclaimed: Counter::default(),
            gc_bytes_reclaimed: Counter::default(),
            resyncs: Counter::default(),
            resync_bytes_received: Counter::default(),
            nbd_requests: Family::default(),
            nbd_errors: Family::default(),
            nbd_bytes_read: Gauge::default(),
            nbd_bytes_written: Gauge::default(),
            nbd_connections_active: Gauge::default(),
            pg_applied_index: Family::default(),
            pg_last_log_index: Family::default(),
            pg_is_leader: Family::default(),
            pg_ack_degraded: Family::default(),
            pg_ack_degradations: Family::default(),
            pg_oldest_restorable_seconds: Family::default(),
            pg_bytes: Family::default(),
            pg_versions: Family::default(),
            replication_lag_entries: Family::default(),
            replication_lag_bytes: Family::default(),
            replication_lag_seconds: Family::default(),
            data_dir_free_bytes: Gauge::default(),
            log_segment_pool_bytes: Gauge::default(),
            lease_remaining_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "store_corrupt_frames",
            "Stored frames that failed their CRC, AEAD tag or decoding (store.corrupt_frame)",
            m.corrupt_frames.clone(),
        );
        registry.register(
            "writes_refused_no_space",
            "Writes refused because free space reached the configured reserve",
            m.writes_refused_no_space.clone(),
        );
        registry.register(
            "writes_refused_quota",
            "Writes refused because their tenant was at its quota",
            m.writes_refused_quota.clone(),
        );
        registry.register(
            "s3_uploads_expired",
            "Multipart uploads aborted because they were older than s3.abandoned_upload_age_ms",
            m.s3_uploads_expired.clone(),
        );
        registry.register(
            "s3_streams_released",
            "Object data written ahead and never named (a dead upload), released by the sweep",
            m.s3_streams_released.clone(),
        );
        registry.register(
            "scheduled_snapshots",
            "Snapshots made by protection groups' schedules (on their leaders)",
            m.scheduled_snapshots.clone(),
        );
        registry.register(
            "scheduled_snapshots_pruned",
            "Scheduled snapshots deleted by their schedule's retention",
            m.scheduled_snapshots_pruned.clone(),
        );
        registry.register(
            "gc_versions_reclaimed",
            "Versions the history's GC deleted (past the window, unpinned), counted on PG leaders",
            m.gc_versions_reclaimed.clone(),
        );
        registry.register(
            "gc_bytes_reclaimed",
            "Bytes of versions and chunks the history's GC deleted, counted on PG leaders",
            m.gc_bytes_reclaimed.clone(),
        );
        registry.register(
            "nbd_requests",
            "NBD requests received, by command",
            m.nbd_requests.clone(),
        );
        registry.register(
            "nbd_errors",
            "NBD error replies sent, by errno",
            m.nbd_errors.clone(),
        );
        registry.register(
            "nbd_read_bytes",
            "Bytes returned by NBD reads",
            m.nbd_bytes_read.clone(),
        );
        registry.register(
            "nbd_written_bytes",
            "Bytes accepted by NBD writes",
            m.nbd_bytes_written.clone(),
        );
        registry.register(
            "nbd_connections_active",
            "Open NBD connections",
            m.nbd_connections_active.clone(),
        );
        registry.register(
            "pg_applied_index",
            "Last log index applied by this node's member of each protection group",
            m.pg_applied_index.clone(),
        );
        registry.register(
            "pg_last_log_index",
            "Last log index in this node's log of each protection group",
            m.pg_last_log_index.clone(),
        );
        registry.register(
            "pg_oldest_restorable_seconds",
            "Oldest moment this node's replica of each PG can still restore to (Unix seconds; 0: none yet)",
            m.pg_oldest_restorable_seconds.clone(),
        );
        registry.register(
            "pg_bytes",
            "Bytes of each PG's data on this replica: kind=stored is exact (every block version and chunk frame kept, what tenant quotas count); live, history and pinned are its last census",
            m.pg_bytes.clone(),
        );
        registry.register(
            "pg_versions",
            "Block and object version rows each PG keeps",
            m.pg_versions.clone(),
        );
        registry.register(
            "pg_is_leader",
            "1 if this node leads the protection group",
            m.pg_is_leader.clone(),
        );
        registry.register(
            "pg_ack_degraded",
            "1 while this node leads a PG whose remote ack policy has degraded to local",
            m.pg_ack_degraded.clone(),
        );
        registry.register(
            "pg_ack_degradations",
            "Times this node, as leader, degraded the PG's remote ack policy to local",
            m.pg_ack_degradations.clone(),
        );
        registry.register(
            "replication_lag_entries",
            "Log entries a member lacks behind its PG's leader (reported by the leader)",
            m.replication_lag_entries.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "Encoded bytes of the entries a member lacks (reported by the leader)",
            m.replication_lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Age of the oldest entry a member lacks, in seconds: the live RPO of a standby",
            m.replication_lag_seconds.clone(),
        );
        registry.register(
            "resyncs",
            "Delta resyncs of a kept replica into its PG's new generation done on this node",
            m.resyncs.clone(),
        );
        registry.register(
            "resync_bytes_received",
            "Key and value bytes received by delta resyncs on this node",
            m.resync_bytes_received.clone(),
        );
        registry.register(
            "data_dir_free_bytes",
            "Free bytes on the data directory's filesystem",
            m.data_dir_free_bytes.clone(),
        );
        registry.register(
            "log_segment_pool_bytes",
            "Bytes of deleted Raft log segments kept for reuse; the node deletes them before it refuses a write at the reserve",
            m.log_segment_pool_bytes.clone(),
        );
        registry.register(
            "lease_remaining_seconds",
            "How long this node's site lease has left: its PG leaders acknowledge only while it is above 0",
            m.lease_remaining_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    fn refresh(&self, core: &NodeCore, nbd: &NbdStats) {
        let s = nbd.snapshot();
        for (op, v) in [
            ("read", s.requests_read),
            ("write", s.requests_write),
            ("flush", s.requests_flush),
            ("trim", s.requests_trim),
            ("write_zeroes", s.requests_write_zeroes),
            ("disc", s.requests_disc),
            ("other", s.requests_other),
        ] {
            self.nbd_requests
                .get_or_create(&OpLabels { op: op.into() })
                .set(v as i64);
        }
        for (i, errno) in Errno::ALL.iter().enumerate() {
            self.nbd_errors
                .get_or_create(&ErrnoLabels {
                    errno: format!("{errno:?}").to_uppercase(),
                })
                .set(s.errors[i] as i64);
        }
        self.nbd_bytes_read
            .set(nbd.bytes_read.load(Ordering::Relaxed) as i64);
        self.nbd_bytes_written
            .set(nbd.bytes_written.load(Ordering::Relaxed) as i64);
        self.nbd_connections_active.set(s.connections_active as i64);
        for g in core.groups() {
            let m = g.metrics();
            let labels = PgLabels {
                pg: g.pg().0.to_string(),
            };
            self.pg_applied_index
                .get_or_create(&labels)
                .set(m.applied_index.0 as i64);
            self.pg_last_log_index
                .get_or_create(&labels)
                .set(m.last_log_index.0 as i64);
            self.pg_is_leader
                .get_or_create(&labels)
                .set(i64::from(m.is_leader));
            let ack = g.ack().status();
            self.pg_ack_degraded
                .get_or_create(&labels)
                .set(i64::from(ack.degraded && m.is_leader));
            self.pg_ack_degradations
                .get_or_create(&labels)
                .set(ack.degradations as i64);
            let oldest_ms = core.history.oldest_ms(g.pg()).ok().flatten().unwrap_or(0);
            self.pg_oldest_restorable_seconds
                .get_or_create(&labels)
                .set((oldest_ms / 1000) as i64);
            if let Ok(u) = lifeboat_store::usage::usage(&core.db, g.pg()) {
                let name = core.pg_display_name(g.pg());
                let census = u.census.unwrap_or_default();
                for (kind, bytes) in [
                    ("stored", u.stored_bytes),
                    ("live", census.live_bytes),
                    ("history", census.history_bytes),
                    ("pinned", census.pinned_bytes),
                ] {
                    self.pg_bytes
                        .get_or_create(&PgBytesLabels {
                            pg: labels.pg.clone(),
                            name: name.clone(),
                            kind: kind.into(),
                        })
                        .set(bytes as i64);
                }
                self.pg_versions
                    .get_or_create(&labels)
                    .set(u.versions as i64);
            }
        }
        // Only leaders know lag: series of PGs this node no longer leads go.
        self.replication_lag_entries.clear();
        self.replication_lag_bytes.clear();
        self.replication_lag_seconds.clear();
        for g in core.groups() {
            for l in g.lag() {
                let labels = LagLabels {
                    pg: g.pg().0.to_string(),
                    node: l.node.node_id.to_string(),
                    site: l.node.site.clone(),
                };
                self.replication_lag_entries
                    .get_or_create(&labels)
                    .set(l.lag.entries as i64);
                self.replication_lag_bytes
                    .get_or_create(&labels)
                    .set(l.lag.bytes as i64);
                self.replication_lag_seconds
                    .get_or_create(&labels)
                    .set(l.lag.seconds);
            }
        }
        if let Ok(free) = lifeboat_store::db::free_bytes(core.db.path()) {
            self.data_dir_free_bytes.set(free as i64);
        }
        self.log_segment_pool_bytes
            .set(core.log_segment_pool_bytes() as i64);
        self.lease_remaining_seconds.set(
            core.leases
                .remaining(std::time::Instant::now())
                .as_secs_f64(),
        );
    }

    pub fn render(&self, core: &NodeCore, nbd: &NbdStats) -> String {
        self.refresh(core, nbd);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone)]
struct HttpState {
    core: Arc<NodeCore>,
    nbd: Arc<NbdStats>,
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.core.metrics.render(&s.core, &s.nbd),
    )
}

async fn health(State(s): State<HttpState>) -> impl IntoResponse {
    let initialized = s.core.is_initialized();
    let groups = s.core.groups();
    let leaderless: Vec<u64> = groups
        .iter()
        .filter(|g| g.metrics().leader.is_none())
        .map(|g| g.pg().0)
        .collect();
    let healthy = leaderless.is_empty();
    let body = format!(
        "{{\"status\":\"{}\",\"initialized\":{},\"node_id\":{},\"groups\":{},\"groups_without_leader\":{:?}}}\n",
        if healthy { "ok" } else { "degraded" },
        initialized,
        s.core.config.node_id,
        groups.len(),
        leaderless,
    );
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

pub fn router(core: Arc<NodeCore>, nbd: Arc<NbdStats>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(HttpState { core, nbd })
}
