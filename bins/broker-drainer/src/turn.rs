//! One turn of a claimed message: run it at the worker, store and publish the outcome.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use broker_core::clock::now_ms;
use broker_core::queue::{Claimed, Finish, Finished, Mode, QueueError, TurnEnd};
use broker_core::worker::{backoff, TurnResult};
use broker_proto::front::{user_sentence, Front};
use broker_proto::sse::Frame;
use broker_proto::{ChatResponse, Conversation, Failure, Outcome};
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use tracing::Instrument;

use crate::progress::{engine_token, Posted, Poster};
use crate::Shared;

/// Runs the turn of a message this drainer has just claimed under `lease`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    conversation: Conversation,
    claimed: Claimed,
    lease: String,
    permit: OwnedSemaphorePermit,
) {
    // The client's trace id, when it sent a `traceparent`: on every line of the turn.
    let trace_id = claimed.traceparent.split('-').nth(1).unwrap_or_default();
    let span = tracing::info_span!(
        "turn",
        conversation = conversation.as_str(),
        message_id = claimed.message_id.as_str(),
        trace_id = (!trace_id.is_empty()).then_some(trace_id),
    );
    run_inner(&shared, &conversation, claimed, &lease)
        .instrument(span)
        .await;
    if let Ok(mut running) = shared.running.lock() {
        if let Some(n) = running.get_mut(conversation.as_str()) {
            *n -= 1;
            if *n == 0 {
                running.remove(conversation.as_str());
            }
        }
    }
    drop(permit);
}

async fn run_inner(shared: &Shared, conversation: &Conversation, claimed: Claimed, lease: &str) {
    let id = shared.id().to_owned();
    tracing::debug!(attempt = claimed.attempts, "turn started");

    let limits = &shared.settings.drainer;
    let front = Front::parse(&claimed.front);
    let (result, left, posted) = if claimed.attempts > limits.max_claims {
        let failure = Failure::new(
            503,
            "too many attempts",
            "RETRIES_EXHAUSTED",
            format!(
                "the message was started {} times without finishing",
                claimed.attempts - 1
            ),
        );
        (TurnResult::Failed(failure), Unrecorded::default(), None)
    } else {
        let mut hard_stop = shared.hard_stop.clone();
        tokio::select! {
            outcome = run_worker(shared, conversation, &claimed, lease, front.as_ref()) => outcome,
            () = crate::fenced(shared) => {
                // Cut off from Redis for so long that another drainer may soon take this
                // conversation over: stop the turn here (its stream to the worker closes), so
                // that it never runs beside its successor. It runs again after the reap.
                tracing::warn!("no heartbeat for too long: this turn stops here and will run again");
                return;
            }
            () = crate::flag_set(&mut hard_stop) => {
                // Grace period over: give the conversation back, keeping its place.
                match shared.queue.release(&id, conversation, Some(lease)).await {
                    Ok(r) => tracing::warn!(released = ?r, "turn cut by shutdown; it will run again"),
                    Err(e) => tracing::warn!(error = %e, "could not release at shutdown; reap will"),
                }
                return;
            }
        }
    };
    // A failure of the broker's own reaches a callback client as the worker's `error`.
    let mut posted = posted;
    if let (Some(front), TurnResult::Failed(failure)) = (&front, &result) {
        if let Some(callback) = &front.callback {
            let mut poster = Poster {
                shared,
                conversation,
                claimed: &claimed,
                lease,
                front: callback,
                token: engine_token(shared, front.key.as_deref()),
                posted: posted.take().unwrap_or_default(),
            };
            if !poster.posted.worker_error {
                let error =
                    serde_json::json!({"type": "error", "error": user_sentence(&failure.code)});
                poster.post("", &error).await;
            }
            posted = Some(poster.posted);
        }
    }
    // Boxed: a turn waiting on the worker then holds only what waiting needs (10,000 waiting
    // turns are a drainer's memory).
    Box::pin(finish(
        shared,
        conversation,
        &claimed,
        lease,
        result,
        left,
        front.as_ref(),
        posted,
    ))
    .await;
}

