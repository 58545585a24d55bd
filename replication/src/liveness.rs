//! Liveness of protection groups, one message per node pair.
//!
//! openraft keeps each group alive on its own: every member's ticker wakes
//! about five times per heartbeat interval, and every leader sends each
//! follower an empty AppendEntries every interval. With hundreds of PGs per
//! node that was most of the CPU of an idle cluster (BENCHMARKS.md, "Many
//! protection groups per node"). Groups started with
//! [`Heartbeats::PerNode`] run with openraft's ticker off, and this module
//! does its jobs for all of them at once:
//!
//! - **Beats.** Every heartbeat interval a node sends each peer node one
//!   `Beat` naming every PG it leads that has a member there (PG,
//!   generation, term, leader member). Entries and commit indexes still
//!   travel on openraft's replication streams the moment they exist; only
//!   the empty heartbeats are gone. A receiver whose member does not know
//!   that leader yet (it restarted) says so, and the leader then sends that
//!   group one Raft heartbeat.
//! - **Elections.** A voter whose leader has not been named in a beat for a
//!   randomised election timeout, or that knows no leader for that long,
//!   campaigns (pre-vote first).
//! - **Leases.** openraft refuses a pre-vote while a leader's lease lives,
//!   and that lease is renewed by the heartbeats quiet groups no longer
//!   get. So the transport refuses a pre-vote itself while the member here
//!   heard a beat from its leader within the minimum election timeout, or,
//!   if it leads, while a quorum of the group's voters' nodes answered its
//!   beats within that time. Without it, a follower cut off from its
//!   leader alone would win elections against a live leader.
//!
//! Raft's safety does not rest on any of this (votes and terms do); only
//! liveness and the absence of needless elections do.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_proto::raft as pb;
use lifeboat_store::PgId;
use rand::Rng;
use tonic::Request;

use crate::group::{Heartbeats, Leadership, ProtectionGroup, RaftTimers};
use crate::transport::{Identity, Peers};

/// The node's liveness state for its [`Heartbeats::PerNode`] groups.
pub struct Liveness {
    timers: RaftTimers,
    state: Mutex<State>,
    /// Peers (by address) with a beat in flight: a slow or cut-off peer
    /// gets no second one, and never holds up the beats to the others.
    in_flight: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct State {
    /// The newest beat that named each PG.
    heard: HashMap<PgId, Heard>,
    /// When each peer node (by id) last answered one of this node's beats.
    answered: HashMap<u64, Instant>,
    /// The election timer of each group in which this node holds a voter
    /// that does not lead.
    timers: HashMap<PgId, ElectionTimer>,
}

#[derive(Clone, Copy, Debug)]
struct Heard {
    generation: u64,
    term: u64,
    at: Instant,
}

#[derive(Clone, Copy, Debug)]
struct ElectionTimer {
    /// The leader and term the timer runs for; a new one restarts it, so
    /// that a leader just elected has a whole timeout to send its beats.
    leader: Option<u64>,
    term: u64,
    /// The member's log and commit progress when last seen.
    progress: (u64, u64),
    /// When the leader was last confirmed alive (or the timer started).
    since: Instant,
    /// This round's randomised election timeout.
    timeout: Duration,
}

impl State {
    fn hear(&mut self, pg: PgId, generation: u64, term: u64, at: Instant) {
        let keep_older = self
            .heard
            .get(&pg)
            .is_some_and(|h| h.generation == generation && h.term > term);
        if !keep_older {
            self.heard.insert(
                pg,
                Heard {
                    generation,
                    term,
                    at,
                },
            );
        }
    }

    /// When a leader at least as new as the one this member knows was
    /// last named in a beat for `pg`.
    fn leader_heard_at(&self, pg: PgId, generation: u64, term: u64) -> Option<Instant> {
        self.heard
            .get(&pg)
            .filter(|h| h.generation == generation && h.term >= term)
            .map(|h| h.at)
    }

