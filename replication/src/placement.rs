//! Where a PG's members go: voters at the PG's active site, learners at
//! every other site, each on the nodes that host the fewest members so far.
//! Pure functions over catalog records; the catalog leader proposes what
//! they decide.

use std::collections::{BTreeMap, BTreeSet};

use lifeboat_proto::raft as pb;

/// How many members a PG wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacementPolicy {
    /// Voters at the active site (fewer when the site has fewer nodes).
    pub voters: usize,
    /// Learners at each standby site (fewer when it has fewer nodes).
    pub learners_per_site: usize,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        PlacementPolicy {
            voters: 3,
            learners_per_site: 3,
        }
    }
}

/// Members per node over every PG record, the catalog's included.
pub fn load(pgs: &[pb::PgRecord]) -> BTreeMap<u64, usize> {
    let mut load = BTreeMap::new();
    for pg in pgs {
        for m in &pg.members {
            *load.entry(m.node_id).or_default() += 1;
        }
    }
    load
}

/// The members to add so that `pg` (members already placed: `current`)
/// meets `policy` over the live `nodes`. Picks the least-loaded nodes (ties
/// by node id, so every caller decides the same) and updates `load`.
pub fn missing_members(
    policy: PlacementPolicy,
    active_site: &str,
    current: &[pb::PgMember],
    nodes: &[pb::NodeRecord],
    load: &mut BTreeMap<u64, usize>,
) -> Vec<pb::PlacedMember> {
    let live: Vec<&pb::NodeRecord> = nodes.iter().filter(|n| !n.removed).collect();
    let site_of: BTreeMap<u64, &str> = live.iter().map(|n| (n.id, n.site.as_str())).collect();
    let used: BTreeSet<u64> = current.iter().map(|m| m.node_id).collect();
    let sites: BTreeSet<&str> = live.iter().map(|n| n.site.as_str()).collect();
    let mut out = Vec::new();
    for site in sites {
        let want = if site == active_site {
            policy.voters
        } else {
            policy.learners_per_site
        };
        let voter = site == active_site;
        let have = current
            .iter()
            .filter(|m| site_of.get(&m.node_id) == Some(&site) && m.voter == voter)
            .count();
        let mut candidates: Vec<u64> = live
            .iter()
            .filter(|n| n.site == site && !used.contains(&n.id))
            .map(|n| n.id)
            .collect();
        for _ in have..want {
            candidates.sort_by_key(|id| (load.get(id).copied().unwrap_or(0), *id));
            let Some(&pick) = candidates.first() else {
                break;
            };
            candidates.remove(0);
            *load.entry(pick).or_default() += 1;
            out.push(pb::PlacedMember {
                node_id: pick,
                voter,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, site: &str) -> pb::NodeRecord {
        pb::NodeRecord {
            id,
            site: site.into(),
            ..Default::default()
        }
    }

    fn placed(v: &[pb::PlacedMember]) -> Vec<(u64, bool)> {
        v.iter().map(|m| (m.node_id, m.voter)).collect()
    }

    #[test]
    fn voters_at_the_active_site_learners_elsewhere_fewer_when_few_nodes() {
        let nodes = [
            node(1, "primary"),
            node(2, "primary"),
            node(3, "primary"),
            node(4, "dr"),
            node(5, "dr"),
        ];
        let mut load = BTreeMap::new();
        let p = missing_members(
            PlacementPolicy::default(),
            "primary",
            &[],
            &nodes,
            &mut load,
        );
        assert_eq!(
            placed(&p),
            vec![(4, false), (5, false), (1, true), (2, true), (3, true)]
        );
    }

    #[test]
    fn placement_balances_across_nodes() {
        let nodes: Vec<_> = (1..=6).map(|i| node(i, "primary")).collect();
        let mut load = BTreeMap::new();
        let policy = PlacementPolicy::default();
        let a = missing_members(policy, "primary", &[], &nodes, &mut load);
        let b = missing_members(policy, "primary", &[], &nodes, &mut load);
        assert_eq!(placed(&a), vec![(1, true), (2, true), (3, true)]);
        assert_eq!(placed(&b), vec![(4, true), (5, true), (6, true)]);
        assert!(load.values().all(|&n| n == 1));
    }

    #[test]
    fn only_what_is_missing_is_added_and_removed_nodes_are_skipped() {
        let mut nodes = vec![node(1, "primary"), node(2, "primary"), node(3, "dr")];
        nodes.push(pb::NodeRecord {
            removed: true,
            ..node(4, "dr")
        });
        let current = [pb::PgMember {
            member_id: 10,
            node_id: 1,
            voter: true,
        }];
        let mut load = load(&[]);
        let p = missing_members(
            PlacementPolicy::default(),
            "primary",
            &current,
            &nodes,
            &mut load,
        );
        assert_eq!(placed(&p), vec![(3, false), (2, true)]);
    }
}