/// Runs the turn at the worker. A message that keeps its frames (stream, async) has them
/// recorded as they come; one of `/api/v1/chat/callback` has them turned into callbacks as
/// they come; the others get neither a channel nor a recorder.
async fn run_worker(
    shared: &Shared,
    conversation: &Conversation,
    claimed: &Claimed,
    lease: &str,
    front: Option<&Front>,
) -> (TurnResult, Unrecorded, Option<Posted>) {
    if let Some(callback) = front.and_then(|f| f.callback.as_ref()) {
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let worker_leg = async {
            let mut on_frame = move |data: &str, frame: &Frame| {
                if !matches!(frame, Frame::Keepalive | Frame::Invalid) {
                    let _ = frames_tx.send(shared.rewritten(data, frame));
                }
            };
            let result = shared
                .worker
                .run_turn(&claimed.body, traceparent(claimed), &mut on_frame)
                .await;
            drop(on_frame);
            result
        };
        let mut poster = Poster {
            shared,
            conversation,
            claimed,
            lease,
            front: callback,
            token: engine_token(shared, front.and_then(|f| f.key.as_deref())),
            posted: Posted::default(),
        };
        let (result, ()) = tokio::join!(worker_leg, Box::pin(poster.run(frames_rx)));
        return (result, Unrecorded::default(), Some(poster.posted));
    }
    if !records_events(claimed) {
        let result = shared
            .worker
            .run_turn(&claimed.body, traceparent(claimed), &mut |_, _| {})
            .await;
        return (result, Unrecorded::default(), None);
    }
    let (frames_tx, frames_rx) = mpsc::unbounded_channel();
    let worker_leg = async {
        let mut on_frame = move |data: &str, frame: &Frame| {
            let kind = match frame {
                Frame::Complete(_) => "complete",
                Frame::Error(_) => "error",
                Frame::Other(kind) => kind.as_str(),
                // Keepalives are not recorded: the API sends its own to a silent stream.
                // Frames the web client could not parse are not passed on.
                Frame::Keepalive | Frame::Invalid => return,
            };
            let _ = frames_tx.send((kind.to_owned(), shared.rewritten(data, frame)));
        };
        let result = shared
            .worker
            .run_turn(&claimed.body, traceparent(claimed), &mut on_frame)
            .await;
        drop(on_frame);
        result
    };
    // Boxed: the recorder's Redis writes would otherwise enlarge every waiting turn.
    let recorder = Box::pin(record_frames(
        shared,
        conversation,
        claimed,
        lease,
        frames_rx,
    ));
    let (result, left) = tokio::join!(worker_leg, recorder);
    (result, left, None)
}

/// How long a worker frame may wait to be recorded, so that it can share a write with the
/// frames after it: a short turn's frames all go with the finish script (no write of their
/// own), a long turn's reach its stream readers at most this much later.
const LINGER: Duration = Duration::from_millis(5);

/// What the recorder leaves for the finish script.
#[derive(Default)]
struct Unrecorded {
    /// Frames not yet written (the turn ended within their linger).
    frames: Vec<(String, String)>,
    /// The terminal frame (`complete` or `error`) the worker sent.
    terminal: Option<(String, String)>,
}

/// Records the worker's frames in the message's events as they come, in batches, while the
/// lease holds. Frames still waiting when the worker leg ends, and the worker's terminal frame,
/// are returned: the finish script records them together with the outcome.
async fn record_frames(
    shared: &Shared,
    conversation: &Conversation,
    claimed: &Claimed,
    lease: &str,
    mut frames: mpsc::UnboundedReceiver<(String, String)>,
) -> Unrecorded {
    let mut left = Unrecorded::default();
    let mut writing = true;
    let mut due = tokio::time::Instant::now();
    let events_max = shared.settings.drainer.events_max;
    loop {
        let next = if left.frames.is_empty() {
            frames.recv().await
        } else {
            match tokio::time::timeout_at(due, frames.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    let batch = std::mem::take(&mut left.frames);
                    if !writing {
                        continue;
                    }
                    let written = until_stopped(shared, || {
                        shared.queue.record_events(
                            conversation,
                            &claimed.message_id,
                            lease,
                            &batch,
                            events_max,
                            &claimed.reply,
                        )
                    })
                    .await;
                    if written != Some(true) {
                        tracing::warn!(
                            "the lease is gone: this turn's frames are no longer recorded"
                        );
                        writing = false;
                    }
                    continue;
                }
            }
        };
        let Some((kind, data)) = next else { break };
        if kind == "complete" || kind == "error" {
            left.terminal = Some((kind, data));
        } else if writing {
            if left.frames.is_empty() {
                due = tokio::time::Instant::now() + LINGER;
            }
            left.frames.push((kind, data));
        }
    }
    left
}

/// The client's W3C `traceparent` (checked by the API), if it sent one.
pub(crate) fn traceparent(claimed: &Claimed) -> Option<&str> {
    Some(claimed.traceparent.as_str()).filter(|t| !t.is_empty())
}

