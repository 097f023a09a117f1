//! The worker's SSE framing: `data: <compact JSON with a type>` blocks separated by a blank line.
//!
//! [`FrameParser`] cuts a byte stream into frames however the network splits it; [`Frame`]
//! classifies one frame by its `type`. The browser's parser takes the first `data: ` line of
//! a block, so this one does too.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// Cuts a byte stream into the `data:` payloads of its frames.
///
/// [`FrameParser::feed`] adds bytes and [`FrameParser::next_frame`] hands out the payloads
/// they complete, borrowed from the parser's buffer: a payload is not copied into a `String`
/// of its own.
#[derive(Debug, Default)]
pub struct FrameParser {
    buffer: Vec<u8>,
    /// Where the bytes not yet cut into frames start.
    start: usize,
}

impl FrameParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The payload of the next complete frame, if the bytes fed so far hold one. A frame
    /// without a `data: ` line is skipped; a payload that is not UTF-8 comes back lossily.
    pub fn next_frame(&mut self) -> Option<Cow<'_, str>> {
        let data = loop {
            let (end, sep_len) = find_frame_end(&self.buffer[self.start..])?;
            let block = self.start..self.start + end;
            self.start += end + sep_len;
            if let Some(data) = first_data_line(&self.buffer[block.clone()]) {
                break block.start + data.start..block.start + data.end;
            }
        };
        let data = &self.buffer[data];
        // Checked as UTF-8 first, which is much faster than the lossy walk it falls back to.
        Some(match std::str::from_utf8(data) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(data),
        })
    }

    /// Adds bytes and returns the payloads of every frame they complete, as `String`s.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.feed(bytes);
        let mut frames = Vec::new();
        while let Some(data) = self.next_frame() {
            frames.push(data.into_owned());
        }
        frames
    }

    /// Bytes received that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buffer.len() - self.start
    }
}

/// Finds the first blank line (LF LF, or CRLF CRLF) and returns its offset and length.
fn find_frame_end(buf: &[u8]) -> Option<(usize, usize)> {
    // Each line feed is where a blank line can end its first line: found with `memchr`,
    // which scans many bytes at a time, instead of trying every offset.
    memchr::memchr_iter(b'\n', buf).find_map(|i| match (&buf[..i], &buf[i + 1..]) {
        (_, [b'\n', ..]) => Some((i, 2)),
        ([.., b'\r'], [b'\r', b'\n', ..]) => Some((i - 1, 4)),
        _ => None,
    })
}

/// Where, in `block`, the payload of its first `data: ` line is.
fn first_data_line(block: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut line_start = 0;
    while line_start <= block.len() {
        // Lines found with `memchr`; a worker's frame is most often that one line alone.
        let line_end =
            memchr::memchr(b'\n', &block[line_start..]).map_or(block.len(), |i| line_start + i);
        let mut end = line_end;
        while end > line_start && block[end - 1] == b'\r' {
            end -= 1;
        }
        if block[line_start..end].starts_with(b"data: ") {
            return Some(line_start + 6..end);
        }
        line_start = line_end + 1;
    }
    None
}

/// One worker event, classified by its `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `{"type":"complete","response":ChatResponse}`: the turn's result, the last frame. The
    /// response as the worker wrote it (`null` when there was none), read with
    /// [`ChatResponse::parse`].
    Complete(String),
    /// `{"type":"error","error":"…"}`: the turn failed, the last frame.
    Error(String),
    /// `{"type":"keepalive"}`.
    Keepalive,
    /// `status`, `progress`, `tool_use`, `tool_result` or a type the broker does not know.
    Other(String),
    /// Data that is not a JSON object with a string `type`.
    Invalid,
}

impl Frame {
    pub fn parse(data: &str) -> Self {
        // Only the fields a frame's kind needs are read, and the type is borrowed: most
        // frames are statuses and progress, whose other fields the broker passes on as
        // sent without looking at them.
        // The response is kept as text: building it into a `Value` was a measurable share of
        // the drainer's work, and it is read once, later, by `ChatResponse::parse`.
        #[derive(Deserialize)]
        struct Raw<'a> {
            // Borrowed through a newtype: serde borrows a `Cow` field, but an `Option` of
            // one it reads into a new `String`, an allocation per frame.
            #[serde(rename = "type", borrow, default)]
            kind: Option<Borrowed<'a>>,
            #[serde(borrow)]
            response: Option<&'a RawValue>,
            error: Option<Value>,
        }
        let Ok(Raw {
            kind: Some(Borrowed(kind)),
            response,
            error,
        }) = serde_json::from_str::<Raw<'_>>(data)
        else {
            return Self::Invalid;
        };
        match kind.as_ref() {
            "complete" => Self::Complete(response.map_or("null", RawValue::get).to_owned()),
            "error" => Self::Error(match error {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            }),
            "keepalive" => Self::Keepalive,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Complete(_) | Self::Error(_))
    }
}

/// A JSON string, borrowed from the text when it has no escapes.
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

/// What the broker reads of the worker's `ChatResponse` (docs/worker-contract.md): the
/// responses, and the fields it passes on to the client.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub responses: Vec<String>,
    pub response_language: Option<String>,
    pub voice_audio_url: Option<String>,
    pub voice_audio_base64: Option<String>,
    /// Any JSON but `null`.
    pub attachments: Option<Value>,
}

