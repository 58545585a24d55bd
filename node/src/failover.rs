//! Moving protection groups between sites (DESIGN.md "Failover").
//!
//! The planned switchover: one catalog entry makes the target site's
//! members the voters of every PG moved and the target its active site.
//! Each PG's leader then changes Raft's membership to match
//! ([`NodeCore::reconcile_once`]) with joint consensus, so the new voters
//! hold every committed entry before the old ones stop voting: nothing
//! acknowledged is left behind (RPO 0). The leader, now a learner, hands
//! leadership to the most up-to-date new voter (openraft's
//! `TransferLeader`, not an election timeout). Proposals in flight
//! meanwhile are refused with "not the leader" and retried at the new one,
//! so clients see a pause. The node running the command waits until every
//! PG is led from the target site and reports how long each took.
//!
//! Site leases follow the same catalog entry: from it on, the catalog
//! grants the PGs' lease to the target site's nodes and no longer to the
//! old site's. The planned switchover does not wait the old lease out:
//! Raft's own membership change moves the quorum, so the old leader cannot
//! commit without the new voters, and it acknowledges under the lease it
//! still holds until it hands leadership over; the new leader asks for its
//! lease at once. Waiting leases out is the forced failover's fence, where
//! the old site may still have a quorum of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_replication::SystemClock;
use lifeboat_replication::ack::EventSink;
use lifeboat_replication::group::Clock;
use lifeboat_replication::lease::LeaseTable;
use lifeboat_replication::transport;
use lifeboat_store::{Generation, PgId};

use crate::core::NodeCore;
use crate::error::{NodeError, NodeResult};

/// How long a switchover waits for its PGs when the request names no limit.
pub const SWITCHOVER_WAIT: Duration = Duration::from_secs(60);
/// How often a switchover looks at the PGs it waits for.
const SWITCHOVER_POLL: Duration = Duration::from_millis(25);

/// One PG of a switchover, once it is led from the target site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSwitch {
    /// TENANT/NAME.
    pub name: String,
    pub from_site: String,
    pub to_site: String,
    /// The new leader's node, and its last log index when it was first
    /// seen leading: every entry up to it is at the new site.
    pub leader_node: u64,
    pub last_index: u64,
    /// From the command until the PG was seen led from the target.
    pub took: Duration,
    /// The PG was already active at the target; nothing changed.
    pub already: bool,
}

impl NodeCore {
    /// Planned switchover of the PGs named (TENANT/NAME; none: every PG)
    /// to `to_site`, waiting up to `timeout` until each is led from there.
    pub async fn switchover(
        &self,
        to_site: &str,
        names: &[String],
        timeout: Duration,
    ) -> NodeResult<Vec<PgSwitch>> {
        let started = Instant::now();
        // Every PG when none is named: those already active at the target
        // are waited for too (a re-run after a partial switchover) and
        // reported as already there.
        let (nodes, records) = self.failover_scope(to_site, names)?;
        let site_of = by_id(&nodes);
        let moving: Vec<&pb::PgRecord> = records
            .iter()
            .filter(|r| r.active_site != to_site)
            .collect();
        for r in &moving {
            self.events.event(
                PgId(r.id),
                "switchover_started",
                format!(
                    "planned switchover of {} from {} to {to_site}",
                    pg_name(r),
                    r.active_site
                ),
            );
        }
        if !moving.is_empty() {
            self.propose_catalog(pb::command::Kind::SwitchActiveSite(pb::SwitchActiveSite {
                pgs: moving.iter().map(|r| r.id).collect(),
                to_site: to_site.to_owned(),
            }))
            .await?;
        }
        let deadline = started + timeout;
        let waits = records
            .iter()
            .map(|r| self.wait_led_from(r, to_site, &site_of, started, deadline));
        let switched = futures::future::try_join_all(waits).await?;
        // try_join_all keeps the order: switched[i] is records[i].
        for (r, s) in records.iter().zip(&switched).filter(|(_, s)| !s.already) {
            self.events.event(
                PgId(r.id),
                "switchover_done",
                format!(
                    "{} is led from {} by node {} at index {}, {} ms after the command",
                    s.name,
                    s.to_site,
                    s.leader_node,
                    s.last_index,
                    s.took.as_millis()
                ),
            );
        }
        Ok(switched)
    }

