//! Conversions between openraft's types and the prost wire/disk format.
//!
//! An entry is a `lifeboat.raft.Entry`: its log id as (term, leader node,
//! index), then a blank, a membership (serde JSON: small and rare) or a
//! command (prost). The orphan rule keeps these conversions out of `proto`.

use std::io;

use lifeboat_proto::raft as pb;
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::vote::RaftLeaderIdExt;
use prost::Message;

use crate::types::{Command, TypeConfig};

pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;

fn invalid(reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_string())
}

pub fn encode_entry(entry: &Entry) -> io::Result<Vec<u8>> {
    encode_entry_after(entry, 0)
}

/// The entry's encoding after `reserved` zero bytes, which the caller
/// fills with a header of its own: one buffer, and a large entry (a
/// block write, an object chunk) is not copied again to prepend one.
pub fn encode_entry_after(entry: &Entry, reserved: usize) -> io::Result<Vec<u8>> {
    let log_id = entry.log_id();
    let payload = match &entry.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(cmd) => pb::entry::Payload::Command(cmd.0.clone()),
        EntryPayload::Membership(m) => {
            pb::entry::Payload::MembershipJson(serde_json::to_vec(m).map_err(invalid)?.into())
        }
    };
    let msg = pb::Entry {
        term: log_id.leader_id.term,
        leader_node: log_id.leader_id.node_id,
        index: log_id.index,
        payload: Some(payload),
    };
    let mut out = Vec::with_capacity(reserved + msg.encoded_len());
    out.resize(reserved, 0);
    msg.encode(&mut out).map_err(invalid)?;
    Ok(out)
}

pub fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    let msg = pb::Entry::decode(bytes).map_err(invalid)?;
    let log_id = make_log_id(msg.term, msg.leader_node, msg.index);
    let payload = match msg.payload {
        Some(pb::entry::Payload::Blank(_)) => EntryPayload::Blank,
        Some(pb::entry::Payload::Command(cmd)) => EntryPayload::Normal(Command(cmd)),
        Some(pb::entry::Payload::MembershipJson(json)) => {
            EntryPayload::Membership(serde_json::from_slice(&json).map_err(invalid)?)
        }
        None => return Err(invalid("log entry without payload")),
    };
    Ok(Entry { log_id, payload })
}

pub fn make_log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(
        <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(term, node),
        index,
    )
}

/// Small openraft records (vote, log ids, membership) are JSON: rare writes,
/// easy to read in a debugger, and never on the data path.
pub fn encode_json<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(invalid)
}

pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::Membership;
    use std::collections::BTreeSet;

    #[test]
    fn entries_round_trip() {
        let cmd = Command(pb::Command {
            stamp_ms: 7,
            kind: Some(pb::command::Kind::WriteBlocks(pb::WriteBlocks {
                volume: 3,
                blocks: vec![pb::BlockWrite {
                    block: 9,
                    frame: vec![1, 2, 3].into(),
                    expect_latest: Some(4),
                }],
                newest_mask: None,
            })),
        });
        let entries = [
            Entry::new_blank(make_log_id(1, 2, 3)),
            Entry {
                log_id: make_log_id(4, 5, 6),
                payload: EntryPayload::Normal(cmd),
            },
            Entry {
                log_id: make_log_id(7, 8, 9),
                payload: EntryPayload::Membership(Membership::new_with_defaults(
                    vec![BTreeSet::from([1, 2])],
                    [],
                )),
            },
        ];
        for e in entries {
            let bytes = encode_entry(&e).unwrap();
            assert_eq!(decode_entry(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_entry(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_entry(&[]).is_err());
    }
}
