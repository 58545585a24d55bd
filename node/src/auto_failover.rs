//! Automatic forced failover (DESIGN.md "Failover"; off unless
//! `raft.auto_failover_after_ms` is set).
//!
//! The catalog's leader hears from every data node at every lease renewal
//! (a quarter of the lease). When no data node of a site where PGs are
//! active has renewed for the configured time, that site is taken as lost
//! and its PGs are failed over, exactly as `lifeboat failover --force`
//! does: refused while this node still reaches a majority of a PG's
//! voters, and serving at the new site only after the old lease ran out.
//! So a site that is merely cut off from the catalog stops acknowledging
//! before the other one starts, as with a person's command.
//!
//! A node that has just become the catalog's leader has heard nothing
//! yet: it counts the silence from when it began to lead, so a change of
//! catalog leader never triggers a failover by itself.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::EventSink;
use lifeboat_store::PgId;

use crate::core::NodeCore;

/// How long an automatic failover may take before it is given up (and
/// tried again at the next check).
const AUTO_FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the catalog's leader checks for a silent site.
pub const AUTO_FAILOVER_CHECK: Duration = Duration::from_secs(1);

/// What the catalog's leader remembers between checks.
#[derive(Debug, Default)]
pub struct AutoFailover {
    /// When this node last granted each data node its lease.
    renewed: HashMap<u64, Instant>,
    /// Since when this node leads the catalog (`None`: it does not).
    leading_since: Option<Instant>,
    /// The last attempt per site, so that a refused or failed one is not
    /// repeated at every check.
    attempted: HashMap<String, Instant>,
}

impl AutoFailover {
    /// Node `node` renewed its lease now.
    pub fn renewed(&mut self, node: u64, now: Instant) {
        self.renewed.insert(node, now);
    }
}

/// The site a silent site's PGs go to: of the other non-witness sites,
/// the one holding most of their members (ties: by name, for a stable
/// choice).
fn target_site(pgs: &[&pb::PgRecord], site_of: &HashMap<u64, &str>, lost: &str) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for m in pgs.iter().flat_map(|p| &p.members) {
        if let Some(site) = site_of.get(&m.node_id).filter(|s| **s != lost) {
            *counts.entry(site).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(site, _)| site.to_owned())
}

impl NodeCore {
    /// One check (see the module doc); a no-op unless configured and this
    /// node leads the catalog.
    pub(crate) async fn auto_failover_check(&self) {
        let after = Duration::from_millis(self.config.raft.auto_failover_after_ms);
        if after.is_zero() {
            return;
        }
        let leads = self.catalog_group().is_ok_and(|c| c.metrics().is_leader);
        let now = Instant::now();
        let silent: Vec<(String, String, Vec<String>)> = {
            let mut state = self.auto_failover.lock().expect("auto failover lock");
            if !leads {
                state.leading_since = None;
                return;
            }
            let since = *state.leading_since.get_or_insert(now);
            let (Ok(nodes), Ok(pgs)) = (self.catalog.nodes(), self.catalog.pgs()) else {
                return;
            };
            let data: Vec<&pb::NodeRecord> =
                nodes.iter().filter(|n| !n.removed && !n.witness).collect();
            let site_of: HashMap<u64, &str> =
                data.iter().map(|n| (n.id, n.site.as_str())).collect();
            let mut by_site: BTreeMap<&str, Vec<&pb::PgRecord>> = BTreeMap::new();
            for p in pgs
                .iter()
                .filter(|p| p.id != PgId::CATALOG.0 && p.drill == 0)
            {
                by_site.entry(p.active_site.as_str()).or_default().push(p);
            }
            let mut out = Vec::new();
            for (site, site_pgs) in by_site {
                let heard = data
                    .iter()
                    .filter(|n| n.site == site)
                    .filter_map(|n| state.renewed.get(&n.id).copied())
                    .max()
                    .map_or(since, |last| last.max(since));
                if now.duration_since(heard) < after {
                    continue;
                }
                if state
                    .attempted
                    .get(site)
                    .is_some_and(|at| now.duration_since(*at) < after)
                {
                    continue;
                }
                let Some(target) = target_site(&site_pgs, &site_of, site) else {
                    continue;
                };
                state.attempted.insert(site.to_owned(), now);
                let names = site_pgs
                    .iter()
                    .map(|p| format!("{}/{}", p.tenant, p.name))
                    .collect();
                out.push((site.to_owned(), target, names));
            }
            out
        };
        for (site, target, names) in silent {
            self.events.event(
                PgId::CATALOG,
                "auto_failover_started",
                format!(
                    "no data node of site {site} renewed its lease for {} ms: failing its {} PG(s) over to {target}",
                    after.as_millis(),
                    names.len()
                ),
            );
            match self
                .force_failover(&target, &names, AUTO_FAILOVER_TIMEOUT)
                .await
            {
                Ok(forced) => self.events.event(
                    PgId::CATALOG,
                    "auto_failover_done",
                    format!(
                        "{} PG(s) of site {site} are led from {target}: {}",
                        forced.len(),
                        forced
                            .iter()
                            .map(|f| format!(
                                "{} at generation {} from index {}",
                                f.name,
                                f.generation,
                                f.fork_index + 1
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                Err(e) => self.events.event(
                    PgId::CATALOG,
                    "auto_failover_refused",
                    format!("site {site} to {target}: {e}"),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(members: &[u64]) -> pb::PgRecord {
        pb::PgRecord {
            members: members
                .iter()
                .map(|n| pb::PgMember {
                    member_id: n * 10,
                    node_id: *n,
                    voter: true,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The PGs go to the other site holding most of their members.
    #[test]
    fn the_target_is_the_site_with_most_standbys() {
        let site_of: HashMap<u64, &str> = [
            (1, "primary"),
            (2, "primary"),
            (3, "dr"),
            (4, "dr"),
            (5, "third"),
        ]
        .into();
        let (a, b) = (pg(&[1, 2, 3, 4, 5]), pg(&[1, 3]));
        assert_eq!(
            target_site(&[&a, &b], &site_of, "primary").as_deref(),
            Some("dr")
        );
        assert_eq!(
            target_site(&[&pg(&[1, 5])], &site_of, "primary").as_deref(),
            Some("third")
        );
        assert_eq!(target_site(&[&pg(&[1, 2])], &site_of, "primary"), None);
    }
}
