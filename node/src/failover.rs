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
use lifeboat_replication::ack::EventSink;
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
        let nodes = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let site_of: HashMap<u64, &pb::NodeRecord> = nodes
            .iter()
            .filter(|n| !n.removed)
            .map(|n| (n.id, n))
            .collect();
        if !site_of.values().any(|n| n.site == to_site) {
            return Err(NodeError::SiteNotFound(to_site.to_owned()));
        }
        // Every PG when none is named: those already active at the target
        // are waited for too (a re-run after a partial switchover) and
        // reported as already there.
        let records: Vec<pb::PgRecord> = if names.is_empty() {
            self.pg_records(None)?
        } else {
            names
                .iter()
                .map(|n| self.pg_named(n))
                .collect::<NodeResult<_>>()?
        };
        let at_target = |r: &pb::PgRecord| {
            r.members
                .iter()
                .any(|m| site_of.get(&m.node_id).is_some_and(|n| n.site == to_site))
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
        for s in switched.iter().filter(|s| !s.already) {
            let pg = records
                .iter()
                .find(|r| pg_name(r) == s.name)
                .map_or(PgId(0), |r| PgId(r.id));
            self.events.event(
                pg,
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
    async fn pg_view(
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
        let addr = n
            .addrs
            .as_ref()
            .map(|a| a.raft.as_str())
            .unwrap_or_default();
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

fn pg_name(r: &pb::PgRecord) -> String {
    format!("{}/{}", r.tenant, r.name)
}
