//! Which member of which PG this node hosts, kept in the node's own
//! `raft_state` rows (never replicated), so that a restarted node starts
//! exactly the members it had, under the same member ids, before it has
//! read anything from the catalog.

use std::io;

use lifeboat_store::db::{Cf, Db, Durability};
use lifeboat_store::keys::{self, RaftStateKind};
use lifeboat_store::{Generation, MemberId, PgId};

/// This node's member of one PG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalMember {
    pub pg: PgId,
    pub member: MemberId,
    pub generation: Generation,
}

fn encode(m: &LocalMember) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&m.member.0.to_be_bytes());
    v[8..].copy_from_slice(&m.generation.0.to_be_bytes());
    v
}

fn decode(pg: PgId, v: &[u8]) -> io::Result<LocalMember> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("pg {pg}: local member record is not 16 bytes"),
        )
    };
    let member = u64::from_be_bytes(v.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let generation = u64::from_be_bytes(
        v.get(8..16)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    Ok(LocalMember {
        pg,
        member: MemberId(member),
        generation: Generation(generation),
    })
}

/// Records (fsynced) that this node hosts `m`.
pub fn save(db: &Db, m: &LocalMember) -> io::Result<()> {
    let mut b = db.new_batch();
    b.put(
        Cf::RaftState,
        &keys::raft_state_key(m.pg, RaftStateKind::LocalMember),
        &encode(m),
    );
    db.write(b, Durability::Sync).map_err(io::Error::other)
}

/// Forgets this node's member of `pg` and every row of its log state, so a
/// later member of the same PG on this node starts from nothing.
pub fn forget(db: &Db, pg: PgId) -> io::Result<()> {
    let mut b = db.new_batch();
    let prefix = keys::pg_prefix(pg);
    let mut end = prefix;
    // PG ids below u64::MAX: the next PG's prefix ends this one's range.
    end.copy_from_slice(&(pg.0 + 1).to_be_bytes());
    b.delete_range(Cf::RaftState, &prefix, &end);
    b.delete_range(Cf::RaftLog, &prefix, &end);
    db.write(b, Durability::Sync).map_err(io::Error::other)
}

/// Every member this node hosts, by PG.
pub fn all(db: &Db) -> io::Result<Vec<LocalMember>> {
    let rows = db
        .scan(Cf::RaftState, &[], &[], usize::MAX)
        .map_err(io::Error::other)?;
    rows.into_iter()
        .filter(|(k, _)| {
            k.len() == keys::RAFT_STATE_KEY_BYTES && k[8] == RaftStateKind::LocalMember as u8
        })
        .map(|(k, v)| {
            let pg = PgId(u64::from_be_bytes(
                k[..8].try_into().expect("8-byte prefix"),
            ));
            decode(pg, &v)
        })
        .collect()
}

/// The cluster this node is bound to, if any.
pub fn cluster_binding(db: &Db) -> io::Result<Option<String>> {
    Ok(db
        .get(
            Cf::RaftState,
            &keys::raft_state_key(PgId::CATALOG, RaftStateKind::ClusterBinding),
        )
        .map_err(io::Error::other)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Moves this node from cluster `from` to its rebuilt successor `to`
/// (fsynced): the one way a binding changes, when the catalog of `from` was
/// lost and rebuilt at this node's site. Refused unless bound to `from`;
/// already bound to `to` is a no-op (the rebuild is retried).
pub fn rebind_cluster(db: &Db, from: &str, to: &str) -> io::Result<()> {
    match cluster_binding(db)? {
        Some(c) if c == to => return Ok(()),
        Some(c) if c == from => {}
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("this node is bound to cluster {other:?}, not {from}"),
            ));
        }
    }
    write_binding(db, to)
}

/// Binds this node to a cluster (fsynced). Binding again to the same
/// cluster is a no-op; to another one is refused.
pub fn bind_cluster(db: &Db, cluster_id: &str) -> io::Result<()> {
    match cluster_binding(db)? {
        Some(c) if c == cluster_id => return Ok(()),
        Some(c) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("this node already belongs to cluster {c}"),
            ));
        }
        None => {}
    }
    write_binding(db, cluster_id)
}

fn write_binding(db: &Db, cluster_id: &str) -> io::Result<()> {
    let mut b = db.new_batch();
    b.put(
        Cf::RaftState,
        &keys::raft_state_key(PgId::CATALOG, RaftStateKind::ClusterBinding),
        cluster_id.as_bytes(),
    );
    db.write(b, Durability::Sync).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use lifeboat_store::db::DbOptions;

    use super::*;

    /// A node is bound to one cluster; it moves only to the rebuilt
    /// successor of the one it is bound to, and moving again is a no-op.
    #[test]
    fn a_binding_moves_only_from_the_cluster_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), &DbOptions::default()).unwrap();
        assert!(
            rebind_cluster(&db, "old", "new").is_err(),
            "an unbound node has nothing to move"
        );
        bind_cluster(&db, "old").unwrap();
        assert!(bind_cluster(&db, "other").is_err());
        let err = rebind_cluster(&db, "other", "new").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(cluster_binding(&db).unwrap().as_deref(), Some("old"));
        rebind_cluster(&db, "old", "new").unwrap();
        assert_eq!(cluster_binding(&db).unwrap().as_deref(), Some("new"));
        rebind_cluster(&db, "old", "new").unwrap();
        assert_eq!(cluster_binding(&db).unwrap().as_deref(), Some("new"));
        assert!(bind_cluster(&db, "old").is_err(), "the old cluster is left");
    }
}
