//! Tenant quotas: the most a tenant's PGs may store together, counted in
//! stored bytes (`lifeboat_store::usage`: live data, history and pinned
//! versions alike), so that a tenant at its quota has its writes refused
//! rather than its history dropped.
//!
//! A node checks before it proposes a write that adds data (an NBD write,
//! an S3 body): writes of zeros, trims and deletes add nothing and always
//! pass. A tenant's bytes are the sum over its PGs: the usage row of each
//! PG this node hosts (exact as of its applied index), and for the others
//! the figure their leaders report to the catalog (`ReportPgUsage`, sent
//! when it has moved by [`REPORT_STEP_BYTES`] or is older than
//! `history.usage_report_interval_ms`). The check is a soft limit: writes
//! admitted just under the quota complete, so a tenant can pass it by the
//! writes in flight. Verdicts are cached for [`CHECK_TTL`] so that the
//! write path reads the catalog and usage rows at most that often per PG.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_store::{PgId, usage};

use crate::core::NodeCore;
use crate::error::{NodeError, NodeResult};

/// How long a verdict stands.
pub const CHECK_TTL: Duration = Duration::from_millis(500);
/// A leader reports its PG's stored bytes when they have moved this far
/// from the catalog's figure, or when they have moved at all and the
/// figure is `history.usage_report_interval_ms` old.
pub const REPORT_STEP_BYTES: u64 = 16 << 20;

/// A tenant's bytes against its quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantUsage {
    pub tenant: String,
    pub stored_bytes: u64,
    /// 0: no quota.
    pub quota_bytes: u64,
}

impl TenantUsage {
    pub fn over(&self) -> bool {
        self.quota_bytes > 0 && self.stored_bytes >= self.quota_bytes
    }
}

#[derive(Default)]
pub struct Quotas {
    verdicts: Mutex<HashMap<PgId, (Instant, Option<TenantUsage>)>>,
}

impl Quotas {
    /// Forgets every verdict (a quota changed here).
    pub fn forget(&self) {
        self.verdicts.lock().expect("quota lock").clear();
    }
}

impl NodeCore {
    /// The stored bytes of `tenant`'s PGs and its quota.
    pub fn tenant_usage(&self, tenant: &str) -> NodeResult<TenantUsage> {
        let record = self
            .catalog
            .tenant(tenant)
            .map_err(NodeError::io("read catalog"))?
            .ok_or_else(|| NodeError::TenantNotFound(tenant.to_owned()))?;
        let mut stored_bytes = 0;
        for pg in self.pg_records(Some(tenant))? {
            stored_bytes += match self.group(PgId(pg.id)) {
                Some(_) => usage::usage(&self.db, PgId(pg.id))?.stored_bytes,
                None => pg.stored_bytes,
            };
        }
        Ok(TenantUsage {
            tenant: tenant.to_owned(),
            stored_bytes,
            quota_bytes: record.quota_bytes,
        })
    }

    /// Refuses a write that adds data to `pg` when its tenant is at its
    /// quota.
    pub fn check_quota(&self, pg: PgId) -> NodeResult<()> {
        let cached = {
            let verdicts = self.quotas.verdicts.lock().expect("quota lock");
            verdicts
                .get(&pg)
                .filter(|(at, _)| at.elapsed() < CHECK_TTL)
                .map(|(_, over)| over.clone())
        };
        let over = match cached {
            Some(over) => over,
            None => {
                // Most tenants have no quota: one catalog read, no sum.
                let tenant = match self.catalog.pg_by_id(pg.0) {
                    Ok(Some(record)) if !record.tenant.is_empty() => self
                        .catalog
                        .tenant(&record.tenant)
                        .map_err(NodeError::io("read catalog"))?,
                    _ => None,
                };
                let over = match tenant {
                    Some(t) if t.quota_bytes > 0 => {
                        Some(self.tenant_usage(&t.name)?).filter(TenantUsage::over)
                    }
                    _ => None,
                };
                self.quotas
                    .verdicts
                    .lock()
                    .expect("quota lock")
                    .insert(pg, (Instant::now(), over.clone()));
                over
            }
        };
        match over {
            Some(u) => {
                self.metrics.writes_refused_quota.inc();
                Err(NodeError::QuotaExceeded {
                    tenant: u.tenant,
                    stored: format_bytes(u.stored_bytes),
                    quota: format_bytes(u.quota_bytes),
                })
            }
            None => Ok(()),
        }
    }

    /// Sets (`Some`) or removes (`None`) a tenant's quota.
    pub async fn set_tenant_quota(
        &self,
        tenant: &str,
        quota_bytes: Option<u64>,
    ) -> NodeResult<TenantUsage> {
        if quota_bytes == Some(0) {
            return Err(NodeError::InvalidSize {
                reason: "a quota of 0 bytes would refuse every write; remove the quota instead"
                    .into(),
            });
        }
        self.propose_catalog(pb::command::Kind::SetTenantQuota(pb::SetTenantQuota {
            tenant: tenant.to_owned(),
            quota_bytes: quota_bytes.unwrap_or(0),
        }))
        .await?;
        self.quotas.forget();
        tracing::info!(tenant, quota_bytes, "tenant quota set");
        self.tenant_usage(tenant)
    }

    /// As the leader of `pg`: reports its stored bytes to the catalog when
    /// the catalog's figure is far or old enough off.
    pub async fn report_pg_usage(&self, pg: PgId) -> NodeResult<()> {
        let Some(record) = self
            .catalog
            .pg_by_id(pg.0)
            .map_err(NodeError::io("read catalog"))?
        else {
            return Ok(());
        };
        let stored = usage::usage(&self.db, pg)?.stored_bytes;
        let moved = stored.abs_diff(record.stored_bytes);
        let old = self.now_ms().saturating_sub(record.usage_ms)
            >= self.config.history.usage_report_interval_ms;
        if moved == 0 || (moved < REPORT_STEP_BYTES && !old) {
            return Ok(());
        }
        self.propose_catalog(pb::command::Kind::ReportPgUsage(pb::ReportPgUsage {
            tenant: record.tenant,
            name: record.name,
            stored_bytes: stored,
        }))
        .await?;
        Ok(())
    }
}

/// Bytes with the largest binary unit that keeps them readable: "512 B",
/// "1.5 KiB", "10 GiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {name}", bytes / size)
            } else {
                format!("{:.1} {name}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}
