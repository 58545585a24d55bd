//! The catalog (PG 0): cluster identity, tenants and their wrapped keys,
//! protection groups, the volume name index and token hashes, as prost
//! records in the `catalog` column family. Nothing bulky and no volume state:
//! that lives in the volume's PG.
//!
//! Keys (ASCII prefixes; tenant, PG and volume names are validated to
//! `[a-z0-9][a-z0-9-]*`, so `/` never appears inside a name):
//! ```text
//! cluster                         ClusterRecord
//! tenant/NAME                     TenantRecord
//! pg/TENANT/NAME                  PgRecord
//! pgid/ID (u64 BE)                PgRecord
//! volname/TENANT/VOLUME           VolumeNameRecord
//! token/SHA256-HEX                TokenRecord
//! node/ID (u64 BE)                NodeRecord
//! counter/{tenant,pg,volume,member,drill}  next id, u64 BE
//! divergence/PG/GEN/NODE (u64 BE each)  DivergenceRecord
//! drill/ID (u64 BE)               DrillRecord (kept after the drill stops)
//! ```
//!
//! The catalog's own placement is `pgid/0`, like any PG's.

use std::io;

use lifeboat_proto::raft as pb;
use lifeboat_store::db::{Cf, Db};
use prost::Message;

pub const CLUSTER_KEY: &[u8] = b"cluster";

pub fn tenant_key(name: &str) -> Vec<u8> {
    format!("tenant/{name}").into_bytes()
}

pub fn pg_key(tenant: &str, pg: &str) -> Vec<u8> {
    format!("pg/{tenant}/{pg}").into_bytes()
}

pub fn pg_id_key(id: u64) -> Vec<u8> {
    [b"pgid/".as_slice(), &id.to_be_bytes()].concat()
}

pub fn volume_name_key(tenant: &str, volume: &str) -> Vec<u8> {
    format!("volname/{tenant}/{volume}").into_bytes()
}

/// Bucket names are global (S3 addresses a bucket by name alone).
pub fn bucket_name_key(bucket: &str) -> Vec<u8> {
    format!("bucketname/{bucket}").into_bytes()
}

pub fn credential_key(access_key: &str) -> Vec<u8> {
    format!("credential/{access_key}").into_bytes()
}

pub fn node_key(id: u64) -> Vec<u8> {
    [b"node/".as_slice(), &id.to_be_bytes()].concat()
}

/// The first node's catalog member id.
pub const FIRST_CATALOG_MEMBER: u64 = 1;
/// Catalog voters at the cluster's site (the rest of the nodes are learners).
pub const CATALOG_VOTERS: usize = 3;

/// What node `node` had of PG `pg`'s generation `generation` past its fork.
pub fn divergence_key(pg: u64, generation: u64, node: u64) -> Vec<u8> {
    let mut key = b"divergence/".to_vec();
    for part in [pg, generation, node] {
        key.extend_from_slice(&part.to_be_bytes());
    }
    key
}

/// The newest delta resync of PG `pg` on node `node`.
pub fn resync_key(pg: u64, node: u64) -> Vec<u8> {
    [
        b"resync/".as_slice(),
        &pg.to_be_bytes(),
        &node.to_be_bytes(),
    ]
    .concat()
}

/// The newest progress PG `pg`'s leader reported with its lease.
pub fn progress_key(pg: u64) -> Vec<u8> {
    [b"progress/".as_slice(), &pg.to_be_bytes()].concat()
}

pub fn drill_key(id: u64) -> Vec<u8> {
    [b"drill/".as_slice(), &id.to_be_bytes()].concat()
}

pub fn join_token_key(sha256: &[u8]) -> Vec<u8> {
    format!("jointoken/{}", hex_lower(sha256)).into_bytes()
}

pub fn token_key(sha256: &[u8]) -> Vec<u8> {
    format!("token/{}", hex_lower(sha256)).into_bytes()
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Copy, Debug)]
pub enum Counter {
    Tenant,
    Pg,
    Volume,
    Member,
    Drill,
}

impl Counter {
    pub fn key(self) -> &'static [u8] {
        match self {
            Counter::Tenant => b"counter/tenant",
            Counter::Pg => b"counter/pg",
            Counter::Volume => b"counter/volume",
            Counter::Member => b"counter/member",
            Counter::Drill => b"counter/drill",
        }
    }
}

/// The main PG every tenant gets.
pub const MAIN_PG: &str = "main";

fn decode<T: Message + Default>(key: &[u8], bytes: &[u8]) -> io::Result<T> {
    T::decode(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("catalog record {}: {e}", String::from_utf8_lossy(key)),
        )
    })
}

/// Reads of the local catalog replica.
#[derive(Clone, Debug)]
pub struct Catalog {
    db: Db,
}

impl Catalog {
    pub fn new(db: Db) -> Catalog {
        Catalog { db }
    }

