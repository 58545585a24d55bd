//! The history's GC as PG leaders drive it: each interval, a leader moves
//! its PG's horizon to the start of the window (now less the window), then
//! proposes scanner steps, one bounded `CollectGarbage` entry at a time
//! with a pause between them, until the pass is over. Apply does the
//! deleting (`lifeboat_store::gc`), so every replica deletes the same
//! versions; a new leader carries on from the cursor in the PG. A pass also
//! takes the PG's census (`lifeboat_store::usage`): when one is due, a
//! leader starts a pass even though the horizon has not moved.

use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_replication::{Applied, ProtectionGroup};
use lifeboat_store::gc::{self, Cursor};
use lifeboat_store::{PgId, history, usage};

use crate::config::SpaceShortPolicy;
use crate::core::NodeCore;
use crate::error::NodeResult;

/// The smallest horizon move worth a new pass of the scanner: a twentieth
/// of the window (72 minutes for a day), and never less than 100 ms.
fn horizon_step_ms(window_ms: u64) -> u64 {
    (window_ms / 20).max(100)
}

/// Shrinking windows again waits this long, so that GC can free space
/// first.
const SHRINK_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// One pass over every PG this node leads.
pub async fn run_once(core: &Arc<NodeCore>) {
    if let Err(e) = check_space(core).await {
        tracing::warn!(code = e.code(), error = %e, "history: space check failed");
    }
    for group in core.groups() {
        let pg = group.pg();
        if pg == PgId::CATALOG || !group.leadership().is_leader {
            continue;
        }
        if let Err(e) = collect(core, &group).await {
            tracing::warn!(pg = core.pg_display_name(pg), code = e.code(), error = %e, "history GC step failed");
        }
        if let Err(e) = core.report_pg_usage(pg).await {
            tracing::warn!(pg = core.pg_display_name(pg), code = e.code(), error = %e, "could not report the PG's usage");
        }
    }
}

/// The PG's window. It is the PG's, in its log, so that every leader (and
/// apply, which caps the horizon by it) goes by the same one: a PG that
/// never set one takes this node's default once, unless a window set in
/// the meantime (`pg set-window` right after the PG was made) came first.
async fn pg_window(core: &Arc<NodeCore>, group: &ProtectionGroup) -> NodeResult<u64> {
    if let Some(w) = gc::window(&core.db, group.pg())? {
        return Ok(w);
    }
    let window_ms = core.config.history.window_ms;
    group
        .propose(pb::command::Kind::SetWindow(pb::SetWindow {
            window_ms,
            only_if_unset: true,
        }))
        .await?;
    // Applied at the leader (where GC runs) before the proposal returns:
    // the window that stands.
    Ok(gc::window(&core.db, group.pg())?.unwrap_or(window_ms))
}

async fn collect(core: &Arc<NodeCore>, group: &ProtectionGroup) -> NodeResult<()> {
    let pg = group.pg();
    let config = &core.config.history;
    let window_ms = pg_window(core, group).await?;
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
    // A census is due when there is none, or when the PG has had entries
    // since the last one and it is older than the interval, or it counted
    // nothing and the PG now holds data. A pass reads every version the PG
    // keeps, values included: passes that followed a write load (one per
    // eighth of drift) cost 10–25% of 4 KiB write IOPS, so the census
    // otherwise waits for its interval.
    let usage = usage::usage(&core.db, pg)?;
    let mut new_pass = usage.census.is_none_or(|c| {
        group.metrics().applied_index > c.index
            && (core.now_ms() >= c.at_ms + config.census_interval_ms
                || (c.total() == 0 && usage.stored_bytes > 0))
    });
    while new_pass || gc::cursor(&core.db, pg)? != Cursor::Done {
        if !group.leadership().is_leader {
            return Ok(());
        }
        let (_, applied) = group
            .propose(pb::command::Kind::CollectGarbage(pb::CollectGarbage {
                max_rows: config.gc_step_rows,
                new_pass: std::mem::take(&mut new_pass),
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

/// Raises `space_short` (and `space_recovered`) on each change, and under
/// the shrink-windows policy halves the windows of the PGs led here.
async fn check_space(core: &Arc<NodeCore>) -> NodeResult<()> {
    use lifeboat_replication::ack::EventSink;
    let config = &core.config.history;
    let mut free = lifeboat_store::db::free_bytes(core.db.path())?;
    let threshold = core
        .config
        .store
        .reserve_bytes
        .saturating_add(config.space_short_bytes);
    // Log segments kept for reuse go before anything else does.
    if free <= threshold {
        if core.release_log_segment_pool("disk space short") > 0 {
            free = lifeboat_store::db::free_bytes(core.db.path())?;
        }
    } else {
        core.resume_log_segment_pool();
    }
    let short = free <= threshold;
    let was_short = core
        .space_short
        .swap(short, std::sync::atomic::Ordering::SeqCst);
    let policy = match config.when_space_short {
        SpaceShortPolicy::RefuseWrites => {
            "refuse-writes: windows are kept, writes stop at the reserve"
        }
        SpaceShortPolicy::ShrinkWindows => "shrink-windows: windows are halved",
    };
    if short && !was_short {
        core.events.event(
            PgId::CATALOG,
            "space_short",
            format!(
                "{} MiB free, at or below {} MiB; history.when_space_short = {policy}",
                free >> 20,
                threshold >> 20
            ),
        );
    } else if !short && was_short {
        core.events.event(
            PgId::CATALOG,
            "space_recovered",
            format!("{} MiB free, above {} MiB", free >> 20, threshold >> 20),
        );
    }
    if !short || config.when_space_short != SpaceShortPolicy::ShrinkWindows {
        return Ok(());
    }
    {
        let mut last = core.last_window_shrink.lock().expect("shrink lock");
        if last.is_some_and(|at| at.elapsed() < SHRINK_AGAIN_AFTER) {
            return Ok(());
        }
        *last = Some(std::time::Instant::now());
    }
    for group in core.groups() {
        let pg = group.pg();
        if pg == PgId::CATALOG || !group.leadership().is_leader {
            continue;
        }
        let window_ms = pg_window(core, &group).await?;
        let shrunk = (window_ms / 2).max(config.window_min_ms);
        if shrunk >= window_ms {
            continue;
        }
        group
            .propose(pb::command::Kind::SetWindow(pb::SetWindow {
                window_ms: shrunk,
                only_if_unset: false,
            }))
            .await?;
        core.events.event(
            pg,
            "window_shrunk",
            format!(
                "{}: protection window {} s -> {} s because free space is short (history.when_space_short = shrink-windows)",
                core.pg_display_name(pg),
                window_ms / 1000,
                shrunk / 1000
            ),
        );
    }
    Ok(())
}
