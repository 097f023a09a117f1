//! The drainer daemon: claims runnable conversations with `BLMOVE`, runs their head message
//! at the worker, stores and publishes the outcome, and releases the conversation.
//!
//! Tasks of one drainer process:
//! - the claim loop ([`Drainer::claim_loop`]): one dedicated connection, `BLMOVE ready ->
//!   processing:<id>` pipelined with the claim of what it moved (and of up to 31 more ready
//!   conversations the script moves itself, when there is room), one spawned turn per claimed
//!   message up to `DRAINER_CONCURRENCY`; between
//!   two `BLMOVE`s it reconciles its processing list against the turns it really runs;
//! - the heartbeat, on the Redis clock;
//! - the reaper, which gives the conversations of silent drainers back to `ready`;
//! - a `GET /health` endpoint for Fly's checks.
//!
//! On SIGTERM it claims nothing new, lets running turns finish within the grace period,
//! releases what is left, and returns.

mod health;
mod progress;
mod turn;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use broker_core::batch::{Batcher, Limits};
use broker_core::clock::now_ms;
use broker_core::config::Settings;
use broker_core::queue::{Claim, Finished, Queue, QueueError, TurnEnd};
use broker_core::worker::WorkerClient;
use broker_core::{redis_conn, Keys};
use broker_proto::Conversation;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// The most conversations one take starts (when that many are ready and there is room for
/// their turns). Under load a drainer then pays one round trip per few turns instead of one
/// per turn; the claim script's cost grows with what it takes, so a take stays short.
const MAX_TAKE: usize = 32;

/// The most one finish call stores: under load the turns that end in one pass of the runtime
/// share a call; its cost in Redis grows with what it stores, so a call stays short, and a
/// large outcome (audio) goes alone.
const MAX_FINISH: Limits = Limits {
    items: 32,
    bytes: 1 << 20,
};

/// Gathers the ends of turns into finish calls (see `broker_core::batch`).
pub(crate) type Finisher = Batcher<Arc<TurnEnd>, Result<Finished, QueueError>>;

/// State shared by the drainer's tasks.
pub(crate) struct Shared {
    pub settings: Settings,
    pub queue: Queue,
    pub worker: WorkerClient,
    pub callbacks: broker_core::callback::Sender,
    /// Moves the worker's audio and file URLs onto `BROKER_PUBLIC_URL`, when it is set.
    pub rewrite: Option<broker_proto::front::Rewrite>,
    pub finisher: Finisher,
    /// Conversations this process runs a turn for (taken, not yet finished), counted: a
    /// conversation released by one turn can be taken again before that turn's task is gone.
    pub running: Mutex<HashMap<String, u32>>,
    /// When the heartbeat last succeeded (ms), 0 before the first.
    pub last_heartbeat: AtomicU64,
    /// Since when heartbeats have succeeded without a gap (ms), 0 while failing.
    pub healthy_since: AtomicU64,
    pub draining: AtomicBool,
    /// Set when the drainer ends with an empty processing list: it leaves the drainer set.
    pub deregister_at_end: AtomicBool,
    /// Set when the grace period is over: running turns give up and release.
    pub hard_stop: watch::Receiver<bool>,
}

impl Shared {
    pub fn id(&self) -> &str {
        &self.settings.drainer.id
    }

    /// A worker frame's data with its URLs on `BROKER_PUBLIC_URL` (a `complete` frame's).
    pub(crate) fn rewritten(&self, data: &str, frame: &broker_proto::sse::Frame) -> String {
        match (&self.rewrite, frame) {
            (Some(rewrite), broker_proto::sse::Frame::Complete(_)) => {
                rewrite.json(data).unwrap_or_else(|| data.to_owned())
            }
            _ => data.to_owned(),
        }
    }

    fn running_count(&self) -> usize {
        self.running
            .lock()
            .map(|r| r.values().map(|n| *n as usize).sum())
            .unwrap_or(0)
    }
}

