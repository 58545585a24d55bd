//! Ack policies (DESIGN.md "Write path"): `local` acknowledges a write once
//! a quorum of the active site has it durably; `remote` also waits until a
//! node of a standby site has it durably. A `remote` PG whose standby site
//! does not confirm within `remote_timeout_ms` degrades to `local` (an event
//! and a metric) so that the primary keeps serving through a cut WAN, and
//! returns to `remote` once a standby has caught up.
//!
//! The state lives with the PG's member on each node and matters only where
//! the member leads: a new leader starts undegraded and finds out for itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use lifeboat_proto::raft as pb;
use lifeboat_store::PgId;

/// Where a group reports what operators must hear about (a degraded ack
/// policy, its return).
pub trait EventSink: Send + Sync + 'static {
    fn event(&self, pg: PgId, kind: &'static str, message: String);
}

/// Events go to the log only.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogEvents;

impl EventSink for LogEvents {
    fn event(&self, pg: PgId, kind: &'static str, message: String) {
        tracing::warn!(pg = pg.0, kind, "{message}");
    }
}

/// A PG's ack policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckPolicy {
    Local,
    Remote,
}

impl AckPolicy {
    pub fn from_pb(ack: i32) -> AckPolicy {
        match pb::AckPolicy::try_from(ack) {
            Ok(pb::AckPolicy::AckRemote) => AckPolicy::Remote,
            _ => AckPolicy::Local,
        }
    }

    pub fn to_pb(self) -> pb::AckPolicy {
        match self {
            AckPolicy::Local => pb::AckPolicy::AckLocal,
            AckPolicy::Remote => pb::AckPolicy::AckRemote,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AckPolicy::Local => "local",
            AckPolicy::Remote => "remote",
        }
    }

    pub fn parse(s: &str) -> Option<AckPolicy> {
        match s {
            "local" => Some(AckPolicy::Local),
            "remote" => Some(AckPolicy::Remote),
            _ => None,
        }
    }
}

/// One member's view of its PG's ack policy. Cheap to clone.
#[derive(Clone)]
pub struct AckState {
    inner: Arc<AckInner>,
}

struct AckInner {
    /// 0 local, 1 remote.
    policy: AtomicU8,
    remote_timeout_ms: AtomicU64,
    degraded: AtomicBool,
    degradations: AtomicU64,
    /// The best standby's matched index when the PG degraded: a return
    /// needs a standby past it (it has really been heard from since).
    degraded_at: AtomicU64,
    events: Arc<dyn EventSink>,
}

/// What the ack state looks like now, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckStatus {
    pub policy: AckPolicy,
    /// `remote` degraded to `local`.
    pub degraded: bool,
    /// Times this member, as leader, degraded the PG.
    pub degradations: u64,
}

impl AckState {
    pub fn new(events: Arc<dyn EventSink>) -> AckState {
        AckState {
            inner: Arc::new(AckInner {
                policy: AtomicU8::new(0),
                remote_timeout_ms: AtomicU64::new(5000),
                degraded: AtomicBool::new(false),
                degradations: AtomicU64::new(0),
                degraded_at: AtomicU64::new(0),
                events,
            }),
        }
    }

    /// Follows the catalog. Setting `local` clears a degradation.
    pub fn set(&self, policy: AckPolicy, remote_timeout: Duration) {
        self.inner
            .remote_timeout_ms
            .store(remote_timeout.as_millis() as u64, Ordering::Relaxed);
        let v = u8::from(policy == AckPolicy::Remote);
        self.inner.policy.store(v, Ordering::Relaxed);
        if policy == AckPolicy::Local {
            self.inner.degraded.store(false, Ordering::Relaxed);
        }
    }

    pub fn status(&self) -> AckStatus {
        AckStatus {
            policy: if self.inner.policy.load(Ordering::Relaxed) == 1 {
                AckPolicy::Remote
            } else {
                AckPolicy::Local
            },
            degraded: self.inner.degraded.load(Ordering::Relaxed),
            degradations: self.inner.degradations.load(Ordering::Relaxed),
        }
    }

    /// Whether a write must wait for a standby site now.
    pub fn waits_for_remote(&self) -> bool {
        let s = self.status();
        s.policy == AckPolicy::Remote && !s.degraded
    }

    pub fn remote_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.remote_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// The best standby's matched index when the PG degraded.
    pub fn degraded_at(&self) -> u64 {
        self.inner.degraded_at.load(Ordering::Acquire)
    }

    /// Degrades `remote` to `local`, once: later callers find it done.
    /// `standby_matched` is the best standby's matched index now.
    pub fn degrade(&self, pg: PgId, standby_matched: u64, why: String) {
        self.inner
            .degraded_at
            .store(standby_matched, Ordering::Release);
        if self.inner.degraded.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.degradations.fetch_add(1, Ordering::Relaxed);
        self.inner.events.event(
            pg,
            "ack_degraded",
            format!("ack policy remote degraded to local: {why}"),
        );
    }

    /// Returns to `remote` after a degradation, once.
    pub fn restore(&self, pg: PgId, why: String) {
        if !self.inner.degraded.swap(false, Ordering::AcqRel) {
            return;
        }
        self.inner.events.event(
            pg,
            "ack_restored",
            format!("ack policy back to remote: {why}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(u64, &'static str)>>);

    impl EventSink for Recorded {
        fn event(&self, pg: PgId, kind: &'static str, _message: String) {
            self.0.lock().unwrap().push((pg.0, kind));
        }
    }

    #[test]
    fn degrades_and_restores_once_each_with_one_event() {
        let events = Arc::new(Recorded::default());
        let ack = AckState::new(events.clone());
        assert!(!ack.waits_for_remote(), "local by default");
        ack.set(AckPolicy::Remote, Duration::from_millis(70));
        assert!(ack.waits_for_remote());
        assert_eq!(ack.remote_timeout(), Duration::from_millis(70));
        ack.degrade(PgId(4), 7, "standby silent".into());
        ack.degrade(PgId(4), 7, "again".into());
        assert_eq!(ack.degraded_at(), 7);
        assert!(!ack.waits_for_remote());
        assert_eq!(ack.status().degradations, 1);
        ack.restore(PgId(4), "caught up".into());
        ack.restore(PgId(4), "again".into());
        assert!(ack.waits_for_remote());
        assert_eq!(
            *events.0.lock().unwrap(),
            vec![(4, "ack_degraded"), (4, "ack_restored")]
        );
        // Back to local clears a degradation silently.
        ack.degrade(PgId(4), 9, "x".into());
        ack.set(AckPolicy::Local, Duration::from_millis(70));
        assert!(!ack.status().degraded);
        assert_eq!(AckPolicy::parse("remote"), Some(AckPolicy::Remote));
        assert_eq!(
            AckPolicy::from_pb(AckPolicy::Remote.to_pb() as i32),
            AckPolicy::Remote
        );
        assert_eq!(AckPolicy::parse("quorum"), None);
    }
}
