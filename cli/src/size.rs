//! Human sizes: `10GiB`, `512MiB`, `1TiB`, `4096`, `1.5GiB`, `10GB`.

/// Parses a size; binary units (KiB, MiB, GiB, TiB) are powers of 1024,
/// decimal units (KB, MB, GB, TB) powers of 1000, and a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "{text:?} is not a size: write it like 10GiB, 512MiB or 4096"
        ));
    }
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ));
        }
    };
    let bytes = if number.contains('.') {
        let v: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size"))?;
        let b = v * multiplier as f64;
        if !(b.is_finite() && b >= 0.0 && b < u64::MAX as f64) || b.fract() != 0.0 {
            return Err(format!("{text:?} is not a whole number of bytes"));
        }
        b as u64
    } else {
        let v: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size"))?;
        v.checked_mul(multiplier)
            .ok_or_else(|| format!("{text:?} is too large"))?
    };
    Ok(bytes)
}

/// Formats bytes with the largest binary unit that keeps it readable.
pub use lifeboat_node::quota::format_bytes as format_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("1 TiB").unwrap(), 1 << 40);
        for bad in [
            "",
            "GiB",
            "10XB",
            "-1",
            "1.2.3G",
            "99999999999999999999",
            "0.1B",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
