//! Queue operations: the only code that changes broker state in Redis, each change one script.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use broker_proto::{Conversation, MessageRequest};
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Value};

use crate::clock::now_ms;
use crate::keys::Keys;
use crate::redis_conn::Shared;
use crate::scripts::{Call, Scripts};

/// A Redis failure: a command failed, or a script answered something unexpected.
/// Runs a read (`|$conn| $body`, on the shared connection), and once more if its connection
/// turned out broken: a read is safe to repeat, and the second try goes out on a connection
/// opened since. Evaluates to
/// `Result<_, QueueError>`.
macro_rules! read {
    ($queue:expr, |$conn:ident| $body:expr) => {{
        let mut retried = false;
        loop {
            #[allow(unused_mut)]
            let mut $conn = $queue.conn().await?;
            let result: Result<_, $crate::queue::QueueError> = async { Ok($body) }.await;
            match result {
                Err($crate::queue::QueueError::Redis(e)) if !retried && $crate::queue::retry_read(&e) => {
                    retried = true;
                    tracing::debug!(error = %e, "a read on a broken connection: once more");
                }
                other => break other,
            }
        }
    }};
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from a script: {0}")]
    Protocol(String),
    /// Written, but not confirmed by the replicas `BROKER_REDIS_WAIT_REPLICAS` asks for.
    #[error("not replicated: {0}")]
    NotReplicated(String),
    /// A failure, as each request of a failed batch gets it.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
}

impl QueueError {
    /// The same failure again, for another request of the batch that met it.
    pub fn again(&self) -> Self {
        match self {
            Self::Redis(e) => Self::Redis(e.clone()),
            Self::Protocol(text) => Self::Protocol(text.clone()),
            Self::Unavailable(text) => Self::Unavailable(text.clone()),
            Self::NotReplicated(text) => Self::NotReplicated(text.clone()),
        }
    }

    /// Answers for each of `n` requests from the result of their one batch.
    pub fn fan_out<R>(result: Result<Vec<R>, Self>, n: usize) -> Vec<Result<R, Self>> {
        match result {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(e) => (0..n).map(|_| Err(e.again())).collect(),
        }
    }
}

/// How a client wants the result of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
    Callback,
    Stream,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Async => "async",
            Self::Callback => "callback",
            Self::Stream => "stream",
        }
    }

    /// Are this mode's frames recorded in the message's events, so that it can be streamed?
    /// Stream and async messages are read later; a sync or callback message's result is
    /// delivered by the broker itself, and recording its frames would cost a stream per
    /// message in Redis that nobody reads.
    pub fn records_events(self) -> bool {
        matches!(self, Self::Stream | Self::Async)
    }

    /// The mode named `name` (as stored in a message record).
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Sync, Self::Async, Self::Callback, Self::Stream]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// What enqueue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Accepted; position 1 means next to run. `queued` is the broker's `queued` frame when
    /// the message's frames are recorded (stream and async), as the stream holds it.
    Accepted {
        position: u64,
        queued: Option<Event>,
    },
    /// The client message id was seen within the dedup window: nothing was written.
    Duplicate { original: String },
    /// The conversation already holds the maximum number of messages.
    Full { depth: u64 },
}

/// A claimed turn: everything the drainer needs to run it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub message_id: String,
    pub attempts: u64,
    pub body: String,
    pub enqueued_at: u64,
    pub started_at: u64,
    pub reply: String,
    pub mode: String,
    pub user_id: String,
    pub client_message_id: String,
    pub callback_url: String,
    /// The worker's route the message came in on ([`broker_proto::Front`] as JSON), empty
    /// for the broker's own route.
    pub front: String,
    /// The text the progress callbacks of an earlier run of this turn covered (empty when
    /// none was posted).
    pub progress: String,
    /// The client's W3C `traceparent`, empty when it sent none.
    pub traceparent: String,
}

/// What claim found.
#[derive(Debug, Clone)]
pub enum Claim {
    Turn(Box<Claimed>),
    /// Nothing was queued; the stray entry was removed from the processing list.
    Empty,
    /// The conversation is held: parked out of every list until resumed.
    Held,
    /// Drainers are paused: nothing was started, what was taken went back to ready.
    Paused,
}

/// A conversation [`Queue::take_ready`] took, what its claim found, and the lease it runs
/// under.
#[derive(Debug, Clone)]
pub struct Taken {
    pub conversation: Conversation,
    pub claim: Claim,
    pub lease: String,
}

impl Taken {
    /// The lease of the conversation a take returned at `position` (from 1): the take's own
    /// for the first, `<lease>.<position>` for the others (as the claim script sets them).
    pub fn lease(lease: &str, position: usize) -> String {
        if position <= 1 {
            lease.to_owned()
        } else {
            format!("{lease}.{position}")
        }
    }
}

/// What finish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Stored and released; `left` messages still wait in the conversation.
    Done { left: u64 },
    /// The lease was no longer ours (the conversation was reaped or released): nothing changed.
    Stale,
}