    /// The live nodes, and the PGs named (none: every PG), for a move to
    /// `to_site`: refused when the site has no node, or a PG not active
    /// there has no member there.
    fn failover_scope(
        &self,
        to_site: &str,
        names: &[String],
    ) -> NodeResult<(Vec<pb::NodeRecord>, Vec<pb::PgRecord>)> {
        let nodes = self.live_nodes_with(to_site)?;
        let records = self.named_pgs_or(names, |_| true)?;
        let live = by_id(&nodes);
        let at_target = |r: &pb::PgRecord| {
            r.members
                .iter()
                .any(|m| live.get(&m.node_id).is_some_and(|n| n.site == to_site))
        };
        if let Some(r) = records
            .iter()
            .find(|r| r.active_site != to_site && !at_target(r))
        {
            return Err(NodeError::NoMembersAtSite {
                pg: pg_name(r),
                site: to_site.to_owned(),
            });
        }
        Ok((nodes, records))
    }

    /// The cluster's live nodes; refused when `site` has none.
    pub(crate) fn live_nodes_with(&self, site: &str) -> NodeResult<Vec<pb::NodeRecord>> {
        let nodes: Vec<pb::NodeRecord> = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?
            .into_iter()
            .filter(|n| !n.removed)
            .collect();
        if !nodes.iter().any(|n| n.site == site) {
            return Err(NodeError::SiteNotFound(site.to_owned()));
        }
        Ok(nodes)
    }

    /// The PGs named (TENANT/NAME), or when none is, every PG that is not
    /// a drill's and that `all` keeps. A drill's PG, named, is refused: it
    /// stays at its site (stop the drill instead).
    pub(crate) fn named_pgs_or(
        &self,
        names: &[String],
        all: impl Fn(&pb::PgRecord) -> bool,
    ) -> NodeResult<Vec<pb::PgRecord>> {
        if names.is_empty() {
            return Ok(self
                .pg_records(None)?
                .into_iter()
                .filter(|r| r.drill == 0 && all(r))
                .collect());
        }
        let records: Vec<pb::PgRecord> = names
            .iter()
            .map(|n| self.pg_named(n))
            .collect::<NodeResult<_>>()?;
        if let Some(r) = records.iter().find(|r| r.drill != 0) {
            return Err(NodeError::InvalidName {
                what: "protection group",
                name: pg_name(r),
                reason: format!(
                    "it belongs to drill {}, which stays at its site: stop the drill instead",
                    r.drill
                ),
            });
        }
        Ok(records)
    }

    /// Waits until PG `r` is led from `to_site` with only voters there.
    async fn wait_led_from(
        &self,
        r: &pb::PgRecord,
        to_site: &str,
        nodes: &HashMap<u64, &pb::NodeRecord>,
        started: Instant,
        deadline: Instant,
    ) -> NodeResult<PgSwitch> {
        // Ask the members at the target first: the new leader knows it
        // leads before anyone else does.
        let mut askers: Vec<&pb::NodeRecord> = r
            .members
            .iter()
            .filter_map(|m| nodes.get(&m.node_id).copied())
            .collect();
        askers.sort_by_key(|n| (n.site != to_site, n.id != self.config.node_id, n.id));
        loop {
            let mut seen = String::from("no member answered");
            for n in &askers {
                match self.pg_view(r, n).await {
                    Ok(v) => {
                        let moved = v.leader_site == to_site
                            && !v.voter_sites.is_empty()
                            && v.voter_sites.iter().all(|s| s == to_site);
                        if moved {
                            return Ok(PgSwitch {
                                name: pg_name(r),
                                from_site: r.active_site.clone(),
                                to_site: to_site.to_owned(),
                                leader_node: v.leader_node,
                                last_index: v.last_log_index,
                                took: started.elapsed(),
                                already: r.active_site == to_site,
                            });
                        }
                        seen = format!(
                            "node {} sees leader node {} at site {:?}, voters at {:?}",
                            n.id, v.leader_node, v.leader_site, v.voter_sites
                        );
                        break;
                    }
                    Err(e) => seen = format!("node {}: {e}", n.id),
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::SwitchoverTimeout {
                    pg: pg_name(r),
                    site: to_site.to_owned(),
                    waited_ms: started.elapsed().as_millis() as u64,
                    seen,
                });
            }
            tokio::time::sleep(SWITCHOVER_POLL).await;
        }
    }

