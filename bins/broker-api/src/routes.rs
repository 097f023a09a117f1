//! The HTTP handlers of the client API (v1) and `GET /health`.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use broker_core::queue::{Cancelled, Enqueued, MessageRecord, Mode, NewMessage, QueueError};
use broker_proto::{validate_request, ChatType, Conversation, Failure, Outcome, Route};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::error::{ApiError, WorkerError};
use crate::guard::KeyName;
use crate::stream::Framing;
use crate::waiters::Waiter;
use crate::AppState;

/// `POST /api/v1/message`.
///
/// Two phases: accepting (checks, body, enqueue) and, in sync mode, waiting for the
/// outcome. Nothing of the first is kept while waiting.
pub async fn post_message(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // Bound first: a temporary in the `match` would keep the finished future in the state.
    let accepted = accept(&req, payload, &state, Route::Message).await?;
    match accepted {
        Accepted::Respond(response) => Ok(response),
        Accepted::Wait {
            message_id,
            repeat,
            waiter,
        } => wait_for_outcome(&state, &message_id, repeat, waiter, Route::Message).await,
    }
}

/// `POST /api/v1/chat`, `/api/v1/chat/stream` and `/api/v1/chat/callback`: the worker's own
/// routes (docs/worker-contract.md §1.2), through the same per-conversation queues, answered
/// in the worker's shapes: `/chat` waits and answers `{"message_id", ...ChatResponse}`,
/// `/chat/stream` streams in the worker's framing, `/chat/callback` answers
/// `202 {"message_id"}` and the worker's progress callbacks follow.
pub async fn chat_route(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    route: Route,
) -> Result<HttpResponse, WorkerError> {
    let accepted = accept(&req, payload, &state, route).await?;
    match accepted {
        Accepted::Respond(response) => Ok(response),
        Accepted::Wait {
            message_id,
            repeat,
            waiter,
        } => Ok(wait_for_outcome(&state, &message_id, repeat, waiter, route).await?),
    }
}

/// What the accepting phase of `POST /api/v1/message` leaves to do.
enum Accepted {
    /// Answered already: an error, a `202`, or a stream.
    Respond(HttpResponse),
    /// A sync message is queued: wait for its outcome. `repeat` when it repeats an earlier
    /// `client_message_id`, whose original may have finished already.
    Wait {
        message_id: String,
        repeat: bool,
        waiter: Waiter,
    },
}

/// `Prefer` (RFC 7240), named once rather than on every request.
const PREFER: header::HeaderName = header::HeaderName::from_static("prefer");

/// A request's body, at most `limit` bytes. A body that comes as one chunk is used as it
/// is, not copied.
async fn read_body<P, E>(payload: &mut P, limit: usize) -> Result<web::Bytes, ApiError>
where
    P: futures_util::Stream<Item = Result<web::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    // The body as one chunk, until a second comes; then all of it joined.
    let mut whole = web::Bytes::new();
    let mut joined: Option<web::BytesMut> = None;
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::Invalid(format!("body: could not be read ({e})")))?;
        let read = joined.as_ref().map_or(whole.len(), web::BytesMut::len);
        if read + chunk.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "the body is larger than {limit} bytes"
            )));
        }
        match joined.as_mut() {
            Some(joined) => joined.extend_from_slice(&chunk),
            None if whole.is_empty() => whole = chunk,
            None => {
                let mut both = web::BytesMut::from(&whole[..]);
                both.extend_from_slice(&chunk);
                joined = Some(both);
            }
        }
    }
    Ok(joined.map_or(whole, web::BytesMut::freeze))
}

/// A request's body, within `BROKER_MAX_BODY_BYTES` and `BROKER_BODY_TIMEOUT_SECS`.
pub(crate) async fn read_body_in_time(
    payload: &mut web::Payload,
    state: &AppState,
) -> Result<web::Bytes, ApiError> {
    tokio::time::timeout(
        state.api.body_timeout,
        read_body(payload, state.api.max_body_bytes),
    )
    .await
    .map_err(|_| {
        ApiError::RequestTimeout(format!(
            "the body did not arrive within {} s",
            state.api.body_timeout.as_secs()
        ))
    })?
}

