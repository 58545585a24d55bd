//! Restore points: what "a volume at a snapshot or a time" means, decided in
//! pure code. This crate decides and returns commands for `node` to
//! propose; it never proposes or reads storage itself.
//!
//! Parsing the restore point a user names — in an export name
//! (`TENANT/VOLUME@SNAPSHOT`, `TENANT/VOLUME@2026-11-28T10:13:00Z`) or a
//! `--at` argument (RFC 3339, or relative like `-15m`) — into a
//! [`RestorePoint`]; lock dates (`--until`); snapshot names. Resolving a
//! time to a log index is the timeline's (`lifeboat_store::history`).

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
    #[error(
        "{text:?} is not a snapshot name: use 1 to 63 letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    BadSnapshotName { text: String },
    #[error("{text:?} is not in the future: a lock runs until a later time")]
    NotFuture { text: String },
}

/// Longest snapshot name.
pub const SNAPSHOT_NAME_BYTES_MAX: usize = 63;

/// Checks a snapshot name: what an export name `VOLUME@NAME` can carry
/// unambiguously (never a time: no ':').
pub fn validate_snapshot_name(name: &str) -> Result<(), RestorePointError> {
    let valid = !name.is_empty()
        && name.len() <= SNAPSHOT_NAME_BYTES_MAX
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !looks_like_time(name)
        // `VOLUME@latest` would be ambiguous.
        && name != "latest";
    if valid {
        Ok(())
    } else {
        Err(RestorePointError::BadSnapshotName {
            text: name.to_owned(),
        })
    }
}

/// Whether an export's point is meant as a time rather than a name.
fn looks_like_time(point: &str) -> bool {
    point.starts_with(|c: char| c.is_ascii_digit()) && point.contains('T')
}

/// The name of a snapshot created without one: its UTC time to the second
/// (`snap-20261128-101300`: never read as a time).
pub fn default_snapshot_name(now: OffsetDateTime) -> String {
    let t = now.to_offset(time::UtcOffset::UTC);
    format!(
        "snap-{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 3339 (UTC, milliseconds) of a time in ms since the epoch.
pub fn format_ms(unix_ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_ms} ms since the epoch"))
}

/// Parses a lock's end: RFC 3339, or `+N{s,m,h,d}` after `now`. It must
/// be in the future. Returns ms since the epoch.
pub fn parse_until(text: &str, now: OffsetDateTime) -> Result<u64, RestorePointError> {
    let t = text.trim();
    let bad = || RestorePointError::BadTime {
        text: text.to_owned(),
    };
    let moment = if let Some(rel) = t.strip_prefix('+') {
        now + relative_span(rel).ok_or_else(bad)?
    } else {
        OffsetDateTime::parse(t, &Rfc3339).map_err(|_| bad())?
    };
    if moment <= now {
        return Err(RestorePointError::NotFuture {
            text: text.to_owned(),
        });
    }
    u64::try_from(moment.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}

/// `N{s,m,h,d}` as a span.
fn relative_span(rel: &str) -> Option<Duration> {
    let split = rel.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = rel.split_at(split);
    let n: i64 = n.parse().ok()?;
    Some(match unit {
        "s" => Duration::seconds(n),
        "m" => Duration::minutes(n),
        "h" => Duration::hours(n),
        "d" => Duration::days(n),
        _ => return None,
    })
}

/// Parses a `--at` value: `latest`, RFC 3339, or `-N{s,m,h,d}` before `now`.
pub fn parse_at(text: &str, now: OffsetDateTime) -> Result<RestorePoint, RestorePointError> {
    let t = text.trim();
    if t == "latest" {
        return Ok(RestorePoint::Latest);
    }
    let moment = if let Some(rel) = t.strip_prefix('-') {
        now - relative_span(rel).ok_or_else(|| RestorePointError::BadTime {
            text: text.to_owned(),
        })?
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
    if looks_like_time(point) {
        return parse_at(point, now).map(|p| (volume, p));
    }
    validate_snapshot_name(point)?;
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
        assert!(parse_export_name("demo/disk0@-x", now()).is_err());
    }

    #[test]
    fn snapshot_names_lock_dates_and_formats() {
        assert_eq!(default_snapshot_name(now()), "snap-20261128-103000");
        validate_snapshot_name(&default_snapshot_name(now())).unwrap();
        for bad in [
            "",
            "latest",
            "-a",
            ".a",
            "a:b",
            "a/b",
            "2026-11-28T10",
            &"a".repeat(64),
        ] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad}");
        }
        validate_snapshot_name("before-migration_2.1").unwrap();
        assert_eq!(
            parse_until("+30d", now()),
            Ok(ms("2026-12-28T10:30:00Z") as u64)
        );
        assert_eq!(
            parse_until("2027-01-01T00:00:00Z", now()),
            Ok(ms("2027-01-01T00:00:00Z") as u64)
        );
        assert!(matches!(
            parse_until("2026-11-28T10:30:00Z", now()),
            Err(RestorePointError::NotFuture { .. })
        ));
        assert!(matches!(
            parse_until("30d", now()),
            Err(RestorePointError::BadTime { .. })
        ));
        assert_eq!(
            format_ms(ms("2026-11-28T10:13:00.250Z") as u64),
            "2026-11-28T10:13:00.25Z"
        );
    }
}
