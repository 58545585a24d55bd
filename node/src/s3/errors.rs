//! How failures become S3 errors: one mapping from the node's errors (and
//! the state machine's refusals) to S3 error codes, so every operation
//! answers the same failure the same way.

use lifeboat_replication::{Error as R, Rejection as J};
use s3s::{S3Error, S3ErrorCode, s3_error};

use crate::error::NodeError;

/// The S3 error for a node failure. Server-side faults are logged here with
/// their stable code; the client gets `InternalError` or
/// `ServiceUnavailable` without internals.
pub fn from_node(e: NodeError) -> S3Error {
    use S3ErrorCode as C;
    let (code, message): (S3ErrorCode, String) = match &e {
        NodeError::Store(lifeboat_store::Error::NoSpace { .. }) => {
            return s3_error!(
                ServiceUnavailable,
                "the node is out of space: writes are refused at its reserve"
            );
        }
        // As Ceph's gateway answers a full quota: 403 QuotaExceeded, which
        // clients do not retry.
        NodeError::QuotaExceeded { .. } => {
            let mut err = S3Error::with_message(C::Custom("QuotaExceeded".into()), e.to_string());
            err.set_status_code(hyper::StatusCode::FORBIDDEN);
            return err;
        }
        NodeError::BucketNotFound(_) => (C::NoSuchBucket, e.to_string()),
        NodeError::InvalidName { .. } => (C::InvalidArgument, e.to_string()),
        NodeError::NotHostedHere { .. } => (C::ServiceUnavailable, e.to_string()),
        NodeError::NotInitialized => (C::ServiceUnavailable, e.to_string()),
        NodeError::Replication(R::Rejected { rejection, .. }) => match rejection {
            J::BucketNotFound { .. } | J::BucketNameNotFound { .. } => {
                (C::NoSuchBucket, rejection.to_string())
            }
            J::BucketNotEmpty { .. } => (C::BucketNotEmpty, rejection.to_string()),
            J::BucketNameTaken { .. } => (C::BucketAlreadyExists, rejection.to_string()),
            J::KeyTooLong { .. } => (C::KeyTooLongError, rejection.to_string()),
            J::BucketReadOnly { .. } => (
                C::AccessDenied,
                "this bucket is read-only: a clone of another bucket's past, or a divergence snapshot"
                    .into(),
            ),
            J::UploadNotFound { .. } => (C::NoSuchUpload, rejection.to_string()),
            J::InvalidPart { .. } => (C::InvalidPart, rejection.to_string()),
            // An append-only credential tried to replace an object.
            J::ObjectExists => (
                C::AccessDenied,
                "this credential may not overwrite an existing object".into(),
            ),
            other => {
                tracing::error!(code = e.code(), "S3: refused by the state machine: {other}");
                (
                    C::InternalError,
                    "the write was refused; see the node log".into(),
                )
            }
        },
        NodeError::Replication(R::NotLeader { .. } | R::NoLeader { .. } | R::NoLease { .. }) => {
            (C::ServiceUnavailable, e.to_string())
        }
        _ => {
            tracing::error!(code = e.code(), "S3: {e}");
            (C::InternalError, "internal error; see the node log".into())
        }
    };
    S3Error::with_message(code, message)
}

/// `InternalError` for a fault of stored data or the server itself, logged.
pub fn internal(what: &str, e: impl std::fmt::Display) -> S3Error {
    tracing::error!("S3: {what}: {e}");
    S3Error::with_message(
        S3ErrorCode::InternalError,
        format!("{what}; see the node log"),
    )
}

pub fn access_denied(why: impl Into<String>) -> S3Error {
    S3Error::with_message(S3ErrorCode::AccessDenied, why.into())
}
