//! What a stored answer is worth: the token count an AI answer reports.
//!
//! Read once, when a fill completes ([`crate::storage::EntryInfo::completed`]), and kept with
//! the entry, so a hit counts its saving without parsing the stored body again. One function, so
//! that the memory and Redis tiers, and later the stream parsers, count alike.

/// The unsigned integer at `pointer` (RFC 6901) in a JSON body, or, for a stored event stream
/// (`text/event-stream`: not one JSON document), in the LAST event whose JSON data has one:
/// OpenAI sends its `usage` in the final chunk (`stream_options.include_usage`), Anthropic
/// the running output count in each `message_delta`, so the last one is the answer's. 0 when
/// there is no such number.
pub fn tokens(body: &[u8], pointer: &str) -> u64 {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return v
            .pointer(pointer)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
    }
    stream_tokens(body, pointer).unwrap_or(0)
}

/// The SSE case of [`tokens`]: events are separated by a blank line, each event's `data:`
/// lines joined by newlines (the WHATWG event-stream format); scanned from the end.
fn stream_tokens(body: &[u8], pointer: &str) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let text = text.replace("\r\n", "\n");
    for event in text.rsplit("\n\n") {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&data.join("\n")) else {
            continue; // `[DONE]`, comments, partial lines
        };
        if let Some(n) = v.pointer(pointer).and_then(serde_json::Value::as_u64) {
            return Some(n);
        }
    }
    None
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

    /// Issue 18 item 7: a stored stream's saving comes from its final usage event.
    #[test]
    fn reads_the_last_usage_of_a_stream() {
        let openai = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n\
data: [DONE]\n\n";
        assert_eq!(tokens(openai, "/usage/total_tokens"), 12);
        let anthropic = b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";
        assert_eq!(tokens(anthropic, "/usage/output_tokens"), 15);
        assert_eq!(
            tokens(
                b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
                "/usage/total_tokens"
            ),
            0
        );
        assert_eq!(tokens(&[0xff, 0xfe, b'\n'], "/usage/total_tokens"), 0);
    }
}
