//! The worker's SSE framing: `data: <compact JSON with a type>` blocks separated by a blank line.
//!
//! [`FrameParser`] cuts a byte stream into frames however the network splits it; [`Frame`]
//! classifies one frame by its `type`. The browser's parser takes the first `data: ` line of
//! a block, so this one does too.

use serde_json::Value;

/// Cuts a byte stream into the `data:` payloads of its frames.
#[derive(Debug, Default)]
pub struct FrameParser {
    buffer: Vec<u8>,
}

impl FrameParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns the payloads of every frame they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Some((end, sep_len)) = find_frame_end(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + sep_len).take(end).collect();
            if let Some(data) = first_data_line(&block) {
                frames.push(data);
            }
        }
        frames
    }

    /// Bytes received that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }
}

/// Finds the first blank line (LF LF, or CRLF CRLF) and returns its offset and length.
fn find_frame_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn first_data_line(block: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    text.lines().find_map(|line| {
        line.trim_end_matches('\r')
            .strip_prefix("data: ")
            .map(str::to_owned)
    })
}

/// One worker event, classified by its `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `{"type":"complete","response":ChatResponse}`: the turn's result, the last frame.
    Complete(Value),
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
        let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(data) else {
            return Self::Invalid;
        };
        let Some(Value::String(kind)) = map.get("type") else {
            return Self::Invalid;
        };
        match kind.as_str() {
            "complete" => Self::Complete(map.remove("response").unwrap_or(Value::Null)),
            "error" => Self::Error(match map.remove("error") {
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
            assert!(matches!(Frame::parse(&frames[2]), Frame::Complete(_)));
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
        assert!(Frame::parse("{\"type\":\"complete\"}").is_terminal());
        assert_eq!(
            format_frame("{\"type\":\"keepalive\"}"),
            "data: {\"type\":\"keepalive\"}\n\n"
        );
    }
}
