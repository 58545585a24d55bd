//! Where a PG's members go: voters at the PG's active site, learners at
//! every other site, each on the nodes that host the fewest members so far.
//! Pure functions over catalog records; the catalog leader proposes what
//! they decide.

use std::collections::{BTreeMap, BTreeSet};

use lifeboat_proto::raft as pb;

use crate::catalog::CATALOG_VOTERS;

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
    let live: Vec<&pb::NodeRecord> = nodes.iter().filter(|n| !n.removed && !n.witness).collect();
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

/// The catalog's voters (member ids) among its members `current` on the
/// live `nodes`. With a witness: the witness and up to two members at each
/// of two data sites (the cluster's own, and the other with the most
/// catalog members), so that losing any one location leaves a quorum.
/// Without: up to [`CATALOG_VOTERS`] at the cluster's site, so that a cut
/// WAN never stops a healthy primary. Members that vote now are kept where
/// they fit (no needless membership changes), then the lowest node ids.
pub fn catalog_voters(
    cluster_site: &str,
    current: &[pb::PgMember],
    nodes: &[pb::NodeRecord],
) -> BTreeSet<u64> {
    let live: BTreeMap<u64, &pb::NodeRecord> = nodes
        .iter()
        .filter(|n| !n.removed)
        .map(|n| (n.id, n))
        .collect();
    let members: Vec<(&pb::PgMember, &pb::NodeRecord)> = current
        .iter()
        .filter_map(|m| Some((m, *live.get(&m.node_id)?)))
        .collect();
    let pick = |wanted: &dyn Fn(&pb::NodeRecord) -> bool, k: usize| -> Vec<u64> {
        let mut candidates: Vec<_> = members.iter().filter(|(_, n)| wanted(n)).collect();
        candidates.sort_by_key(|(m, n)| (!m.voter, n.id));
        candidates
            .into_iter()
            .take(k)
            .map(|(m, _)| m.member_id)
            .collect()
    };
    let at = |site: &str| {
        let site = site.to_owned();
        move |n: &pb::NodeRecord| !n.witness && n.site == site
    };
    let mut voters = pick(&|n| n.witness, 1);
    if voters.is_empty() {
        return pick(&at(cluster_site), CATALOG_VOTERS)
            .into_iter()
            .collect();
    }
    voters.extend(pick(&at(cluster_site), 2));
    let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, n) in &members {
        if !n.witness && n.site != cluster_site {
            *per_site.entry(n.site.as_str()).or_default() += 1;
        }
    }
    // Most members first; ties to the first site by name.
    if let Some((other, _)) = per_site
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
    {
        voters.extend(pick(&at(other), 2));
    }
    voters.into_iter().collect()
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

    /// A new PG's members at `primary` over `nodes`, by the default policy.
    fn first_placement(nodes: &[pb::NodeRecord]) -> Vec<pb::PlacedMember> {
        let mut load = BTreeMap::new();
        missing_members(PlacementPolicy::default(), "primary", &[], nodes, &mut load)
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
        let p = first_placement(&nodes);
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

    fn member(member_id: u64, node_id: u64, voter: bool) -> pb::PgMember {
        pb::PgMember {
            member_id,
            node_id,
            voter,
        }
    }

    #[test]
    fn a_witness_is_never_placed_in_a_pg() {
        let nodes = [
            node(1, "primary"),
            node(2, "dr"),
            pb::NodeRecord {
                witness: true,
                ..node(3, "witness")
            },
        ];
        let p = first_placement(&nodes);
        assert_eq!(placed(&p), vec![(2, false), (1, true)]);
    }

    #[test]
    fn catalog_voters_span_both_sites_and_the_witness_or_stay_at_home() {
        let mut nodes = vec![
            node(1, "primary"),
            node(2, "primary"),
            node(3, "primary"),
            node(4, "dr"),
            node(5, "dr"),
        ];
        // Member id = node id + 10; the first three vote, as when added.
        let mut members: Vec<pb::PgMember> = (1..=5).map(|n| member(n + 10, n, n <= 3)).collect();
        let voters = |members: &[pb::PgMember], nodes: &[pb::NodeRecord]| {
            catalog_voters("primary", members, nodes)
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(voters(&members, &nodes), vec![11, 12, 13], "no witness");
        nodes.push(pb::NodeRecord {
            witness: true,
            ..node(6, "witness")
        });
        members.push(member(16, 6, false));
        assert_eq!(
            voters(&members, &nodes),
            vec![11, 12, 14, 15, 16],
            "two and two and the witness"
        );
        // A voter at primary keeps its vote over a lower node id.
        members[0].voter = false;
        assert_eq!(voters(&members, &nodes), vec![12, 13, 14, 15, 16]);
        // Removed nodes do not vote; the witness alone at a site with one
        // data node left.
        nodes[3].removed = true;
        nodes[4].removed = true;
        assert_eq!(voters(&members, &nodes), vec![12, 13, 16]);
        nodes[5].removed = true;
        assert_eq!(
            voters(&members, &nodes),
            vec![11, 12, 13],
            "without its witness the catalog goes home"
        );
    }
}
