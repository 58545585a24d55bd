//! Re-protect and failback (DESIGN.md "Failover"): a fenced old member's
//! replica comes back into its PG's new generation by a delta, not a copy.
//!
//! Fencing keeps the old member's data as the base of a resync
//! (`lifeboat_store::resync::keep_as_base`) instead of wiping it. When the
//! catalog places a member of the new generation on this node (a learner
//! at the old site), [`NodeCore::resync_pass`] offers what the base holds
//! to a voter of the new generation, applies the delta it answers with —
//! the versions written since the fork, and the undoing of the ones only
//! the old site wrote (already carried into divergence clones) — and
//! leaves the replica at the voter's applied log id with the log purged
//! through it. The reconciler then starts the member, and Raft carries it
//! on from the log. Should that never work (no voter answers, or the
//! catalog places no member here) within [`RESYNC_GIVE_UP`], the base is
//! wiped and the member starts from nothing, as a full Raft snapshot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::EventSink;
use lifeboat_replication::resync::{self, Resynced};
use lifeboat_store::{Generation, PgId};

use crate::core::NodeCore;
use crate::error::{NodeError, NodeResult};

/// How long a kept base waits for a resync that works before it is wiped.
pub const RESYNC_GIVE_UP: Duration = Duration::from_secs(300);
/// How often the resync pass looks for kept bases.
pub const RESYNC_CHECK: Duration = Duration::from_millis(500);

/// When each kept base was first seen by this process, and how many
/// attempts failed since.
#[derive(Default)]
pub struct ResyncTries {
    first_seen: HashMap<PgId, (Instant, u32)>,
}

impl NodeCore {
    /// Resyncs every kept base whose PG the catalog places a member of on
    /// this node (see the module doc), one at a time.
    pub async fn resync_pass(&self) {
        // A base whose PG the catalog no longer has (deleted while the
        // node was away) is found too, and wiped once given up on.
        let bases = match lifeboat_store::resync::bases(&self.db) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(code = e.code(), error = %e, "looking for resync bases");
                return;
            }
        };
        for pg in bases {
            let outcome = self.resync_base(pg).await;
            let give_up = {
                let mut tries = self.resync_tries.lock().expect("resync tries lock");
                let entry = tries.first_seen.entry(pg).or_insert((Instant::now(), 0));
                match &outcome {
                    Ok(Some(_)) => {
                        tries.first_seen.remove(&pg);
                        None
                    }
                    Ok(None) | Err(_) => {
                        if outcome.is_err() {
                            entry.1 += 1;
                        }
                        (entry.0.elapsed() >= RESYNC_GIVE_UP).then_some(entry.1)
                    }
                }
            };
            if let Err(e) = &outcome {
                tracing::info!(pg = pg.0, code = e.code(), error = %e, "delta resync not done yet");
            }
            if let Some(failures) = give_up {
                self.events.event(
                    pg,
                    "resync_abandoned",
                    format!(
                        "{}: no delta resync within {} s ({failures} failed attempts{}): the kept replica is wiped and the member here starts from a full copy",
                        self.pg_display_name(pg),
                        RESYNC_GIVE_UP.as_secs(),
                        outcome.as_ref().err().map(|e| format!(", last: {e}")).unwrap_or_default()
                    ),
                );
                if let Err(e) = self.wipe_replica(pg).await {
                    tracing::warn!(pg = pg.0, code = e.code(), error = %e, "wiping an abandoned resync base");
                } else {
                    self.resync_tries
                        .lock()
                        .expect("resync tries lock")
                        .first_seen
                        .remove(&pg);
                }
            }
        }
    }

    /// One attempt at resyncing the kept base of `pg`: `None` while the
    /// catalog places no member of it here.
    async fn resync_base(&self, pg: PgId) -> NodeResult<Option<Resynced>> {
        let Some(rec) = self
            .catalog
            .pg_by_id(pg.0)
            .map_err(NodeError::io("read catalog"))?
        else {
            return Ok(None);
        };
        let me = self.config.node_id;
        if !rec.members.iter().any(|m| m.node_id == me) {
            return Ok(None);
        }
        let sources = self.resync_sources(&rec)?;
        if sources.is_empty() {
            return Err(NodeError::Peer {
                addr: "(none)".into(),
                reason: format!(
                    "the catalog names no voter of {} on another node to resync from",
                    self.pg_display_name(pg)
                ),
            });
        }
        let attempt = self
            .resync_tries
            .lock()
            .expect("resync tries lock")
            .first_seen
            .get(&pg)
            .map_or(0, |t| t.1) as usize;
        let (node, addr) = &sources[attempt % sources.len()];
        let started = Instant::now();
        let done = resync::pull(
            &self.peers,
            &self.identity,
            addr,
            pg,
            Generation(rec.generation),
            self.db.clone(),
        )
        .await
        .map_err(|s| NodeError::Peer {
            addr: addr.clone(),
            reason: format!("delta resync from node {node}: {}", s.message()),
        })?;
        let full_copy = done.held_bytes.max(1);
        self.events.event(
            pg,
            "resynced",
            format!(
                "{}: delta resync from node {node} to index {} in {} ms: held {} rows ({} bytes); offered {} segments ({} bytes); {} replaced; received {} rows, {} bytes ({:.2}% of what was held)",
                self.pg_display_name(pg),
                done.applied.index,
                started.elapsed().as_millis(),
                done.held_rows,
                done.held_bytes,
                done.segments,
                done.offer_bytes,
                done.replaced,
                done.rows_received,
                done.bytes_received,
                done.bytes_received as f64 * 100.0 / full_copy as f64
            ),
        );
        let record = pb::ResyncRecord {
            pg: pg.0,
            node_id: me,
            generation: rec.generation,
            from_node: *node,
            applied_index: done.applied.index,
            held_rows: done.held_rows,
            held_bytes: done.held_bytes,
            offer_bytes: done.offer_bytes,
            segments: done.segments,
            replaced: done.replaced,
            rows_received: done.rows_received,
            bytes_received: done.bytes_received,
            took_ms: started.elapsed().as_millis() as u64,
            recorded_ms: self.now_ms(),
        };
        // The replica is done whether or not this lands: it only reports.
        if let Err(e) = self
            .propose_catalog(pb::command::Kind::RecordResync(pb::RecordResync {
                record: Some(record),
            }))
            .await
        {
            tracing::warn!(pg = pg.0, code = e.code(), error = %e, "recording a resync");
        }
        self.metrics.resyncs.inc();
        self.metrics
            .resync_bytes_received
            .inc_by(done.bytes_received);
        Ok(Some(done))
    }

    /// The nodes to resync `rec`'s PG from: its voters on other nodes, at
    /// the active site first.
    fn resync_sources(&self, rec: &pb::PgRecord) -> NodeResult<Vec<(u64, String)>> {
        let nodes = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let mut out: Vec<(bool, u64, String)> = rec
            .members
            .iter()
            .filter(|m| m.voter && m.node_id != self.config.node_id)
            .filter_map(|m| {
                let n = nodes.iter().find(|n| n.id == m.node_id)?;
                let addr = n.addrs.as_ref()?.raft.clone();
                Some((n.site != rec.active_site, n.id, addr))
            })
            .collect();
        out.sort();
        Ok(out.into_iter().map(|(_, id, addr)| (id, addr)).collect())
    }
}