/// What a finished turn stores.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    /// `completed` or `failed`.
    pub status: String,
    pub outcome_json: String,
    /// The one terminal frame of the message's events: `complete` or `error`, and its data.
    pub terminal_type: String,
    pub terminal_data: String,
    /// Entries for the dead list (a failed message, an undelivered callback).
    pub dead_entries: Vec<String>,
    /// Worker frames (`(type, data)`) not yet recorded; they go before the terminal frame.
    pub frames: Vec<(String, String)>,
    /// Extra fields for the message record (callback delivery).
    pub fields: Vec<(String, String)>,
    /// The message's reply channel, as its claim read it (`""` for none): the outcome is
    /// published there.
    pub reply: String,
}

impl Finish {
    /// About how many bytes it sends to Redis: its outcome, frames and dead-list entries.
    pub fn size(&self) -> usize {
        self.outcome_json.len()
            + self.terminal_data.len()
            + self.frames.iter().map(|(_, d)| d.len()).sum::<usize>()
            + self.dead_entries.iter().map(String::len).sum::<usize>()
    }

    pub fn new(status: &str, outcome_json: &str, terminal_type: &str, terminal_data: &str) -> Self {
        Self {
            status: status.to_owned(),
            outcome_json: outcome_json.to_owned(),
            terminal_type: terminal_type.to_owned(),
            terminal_data: terminal_data.to_owned(),
            ..Self::default()
        }
    }
}

/// A message to enqueue: the validated request, the id it was given, how its result is
/// wanted, and the reply channel it is answered on (sync and stream messages).
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub request: MessageRequest,
    pub message_id: String,
    pub mode: Mode,
    pub reply: Option<String>,
}

/// A turn to finish: whose it is, under which lease, and what it stores.
#[derive(Debug, Clone)]
pub struct TurnEnd {
    pub conversation: Conversation,
    pub message_id: String,
    pub lease: String,
    pub finish: Finish,
}

/// How long finished messages and their events are kept, and how much of them.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub result_ttl: Duration,
    pub dead_list_max: u64,
    pub events_max: u64,
}

/// One SSE frame of a message, as recorded in its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The stream entry id, sent as the SSE `id:` for resuming.
    pub id: String,
    /// The frame's `type`.
    pub kind: String,
    /// The frame's JSON, as the client receives it.
    pub data: String,
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        self.kind == "complete" || self.kind == "error"
    }
}

/// What release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Done,
    /// Not in that processing list (already released or reaped).
    Absent,
    /// The lease changed: someone else holds the conversation now.
    Stale,
}

/// What cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    Done,
    /// No such message (never existed, or its record expired).
    Absent,
    /// The message is running or finished: it keeps its status.
    NotQueued {
        status: String,
    },
}

/// The figures of `GET /health`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthFigures {
    pub drainers_alive: u64,
    pub active_queues: i64,
    pub processing: i64,
    pub queued: i64,
}

/// A message's record, without its request body.
#[derive(Debug, Clone, Default)]
pub struct MessageRecord {
    pub message_id: String,
    pub status: String,
    pub conversation: String,
    pub user_id: String,
    pub client_message_id: Option<String>,
    pub mode: String,
    pub attempts: u64,
    pub enqueued_at: Option<u64>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub outcome: Option<String>,
    /// Callback mode: `delivered` or `failed`, once the drainer is done with it.
    pub callback: Option<String>,
    pub callback_attempts: Option<u64>,
    /// The worker's route the message came in on (`broker_proto::Front` as JSON), if any.
    pub front: Option<String>,
    /// For a queued message: 1 means next to run.
    pub queue_position: Option<u64>,
}

/// One conversation's queue, as `GET /api/v1/queue` shows it.
#[derive(Debug, Clone, Default)]
pub struct QueueStatus {
    pub conversation: String,
    pub message_ids: Vec<String>,
    pub is_processing: bool,
    pub current_message_id: Option<String>,
}

impl QueueStatus {
    /// Messages waiting behind the running one (all of them when none runs).
    pub fn queue_length(&self) -> u64 {
        let n = self.message_ids.len() as u64;
        if self.is_processing {
            n.saturating_sub(1)
        } else {
            n
        }
    }
}

mod admin;
pub use admin::*;

/// Broker state in Redis: the shared connection, the key layout and the scripts. A clone shares
/// them: the batchers clone it for every batch.
#[derive(Clone)]
pub struct Queue {
    redis: Shared,
    keys: Arc<Keys>,
    scripts: Arc<Scripts>,
    /// Replicas an enqueue waits for (`WAIT`), and for how long; none by default.
    wait: Option<(u32, Duration)>,
}

const RECORD_FIELDS: [&str; 13] = [
    "status",
    "conversation",
    "user_id",
    "client_message_id",
    "mode",
    "attempts",
    "enqueued_at",
    "started_at",
    "finished_at",
    "outcome",
    "callback",
    "callback_attempts",
    "front",
];

impl Queue {
    pub fn new(redis: Shared, keys: Keys) -> Self {
        Self {
            redis,
            keys: Arc::new(keys),
            scripts: Arc::new(Scripts::new()),
            wait: None,
        }
    }

