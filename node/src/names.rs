//! Names a tenant may choose, and volume sizes: validated once, here, with
//! messages that say what is allowed.

use crate::error::NodeError;

/// Longest tenant, PG or volume name.
pub const NAME_BYTES_MAX: usize = 63;
/// Largest volume: 64 TiB.
pub const VOLUME_BYTES_MAX: u64 = 64 << 40;
/// Volume sizes are whole 512-byte sectors (what every NBD client expects).
pub const VOLUME_SIZE_ALIGN_BYTES: u64 = 512;

/// Tenant, PG and volume names: 1–63 of `a-z 0-9 -`, starting with a letter
/// or digit. They appear in export names (`tenant/volume`), bucket-like
/// places and catalog keys, so nothing else is allowed.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NodeError> {
    let bad = |reason: &str| NodeError::InvalidName {
        what,
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(bad("it is longer than 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("use only lowercase letters, digits and '-'"));
    }
    if name.starts_with('-') {
        return Err(bad("it must start with a letter or digit"));
    }
    Ok(())
}

/// Splits `TENANT/VOLUME` and validates both parts.
pub fn split_volume_name(full: &str) -> Result<(&str, &str), NodeError> {
    split_tenant_name("volume", "TENANT/VOLUME", full)
}

/// Splits `TENANT/BUCKET` and validates both parts.
pub fn split_bucket_name(full: &str) -> Result<(&str, &str), NodeError> {
    let Some((tenant, bucket)) = full.split_once('/') else {
        return Err(NodeError::InvalidName {
            what: "bucket",
            name: full.to_owned(),
            reason: "write it as TENANT/BUCKET".into(),
        });
    };
    validate_name("tenant", tenant)?;
    validate_bucket_name(bucket)?;
    Ok((tenant, bucket))
}

/// S3's rules for bucket names (they are DNS labels in virtual-host
/// addressing, and unique in the cluster): 3–63 of `a-z 0-9 . -`, starting
/// and ending with a letter or digit, no `..`, not an IPv4 address, and none
/// of the prefixes and suffixes AWS reserves.
pub fn validate_bucket_name(name: &str) -> Result<(), NodeError> {
    let bad = |reason: &str| NodeError::InvalidName {
        what: "bucket",
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.len() < 3 || name.len() > NAME_BYTES_MAX {
        return Err(bad("it must be 3 to 63 characters long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad("use only lowercase letters, digits, '.' and '-'"));
    }
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge(name.as_bytes()[0]) || !edge(name.as_bytes()[name.len() - 1]) {
        return Err(bad("it must start and end with a letter or digit"));
    }
    if name.contains("..") {
        return Err(bad("it must not contain '..'"));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(bad("it must not look like an IP address"));
    }
    if name.starts_with("xn--") || name.starts_with("sthree-") {
        return Err(bad("the prefixes 'xn--' and 'sthree-' are reserved"));
    }
    if name.ends_with("-s3alias") || name.ends_with("--ol-s3") {
        return Err(bad("the suffixes '-s3alias' and '--ol-s3' are reserved"));
    }
    Ok(())
}

/// `TENANT/NAME` of a protection group.
pub fn split_pg_name(full: &str) -> Result<(&str, &str), NodeError> {
    split_tenant_name("protection group", "TENANT/PG", full)
}

fn split_tenant_name<'a>(
    what: &'static str,
    form: &str,
    full: &'a str,
) -> Result<(&'a str, &'a str), NodeError> {
    let Some((tenant, name)) = full.split_once('/') else {
        return Err(NodeError::InvalidName {
            what,
            name: full.to_owned(),
            reason: format!("write it as {form}"),
        });
    };
    validate_name("tenant", tenant)?;
    validate_name(what, name)?;
    Ok((tenant, name))
}

pub fn validate_volume_size(size_bytes: u64) -> Result<(), NodeError> {
    if size_bytes == 0 {
        return Err(NodeError::InvalidSize {
            reason: "a volume needs at least 512 bytes".into(),
        });
    }
    if !size_bytes.is_multiple_of(VOLUME_SIZE_ALIGN_BYTES) {
        return Err(NodeError::InvalidSize {
            reason: format!("{size_bytes} bytes is not a whole number of 512-byte sectors"),
        });
    }
    if size_bytes > VOLUME_BYTES_MAX {
        return Err(NodeError::InvalidSize {
            reason: format!("{size_bytes} bytes is more than the 64 TiB maximum"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_follow_s3s_rules() {
        for good in [
            "abc",
            "payroll-backups",
            "db.dumps.2026",
            "a1-b2",
            &"a".repeat(63),
        ] {
            assert!(validate_bucket_name(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            &"a".repeat(64),
            "Payroll",
            "under_score",
            "-start",
            "end-",
            ".dot",
            "a..b",
            "192.168.1.10",
            "xn--abc",
            "sthree-x",
            "data-s3alias",
            "x--ol-s3",
        ] {
            assert!(validate_bucket_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            split_bucket_name("demo/demo-backups").unwrap(),
            ("demo", "demo-backups")
        );
        assert!(split_bucket_name("demo-backups").is_err());
        assert!(split_bucket_name("Demo/abc").is_err());
    }

    #[test]
    fn names() {
        for good in ["demo", "disk0", "a", "hr-payroll-2026"] {
            validate_name("volume", good).unwrap();
        }
        for bad in ["", "-x", "Demo", "a/b", "a b", "é", &"x".repeat(64)] {
            assert!(validate_name("volume", bad).is_err(), "{bad:?}");
        }
        assert_eq!(split_volume_name("demo/disk0").unwrap(), ("demo", "disk0"));
        assert!(split_volume_name("demo").is_err());
        assert!(split_volume_name("demo/disk0/x").is_err());
    }

    #[test]
    fn sizes() {
        validate_volume_size(1 << 30).unwrap();
        validate_volume_size(512).unwrap();
        assert!(validate_volume_size(0).is_err());
        assert!(validate_volume_size(1000).is_err());
        assert!(validate_volume_size(VOLUME_BYTES_MAX + 512).is_err());
    }
}