/// How long `failback prepare` waits when the request names no limit.
pub const PREPARE_WAIT: Duration = Duration::from_secs(600);
/// How often it looks at the members it waits for.
const PREPARE_POLL: Duration = Duration::from_millis(200);

/// One PG made ready to go back to a site.
#[derive(Clone, Debug, PartialEq)]
pub struct PgPrepared {
    /// TENANT/NAME.
    pub name: String,
    pub active_site: String,
    pub generation: u64,
    /// The leader's last index when the wait began.
    pub target_index: u64,
    /// Each member at the site: its node, applied index, and its delta
    /// resync into this generation if it had one.
    pub members: Vec<(u64, u64, Option<pb::ResyncRecord>)>,
    pub took: Duration,
}

impl NodeCore {
    /// Re-protect before a failback to `site`: waits up to `timeout` until
    /// every PG named (TENANT/NAME; none: every PG active at another site)
    /// has a member of its current generation on each node of `site` the
    /// catalog places one on, applied up to its leader's last index when
    /// the wait began. The old site's nodes get there on their own once
    /// back (fencing, then a delta resync); this is the operator's way to
    /// know when, and what it moved.
    pub async fn failback_prepare(
        &self,
        site: &str,
        names: &[String],
        timeout: Duration,
    ) -> NodeResult<Vec<PgPrepared>> {
        let started = Instant::now();
        let deadline = started + timeout;
        let nodes = self.live_nodes_with(site)?;
        let records = self.named_pgs_or(names, |r| r.active_site != site)?;
        for r in &records {
            self.events.event(
                PgId(r.id),
                "failback_prepare_started",
                format!(
                    "waiting for {}'s members at {site} to catch up with generation {} at {}",
                    crate::failover::pg_name(r),
                    r.generation,
                    r.active_site
                ),
            );
        }
        let waits = records
            .iter()
            .map(|r| self.wait_members_caught_up(r.id, site, &nodes, started, deadline));
        let prepared = futures::future::try_join_all(waits).await?;
        for (r, p) in records.iter().zip(&prepared) {
            let moved: u64 = p
                .members
                .iter()
                .filter_map(|m| m.2.as_ref())
                .map(|x| x.bytes_received)
                .sum();
            self.events.event(
                PgId(r.id),
                "failback_prepared",
                format!(
                    "{}: {} members at {site} caught up to index {} of generation {}, {} ms after the command; delta resyncs received {moved} bytes",
                    p.name,
                    p.members.len(),
                    p.target_index,
                    p.generation,
                    p.took.as_millis()
                ),
            );
        }
        Ok(prepared)
    }