    /// The same queue, whose enqueues are acknowledged only once `replicas` replicas confirm
    /// them within `timeout` (`WAIT`); 0 replicas does not wait.
    pub fn waiting_for(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some((replicas, timeout));
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A handle to the shared connection (infallible; `Result` for the callers' `?`).
    async fn conn(&self) -> Result<Shared, QueueError> {
        Ok(self.redis.clone())
    }

    /// `PING`: is Redis reachable?
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Writes a message and queues it behind its conversation's earlier messages:
    /// [`Queue::enqueue_many`] with one message.
    pub async fn enqueue(
        &self,
        request: &MessageRequest,
        message_id: &str,
        mode: Mode,
        reply_channel: Option<&str>,
        max_depth: u64,
        dedup_ttl: Duration,
    ) -> Result<Enqueued, QueueError> {
        let message = NewMessage {
            request: request.clone(),
            message_id: message_id.to_owned(),
            mode,
            reply: reply_channel.map(str::to_owned),
        };
        let mut enqueued = self
            .enqueue_many(std::slice::from_ref(&message), max_depth, dedup_ttl)
            .await?;
        enqueued
            .pop()
            .ok_or_else(|| QueueError::Protocol("enqueue returned no result".into()))
    }

    /// Enqueues messages in one script call, each as [`Queue::enqueue`] would alone (two of
    /// one conversation queue in the order given); their results in the same order. The
    /// call's own cost and the stats counters' writes are paid once for all of them.
    pub async fn enqueue_many<T: std::borrow::Borrow<NewMessage>>(
        &self,
        messages: &[T],
        max_depth: u64,
        dedup_ttl: Duration,
    ) -> Result<Vec<Enqueued>, QueueError> {
        let mut invocation = Call::new(&self.scripts.enqueue, 3 + 5 * messages.len());
        invocation
            .key(self.keys.ready())
            .key(self.keys.stats())
            .key(self.keys.oldest());
        for message in messages {
            let NewMessage {
                request,
                message_id,
                ..
            } = message.borrow();
            let conv = &request.conversation;
            invocation
                .key(self.keys.message_name(message_id))
                .key(self.keys.queue_name(conv))
                .key(self.keys.conversation_name(conv))
                .key(match &request.client_message_id {
                    Some(cmid) => self.keys.dedup_name(conv, cmid),
                    None => self.keys.message_name(message_id),
                })
                .key(self.keys.events_name(message_id));
        }
        invocation
            .arg(now_ms())
            .arg(max_depth)
            .arg(dedup_ttl.as_secs().max(1))
            .arg(messages.len());
        for message in messages {
            let NewMessage {
                request,
                message_id,
                mode,
                reply,
            } = message.borrow();
            let front = request.front.as_ref().map(broker_proto::Front::to_json);
            let fields = 4
                + usize::from(reply.is_some())
                + usize::from(request.client_message_id.is_some())
                + usize::from(request.callback_url.is_some())
                + usize::from(front.is_some())
                + usize::from(request.traceparent.is_some());
            invocation
                .arg(message_id)
                .arg(request.conversation.as_str())
                .arg(if request.client_message_id.is_some() {
                    "1"
                } else {
                    "0"
                })
                .arg(if mode.records_events() { "1" } else { "0" })
                .arg(fields)
                .arg("conversation")
                .arg(request.conversation.as_str())
                .arg("user_id")
                .arg(&request.user_id)
                .arg("mode")
                .arg(mode.as_str())
                .arg("body")
                .arg(&request.worker_body);
            if let Some(channel) = reply {
                invocation.arg("reply").arg(channel);
            }
            if let Some(cmid) = &request.client_message_id {
                invocation.arg("client_message_id").arg(cmid);
            }
            if let Some(url) = &request.callback_url {
                invocation.arg("callback_url").arg(url);
            }
            if let Some(front) = &front {
                invocation.arg("front").arg(front);
            }
            if let Some(traceparent) = &request.traceparent {
                invocation.arg("traceparent").arg(traceparent);
            }
        }
        let mut conn = self.conn().await?;
        let replies: Vec<Value> = invocation.invoke(&mut conn).await?;
        if let Some((replicas, timeout)) = self.wait {
            // `WAIT` on the connection that wrote: it covers every write sent on it before.
            let confirmed: u64 = redis::cmd("WAIT")
                .arg(replicas)
                .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
                .query_async(&mut conn)
                .await?;
            if confirmed < u64::from(replicas) {
                return Err(QueueError::NotReplicated(format!(
                    "{confirmed} of {replicas} replica(s) confirmed within {} ms",
                    timeout.as_millis()
                )));
            }
        }
        if replies.len() != messages.len() {
            return Err(QueueError::Protocol(format!(
                "enqueue of {} messages returned {} results",
                messages.len(),
                replies.len()
            )));
        }
        replies.iter().map(parse_enqueued).collect()
    }

    /// Moves the oldest ready conversation into the drainer's processing list, waiting up to
    /// `block`, and starts its head message under `lease`: one round trip, as `BLMOVE` and the
    /// claim script go in one pipeline and Redis runs the script the moment `BLMOVE` returns.
    /// When more conversations are ready, the script takes and starts up to `room` in all,
    /// each under its own lease (see [`Taken::lease`]). Runs on a dedicated connection without
    /// a response timeout. Empty when nothing became ready within `block`.
    ///
    /// The script claims the head of the processing list unless that head already runs, so
    /// it also starts a conversation a lost reply left there; what the pipeline could not
    /// claim stays listed for reconcile.
    pub async fn take_ready(
        &self,
        conn: &mut MultiplexedConnection,
        drainer: &str,
        block: Duration,
        lease: &str,
        room: usize,
    ) -> Result<Vec<Taken>, QueueError> {
        let mut claim = Call::new(&self.scripts.claim, 3);
        // No time of our own: the claim runs when BLMOVE returns, and takes the Redis clock.
        self.claim_args(&mut claim, drainer, "", lease, "");
        claim.arg(room.max(1));
        let mut replies: Vec<Value> = redis::pipe()
            .blmove(
                self.keys.ready(),
                self.keys.processing(drainer),
                redis::Direction::Right,
                redis::Direction::Left,
                block.as_secs_f64(),
            )
            .add_command(claim.cmd()?.clone())
            .ignore_errors()
            .query_async(conn)
            .await?;
        let claimed = replies.pop();
        match replies.pop() {
            Some(Value::ServerError(e)) => return Err(QueueError::Redis(e.into())),
            Some(_) => {}
            None => return Err(QueueError::Protocol("BLMOVE pipeline: no reply".into())),
        }
        let entries = match claimed {
            Some(Value::ServerError(e)) => {
                let e: redis::RedisError = e.into();
                if e.kind() != redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                    return Err(e.into());
                }
                // The script cache was emptied (a restart or SCRIPT FLUSH): load it and claim
                // what the BLMOVE moved, if anything.
                claim.invoke(conn).await?
            }
            Some(Value::Array(entries)) => entries,
            other => return Err(QueueError::Protocol(format!("claim returned {other:?}"))),
        };
        // The turns' own timings (queue wait, processing) stay on this process's clock.
        let now = now_ms();
        let mut taken = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let (conversation, claim) = parse_claim(entry, now)?;
            taken.push(Taken {
                conversation,
                claim,
                lease: Taken::lease(lease, i + 1),
            });
        }
        Ok(taken)
    }

