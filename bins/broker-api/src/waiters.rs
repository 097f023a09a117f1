//! One pub/sub connection per API process, shared by every waiting request.
//!
//! - Sync waiters: the finish script publishes `<message id>\n<outcome JSON>` on this
//!   process's reply channel, or, for the sync outcomes of a batch of turns, one message of
//!   `*\n` and those records, one after the other (see [`replies::split`]).
//! - Stream readers: each message's events have a channel of the same name as their stream
//!   key, on which the drainer publishes the id of every new frame. This process subscribes
//!   to it while at least one of its SSE clients reads that message.
//! - A stream message this process enqueued carries its reply channel too: the drainer
//!   publishes its new frames there, already as SSE, with the ids of the entry before them
//!   and of the last (`<message id>\n<outcome JSON or nothing>\n<before> <last>\n<SSE>`), so
//!   the reader of a `POST … Accept: text/event-stream` needs no subscription of its own, and
//!   reads the stream only when a batch does not follow on from what it sent.
//!
//! Pub/sub is at-most-once, so waiters and readers also re-read Redis on a slow timer and
//! whenever the subscription is (re)established.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::replies::{self, Batch};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch, Notify};

/// The requests waiting for one message: a token per request, and where to send the outcome.
type Pending = HashMap<String, Vec<(u64, oneshot::Sender<String>)>>;

/// SSE readers of one message: a token per reader and its inbox, and whether this process
/// subscribed to the message's events channel for them.
#[derive(Default)]
struct Readers {
    subscribed: bool,
    readers: Vec<(u64, Arc<Inbox>)>,
}

/// Batches a reader has not taken yet; beyond this many it reads the stream instead.
const INBOX_MAX: usize = 64;

/// Where one SSE reader is woken, with the frames the wake carried.
#[derive(Default)]
pub struct Inbox {
    pub notify: Notify,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    batches: Vec<Batch>,
    /// A wake came without its frames (or too many came): the stream must be read.
    incomplete: bool,
}

impl Inbox {
    fn put(&self, batch: Option<&Batch>) {
        if let Ok(mut held) = self.held.lock() {
            match batch {
                Some(batch) if held.batches.len() < INBOX_MAX => held.batches.push(batch.clone()),
                _ => {
                    held.batches.clear();
                    held.incomplete = true;
                }
            }
        }
        self.notify.notify_one();
    }

    /// The batches carried since the last take, oldest first, and whether anything was
    /// announced without its frames.
    pub fn take(&self) -> (Vec<Batch>, bool) {
        match self.held.lock() {
            Ok(mut held) => (
                std::mem::take(&mut held.batches),
                std::mem::take(&mut held.incomplete),
            ),
            Err(_) => (Vec::new(), true),
        }
    }
}

type Watched = HashMap<String, Readers>;

/// A change to the set of event channels, applied in order by the subscription task.
enum Command {
    Subscribe(String),
    Unsubscribe(String),
}

/// Waiters of this process, keyed by message id.
pub struct Waiters {
    channel: String,
    /// Event channels are this prefix followed by the message id.
    events_prefix: String,
    watched: Mutex<Watched>,
    commands: mpsc::UnboundedSender<Command>,
    commands_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
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
        let Ok(mut pending) = self.waiters.pending.lock() else {
            return;
        };
        if let Some(list) = pending.get_mut(&self.message_id) {
            list.retain(|(t, _)| *t != self.token);
            if list.is_empty() {
                pending.remove(&self.message_id);
            }
        }
    }
}

/// An SSE reader's interest in one message's events; unsubscribes when the last one goes.
pub struct EventWatch {
    waiters: Arc<Waiters>,
    message_id: String,
    token: u64,
    /// Woken when a new frame is announced (with its frames when the announcement carried
    /// them), or once the subscription is in place.
    pub inbox: Arc<Inbox>,
    pub resubscribed: watch::Receiver<u64>,
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let Ok(mut watched) = self.waiters.watched.lock() else {
            return;
        };
        let Some(entry) = watched.get_mut(&self.message_id) else {
            return;
        };
        entry.readers.retain(|(t, _)| *t != self.token);
        if entry.readers.is_empty() {
            let subscribed = entry.subscribed;
            watched.remove(&self.message_id);
            if subscribed {
                let _ = self
                    .waiters
                    .commands
                    .send(Command::Unsubscribe(self.message_id.clone()));
            }
        }
    }
}