impl ChatResponse {
    /// Reads a `complete` frame's response: `None` unless it is an object whose `responses`
    /// is an array of strings. The other fields are taken when they are strings
    /// (`attachments` when it is not `null`) and are otherwise left out; fields the broker
    /// does not know are skipped.
    pub fn parse(json: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            responses: Option<Vec<String>>,
            #[serde(borrow)]
            response_language: Option<&'a RawValue>,
            #[serde(borrow)]
            voice_audio_url: Option<&'a RawValue>,
            #[serde(borrow)]
            voice_audio_base64: Option<&'a RawValue>,
            #[serde(borrow)]
            attachments: Option<&'a RawValue>,
        }
        // serde reads a struct from an array too, by position: not a `ChatResponse`.
        if !json.trim_start().starts_with('{') {
            return None;
        }
        let raw: Raw<'_> = serde_json::from_str(json).ok()?;
        let text = |field: Option<&RawValue>| {
            field
                .filter(|f| f.get().starts_with('"'))
                .and_then(|f| serde_json::from_str(f.get()).ok())
        };
        Some(Self {
            responses: raw.responses?,
            response_language: text(raw.response_language),
            voice_audio_url: text(raw.voice_audio_url),
            voice_audio_base64: text(raw.voice_audio_base64),
            attachments: raw
                .attachments
                .and_then(|a| serde_json::from_str(a.get()).ok()),
        })
    }
}

/// Formats one frame the way the worker does: `data: <json>\n\n`.
pub fn format_frame(json: &str) -> String {
    format!("data: {json}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let wire = b"data: {\"type\":\"status\",\"message\":\"Processing your request...\"}\n\ndata: {\"type\":\"keepalive\"}\n\ndata: {\"type\":\"complete\",\"response\":{\"responses\":[\"a\"]}}\n\n";
        for split in 1..wire.len() {
            let mut parser = FrameParser::new();
            let mut frames = parser.push(&wire[..split]);
            frames.extend(parser.push(&wire[split..]));
            assert_eq!(frames.len(), 3, "split at {split}");
            assert_eq!(Frame::parse(&frames[1]), Frame::Keepalive);
            assert_eq!(
                Frame::parse(&frames[2]),
                Frame::Complete("{\"responses\":[\"a\"]}".into())
            );
            assert_eq!(parser.pending(), 0);
        }
    }

    #[test]
    fn mixed_line_ends_survive_any_split() {
        let wire =
            b"data: a\r\n\r\ndata: b\n\nid: 3\r\ndata: c\r\r\n\r\n: comment\n\ndata: \xffd\n\n";
        for split in 0..=wire.len() {
            let mut parser = FrameParser::new();
            let mut frames = parser.push(&wire[..split]);
            frames.extend(parser.push(&wire[split..]));
            assert_eq!(frames, ["a", "b", "c", "\u{fffd}d"], "split at {split}");
            assert_eq!(parser.pending(), 0);
        }
    }

    #[test]
    fn crlf_framing_and_extra_lines_are_tolerated() {
        let mut parser = FrameParser::new();
        let frames = parser.push(b"id: 1\r\ndata: {\"type\":\"error\",\"error\":\"boom\"}\r\n\r\n");
        assert_eq!(frames.len(), 1);
        assert_eq!(Frame::parse(&frames[0]), Frame::Error("boom".into()));
    }

    #[test]
    fn classification() {
        assert_eq!(
            Frame::parse("{\"type\":\"progress\",\"text\":\"x\"}"),
            Frame::Other("progress".into())
        );
        assert_eq!(Frame::parse("not json"), Frame::Invalid);
        assert_eq!(Frame::parse("{\"no\":\"type\"}"), Frame::Invalid);
        assert_eq!(Frame::parse("[\"type\"]"), Frame::Invalid);
        assert_eq!(Frame::parse("{\"type\":5}"), Frame::Invalid);
        assert_eq!(
            Frame::parse("{\"type\":\"st\\u0061tus\",\"message\":{\"deep\":[1]}}"),
            Frame::Other("status".into())
        );
        assert_eq!(
            Frame::parse("{\"type\":\"error\",\"error\":{\"code\":1}}"),
            Frame::Error("{\"code\":1}".into())
        );
        assert_eq!(
            Frame::parse("{\"type\":\"complete\",\"response\": {\"responses\":[\"a\"]} }"),
            Frame::Complete("{\"responses\":[\"a\"]}".into())
        );
        assert_eq!(
            Frame::parse("{\"type\":\"complete\"}"),
            Frame::Complete("null".into())
        );
        assert!(Frame::parse("{\"type\":\"complete\"}").is_terminal());
        assert_eq!(
            format_frame("{\"type\":\"keepalive\"}"),
            "data: {\"type\":\"keepalive\"}\n\n"
        );
    }

    #[test]
    fn chat_responses_are_read_leniently_but_need_their_responses() {
        let full = r#"{"responses":["a","b\u0021"],"response_language":"en","voice_audio_url":null,
            "voice_audio_base64":"QUI=","attachments":[{"k":1}],"extra":{"deep":[1,2]}}"#;
        assert_eq!(
            ChatResponse::parse(full),
            Some(ChatResponse {
                responses: vec!["a".into(), "b!".into()],
                response_language: Some("en".into()),
                voice_audio_url: None,
                voice_audio_base64: Some("QUI=".into()),
                attachments: Some(serde_json::json!([{"k": 1}])),
            })
        );
        // fields of another type are left out, not refused
        let odd = r#" {"responses":[],"response_language":5,"voice_audio_url":{"u":"x"},"attachments":null}"#;
        assert_eq!(
            ChatResponse::parse(odd),
            Some(ChatResponse {
                responses: vec![],
                response_language: None,
                voice_audio_url: None,
                voice_audio_base64: None,
                attachments: None,
            })
        );
        for bad in [
            "null",
            "{}",
            r#"{"responses":"a"}"#,
            r#"{"responses":["a",1]}"#,
            r#"{"responses":null}"#,
            r#"[["a"]]"#,
            r#"{"responses":["a"]"#,
        ] {
            assert_eq!(ChatResponse::parse(bad), None, "{bad}");
        }
    }
}