/// A drainer ready to run, its health endpoint bound.
pub struct Drainer {
    shared: Arc<Shared>,
    client: redis::Client,
    listener: TcpListener,
    hard_stop_tx: watch::Sender<bool>,
    /// The finisher's gathering task, spawned when the drainer runs.
    finishing: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl Drainer {
    /// Connects nothing yet (Redis may be down at start): builds clients and binds `HOST:PORT`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let redis = redis_conn::shared(&settings.redis)?;
        let client = redis_conn::client(&settings.redis)?;
        let keys = Keys::new(&settings.redis.key_prefix, &settings.redis.shard);
        let worker = WorkerClient::new(&settings.worker, settings.drainer.concurrency)
            .map_err(anyhow::Error::msg)?;
        let addr = format!("{}:{}", settings.host, settings.port_or(8001));
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("bind the health endpoint on {addr}"))?;
        if settings.callbacks.secret.is_none() {
            tracing::warn!(
                "BROKER_CALLBACK_SECRET is not set: callbacks cannot be signed, so none are sent"
            );
        }
        let (hard_stop_tx, hard_stop) = watch::channel(false);
        let queue = Queue::new(redis, keys);
        let retention = broker_core::queue::Retention {
            result_ttl: settings.drainer.result_ttl,
            dead_list_max: settings.drainer.dead_list_max,
            events_max: settings.drainer.events_max,
        };
        let (finisher, finishing) =
            Batcher::new(MAX_FINISH, |turn: &Arc<TurnEnd>| turn.finish.size(), {
                let queue = queue.clone();
                let id = settings.drainer.id.clone();
                move |turns: Vec<Arc<TurnEnd>>| {
                    let (queue, id) = (queue.clone(), id.clone());
                    async move {
                        let stored = queue.finish_many(&id, &turns, &retention).await;
                        QueueError::fan_out(stored, turns.len())
                    }
                }
            });
        let rewrite = settings
            .public_url
            .as_deref()
            .map(|public| broker_proto::front::Rewrite::new(&settings.worker.base_url, public));
        let shared = Arc::new(Shared {
            rewrite,
            queue,
            worker,
            callbacks: broker_core::callback::Sender::new(&settings.callbacks)
                .keep_idle(settings.drainer.concurrency),
            finisher,
            settings,
            running: Mutex::new(HashMap::new()),
            last_heartbeat: AtomicU64::new(0),
            healthy_since: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            deregister_at_end: AtomicBool::new(false),
            hard_stop,
        });
        Ok(Self {
            shared,
            client,
            listener,
            hard_stop_tx,
            finishing: Box::pin(finishing),
        })
    }

    pub fn id(&self) -> &str {
        self.shared.id()
    }

    /// Where `GET /health` listens.
    pub fn health_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Runs until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Self {
            shared,
            client,
            listener,
            hard_stop_tx,
            finishing,
        } = self;
        // Ends when the last turn holding the finisher is gone.
        tokio::spawn(finishing);
        let d = &shared.settings.drainer;
        tracing::info!(
            drainer = %d.id,
            redis = %shared.settings.redis.redacted_url(),
            worker = %shared.settings.worker.base_url,
            concurrency = d.concurrency,
            "drainer starting"
        );
        // `stop` ends claiming; `end` ends the heartbeat, the reaper and the health endpoint,
        // which must outlive the grace period: a draining drainer whose heartbeat stopped
        // would be reaped while its last turns still run.
        let (stop_tx, stop_rx) = watch::channel(false);
        let (end_tx, end_rx) = watch::channel(false);
        let mut background = JoinSet::new();
        background.spawn(health::serve(listener, shared.clone(), end_rx.clone()));
        let heartbeat = tokio::spawn(heartbeat_loop(shared.clone(), end_rx.clone()));
        background.spawn(reap_loop(shared.clone(), end_rx));

        let mut turns = JoinSet::new();
        {
            let claim = claim_loop(shared.clone(), client, stop_rx.clone(), &mut turns);
            tokio::pin!(claim);
            tokio::select! {
                () = &mut claim => {}
                () = shutdown => {
                    tracing::info!(drainer = %shared.id(), "shutdown requested: claiming nothing new");
                    shared.draining.store(true, Ordering::SeqCst);
                    let _ = stop_tx.send(true);
                    claim.await;
                }
            }
        }
        let _ = stop_tx.send(true);
        shared.draining.store(true, Ordering::SeqCst);

        // Let running turns finish within the grace period, then make them give up.
        let grace = shared.settings.drainer.shutdown_grace;
        let running = shared.running_count();
        if running > 0 {
            tracing::info!(
                running,
                grace_s = grace.as_secs(),
                "waiting for running turns"
            );
        }
        if tokio::time::timeout(grace, join_all(&mut turns))
            .await
            .is_err()
        {
            tracing::warn!(
                left = shared.running_count(),
                "grace period over: releasing the turns still running"
            );
            let _ = hard_stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), join_all(&mut turns)).await;
        }
        // Whatever is still in the processing list goes back to ready.
        let clean = reconcile(&shared).await.is_ok()
            && shared
                .queue
                .processing_list(shared.id())
                .await
                .is_ok_and(|l| l.is_empty());
        if !clean {
            tracing::warn!("could not empty the processing list; another drainer will reap it");
        }
        // The heartbeat loop deregisters as its last act (so no beat can follow), when clean.
        shared.deregister_at_end.store(clean, Ordering::SeqCst);
        let _ = end_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), heartbeat).await;
        background.abort_all();
        tracing::info!(drainer = %shared.id(), "drainer stopped");
        Ok(())
    }
}