async fn accept(
    req: &HttpRequest,
    mut payload: web::Payload,
    state: &web::Data<AppState>,
    route: Route,
) -> Result<Accepted, ApiError> {
    let headers = req.headers();
    let wants_stream = header_has(headers, header::ACCEPT, "text/event-stream");
    let wants_async = header_has(headers, PREFER, "respond-async");
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        if !ct
            .as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type must be application/json, not {ct:?}"
            )));
        }
    }

    // Read the body (the key was checked before any of it was read), within its size limit
    // and its deadline.
    let body = read_body_in_time(&mut payload, state).await?;

    let mut request = validate_request(&body, route, &state.api.default_org, &state.limits)
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    if let Some(front) = &mut request.front {
        front.key = req.extensions().get::<KeyName>().map(|k| k.0.clone());
    }
    // A W3C trace context goes along with the message (an invalid one is ignored, as the
    // specification asks).
    request.traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| broker_proto::valid_traceparent(t))
        .map(str::to_owned);
    if let Some(trace_id) = request
        .traceparent
        .as_deref()
        .and_then(|t| t.split('-').nth(1))
    {
        tracing::Span::current().record("trace_id", trace_id);
    }
    let mode = if route.is_worker_route() {
        match route {
            Route::ChatStream => Mode::Stream,
            Route::ChatCallback => {
                let Some(policy) = &state.callbacks else {
                    return Err(ApiError::Invalid(
                        "progress_callback_url: callbacks are not enabled on this broker (BROKER_CALLBACK_SECRET is not set)"
                            .into(),
                    ));
                };
                let url = request.callback_url.as_deref().unwrap_or_default();
                policy
                    .check(url)
                    .await
                    .map_err(|e| ApiError::Invalid(format!("progress_{e}")))?;
                Mode::Callback
            }
            _ => Mode::Sync,
        }
    } else if let Some(url) = &request.callback_url {
        if wants_stream {
            return Err(ApiError::Invalid(
                "callback_url and Accept: text/event-stream ask for two delivery modes; use one"
                    .into(),
            ));
        }
        let Some(policy) = &state.callbacks else {
            return Err(ApiError::Invalid(
                "callback_url: callbacks are not enabled on this broker (BROKER_CALLBACK_SECRET is not set)"
                    .into(),
            ));
        };
        policy.check(url).await.map_err(ApiError::Invalid)?;
        Mode::Callback
    } else if wants_stream {
        Mode::Stream
    } else if wants_async {
        Mode::Async
    } else {
        Mode::Sync
    };
    let message_id = uuid::Uuid::new_v4().to_string();
    // Register before enqueueing, so that a fast result cannot be published unheard. Sync
    // results and stream frames are announced on this process's reply channel.
    let waiter = (mode == Mode::Sync).then(|| state.waiters.register(&message_id));
    let mut watch = (mode == Mode::Stream).then(|| state.waiters.watch(&message_id, false));
    let reply =
        matches!(mode, Mode::Sync | Mode::Stream).then(|| state.waiters.channel().to_owned());
    // Enqueued together with the other messages this worker accepts in this pass.
    let message = Arc::new(NewMessage {
        request,
        message_id: message_id.clone(),
        mode,
        reply,
    });
    let enqueued = state
        .enqueuer
        .call(message.clone())
        .await
        .unwrap_or_else(|| Err(QueueError::Protocol("the enqueuer gave no answer".into())))?;
    let request = &message.request;
    tracing::Span::current().record("conversation", request.conversation.as_str());

    let (message_id, position, waiter) = match enqueued {
        Enqueued::Accepted { position, queued } => {
            // Text fields as `&str`: written as they are, without the formatting machinery.
            // The conversation is in the request's context (its `span`), recorded above.
            tracing::info!(
                message_id = message_id.as_str(),
                position,
                mode = mode.as_str(),
                "message accepted"
            );
            if let (Some(watch), Some(queued)) = (watch.take(), queued) {
                return Ok(Accepted::Respond(crate::stream::sse_response(
                    state.clone(),
                    message_id,
                    crate::stream::After::First(queued),
                    watch,
                    Framing::of(route),
                )));
            }
            if route == Route::ChatCallback {
                return Ok(Accepted::Respond(
                    HttpResponse::Accepted().json(json!({"message_id": message_id})),
                ));
            }
            (message_id, Some(position), waiter)
        }
        Enqueued::Full { depth } => {
            return Err(ApiError::QueueFull {
                depth,
                retry_after_secs: state.api.queue_full_retry_after.as_secs().max(1),
            });
        }
        Enqueued::Duplicate { original } => {
            tracing::info!(message_id = %original, "repeated client_message_id: answering for the original");
            drop(waiter);
            let waiter = (mode == Mode::Sync).then(|| state.waiters.register(&original));
            (original, None, waiter)
        }
    };

    if mode == Mode::Stream {
        // A repeat (the original may run on any process): its frames from the start, as its
        // events channel announces them.
        drop(watch);
        let watch = state.waiters.watch(&message_id, true);
        return Ok(Accepted::Respond(crate::stream::sse_response(
            state.clone(),
            message_id,
            crate::stream::After::Id(None),
            watch,
            Framing::of(route),
        )));
    }
    match waiter {
        Some(waiter) => Ok(Accepted::Wait {
            message_id,
            repeat: position.is_none(),
            waiter,
        }),
        None => status_response(state, &message_id, position, StatusCode::ACCEPTED)
            .await
            .map(Accepted::Respond),
    }
}

