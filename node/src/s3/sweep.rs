//! The sweep of abandoned object data: multipart uploads older than
//! `s3.abandoned_upload_age_ms` are aborted, and streams of chunks written
//! ahead that no entry named (their upload died with its client or node)
//! are released once idle for `s3.abandoned_stream_age_ms`. Each PG's
//! leader sweeps its own PG, through its log, so every replica drops the
//! same data.

use std::sync::Arc;

use lifeboat_proto::raft as pb;
use lifeboat_store::objects::BucketState;
use lifeboat_store::uploads::Uploads;

use crate::core::NodeCore;
use crate::s3::objects::now_ms;

/// One pass over every PG this node leads.
pub async fn sweep_once(core: &Arc<NodeCore>) {
    let now = now_ms().max(0) as u64;
    let upload_cutoff = now.saturating_sub(core.config.s3.abandoned_upload_age_ms);
    let stream_cutoff = now.saturating_sub(core.config.s3.abandoned_stream_age_ms);
    let uploads = Uploads::new(core.db.clone());
    for group in core.groups() {
        if group.pg() == lifeboat_store::PgId::CATALOG || !group.leadership().is_leader {
            continue;
        }
        let pg = group.pg();
        let mut expired = Vec::new();
        let buckets = match core.objects.buckets(pg) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(pg = pg.0, error = %e, "S3 sweep: cannot list buckets");
                continue;
            }
        };
        for (bucket, _, record) in buckets {
            if record.state != BucketState::Active {
                continue;
            }
            match uploads.uploads(pg, bucket, None, usize::MAX) {
                Ok(list) => expired.extend(
                    list.into_iter()
                        .filter(|(_, u)| u.created_ms < upload_cutoff)
                        .map(|(upload, _)| (bucket, upload)),
                ),
                Err(e) => tracing::warn!(pg = pg.0, error = %e, "S3 sweep: cannot list uploads"),
            }
        }
        for (bucket, upload) in expired {
            let kind = pb::command::Kind::AbortUpload(pb::AbortUpload {
                bucket: bucket.0,
                upload,
            });
            match group.propose(kind).await {
                Ok(_) => {
                    core.metrics.s3_uploads_expired.inc();
                    tracing::info!(
                        pg = pg.0,
                        bucket = bucket.0,
                        upload = format!("{upload:016x}"),
                        "S3 sweep: aborted a multipart upload past its age"
                    );
                }
                Err(e) => tracing::warn!(pg = pg.0, error = %e, "S3 sweep: abort failed"),
            }
        }
        let streams = match uploads.streams(pg) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pg = pg.0, error = %e, "S3 sweep: cannot list streams");
                continue;
            }
        };
        for (stream, newest) in streams {
            if newest >= stream_cutoff {
                continue;
            }
            let kind = pb::command::Kind::ReleaseStream(pb::ReleaseStream { stream });
            match group.propose(kind).await {
                Ok(_) => {
                    core.metrics.s3_streams_released.inc();
                    tracing::info!(
                        pg = pg.0,
                        stream,
                        "S3 sweep: released object data an upload wrote and never named"
                    );
                }
                Err(e) => tracing::warn!(pg = pg.0, error = %e, "S3 sweep: release failed"),
            }
        }
    }
}