async fn join_all(turns: &mut JoinSet<()>) {
    while turns.join_next().await.is_some() {}
}

/// Claims conversations until asked to stop.
async fn claim_loop(
    shared: Arc<Shared>,
    client: redis::Client,
    stop: watch::Receiver<bool>,
    turns: &mut JoinSet<()>,
) {
    let d = shared.settings.drainer.clone();
    let semaphore = Arc::new(Semaphore::new(d.concurrency));
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut reconcile_at = Instant::now();
    let mut failures = 0u32;
    loop {
        while turns.try_join_next().is_some() {}
        if *stop.borrow() {
            return;
        }
        let permit = {
            let mut stop = stop.clone();
            tokio::select! {
                permit = semaphore.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
                () = crate::flag_set(&mut stop) => return,
            }
        };
        // Room for more turns lets one take start several conversations when they are ready.
        let mut permits = vec![permit];
        while permits.len() < MAX_TAKE {
            match semaphore.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        if Instant::now() >= reconcile_at {
            match reconcile(&shared).await {
                Ok(()) => reconcile_at = Instant::now() + d.reconcile_interval,
                Err(e) => {
                    tracing::warn!(error = %e, "reconcile failed");
                    reconcile_at = Instant::now();
                }
            }
        }
        if conn.is_none() {
            match redis_conn::blocking_connection(&client, &shared.settings.redis).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "connect for BLMOVE failed");
                    pause(failures, &stop).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        // The BLMOVE is never abandoned half-way: a command the server already runs could still
        // move a conversation after the client stopped listening. Its own timeout bounds it.
        let lease = uuid::Uuid::new_v4().simple().to_string();
        let outcome = tokio::time::timeout(
            d.block + Duration::from_secs(5),
            shared
                .queue
                .take_ready(c, shared.id(), d.block, &lease, permits.len()),
        )
        .await;
        match outcome {
            Ok(Ok(taken)) => {
                failures = 0;
                let stopping = *stop.borrow();
                let paused = taken.iter().any(|t| matches!(t.claim, Claim::Paused));
                for t in taken {
                    let Claim::Turn(claimed) = t.claim else {
                        continue;
                    };
                    let permit = if stopping { None } else { permits.pop() };
                    let Some(permit) = permit else {
                        // Taken just as shutdown began (or, never expected, beyond the room
                        // asked for): put it straight back, keeping its place.
                        let _ = shared
                            .queue
                            .release(shared.id(), &t.conversation, Some(&t.lease))
                            .await;
                        continue;
                    };
                    if let Ok(mut running) = shared.running.lock() {
                        *running
                            .entry(t.conversation.as_str().to_owned())
                            .or_insert(0) += 1;
                    }
                    // Boxed: the turn's large future is then copied once, into its box,
                    // instead of on every move into the task.
                    turns.spawn(Box::pin(turn::run(
                        shared.clone(),
                        t.conversation,
                        *claimed,
                        t.lease,
                        permit,
                    )));
                }
                if stopping {
                    return;
                }
                if paused {
                    // An operator paused the drainers: look again after a block's time.
                    let mut stop = stop.clone();
                    tokio::select! {
                        () = tokio::time::sleep(d.block) => {}
                        () = crate::flag_set(&mut stop) => return,
                    }
                }
            }
            Ok(Err(e)) => {
                failures += 1;
                tracing::warn!(error = %e, "BLMOVE failed; reconnecting");
                conn = None;
                reconcile_at = Instant::now();
                pause(failures, &stop).await;
            }
            Err(_) => {
                failures += 1;
                tracing::warn!("BLMOVE did not answer in time; reconnecting");
                conn = None;
                reconcile_at = Instant::now();
            }
        }
    }
}

/// Releases every conversation in this drainer's processing list that no turn of this
/// process runs: what a lost `BLMOVE` reply or an interrupted start left there.
async fn reconcile(shared: &Shared) -> Result<(), broker_core::queue::QueueError> {
    let listed = shared.queue.processing_list(shared.id()).await?;
    let orphans: Vec<String> = {
        let running = shared.running.lock().map(|r| r.clone()).unwrap_or_default();
        listed
            .into_iter()
            .filter(|c| !running.contains_key(c))
            .collect()
    };
    for conv in orphans {
        let released = shared
            .queue
            .release(shared.id(), &Conversation::from_key(conv.clone()), None)
            .await?;
        tracing::info!(conversation = %conv, ?released, "reconcile: released a conversation no turn was running");
    }
    Ok(())
}

async fn heartbeat_loop(shared: Arc<Shared>, mut end: watch::Receiver<bool>) {
    let every = shared.settings.drainer.heartbeat;
    loop {
        match shared.queue.heartbeat(shared.id()).await {
            Ok(_) => {
                let now = now_ms();
                shared.last_heartbeat.store(now, Ordering::SeqCst);
                let _ = shared.healthy_since.compare_exchange(
                    0,
                    now,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            Err(e) => {
                shared.healthy_since.store(0, Ordering::SeqCst);
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = flag_set(&mut end) => break,
        }
    }
    if shared.deregister_at_end.load(Ordering::SeqCst) {
        match shared.queue.deregister(shared.id()).await {
            Ok(()) => tracing::info!("deregistered"),
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the drainer set forgets it once it is silent")
            }
        }
    }
}

/// Gives the conversations of drainers silent for longer than `DRAINER_DEAD_AFTER_MS` back to
/// `ready`. A drainer reaps only after its own heartbeats have succeeded for that long, so that
/// after a Redis outage the live drainers have beaten again before anyone is judged dead.
async fn reap_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let d = shared.settings.drainer.clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(d.reap_interval) => {}
            () = crate::flag_set(&mut stop) => return,
        }
        let since = shared.healthy_since.load(Ordering::SeqCst);
        if since == 0 || now_ms().saturating_sub(since) < d.dead_after.as_millis() as u64 {
            continue;
        }
        if let Err(e) = reap_once(&shared).await {
            tracing::warn!(error = %e, "reap failed");
        }
    }
}