/// Does this message keep its frames in its events (stream and async messages)?
fn records_events(claimed: &Claimed) -> bool {
    Mode::parse(&claimed.mode).is_none_or(Mode::records_events)
}

/// The client-facing callback body of docs/design.md §8: the outcome's fields, `status`
/// (`completed` or `error`), `user_id`, `conversation` and `client_message_id`, keys in
/// alphabetical order (a test holds it to what a `serde_json::Map` of them writes).
fn callback_payload(claimed: &Claimed, conversation: &Conversation, outcome: &Outcome) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Completed<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        attachments: Option<&'a serde_json::Value>,
        client_message_id: Option<&'a str>,
        conversation: &'a str,
        message_id: &'a str,
        processing_ms: u64,
        queue_wait_ms: u64,
        response_language: Option<&'a str>,
        responses: &'a [String],
        status: &'static str,
        user_id: &'a str,
        voice_audio_base64: Option<&'a str>,
        voice_audio_url: Option<&'a str>,
    }
    #[derive(serde::Serialize)]
    struct Failed<'a> {
        client_message_id: Option<&'a str>,
        code: &'a str,
        conversation: &'a str,
        error: &'a str,
        http_status: u16,
        message: &'a str,
        message_id: &'a str,
        processing_ms: u64,
        queue_wait_ms: u64,
        status: &'static str,
        user_id: &'a str,
    }
    let client_message_id = Some(claimed.client_message_id.as_str()).filter(|id| !id.is_empty());
    let written = match outcome {
        Outcome::Completed {
            message_id,
            responses,
            response_language,
            voice_audio_url,
            attachments,
            voice_audio_base64,
            queue_wait_ms,
            processing_ms,
        } => serde_json::to_vec(&Completed {
            attachments: attachments.as_ref(),
            client_message_id,
            conversation: conversation.as_str(),
            message_id,
            processing_ms: *processing_ms,
            queue_wait_ms: *queue_wait_ms,
            response_language: response_language.as_deref(),
            responses,
            status: "completed",
            user_id: &claimed.user_id,
            voice_audio_base64: voice_audio_base64.as_deref(),
            voice_audio_url: voice_audio_url.as_deref(),
        }),
        Outcome::Failed {
            message_id,
            failure,
            queue_wait_ms,
            processing_ms,
        } => serde_json::to_vec(&Failed {
            client_message_id,
            code: &failure.code,
            conversation: conversation.as_str(),
            error: &failure.error,
            http_status: failure.http_status,
            message: &failure.message,
            message_id,
            processing_ms: *processing_ms,
            queue_wait_ms: *queue_wait_ms,
            status: "error",
            user_id: &claimed.user_id,
        }),
    };
    // Strings, numbers and a JSON value: serialising them cannot fail.
    written.unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    shared: &Shared,
    conversation: &Conversation,
    claimed: &Claimed,
    lease: &str,
    result: TurnResult,
    left: Unrecorded,
    front: Option<&Front>,
    posted: Option<Posted>,
) {
    let worker_terminal = left.terminal;
    // Only a message that keeps its frames gets a terminal frame: for the others it would be
    // built (a copy of the response, serialised) only to be dropped.
    let records = records_events(claimed);
    let finished_at = now_ms();
    let queue_wait_ms = claimed.started_at.saturating_sub(claimed.enqueued_at);
    let processing_ms = finished_at.saturating_sub(claimed.started_at);
    let message_id = claimed.message_id.clone();
    let mut dead_entries = Vec::new();
    let (outcome, terminal) = match result {
        TurnResult::Completed { response, json } => {
            // The worker's own complete frame passes unchanged.
            let terminal = match worker_terminal {
                _ if !records => String::new(),
                Some((kind, data)) if kind == "complete" => data,
                _ => {
                    let frame = format!("{{\"type\":\"complete\",\"response\":{json}}}");
                    let rewritten = shared.rewrite.as_ref().and_then(|r| r.json(&frame));
                    rewritten.unwrap_or(frame)
                }
            };
            let ChatResponse {
                responses,
                response_language,
                mut voice_audio_url,
                voice_audio_base64,
                mut attachments,
            } = response;
            if let Some(rewrite) = &shared.rewrite {
                if let Some(url) = voice_audio_url.as_deref().and_then(|u| rewrite.url(u)) {
                    voice_audio_url = Some(url);
                }
                if let Some(attachments) = &mut attachments {
                    rewrite.value(attachments);
                }
            }
            let outcome = Outcome::Completed {
                message_id: message_id.clone(),
                responses,
                response_language,
                voice_audio_url,
                attachments,
                voice_audio_base64,
                queue_wait_ms,
                processing_ms,
            };
            (outcome, ("complete", terminal))
        }
        TurnResult::Failed(failure) => {
            tracing::warn!(code = %failure.code, status = failure.http_status, "turn failed");
            if failure.http_status >= 500 {
                dead_entries.push(
                    serde_json::json!({
                        "kind": "message",
                        "message_id": message_id,
                        "conversation": conversation.as_str(),
                        "code": failure.code,
                        "message": failure.message,
                        "attempts": claimed.attempts,
                        "at": finished_at,
                    })
                    .to_string(),
                );
            }
            // The worker's error frame passes unchanged; other failures get the broker's, with
            // a sentence for the user on the worker's route.
            let terminal = match worker_terminal {
                _ if !records => String::new(),
                Some((kind, data)) if kind == "error" && failure.code == "WORKER_ERROR" => data,
                _ => serde_json::json!({
                    "type": "error",
                    "error": if front.is_some() { user_sentence(&failure.code) } else { &failure.message },
                    "code": failure.code,
                    "message_id": message_id,
                })
                .to_string(),
            };
            let outcome = Outcome::Failed {
                message_id: message_id.clone(),
                failure,
                queue_wait_ms,
                processing_ms,
            };
            (outcome, ("error", terminal))
        }
    };
    let json = outcome.to_json();
    // The figures of the turn, for the histograms and failure counts of `/metrics`.
    let mut figures = Vec::new();
    let mode = claimed.mode.as_str();
    let end_to_end = finished_at.saturating_sub(claimed.enqueued_at);
    broker_core::metrics::observe(&mut figures, "queue_wait", mode, queue_wait_ms);
    broker_core::metrics::observe(&mut figures, "turn", mode, processing_ms);
    broker_core::metrics::observe(&mut figures, "end_to_end", mode, end_to_end);
    if let Outcome::Failed { failure, .. } = &outcome {
        figures.push((format!("+failed_code:{}", failure.code), "1".into()));
    }
    let mut finish = if records {
        let mut finish = Finish::new(outcome.status(), &json, terminal.0, &terminal.1);
        finish.frames = left.frames;
        finish
    } else {
        Finish::new(outcome.status(), &json, "", "")
    };

    if let Some(posted) = posted {
        // The worker-shaped callbacks went out as the turn ran; the record keeps how the
        // terminal one went (none is due when there was nothing to say).
        for (elapsed, attempts) in &posted.timings {
            let attempts = u64::from(*attempts);
            broker_core::metrics::observe(&mut figures, "callback", "chat_callback", *elapsed);
            broker_core::metrics::observe(
                &mut figures,
                "callback_attempts",
                "chat_callback",
                attempts,
            );
        }
        if let Some(terminal) = &posted.terminal {
            let delivery = if terminal.delivered {
                "delivered"
            } else {
                "failed"
            };
            finish.fields.push(("callback".into(), delivery.into()));
            finish
                .fields
                .push(("callback_attempts".into(), terminal.attempts.to_string()));
        }
        dead_entries.extend(posted.dead);
    } else if claimed.mode == Mode::Callback.as_str() && !claimed.callback_url.is_empty() {
        let payload = callback_payload(claimed, conversation, &outcome);
        let mut hard_stop = shared.hard_stop.clone();
        let started = std::time::Instant::now();
        let extra = broker_core::callback::Extra {
            engine_token: None,
            traceparent: traceparent(claimed),
        };
        let delivery = shared
            .callbacks
            .deliver_with(
                &claimed.callback_url,
                &message_id,
                &payload,
                extra,
                broker_core::callback::Retries::Broker,
                crate::flag_set(&mut hard_stop),
            )
            .await;
        let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let attempts = u64::from(delivery.attempts);
        broker_core::metrics::observe(&mut figures, "callback", "callback", elapsed);
        broker_core::metrics::observe(&mut figures, "callback_attempts", "callback", attempts);
        finish.fields.push((
            "callback".into(),
            if delivery.delivered {
                "delivered"
            } else {
                "failed"
            }
            .into(),
        ));
        finish
            .fields
            .push(("callback_attempts".into(), delivery.attempts.to_string()));
        if delivery.delivered {
            tracing::info!(attempts = delivery.attempts, "callback delivered");
        } else {
            let error = delivery.last_error.unwrap_or_default();
            tracing::warn!(attempts = delivery.attempts, %error, "callback not delivered; recorded in the dead list");
            dead_entries.push(
                serde_json::json!({
                    "kind": "callback",
                    "message_id": message_id,
                    "conversation": conversation.as_str(),
                    "callback_url": claimed.callback_url,
                    "webhook_id": message_id,
                    "payload": serde_json::from_slice::<Value>(&payload).unwrap_or(Value::Null),
                    "last_error": error,
                    "attempts": delivery.attempts,
                    "at": now_ms(),
                })
                .to_string(),
            );
        }
    }
    finish.fields.extend(figures);
    finish.dead_entries = dead_entries;
    finish.reply.clone_from(&claimed.reply);

    // Finished together with the other turns that end in this pass of the runtime.
    let turn = Arc::new(TurnEnd {
        conversation: conversation.clone(),
        message_id,
        lease: lease.to_owned(),
        finish,
    });
    let stored =
        until_stopped(shared, || {
            let turn = turn.clone();
            async move {
                shared.finisher.call(turn).await.unwrap_or_else(|| {
                    Err(QueueError::Protocol("the finisher gave no answer".into()))
                })
            }
        })
        .await;
    match stored {
        Some(Finished::Done { left }) => tracing::info!(status = outcome.status(), queue_wait_ms, processing_ms, left, "turn finished"),
        Some(Finished::Stale) => tracing::warn!("turn finished but its lease was gone (reaped or released, or an earlier try already stored the outcome): nothing stored"),
        None => tracing::warn!("could not store the outcome before the hard stop: the message will run again"),
    }
}

