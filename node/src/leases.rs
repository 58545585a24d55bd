//! This node's site lease (DESIGN.md "Site leases and the witness";
//! `lifeboat_replication::lease` has the rules): granted by the catalog's
//! leader to each data node for the PGs active at its site, renewed every
//! quarter of its life and at once when a PG leader on this node finds
//! itself without one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::EventSink;
use lifeboat_replication::transport;
use lifeboat_store::{Generation, PgId};
use tonic::Status;

use crate::core::NodeCore;

/// After a failed attempt, the next one waits at least this long, however
/// many leaders want a lease meanwhile.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How often the catalog's leader records the progress reports gathered
/// from lease renewals: one catalog entry for every PG at most this often.
pub const PROGRESS_RECORD_EVERY: Duration = Duration::from_secs(1);

/// Entry sizes a progress report carries at most (see `pb::PgProgress`):
/// the lower bound of a forced failover's loss in bytes is exact up to
/// this many entries.
const PROGRESS_TAIL_MAX: usize = 64;

impl NodeCore {
    /// The lease's life, as this node grants it when it leads the catalog.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_millis(self.config.raft.lease_ms)
    }

    /// On the catalog's leader: node `from`'s lease, for every PG active at
    /// its site. Decided after a read index, so that a grant never follows
    /// a committed entry that moved a PG away (what a failover waits out).
    pub async fn grant_lease(
        &self,
        from: u64,
        progress: Vec<pb::PgProgress>,
    ) -> Result<pb::LeaseReply, Status> {
        let unavailable = |e: &dyn std::fmt::Display| Status::unavailable(e.to_string());
        let catalog = self.catalog_group().map_err(|e| unavailable(&e))?;
        let index = catalog
            .read_index_local()
            .await
            .map_err(|e| unavailable(&e))?;
        catalog
            .wait_applied_index(index, self.lease_duration())
            .await
            .map_err(|e| unavailable(&e))?;
        let internal = |e: std::io::Error| Status::internal(format!("read catalog: {e}"));
        let node = self
            .catalog
            .node(from)
            .map_err(internal)?
            .filter(|n| !n.removed && !n.witness)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "node {from} is not a data node of this cluster: no lease"
                ))
            })?;
        let pgs = self
            .catalog
            .pgs()
            .map_err(internal)?
            .into_iter()
            .filter(|p| p.active_site == node.site)
            .map(|p| pb::PgLease {
                pg: p.id,
                generation: p.generation,
            })
            .collect();
        self.note_progress(progress);
        self.auto_failover
            .lock()
            .expect("auto failover lock")
            .renewed(from, std::time::Instant::now());
        Ok(pb::LeaseReply {
            duration_ms: self.config.raft.lease_ms,
            pgs,
        })
    }

    /// Keeps the newest report per PG until [`Self::record_progress`].
    fn note_progress(&self, progress: Vec<pb::PgProgress>) {
        let mut reports = self.progress_reports.lock().expect("progress lock");
        for p in progress {
            let newer = reports
                .get(&p.pg)
                .is_none_or(|k| (k.generation, k.applied_index) < (p.generation, p.applied_index));
            if newer {
                reports.insert(p.pg, p);
            }
        }
    }

    /// On the catalog's leader: records the progress reports gathered
    /// since the last time in one catalog entry, so that the catalog still
    /// has them when the active site is lost (a forced failover's lower
    /// bound of the loss).
    pub(crate) async fn record_progress(&self) {
        let reports: Vec<pb::PgProgress> = self
            .progress_reports
            .lock()
            .expect("progress lock")
            .drain()
            .map(|(_, p)| p)
            .collect();
        // Only what moved: an idle cluster writes no catalog entries.
        let pgs: Vec<pb::PgProgress> = reports
            .into_iter()
            .filter(|p| {
                self.catalog.progress(p.pg).ok().flatten().is_none_or(|k| {
                    (k.generation, k.applied_index) < (p.generation, p.applied_index)
                })
            })
            .collect();
        if pgs.is_empty() {
            return;
        }
        let record = pb::command::Kind::RecordProgress(pb::RecordProgress { pgs });
        if let Err(e) = self.propose_catalog(record).await {
            tracing::debug!(error = %e, "progress reports not recorded");
        }
    }

    /// What this node's PG leaders have applied, for its lease request.
    fn lease_progress(&self) -> Vec<pb::PgProgress> {
        let now_ms = self.clock.now_ms();
        self.groups()
            .iter()
            .filter(|g| g.pg() != PgId::CATALOG)
            .filter_map(|g| {
                let (applied, first, sizes) = g.progress(&self.config.site, PROGRESS_TAIL_MAX)?;
                Some(pb::PgProgress {
                    pg: g.pg().0,
                    generation: g.metrics().generation.0,
                    applied_index: applied.0,
                    tail_first_index: first,
                    tail_bytes: sizes,
                    reported_ms: now_ms,
                })
            })
            .collect()
    }

    /// Starts the task that keeps this node's lease (data nodes only).
    pub(crate) fn start_lease_task(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.config.role.is_witness() {
            return None;
        }
        let weak = Arc::downgrade(self);
        let stopping = self.stopping.clone();
        let leases = self.leases.clone();
        let renew_every = self.lease_duration() / 4;
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = tokio::time::sleep(renew_every) => {}
                    _ = leases.wanted() => {}
                }
                let Some(core) = weak.upgrade() else { return };
                let renewed = tokio::select! {
                    _ = stopping.cancelled() => return,
                    renewed = core.renew_lease() => renewed,
                };
                drop(core);
                if !renewed {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }))
    }

    /// Asks the catalog's leader for this node's lease once; returns
    /// whether it was granted.
    async fn renew_lease(&self) -> bool {
        if self.identity.cluster_id().is_none() {
            return false;
        }
        let asked_at = Instant::now();
        let answer = self.ask_for_lease().await;
        let granted = match answer {
            Ok(reply) => {
                let pgs: HashMap<PgId, Generation> = reply
                    .pgs
                    .iter()
                    .map(|l| (PgId(l.pg), Generation(l.generation)))
                    .collect();
                self.leases
                    .grant(asked_at, Duration::from_millis(reply.duration_ms), pgs);
                true
            }
            Err(why) => {
                tracing::debug!(error = %why, "lease not renewed");
                self.leases.attempt_failed();
                false
            }
        };
        // Report a lease that ran out, and its return, once each.
        if self.leases.expired(Instant::now()) {
            if !self.lease_lapsed.swap(true, Ordering::AcqRel) {
                self.events.event(
                    PgId::CATALOG,
                    "lease_expired",
                    "this node's site lease ran out: its PG leaders stop acknowledging until the catalog grants it again".into(),
                );
            }
        } else if granted && self.lease_lapsed.swap(false, Ordering::AcqRel) {
            self.events.event(
                PgId::CATALOG,
                "lease_regained",
                "the catalog granted this node its site lease again".into(),
            );
        }
        granted
    }

    async fn ask_for_lease(&self) -> Result<pb::LeaseReply, String> {
        let me = self.config.node_id;
        let catalog = self.catalog_group().map_err(|e| e.to_string())?;
        let leader = catalog
            .metrics()
            .leader_node
            .ok_or("the catalog has no leader known here")?;
        let progress = self.lease_progress();
        if leader == me {
            return self
                .grant_lease(me, progress)
                .await
                .map_err(|s| s.message().to_owned());
        }
        let addr = self
            .catalog
            .node(leader)
            .map_err(|e| e.to_string())?
            .and_then(|n| n.addrs)
            .map(|a| a.raft)
            .ok_or_else(|| format!("catalog leader node {leader} has no address"))?;
        transport::request_lease(
            &self.peers,
            &self.identity,
            &addr,
            self.lease_duration() / 2,
            progress,
        )
        .await
        .map_err(|s| format!("node {leader}: {}", s.message()))
    }
}
