//! The admin API, `/admin/v1/` (docs/design.md §10): what operators read and change. Its keys
//! are `BROKER_ADMIN_KEYS` (checked by `guard`; client keys are refused there), and every
//! action that changes something is logged with the name of the key that asked.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use broker_core::callback::{Extra, Retries};
use broker_core::queue::{Redriven, StateFilter};
use broker_proto::{Conversation, Front};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// The name of the admin key a request authenticated with.
#[derive(Debug, Clone)]
pub struct AdminName(pub String);

/// The longest a redriven callback is retried while the operator waits.
const REDRIVE_BUDGET: Duration = Duration::from_secs(15);

fn admin(req: &HttpRequest) -> String {
    req.extensions()
        .get::<AdminName>()
        .map_or_else(|| "unknown".to_owned(), |a| a.0.clone())
}

type Query = web::Query<HashMap<String, String>>;

/// Refuses query parameters other than `known`.
fn only(query: &Query, known: &[&str]) -> Result<(), ApiError> {
    let unknown: Vec<String> = query
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("`{k}`"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "unknown query parameter(s) {}; this route takes {}",
            unknown.join(", "),
            known.join(", ")
        )))
    }
}

fn limit(query: &Query, default: usize) -> Result<usize, ApiError> {
    match query.get("limit") {
        None => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| ApiError::Invalid("limit: must be a number from 1 to 10000".into())),
    }
}

/// A conversation key from the path: `user:<org>:<user>` or `group:<org>:<chat>[:<thread>]`.
fn conversation(path: &str) -> Result<Conversation, ApiError> {
    let valid = (path.starts_with("user:") || path.starts_with("group:"))
        && path.len() <= 600
        && !path.chars().any(char::is_control);
    if valid {
        Ok(Conversation::from_key(path.to_owned()))
    } else {
        Err(ApiError::Invalid(
            "conversation: must be a conversation key, like user:<org>:<user_id> or group:<org>:<chat_id>"
                .into(),
        ))
    }
}

/// `GET /admin/v1/conversations?state=waiting|running|held|any&limit=N`.
pub async fn conversations(
    query: Query,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    only(&query, &["state", "limit"])?;
    let filter = match query.get("state") {
        None => StateFilter::Waiting,
        Some(s) => StateFilter::parse(s).ok_or_else(|| {
            ApiError::Invalid("state: must be waiting, running, held or any".into())
        })?,
    };
    let limit = limit(&query, 100)?;
    let list = state.queue.conversations(filter, limit).await?;
    Ok(
        HttpResponse::Ok()
            .json(json!({"conversations": list, "now": broker_core::clock::now_ms()})),
    )
}

/// `GET /admin/v1/conversations/{conversation}`.
pub async fn conversation_detail(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let conv = conversation(&path)?;
    let detail = state.queue.conversation_detail(&conv).await?;
    Ok(HttpResponse::Ok()
        .json(json!({"conversation": detail, "now": broker_core::clock::now_ms()})))
}

/// `POST /admin/v1/conversations/{conversation}/hold`.
pub async fn hold(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let conv = conversation(&path)?;
    let by = admin(&req);
    let newly = state.queue.hold(&conv, &by).await?;
    tracing::info!(admin = %by, action = "hold", conversation = conv.as_str(), newly, "admin action");
    Ok(HttpResponse::Ok().json(json!({"conversation": conv.as_str(), "held": true})))
}

/// `POST /admin/v1/conversations/{conversation}/resume`.
pub async fn resume(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let conv = conversation(&path)?;
    let by = admin(&req);
    let was = state.queue.resume(&conv).await?;
    tracing::info!(admin = %by, action = "resume", conversation = conv.as_str(), was_held = was, "admin action");
    Ok(HttpResponse::Ok()
        .json(json!({"conversation": conv.as_str(), "held": false, "was_held": was})))
}

/// `POST /admin/v1/drainers/pause`.
pub async fn pause_drainers(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let by = admin(&req);
    state.queue.pause_drainers(&by).await?;
    tracing::info!(admin = %by, action = "pause drainers", "admin action");
    Ok(HttpResponse::Ok().json(json!({"paused": true})))
}

/// `POST /admin/v1/drainers/resume`.
pub async fn resume_drainers(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let by = admin(&req);
    let was = state.queue.resume_drainers().await?;
    tracing::info!(admin = %by, action = "resume drainers", was_paused = was, "admin action");
    Ok(HttpResponse::Ok().json(json!({"paused": false, "was_paused": was})))
}