    /// Waits until PG `pg` has caught-up members of its current generation
    /// on every node of `site` that the catalog places one on (at least
    /// one).
    async fn wait_members_caught_up(
        &self,
        pg: u64,
        site: &str,
        nodes: &[pb::NodeRecord],
        started: Instant,
        deadline: Instant,
    ) -> NodeResult<PgPrepared> {
        let by_id = crate::failover::by_id(nodes);
        let mut target: Option<(u64, u64)> = None;
        loop {
            let r = self
                .catalog
                .pg_by_id(pg)
                .map_err(NodeError::io("read catalog"))?
                .ok_or_else(|| NodeError::PgNotFound(format!("id {pg}")))?;
            let name = crate::failover::pg_name(&r);
            // A new generation restarts the wait.
            if target.is_some_and(|(g, _)| g != r.generation) {
                target = None;
            }
            let seen = match self.prepare_step(&r, site, &by_id, &mut target).await {
                Ok(members) => {
                    let resyncs = self
                        .catalog
                        .resyncs(pg)
                        .map_err(NodeError::io("read catalog"))?;
                    return Ok(PgPrepared {
                        name,
                        active_site: r.active_site.clone(),
                        generation: r.generation,
                        target_index: target.map_or(0, |t| t.1),
                        members: members
                            .into_iter()
                            .map(|(node, applied)| {
                                let resync = resyncs
                                    .iter()
                                    .find(|x| x.node_id == node && x.generation == r.generation)
                                    .cloned();
                                (node, applied, resync)
                            })
                            .collect(),
                        took: started.elapsed(),
                    });
                }
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(NodeError::FailbackTimeout {
                    pg: name,
                    site: site.to_owned(),
                    waited_ms: started.elapsed().as_millis() as u64,
                    seen,
                });
            }
            tokio::time::sleep(PREPARE_POLL).await;
        }
    }

    /// One look at PG `r`: its members at `site` with their applied
    /// indexes once all have reached the target (taken from the leader at
    /// the first look that finds one), or what is still missing.
    async fn prepare_step(
        &self,
        r: &pb::PgRecord,
        site: &str,
        nodes: &HashMap<u64, &pb::NodeRecord>,
        target: &mut Option<(u64, u64)>,
    ) -> Result<Vec<(u64, u64)>, String> {
        if target.is_none() {
            let mut leader_last = None;
            for m in r.members.iter().filter(|m| m.voter) {
                let Some(n) = nodes.get(&m.node_id) else {
                    continue;
                };
                if let Ok(v) = self.pg_view(r, n).await
                    && v.leader_node == n.id
                {
                    leader_last = Some(v.last_log_index);
                    break;
                }
            }
            let Some(last) = leader_last else {
                return Err(format!("no leader of generation {} answered", r.generation));
            };
            *target = Some((r.generation, last));
        }
        let goal = target.map_or(0, |t| t.1);
        let at_site: Vec<&pb::NodeRecord> = r
            .members
            .iter()
            .filter_map(|m| nodes.get(&m.node_id).copied())
            .filter(|n| n.site == site)
            .collect();
        if at_site.is_empty() {
            return Err(format!(
                "the catalog places no member at {site} yet (are its nodes back?)"
            ));
        }
        let mut caught_up = Vec::new();
        for n in at_site {
            match self.pg_view(r, n).await {
                Ok(v) if v.applied_index >= goal => caught_up.push((n.id, v.applied_index)),
                Ok(v) => {
                    return Err(format!(
                        "node {} has applied {} of {goal}",
                        n.id, v.applied_index
                    ));
                }
                Err(e) => return Err(format!("node {}: {e}", n.id)),
            }
        }
        Ok(caught_up)
    }
}