async fn reap_once(shared: &Shared) -> Result<(), broker_core::queue::QueueError> {
    let dead_after = shared.settings.drainer.dead_after;
    for dead in shared.queue.expired_drainers(dead_after).await? {
        if dead == shared.id() {
            continue;
        }
        let conversations = shared.queue.processing_list(&dead).await?;
        for conv in &conversations {
            let released = shared
                .queue
                .release(&dead, &Conversation::from_key(conv.clone()), None)
                .await?;
            tracing::warn!(dead_drainer = %dead, conversation = %conv, ?released, "reaped a conversation of a silent drainer");
        }
        if shared.queue.forget(&dead, dead_after).await? {
            tracing::info!(dead_drainer = %dead, reaped = conversations.len(), "forgot a dead drainer");
        }
    }
    Ok(())
}

/// Waits a growing moment after a Redis failure, or until stop.
async fn pause(failures: u32, stop: &watch::Receiver<bool>) {
    let delay =
        broker_core::worker::backoff(Duration::from_millis(100), Duration::from_secs(2), failures);
    let mut stop = stop.clone();
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = crate::flag_set(&mut stop) => {}
    }
}

/// Resolves once a stop flag is set (or its sender is gone).
/// Resolves once this drainer has gone without a successful heartbeat for three quarters of
/// the dead-after limit: others may soon judge it dead and take its conversations over, so
/// its turns must stop first (the lease keeps a stale drainer from storing anything, but not
/// from running a turn at the worker).
pub(crate) async fn fenced(shared: &Shared) {
    let limit = shared.settings.drainer.dead_after.as_millis() as u64 * 3 / 4;
    let every = (shared.settings.drainer.heartbeat / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        let last = shared.last_heartbeat.load(Ordering::SeqCst);
        if last > 0 && now_ms().saturating_sub(last) > limit {
            return;
        }
    }
}

pub(crate) async fn flag_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