    fn get<T: Message + Default>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.db.get(Cf::Catalog, key).map_err(io::Error::other)? {
            None => Ok(None),
            Some(bytes) => decode(key, &bytes).map(Some),
        }
    }

    fn list<T: Message + Default>(&self, prefix: &[u8]) -> io::Result<Vec<T>> {
        self.db
            .scan(Cf::Catalog, prefix, prefix, usize::MAX)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(k, v)| decode(&k, &v))
            .collect()
    }

    pub fn cluster(&self) -> io::Result<Option<pb::ClusterRecord>> {
        self.get(CLUSTER_KEY)
    }

    pub fn tenant(&self, name: &str) -> io::Result<Option<pb::TenantRecord>> {
        self.get(&tenant_key(name))
    }

    pub fn tenants(&self) -> io::Result<Vec<pb::TenantRecord>> {
        self.list(b"tenant/")
    }

    pub fn pg(&self, tenant: &str, name: &str) -> io::Result<Option<pb::PgRecord>> {
        self.get(&pg_key(tenant, name))
    }

    pub fn pg_by_id(&self, id: u64) -> io::Result<Option<pb::PgRecord>> {
        self.get(&pg_id_key(id))
    }

    /// Every tenant PG (not the catalog's own record, `pgid/0`).
    pub fn pgs(&self) -> io::Result<Vec<pb::PgRecord>> {
        Ok(self
            .list::<pb::PgRecord>(b"pgid/")?
            .into_iter()
            .filter(|p| p.id != 0)
            .collect())
    }

    /// The placement of the catalog itself.
    pub fn catalog_placement(&self) -> io::Result<Option<pb::PgRecord>> {
        self.get(&pg_id_key(0))
    }

    pub fn volume_name(
        &self,
        tenant: &str,
        volume: &str,
    ) -> io::Result<Option<pb::VolumeNameRecord>> {
        self.get(&volume_name_key(tenant, volume))
    }

    /// (volume name, record) for every bound volume name of a tenant.
    pub fn volume_names(&self, tenant: &str) -> io::Result<Vec<(String, pb::VolumeNameRecord)>> {
        let prefix = format!("volname/{tenant}/").into_bytes();
        self.db
            .scan(Cf::Catalog, &prefix, &prefix, usize::MAX)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(k, v)| {
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                decode(&k, &v).map(|r| (name, r))
            })
            .collect()
    }

    pub fn bucket_name(&self, bucket: &str) -> io::Result<Option<pb::BucketNameRecord>> {
        self.get(&bucket_name_key(bucket))
    }

    /// (bucket name, record) for every bound bucket name of a tenant.
    pub fn bucket_names(&self, tenant_id: u64) -> io::Result<Vec<(String, pb::BucketNameRecord)>> {
        let prefix = b"bucketname/".as_slice();
        let mut out = Vec::new();
        for (k, v) in self
            .db
            .scan(Cf::Catalog, prefix, prefix, usize::MAX)
            .map_err(io::Error::other)?
        {
            let record: pb::BucketNameRecord = decode(&k, &v)?;
            if record.tenant_id == tenant_id {
                out.push((
                    String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                    record,
                ));
            }
        }
        Ok(out)
    }

    pub fn credential(&self, access_key: &str) -> io::Result<Option<pb::CredentialRecord>> {
        self.get(&credential_key(access_key))
    }

    /// Every S3 credential of a tenant, by access key.
    pub fn credentials(&self, tenant_id: u64) -> io::Result<Vec<pb::CredentialRecord>> {
        let prefix = b"credential/".as_slice();
        let mut out = Vec::new();
        for (k, v) in self
            .db
            .scan(Cf::Catalog, prefix, prefix, usize::MAX)
            .map_err(io::Error::other)?
        {
            let record: pb::CredentialRecord = decode(&k, &v)?;
            if record.tenant_id == tenant_id {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Every divergence kept (see `DivergenceRecord`), by PG, generation
    /// and node.
    pub fn divergences(&self) -> io::Result<Vec<pb::DivergenceRecord>> {
        self.list(b"divergence/")
    }

    /// The newest delta resync of each node's replica of PG `pg`.
    pub fn resyncs(&self, pg: u64) -> io::Result<Vec<pb::ResyncRecord>> {
        self.list(&[b"resync/".as_slice(), &pg.to_be_bytes()].concat())
    }

    pub fn progress(&self, pg: u64) -> io::Result<Option<pb::PgProgress>> {
        self.get(&progress_key(pg))
    }

    pub fn drill(&self, id: u64) -> io::Result<Option<pb::DrillRecord>> {
        self.get(&drill_key(id))
    }

    /// Every drill, running or stopped, oldest first.
    pub fn drills(&self) -> io::Result<Vec<pb::DrillRecord>> {
        self.list(b"drill/")
    }

    pub fn node(&self, id: u64) -> io::Result<Option<pb::NodeRecord>> {
        self.get(&node_key(id))
    }

    /// Every node ever added, removed ones included.
    pub fn nodes(&self) -> io::Result<Vec<pb::NodeRecord>> {
        self.list(b"node/")
    }

    pub fn join_token(&self, sha256: &[u8]) -> io::Result<Option<pb::JoinTokenRecord>> {
        self.get(&join_token_key(sha256))
    }

    pub fn token(&self, sha256: &[u8]) -> io::Result<Option<pb::TokenRecord>> {
        self.get(&token_key(sha256))
    }

    /// Every admin token, as (lower-case hex SHA-256, record).
    pub fn tokens(&self) -> io::Result<Vec<(String, pb::TokenRecord)>> {
        let prefix = b"token/".as_slice();
        self.db
            .scan(Cf::Catalog, prefix, prefix, usize::MAX)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(k, v)| {
                let sha = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                decode(&k, &v).map(|r| (sha, r))
            })
            .collect()
    }
}
