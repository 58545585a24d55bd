//! The history's GC as PG leaders drive it: each interval, a leader moves
//! its PG's horizon to the start of the window (now less the window), then
//! proposes scanner steps, one bounded `CollectGarbage` entry at a time
//! with a pause between them, until the pass is over. Apply does the
//! deleting (`lifeboat_store::gc`), so every replica deletes the same
//! versions; a new leader carries on from the cursor in the PG.

use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::{Applied, ProtectionGroup};
use lifeboat_store::gc::{self, Cursor};
use lifeboat_store::{PgId, history};

use crate::core::NodeCore;
use crate::error::NodeResult;

/// The smallest horizon move worth a new pass of the scanner: a twentieth
/// of the window (72 minutes for a day), and never less than 100 ms.
fn horizon_step_ms(window_ms: u64) -> u64 {
    (window_ms / 20).max(100)
}

/// One pass over every PG this node leads.
pub async fn run_once(core: &Arc<NodeCore>) {
    for group in core.groups() {
        let pg = group.pg();
        if pg == PgId::CATALOG || !group.leadership().is_leader {
            continue;
        }
        if let Err(e) = collect(core, &group).await {
            tracing::warn!(pg = core.pg_display_name(pg), code = e.code(), error = %e, "history GC step failed");
        }
    }
}

async fn collect(core: &Arc<NodeCore>, group: &ProtectionGroup) -> NodeResult<()> {
    let pg = group.pg();
    let config = &core.config.history;
    let window_ms = gc::window(&core.db, pg)?.unwrap_or(config.window_ms);
    let target_ms = core.now_ms().saturating_sub(window_ms);
    let horizon = gc::horizon(&core.db, pg)?;
    let behind = horizon.is_none_or(|h| target_ms >= h.at_ms + horizon_step_ms(window_ms));
    let has_history = core.history.oldest_ms(pg)?.is_some_and(|oldest| {
        history::timeline_bucket(oldest) < history::timeline_bucket(target_ms)
    });
    if behind && has_history {
        group
            .propose(pb::command::Kind::AdvanceHorizon(pb::AdvanceHorizon {
                at_ms: target_ms,
            }))
            .await?;
    }
    while gc::cursor(&core.db, pg)? != Cursor::Done {
        if !group.leadership().is_leader {
            return Ok(());
        }
        let (_, applied) = group
            .propose(pb::command::Kind::CollectGarbage(pb::CollectGarbage {
                max_rows: config.gc_step_rows,
            }))
            .await?;
        if let Applied::Collected {
            versions,
            bytes,
            done,
        } = applied
        {
            core.metrics.gc_versions_reclaimed.inc_by(versions);
            core.metrics.gc_bytes_reclaimed.inc_by(bytes);
            if done {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(config.gc_step_pause_ms)).await;
    }
    Ok(())
}