    /// Starts the head message of a conversation this drainer has taken (the claim of
    /// [`Queue::take_ready`], for a conversation known by name).
    pub async fn claim(
        &self,
        drainer: &str,
        conversation: &Conversation,
        lease: &str,
    ) -> Result<Claim, QueueError> {
        let mut conn = self.conn().await?;
        let now = now_ms();
        let mut claim = Call::new(&self.scripts.claim, 3);
        self.claim_args(
            &mut claim,
            drainer,
            conversation.as_str(),
            lease,
            &now.to_string(),
        );
        let reply: Value = claim.invoke(&mut conn).await?;
        Ok(parse_claim(&reply, now)?.1)
    }

    fn claim_args(
        &self,
        invocation: &mut Call<'_>,
        drainer: &str,
        conversation: &str,
        lease: &str,
        now: &str,
    ) {
        invocation
            .key(self.keys.processing(drainer))
            .key(self.keys.stats())
            .key(self.keys.ready())
            .arg(conversation)
            .arg(drainer)
            .arg(lease)
            .arg(now)
            .arg(self.keys.script_base());
    }

    /// Stores a turn's outcome, appends its terminal frame to the message's events and
    /// releases the conversation, if the lease is still ours: [`Queue::finish_many`] with one
    /// turn.
    pub async fn finish(
        &self,
        drainer: &str,
        conversation: &Conversation,
        message_id: &str,
        lease: &str,
        finish: &Finish,
        retention: &Retention,
    ) -> Result<Finished, QueueError> {
        let turn = TurnEnd {
            conversation: conversation.clone(),
            message_id: message_id.to_owned(),
            lease: lease.to_owned(),
            finish: finish.clone(),
        };
        let mut done = self
            .finish_many(drainer, std::slice::from_ref(&turn), retention)
            .await?;
        done.pop()
            .ok_or_else(|| QueueError::Protocol("finish returned no result".into()))
    }

