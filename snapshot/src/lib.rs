//! Restore points: what "a volume at a snapshot or a time" means, decided in
//! pure code. This crate decides and returns commands for `node` to
//! propose; it never proposes or reads storage itself.
//!
//! So far: parsing the restore point a user names — in an export name
//! (`TENANT/VOLUME@SNAPSHOT`, `TENANT/VOLUME@2026-11-28T10:13:00Z`) or a
//! `--at` argument (RFC 3339, or relative like `-15m`) — into a
//! [`RestorePoint`]. Resolving a time to a log index needs the timeline,
//! which the point-in-time history issue adds.

use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// A moment of a protection group's history, as a user names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestorePoint {
    /// The newest state.
    Latest,
    /// A named snapshot.
    Snapshot(String),
    /// A wall-clock time, in milliseconds since the Unix epoch.
    Time { unix_ms: i64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestorePointError {
    #[error(
        "{text:?} is not a time: use RFC 3339 (2026-11-28T10:13:00Z) or a relative time like -15m"
    )]
    BadTime { text: String },
    #[error("{text:?} is in the future")]
    Future { text: String },
    #[error("{text:?} is not a snapshot name: use letters, digits, '-', '_' and '.'")]
    BadSnapshotName { text: String },
}

/// Parses a `--at` value: `latest`, RFC 3339, or `-N{s,m,h,d}` before `now`.
pub fn parse_at(text: &str, now: OffsetDateTime) -> Result<RestorePoint, RestorePointError> {
    let t = text.trim();
    if t == "latest" {
        return Ok(RestorePoint::Latest);
    }
    let moment = if let Some(rel) = t.strip_prefix('-') {
        let bad = || RestorePointError::BadTime {
            text: text.to_owned(),
        };
        let split = rel.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = rel.split_at(split);
        let n: i64 = n.parse().map_err(|_| bad())?;
        let span = match unit {
            "s" => Duration::seconds(n),
            "m" => Duration::minutes(n),
            "h" => Duration::hours(n),
            "d" => Duration::days(n),
            _ => return Err(bad()),
        };
        now - span
    } else {
        OffsetDateTime::parse(t, &Rfc3339).map_err(|_| RestorePointError::BadTime {
            text: text.to_owned(),
        })?
    };
    if moment > now {
        return Err(RestorePointError::Future {
            text: text.to_owned(),
        });
    }
    Ok(RestorePoint::Time {
        unix_ms: (moment.unix_timestamp_nanos() / 1_000_000) as i64,
    })
}

/// Splits an export name `TENANT/VOLUME[@POINT]` into the volume name and
/// the restore point (`Latest` without `@`). A point that parses as a time
/// is a time; anything else must be a valid snapshot name.
pub fn parse_export_name(
    name: &str,
    now: OffsetDateTime,
) -> Result<(&str, RestorePoint), RestorePointError> {
    let Some((volume, point)) = name.split_once('@') else {
        return Ok((name, RestorePoint::Latest));
    };
    if point.starts_with(|c: char| c.is_ascii_digit()) && point.contains('T') {
        return parse_at(point, now).map(|p| (volume, p));
    }
    let valid = !point.is_empty()
        && point.len() <= 63
        && point
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(RestorePointError::BadSnapshotName {
            text: point.to_owned(),
        });
    }
    Ok((volume, RestorePoint::Snapshot(point.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-11-28T10:30:00Z", &Rfc3339).unwrap()
    }

    fn ms(text: &str) -> i64 {
        (OffsetDateTime::parse(text, &Rfc3339)
            .unwrap()
            .unix_timestamp_nanos()
            / 1_000_000) as i64
    }

    #[test]
    fn at_values() {
        assert_eq!(parse_at("latest", now()), Ok(RestorePoint::Latest));
        assert_eq!(
            parse_at("2026-11-28T10:13:00Z", now()),
            Ok(RestorePoint::Time {
                unix_ms: ms("2026-11-28T10:13:00Z")
            })
        );
        assert_eq!(
            parse_at("-15m", now()),
            Ok(RestorePoint::Time {
                unix_ms: ms("2026-11-28T10:15:00Z")
            })
        );
        assert_eq!(
            parse_at("-2h", now()),
            Ok(RestorePoint::Time {
                unix_ms: ms("2026-11-28T08:30:00Z")
            })
        );
        for bad in ["yesterday", "-15", "-m", "-15y", "2026-13-01T00:00:00Z", ""] {
            assert!(
                matches!(parse_at(bad, now()), Err(RestorePointError::BadTime { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_at("2027-01-01T00:00:00Z", now()),
            Err(RestorePointError::Future { .. })
        ));
    }

    #[test]
    fn export_names() {
        assert_eq!(
            parse_export_name("demo/disk0", now()),
            Ok(("demo/disk0", RestorePoint::Latest))
        );
        assert_eq!(
            parse_export_name("demo/disk0@nightly-1", now()),
            Ok(("demo/disk0", RestorePoint::Snapshot("nightly-1".into())))
        );
        assert_eq!(
            parse_export_name("demo/disk0@2026-11-28T10:13:00Z", now()),
            Ok((
                "demo/disk0",
                RestorePoint::Time {
                    unix_ms: ms("2026-11-28T10:13:00Z")
                }
            ))
        );
        assert!(parse_export_name("demo/disk0@", now()).is_err());
        assert!(parse_export_name("demo/disk0@a b", now()).is_err());
    }
}