    /// Advances the election timer of one group; true when it has run out
    /// (the timer then restarts with a fresh timeout).
    fn election_due(
        &mut self,
        pg: PgId,
        generation: u64,
        leadership: &Leadership,
        now: Instant,
        roll: &mut dyn FnMut() -> Duration,
    ) -> bool {
        if !leadership.voter || leadership.is_leader {
            self.timers.remove(&pg);
            return false;
        }
        let heard = self.leader_heard_at(pg, generation, leadership.term);
        let fresh = |roll: &mut dyn FnMut() -> Duration| ElectionTimer {
            leader: leadership.leader,
            term: leadership.term,
            progress: leadership.progress,
            since: now,
            timeout: roll(),
        };
        let timer = self.timers.entry(pg).or_insert_with(|| fresh(roll));
        if (timer.leader, timer.term) != (leadership.leader, leadership.term) {
            *timer = fresh(roll);
        }
        // Entries or a commit index arriving prove the leader alive as
        // well as a beat does (and beats may queue behind them under load).
        if timer.progress != leadership.progress {
            timer.progress = leadership.progress;
            timer.since = now;
        }
        if let Some(at) = heard {
            timer.since = timer.since.max(at);
        }
        if now.saturating_duration_since(timer.since) < timer.timeout {
            return false;
        }
        timer.since = now;
        timer.timeout = roll();
        true
    }