/// The waiting phase of a sync `POST /api/v1/message`: the outcome, or a `202` when it does
/// not come within the sync timeout.
async fn wait_for_outcome(
    state: &AppState,
    message_id: &str,
    repeat: bool,
    mut waiter: Waiter,
    route: Route,
) -> Result<HttpResponse, ApiError> {
    let outcome_response = |id: &str, outcome: &str| outcome_response(id, outcome, route);
    // Without an outcome in time: where the message stands, or on the worker's `/chat` (which
    // has no such answer) the worker's timeout error.
    let pending = |id: &'_ str| {
        let id = id.to_owned();
        async move {
            if route == Route::Chat {
                return Ok(chat_timeout(state, &id));
            }
            status_response(state, &id, None, StatusCode::ACCEPTED).await
        }
    };
    // A duplicate's original may have finished already, or wait on another API process.
    let recheck = if repeat {
        Duration::from_millis(500)
    } else {
        state.api.waiter_recheck
    };
    if repeat {
        if let (_, Some(outcome)) = state.queue.outcome(message_id).await? {
            return Ok(outcome_response(message_id, &outcome));
        }
    }
    let deadline = tokio::time::Instant::now() + state.api.sync_timeout;
    let mut shutdown = state.shutdown.clone();
    loop {
        // One timer for both the recheck and the deadline.
        let wake = (tokio::time::Instant::now() + recheck).min(deadline);
        tokio::select! {
            outcome = &mut waiter.outcome => {
                if let Ok(outcome) = outcome {
                    return Ok(outcome_response(message_id, &outcome));
                }
                // The sender went away without an outcome: fall back to reading the record.
                if let (_, Some(outcome)) = state.queue.outcome(message_id).await? {
                    return Ok(outcome_response(message_id, &outcome));
                }
                return pending(message_id).await;
            }
            () = tokio::time::sleep_until(wake) => {
                if wake == deadline {
                    return pending(message_id).await;
                }
            }
            _ = waiter.resubscribed.changed() => {}
            _ = shutdown.changed() => {
                return pending(message_id).await;
            }
        }
        // Re-read the record: pub/sub may have dropped the reply.
        if let Ok((_, Some(outcome))) = state.queue.outcome(message_id).await {
            return Ok(outcome_response(message_id, &outcome));
        }
    }
}

/// `GET /api/v1/message/{id}`.
pub async fn get_message(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = message_id(path)?;
    let record = state
        .queue
        .message_record(&id)
        .await?
        .ok_or_else(|| ApiError::no_message(&id))?;
    Ok(HttpResponse::Ok().json(record_json(&record)))
}

/// `DELETE /api/v1/message/{id}`: cancels a message that is still queued (409 once running).
pub async fn delete_message(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = message_id(path)?;
    let outcome = Outcome::Failed {
        message_id: id.clone(),
        failure: Failure::new(
            409,
            "cancelled",
            "CANCELLED",
            "the message was cancelled before it ran",
        ),
        queue_wait_ms: 0,
        processing_ms: 0,
    };
    let json = outcome.to_json();
    let frame = json!({"type": "error", "error": "the message was cancelled before it ran", "code": "CANCELLED", "message_id": id}).to_string();
    match state
        .queue
        .cancel(&id, &json, &frame, state.api.result_ttl)
        .await?
    {
        Cancelled::Done => {
            tracing::info!(message_id = %id, "message cancelled");
            Ok(HttpResponse::Ok().json(json!({"status": "cancelled", "message_id": id})))
        }
        Cancelled::Absent => Err(ApiError::no_message(&id)),
        Cancelled::NotQueued { status } => Err(ApiError::Conflict(format!(
            "message {id} is {status}; only a queued message can be cancelled"
        ))),
    }
}

