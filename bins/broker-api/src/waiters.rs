//! Sync waiters: one pub/sub subscription per API process, shared by every waiting request.
//!
//! The finish script publishes `<message id>\n<outcome JSON>` on this process's reply
//! channel. Pub/sub is at-most-once, so a waiter also re-reads its message record on a slow
//! timer and whenever the subscription is (re)established.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};

/// The requests waiting for one message: a token per request, and where to send the outcome.
type Pending = HashMap<String, Vec<(u64, oneshot::Sender<String>)>>;

/// Waiters of this process, keyed by message id.
pub struct Waiters {
    channel: String,
    /// Several requests may wait for one message (a repeated `client_message_id`).
    pending: Mutex<Pending>,
    next_token: std::sync::atomic::AtomicU64,
    /// Bumped on every (re)subscription: waiters re-read their record when it changes.
    generation: watch::Sender<u64>,
    connected: AtomicBool,
}

/// A registered waiter; unregisters itself when dropped (the client may go away).
pub struct Waiter {
    waiters: Arc<Waiters>,
    message_id: String,
    token: u64,
    pub outcome: oneshot::Receiver<String>,
    pub resubscribed: watch::Receiver<u64>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.waiters.pending.lock() {
            if let Some(list) = pending.get_mut(&self.message_id) {
                list.retain(|(token, _)| *token != self.token);
                if list.is_empty() {
                    pending.remove(&self.message_id);
                }
            }
        }
    }
}

impl Waiters {
    pub fn new(channel: String) -> Arc<Self> {
        Arc::new(Self {
            channel,
            pending: Mutex::new(HashMap::new()),
            next_token: std::sync::atomic::AtomicU64::new(0),
            generation: watch::channel(0).0,
            connected: AtomicBool::new(false),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn waiting(&self) -> usize {
        self.pending
            .lock()
            .map(|p| p.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    /// Registers interest in a message's outcome before it is enqueued.
    pub fn register(self: &Arc<Self>, message_id: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut pending) = self.pending.lock() {
            pending
                .entry(message_id.to_owned())
                .or_default()
                .push((token, tx));
        }
        Waiter {
            waiters: self.clone(),
            message_id: message_id.to_owned(),
            token,
            outcome: rx,
            resubscribed: self.generation.subscribe(),
        }
    }

    fn deliver(&self, payload: &str) {
        let Some((message_id, outcome)) = payload.split_once('\n') else {
            tracing::warn!("reply without a message id");
            return;
        };
        let senders = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(message_id));
        for (_, sender) in senders.into_iter().flatten() {
            let _ = sender.send(outcome.to_owned());
        }
    }

    /// Keeps the subscription up, reconnecting with back-off, until `stop` is set.
    pub async fn run(self: Arc<Self>, client: redis::Client, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.subscribe_once(&client, &mut stop).await {
                Ok(()) => return,
                Err(e) => {
                    self.connected.store(false, Ordering::SeqCst);
                    failures += 1;
                    tracing::warn!(error = %e, "reply subscription lost; reconnecting");
                }
            }
            let delay = broker_core::worker::backoff(
                Duration::from_millis(100),
                Duration::from_secs(2),
                failures,
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn subscribe_once(
        &self,
        client: &redis::Client,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
        pubsub
            .subscribe(&self.channel)
            .await
            .map_err(|e| e.to_string())?;
        self.connected.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(channel = %self.channel, "subscribed for replies");
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => match message.get_payload::<String>() {
                        Ok(payload) => self.deliver(&payload),
                        Err(e) => tracing::warn!(error = %e, "unreadable reply"),
                    },
                    None => return Err("connection closed".into()),
                },
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}
