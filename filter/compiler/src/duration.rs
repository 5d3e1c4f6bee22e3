//! Durations as Istio accepts them: Go `time.ParseDuration` syntax (`10s`, `1.5s`, `2m30s`,
//! `300ms`, `1h`), which also covers protobuf JSON durations.

/// Parses a duration into nanoseconds.
pub fn parse_nanos(s: &str) -> Result<u128, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("duration is empty".into());
    }
    if text == "0" {
        return Ok(0);
    }
    if text.starts_with('-') {
        return Err(format!("invalid duration {s:?}: duration must be positive"));
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut total: f64 = 0.0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if start == i {
            return Err(format!("invalid duration {s:?}"));
        }
        let number: f64 = text[start..i]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        let ustart = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let factor: f64 = match &text[ustart..i] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(format!("invalid duration {s:?}: missing unit")),
            u => return Err(format!("invalid duration {s:?}: unknown unit {u:?}")),
        };
        total += number * factor;
    }
    if !total.is_finite() || total > 3.15e20 {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(total.round() as u128)
}

/// Whole milliseconds, as the rules document stores durations.
pub fn parse_ms(s: &str) -> Result<u64, String> {
    let ns = parse_nanos(s)?;
    u64::try_from(ns / 1_000_000).map_err(|_| format!("invalid duration {s:?}: out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_bindgen_test::wasm_bindgen_test;

    #[wasm_bindgen_test(unsupported = test)]
    fn go_syntax() {
        assert_eq!(parse_ms("10s"), Ok(10_000));
        assert_eq!(parse_ms("1.5s"), Ok(1_500));
        assert_eq!(parse_ms("2m30s"), Ok(150_000));
        assert_eq!(parse_ms("300ms"), Ok(300));
        assert_eq!(parse_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_ms("0s"), Ok(0));
        assert_eq!(parse_nanos("1us"), Ok(1_000));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn rejects_garbage() {
        assert!(parse_ms("10").is_err());
        assert!(parse_ms("ten seconds").is_err());
        assert!(parse_ms("-1s").is_err());
        assert!(parse_ms("").is_err());
        assert!(parse_ms("5d").is_err());
    }
}