    /// Finishes the turns of one drainer in one script call, each as [`Queue::finish`] would
    /// alone; their results in the same order. The call's own cost and the stats counters'
    /// writes are paid once for all of them.
    pub async fn finish_many<T: std::borrow::Borrow<TurnEnd>>(
        &self,
        drainer: &str,
        turns: &[T],
        retention: &Retention,
    ) -> Result<Vec<Finished>, QueueError> {
        let mut invocation = Call::new(&self.scripts.finish, 5 + 4 * turns.len());
        invocation
            .key(self.keys.processing(drainer))
            .key(self.keys.ready())
            .key(self.keys.stats())
            .key(self.keys.dead())
            .key(self.keys.oldest());
        for turn in turns {
            let turn = turn.borrow();
            invocation
                .key(self.keys.conversation_name(&turn.conversation))
                .key(self.keys.queue_name(&turn.conversation))
                .key(self.keys.message_name(&turn.message_id))
                .key(self.keys.events_name(&turn.message_id));
        }
        invocation
            .arg(now_ms())
            .arg(retention.result_ttl.as_secs().max(1))
            .arg(retention.dead_list_max.max(1))
            .arg(retention.events_max.max(1))
            .arg(self.keys.batched_replies())
            .arg(turns.len());
        for turn in turns {
            let TurnEnd {
                conversation,
                message_id,
                lease,
                finish,
            } = turn.borrow();
            invocation
                .arg(conversation.as_str())
                .arg(message_id)
                .arg(lease)
                .arg(&finish.status)
                .arg(&finish.outcome_json)
                .arg(&finish.terminal_type)
                .arg(&finish.terminal_data)
                .arg(&finish.reply)
                .arg(finish.dead_entries.len())
                .arg(finish.frames.len())
                .arg(finish.fields.len());
            for entry in &finish.dead_entries {
                invocation.arg(entry);
            }
            for (kind, data) in &finish.frames {
                invocation.arg(kind).arg(data);
            }
            for (field, value) in &finish.fields {
                invocation.arg(field).arg(value);
            }
        }
        let mut conn = self.conn().await?;
        let reply: Vec<i64> = invocation.invoke(&mut conn).await?;
        if reply.len() != turns.len() {
            return Err(QueueError::Protocol(format!(
                "finish of {} turns returned {} results",
                turns.len(),
                reply.len()
            )));
        }
        Ok(reply
            .into_iter()
            .map(|left| match u64::try_from(left) {
                Ok(left) => Finished::Done { left },
                Err(_) => Finished::Stale,
            })
            .collect())
    }