/// `GET /admin/v1/drainers`: the drainers with their heartbeat's age, and the pause.
pub async fn drainers(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let beats = state.queue.drainer_beats().await?;
    let operations = state.queue.operations().await?;
    Ok(HttpResponse::Ok().json(json!({
        "drainers": beats,
        "dead_after_ms": state.dead_after.as_millis() as u64,
        "paused": operations.paused,
    })))
}

/// `GET /admin/v1/messages/{id}`: the whole record.
pub async fn message(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    crate::routes::check_message_id(&id)?;
    let record = state
        .queue
        .message_full(&id)
        .await?
        .ok_or_else(|| ApiError::no_message(&id))?;
    Ok(HttpResponse::Ok().json(record))
}

/// `GET /admin/v1/messages?client_message_id=…&conversation=…`, or `?user=…[&org=…]` (the
/// user's private conversation), or `?conversation=…` alone: the messages found.
pub async fn find_messages(
    query: Query,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    only(
        &query,
        &["client_message_id", "conversation", "user", "org"],
    )?;
    let conv = match (query.get("conversation"), query.get("user")) {
        (Some(c), None) => conversation(c)?,
        (None, Some(user)) if !user.is_empty() && !user.chars().any(char::is_control) => {
            let org = query.get("org").unwrap_or(&state.api.default_org);
            Conversation::from_key(format!("user:{org}:{user}"))
        }
        _ => {
            return Err(ApiError::Invalid(
                "give conversation (with client_message_id to find one message) or user".into(),
            ))
        }
    };
    let ids: Vec<String> = match query.get("client_message_id") {
        Some(cmid) => state
            .queue
            .find_by_client_message_id(&conv, cmid)
            .await?
            .into_iter()
            .collect(),
        None => state
            .queue
            .conversation_detail(&conv)
            .await?
            .messages
            .into_iter()
            .map(|m| m.message_id)
            .collect(),
    };
    let mut found = Vec::new();
    for id in ids {
        if let Some(record) = state.queue.message_full(&id).await? {
            found.push(record);
        }
    }
    Ok(HttpResponse::Ok().json(json!({"conversation": conv.as_str(), "messages": found})))
}

fn kind(query: &Query) -> Result<Option<String>, ApiError> {
    match query.get("kind").map(String::as_str) {
        None => Ok(None),
        Some(k @ ("message" | "callback")) => Ok(Some(k.to_owned())),
        Some(_) => Err(ApiError::Invalid(
            "kind: must be message or callback".into(),
        )),
    }
}

/// `GET /admin/v1/dead?kind=message|callback&limit=N`: newest first.
pub async fn dead(query: Query, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    only(&query, &["kind", "limit"])?;
    let kind = kind(&query)?;
    let entries = state
        .queue
        .dead_entries(kind.as_deref(), None, limit(&query, 100)?)
        .await?;
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(id, mut entry, _)| {
            entry["entry"] = Value::String(id);
            entry
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"entries": entries})))
}

/// `POST /admin/v1/dead/{entry}/redrive`.
pub async fn redrive_one(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let wanted = path.into_inner();
    let entries = state.queue.dead_entries(None, None, usize::MAX).await?;
    let Some((id, entry, raw)) = entries.into_iter().find(|(id, _, _)| *id == wanted) else {
        return Err(ApiError::NotFound(format!("no dead-list entry {wanted}")));
    };
    let by = admin(&req);
    let result = redrive(&state, &id, &entry, &raw).await?;
    tracing::info!(admin = %by, action = "redrive", entry = %id, result = %result, "admin action");
    let status = if result["redriven"] == true {
        actix_web::http::StatusCode::OK
    } else {
        actix_web::http::StatusCode::CONFLICT
    };
    Ok(HttpResponse::build(status).json(result))
}

/// `POST /admin/v1/dead/redrive?since=<ms>&kind=…`: every entry since then, oldest first.
pub async fn redrive_all(
    req: HttpRequest,
    query: Query,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    only(&query, &["since", "kind"])?;
    let since = match query.get("since") {
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            ApiError::Invalid("since: must be a time in ms since the epoch".into())
        })?),
        None => None,
    };
    let kind = kind(&query)?;
    let mut entries = state
        .queue
        .dead_entries(kind.as_deref(), since, usize::MAX)
        .await?;
    // The list is newest first: oldest first keeps a conversation's order.
    entries.reverse();
    let by = admin(&req);
    let mut results = Vec::new();
    for (id, entry, raw) in &entries {
        let result = redrive(&state, id, entry, raw).await?;
        tracing::info!(admin = %by, action = "redrive", entry = %id, result = %result, "admin action");
        results.push(result);
    }
    let redriven = results.iter().filter(|r| r["redriven"] == true).count();
    Ok(HttpResponse::Ok()
        .json(json!({"redriven": redriven, "of": results.len(), "results": results})))
}