    /// Forgets groups this node no longer hosts.
    fn retain(&mut self, hosted: &HashSet<PgId>) {
        self.heard.retain(|pg, _| hosted.contains(pg));
        self.timers.retain(|pg, _| hosted.contains(pg));
    }
}

/// Whether a quorum of `voter_nodes` (this node counting as answered)
/// answered a beat within `lease` before `now`.
fn quorum_answered(
    answered: &HashMap<u64, Instant>,
    me: u64,
    voter_nodes: &[u64],
    lease: Duration,
    now: Instant,
) -> bool {
    let live = voter_nodes
        .iter()
        .filter(|&&n| {
            n == me
                || answered
                    .get(&n)
                    .is_some_and(|at| now.saturating_duration_since(*at) < lease)
        })
        .count();
    live * 2 > voter_nodes.len()
}

impl Liveness {
    pub fn new(timers: RaftTimers) -> Arc<Liveness> {
        Arc::new(Liveness {
            timers,
            state: Mutex::new(State::default()),
            in_flight: Mutex::new(HashSet::new()),
        })
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.timers.heartbeat_interval_ms)
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.timers.election_timeout_min_ms)
    }

    fn roll_timeout(&self) -> Duration {
        let ms = rand::thread_rng()
            .gen_range(self.timers.election_timeout_min_ms..self.timers.election_timeout_max_ms);
        Duration::from_millis(ms)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("liveness lock")
    }

    /// The receiving side of a beat: records it, and names the groups
    /// whose member here does not know the sender as leader yet.
    /// `group` looks up this node's member of a PG.
    pub fn receive(
        &self,
        req: &pb::BeatRequest,
        group: impl Fn(PgId) -> Option<ProtectionGroup>,
        now: Instant,
    ) -> pb::BeatReply {
        let mut unrecognized = Vec::new();
        for lead in &req.leads {
            let pg = PgId(lead.pg);
            let Some(g) = group(pg).filter(|g| {
                g.generation().0 == lead.generation && g.heartbeats() == Heartbeats::PerNode
            }) else {
                continue;
            };
            self.state().hear(pg, lead.generation, lead.term, now);
            let here = g.leadership();
            if here.leader != Some(lead.leader_member) && here.term <= lead.term {
                unrecognized.push(pg.0);
            }
        }
        pb::BeatReply { unrecognized }
    }

    /// Whether the member of `group` on this node must refuse a pre-vote
    /// now, because its leader is evidently alive (see the module docs).
    pub fn refuses_pre_vote(&self, group: &ProtectionGroup, me: u64, now: Instant) -> bool {
        if group.heartbeats() != Heartbeats::PerNode {
            return false;
        }
        let here = group.leadership();
        let lease = self.lease();
        let state = self.state();
        if here.is_leader {
            quorum_answered(&state.answered, me, &group.voter_nodes(), lease, now)
        } else {
            state
                .leader_heard_at(group.pg(), group.generation().0, here.term)
                .is_some_and(|at| now.saturating_duration_since(at) < lease)
        }
    }

    /// One round: beats to every peer for the groups this node leads (sent
    /// in the background), then the election timers of the groups it
    /// follows. Call it every [`Liveness::interval`].
    pub async fn round(
        self: &Arc<Self>,
        groups: &[ProtectionGroup],
        peers: &Arc<Peers>,
        identity: &Arc<Identity>,
    ) {
        let groups: Vec<&ProtectionGroup> = groups
            .iter()
            .filter(|g| g.heartbeats() == Heartbeats::PerNode)
            .collect();
        self.send_beats(&groups, peers, identity);
        self.campaign_where_leader_silent(&groups, Instant::now())
            .await;
    }

    fn send_beats(
        self: &Arc<Self>,
        groups: &[&ProtectionGroup],
        peers: &Arc<Peers>,
        identity: &Arc<Identity>,
    ) {
        let Some(cluster_id) = identity.cluster_id() else {
            return;
        };
        let me = identity.node_id().0;
        // Peer address → (peer node id, the beat for it).
        let mut beats: HashMap<String, (u64, Vec<pb::LeaderBeat>)> = HashMap::new();
        let mut led: HashMap<u64, ProtectionGroup> = HashMap::new();
        for g in groups {
            let Some((term, nodes)) = g.led_nodes() else {
                continue;
            };
            led.insert(g.pg().0, (*g).clone());
            for node in nodes {
                if node.node_id == me {
                    continue;
                }
                beats
                    .entry(node.raft_addr.clone())
                    .or_insert_with(|| (node.node_id, Vec::new()))
                    .1
                    .push(pb::LeaderBeat {
                        pg: g.pg().0,
                        generation: g.generation().0,
                        term,
                        leader_member: g.member_id().0,
                    });
            }
        }
        let led = Arc::new(led);
        for (addr, (node, leads)) in beats {
            if !self
                .in_flight
                .lock()
                .expect("liveness lock")
                .insert(addr.clone())
            {
                continue;
            }
            let mut req = Request::new(pb::BeatRequest {
                cluster_id: cluster_id.clone(),
                from_node: me,
                leads,
            });
            // A beat is worth delivering until a follower would give up on
            // its leader.
            req.set_timeout(self.lease());
            let (liveness, peers, led) = (self.clone(), peers.clone(), led.clone());
            let deadline = self.lease();
            tokio::spawn(async move {
                // Bounded: a beat stuck on a black-holed link would stay
                // in flight, and no later beat would go to that node.
                let call = async { peers.client(&addr)?.beat(req).await };
                let reply = peers.within(&addr, deadline, call).await;
                liveness
                    .in_flight
                    .lock()
                    .expect("liveness lock")
                    .remove(&addr);
                match reply {
                    Ok(reply) => {
                        liveness.state().answered.insert(node, Instant::now());
                        for pg in reply.into_inner().unrecognized {
                            if let Some(g) = led.get(&pg) {
                                g.heartbeat().await;
                            }
                        }
                    }
                    Err(status) => {
                        tracing::debug!(node, code = ?status.code(), error = status.message(), "beat")
                    }
                }
            });
        }
    }

    async fn campaign_where_leader_silent(&self, groups: &[&ProtectionGroup], now: Instant) {
        let due: Vec<&ProtectionGroup> = {
            let mut state = self.state();
            let hosted: HashSet<PgId> = groups.iter().map(|g| g.pg()).collect();
            state.retain(&hosted);
            let mut roll = || self.roll_timeout();
            groups
                .iter()
                .copied()
                .filter(|g| {
                    state.election_due(g.pg(), g.generation().0, &g.leadership(), now, &mut roll)
                })
                .collect()
        };
        for g in due {
            let l = g.leadership();
            tracing::info!(
                pg = g.pg().0,
                term = l.term,
                leader = ?l.leader,
                "no beat from the leader within the election timeout: campaigning"
            );
            g.campaign().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG: PgId = PgId(9);

    fn follower(term: u64) -> Leadership {
        Leadership {
            leader: Some(1),
            term,
            is_leader: false,
            voter: true,
            progress: (0, 0),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_follower_campaigns_only_after_its_leader_falls_silent() {
        let t0 = Instant::now();
        let mut state = State::default();
        let mut roll = || ms(2000);
        let l = follower(5);
        // The timer starts on first sight: no campaign at once.
        assert!(!state.election_due(PG, 0, &l, t0, &mut roll));
        // Beats keep it from running out.
        for step in 1..=10u64 {
            let at = t0 + ms(500 * step);
            state.hear(PG, 0, 5, at);
            assert!(!state.election_due(PG, 0, &l, at, &mut roll), "step {step}");
        }
        // Silence: nothing before the timeout, a campaign after it.
        let last = t0 + ms(5000);
        assert!(!state.election_due(PG, 0, &l, last + ms(1999), &mut roll));
        assert!(state.election_due(PG, 0, &l, last + ms(2000), &mut roll));
        // The timer restarted: the next campaign is a timeout later.
        assert!(!state.election_due(PG, 0, &l, last + ms(3000), &mut roll));
        assert!(state.election_due(PG, 0, &l, last + ms(4000), &mut roll));
        // A new leader (elected elsewhere) gets a whole timeout to beat,
        // however long the old one has been silent.
        let newer = Leadership {
            leader: Some(2),
            ..follower(6)
        };
        assert!(!state.election_due(PG, 0, &newer, last + ms(5000), &mut roll));
        assert!(!state.election_due(PG, 0, &newer, last + ms(6999), &mut roll));
        assert!(state.election_due(PG, 0, &newer, last + ms(7000), &mut roll));
    }

    #[test]
    fn entries_from_the_leader_count_as_a_beat() {
        let t0 = Instant::now();
        let mut state = State::default();
        let mut roll = || ms(1000);
        let mut l = follower(3);
        assert!(!state.election_due(PG, 0, &l, t0, &mut roll));
        // No beats arrive (queued behind replication), but the log grows.
        for step in 1..=5u64 {
            l.progress = (10 * step, 10 * step - 1);
            assert!(!state.election_due(PG, 0, &l, t0 + ms(800 * step), &mut roll));
        }
        // Then nothing moves: a timeout later, a campaign.
        assert!(!state.election_due(PG, 0, &l, t0 + ms(4999), &mut roll));
        assert!(state.election_due(PG, 0, &l, t0 + ms(5000), &mut roll));
    }

    #[test]
    fn beats_of_an_older_leader_or_generation_do_not_count() {
        let t0 = Instant::now();
        let mut state = State::default();
        let mut roll = || ms(1000);
        let l = follower(7);
        assert!(!state.election_due(PG, 2, &l, t0, &mut roll));
        // A deposed leader (term 6) and a message of generation 1 keep beating.
        for step in 1..=4u64 {
            let at = t0 + ms(300 * step);
            state.hear(PG, 2, 6, at);
            state.hear(PgId(10), 2, 7, at);
            state.heard.insert(
                PgId(11),
                Heard {
                    generation: 1,
                    term: 9,
                    at,
                },
            );
        }
        assert!(state.election_due(PG, 2, &l, t0 + ms(1200), &mut roll));
        // A newer term than this member knows counts: a leader exists and
        // will make itself known.
        state.hear(PG, 2, 8, t0 + ms(1300));
        assert!(!state.election_due(PG, 2, &l, t0 + ms(2299), &mut roll));
        // An older beat arriving later does not displace the newer one.
        state.hear(PG, 2, 6, t0 + ms(1400));
        assert_eq!(state.leader_heard_at(PG, 2, 7), Some(t0 + ms(1300)));
    }

    #[test]
    fn leaders_and_learners_have_no_election_timer() {
        let t0 = Instant::now();
        let mut state = State::default();
        let mut roll = || ms(100);
        let leader = Leadership {
            leader: Some(3),
            term: 2,
            is_leader: true,
            voter: true,
            progress: (0, 0),
        };
        let learner = Leadership {
            leader: None,
            term: 2,
            is_leader: false,
            voter: false,
            progress: (0, 0),
        };
        for at in [t0, t0 + ms(1000), t0 + ms(5000)] {
            assert!(!state.election_due(PG, 0, &leader, at, &mut roll));
            assert!(!state.election_due(PgId(10), 0, &learner, at, &mut roll));
        }
        assert!(state.timers.is_empty());
        // Without a known leader a voter still campaigns after a timeout.
        let orphan = Leadership {
            leader: None,
            term: 2,
            is_leader: false,
            voter: true,
            progress: (0, 0),
        };
        assert!(!state.election_due(PG, 0, &orphan, t0, &mut roll));
        assert!(state.election_due(PG, 0, &orphan, t0 + ms(100), &mut roll));
        state.retain(&HashSet::new());
        assert!(state.timers.is_empty() && state.heard.is_empty());
    }

    #[test]
    fn a_leader_keeps_its_lease_while_a_quorum_of_nodes_answers() {
        let t0 = Instant::now();
        let lease = ms(2000);
        let mut answered = HashMap::new();
        // Alone among three, this node (1) is no quorum.
        assert!(!quorum_answered(&answered, 1, &[1, 2, 3], lease, t0));
        answered.insert(2, t0);
        assert!(quorum_answered(
            &answered,
            1,
            &[1, 2, 3],
            lease,
            t0 + ms(1999)
        ));
        assert!(!quorum_answered(
            &answered,
            1,
            &[1, 2, 3],
            lease,
            t0 + ms(2000)
        ));
        // Four voters need three.
        assert!(!quorum_answered(&answered, 1, &[1, 2, 3, 4], lease, t0));
        answered.insert(4, t0);
        assert!(quorum_answered(&answered, 1, &[1, 2, 3, 4], lease, t0));
    }
}