    /// Notes, before a progress callback is posted, the text it covers (cumulatively), if
    /// the lease is still ours: `false` when it is gone, and the callback must not be posted.
    pub async fn note_progress(
        &self,
        conversation: &Conversation,
        message_id: &str,
        lease: &str,
        covered: &str,
    ) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let mut invocation = Call::new(&self.scripts.progress, 2);
        invocation
            .key(self.keys.conversation(conversation))
            .key(self.keys.message(message_id))
            .arg(lease)
            .arg(covered);
        let noted: i64 = invocation.invoke(&mut conn).await?;
        Ok(noted == 1)
    }

    /// Appends worker frames (`(type, data)`) to a running message's events, if the lease is
    /// still ours, and announces them to its readers, on `reply` too when the message has a
    /// reply channel (not empty). Returns `false` when the lease is gone (nothing was written).
    pub async fn record_events(
        &self,
        conversation: &Conversation,
        message_id: &str,
        lease: &str,
        frames: &[(String, String)],
        events_max: u64,
        reply: &str,
    ) -> Result<bool, QueueError> {
        if frames.is_empty() {
            return Ok(true);
        }
        let mut conn = self.conn().await?;
        let mut invocation = Call::new(&self.scripts.event, 2);
        invocation
            .key(self.keys.conversation(conversation))
            .key(self.keys.events(message_id))
            .arg(lease)
            .arg(events_max.max(1))
            .arg(self.keys.events(message_id))
            .arg(reply)
            .arg(message_id);
        for (kind, data) in frames {
            invocation.arg(kind).arg(data);
        }
        let reply: Vec<Value> = invocation.invoke(&mut conn).await?;
        match reply.first().map(as_string).transpose()?.as_deref() {
            Some("ok") => Ok(true),
            Some("stale") => Ok(false),
            other => Err(QueueError::Protocol(format!("event returned {other:?}"))),
        }
    }

    /// Up to `count` events after `after` (an entry id, or `None` for the beginning), and
    /// the message's status (`None` when its record is gone).
    pub async fn read_events(
        &self,
        message_id: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<(Vec<Event>, Option<String>), QueueError> {
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_owned(),
        };
        let (entries, status): (Vec<(String, Vec<String>)>, Option<String>) =
            read!(self, |conn| redis::pipe()
                .cmd("XRANGE")
                .arg(self.keys.events(message_id))
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(count)
                .hget(self.keys.message(message_id), "status")
                .query_async(&mut conn)
                .await?)?;
        let events = entries
            .into_iter()
            .map(|(id, fields)| {
                let mut event = Event {
                    id,
                    kind: String::new(),
                    data: String::new(),
                };
                for pair in fields.chunks(2) {
                    if let [name, value] = pair {
                        match name.as_str() {
                            "type" => event.kind.clone_from(value),
                            "data" => event.data.clone_from(value),
                            _ => {}
                        }
                    }
                }
                event
            })
            .collect();
        Ok((events, status))
    }

    /// Puts a conversation from `owner`'s processing list back at the front of ready.
    /// With a lease, only if that lease still holds; without one, whoever holds it.
    pub async fn release(
        &self,
        owner: &str,
        conversation: &Conversation,
        lease: Option<&str>,
    ) -> Result<Released, QueueError> {
        let mut conn = self.conn().await?;
        let conv_key = self.keys.conversation(conversation);
        let mut running: String = conn
            .hget::<_, _, Option<String>>(&conv_key, "message_id")
            .await?
            .unwrap_or_default();
        for _ in 0..16 {
            let msg_key = if running.is_empty() {
                conv_key.clone()
            } else {
                self.keys.message(&running)
            };
            let reply: Vec<Value> = Call::new(&self.scripts.release, 6)
                .key(&conv_key)
                .key(self.keys.queue(conversation))
                .key(self.keys.processing(owner))
                .key(self.keys.ready())
                .key(self.keys.stats())
                .key(msg_key)
                .arg(conversation.as_str())
                .arg(&running)
                .arg(lease.unwrap_or(""))
                .arg(now_ms())
                .invoke(&mut conn)
                .await?;
            match reply.first().map(as_string).transpose()?.as_deref() {
                Some("ok") => return Ok(Released::Done),
                Some("absent") => return Ok(Released::Absent),
                Some("stale") => return Ok(Released::Stale),
                Some("retry") => {
                    running = reply.get(1).map(as_string).transpose()?.unwrap_or_default()
                }
                other => return Err(QueueError::Protocol(format!("release returned {other:?}"))),
            }
        }
        Err(QueueError::Protocol(
            "release: the running message kept changing".into(),
        ))
    }

    /// Cancels a message that is still queued, storing `outcome_json` as its outcome.
    pub async fn cancel(
        &self,
        message_id: &str,
        outcome_json: &str,
        terminal_data: &str,
        result_ttl: Duration,
    ) -> Result<Cancelled, QueueError> {
        let mut conn = self.conn().await?;
        let conversation: Option<String> = conn
            .hget(self.keys.message(message_id), "conversation")
            .await?;
        let Some(conversation) = conversation else {
            return Ok(Cancelled::Absent);
        };
        let conv = Conversation::from_key(conversation);
        let reply: Vec<Value> = Call::new(&self.scripts.cancel, 7)
            .key(self.keys.message(message_id))
            .key(self.keys.queue(&conv))
            .key(self.keys.conversation(&conv))
            .key(self.keys.ready())
            .key(self.keys.stats())
            .key(self.keys.events(message_id))
            .key(self.keys.oldest())
            .arg(message_id)
            .arg(conv.as_str())
            .arg(now_ms())
            .arg(outcome_json)
            .arg(result_ttl.as_secs().max(1))
            .arg(terminal_data)
            .arg(self.keys.events(message_id))
            .invoke(&mut conn)
            .await?;
        match reply.first().map(as_string).transpose()?.as_deref() {
            Some("ok") => Ok(Cancelled::Done),
            Some("absent") => Ok(Cancelled::Absent),
            Some("not_queued") => Ok(Cancelled::NotQueued {
                status: reply.get(1).map(as_string).transpose()?.unwrap_or_default(),
            }),
            other => Err(QueueError::Protocol(format!("cancel returned {other:?}"))),
        }
    }

    /// The counters of the stats hash, for `GET /metrics`.
    pub async fn stats(&self) -> Result<HashMap<String, i64>, QueueError> {
        read!(self, |conn| conn.hgetall(self.keys.stats()).await?)
    }

    /// Records a drainer's heartbeat on the Redis clock; returns that time (ms).
    pub async fn heartbeat(&self, drainer: &str) -> Result<u64, QueueError> {
        let mut conn = self.conn().await?;
        Ok(Call::new(&self.scripts.heartbeat, 1)
            .key(self.keys.drainers())
            .arg(drainer)
            .invoke(&mut conn)
            .await?)
    }

    /// Drainers silent for longer than `dead_after`.
    pub async fn expired_drainers(&self, dead_after: Duration) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn().await?;
        Ok(Call::new(&self.scripts.expired, 1)
            .key(self.keys.drainers())
            .arg(dead_after.as_millis() as u64)
            .arg(100)
            .invoke(&mut conn)
            .await?)
    }

    /// The conversations in a drainer's processing list.
    pub async fn processing_list(&self, drainer: &str) -> Result<Vec<String>, QueueError> {
        read!(self, |conn| conn
            .lrange(self.keys.processing(drainer), 0, -1)
            .await?)
    }

    /// Drops a dead drainer whose processing list is empty.
    pub async fn forget(&self, drainer: &str, dead_after: Duration) -> Result<bool, QueueError> {
        let mut conn = self.conn().await?;
        let n: i64 = Call::new(&self.scripts.forget, 2)
            .key(self.keys.drainers())
            .key(self.keys.processing(drainer))
            .arg(drainer)
            .arg(dead_after.as_millis() as u64)
            .invoke(&mut conn)
            .await?;
        Ok(n == 1)
    }

    /// Removes a drainer that stops cleanly.
    pub async fn deregister(&self, drainer: &str) -> Result<(), QueueError> {
        let mut conn = self.conn().await?;
        let _: i64 = conn.zrem(self.keys.drainers(), drainer).await?;
        Ok(())
    }

    /// Figures for `GET /health`: O(log n) in drainers, O(1) in users.
    pub async fn health(&self, dead_after: Duration) -> Result<HealthFigures, QueueError> {
        let v: (u64, i64, i64, i64) = read!(self, |conn| Call::new(&self.scripts.health, 2)
            .key(self.keys.stats())
            .key(self.keys.drainers())
            .arg(dead_after.as_millis() as u64)
            .invoke(&mut conn)
            .await?)?;
        Ok(HealthFigures {
            drainers_alive: v.0,
            active_queues: v.1,
            processing: v.2,
            queued: v.3,
        })
    }

    /// The status and outcome of a message (what a sync waiter re-reads).
    pub async fn outcome(
        &self,
        message_id: &str,
    ) -> Result<(Option<String>, Option<String>), QueueError> {
        read!(self, |conn| redis::cmd("HMGET")
            .arg(self.keys.message(message_id))
            .arg("status")
            .arg("outcome")
            .query_async(&mut conn)
            .await?)
    }

    /// A message's record and, while it is queued, its position.
    pub async fn message_record(
        &self,
        message_id: &str,
    ) -> Result<Option<MessageRecord>, QueueError> {
        let values: Vec<Option<String>> = read!(self, |conn| redis::cmd("HMGET")
            .arg(self.keys.message(message_id))
            .arg(&RECORD_FIELDS[..])
            .query_async(&mut conn)
            .await?)?;
        let field = |i: usize| values.get(i).cloned().flatten();
        let Some(status) = field(0) else {
            return Ok(None);
        };
        let number = |i: usize| field(i).and_then(|v| v.parse::<u64>().ok());
        let mut record = MessageRecord {
            message_id: message_id.to_owned(),
            status,
            conversation: field(1).unwrap_or_default(),
            user_id: field(2).unwrap_or_default(),
            client_message_id: field(3),
            mode: field(4).unwrap_or_default(),
            attempts: number(5).unwrap_or(0),
            enqueued_at: number(6),
            started_at: number(7),
            finished_at: number(8),
            outcome: field(9),
            callback: field(10),
            callback_attempts: number(11),
            front: field(12),
            queue_position: None,
        };
        if record.status == "queued" {
            let conv = Conversation::from_key(record.conversation.clone());
            let (index, state): (Option<u64>, Option<String>) = read!(self, |conn| redis::pipe()
                .cmd("LPOS")
                .arg(self.keys.queue(&conv))
                .arg(message_id)
                .hget(self.keys.conversation(&conv), "state")
                .query_async(&mut conn)
                .await?)?;
            record.queue_position = index.map(|i| {
                if state.as_deref() == Some("running") {
                    i
                } else {
                    i + 1
                }
            });
        }
        Ok(Some(record))
    }

    /// One conversation's queue, reading at most `limit` message ids.
    pub async fn queue_status(
        &self,
        conversation: &Conversation,
        limit: u64,
    ) -> Result<QueueStatus, QueueError> {
        let stop = i64::try_from(limit).unwrap_or(i64::MAX).saturating_sub(1);
        let (ids, conv): (Vec<String>, HashMap<String, String>) =
            read!(self, |conn| redis::pipe()
                .lrange(self.keys.queue(conversation), 0, stop as isize)
                .hgetall(self.keys.conversation(conversation))
                .query_async(&mut conn)
                .await?)?;
        let running = conv.get("state").map(String::as_str) == Some("running");
        Ok(QueueStatus {
            conversation: conversation.as_str().to_owned(),
            current_message_id: if running {
                conv.get("message_id").cloned()
            } else {
                None
            },
            is_processing: running,
            message_ids: ids,
        })
    }
}