/// Redrives one dead-list entry: a message back to the head of its conversation, a callback
/// delivered again (signed afresh, same `webhook-id`).
async fn redrive(state: &AppState, id: &str, entry: &Value, raw: &str) -> Result<Value, ApiError> {
    let message_id = entry["message_id"].as_str().unwrap_or_default();
    if entry["kind"] == "callback" {
        return redeliver(state, id, entry, raw, message_id).await;
    }
    let result = state.queue.redrive_message(message_id, raw).await?;
    Ok(match result {
        Redriven::Queued { position } => {
            json!({"entry": id, "redriven": true, "message_id": message_id, "queue_position": position})
        }
        Redriven::Absent => {
            json!({"entry": id, "redriven": false, "message_id": message_id, "reason": "the message record is gone (expired); the entry was removed"})
        }
        Redriven::NotFailed(status) => {
            json!({"entry": id, "redriven": false, "message_id": message_id, "reason": format!("the message is {status}, not failed")})
        }
        Redriven::NoBody => {
            json!({"entry": id, "redriven": false, "message_id": message_id, "reason": "the message's request is no longer kept"})
        }
    })
}

async fn redeliver(
    state: &AppState,
    id: &str,
    entry: &Value,
    raw: &str,
    message_id: &str,
) -> Result<Value, ApiError> {
    let url = entry["callback_url"].as_str().unwrap_or_default();
    let webhook_id = entry["webhook_id"].as_str().unwrap_or(message_id);
    let payload = entry["payload"].to_string();
    // A worker-shaped callback carries its client's key in X-Engine-Token again.
    let front = state
        .queue
        .message_full(message_id)
        .await?
        .and_then(|r| r.get("front").cloned())
        .and_then(|f| serde_json::from_value::<Front>(f).ok());
    let token = front
        .as_ref()
        .and_then(|f| f.key.as_deref())
        .and_then(|name| state.auth.key_of(name));
    let retries = if front.is_some_and(|f| f.callback.is_some()) {
        Retries::Worker { unsure: true }
    } else {
        Retries::Broker
    };
    let delivery = state
        .redriver
        .deliver_with(
            url,
            webhook_id,
            payload.as_bytes(),
            Extra {
                engine_token: token.as_deref(),
                traceparent: None,
            },
            retries,
            tokio::time::sleep(REDRIVE_BUDGET),
        )
        .await;
    if delivery.delivered {
        state.queue.drop_dead(raw).await?;
        state
            .queue
            .callback_redelivered(message_id, delivery.attempts)
            .await?;
        Ok(
            json!({"entry": id, "redriven": true, "message_id": message_id, "attempts": delivery.attempts}),
        )
    } else {
        Ok(
            json!({"entry": id, "redriven": false, "message_id": message_id, "attempts": delivery.attempts,
                  "reason": delivery.last_error.unwrap_or_default()}),
        )
    }
}

/// `GET /admin/v1/overview`: what the console shows at a glance: the counters, the
/// histograms, the queue figures, the drainers and the pause.
pub async fn overview(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let stats = state.queue.stats().await?;
    let health = state.queue.health(state.dead_after).await?;
    let operations = state.queue.operations().await?;
    let beats = state.queue.drainer_beats().await?;
    // The oldest waiting message, from the head of the ranking.
    let oldest_waiting_at = state
        .queue
        .conversations(StateFilter::Waiting, 1)
        .await?
        .first()
        .and_then(|c| c.oldest_waiting_at);
    let histograms: Vec<Value> = broker_core::metrics::read_histograms(&stats)
        .into_iter()
        .map(|(name, label, h)| {
            let buckets: Vec<Value> = h
                .buckets
                .iter()
                .map(|(le, n)| json!([if le.is_finite() { json!(le) } else { json!("+Inf") }, n]))
                .collect();
            json!({"name": name, "label": label, "count": h.count, "sum": h.sum, "buckets": buckets})
        })
        .collect();
    let counters: HashMap<&String, &i64> =
        stats.iter().filter(|(k, _)| !k.starts_with("h:")).collect();
    Ok(HttpResponse::Ok().json(json!({
        "now": broker_core::clock::now_ms(),
        "counters": counters,
        "histograms": histograms,
        "active_queues": health.active_queues,
        "processing": health.processing,
        "queued": health.queued,
        "drainers_alive": health.drainers_alive,
        "drainers": beats,
        "paused": operations.paused,
        "held": operations.held,
        "oldest_enqueued_at": operations.oldest_enqueued_at,
        "oldest_waiting_at": oldest_waiting_at,
    })))
}
