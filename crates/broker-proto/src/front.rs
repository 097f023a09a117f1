//! The worker's own chat routes on the broker (`docs/worker-contract.md` §1.2–1.6): what a
//! message sent through them carries besides its worker body, the sentences a user is shown
//! when the broker itself fails a turn, and the `progress_mode` rules that turn the worker's
//! stream frames into progress callbacks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Which route a message came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// The broker's own `POST /api/v1/message`.
    Message,
    /// `POST /api/v1/chat`: waits, answers `{"message_id", ...ChatResponse}`.
    Chat,
    /// `POST /api/v1/chat/stream`: the SSE stream in the worker's framing.
    ChatStream,
    /// `POST /api/v1/chat/callback`: `202 {"message_id"}`, then progress callbacks.
    ChatCallback,
}

impl Route {
    /// The path a client posts to, as the worker's messages name it.
    pub fn path(self) -> &'static str {
        match self {
            Self::Message => "/api/v1/message",
            Self::Chat => "/api/v1/chat",
            Self::ChatStream => "/api/v1/chat/stream",
            Self::ChatCallback => "/api/v1/chat/callback",
        }
    }

    /// Is this one of the worker's routes (as opposed to the broker's own)?
    pub fn is_worker_route(self) -> bool {
        self != Self::Message
    }
}

/// `progress_mode` (§1.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// The full text once, at the end; no status, no progress.
    Complete,
    /// Status as it comes; after each tool iteration the new text; at the end the rest.
    Iteration,
    /// Status as it comes; the text so far every `throttle` from the first text on.
    Periodic,
    /// Status as it comes; the text up to each sentence's end.
    Sentence,
}

impl ProgressMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "complete" => Some(Self::Complete),
            "iteration" => Some(Self::Iteration),
            "periodic" => Some(Self::Periodic),
            "sentence" => Some(Self::Sentence),
            _ => None,
        }
    }
}

/// The worker's default throttle, used when none (or none above 0) is given.
pub const DEFAULT_THROTTLE: Duration = Duration::from_secs(5);
/// The shortest period of `periodic`.
pub const MIN_THROTTLE: Duration = Duration::from_secs(1);

/// What a message of the worker's routes keeps besides its worker body, stored with it as
/// JSON (field `front` of the message record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Front {
    pub route: Route,
    /// The name of the key the client authenticated with: its callbacks carry that key in
    /// `X-Engine-Token` (the key itself is never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The callback route's fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackFront>,
}

/// The fields of `POST /api/v1/chat/callback` that shape its callbacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackFront {
    pub message_key: String,
    pub mode: ProgressMode,
    /// `progress_throttle_seconds` as the worker applies it, in milliseconds.
    pub throttle_ms: u64,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
}

impl CallbackFront {
    pub fn throttle(&self) -> Duration {
        Duration::from_millis(self.throttle_ms)
    }

    /// A callback payload with the fields every callback carries (§1.6): `user_id`,
    /// `message_key`, `timestamp`, and `chat_id` / `thread_id` exactly when the request had
    /// them. `payload` is a JSON object with `type` and its own fields.
    pub fn payload(&self, payload: &Value, timestamp: &str) -> Value {
        let mut out = match payload {
            Value::Object(fields) => fields.clone(),
            _ => Map::new(),
        };
        out.insert("user_id".into(), json!(self.user_id));
        out.insert("message_key".into(), json!(self.message_key));
        out.insert("timestamp".into(), json!(timestamp));
        if let Some(chat_id) = &self.chat_id {
            out.insert("chat_id".into(), json!(chat_id));
        }
        if let Some(thread_id) = &self.thread_id {
            out.insert("thread_id".into(), json!(thread_id));
        }
        Value::Object(out)
    }
}