/// Whether a failed read may be tried once more: its connection broke (Redis restarted, a
/// proxy dropped it), which says nothing about the next one. A timeout is not retried.
pub(crate) fn retry_read(e: &redis::RedisError) -> bool {
    crate::redis_conn::may_break(e) && !e.is_timeout()
}

/// One message's answer from the enqueue script (see `lua/enqueue.lua`).
pub fn parse_enqueued(reply: &Value) -> Result<Enqueued, QueueError> {
    let items = match reply {
        Value::Int(_) => {
            return Ok(Enqueued::Accepted {
                position: as_u64(reply)?,
                queued: None,
            })
        }
        Value::Array(items) => items,
        other => return Err(QueueError::Protocol(format!("enqueue returned {other:?}"))),
    };
    let field = |i: usize| {
        items
            .get(i)
            .ok_or_else(|| QueueError::Protocol(format!("enqueue: no field {i}")))
    };
    match field(0)? {
        Value::Int(_) => Ok(Enqueued::Accepted {
            position: as_u64(field(0)?)?,
            queued: Some(Event {
                id: as_string(field(1)?)?,
                kind: "queued".into(),
                data: as_string(field(2)?)?,
            }),
        }),
        kind => match as_string(kind)?.as_str() {
            "dup" => Ok(Enqueued::Duplicate {
                original: as_string(field(1)?)?,
            }),
            "full" => Ok(Enqueued::Full {
                depth: as_u64(field(1)?)?,
            }),
            other => Err(QueueError::Protocol(format!("enqueue returned {other}"))),
        },
    }
}

