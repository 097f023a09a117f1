//! `POST /api/v1/chat/callback` as the worker serves it (`docs/worker-contract.md` §1.6):
//! `202 {"message_id"}`, then the turn's frames turned into progress callbacks by the
//! `progress_mode` rules, each POSTed to `progress_callback_url` with `X-Engine-Token`.
//!
//! [`payloads`] is those rules as a function of the frames: the reference the broker's own
//! callbacks are held to. It is written apart from the broker's `broker_proto::front::Progress`
//! on purpose (a test oracle that shared its code would prove nothing). Unlike the worker, the mock posts in order, one at a time, and
//! logs a failed post instead of dropping it silently.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

use crate::script::Turn;
use crate::{accept, turn_length, uuid_like, worker_error, InFlight, MockState, Route};

/// What `progress_mode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The full text once, at the end; no status, no progress.
    Complete,
    /// Status as it comes; at the end of each tool iteration the new text since the last
    /// progress; at the end the text still unsent.
    Iteration,
    /// Status as it comes; the text so far every `throttle`; at the end the full text.
    Periodic,
    /// Status as it comes; the text so far at each sentence's end; at the end the full text.
    Sentence,
}

impl Mode {
    /// The worker does not check the enum: anything else is its default, `iteration`.
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            Some("complete") => Self::Complete,
            Some("periodic") => Self::Periodic,
            Some("sentence") => Self::Sentence,
            _ => Self::Iteration,
        }
    }
}

