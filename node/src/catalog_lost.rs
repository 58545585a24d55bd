//! When the catalog's quorum went down with the active site (and with the
//! witness, or there was none): `failover --force --catalog-lost` rebuilds
//! the catalog at a surviving site, then fails every PG over to it
//! (DESIGN.md "Site leases and the witness"). It is the offline forced
//! membership of a forced failover (`research/openraft.md` §3.1) applied to
//! the catalog itself, plus a new cluster identity so that the old site's
//! nodes cannot talk to the rebuilt cluster.
//!
//! On a node of the surviving site:
//! 1. refused while this node reaches a majority of the catalog's voters:
//!    then the catalog is not lost, and a plain forced failover works;
//! 2. the survivors are the nodes of the site (and a witness) that answer:
//!    each makes a key for the new cluster (`RebuildPrepare`) and says how
//!    far its catalog's log goes;
//! 3. a new cluster id and CA; each survivor's certificate signed by it;
//! 4. each survivor adopts the new identity and restarts its catalog member
//!    at generation g+1 (`RebuildAdopt`), the one holding the most catalog
//!    log first, as the only voter; this node last, since a node that has
//!    adopted no longer talks to nodes of the old cluster;
//! 5. the rebuilt catalog's first command (`RebuildCluster`) records the
//!    new identity, site and members; then the forced failover of every PG
//!    active elsewhere, and the nodes that did not survive are removed.
//!
//! What it cannot do, and says: the old site's nodes, if they come back,
//! still form their own cluster with their own catalog and serve their own
//! clients. They must be kept down or wiped (etcd's `--force-new-cluster`
//! caveat, and the reason to run a witness).
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_replication::ack::EventSink;
use lifeboat_replication::members;
use lifeboat_replication::transport;
use lifeboat_store::PgId;
use tonic::Status;

use crate::core::{CA_KEY_PURPOSE, NodeCore, random_hex};
use crate::error::{NodeError, NodeResult};
use crate::failover::{PgForced, answering, by_id, raft_addr};
use crate::pki::{self, ClusterCa, NodeTls};

/// A key made for the rebuilt cluster and its signing request (PEM).
#[derive(Clone)]
pub struct PendingKey {
    key_pem: String,
    csr_pem: String,
}

/// What `failover --force --catalog-lost` did.
#[derive(Clone, Debug)]
pub struct CatalogRebuilt {
    pub previous_cluster_id: String,
    pub cluster_id: String,
    /// The catalog's generation from now on.
    pub generation: u64,
    pub site: String,
    /// The node whose catalog replica held the most, the rebuilt catalog's
    /// first voter, and its last log index (the catalog's fork).
    pub catalog_node: u64,
    pub catalog_fork_index: u64,
    /// The nodes in the rebuilt cluster, and those removed from it.
    pub survivors: Vec<u64>,
    pub removed: Vec<u64>,
    pub pgs: Vec<PgForced>,
    pub took: Duration,
}

/// A surviving node with its catalog member, how far that member's log
/// goes and its signing request.
struct Survivor<'a> {
    member: &'a pb::PgMember,
    node: &'a pb::NodeRecord,
    tail: pb::LogTailReply,
    csr_pem: String,
}

/// Whether `answering` of `voters` is a majority (a catalog quorum).
pub(crate) fn is_quorum(answering: usize, voters: usize) -> bool {
    voters > 0 && answering * 2 > voters
}

impl NodeCore {
    /// Refused while this node reaches a majority of the catalog's voters,
    /// by node (`reachable`): the catalog is not lost.
    pub(crate) fn catalog_quorum(
        &self,
        reachable: &HashMap<u64, bool>,
    ) -> NodeResult<(usize, usize)> {
        let voters = self.catalog_voter_nodes()?;
        Ok((answering(&voters, reachable), voters.len()))
    }