/// `GET /api/v1/queue/{user_id}` (query `org`, `chat_id`, `thread_id`).
pub async fn get_queue(
    path: web::Path<String>,
    query: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let user_id = path.into_inner();
    let mut problems = Vec::new();
    for (name, value) in query.iter() {
        if !["org", "chat_id", "thread_id"].contains(&name.as_str()) {
            problems.push(format!("unknown query parameter `{name}`"));
        } else if value.trim().is_empty()
            || value.chars().any(char::is_control)
            || value.chars().count() > 256
        {
            problems.push(format!(
                "{name}: must be 1 to 256 characters without control characters"
            ));
        }
    }
    if user_id.trim().is_empty()
        || user_id.chars().any(char::is_control)
        || user_id.chars().count() > state.limits.user_id
    {
        problems.push(format!(
            "user_id: must be 1 to {} characters without control characters",
            state.limits.user_id
        ));
    }
    if query.contains_key("thread_id") && !query.contains_key("chat_id") {
        problems.push("thread_id: only allowed together with chat_id".into());
    }
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems.join("; ")));
    }
    let org = query
        .get("org")
        .map(String::as_str)
        .unwrap_or(&state.api.default_org);
    let chat_type = if query.contains_key("chat_id") {
        ChatType::Group
    } else {
        ChatType::Private
    };
    let conversation = Conversation::for_chat(
        org,
        chat_type,
        &user_id,
        query.get("chat_id").map(String::as_str),
        query.get("thread_id").map(String::as_str),
    );
    let status = state
        .queue
        .queue_status(&conversation, state.api.max_queue_depth)
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user_id,
        "conversation": status.conversation,
        "queue_length": status.queue_length(),
        "is_processing": status.is_processing,
        "current_message_id": status.current_message_id,
        "message_ids": status.message_ids,
    })))
}

/// `GET /health`: unauthenticated, O(1) in the number of users; 503 when Redis is unreachable.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let version = env!("CARGO_PKG_VERSION");
    match state.queue.health(state.dead_after).await {
        Ok(figures) => {
            let status = if figures.drainers_alive > 0 {
                "healthy"
            } else {
                "degraded"
            };
            HttpResponse::Ok().json(json!({
                "status": status,
                "redis_connected": true,
                "drainers_alive": figures.drainers_alive,
                "active_queues": figures.active_queues,
                "messages_processing": figures.processing,
                "messages_queued": figures.queued,
                "sync_waiters": state.sync_waiters(),
                "reply_subscription": state.subscribed(),
                "version": version,
            }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "health: redis unreachable");
            HttpResponse::ServiceUnavailable().json(json!({
                "status": "unhealthy",
                "redis_connected": false,
                "drainers_alive": 0,
                "active_queues": 0,
                "messages_processing": 0,
                "version": version,
            }))
        }
    }
}

/// The answer for a route nobody serves.
pub(crate) fn no_route(req: &HttpRequest) -> ApiError {
    ApiError::NotFound(format!("no route for {} {}", req.method(), req.path()))
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            part.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(token))
        })
}

/// The prologue of the per-message routes (the key was checked by `guard`): the id's shape.
fn message_id(path: web::Path<String>) -> Result<String, ApiError> {
    let id = path.into_inner();
    check_message_id(&id)?;
    Ok(id)
}

pub(crate) fn check_message_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::Invalid(
            "message_id: must be up to 64 letters, digits or '-'".into(),
        ));
    }
    Ok(())
}

/// `/api/v1/chat`'s answer when the turn has not ended within the sync timeout: the worker's
/// timeout error. The turn goes on; its answer is kept (`GET /api/v1/message/{id}`).
fn chat_timeout(state: &AppState, message_id: &str) -> HttpResponse {
    HttpResponse::GatewayTimeout().json(json!({
        "error": "TimeoutError",
        "code": "TIMEOUT_ERROR",
        "message": format!(
            "The answer is taking longer than {} s. It is still being prepared and will be in the history.",
            state.api.sync_timeout.as_secs()
        ),
        "message_id": message_id,
    }))
}

/// The answer for a finished message: the stored outcome, or its error with its status; on
/// the worker's `/chat`, in its shape (`{"message_id", ...ChatResponse}`).
fn outcome_response(message_id: &str, outcome: &str, route: Route) -> HttpResponse {
    if route == Route::Chat {
        return chat_outcome_response(message_id, outcome);
    }
    if Outcome::is_completed_json(outcome) {
        return HttpResponse::Ok()
            .content_type("application/json")
            .body(outcome.to_owned());
    }
    match serde_json::from_str::<Outcome>(outcome) {
        Ok(Outcome::Completed { .. }) => HttpResponse::Ok()
            .content_type("application/json")
            .body(outcome.to_owned()),
        Ok(Outcome::Failed { failure, .. }) => {
            let status =
                StatusCode::from_u16(failure.http_status).unwrap_or(StatusCode::BAD_GATEWAY);
            HttpResponse::build(status).json(failure.body(message_id))
        }
        Err(e) => {
            tracing::error!(error = %e, %message_id, "stored outcome is unreadable");
            HttpResponse::InternalServerError().json(broker_proto::ErrorBody::new(
                "internal error",
                "INTERNAL_ERROR",
                "an internal error occurred",
            ))
        }
    }
}

