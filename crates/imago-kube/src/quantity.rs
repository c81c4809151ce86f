//! Resource quantities: imago's `memory`/`cpus` written as Kubernetes quantities in the form
//! the API server keeps, and quantities compared by value (the server may rewrite `1024Mi` as
//! `1Gi`; that is not drift).

/// Parses a memory size as the local engine does: `64M` (MiB), `1G`, `512k`, `100b` or a byte
/// count.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid memory size {text:?} (like \"64M\", \"1G\", \"512k\")");
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let unit: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(invalid()),
            };
            (t.get(..i).unwrap_or_default(), unit)
        }
        _ => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|v| *v > 0)
        .ok_or_else(invalid)
}

/// Bytes as a binary quantity in its canonical form: the largest binary suffix that divides it.
pub fn binary_bytes(bytes: u64) -> String {
    const SUFFIXES: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    for (suffix, shift) in SUFFIXES {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Cores as thousandths: Kubernetes' smallest CPU unit; a finer value is refused.
pub fn cpu_millis(cpus: f64) -> Result<u64, String> {
    let millis = cpus * 1000.0;
    let rounded = millis.round();
    if !(rounded >= 1.0 && (millis - rounded).abs() < 1e-6 && rounded < 1e12) {
        return Err(format!(
            "kubernetes counts CPU in thousandths of a core and {cpus} is not a whole number of them"
        ));
    }
    // In range and integral, checked just above.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(rounded as u64)
}

/// Millicores in the canonical form: `2` for 2000m, `500m` otherwise.
pub fn cpu_text(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// A quantity's value in billionths, for comparing two spellings of one amount; `None` when
/// the text is not a quantity.
pub fn nano_units(text: &str) -> Option<i128> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let scale: i128 = match suffix {
        "" => 1_000_000_000,
        "n" => 1,
        "u" => 1_000,
        "m" => 1_000_000,
        "k" => 1_000_000_000_000,
        "M" => 1_000_000_000_000_000,
        "G" => 1_000_000_000_000_000_000,
        "T" => 1_000_000_000_000_000_000_000,
        "P" => 1_000_000_000_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000_000_000_000,
        "Ki" => 1_000_000_000 << 10,
        "Mi" => 1_000_000_000 << 20,
        "Gi" => 1_000_000_000 << 30,
        "Ti" => 1_000_000_000 << 40,
        "Pi" => 1_000_000_000 << 50,
        "Ei" => 1_000_000_000 << 60,
        _ => return None,
    };
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut value: i128 = if whole.is_empty() {
        0
    } else {
        whole.parse::<i128>().ok()?.checked_mul(scale)?
    };
    let mut unit = scale;
    for digit in fraction.chars() {
        unit /= 10;
        value = value.checked_add(i128::from(digit.to_digit(10)?) * unit)?;
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn memory_is_written_in_the_servers_canonical_form() {
        assert_eq!(binary_bytes(parse_memory("64M").unwrap()), "64Mi");
        assert_eq!(binary_bytes(parse_memory("1024M").unwrap()), "1Gi");
        assert_eq!(binary_bytes(parse_memory("1536k").unwrap()), "1536Ki");
        assert_eq!(binary_bytes(1000), "1000");
        assert!(parse_memory("64X").is_err());
        assert!(parse_memory("0").is_err());
    }

    #[test]
    fn cpus_become_millicores_or_are_refused() {
        assert_eq!(cpu_text(cpu_millis(0.5).unwrap()), "500m");
        assert_eq!(cpu_text(cpu_millis(2.0).unwrap()), "2");
        assert_eq!(cpu_text(cpu_millis(0.001).unwrap()), "1m");
        assert!(cpu_millis(0.0005).is_err());
        assert!(cpu_millis(0.1234).is_err());
    }

    #[test]
    fn one_amount_in_two_spellings_compares_equal() {
        assert_eq!(nano_units("1Gi"), nano_units("1024Mi"));
        assert_eq!(nano_units("0.5"), nano_units("500m"));
        assert_eq!(nano_units("1.5Gi"), nano_units("1536Mi"));
        assert_ne!(nano_units("1G"), nano_units("1Gi"));
        assert_eq!(nano_units("12x"), None);
        assert_eq!(nano_units("Mi"), None);
    }
}
