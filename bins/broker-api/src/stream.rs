//! SSE to clients (design §4): a message's recorded frames, from the start or from
//! `Last-Event-ID`, then live until its one terminal frame.
//!
//! Frames are read from the message's Redis stream, so any API process serves any message and
//! a reconnecting client misses nothing. Each frame goes out as the worker framed it
//! (`data: <compact JSON>` and a blank line, LF only) with an `id:` line for resuming; a
//! `{"type":"keepalive"}` frame without an id goes out after every quiet period.

use std::convert::Infallible;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use broker_core::queue::Mode;

use crate::error::ApiError;
use crate::AppState;

/// Frames read from Redis per round trip.
const BATCH: usize = 256;

const KEEPALIVE: &str = "data: {\"type\":\"keepalive\"}\n\n";

/// `GET /api/v1/stream?message_id=…` (`user_id` accepted for older clients).
pub async fn get_stream(
    req: HttpRequest,
    query: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.check(&req)?;
    let mut problems = Vec::new();
    for name in query.keys() {
        if !["message_id", "user_id"].contains(&name.as_str()) {
            problems.push(format!("unknown query parameter `{name}`"));
        }
    }
    let message_id = query.get("message_id").cloned().unwrap_or_default();
    if message_id.is_empty() {
        problems.push("message_id: required".into());
    } else if let Err(e) = crate::routes::check_message_id(&message_id) {
        problems.push(e.to_string());
    }
    let after = match last_event_id(&req) {
        Ok(after) => after,
        Err(e) => {
            problems.push(e);
            None
        }
    };
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems.join("; ")));
    }
    let record = state
        .queue
        .message_record(&message_id)
        .await?
        .ok_or_else(|| ApiError::no_message(&message_id))?;
    if let Some(user_id) = query.get("user_id") {
        if *user_id != record.user_id {
            // Same answer as an unknown id: a wrong user learns nothing about the message.
            return Err(ApiError::no_message(&message_id));
        }
    }
    if Mode::parse(&record.mode).is_some_and(|m| !m.records_events()) {
        return Err(ApiError::NotStreamable(format!(
            "message_id: message {message_id} was sent in {} mode, whose frames are not recorded; \
             only stream and async (Prefer: respond-async) messages can be streamed",
            record.mode
        )));
    }
    Ok(sse_response(state, message_id, after))
}

/// The `Last-Event-ID` header, if any: an id this API sent (`<ms>-<seq>`).
fn last_event_id(req: &HttpRequest) -> Result<Option<String>, String> {
    let Some(value) = req.headers().get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let valid = text.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    });
    if valid {
        Ok(Some(text.to_owned()))
    } else {
        Err("Last-Event-ID: must be an event id this API sent, like 1732000000000-0".into())
    }
}

/// A `200 text/event-stream` answer that serves `message_id`'s frames after `after`.
/// The frames are pumped by a task of their own; it ends when the client goes away, so a
/// disconnecting client changes nothing about the message.
pub fn sse_response(
    state: web::Data<AppState>,
    message_id: String,
    after: Option<String>,
) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    actix_web::rt::spawn(pump(state, message_id, after, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

async fn pump(
    state: web::Data<AppState>,
    message_id: String,
    mut after: Option<String>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut watch = state.waiters.watch(&message_id);
    let keepalive = state.api.sse_keepalive;
    let recheck = state.api.waiter_recheck.min(keepalive);
    let mut shutdown = state.shutdown.clone();
    let mut last_sent = Instant::now();
    loop {
        match state
            .queue
            .read_events(&message_id, after.as_deref(), BATCH)
            .await
        {
            Ok((events, status)) => {
                let full = events.len() == BATCH;
                let none = events.is_empty();
                for event in events {
                    let frame = format!("id: {}\ndata: {}\n\n", event.id, event.data);
                    if tx.send(Bytes::from(frame)).await.is_err() {
                        return;
                    }
                    last_sent = Instant::now();
                    if event.is_terminal() {
                        return;
                    }
                    after = Some(event.id);
                }
                if full {
                    continue;
                }
                if none {
                    match status.as_deref() {
                        // The record is gone (its result expired): nothing more will come.
                        None => {
                            let frame = format!(
                                "data: {}\n\n",
                                serde_json::json!({"type": "error", "error": "the message is unknown or its result expired", "code": "NOT_FOUND", "message_id": message_id})
                            );
                            let _ = tx.send(Bytes::from(frame)).await;
                            return;
                        }
                        // Finished, and its terminal frame was at or before Last-Event-ID.
                        Some("completed" | "failed" | "cancelled") => return,
                        Some(_) => {}
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, %message_id, "events not readable yet; retrying"),
        }
        tokio::select! {
            () = watch.notify.notified() => {}
            _ = watch.resubscribed.changed() => {}
            () = tokio::time::sleep_until(last_sent + keepalive) => {
                if tx.send(Bytes::from_static(KEEPALIVE.as_bytes())).await.is_err() {
                    return;
                }
                last_sent = Instant::now();
            }
            () = tokio::time::sleep(recheck) => {}
            // The client resumes on another API process with Last-Event-ID.
            _ = shutdown.changed() => return,
            () = tx.closed() => return,
        }
    }
}