impl Waiters {
    pub fn new(channel: String, events_prefix: String) -> Arc<Self> {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            channel,
            events_prefix,
            watched: Mutex::new(HashMap::new()),
            commands,
            commands_rx: Mutex::new(Some(commands_rx)),
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

    /// SSE readers on this process.
    pub fn readers(&self) -> usize {
        self.watched
            .lock()
            .map(|w| w.values().map(|r| r.readers.len()).sum())
            .unwrap_or(0)
    }

    /// Registers an SSE reader of a message's events. With `subscribe`, this process listens
    /// on the message's events channel while the reader lasts; without, the message must
    /// carry this process's reply channel, where the drainer announces its frames too.
    pub fn watch(self: &Arc<Self>, message_id: &str, subscribe: bool) -> EventWatch {
        let inbox = Arc::new(Inbox::default());
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let first = match self.watched.lock() {
            Ok(mut watched) => {
                let entry = watched.entry(message_id.to_owned()).or_default();
                entry.readers.push((token, inbox.clone()));
                let first = subscribe && !entry.subscribed;
                entry.subscribed |= subscribe;
                first
            }
            Err(_) => false,
        };
        if first {
            let _ = self
                .commands
                .send(Command::Subscribe(message_id.to_owned()));
        }
        EventWatch {
            waiters: self.clone(),
            message_id: message_id.to_owned(),
            token,
            inbox,
            resubscribed: self.generation.subscribe(),
        }
    }

    /// Wakes the message's readers, handing each the frames that woke them, if any.
    fn wake(&self, message_id: &str, batch: Option<&Batch>) {
        if let Ok(watched) = self.watched.lock() {
            for (_, inbox) in watched.get(message_id).into_iter().flat_map(|r| &r.readers) {
                inbox.put(batch);
            }
        }
    }

    fn route(&self, channel: &str, payload: String) {
        if channel == self.channel {
            match replies::split(&payload) {
                Some(replies) => replies.for_each(|reply| self.deliver(reply)),
                None => self.deliver(&payload),
            }
        } else if let Some(message_id) = channel.strip_prefix(&self.events_prefix) {
            self.wake(message_id, None);
        }
    }

    /// A reply: `<message id>\n<outcome JSON>` when the message finished, `<message id>\n`
    /// and nothing when a stream message got new frames; either followed by a carried batch
    /// (see [`replies::read`]). Either wakes the message's readers.
    fn deliver(&self, payload: &str) {
        let Some((message_id, outcome, batch)) = replies::read(payload) else {
            tracing::warn!("reply without a message id");
            return;
        };
        self.wake(message_id, batch.as_ref());
        if outcome.is_empty() {
            return;
        }
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
        let Some(mut commands) = self.commands_rx.lock().ok().and_then(|mut c| c.take()) else {
            tracing::error!("the subscription task was started twice");
            return;
        };
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            match self.subscribe_once(&client, &mut stop, &mut commands).await {
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
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), String> {
        let pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
        let (mut sink, mut messages) = pubsub.split();
        let mut channels = vec![self.channel.clone()];
        if let Ok(watched) = self.watched.lock() {
            channels.extend(
                watched
                    .iter()
                    .filter(|(_, r)| r.subscribed)
                    .map(|(id, _)| self.events_channel(id)),
            );
        }
        sink.subscribe(&channels).await.map_err(|e| e.to_string())?;
        self.connected.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(channel = %self.channel, streams = channels.len() - 1, "subscribed for replies and events");
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => match message.get_payload::<String>() {
                        Ok(payload) => self.route(message.get_channel_name(), payload),
                        Err(e) => tracing::warn!(error = %e, "unreadable pub/sub message"),
                    },
                    None => return Err("connection closed".into()),
                },
                Some(command) = commands.recv() => match command {
                    Command::Subscribe(id) => {
                        let watched = self.subscribed(&id);
                        if watched {
                            sink.subscribe(self.events_channel(&id)).await.map_err(|e| e.to_string())?;
                            // Frames may have come before the subscription: readers re-read.
                            self.wake(&id, None);
                        }
                    }
                    Command::Unsubscribe(id) => {
                        let watched = self.subscribed(&id);
                        if !watched {
                            sink.unsubscribe(self.events_channel(&id)).await.map_err(|e| e.to_string())?;
                        }
                    }
                },
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    /// Does a reader of this message still want its events channel?
    fn subscribed(&self, message_id: &str) -> bool {
        self.watched
            .lock()
            .is_ok_and(|w| w.get(message_id).is_some_and(|r| r.subscribed))
    }

    fn events_channel(&self, message_id: &str) -> String {
        format!("{}{message_id}", self.events_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_waiter_of_a_batch_of_outcomes_gets_its_own() {
        let waiters = Waiters::new("bt:reply:api-0".into(), "bt:events:".into());
        let mut first = waiters.register("m1");
        let mut second = waiters.register("m2");
        let batch = "*\nm1\n{\"n\":1}\nm2\n{\"n\":2}".to_owned();
        waiters.route("bt:reply:api-0", batch);
        assert_eq!(first.outcome.try_recv().ok().as_deref(), Some("{\"n\":1}"));
        assert_eq!(second.outcome.try_recv().ok().as_deref(), Some("{\"n\":2}"));
        // One outcome alone, as before.
        let mut third = waiters.register("m3");
        waiters.route("bt:reply:api-0", "m3\n{}".into());
        assert_eq!(third.outcome.try_recv().ok().as_deref(), Some("{}"));
    }
}
