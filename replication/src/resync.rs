//! Delta resync over the transport ([`lifeboat_store::resync`]): a node
//! that keeps an old copy of a PG offers what it holds to a current
//! member, which streams back the delta from one read view of its replica
//! and that view's applied log id and membership. The receiver then holds
//! exactly what a Raft snapshot at that log id would have installed, with
//! its log purged up to it, so the member it starts next is caught up by
//! the log from there.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use lifeboat_proto::raft as pb;
use lifeboat_store::db::{Batch, Cf, Db};
use lifeboat_store::keys::{self, RaftStateKind};
use lifeboat_store::resync::{self as delta, DeltaOp, DeltaWriter, Segment};
use lifeboat_store::{Generation, MemberId, PgId};
use prost::Message;
use tonic::{Request, Status};

use crate::transport::{GroupRoute, Identity, Peers};
use crate::types::TypeConfig;
use crate::wire::{self, LogId};

type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;

/// A delta chunk holds about this much row data.
const CHUNK_BYTES: u64 = 1 << 20;
/// Chunks in flight between the reading thread and the stream.
const CHUNKS_AHEAD: usize = 4;
/// How long the receiver waits for the call to start and for each chunk:
/// the sender hashes unchanged segments between chunks, about a second
/// per few hundred MiB.
const CHUNK_WAIT: Duration = Duration::from_secs(120);

/// The stream of a delta answering `segments`, read from one view of this
/// node's replica of `pg`.
pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<pb::ResyncChunk, Status>> + Send>>;

/// Decodes an offer's segments, refusing what no receiver would send.
pub fn segments(req: &pb::ResyncRequest) -> Result<Vec<Segment>, Status> {
    req.segments
        .iter()
        .map(|s| {
            let cf = delta::cf_from_wire(s.cf).ok_or_else(|| {
                Status::invalid_argument(format!("resync segment in column family {}", s.cf))
            })?;
            let digest = <[u8; 32]>::try_from(&s.digest[..]).map_err(|_| {
                Status::invalid_argument(format!(
                    "resync segment digest of {} bytes",
                    s.digest.len()
                ))
            })?;
            Ok(Segment {
                cf,
                first_key: s.first_key.to_vec(),
                last_key: s.last_key.to_vec(),
                digest,
            })
        })
        .collect()
}