    /// The catalog's voters' nodes, as the catalog replica here has them.
    pub(crate) fn catalog_voter_nodes(&self) -> NodeResult<BTreeSet<u64>> {
        Ok(self
            .catalog
            .catalog_placement()
            .map_err(NodeError::io("read catalog"))?
            .ok_or(NodeError::NotInitialized)?
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.node_id)
            .collect())
    }

    /// Each of `nodes` asked at once whether it answers on its Raft port.
    pub(crate) async fn reachable_nodes(
        &self,
        nodes: impl IntoIterator<Item = u64>,
    ) -> NodeResult<HashMap<u64, bool>> {
        let records = self
            .catalog
            .nodes()
            .map_err(NodeError::io("read catalog"))?;
        let by = by_id(&records);
        let answers = futures::future::join_all(nodes.into_iter().map(|id| {
            let addr = by.get(&id).map_or("", |n| raft_addr(n)).to_owned();
            async move { (id, self.peer_reachable(&addr).await) }
        }))
        .await;
        Ok(answers.into_iter().collect())
    }

    /// Rebuilds the lost catalog at `to_site`, this node's site, then fails
    /// every PG active elsewhere over to it and removes the nodes that did
    /// not survive (see the module's documentation).
    pub async fn force_failover_catalog_lost(
        &self,
        to_site: &str,
        timeout: Duration,
    ) -> NodeResult<CatalogRebuilt> {
        let started = Instant::now();
        if to_site != self.config.site {
            return Err(NodeError::WrongSite {
                action: format!("rebuild the catalog at site {to_site}"),
                here: self.config.site.clone(),
                wanted: to_site.to_owned(),
            });
        }
        // The new CA's key is sealed by the master key; a witness has none.
        let master = self.master_key()?;
        let previous_cluster_id = self
            .identity
            .cluster_id()
            .ok_or(NodeError::NotInitialized)?;
        let me = self.config.node_id;
        let io = || NodeError::io("read catalog");
        let p0 = self
            .catalog
            .catalog_placement()
            .map_err(io())?
            .ok_or(NodeError::NotInitialized)?;
        let local = self.catalog_group()?;
        if local.generation().0 != p0.generation {
            return Err(NodeError::Io {
                op: "rebuild the catalog".into(),
                source: std::io::Error::other(format!(
                    "the catalog member here runs generation {}, its record says {}: a rebuild is under way or half done",
                    local.generation(),
                    p0.generation
                )),
            });
        }
        let nodes = self.catalog.nodes().map_err(io())?;
        let live: Vec<pb::NodeRecord> = nodes.into_iter().filter(|n| !n.removed).collect();
        let by = by_id(&live);

        let reachable = self.reachable_nodes(self.catalog_voter_nodes()?).await?;
        let (answering, voters) = self.catalog_quorum(&reachable)?;
        if is_quorum(answering, voters) {
            return Err(NodeError::CatalogNotLost {
                reachable: answering,
                voters,
            });
        }

        // The survivors: this site's nodes and any witness that answer,
        // each with a key for the new cluster and its catalog log's tail.
        let candidates: Vec<(&pb::PgMember, &pb::NodeRecord)> = p0
            .members
            .iter()
            .filter_map(|m| Some((m, *by.get(&m.node_id)?)))
            .filter(|(_, n)| n.site == to_site || n.witness)
            .collect();
        let route = |m: &pb::PgMember| pb::Route {
            cluster_id: previous_cluster_id.clone(),
            pg: PgId::CATALOG.0,
            generation: p0.generation,
            target_member: m.member_id,
            from_node: me,
        };
        let (local_ref, route_ref) = (&local, &route);
        let asked = futures::future::join_all(candidates.iter().map(|&(m, n)| async move {
            let (local, route) = (local_ref, route_ref);
            if n.id == me {
                let tail = local.log_tail().map_err(|e| e.to_string())?;
                let csr = self.rebuild_prepare().map_err(|s| s.message().to_owned())?;
                return Ok::<_, String>((tail, csr));
            }
            let addr = raft_addr(n);
            let tail = transport::log_tail(
                &self.peers,
                &self.identity,
                addr,
                PgId::CATALOG,
                local.generation(),
            )
            .await
            .map_err(|s| s.message().to_owned())?;
            let csr = transport::rebuild_prepare(&self.peers, addr, route(m))
                .await
                .map_err(|s| s.message().to_owned())?;
            Ok((tail, csr))
        }))
        .await;
        let mut survivors = Vec::new();
        for ((member, node), answer) in candidates.iter().zip(asked) {
            match answer {
                Ok((tail, csr_pem)) => survivors.push(Survivor {
                    member,
                    node,
                    tail,
                    csr_pem,
                }),
                Err(e) => {
                    tracing::warn!(node = node.id, error = %e, "node does not survive into the rebuilt cluster")
                }
            }
        }
        // The one whose catalog log goes furthest (term, then index, as a
        // vote compares them) holds every catalog entry any survivor has.
        let best = survivors
            .iter()
            .filter(|s| !s.node.witness)
            .max_by_key(|s| (s.tail.term, s.tail.index))
            .ok_or_else(|| NodeError::NoStandbyAnswered {
                pg: "catalog".into(),
                site: to_site.to_owned(),
            })?;
        let best_member = best.member.member_id;
        let best_node = best.node.id;
        let catalog_fork_index = best.tail.index;

        let cluster_id = random_hex(16);
        let ca = ClusterCa::generate(&cluster_id)?;
        let ca_key_sealed = master.seal_secret(CA_KEY_PURPOSE, ca.key_pem().as_bytes());
        let generation = p0.generation + 1;
        self.events.event(
            PgId::CATALOG,
            "catalog_rebuild_started",
            format!(
                "the catalog reaches {answering} of its {voters} voters: rebuilding it at {to_site} as cluster {cluster_id} generation {generation} on nodes {:?}, from node {best_node}'s replica (last index {catalog_fork_index})",
                survivors.iter().map(|s| s.node.id).collect::<Vec<_>>()
            ),
        );
        let forced = |s: &Survivor| pb::ForcedMember {
            member_id: s.member.member_id,
            node_id: s.node.id,
            raft_addr: raft_addr(s.node).to_owned(),
            site: s.node.site.clone(),
        };
        let adopt = |s: &Survivor| -> NodeResult<pb::RebuildAdoptRequest> {
            let is_best = s.member.member_id == best_member;
            let addrs = s.node.addrs.clone().unwrap_or_default();
            Ok(pb::RebuildAdoptRequest {
                catalog: Some(pb::ForceGenerationRequest {
                    route: Some(route(s.member)),
                    generation,
                    force_membership: is_best,
                    voters: if is_best { vec![forced(s)] } else { Vec::new() },
                    learners: if is_best {
                        survivors
                            .iter()
                            .filter(|o| o.member.member_id != best_member)
                            .map(forced)
                            .collect()
                    } else {
                        Vec::new()
                    },
                }),
                cluster_id: cluster_id.clone(),
                ca_cert_pem: ca.cert_pem().to_owned(),
                cert_pem: ca.sign_node(&s.csr_pem, s.node.id, &Self::cert_ips(&addrs))?,
            })
        };
        // The best first (nothing has changed if it fails), this node last
        // (once it adopts, it cannot reach the others in the old cluster).
        let mut order: Vec<&Survivor> = survivors.iter().filter(|s| s.node.id != me).collect();
        order.sort_by_key(|s| s.member.member_id != best_member);
        let mut adopted: Vec<u64> = Vec::new();
        let mut adopted_members: Vec<u64> = Vec::new();
        for s in order {
            let answer = transport::rebuild_adopt(&self.peers, raft_addr(s.node), adopt(s)?).await;
            match answer {
                Ok(_) => {
                    adopted.push(s.node.id);
                    adopted_members.push(s.member.member_id);
                }
                Err(st) if s.member.member_id == best_member => {
                    return Err(NodeError::PeerRefused {
                        addr: raft_addr(s.node).to_owned(),
                        code: st.code(),
                        message: format!(
                            "the node holding the most catalog log did not adopt the rebuilt cluster; nothing changed: {}",
                            st.message()
                        ),
                    });
                }
                Err(st) => {
                    tracing::warn!(node = s.node.id, error = %st, "node did not adopt the rebuilt cluster; it is removed")
                }
            }
        }
        let mine = survivors
            .iter()
            .find(|s| s.node.id == me)
            .ok_or_else(|| NodeError::Io {
                op: "rebuild the catalog".into(),
                source: std::io::Error::other("this node has no catalog member"),
            })?;
        self.rebuild_adopt(adopt(mine)?)
            .await
            .map_err(|st| NodeError::Io {
                op: "adopt the rebuilt cluster here".into(),
                source: std::io::Error::other(st.message().to_owned()),
            })?;
        adopted.push(me);
        adopted_members.push(mine.member.member_id);

        self.propose_catalog(pb::command::Kind::RebuildCluster(pb::RebuildCluster {
            previous_cluster_id: previous_cluster_id.clone(),
            cluster_id: cluster_id.clone(),
            site: to_site.to_owned(),
            generation,
            ca_cert_pem: ca.cert_pem().to_owned(),
            ca_key_sealed: ca_key_sealed.into(),
            members: adopted_members,
            voter: best_member,
        }))
        .await?;
        self.events.event(
            PgId::CATALOG,
            "catalog_rebuilt",
            format!(
                "cluster {previous_cluster_id} is now cluster {cluster_id}, generation {generation}, at {to_site}: its catalog is led by node {best_node} from index {}, {} ms after the command",
                catalog_fork_index + 1,
                started.elapsed().as_millis()
            ),
        );

        let remaining = timeout.saturating_sub(started.elapsed());
        let pgs = self.force_failover(to_site, &[], remaining).await?;

        let mut removed = Vec::new();
        for n in live.iter().filter(|n| !adopted.contains(&n.id)) {
            self.remove_node(n.id).await?;
            self.events.event(
                PgId::CATALOG,
                "node_removed",
                format!(
                    "node {} (site {}) did not survive the loss of the catalog: removed; keep it down or wipe it, it rejoins only as a new node",
                    n.id, n.site
                ),
            );
            removed.push(n.id);
        }
        adopted.sort_unstable();
        Ok(CatalogRebuilt {
            previous_cluster_id,
            cluster_id,
            generation,
            site: to_site.to_owned(),
            catalog_node: best_node,
            catalog_fork_index,
            survivors: adopted,
            removed,
            pgs,
            took: started.elapsed(),
        })
    }

    /// On a surviving node: its key for the rebuilt cluster, made once and
    /// kept until adopted, and the signing request for it.
    pub fn rebuild_prepare(&self) -> Result<String, Status> {
        let mut pending = self.rebuild_key.lock().expect("rebuild key lock");
        if let Some(p) = pending.as_ref() {
            return Ok(p.csr_pem.clone());
        }
        let (key_pem, csr_pem) = pki::new_key_and_csr(&format!("node-{}", self.config.node_id))
            .map_err(|e| crate::admin::status(&e))?;
        *pending = Some(PendingKey {
            key_pem,
            csr_pem: csr_pem.clone(),
        });
        Ok(csr_pem)
    }

    /// On a surviving node: takes the rebuilt cluster's identity (its
    /// certificate for the prepared key, the new CA, the new cluster id,
    /// bound for ever), then restarts the catalog member at the new
    /// generation. Refused unless a key was prepared for it.
    pub async fn rebuild_adopt(
        &self,
        req: pb::RebuildAdoptRequest,
    ) -> Result<pb::ForceGenerationReply, Status> {
        let catalog = req
            .catalog
            .ok_or_else(|| Status::invalid_argument("no catalog restart"))?;
        let previous = self
            .identity
            .cluster_id()
            .ok_or_else(|| Status::failed_precondition("this node is in no cluster"))?;
        let key = self
            .rebuild_key
            .lock()
            .expect("rebuild key lock")
            .clone()
            .ok_or_else(|| {
                Status::failed_precondition("no key was prepared here for a rebuilt cluster")
            })?;
        if pki::cert_key_sha256(&req.cert_pem).map_err(|e| crate::admin::status(&e))?
            != pki::csr_key_sha256(&key.csr_pem).map_err(|e| crate::admin::status(&e))?
        {
            return Err(Status::invalid_argument(
                "the certificate is not for the key prepared here",
            ));
        }
        let tls = NodeTls {
            ca_pem: req.ca_cert_pem,
            cert_pem: req.cert_pem,
            key_pem: key.key_pem,
        };
        // A crash between these two leaves a node that talks to neither
        // cluster; the window is two fsyncs wide.
        self.install_tls(tls)
            .map_err(|e| crate::admin::status(&e))?;
        members::rebind_cluster(&self.db, &previous, &req.cluster_id)
            .map_err(|e| Status::internal(format!("bind the rebuilt cluster: {e}")))?;
        self.identity.set_cluster_id(&req.cluster_id);
        *self.rebuild_key.lock().expect("rebuild key lock") = None;
        self.events.event(
            PgId::CATALOG,
            "cluster_adopted",
            format!(
                "this node left cluster {previous} for its rebuilt successor {}: new CA, new certificate",
                req.cluster_id
            ),
        );
        self.force_generation(catalog).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_catalog_quorum_is_a_strict_majority_of_its_voters() {
        assert!(is_quorum(2, 3));
        assert!(is_quorum(3, 5));
        assert!(!is_quorum(2, 4), "half is not a quorum");
        assert!(!is_quorum(2, 5));
        assert!(!is_quorum(0, 3));
        assert!(!is_quorum(0, 0), "no voters known: no quorum");
    }
}
