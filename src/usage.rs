//! What a stored answer is worth: the token count an AI answer reports.
//!
//! Read once, when a fill completes ([`crate::storage::EntryInfo::completed`]), and kept with
//! the entry, so a hit counts its saving without parsing the stored body again. One function, so
//! that the memory and Redis tiers, and later the stream parsers, count alike.

/// The unsigned integer at `pointer` (RFC 6901) in a JSON body; 0 when the body is not JSON or
/// has no such number.
pub fn tokens(body: &[u8], pointer: &str) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer(pointer).and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pointer_or_zero() {
        let body = br#"{"usage":{"total_tokens":321}}"#;
        assert_eq!(tokens(body, "/usage/total_tokens"), 321);
        assert_eq!(tokens(body, "/usage/nope"), 0);
        assert_eq!(tokens(b"data: {}", "/usage/total_tokens"), 0);
        assert_eq!(
            tokens(br#"{"usage":{"total_tokens":-1}}"#, "/usage/total_tokens"),
            0
        );
    }
}