impl Front {
    pub fn to_json(&self) -> String {
        // Strings, numbers and enums: serialising them cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The front stored with a message; `None` for an empty or unreadable field (a message
    /// of the broker's own route).
    pub fn parse(json: &str) -> Option<Self> {
        if json.is_empty() {
            return None;
        }
        serde_json::from_str(json).ok()
    }
}

/// What a user is shown when the broker itself fails a turn (the worker's own failures carry
/// their own sentence): the web client shows `error` as it is, the gateways send an apology.
pub fn user_sentence(code: &str) -> &'static str {
    match code {
        "WORKER_UNAVAILABLE" => {
            "The assistant cannot be reached right now. Please try again in a few minutes."
        }
        "TIMEOUT" => "The assistant stopped answering before it finished. Please try again.",
        "TURN_TOO_LONG" => "The assistant took too long to answer. Please try again.",
        "WORKER_DISCONNECTED" => {
            "The connection to the assistant was lost before it finished. Please try again."
        }
        "CANCELLED" => "This message was cancelled before it was answered.",
        "RETRIES_EXHAUSTED" => {
            "This message could not be answered after several tries. Please try again later."
        }
        _ => "Sorry, something went wrong while answering. Please try again.",
    }
}

/// The worker's paths the broker serves through its proxy, whose URLs it rewrites.
pub const PROXIED_PATHS: &[&str] = &[
    "/api/v1/audio/",
    "/api/v1/voice-submissions/",
    "/public/ptxprint/",
];

/// Rewrites the URLs the worker builds on its own origin (audio, voice submissions, files)
/// to the broker's public URL (`BROKER_PUBLIC_URL`), where its proxy serves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The worker's origin: `scheme://host[:port]`.
    from: String,
    /// The broker's public URL, without a trailing `/`.
    to: String,
}

impl Rewrite {
    /// From the worker's base URL's origin to `public_url`.
    pub fn new(worker_base_url: &str, public_url: &str) -> Self {
        let origin_end = worker_base_url
            .find("://")
            .map(|i| i + 3)
            .and_then(|start| {
                worker_base_url[start..]
                    .find('/')
                    .map(|slash| start + slash)
            })
            .unwrap_or(worker_base_url.len());
        Self {
            from: worker_base_url[..origin_end].to_owned(),
            to: public_url.trim_end_matches('/').to_owned(),
        }
    }

    /// Rewrites every string in `value` that is a URL on the worker's origin under one of
    /// [`PROXIED_PATHS`]; whether anything changed.
    pub fn value(&self, value: &mut Value) -> bool {
        match value {
            Value::String(text) => match self.url(text) {
                Some(new) => {
                    *text = new;
                    true
                }
                None => false,
            },
            Value::Array(items) => items.iter_mut().fold(false, |c, v| self.value(v) | c),
            Value::Object(fields) => fields.values_mut().fold(false, |c, v| self.value(v) | c),
            _ => false,
        }
    }

    /// `url` on the public URL, when it is one to rewrite.
    pub fn url(&self, url: &str) -> Option<String> {
        let path = url.strip_prefix(self.from.as_str())?;
        PROXIED_PATHS
            .iter()
            .any(|p| path.starts_with(p))
            .then(|| format!("{}{path}", self.to))
    }

    /// A JSON text with its URLs rewritten; `None` when there is nothing to rewrite.
    pub fn json(&self, text: &str) -> Option<String> {
        if !text.contains(self.from.as_str()) {
            return None;
        }
        let mut value: Value = serde_json::from_str(text).ok()?;
        self.value(&mut value).then(|| value.to_string())
    }
}

