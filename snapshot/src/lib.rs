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
    #[error("{text:?} is not a period: use a number and s, m, h or d (at least 1s)")]
    BadPeriod { text: String },
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

/// Parses a schedule's period: `N{s,m,h,d}` (at least one second).
/// Returns milliseconds.
pub fn parse_every(text: &str) -> Result<u64, RestorePointError> {
    let bad = || RestorePointError::BadPeriod {
        text: text.to_owned(),
    };
    let span = relative_span(text.trim()).ok_or_else(bad)?;
    let ms = u64::try_from(span.whole_milliseconds()).map_err(|_| bad())?;
    if ms < 1000 {
        return Err(bad());
    }
    Ok(ms)
}

/// Which scheduled snapshots to keep, as restic's `forget` decides: the
/// newest `last`, and the newest one in each of the newest `hourly`
/// hours, `daily` days, `weekly` ISO weeks and `monthly` months (UTC)
/// that have one. A snapshot kept by any rule is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Retention {
    /// The indexes (into `times_ms`) of the snapshots to keep.
    pub fn keep(&self, times_ms: &[u64]) -> std::collections::BTreeSet<usize> {
        let mut order: Vec<usize> = (0..times_ms.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(times_ms[*i]));
        let mut kept: std::collections::BTreeSet<usize> =
            order.iter().take(self.last as usize).copied().collect();
        let period = |ms: u64, rule: u8| -> (i32, u32) {
            let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            match rule {
                0 => (0, (ms / 3_600_000) as u32),
                1 => (t.year(), u32::from(t.ordinal())),
                2 => {
                    let (year, week, _) = t.to_iso_week_date();
                    (year, u32::from(week))
                }
                _ => (t.year(), u32::from(u8::from(t.month()))),
            }
        };
        for (rule, count) in [self.hourly, self.daily, self.weekly, self.monthly]
            .into_iter()
            .enumerate()
        {
            let mut seen = std::collections::BTreeSet::new();
            for &i in &order {
                if seen.len() == count as usize {
                    break;
                }
                if seen.insert(period(times_ms[i], rule as u8)) {
                    kept.insert(i);
                }
            }
        }
        kept
    }
}

/// The name of a snapshot the schedule makes (`auto-20261128-101300`).
pub fn scheduled_snapshot_name(now: OffsetDateTime) -> String {
    default_snapshot_name(now).replacen("snap-", SCHEDULED_PREFIX, 1)
}

/// What the names of scheduled snapshots begin with: retention applies to
/// these only, never to snapshots people made.
pub const SCHEDULED_PREFIX: &str = "auto-";

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
    fn retention_keeps_what_restic_would() {
        let ms = |t: &str| ms(t) as u64;
        let times = [
            ms("2026-11-28T10:30:00Z"), // 0: newest
            ms("2026-11-28T10:10:00Z"), // 1: same hour as 0
            ms("2026-11-28T09:50:00Z"), // 2: previous hour
            ms("2026-11-27T23:00:00Z"), // 3: previous day
            ms("2026-11-20T12:00:00Z"), // 4: previous ISO week
            ms("2026-10-15T12:00:00Z"), // 5: previous month
        ];
        let keep = |r: Retention| r.keep(&times).into_iter().collect::<Vec<_>>();
        assert_eq!(keep(Retention::default()), Vec::<usize>::new());
        assert_eq!(
            keep(Retention {
                last: 2,
                ..Default::default()
            }),
            [0, 1]
        );
        assert_eq!(
            keep(Retention {
                hourly: 2,
                ..Default::default()
            }),
            [0, 2]
        );
        assert_eq!(
            keep(Retention {
                daily: 3,
                ..Default::default()
            }),
            [0, 3, 4]
        );
        assert_eq!(
            keep(Retention {
                weekly: 2,
                ..Default::default()
            }),
            [0, 4]
        );
        assert_eq!(
            keep(Retention {
                monthly: 9,
                ..Default::default()
            }),
            [0, 5]
        );
        assert_eq!(
            keep(Retention {
                last: 1,
                monthly: 2,
                ..Default::default()
            }),
            [0, 5]
        );
        assert_eq!(parse_every("1h"), Ok(3_600_000));
        assert!(parse_every("500ms").is_err() && parse_every("0s").is_err());
        assert_eq!(scheduled_snapshot_name(now()), "auto-20261128-103000");
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
