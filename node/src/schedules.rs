//! Scheduled snapshots: each PG's leader makes a snapshot named
//! `auto-YYYYMMDD-HHMMSS` every period its schedule sets, then deletes the
//! scheduled snapshots its retention does not keep. Snapshots people made
//! are never touched, and a locked one is kept whatever the retention says.
//! Everything goes through the PG's log, so a new leader carries on.

use std::sync::Arc;

use lifeboat_proto::raft as pb;
use lifeboat_snapshot::{self as points, Retention, SCHEDULED_PREFIX};
use lifeboat_store::PgId;

use crate::core::NodeCore;

/// How often leaders look at their schedules (the shortest period is one
/// second).
pub const SCHEDULE_CHECK_MS: u64 = 500;

/// One pass over every PG this node leads.
pub async fn run_once(core: &Arc<NodeCore>) {
    for group in core.groups() {
        let pg = group.pg();
        if pg == PgId::CATALOG || !group.leadership().is_leader {
            continue;
        }
        let schedule = match core.history.schedule(pg) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(pg = pg.0, error = %e, "schedules: cannot read the schedule");
                continue;
            }
        };
        let scheduled = match core.history.snapshots(pg) {
            Ok(all) => all
                .into_iter()
                .filter(|(name, _)| name.starts_with(SCHEDULED_PREFIX))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(pg = pg.0, error = %e, "schedules: cannot list snapshots");
                continue;
            }
        };
        let now_ms = core.now_ms();
        let newest = scheduled.iter().map(|(_, r)| r.created_ms).max();
        let pg_name = core.pg_display_name(pg);
        if newest.is_none_or(|n| now_ms >= n + schedule.interval_ms) {
            let name = points::scheduled_snapshot_name(core.now());
            if !scheduled.iter().any(|(n, _)| *n == name) {
                match core.create_snapshot(&pg_name, &name, "", "").await {
                    Ok(_) => {
                        core.metrics.scheduled_snapshots.inc();
                    }
                    Err(e) => {
                        tracing::warn!(pg = pg_name, code = e.code(), error = %e, "schedules: snapshot failed")
                    }
                }
            }
        }
        let retention = Retention {
            last: schedule.keep_last,
            hourly: schedule.keep_hourly,
            daily: schedule.keep_daily,
            weekly: schedule.keep_weekly,
            monthly: schedule.keep_monthly,
        };
        let times: Vec<u64> = scheduled.iter().map(|(_, r)| r.at_ms).collect();
        let keep = retention.keep(&times);
        for (i, (name, record)) in scheduled.iter().enumerate() {
            if keep.contains(&i) || record.is_locked_at(now_ms) {
                continue;
            }
            let kind = pb::command::Kind::DeleteSnapshot(pb::DeleteSnapshot {
                name: name.clone(),
                operator: false,
            });
            match group.propose(kind).await {
                Ok(_) => {
                    core.metrics.scheduled_snapshots_pruned.inc();
                    tracing::info!(
                        pg = pg_name,
                        snapshot = name,
                        "schedules: pruned by retention"
                    );
                }
                Err(e) => tracing::warn!(pg = pg_name, error = %e, "schedules: prune failed"),
            }
        }
    }
}
