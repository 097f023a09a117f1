//! One turn: claim the head message, run it at the worker, store and publish the outcome.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use broker_core::clock::now_ms;
use broker_core::queue::{Claim, Claimed, Finished, QueueError};
use broker_core::worker::{backoff, TurnResult};
use broker_proto::{Conversation, Failure, Outcome};
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::Shared;

/// Runs the turn of a conversation this drainer has just moved into its processing list.
pub(crate) async fn run(
    shared: Arc<Shared>,
    conversation: Conversation,
    permit: OwnedSemaphorePermit,
) {
    let span = tracing::info_span!("turn", conversation = %conversation, message_id = tracing::field::Empty);
    run_inner(&shared, &conversation).instrument(span).await;
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

async fn run_inner(shared: &Shared, conversation: &Conversation) {
    let lease = uuid::Uuid::new_v4().simple().to_string();
    let id = shared.id().to_owned();
    let Some(claim) = until_stopped(shared, || shared.queue.claim(&id, conversation, &lease)).await
    else {
        // Hard stop while Redis was unreachable: the entry stays in the processing list and
        // goes back to ready by reconcile or reap.
        return;
    };
    let claimed = match claim {
        Claim::Empty => return,
        Claim::Turn(c) => *c,
    };
    tracing::Span::current().record("message_id", claimed.message_id.as_str());
    tracing::debug!(attempt = claimed.attempts, "turn started");

    let limits = &shared.settings.drainer;
    let result = if claimed.attempts > limits.max_claims {
        TurnResult::Failed(Failure::new(
            503,
            "too many attempts",
            "RETRIES_EXHAUSTED",
            format!(
                "the message was started {} times without finishing",
                claimed.attempts - 1
            ),
        ))
    } else {
        let mut hard_stop = shared.hard_stop.clone();
        let mut on_frame = |_: &str| {};
        tokio::select! {
            result = shared.worker.run_turn(&claimed.body, &mut on_frame) => result,
            () = crate::flag_set(&mut hard_stop) => {
                // Grace period over: give the conversation back, keeping its place.
                match shared.queue.release(&id, conversation, Some(&lease)).await {
                    Ok(r) => tracing::warn!(released = ?r, "turn cut by shutdown; it will run again"),
                    Err(e) => tracing::warn!(error = %e, "could not release at shutdown; reap will"),
                }
                return;
            }
        }
    };
    finish(shared, conversation, &claimed, &lease, result).await;
}

async fn finish(
    shared: &Shared,
    conversation: &Conversation,
    claimed: &Claimed,
    lease: &str,
    result: TurnResult,
) {
    let finished_at = now_ms();
    let queue_wait_ms = claimed.started_at.saturating_sub(claimed.enqueued_at);
    let processing_ms = finished_at.saturating_sub(claimed.started_at);
    let message_id = claimed.message_id.clone();
    let (outcome, dead) = match result {
        TurnResult::Completed(response) => {
            let text = |field: &str| {
                response
                    .get(field)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let responses = response
                .get("responses")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let outcome = Outcome::Completed {
                message_id: message_id.clone(),
                responses,
                response_language: text("response_language"),
                voice_audio_url: text("voice_audio_url"),
                attachments: response
                    .get("attachments")
                    .filter(|a| !a.is_null())
                    .cloned(),
                voice_audio_base64: text("voice_audio_base64"),
                queue_wait_ms,
                processing_ms,
            };
            (outcome, None)
        }
        TurnResult::Failed(failure) => {
            tracing::warn!(code = %failure.code, status = failure.http_status, "turn failed");
            let dead = (failure.http_status >= 500).then(|| {
                serde_json::json!({
                    "kind": "message",
                    "message_id": message_id,
                    "conversation": conversation.as_str(),
                    "code": failure.code,
                    "message": failure.message,
                    "attempts": claimed.attempts,
                    "at": finished_at,
                })
                .to_string()
            });
            (
                Outcome::Failed {
                    message_id: message_id.clone(),
                    failure,
                    queue_wait_ms,
                    processing_ms,
                },
                dead,
            )
        }
    };
    let json = serde_json::to_string(&outcome).unwrap_or_default();
    let d = &shared.settings.drainer;
    let id = shared.id().to_owned();
    let stored = until_stopped(shared, || {
        shared.queue.finish(
            &id,
            conversation,
            &message_id,
            lease,
            outcome.status(),
            &json,
            d.result_ttl,
            dead.as_deref(),
            d.dead_list_max,
        )
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