    /// How node `n`'s member sees PG `r`: read here when `n` is this node,
    /// asked over the Raft transport otherwise.
    pub(crate) async fn pg_view(
        &self,
        r: &pb::PgRecord,
        n: &pb::NodeRecord,
    ) -> Result<pb::GroupViewReply, String> {
        if n.id == self.config.node_id {
            return match self.group(PgId(r.id)) {
                Some(g) => Ok(g.metrics().view()),
                None => Err("its member has not started".into()),
            };
        }
        let addr = raft_addr(n);
        transport::group_view(
            &self.peers,
            &self.identity,
            addr,
            PgId(r.id),
            Generation(r.generation),
        )
        .await
        .map_err(|s| s.message().to_owned())
    }
}

/// How many of `voters` (nodes) answered.
pub(crate) fn answering<'a>(
    voters: impl IntoIterator<Item = &'a u64>,
    reachable: &HashMap<u64, bool>,
) -> usize {
    voters
        .into_iter()
        .filter(|id| reachable.get(id).copied().unwrap_or(false))
        .count()
}

/// Refuses a forced failover of `r` while this node reaches a majority of
/// its voters (`reachable`, by node): the old site is not lost, and a
/// planned switchover moves the PG without loss.
fn refuse_if_voters_answer(
    r: &pb::PgRecord,
    live: &HashMap<u64, &pb::NodeRecord>,
    reachable: &HashMap<u64, bool>,
) -> NodeResult<()> {
    let voters: Vec<u64> = r
        .members
        .iter()
        .filter(|m| m.voter && live.contains_key(&m.node_id))
        .map(|m| m.node_id)
        .collect();
    let answering = answering(&voters, reachable);
    if crate::catalog_lost::is_quorum(answering, voters.len()) {
        return Err(NodeError::OldVotersReachable {
            pg: pg_name(r),
            reachable: answering,
            voters: voters.len(),
        });
    }
    Ok(())
}

/// Where node `n`'s Raft transport listens ("" when its record has none:
/// dialling it then fails with a clear error).
pub(crate) fn raft_addr(n: &pb::NodeRecord) -> &str {
    n.addrs.as_ref().map_or("", |a| a.raft.as_str())
}

pub(crate) fn by_id(nodes: &[pb::NodeRecord]) -> HashMap<u64, &pb::NodeRecord> {
    nodes.iter().map(|n| (n.id, n)).collect()
}

pub(crate) fn pg_name(r: &pb::PgRecord) -> String {
    format!("{}/{}", r.tenant, r.name)
}

/// One PG of a forced failover, once it is led from the target site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgForced {
    /// TENANT/NAME.
    pub name: String,
    pub from_site: String,
    pub to_site: String,
    /// The new generation, and its fork index F: every entry up to F that
    /// the best standby held is in the new lineage.
    pub generation: u64,
    pub fork_index: u64,
    pub leader_node: u64,
    /// An upper bound of the time whose writes may be lost: the old site's
    /// lease could cover acknowledgements until it ran out, and the new
    /// lineage holds everything stamped up to F's time (None: F's time
    /// is unknown).
    pub rpo_upper: Option<Duration>,
    /// A lower bound of the loss (see [`RpoLower`]).
    pub rpo_lower: RpoLower,
    /// From the command until the PG was led from the target site.
    pub took: Duration,
}

/// What a forced failover surely lost: the entries past the fork index
/// that the old site's leader had applied by its last progress report the
/// catalog recorded (see `pb::PgProgress`), and the encoded bytes of those
/// of them whose size the report carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RpoLower {
    pub entries: u64,
    pub bytes: u64,
}

impl RpoLower {
    /// From `progress` (of the generation failed over) and fork index `fork`.
    pub fn of(progress: &pb::PgProgress, fork: u64) -> RpoLower {
        let bytes = progress
            .tail_bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| progress.tail_first_index + *i as u64 > fork)
            .map(|(_, b)| *b)
            .sum();
        RpoLower {
            entries: progress.applied_index.saturating_sub(fork),
            bytes,
        }
    }
}