/// The text of a `ChatResponse`'s `responses`, joined as the worker joins them for callbacks.
pub fn joined_responses(response: &Value) -> String {
    response["responses"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The `progress_mode` rules (§1.6), fed the worker's frames one by one as they come: each
/// call returns the callbacks due (payloads without the common fields of
/// [`CallbackFront::payload`]), in order. `periodic` also needs [`Progress::tick`] at
/// [`Progress::due`].
///
/// As the worker's own sender: an iteration's end (its tools ran) is reported just before the
/// next iteration's first text; `sentence` sends the text up to the last `.`, `!` or `?`
/// followed by white space or the end; `periodic` runs a timer from the first text on.
#[derive(Debug)]
pub struct Progress {
    mode: ProgressMode,
    throttle: Duration,
    text: String,
    /// Iteration: the text, at the end of the last iteration, that went out.
    iteration_sent: String,
    /// Periodic and sentence: the text last sent.
    last_sent: String,
    tools_ran: bool,
    /// Periodic: when the timer fires next, from the start of the turn.
    due: Option<Duration>,
    /// Progress already posted by an earlier run of the turn: the cumulative text it
    /// covered. Progress within it is not posted again.
    posted_before: Option<String>,
    ended: bool,
}

impl Progress {
    pub fn new(mode: ProgressMode, throttle: Duration) -> Self {
        Self {
            mode,
            throttle,
            text: String::new(),
            iteration_sent: String::new(),
            last_sent: String::new(),
            tools_ran: false,
            due: None,
            posted_before: None,
            ended: false,
        }
    }

    /// A re-run of a turn whose earlier run posted progress up to `text` (cumulative): no
    /// progress is posted until the new text goes beyond it, and in `iteration` mode the
    /// final text is counted from it.
    pub fn resume_after(&mut self, text: String) {
        if !text.is_empty() {
            self.posted_before = Some(text);
        }
    }

    /// When `periodic`'s timer fires next (from the start of the turn).
    pub fn due(&self) -> Option<Duration> {
        self.due.filter(|_| !self.ended)
    }

    /// The timer fired at `at`.
    pub fn tick(&mut self, at: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(due) = self.due {
            if at >= due && !self.ended {
                if self.text != self.last_sent && !self.text.is_empty() {
                    let text = self.text.clone();
                    self.push_progress(&mut out, text.clone(), text.clone());
                    self.last_sent = text;
                }
                self.due = Some(due + self.throttle);
            }
        }
        out
    }

    /// The callbacks due when the worker's `frame` arrives at `at` (from the turn's start).
    pub fn frame(&mut self, frame: &Value, at: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        // Timer fires that fell before this frame.
        while let Some(due) = self.due.filter(|due| *due < at) {
            out.extend(self.tick(due));
        }
        match frame["type"].as_str() {
            Some("status") if self.mode != ProgressMode::Complete => {
                let message = frame["message"].as_str().unwrap_or_default();
                self.tools_ran |= message.starts_with("Executing ");
                out.push(json!({"type": "status", "message": message}));
            }
            Some("progress") => {
                if self.mode == ProgressMode::Iteration && self.tools_ran {
                    self.tools_ran = false;
                    if self.text.len() > self.iteration_sent.len()
                        && self.text.starts_with(self.iteration_sent.as_str())
                    {
                        let delta = self.text[self.iteration_sent.len()..].to_owned();
                        let whole = self.text.clone();
                        self.push_progress(&mut out, delta, whole.clone());
                        self.iteration_sent = whole;
                    }
                }
                self.text
                    .push_str(frame["text"].as_str().unwrap_or_default());
                match self.mode {
                    ProgressMode::Periodic if self.due.is_none() => {
                        self.due = Some(at + self.throttle)
                    }
                    ProgressMode::Sentence => {
                        let sent = self.last_sent.len();
                        let end = self
                            .text
                            .get(sent..)
                            .and_then(last_sentence_end)
                            .map(|end| sent + end);
                        if let Some(end) = end {
                            let upto = self.text[..end].to_owned();
                            if upto != self.last_sent {
                                self.push_progress(&mut out, upto.clone(), upto.clone());
                                self.last_sent = upto;
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some("complete") => {
                self.ended = true;
                if let Some(complete) = self.complete(&frame["response"]) {
                    out.push(complete);
                }
            }
            Some("error") => {
                self.ended = true;
                out.push(json!({"type": "error", "error": frame["error"]}));
            }
            _ => {}
        }
        out
    }

    /// A `progress` callback of `text`, covering `whole` (the cumulative text once it is
    /// sent) — unless an earlier run of the turn posted that far already.
    fn push_progress(&mut self, out: &mut Vec<Value>, text: String, whole: String) {
        if let Some(before) = &self.posted_before {
            if before.starts_with(whole.as_str()) {
                return;
            }
            if !whole.starts_with(before.as_str()) {
                // The re-run wrote something else: say nothing more until the end.
                return;
            }
            // Iteration sends what is new; the other modes the text so far.
            let text = if self.mode == ProgressMode::Iteration {
                whole[before.len()..].to_owned()
            } else {
                whole
            };
            self.posted_before = None;
            if !text.is_empty() {
                out.push(json!({"type": "progress", "text": text}));
            }
            return;
        }
        out.push(json!({"type": "progress", "text": text}));
    }

    /// The `complete` callback of `response`, if there is anything to say.
    fn complete(&self, response: &Value) -> Option<Value> {
        let full = joined_responses(response);
        let rest = match (&self.posted_before, self.mode) {
            // An earlier run posted part of this text (iteration: as deltas): the rest.
            (Some(before), ProgressMode::Iteration) if full.starts_with(before.as_str()) => {
                &full[before.len()..]
            }
            (None, _) => full.get(self.iteration_sent.len()..).unwrap_or(&full),
            _ => full.as_str(),
        };
        let mut complete = Map::new();
        complete.insert("type".into(), json!("complete"));
        if !rest.is_empty() {
            complete.insert("text".into(), json!(rest));
        }
        for field in ["voice_audio_url", "voice_audio_base64"] {
            if let Some(value) = response[field].as_str().filter(|v| !v.is_empty()) {
                complete.insert(field.into(), json!(value));
            }
        }
        if response["attachments"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            complete.insert("attachments".into(), response["attachments"].clone());
        }
        (complete.len() > 1).then_some(Value::Object(complete))
    }

    /// The text the progress returned so far covers, cumulatively: what a re-run of the turn
    /// must not post again ([`Progress::resume_after`]).
    pub fn covered(&self) -> &str {
        match self.mode {
            ProgressMode::Iteration => &self.iteration_sent,
            _ => &self.last_sent,
        }
    }
}

/// Where the last sentence of `text` ends: after a `.`, `!` or `?` and the one white-space
/// character that follows it (none at the end of the text).
fn last_sentence_end(text: &str) -> Option<usize> {
    let mut end = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '.' | '!' | '?') {
            match chars.peek() {
                None => end = Some(i + 1),
                Some(&(j, next)) if next.is_whitespace() => end = Some(j + next.len_utf8()),
                Some(_) => {}
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: ProgressMode, frames: &[Value]) -> Vec<Value> {
        let mut p = Progress::new(mode, Duration::from_millis(2200));
        let mut out = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            out.extend(p.frame(frame, Duration::from_secs(i as u64)));
        }
        out
    }

    fn tool_turn() -> Vec<Value> {
        vec![
            json!({"type": "status", "message": "Processing your request..."}),
            json!({"type": "progress", "text": "Looking"}),
            json!({"type": "progress", "text": " up."}),
            json!({"type": "status", "message": "Executing 1 tool(s)..."}),
            json!({"type": "tool_use", "tool": "t", "input": {}}),
            json!({"type": "tool_result", "tool": "t", "result": {}}),
            json!({"type": "progress", "text": "\n"}),
            json!({"type": "status", "message": "Preparing your response..."}),
            json!({"type": "progress", "text": "Done. Bye"}),
            json!({"type": "complete", "response": {"responses": ["Looking up.", "Done. Bye"], "voice_audio_url": null}}),
        ]
    }

    fn texts(out: &[Value]) -> Vec<String> {
        out.iter()
            .map(|p| {
                format!(
                    "{}:{}",
                    p["type"].as_str().unwrap_or_default(),
                    p["text"]
                        .as_str()
                        .or(p["message"].as_str())
                        .unwrap_or_default()
                )
            })
            .collect()
    }

    #[test]
    fn each_mode_as_the_worker_sends_it() {
        assert_eq!(
            texts(&run(ProgressMode::Complete, &tool_turn())),
            ["complete:Looking up.\nDone. Bye"]
        );
        assert_eq!(
            texts(&run(ProgressMode::Iteration, &tool_turn())),
            [
                "status:Processing your request...",
                "status:Executing 1 tool(s)...",
                "progress:Looking up.",
                "status:Preparing your response...",
                "complete:\nDone. Bye"
            ]
        );
        assert_eq!(
            texts(&run(ProgressMode::Sentence, &tool_turn())),
            [
                "status:Processing your request...",
                "progress:Looking up.",
                "status:Executing 1 tool(s)...",
                "status:Preparing your response...",
                "progress:Looking up.\nDone. ",
                "complete:Looking up.\nDone. Bye"
            ]
        );
        assert_eq!(
            texts(&run(ProgressMode::Periodic, &tool_turn())),
            [
                "status:Processing your request...",
                "status:Executing 1 tool(s)...",
                "progress:Looking up.",
                "status:Preparing your response...",
                "progress:Looking up.\n",
                "complete:Looking up.\nDone. Bye"
            ]
        );
    }

    #[test]
    fn a_rerun_posts_no_progress_twice() {
        // The first run posted "Looking up." before the drainer died.
        let mut p = Progress::new(ProgressMode::Iteration, DEFAULT_THROTTLE);
        p.resume_after("Looking up.".into());
        let mut out = Vec::new();
        for (i, frame) in tool_turn().iter().enumerate() {
            out.extend(p.frame(frame, Duration::from_secs(i as u64)));
        }
        assert_eq!(
            texts(&out),
            [
                "status:Processing your request...",
                "status:Executing 1 tool(s)...",
                "status:Preparing your response...",
                "complete:\nDone. Bye"
            ]
        );
        // A re-run that wrote something else: its whole text comes with complete.
        let mut p = Progress::new(ProgressMode::Iteration, DEFAULT_THROTTLE);
        p.resume_after("Something else.".into());
        let out: Vec<Value> = tool_turn()
            .iter()
            .enumerate()
            .flat_map(|(i, f)| p.frame(f, Duration::from_secs(i as u64)))
            .collect();
        assert_eq!(
            texts(&out).last().unwrap(),
            "complete:Looking up.\nDone. Bye"
        );
        assert!(!texts(&out).iter().any(|t| t.starts_with("progress")));
    }

    #[test]
    fn worker_urls_move_to_the_public_url() {
        let rewrite = Rewrite::new("http://127.0.0.1:9/base", "https://broker.example/");
        let mut v = json!({"voice_audio_url": "http://127.0.0.1:9/api/v1/audio/audio/o/u/x.opus",
            "attachments": [{"url": "http://127.0.0.1:9/public/ptxprint/pdfs/a.pdf"},
                            {"url": "http://127.0.0.1:9/elsewhere"}, {"url": "http://127.0.0.19/api/v1/audio/x"}]});
        assert!(rewrite.value(&mut v));
        assert_eq!(
            v["voice_audio_url"],
            "https://broker.example/api/v1/audio/audio/o/u/x.opus"
        );
        assert_eq!(
            v["attachments"][0]["url"],
            "https://broker.example/public/ptxprint/pdfs/a.pdf"
        );
        assert_eq!(v["attachments"][1]["url"], "http://127.0.0.1:9/elsewhere");
        assert_eq!(
            v["attachments"][2]["url"],
            "http://127.0.0.19/api/v1/audio/x"
        );
        assert_eq!(rewrite.json(r#"{"a":1}"#), None);
    }

    #[test]
    fn the_common_fields_are_added_exactly_when_given() {
        let mut front = CallbackFront {
            message_key: "k".into(),
            mode: ProgressMode::Iteration,
            throttle_ms: 3000,
            user_id: "u".into(),
            chat_id: None,
            thread_id: None,
        };
        let p = front.payload(&json!({"type": "status", "message": "m"}), "t");
        assert_eq!(
            p,
            json!({"type": "status", "message": "m", "user_id": "u", "message_key": "k", "timestamp": "t"})
        );
        front.chat_id = Some("-100".into());
        let p = front.payload(&json!({"type": "status", "message": "m"}), "t");
        assert_eq!(p["chat_id"], "-100");
        assert!(p.get("thread_id").is_none());
    }
}