/// Retries a Redis operation until it succeeds, or returns `None` at the hard stop.
async fn until_stopped<T, F, Fut>(shared: &Shared, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, QueueError>>,
{
    let mut hard_stop = shared.hard_stop.clone();
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(value) => return Some(value),
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, attempt = failures, "redis operation failed; retrying");
                let delay = backoff(Duration::from_millis(100), Duration::from_secs(2), failures);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = crate::flag_set(&mut hard_stop) => return None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The callback body as it was built before: the outcome as a `serde_json::Map`, the
    /// client's fields inserted, serialised.
    fn through_a_map(claimed: &Claimed, conversation: &Conversation, outcome: &Outcome) -> Vec<u8> {
        let mut body = match serde_json::to_value(outcome) {
            Ok(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let status = match outcome {
            Outcome::Completed { .. } => "completed",
            Outcome::Failed { .. } => "error",
        };
        body.insert("status".into(), Value::from(status));
        body.insert("user_id".into(), Value::from(claimed.user_id.as_str()));
        body.insert("conversation".into(), Value::from(conversation.as_str()));
        let client_message_id = if claimed.client_message_id.is_empty() {
            Value::Null
        } else {
            Value::from(claimed.client_message_id.as_str())
        };
        body.insert("client_message_id".into(), client_message_id);
        serde_json::to_vec(&Value::Object(body)).expect("serialise")
    }

    #[test]
    fn the_callback_body_is_the_one_a_map_would_write() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        texts.extend(["", "plain", "é\"ü\u{1f}✓", "a\\b\n"].map(str::to_owned));
        for (i, text) in texts.iter().enumerate() {
            let claimed = Claimed {
                message_id: "m".into(),
                attempts: 1,
                body: String::new(),
                enqueued_at: 0,
                started_at: 0,
                reply: String::new(),
                mode: "callback".into(),
                user_id: text.clone(),
                client_message_id: if i % 2 == 0 {
                    String::new()
                } else {
                    text.clone()
                },
                callback_url: "https://example.org/cb".into(),
                front: String::new(),
                progress: String::new(),
                traceparent: String::new(),
            };
            let conversation = Conversation::from_key(format!("user:org:{text}"));
            let optional = (i % 3 != 0).then(|| text.clone());
            let outcomes = [
                Outcome::Completed {
                    message_id: text.clone(),
                    responses: (0..i % 3).map(|_| text.clone()).collect(),
                    response_language: optional.clone(),
                    voice_audio_url: optional.clone(),
                    attachments: (i % 2 == 0).then(|| json!({"b": [text], "a": null})),
                    voice_audio_base64: optional,
                    queue_wait_ms: i as u64,
                    processing_ms: u64::MAX,
                },
                Outcome::Failed {
                    message_id: text.clone(),
                    failure: Failure::new(400 + i as u16, text, text, text.clone()),
                    queue_wait_ms: 3,
                    processing_ms: i as u64,
                },
            ];
            for outcome in outcomes {
                assert_eq!(
                    String::from_utf8(callback_payload(&claimed, &conversation, &outcome)),
                    String::from_utf8(through_a_map(&claimed, &conversation, &outcome)),
                    "{outcome:?}"
                );
            }
        }
    }
}