impl NodeCore {
    /// Forced failover of the PGs named (none: every PG active at another
    /// site) to `to_site`, whose active site is unreachable. Refused for a
    /// PG while this node reaches a majority of its voters. Then, through
    /// the catalog: stop granting the old site the PGs' lease, wait out any
    /// lease it may hold, force the membership of each PG's best standby at
    /// the target (the highest last log id) into generation g+1 at fork
    /// index F, restart the other standbys at g+1, record the lineage, and
    /// wait until each PG is led from the target.
    pub async fn force_failover(
        &self,
        to_site: &str,
        names: &[String],
        timeout: Duration,
    ) -> NodeResult<Vec<PgForced>> {
        let started = Instant::now();
        let (nodes, records) = self.failover_scope(to_site, names)?;
        let live = by_id(&nodes);
        let records: Vec<pb::PgRecord> = records
            .into_iter()
            .filter(|r| r.active_site != to_site)
            .collect();
        // Each old voter's node asked once, all at once: a lost site's
        // nodes time out rather than refuse, and a PG at a time would add
        // those timeouts up.
        // The catalog's voters too: without a quorum of them the catalog
        // cannot order the failover (and waiting for it would hang).
        let voter_nodes: std::collections::BTreeSet<u64> = records
            .iter()
            .flat_map(|r| r.members.iter().filter(|m| m.voter).map(|m| m.node_id))
            .chain(self.catalog_voter_nodes()?)
            .collect();
        let answers = futures::future::join_all(voter_nodes.iter().map(|id| {
            let addr = live.get(id).map_or("", |n| raft_addr(n));
            async move { (*id, self.peer_reachable(addr).await) }
        }))
        .await;
        let reachable: HashMap<u64, bool> = answers.into_iter().collect();
        for r in &records {
            refuse_if_voters_answer(r, &live, &reachable)?;
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (answering, voters) = self.catalog_quorum(&reachable)?;
        if !crate::catalog_lost::is_quorum(answering, voters) {
            return Err(NodeError::CatalogQuorumLost {
                reachable: answering,
                voters,
            });
        }
        for r in &records {
            self.events.event(
                PgId(r.id),
                "failover_started",
                format!(
                    "forced failover of {} from {} to {to_site}",
                    pg_name(r),
                    r.active_site
                ),
            );
        }
        // From this entry on the catalog grants the PGs' lease to the
        // target site only.
        self.propose_catalog(pb::command::Kind::SwitchActiveSite(pb::SwitchActiveSite {
            pgs: records.iter().map(|r| r.id).collect(),
            to_site: to_site.to_owned(),
        }))
        .await?;
        let stopped_granting = Instant::now();
        let lease_wait = LeaseTable::wait_out(self.lease_duration());
        let old_lease_ends_ms = SystemClock.now_ms() + lease_wait.as_millis() as u64;
        for r in &records {
            self.events.event(
                PgId(r.id),
                "failover_lease_wait",
                format!(
                    "{}: the old site is no longer granted its lease; waiting {} ms for any it holds to run out",
                    pg_name(r),
                    lease_wait.as_millis()
                ),
            );
        }
        tokio::time::sleep_until((stopped_granting + lease_wait).into()).await;
        let deadline = started + timeout;
        let forced = records
            .iter()
            .map(|r| self.force_one(r, to_site, &live, started, old_lease_ends_ms, deadline));
        futures::future::try_join_all(forced).await
    }

    async fn force_one(
        &self,
        r: &pb::PgRecord,
        to_site: &str,
        live: &HashMap<u64, &pb::NodeRecord>,
        started: Instant,
        old_lease_ends_ms: u64,
        deadline: Instant,
    ) -> NodeResult<PgForced> {
        let pg = PgId(r.id);
        let generation = Generation(r.generation);
        let standbys: Vec<(&pb::PgMember, &pb::NodeRecord)> = r
            .members
            .iter()
            .filter_map(|m| Some((m, *live.get(&m.node_id)?)))
            .filter(|(_, n)| n.site == to_site)
            .collect();
        // All at once: a standby that is down too times out.
        let answers = futures::future::join_all(
            standbys
                .iter()
                .map(|(_, n)| self.standby_log_tail(pg, generation, n)),
        )
        .await;
        let mut tails = Vec::new();
        for ((m, n), answer) in standbys.iter().zip(answers) {
            match answer {
                Ok(t) => tails.push((*m, *n, t)),
                Err(e) => {
                    tracing::warn!(pg = r.id, node = n.id, error = %e, "standby did not answer")
                }
            }
        }
        // The best standby: the highest last log id, (term, index) as a
        // Raft vote compares them.
        let Some(best) = tails.iter().max_by_key(|(_, _, t)| (t.term, t.index)) else {
            return Err(NodeError::NoStandbyAnswered {
                pg: pg_name(r),
                site: to_site.to_owned(),
            });
        };
        let (best_member, best_node, best_tail) = (best.0, best.1, best.2);
        let forced_member = |m: &pb::PgMember, n: &pb::NodeRecord| pb::ForcedMember {
            member_id: m.member_id,
            node_id: n.id,
            raft_addr: raft_addr(n).to_owned(),
            site: n.site.clone(),
        };
        let next = r.generation + 1;
        let request = |m: &pb::PgMember, force: bool| pb::ForceGenerationRequest {
            route: Some(pb::Route {
                cluster_id: self.identity.cluster_id().unwrap_or_default(),
                pg: r.id,
                generation: r.generation,
                target_member: m.member_id,
                from_node: self.config.node_id,
            }),
            generation: next,
            force_membership: force,
            voters: if force {
                vec![forced_member(best_member, best_node)]
            } else {
                Vec::new()
            },
            learners: if force {
                tails
                    .iter()
                    .filter(|(m, _, _)| m.member_id != best_member.member_id)
                    .map(|(m, n, _)| forced_member(m, n))
                    .collect()
            } else {
                Vec::new()
            },
        };
        let fork = self
            .force_generation_at(best_node, request(best_member, true))
            .await?;
        let rpo_upper = (best_tail.stamp_ms > 0)
            .then(|| Duration::from_millis(old_lease_ends_ms.saturating_sub(best_tail.stamp_ms)));
        let rpo_lower = self
            .catalog
            .progress(r.id)
            .map_err(NodeError::io("read catalog"))?
            .filter(|p| p.generation == r.generation)
            .map(|p| RpoLower::of(&p, fork.fork_index))
            .unwrap_or_default();
        self.events.event(
            pg,
            "failover_forked",
            format!(
                "{}: node {} holds the most (last index {}, term {}); generation {next} starts at index {} on it",
                pg_name(r),
                best_node.id,
                best_tail.index,
                best_tail.term,
                fork.fork_index + 1
            ),
        );
        for (m, n, _) in tails
            .iter()
            .filter(|(m, _, _)| m.member_id != best_member.member_id)
        {
            if let Err(e) = self.force_generation_at(n, request(m, false)).await {
                tracing::warn!(pg = r.id, node = n.id, error = %e, "standby not restarted at the new generation; it follows when the catalog says so");
            }
        }
        self.propose_catalog(pb::command::Kind::CompleteForcedFailover(
            pb::CompleteForcedFailover {
                pg: r.id,
                generation: next,
                fork_index: fork.fork_index,
                keep_members: standbys.iter().map(|(m, _)| m.member_id).collect(),
                from_site: r.active_site.clone(),
                rpo: Some(pb::Rpo {
                    lower_entries: rpo_lower.entries,
                    lower_bytes: rpo_lower.bytes,
                    upper_ms: rpo_upper.map_or(0, |d| d.as_millis() as u64),
                }),
            },
        ))
        .await?;
        let now = self.pg_named(&pg_name(r))?;
        let led = self
            .wait_led_from(&now, to_site, live, started, deadline)
            .await?;
        self.events.event(
            pg,
            "failover_done",
            format!(
                "{} is led from {to_site} by node {} at generation {next}, {} ms after the command; at most {} of writes lost, at least {} entries ({} bytes)",
                pg_name(r),
                led.leader_node,
                led.took.as_millis(),
                rpo_upper.map_or("an unknown time".to_owned(), |d| format!("{} ms", d.as_millis())),
                rpo_lower.entries,
                rpo_lower.bytes
            ),
        );
        Ok(PgForced {
            name: pg_name(r),
            from_site: r.active_site.clone(),
            to_site: to_site.to_owned(),
            generation: next,
            fork_index: fork.fork_index,
            leader_node: led.leader_node,
            rpo_upper,
            rpo_lower,
            took: led.took,
        })
    }

    /// How far node `n`'s member of `pg` has its log.
    async fn standby_log_tail(
        &self,
        pg: PgId,
        generation: Generation,
        n: &pb::NodeRecord,
    ) -> Result<pb::LogTailReply, String> {
        if n.id == self.config.node_id {
            let g = self.group(pg).ok_or("its member has not started")?;
            return g.log_tail().map_err(|e| e.to_string());
        }
        let addr = raft_addr(n);
        transport::log_tail(&self.peers, &self.identity, addr, pg, generation)
            .await
            .map_err(|s| s.message().to_owned())
    }

    async fn force_generation_at(
        &self,
        n: &pb::NodeRecord,
        req: pb::ForceGenerationRequest,
    ) -> NodeResult<pb::ForceGenerationReply> {
        let refused = |s: tonic::Status| NodeError::PeerRefused {
            addr: raft_addr(n).to_owned(),
            code: s.code(),
            message: s.message().to_owned(),
        };
        if n.id == self.config.node_id {
            return self.force_generation(req).await.map_err(refused);
        }
        let addr = raft_addr(n);
        transport::force_generation(&self.peers, addr, req)
            .await
            .map_err(refused)
    }

    /// On a standby node, for a forced failover: stops this node's member
    /// of the PG, forces its membership when asked (it is the chosen one),
    /// and starts it again at the new generation. Refused (failed
    /// precondition) unless the member runs at the generation just before.
    pub async fn force_generation(
        &self,
        req: pb::ForceGenerationRequest,
    ) -> Result<pb::ForceGenerationReply, tonic::Status> {
        use tonic::Status;
        let route = req
            .route
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("no route"))?;
        let pg = PgId(route.pg);
        let _changes = self.membership_changes.lock().await;
        let group = self.group(pg).ok_or_else(|| {
            Status::not_found(format!("protection group {pg} has no member on this node"))
        })?;
        if group.generation().0 != req.generation.saturating_sub(1) {
            return Err(Status::failed_precondition(format!(
                "protection group {pg} is at generation {} here, not {}",
                group.generation(),
                req.generation.saturating_sub(1)
            )));
        }
        let member = group.member_id();
        self.stop_member(&group).await;
        let mut reply = pb::ForceGenerationReply::default();
        if req.force_membership {
            let members = |list: &[pb::ForcedMember]| -> std::collections::BTreeMap<u64, lifeboat_replication::MemberNode> {
                list.iter()
                    .map(|m| {
                        (
                            m.member_id,
                            lifeboat_replication::MemberNode {
                                node_id: m.node_id,
                                raft_addr: m.raft_addr.clone(),
                                site: m.site.clone(),
                            },
                        )
                    })
                    .collect()
            };
            let (voters, learners) = (members(&req.voters), members(&req.learners));
            let db = self.db.clone();
            let forced = tokio::task::spawn_blocking(move || {
                lifeboat_replication::log_store::force_membership(
                    &db, pg, member.0, &voters, &learners,
                )
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("forced membership: {e}")))?;
            reply = pb::ForceGenerationReply {
                fork_index: forced.fork_index,
                term: forced.term,
            };
        }
        let group = self
            .start_member(lifeboat_replication::members::LocalMember {
                pg,
                member,
                generation: Generation(req.generation),
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if req.force_membership {
            group.campaign().await;
        }
        self.events.event(
            pg,
            "failover_generation",
            format!(
                "this node's member of {} now runs generation {}{}",
                self.pg_display_name(pg),
                req.generation,
                if req.force_membership {
                    format!(" as its only voter, from index {}", reply.fork_index + 1)
                } else {
                    String::new()
                }
            ),
        );
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lower bound counts the entries past the fork the old leader had
    /// applied, and the bytes of those its report carried sizes of.
    #[test]
    fn the_rpo_lower_bound_counts_what_lies_past_the_fork() {
        let progress = pb::PgProgress {
            applied_index: 50,
            tail_first_index: 46,
            tail_bytes: vec![10, 20, 30, 40, 50],
            ..Default::default()
        };
        assert_eq!(
            RpoLower::of(&progress, 47),
            RpoLower {
                entries: 3,
                bytes: 30 + 40 + 50
            }
        );
        assert_eq!(
            RpoLower::of(&progress, 40),
            RpoLower {
                entries: 10,
                bytes: 150
            },
            "sizes known for the newest five only"
        );
        assert_eq!(RpoLower::of(&progress, 50), RpoLower::default());
        assert_eq!(RpoLower::of(&progress, 60), RpoLower::default());
    }
}