/// [`outcome_response`] on the worker's `/chat`.
fn chat_outcome_response(message_id: &str, outcome: &str) -> HttpResponse {
    match serde_json::from_str::<Outcome>(outcome) {
        Ok(Outcome::Completed {
            responses,
            response_language,
            voice_audio_url,
            attachments,
            voice_audio_base64,
            ..
        }) => {
            let mut body = json!({
                "message_id": message_id,
                "responses": responses,
                "response_language": response_language,
                "voice_audio_base64": voice_audio_base64,
                "voice_audio_url": voice_audio_url,
            });
            if let Some(attachments) =
                attachments.filter(|a| a.as_array().is_some_and(|a| !a.is_empty()))
            {
                body["attachments"] = attachments;
            }
            HttpResponse::Ok().json(body)
        }
        Ok(Outcome::Failed { failure, .. }) => {
            let status =
                StatusCode::from_u16(failure.http_status).unwrap_or(StatusCode::BAD_GATEWAY);
            HttpResponse::build(status).json(json!({
                "error": failure.error,
                "code": failure.code,
                "message": failure.message,
                "message_id": message_id,
            }))
        }
        Err(e) => {
            tracing::error!(error = %e, %message_id, "stored outcome is unreadable");
            HttpResponse::InternalServerError().json(json!({"error": "Internal server error"}))
        }
    }
}

/// `202` with where the message stands and where to get its result.
async fn status_response(
    state: &AppState,
    message_id: &str,
    position: Option<u64>,
    code: StatusCode,
) -> Result<HttpResponse, ApiError> {
    let (status, queue_position) = match position {
        Some(p) => ("queued".to_owned(), Some(p)),
        None => match state.queue.message_record(message_id).await? {
            Some(record) => {
                if let Some(outcome) = record.outcome.as_deref() {
                    return Ok(outcome_response(message_id, outcome, Route::Message));
                }
                (record.status, record.queue_position)
            }
            None => ("unknown".to_owned(), None),
        },
    };
    let location = format!("/api/v1/message/{message_id}");
    let mut body = json!({
        "status": status,
        "message_id": message_id,
        "status_url": location,
    });
    if let Some(p) = queue_position {
        body["queue_position"] = json!(p);
    }
    Ok(HttpResponse::build(code)
        .insert_header((header::LOCATION, location))
        .json(body))
}

fn record_json(record: &MessageRecord) -> Value {
    let mut body = json!({
        "message_id": record.message_id,
        "status": record.status,
        "conversation": record.conversation,
        "user_id": record.user_id,
        "client_message_id": record.client_message_id,
        "attempts": record.attempts,
        "enqueued_at": record.enqueued_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
    });
    if let Some(p) = record.queue_position {
        body["queue_position"] = json!(p);
    }
    if let Some(delivery) = &record.callback {
        body["callback"] = json!({"status": delivery, "attempts": record.callback_attempts});
    }
    match record
        .outcome
        .as_deref()
        .map(serde_json::from_str::<Outcome>)
    {
        Some(Ok(Outcome::Completed { .. })) => {
            if let Ok(Value::Object(mut result)) =
                serde_json::from_str::<Value>(record.outcome.as_deref().unwrap_or("{}"))
            {
                result.remove("status");
                result.remove("message_id");
                body["result"] = Value::Object(result);
            }
        }
        Some(Ok(Outcome::Failed { failure, .. })) => {
            body["error"] = json!({
                "error": failure.error,
                "code": failure.code,
                "message": failure.message,
                "http_status": failure.http_status,
            });
        }
        Some(Err(_)) | None => {}
    }
    body
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_body_is_read_whole_within_its_limit() {
        use actix_web::web::Bytes;
        let read = |chunks: Vec<&'static str>, limit| async move {
            let mut stream = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, std::convert::Infallible>(Bytes::from_static(c.as_bytes()))),
            );
            super::read_body(&mut stream, limit).await
        };
        assert_eq!(
            read(vec!["{}"], 10).await.ok(),
            Some(Bytes::from_static(b"{}"))
        );
        assert_eq!(
            read(vec!["{\"a\"", ":", "1}"], 10).await.ok(),
            Some(Bytes::from_static(b"{\"a\":1}"))
        );
        assert_eq!(read(vec![], 10).await.ok(), Some(Bytes::new()));
        assert!(read(vec!["12345", "678901"], 10).await.is_err());
        assert!(read(vec!["12345678901"], 10).await.is_err());
    }
}