/// Streams the delta for `segments` from one read view of `pg` here: rows
/// in chunks, then the view's applied log id and membership. Refused when
/// the replica has applied nothing.
pub fn serve(db: Db, pg: PgId, segments: Vec<Segment>) -> DeltaStream {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
    tokio::task::spawn_blocking(move || {
        let view = db.read_view();
        let state = |kind| view.get(Cf::RaftState, &keys::raft_state_key(pg, kind));
        let head = state(RaftStateKind::LastApplied)
            .and_then(|a| Ok((a, state(RaftStateKind::Membership)?)));
        let (applied, membership) = match head {
            Ok((Some(a), m)) => (a, m.unwrap_or_default()),
            Ok((None, _)) => {
                let _ = tx.blocking_send(Err(Status::failed_precondition(format!(
                    "protection group {pg} has applied nothing here yet"
                ))));
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                return;
            }
        };
        let mut chunk = pb::ResyncChunk::default();
        let mut chunk_bytes = 0u64;
        let sent = delta::delta(&view, pg, &segments, |op| {
            chunk_bytes += op.payload_bytes();
            chunk.ops.push(to_wire(op));
            if chunk_bytes >= CHUNK_BYTES {
                chunk_bytes = 0;
                tx.blocking_send(Ok(std::mem::take(&mut chunk)))
                    .map_err(|_| lifeboat_store::Error::Io {
                        op: "send a resync chunk",
                        path: db.path().to_owned(),
                        source: io::Error::new(io::ErrorKind::BrokenPipe, "the receiver left"),
                    })?;
            }
            Ok(())
        });
        let last = match sent {
            Ok(stats) => Ok(pb::ResyncChunk {
                done: true,
                applied_json: applied.into(),
                membership_json: membership.into(),
                segments: stats.segments,
                replaced: stats.replaced,
                ..chunk
            }),
            Err(e) => Err(Status::internal(format!(
                "protection group {pg}: resync: {e}"
            ))),
        };
        let _ = tx.blocking_send(last);
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn to_wire(op: DeltaOp) -> pb::ResyncOp {
    match op {
        DeltaOp::Replace { cf, from, to } => pb::ResyncOp {
            cf: delta::cf_to_wire(cf),
            kind: Some(pb::resync_op::Kind::Replace(pb::ResyncRange {
                from: from.map(Into::into),
                to: to.map(Into::into),
            })),
        },
        DeltaOp::Put { cf, key, value } => pb::ResyncOp {
            cf: delta::cf_to_wire(cf),
            kind: Some(pb::resync_op::Kind::Put(pb::ResyncRow {
                key: key.into(),
                value: value.into(),
            })),
        },
    }
}

fn from_wire(op: pb::ResyncOp) -> Result<DeltaOp, Status> {
    let cf = delta::cf_from_wire(op.cf)
        .ok_or_else(|| Status::data_loss(format!("resync row in column family {}", op.cf)))?;
    match op.kind {
        Some(pb::resync_op::Kind::Replace(r)) => Ok(DeltaOp::Replace {
            cf,
            from: r.from.map(|k| k.to_vec()),
            to: r.to.map(|k| k.to_vec()),
        }),
        Some(pb::resync_op::Kind::Put(row)) => Ok(DeltaOp::Put {
            cf,
            key: row.key.to_vec(),
            value: row.value.to_vec(),
        }),
        None => Err(Status::data_loss("resync step without a kind")),
    }
}

/// What a resync moved and where it left the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resynced {
    /// The sender's applied log id the replica now stands at.
    pub applied: LogId,
    /// What the receiver held before: rows and key+value bytes.
    pub held_rows: u64,
    pub held_bytes: u64,
    /// The offer's encoded size.
    pub offer_bytes: u64,
    pub segments: u64,
    pub replaced: u64,
    pub rows_received: u64,
    /// Key and value bytes of the rows received.
    pub bytes_received: u64,
}

/// Resyncs this node's kept copy of `pg` (see
/// [`lifeboat_store::resync::keep_as_base`]) from the member of
/// `generation` on the node at `raft_addr`. On success the PG's Raft
/// state here is a snapshot's at the sender's applied log id and the
/// resync marker is gone; on failure what was written stays, the marker
/// too, and the next attempt offers the replica as it then is.
pub async fn pull(
    peers: &Peers,
    identity: &Arc<Identity>,
    raft_addr: &str,
    pg: PgId,
    generation: Generation,
    db: Db,
) -> Result<Resynced, Status> {
    let internal = |e: lifeboat_store::Error| Status::internal(e.to_string());
    let joined = |e: tokio::task::JoinError| Status::internal(e.to_string());
    let offer = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || delta::offer(&db, pg))
            .await
            .map_err(joined)?
            .map_err(internal)?
    };
    let route = GroupRoute {
        identity: identity.clone(),
        pg,
        generation,
    };
    let req = pb::ResyncRequest {
        route: Some(route.to(MemberId(0))),
        segments: offer
            .segments
            .iter()
            .map(|s| pb::ResyncSegment {
                cf: delta::cf_to_wire(s.cf),
                first_key: s.first_key.clone().into(),
                last_key: s.last_key.clone().into(),
                digest: s.digest.to_vec().into(),
            })
            .collect(),
    };
    let offer_bytes = req.encoded_len() as u64;
    let (mut rows_received, mut bytes_received) = (0u64, 0u64);
    let call = async { peers.client(raft_addr)?.resync(Request::new(req)).await };
    let mut stream = peers
        .within(raft_addr, CHUNK_WAIT, call)
        .await?
        .into_inner();
    let mut writer = DeltaWriter::new(db, pg);
    loop {
        let next = peers.within(raft_addr, CHUNK_WAIT, stream.message());
        let chunk = next
            .await?
            .ok_or_else(|| Status::unavailable("the resync stream ended before its last chunk"))?;
        let ops = chunk
            .ops
            .into_iter()
            .map(from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        for op in &ops {
            rows_received += u64::from(matches!(op, DeltaOp::Put { .. }));
            bytes_received += op.payload_bytes();
        }
        writer = tokio::task::spawn_blocking(move || {
            for op in ops {
                writer.apply(op)?;
            }
            Ok::<_, lifeboat_store::Error>(writer)
        })
        .await
        .map_err(joined)?
        .map_err(|e| Status::data_loss(e.to_string()))?;
        if !chunk.done {
            continue;
        }
        let applied: LogId = wire::decode_json(&chunk.applied_json)
            .map_err(|e| Status::data_loss(format!("resync applied log id: {e}")))?;
        let membership: StoredMembership = if chunk.membership_json.is_empty() {
            StoredMembership::default()
        } else {
            wire::decode_json(&chunk.membership_json)
                .map_err(|e| Status::data_loss(format!("resync membership: {e}")))?
        };
        tokio::task::spawn_blocking(move || {
            writer.finish(|batch| stage_snapshot_state(batch, pg, &applied, &membership))
        })
        .await
        .map_err(joined)?
        .map_err(internal)?;
        return Ok(Resynced {
            applied,
            held_rows: offer.rows,
            held_bytes: offer.bytes,
            offer_bytes,
            segments: chunk.segments,
            replaced: chunk.replaced,
            rows_received,
            bytes_received,
        });
    }
}

/// The Raft state a snapshot at `applied` leaves: applied, membership, and
/// the log purged through it.
fn stage_snapshot_state(
    batch: &mut Batch,
    pg: PgId,
    applied: &LogId,
    membership: &StoredMembership,
) -> lifeboat_store::Result<()> {
    let encode = |e: io::Error| lifeboat_store::Error::CorruptRecord {
        cf: "raft_state",
        key: format!("pg {pg}"),
        reason: e.to_string(),
    };
    crate::state_machine::stage_applied(batch, pg, Some(applied), Some(membership))
        .map_err(encode)?;
    batch.put(
        Cf::RaftState,
        &keys::raft_state_key(pg, RaftStateKind::LastPurged),
        &wire::encode_json(applied).map_err(encode)?,
    );
    Ok(())
}
