//! The vault's one clock: wall-clock milliseconds since the Unix epoch, as
//! every stored and reported time is kept.

/// Milliseconds since the Unix epoch (0 before it, `i64::MAX` far after).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
