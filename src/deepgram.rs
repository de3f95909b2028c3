//! What Switchyard knows of Deepgram's streaming protocols (DEEPGRAM.md beside SPEC.md):
//! which endpoint a path is, the messages a drain sends to end each one the way its
//! protocol expects, and the messages the relay must recognise on the way.
//!
//! The relay that acts on this is `proxy::websocket` (frames read by `proxy::pump`); the
//! stub upstream that speaks the same protocols for tests and the demo is `stub`. This
//! module takes no hyper types.

/// A drain's first message to a `/v1/listen` or `/v2/listen` upstream: finalize what it
/// has, send the finals, close.
pub const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;
/// A drain's first message to a `/v1/speak` or `/v2/speak` upstream: speak what it has,
/// answer `Flushed`.
pub const FLUSH: &str = r#"{"type":"Flush"}"#;
/// A drain's last message to a speak upstream, once `Flushed` came or grace ran out.
pub const CLOSE: &str = r#"{"type":"Close"}"#;
/// A speak upstream's answer to one `Flush`.
pub const FLUSHED: &str = "Flushed";
/// A speak upstream's answer to `Clear`, which drops the text the `Flush` messages before
/// it would have spoken (so they get no `Flushed`).
pub const CLEARED: &str = "Cleared";

/// What a WebSocket stream is, for metrics and for how a drain ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/listen`, `/v2/listen`: `CloseStream`, then the finals.
    Listen,
    /// `/v1/speak`, `/v2/speak`: `Flush`, then `Close`.
    Speak,
    /// Anything else (e.g. `/v1/agent/converse`, whose conversation cannot survive a
    /// reconnect): 1012 to the client and 1001 upstream at the deadline, no earlier.
    Other,
}

/// The client messages a relay looks for in text frames, by their `type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientMessages {
    /// The message that ends the stream from the client's side (`CloseStream`; speak's
    /// `Close`). A client that sent it is not sent 1012: the JS SDK would reconnect a
    /// session its app ended.
    pub end: Option<&'static str>,
    /// A message each answered by one `Flushed` (speak's `Flush`): the drain's own
    /// `Flush` is answered by the first `Flushed` after those of the client's before it.
    pub counted: Option<&'static str>,
    /// A message after which the `counted` ones before it get no answer (speak's `Clear`).
    pub reset: Option<&'static str>,
    /// A text message that is content, counted like audio when dropped after the drain
    /// message (speak's `Speak`: text that is never spoken).
    pub content: Option<&'static str>,
}

impl Endpoint {
    /// Classifies a request path.
    pub fn of_path(path: &str) -> Endpoint {
        match path.trim_end_matches('/') {
            "/v1/listen" | "/v2/listen" => Endpoint::Listen,
            "/v1/speak" | "/v2/speak" => Endpoint::Speak,
            _ => Endpoint::Other,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Listen => "listen",
            Endpoint::Speak => "speak",
            Endpoint::Other => "other",
        }
    }

    /// The message a drain sends upstream at the deadline; `None` for a stream that is
    /// closed there and then.
    pub fn drain_message(self) -> Option<&'static str> {
        match self {
            Endpoint::Listen => Some(CLOSE_STREAM),
            Endpoint::Speak => Some(FLUSH),
            Endpoint::Other => None,
        }
    }

    /// Whether the drain message is answered (`Flushed`, or `Cleared` for the client's
    /// own) and followed by `CLOSE`, rather than by the upstream closing the stream.
    pub fn flushes(self) -> bool {
        self == Endpoint::Speak
    }

    /// What the relay looks for in the client's messages.
    pub fn client_messages(self) -> ClientMessages {
        match self {
            Endpoint::Listen => ClientMessages {
                end: Some("CloseStream"),
                ..ClientMessages::default()
            },
            Endpoint::Speak => ClientMessages {
                end: Some("Close"),
                counted: Some("Flush"),
                reset: Some("Clear"),
                content: Some("Speak"),
            },
            Endpoint::Other => ClientMessages::default(),
        }
    }
}

impl ClientMessages {
    /// Whether any message is looked for.
    pub fn any(&self) -> bool {
        *self != ClientMessages::default()
    }
}

/// Whether the JSON text message `text` has `"type": name`. The bytes are searched first,
/// so most messages (`Results`, audio metadata) are not parsed.
pub fn is_type(text: &[u8], name: &str) -> bool {
    text.windows(name.len()).any(|w| w == name.as_bytes())
        && serde_json::from_slice::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(|t| t == name))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified_with_or_without_a_trailing_slash() {
        assert_eq!(Endpoint::of_path("/v1/listen"), Endpoint::Listen);
        assert_eq!(Endpoint::of_path("/v2/listen/"), Endpoint::Listen);
        assert_eq!(Endpoint::of_path("/v1/speak"), Endpoint::Speak);
        assert_eq!(Endpoint::of_path("/v2/speak"), Endpoint::Speak);
        assert_eq!(Endpoint::of_path("/v1/agent/converse"), Endpoint::Other);
        assert_eq!(Endpoint::of_path("/v1/listening"), Endpoint::Other);
    }

    #[test]
    fn a_type_is_matched_in_the_json_not_in_the_bytes() {
        assert!(is_type(br#"{"type": "CloseStream"}"#, "CloseStream"));
        assert!(!is_type(
            br#"{"type":"Results","text":"CloseStream"}"#,
            "CloseStream"
        ));
        assert!(!is_type(br#"{"type":"Flushed""#, "Flushed"));
        assert!(!is_type(b"Flush", "Flush"));
    }
}
