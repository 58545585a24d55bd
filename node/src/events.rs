//! Events this node reports to operators (an ack policy degraded or back,
//! …): logged at WARN under the `lifeboat::event` target and kept in memory
//! for `lifeboat events` (the newest [`EVENTS_KEPT`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use lifeboat_replication::ack::EventSink;
use lifeboat_store::PgId;

/// Events kept for `lifeboat events`; older ones remain in the log.
pub const EVENTS_KEPT: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub time_ms: u64,
    pub kind: &'static str,
    pub pg: PgId,
    pub message: String,
}

pub struct EventLog {
    events: Mutex<VecDeque<Event>>,
    now_ms: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl EventLog {
    pub fn new(now_ms: impl Fn() -> u64 + Send + Sync + 'static) -> EventLog {
        EventLog {
            events: Mutex::new(VecDeque::new()),
            now_ms: Box::new(now_ms),
        }
    }

    /// Every kept event, oldest first.
    pub fn list(&self) -> Vec<Event> {
        self.events
            .lock()
            .expect("events lock")
            .iter()
            .cloned()
            .collect()
    }
}

impl EventSink for EventLog {
    fn event(&self, pg: PgId, kind: &'static str, message: String) {
        tracing::warn!(target: "lifeboat::event", pg = pg.0, kind, "{message}");
        let mut events = self.events.lock().expect("events lock");
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            time_ms: (self.now_ms)(),
            kind,
            pg,
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_in_order() {
        let log = EventLog::new(|| 42);
        for i in 0..EVENTS_KEPT as u64 + 5 {
            log.event(PgId(i), "test", format!("event {i}"));
        }
        let events = log.list();
        assert_eq!(events.len(), EVENTS_KEPT);
        assert_eq!(events[0].pg, PgId(5));
        assert_eq!(
            events.last().unwrap().message,
            format!("event {}", EVENTS_KEPT + 4)
        );
        assert_eq!(events[0].time_ms, 42);
    }
}