/// Reads one entry of the claim script's reply (see `lua/claim.lua`); `now` is when the claim
/// was sent.
/// Reads one entry of the claim script's reply (a turn, or `{kind, conversation}`); public for
/// the fuzz targets.
pub fn parse_claim(entry: &Value, now: u64) -> Result<(Conversation, Claim), QueueError> {
    let turn = match entry {
        Value::BulkString(turn) => std::str::from_utf8(turn)
            .map_err(|_| QueueError::Protocol("claim returned a turn that is not UTF-8".into()))?,
        Value::Array(empty) => {
            return match (empty.first().map(as_string).transpose()?, empty.get(1)) {
                (Some(kind), Some(conversation)) if kind == "empty" || kind == "held" => Ok((
                    Conversation::from_key(as_string(conversation)?),
                    if kind == "held" {
                        Claim::Held
                    } else {
                        Claim::Empty
                    },
                )),
                (Some(kind), None) if kind == "paused" => {
                    Ok((Conversation::from_key(String::new()), Claim::Paused))
                }
                _ => Err(QueueError::Protocol(format!("claim returned {entry:?}"))),
            };
        }
        other => return Err(QueueError::Protocol(format!("claim returned {other:?}"))),
    };
    // Twelve fields, then the body, which takes the rest (see `claim.lua`). The separators are
    // found with `memchr`; a NUL is one byte, so each piece is a `str` of its own.
    let mut rest = turn;
    let mut fields = 0;
    let mut next = || {
        fields += 1;
        if fields == 13 {
            return std::mem::take(&mut rest);
        }
        match memchr::memchr(0, rest.as_bytes()) {
            Some(at) => {
                let field = &rest[..at];
                rest = &rest[at + 1..];
                field
            }
            None => std::mem::take(&mut rest),
        }
    };
    let conversation = Conversation::from_key(next().to_owned());
    let (message_id, attempts, enqueued_at) = (next(), next(), next());
    let claim = Claim::Turn(Box::new(Claimed {
        message_id: message_id.to_owned(),
        attempts: attempts.parse().unwrap_or(1),
        enqueued_at: enqueued_at.parse().unwrap_or(now),
        started_at: now,
        reply: next().to_owned(),
        mode: next().to_owned(),
        user_id: next().to_owned(),
        client_message_id: next().to_owned(),
        callback_url: next().to_owned(),
        front: next().to_owned(),
        progress: next().to_owned(),
        traceparent: next().to_owned(),
        body: next().to_owned(),
    }));
    Ok((conversation, claim))
}

pub(crate) fn as_string(v: &Value) -> Result<String, QueueError> {
    match v {
        // Checked first as UTF-8, which is much faster than the lossy walk it falls back to.
        Value::BulkString(b) => Ok(match std::str::from_utf8(b) {
            Ok(text) => text.to_owned(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        }),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(QueueError::Protocol(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

pub(crate) fn as_u64(v: &Value) -> Result<u64, QueueError> {
    match v {
        Value::Int(n) => {
            u64::try_from(*n).map_err(|_| QueueError::Protocol(format!("negative number {n}")))
        }
        other => as_string(other)?
            .parse()
            .map_err(|_| QueueError::Protocol(format!("expected a number, got {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(text: &str) -> Claimed {
        match parse_claim(&Value::BulkString(text.as_bytes().to_vec()), 7) {
            Ok((_, Claim::Turn(claimed))) => *claimed,
            other => panic!("not a turn: {other:?}"),
        }
    }

    #[test]
    fn a_claimed_turn_is_read_field_by_field_with_the_body_last() {
        let claimed = turn(
            &[
                "c",
                "m1",
                "3",
                "1000",
                "bt:replies:a",
                "sync",
                "alice",
                "cm",
                "https://x/cb",
                "{\"route\":\"chat\"}",
                "so far",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "{\"a\":\"\0\"}",
            ]
            .join("\0"),
        );
        assert_eq!(
            (
                claimed.message_id.as_str(),
                claimed.attempts,
                claimed.enqueued_at,
                claimed.started_at
            ),
            ("m1", 3, 1000, 7)
        );
        assert_eq!(
            [
                claimed.reply.as_str(),
                claimed.mode.as_str(),
                claimed.user_id.as_str(),
                claimed.client_message_id.as_str(),
                claimed.callback_url.as_str(),
                claimed.front.as_str(),
                claimed.progress.as_str(),
                claimed.traceparent.as_str()
            ],
            [
                "bt:replies:a",
                "sync",
                "alice",
                "cm",
                "https://x/cb",
                "{\"route\":\"chat\"}",
                "so far",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ]
        );
        // The body takes the rest, a NUL in it included.
        assert_eq!(claimed.body, "{\"a\":\"\0\"}");
        // Fields missing at the end read as empty (and the numbers as their defaults).
        let short = turn("c\0m2");
        assert_eq!(
            (
                short.message_id.as_str(),
                short.attempts,
                short.enqueued_at,
                short.body.as_str()
            ),
            ("m2", 1, 7, "")
        );
    }
}