/// The callbacks the worker's rules make of a turn's `frames` (each with the time it was
/// sent, from the turn's start): payloads without the fields every callback carries
/// (`user_id`, `message_key`, `timestamp`, `chat_id`, `thread_id`).
///
/// As the worker's `createWebhookCallbacks` does it: an iteration's end (its tools ran) is
/// reported just before the next iteration's first text, the `"\n"`; `periodic` runs a timer
/// from the first text on, every `throttle`; `sentence` looks for the last `.`, `!` or `?`
/// followed by white space or the end of the text in what is still unsent.
pub fn payloads(frames: &[(Duration, Value)], mode: Mode, throttle: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let mut text = String::new();
    // Iteration: the text at the last iteration's end that went out. Periodic and sentence:
    // the text last sent.
    let mut iteration_sent = String::new();
    let mut last_sent = String::new();
    let mut tools_ran = false;
    // Periodic: when the timer fires next.
    let mut fire: Option<Duration> = None;
    for (at, frame) in frames {
        if let Some(mut due) = fire {
            while due < *at {
                if text != last_sent && !text.is_empty() {
                    out.push(json!({"type": "progress", "text": &text}));
                    last_sent.clone_from(&text);
                }
                due += throttle;
            }
            fire = Some(due);
        }
        match frame["type"].as_str() {
            Some("status") => {
                if mode == Mode::Complete {
                    continue;
                }
                let message = frame["message"].as_str().unwrap_or_default();
                tools_ran |= message.starts_with("Executing ");
                out.push(json!({"type": "status", "message": message}));
            }
            Some("progress") => {
                if mode == Mode::Iteration && tools_ran {
                    tools_ran = false;
                    if let Some(delta) = text.get(iteration_sent.len()..).filter(|d| !d.is_empty())
                    {
                        out.push(json!({"type": "progress", "text": delta}));
                        iteration_sent.clone_from(&text);
                    }
                }
                text.push_str(frame["text"].as_str().unwrap_or_default());
                match mode {
                    Mode::Periodic if fire.is_none() => fire = Some(*at + throttle),
                    Mode::Sentence => {
                        let unsent = text.get(last_sent.len()..).unwrap_or_default();
                        if let Some(end) = last_sentence_end(unsent) {
                            let upto = &text[..last_sent.len() + end];
                            if upto != last_sent {
                                out.push(json!({"type": "progress", "text": upto}));
                                last_sent = upto.to_owned();
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some("complete") => {
                fire = None;
                let response = &frame["response"];
                let full = response["responses"]
                    .as_array()
                    .map(|r| {
                        r.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                let rest = full.get(iteration_sent.len()..).unwrap_or_default();
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
                // Nothing to say: no `complete` at all (an ambient turn, or all the text
                // already went out as progress).
                if complete.len() > 1 {
                    out.push(Value::Object(complete));
                }
            }
            Some("error") => {
                fire = None;
                out.push(json!({"type": "error", "error": frame["error"]}));
            }
            _ => {}
        }
    }
    out
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

/// `POST /api/v1/chat/callback`.
pub(crate) async fn chat_callback(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    let accepted = match accept(&req, &body, &state, Route::Callback) {
        Ok(a) => a,
        Err(response) => return *response,
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = |field: &str| request[field].as_str().filter(|v| !v.is_empty());
    let (Some(url), Some(key)) = (text("progress_callback_url"), text("message_key")) else {
        return worker_error(
            400,
            json!({"error": "progress_callback_url and message_key are required"}),
        );
    };
    let mode = Mode::parse(text("progress_mode"));
    let throttle = request["progress_throttle_seconds"]
        .as_f64()
        .filter(|s| *s > 0.0)
        .unwrap_or(5.0);
    let throttle = Duration::from_secs_f64(if mode == Mode::Periodic {
        throttle.max(1.0)
    } else {
        throttle
    });
    let mut common = Map::new();
    common.insert("user_id".into(), json!(accepted.user_id));
    common.insert("message_key".into(), json!(key));
    for field in ["chat_id", "thread_id"] {
        if let Some(value) = request[field].as_str() {
            common.insert(field.into(), json!(value));
        }
    }
    // The worker's own key, or the one the client sent when the mock has none.
    let token = state.settings.api_key.clone().unwrap_or_else(|| {
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned()
    });
    let origin = format!("http://{}", req.connection_info().host());
    let length = turn_length(&state.settings, &accepted.directives);
    let turn = Turn::new(&accepted, &origin, length);
    let guard = InFlight::start(&state.stats, &accepted.conversation, &accepted.text);
    let url = url.to_owned();
    let state = state.get_ref().clone();
    tokio::spawn(async move {
        let (frames, gap) = (turn.frames().to_vec(), turn.gap());
        let mut timed = Vec::with_capacity(frames.len());
        for (i, frame) in frames.into_iter().enumerate() {
            if i > 0 {
                crate::pause(gap).await;
            }
            timed.push((gap * u32::try_from(i).unwrap_or(u32::MAX), frame));
        }
        guard.finish(true);
        turn.remember(&state);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        for payload in payloads(&timed, mode, throttle) {
            let mut payload = payload;
            if let Some(fields) = payload.as_object_mut() {
                fields.extend(common.clone());
                fields.insert("timestamp".into(), json!(timestamp()));
            }
            let request = hyper::Request::post(url.as_str())
                .header("content-type", "application/json")
                .header("x-engine-token", token.as_str())
                .body(Full::new(Bytes::from(payload.to_string())));
            let Ok(request) = request else {
                tracing::warn!("mock callback: bad URL");
                return;
            };
            if let Err(e) = client.request(request).await {
                tracing::warn!(error = %e, "mock callback not delivered");
            }
        }
    });
    HttpResponse::Accepted().json(json!({"message_id": uuid_like()}))
}

/// Now, as the worker writes it (ISO 8601, UTC).
fn timestamp() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(list: &[Value]) -> Vec<(Duration, Value)> {
        list.iter()
            .enumerate()
            .map(|(i, f)| (Duration::from_secs(i as u64), f.clone()))
            .collect()
    }

    fn tool_turn() -> Vec<(Duration, Value)> {
        frames(&[
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
        ])
    }

    #[test]
    fn each_mode_makes_the_workers_callbacks() {
        let statuses = || {
            vec![
                json!({"type": "status", "message": "Processing your request..."}),
                json!({"type": "status", "message": "Executing 1 tool(s)..."}),
                json!({"type": "status", "message": "Preparing your response..."}),
            ]
        };
        assert_eq!(
            payloads(&tool_turn(), Mode::Complete, Duration::from_secs(5)),
            [json!({"type": "complete", "text": "Looking up.\nDone. Bye"})]
        );
        let s = statuses();
        // The first iteration's text goes out once its tool ran, before the second begins.
        assert_eq!(
            payloads(&tool_turn(), Mode::Iteration, Duration::from_secs(3)),
            [
                s[0].clone(),
                s[1].clone(),
                json!({"type": "progress", "text": "Looking up."}),
                s[2].clone(),
                json!({"type": "complete", "text": "\nDone. Bye"}),
            ]
        );
        // Up to the last sentence end (with the space after it) in what is unsent.
        assert_eq!(
            payloads(&tool_turn(), Mode::Sentence, Duration::from_secs(5)),
            [
                s[0].clone(),
                json!({"type": "progress", "text": "Looking up."}),
                s[1].clone(),
                s[2].clone(),
                json!({"type": "progress", "text": "Looking up.\nDone. "}),
                json!({"type": "complete", "text": "Looking up.\nDone. Bye"}),
            ]
        );
        // Frames one second apart; the timer starts with the first text (1 s) and fires at
        // 3.2 s, 5.4 s (nothing new) and 7.6 s; the turn ends at 9 s.
        assert_eq!(
            payloads(&tool_turn(), Mode::Periodic, Duration::from_millis(2200)),
            [
                s[0].clone(),
                s[1].clone(),
                json!({"type": "progress", "text": "Looking up."}),
                s[2].clone(),
                json!({"type": "progress", "text": "Looking up.\n"}),
                json!({"type": "complete", "text": "Looking up.\nDone. Bye"}),
            ]
        );
    }

    #[test]
    fn nothing_left_to_say_sends_no_complete_and_errors_always_go() {
        // All the text went out at the last tool iteration's end.
        let turn = frames(&[
            json!({"type": "progress", "text": "All."}),
            json!({"type": "status", "message": "Executing 1 tool(s)..."}),
            json!({"type": "progress", "text": "\n"}),
            json!({"type": "status", "message": "Preparing your response..."}),
            json!({"type": "complete", "response": {"responses": ["All."]}}),
        ]);
        let iteration = payloads(&turn, Mode::Iteration, Duration::from_secs(3));
        assert_eq!(iteration.last().unwrap()["type"], "status");
        // An ambient turn: no complete in any mode.
        let ambient = frames(&[json!({"type": "complete", "response": {"responses": []}})]);
        for mode in [
            Mode::Complete,
            Mode::Iteration,
            Mode::Periodic,
            Mode::Sentence,
        ] {
            assert!(payloads(&ambient, mode, Duration::from_secs(3)).is_empty());
        }
        // A voice answer goes even without text.
        let voice = frames(&[
            json!({"type": "complete", "response": {"responses": [], "voice_audio_url": "http://w/a"}}),
        ]);
        assert_eq!(
            payloads(&voice, Mode::Complete, Duration::from_secs(3)),
            [json!({"type": "complete", "voice_audio_url": "http://w/a"})]
        );
        let failed = frames(&[json!({"type": "error", "error": "boom"})]);
        assert_eq!(
            payloads(&failed, Mode::Complete, Duration::from_secs(3)),
            [json!({"type": "error", "error": "boom"})]
        );
        assert_eq!(Mode::parse(Some("bogus")), Mode::Iteration);
    }
}
