//! Site leases (DESIGN.md "Site leases and the witness"): the fence that a
//! Raft term is not. The catalog grants a node a lease for its site's PGs
//! at their generations; a PG leader proposes, and acknowledges, only while
//! its node's lease covers (PG, generation). A site cut off from the catalog
//! quorum stops acknowledging when its lease runs out, and a forced failover
//! waits that long after it stopped granting the old site before the new
//! site serves.
//!
//! Time: a lease runs on the holder's monotonic clock from *before* it sent
//! its request, so however long the request and the answer took, the holder
//! believes it for no longer than the catalog granted it. Clock rates may
//! differ between nodes by up to [`MAX_CLOCK_DRIFT`]; whoever waits a lease
//! out on another node's behalf waits [`LeaseTable::wait_out`] of it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use lifeboat_store::{Generation, PgId};
use tokio::sync::{Notify, watch};

/// The largest difference in clock rate between two nodes the lease
/// arithmetic allows for (1%: far above what NTP-disciplined or even free
/// running server clocks show).
pub const MAX_CLOCK_DRIFT: f64 = 0.01;

/// What the catalog granted this node.
#[derive(Clone, Debug, Default)]
struct Granted {
    /// When the lease ends on this node's monotonic clock (None: never had
    /// one).
    until: Option<Instant>,
    pgs: HashMap<PgId, Generation>,
}

/// This node's lease, shared by every PG member on it. The node's lease
/// task fills it; PG leaders read it before they propose and before they
/// acknowledge.
pub struct LeaseTable {
    granted: RwLock<Granted>,
    /// Bumped on every grant or failed attempt, so that waiters look again.
    updates: watch::Sender<u64>,
    /// A leader found no lease for its PG: the lease task asks at once
    /// instead of at its next renewal.
    wanted: Notify,
    enforced: bool,
}

impl LeaseTable {
    /// A table that starts empty: no PG is covered until a grant arrives.
    pub fn enforced() -> LeaseTable {
        LeaseTable::new(true)
    }

    /// A table that covers every PG: for groups run without a catalog to
    /// grant leases (this crate's own tests of Raft groups).
    pub fn unenforced() -> LeaseTable {
        LeaseTable::new(false)
    }

    fn new(enforced: bool) -> LeaseTable {
        LeaseTable {
            granted: RwLock::new(Granted::default()),
            updates: watch::channel(0).0,
            wanted: Notify::new(),
            enforced,
        }
    }

    /// Whether this node may lead `pg` at `generation` at `now`. The
    /// catalog (PG 0) is the authority leases come from and needs none.
    pub fn covers(&self, pg: PgId, generation: Generation, now: Instant) -> bool {
        if !self.enforced || pg == PgId::CATALOG {
            return true;
        }
        let g = self.granted.read().expect("lease lock");
        g.until.is_some_and(|until| now < until) && g.pgs.get(&pg) == Some(&generation)
    }

    /// Records a grant asked for at `asked_at`: valid for `duration` from
    /// then, for exactly `pgs` (a PG left out is no longer covered).
    pub fn grant(&self, asked_at: Instant, duration: Duration, pgs: HashMap<PgId, Generation>) {
        {
            let mut g = self.granted.write().expect("lease lock");
            // A late answer to an older request must not shorten a newer
            // grant's life, nor bring back PGs it dropped.
            let until = asked_at + duration;
            if g.until.is_some_and(|u| u > until) {
                return;
            }
            *g = Granted {
                until: Some(until),
                pgs,
            };
        }
        self.updates.send_modify(|n| *n += 1);
    }

    /// Tells waiters that an attempt to renew failed (they stop waiting
    /// once their own deadline passes, not before).
    pub fn attempt_failed(&self) {
        self.updates.send_modify(|n| *n += 1);
    }

    /// How long the lease has left at `now` (zero when expired or never
    /// granted).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.granted
            .read()
            .expect("lease lock")
            .until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }

    /// Whether this node had a lease and it has run out at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.granted
            .read()
            .expect("lease lock")
            .until
            .is_some_and(|u| now >= u)
    }

    /// The PGs the current grant names, with their generations.
    pub fn pgs(&self) -> HashMap<PgId, Generation> {
        self.granted.read().expect("lease lock").pgs.clone()
    }

    /// Resolves when a leader wants a lease now.
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// Waits until the lease covers (pg, generation), asking the lease task
    /// for a renewal, for at most `timeout`. Returns whether it does.
    pub async fn wait_covered(&self, pg: PgId, generation: Generation, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut updates = self.updates.subscribe();
        loop {
            if self.covers(pg, generation, Instant::now()) {
                return true;
            }
            self.wanted.notify_one();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if tokio::time::timeout(left, updates.changed()).await.is_err() {
                return self.covers(pg, generation, Instant::now());
            }
        }
    }

    /// How long to wait, after the catalog stopped granting a PG to a site,
    /// until no lease of that site can still cover it: `duration` stretched
    /// by the clock drift allowed, plus one millisecond of rounding.
    pub fn wait_out(duration: Duration) -> Duration {
        duration.mul_f64(1.0 + MAX_CLOCK_DRIFT) + Duration::from_millis(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_covers_the_pgs_granted_at_their_generation_until_it_runs_out() {
        let t = LeaseTable::enforced();
        let (pg, g1) = (PgId(7), Generation(1));
        let t0 = Instant::now();
        assert!(!t.covers(pg, g1, t0), "nothing before a grant");
        assert!(
            t.covers(PgId::CATALOG, g1, t0),
            "the catalog needs no lease"
        );
        t.grant(t0, Duration::from_secs(2), HashMap::from([(pg, g1)]));
        assert!(t.covers(pg, g1, t0 + Duration::from_millis(1999)));
        assert!(!t.covers(pg, g1, t0 + Duration::from_secs(2)), "expired");
        assert!(!t.covers(pg, Generation(2), t0), "another generation");
        assert!(!t.covers(PgId(8), g1, t0), "another PG");
        assert_eq!(
            t.remaining(t0 + Duration::from_millis(500)),
            Duration::from_millis(1500)
        );
        // A late answer to an older request changes nothing.
        t.grant(
            t0 - Duration::from_secs(1),
            Duration::from_secs(2),
            HashMap::new(),
        );
        assert!(t.covers(pg, g1, t0 + Duration::from_millis(1500)));
        // A newer grant without the PG drops it at once.
        t.grant(
            t0 + Duration::from_millis(10),
            Duration::from_secs(2),
            HashMap::new(),
        );
        assert!(!t.covers(pg, g1, t0 + Duration::from_millis(20)));
        assert!(LeaseTable::unenforced().covers(pg, g1, t0));
    }

    #[tokio::test]
    async fn a_waiter_asks_for_a_lease_and_returns_when_it_comes_or_its_time_is_up() {
        let t = std::sync::Arc::new(LeaseTable::enforced());
        let (pg, g) = (PgId(3), Generation(0));
        assert!(
            !t.wait_covered(pg, g, Duration::from_millis(30)).await,
            "no grant: false after the timeout"
        );
        let granter = {
            let t = t.clone();
            tokio::spawn(async move {
                t.wanted().await;
                t.grant(
                    Instant::now(),
                    Duration::from_secs(5),
                    HashMap::from([(pg, g)]),
                );
            })
        };
        assert!(t.wait_covered(pg, g, Duration::from_secs(5)).await);
        granter.await.unwrap();
        assert_eq!(
            LeaseTable::wait_out(Duration::from_secs(10)),
            Duration::from_millis(10_101)
        );
    }
}
