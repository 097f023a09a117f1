//! The callbacks of a message sent to `POST /api/v1/chat/callback`, in the worker's own shape
//! (docs/worker-contract.md §1.6): its frames turned into `status`, `progress`, `complete`
//! and `error` callbacks by the `progress_mode` rules, posted one after the other, in order.
//!
//! Each carries `X-Engine-Token` (the key the client authenticated with) and the broker's
//! Standard Webhooks signature. A `progress` is posted at most once per turn: before it goes
//! out, the text it covers is noted in the message's record under the turn's lease, so a run
//! of the turn after a drainer crash skips it, and it is not repeated when its receiver may
//! have acted on it. `complete` and `error` are retried (the gateways drop a repeated
//! `complete`); whatever cannot be delivered goes to the dead list.

use broker_core::callback::{Delivery, Extra, Retries};
use broker_core::clock::now_ms;
use broker_proto::front::{CallbackFront, Progress};
use broker_proto::Conversation;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use broker_core::queue::Claimed;

use crate::Shared;

/// How the callbacks of a turn went.
#[derive(Debug, Default)]
pub(crate) struct Posted {
    /// The delivery of the `complete` or `error` callback, when one was due.
    pub terminal: Option<Delivery>,
    /// The worker sent an `error` frame (and its callback was handled).
    pub worker_error: bool,
    /// Dead-list entries of callbacks that could not be delivered.
    pub dead: Vec<String>,
    /// The lease was lost: nothing more may be posted for this run.
    pub stopped: bool,
    /// How long each callback took (ms) and its attempts, for the histograms.
    pub timings: Vec<(u64, u32)>,
    /// Callbacks posted in this run (the others' webhook ids count on from it).
    pub count: u32,
}

/// One turn's callbacks.
pub(crate) struct Poster<'a> {
    pub shared: &'a Shared,
    pub conversation: &'a Conversation,
    pub claimed: &'a Claimed,
    pub lease: &'a str,
    pub front: &'a CallbackFront,
    pub token: Option<String>,
    pub posted: Posted,
}

impl Poster<'_> {
    /// Posts the callbacks of the frames (the worker's JSON as sent) as they come, until the
    /// worker leg drops its end of the channel.
    pub(crate) async fn run(&mut self, mut frames: mpsc::UnboundedReceiver<String>) {
        let start = Instant::now();
        let mut rules = Progress::new(self.front.mode, self.front.throttle());
        rules.resume_after(self.claimed.progress.clone());
        loop {
            let due = rules.due().map(|d| start + d);
            let next = tokio::select! {
                frame = frames.recv() => frame,
                () = sleep_until(due) => {
                    let payloads = rules.tick(start.elapsed());
                    self.post_all(&rules, payloads).await;
                    continue;
                }
            };
            let Some(data) = next else { break };
            let Ok(frame) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if frame["type"] == "error" {
                self.posted.worker_error = true;
            }
            let payloads = rules.frame(&frame, start.elapsed());
            self.post_all(&rules, payloads).await;
        }
    }

    async fn post_all(&mut self, rules: &Progress, payloads: Vec<Value>) {
        for payload in payloads {
            self.post(rules.covered(), &payload).await;
        }
    }

    /// Posts one callback (a payload without the common fields). `covered` is the text the
    /// progress posted so far covers, noted before a `progress` goes out.
    pub(crate) async fn post(&mut self, covered: &str, payload: &Value) {
        if self.posted.stopped {
            return;
        }
        let kind = payload["type"].as_str().unwrap_or_default().to_owned();
        let progress = kind == "progress";
        if progress {
            match self
                .shared
                .queue
                .note_progress(
                    self.conversation,
                    &self.claimed.message_id,
                    self.lease,
                    covered,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the lease is gone: this turn posts no more callbacks");
                    self.posted.stopped = true;
                    return;
                }
                Err(e) => {
                    // Not noted, so not posted: a progress is posted at most once.
                    tracing::warn!(error = %e, "could not note a progress callback; it is skipped");
                    return;
                }
            }
        }
        let body = self.front.payload(payload, &timestamp()).to_string();
        self.posted.count += 1;
        // `webhook-id`: the terminal callback's is the same on every run of the turn (a
        // receiver may drop a repeat by it); the others' are this run's own.
        let id = &self.claimed.message_id;
        let webhook_id = match kind.as_str() {
            "complete" | "error" => format!("{id}.{kind}"),
            _ => format!("{id}.{}.{}", self.claimed.attempts, self.posted.count),
        };
        let mut hard_stop = self.shared.hard_stop.clone();
        let started = std::time::Instant::now();
        let delivery = self
            .shared
            .callbacks
            .deliver_with(
                &self.claimed.callback_url,
                &webhook_id,
                body.as_bytes(),
                Extra {
                    engine_token: self.token.as_deref(),
                    traceparent: crate::turn::traceparent(self.claimed),
                },
                Retries::Worker { unsure: !progress },
                crate::flag_set(&mut hard_stop),
            )
            .await;
        self.posted.timings.push((
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            delivery.attempts,
        ));
        if !delivery.delivered {
            let error = delivery.last_error.clone().unwrap_or_default();
            tracing::warn!(kind = kind.as_str(), attempts = delivery.attempts, %error, "callback not delivered; recorded in the dead list");
            self.posted.dead.push(
                serde_json::json!({
                    "kind": "callback",
                    "message_id": self.claimed.message_id,
                    "conversation": self.conversation.as_str(),
                    "callback_url": self.claimed.callback_url,
                    "webhook_id": webhook_id,
                    "payload": serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
                    "last_error": error,
                    "attempts": delivery.attempts,
                    "at": now_ms(),
                })
                .to_string(),
            );
        }
        if matches!(kind.as_str(), "complete" | "error") {
            self.posted.terminal = Some(delivery);
        }
    }
}

/// The key named `name` (the one the client authenticated with), for `X-Engine-Token`.
pub(crate) fn engine_token(shared: &Shared, name: Option<&str>) -> Option<String> {
    use secrecy::ExposeSecret;
    let name = name?;
    let key = shared.settings.api.keys.iter().find(|k| k.name == name);
    if key.is_none() {
        tracing::warn!(key = name, "the client's key is not configured on this drainer (BROKER_API_KEYS): its callbacks carry no X-Engine-Token");
    }
    key.map(|k| k.key.expose_secret().to_owned())
}

/// Sleeps until `due`, or for ever.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Now as the worker writes it (`Date.toISOString()`: UTC, milliseconds).
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_look_like_the_workers() {
        let t = super::timestamp();
        assert_eq!(t.len(), "2026-07-24T14:00:00.000Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
