//! The load: clients sending messages in each delivery mode, a callback receiver, and the
//! checks that every answer is the message's own.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http1;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

/// How a message's result comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Callback,
    Stream,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Callback => "callback",
            Mode::Stream => "stream",
        }
    }
}

/// The most bytes of an answer the bench reads.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Where and how to send.
#[derive(Clone)]
pub struct Target {
    /// The API's base URL, for messages.
    api: String,
    /// `host:port` of the API, for the `Host` header.
    authority: String,
    /// The API key, sent as `X-API-Key`.
    key: String,
    /// The broker's own HTTP/1.1 client (the drainer's): kept-alive connections, no task or
    /// channel per request, so the load costs the machine little beside what it measures.
    client: http1::Client,
    receiver: Option<Receiver>,
}

impl Target {
    pub fn new(api: &str, key: &str, receiver: Option<Receiver>) -> anyhow::Result<Self> {
        let uri: hyper::Uri = api.parse()?;
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .ok_or_else(|| anyhow::anyhow!("{api}: no host"))?;
        let client = http1::Client::new(&uri, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("{api}: {e}"))?
            // one kept connection per client: a run has up to 10,000 at once
            .keep_idle(20_000);
        Ok(Self {
            api: api.to_owned(),
            authority,
            key: key.to_owned(),
            client,
            receiver,
        })
    }

    /// The API's base URL.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// Posts `body` to the API's message endpoint with the `extra` header lines; returns the
    /// status and the whole answer.
    async fn post(&self, extra: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let head = format!(
            "POST /api/v1/message HTTP/1.1\r\nhost: {}\r\nx-api-key: {}\r\n\
             content-type: application/json\r\n{extra}content-length: {}\r\n\r\n",
            self.authority,
            self.key,
            body.len()
        );
        let mut response = self
            .client
            .request(head.as_bytes(), body)
            .await
            .map_err(|e| format!("{e}"))?;
        let bytes = response
            .collect(MAX_ANSWER)
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok((response.status, bytes))
    }
}

impl Target {
    /// `GET <path>` on the API with the admin key `key`: the status and the whole answer.
    pub async fn admin_get(&self, path: &str, key: &str) -> Result<(u16, Vec<u8>), String> {
        let head = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {key}\r\n\r\n",
            self.authority
        );
        let mut response = self
            .client
            .request(head.as_bytes(), b"")
            .await
            .map_err(|e| format!("{e}"))?;
        let bytes = response
            .collect(64 << 20)
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok((response.status, bytes))
    }
}

/// The text of message `i` of conversation `c` in run `run`; the mock answers `echo: <text>`.
pub fn text(run: &str, c: usize, i: usize) -> String {
    format!("{run} c{c} m{i}")
}

pub fn user(run: &str, c: usize) -> String {
    format!("{run}-u{c}")
}

/// Sends one message and waits for its result; returns the time from send to result.
pub async fn send_one(
    target: &Target,
    mode: Mode,
    run: &str,
    c: usize,
    i: usize,
) -> Result<Duration, String> {
    send(target, mode, &user(run, c), &text(run, c, i)).await
}

/// Sends `text` as `user` and waits for its result; returns the time from send to result.
pub async fn send(target: &Target, mode: Mode, user: &str, text: &str) -> Result<Duration, String> {
    let expected = format!("echo: {text}");
    // Written directly, not built as a `Value`: the load generator shares the two cores
    // with the broker, and a `Value` per request and per answer was half its work.
    let mut body = String::with_capacity(128);
    body.push_str("{\"user_id\":");
    push_string(&mut body, user);
    body.push_str(",\"client_id\":\"bench\",\"message\":");
    push_string(&mut body, text);
    let pending = match (mode, &target.receiver) {
        (Mode::Callback, Some(r)) => {
            body.push_str(",\"callback_url\":");
            push_string(&mut body, &r.url());
            Some(r.expect(text))
        }
        (Mode::Callback, None) => return Err("callback mode needs the receiver".into()),
        _ => None,
    };
    body.push('}');
    let extra = if mode == Mode::Stream {
        "accept: text/event-stream\r\n"
    } else {
        ""
    };
    let start = Instant::now();
    let (status, bytes) = target
        .post(extra, body.as_bytes())
        .await
        .map_err(|e| format!("{text}: {e}"))?;
    let done = Instant::now();
    match mode {
        Mode::Sync => {
            if status != 200 {
                return Err(format!(
                    "{text}: status {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            check_answer(text, &expected, &bytes)?;
            Ok(done - start)
        }
        Mode::Stream => {
            if status != 200 {
                return Err(format!("{text}: status {status}"));
            }
            check_stream(text, &expected, &bytes)?;
            Ok(done - start)
        }
        Mode::Callback => {
            if status != 202 {
                return Err(format!(
                    "{text}: status {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            let Some(pending) = pending else {
                return Err("no receiver".into());
            };
            let arrived = tokio::time::timeout(Duration::from_secs(120), pending)
                .await
                .map_err(|_| format!("{text}: no callback within 120 s"))?
                .map_err(|_| format!("{text}: receiver gone"))??;
            Ok(arrived - start)
        }
    }
}

/// A sync answer must be a JSON object whose first response is the message's own echo.
fn check_answer(text: &str, expected: &str, bytes: &[u8]) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        responses: Vec<Cow<'a, str>>,
    }
    let answer: Answer<'_> = serde_json::from_slice(bytes)
        .map_err(|e| format!("{text}: {e}: {}", String::from_utf8_lossy(bytes)))?;
    if answer.responses.first().map(|r| r.as_ref()) == Some(expected) {
        Ok(())
    } else {
        Err(format!(
            "{text}: wrong reply {}",
            String::from_utf8_lossy(bytes)
        ))
    }
}

fn check_reply(text: &str, expected: &str, v: &Value) -> Result<(), String> {
    let got = v
        .get("responses")
        .and_then(|r| r.get(0))
        .and_then(Value::as_str);
    if got == Some(expected) {
        Ok(())
    } else {
        Err(format!("{text}: wrong reply {v}"))
    }
}

/// A stream must be `queued`, the worker's frames, then the `complete` with the message's reply.
fn check_stream(text: &str, expected: &str, body: &[u8]) -> Result<(), String> {
    let body = std::str::from_utf8(body).map_err(|_| format!("{text}: stream not UTF-8"))?;
    let frames: Vec<Value> = body
        .split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|d| serde_json::from_str(d).ok())
        })
        .collect();
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    let first = frames.first().and_then(kind);
    let last = frames.last();
    if first.as_deref() != Some("queued") {
        return Err(format!("{text}: stream does not start with queued: {body}"));
    }
    match last {
        Some(v) if kind(v).as_deref() == Some("complete") => {
            check_reply(text, expected, v.get("response").unwrap_or(&Value::Null))
        }
        _ => Err(format!("{text}: stream does not end with complete: {body}")),
    }
}

/// What a load produced.
#[derive(Debug, Default)]
pub struct Results {
    /// Send-to-result times, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Open loop only: how long after its planned time each message was sent (part of its
    /// latency), in microseconds: the load generator's own lateness, or a send held back
    /// because too many were unanswered.
    pub late_us: Vec<u64>,
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl Results {
    /// Counts one message: its latency, or what was wrong with its answer.
    fn record(&mut self, sent: Result<Duration, String>) {
        match sent {
            Ok(d) => self.latencies_us.push(d.as_micros() as u64),
            Err(e) => self.errors.push(e),
        }
    }

    fn merge(&mut self, other: Results) {
        self.latencies_us.extend(other.latencies_us);
        self.late_us.extend(other.late_us);
        self.errors.extend(other.errors);
    }
}

/// `conversations` clients, each sending `messages` messages one after the other (the next
/// once the previous one's result is in).
pub async fn closed_loop(
    target: &Target,
    mode: Mode,
    run: &str,
    conversations: usize,
    messages: usize,
) -> Results {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conversations {
        if c % 500 == 499 {
            // Clients start in steps of 500: a burst of thousands of connects would overflow
            // the API's listen backlog and cost SYN retries, which is not the broker's doing.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let target = target.clone();
        let run = run.to_owned();
        tasks.spawn(async move {
            let mut r = Results::default();
            for i in 0..messages {
                r.record(send_one(&target, mode, &run, c, i).await);
            }
            r
        });
    }
    let mut all = Results::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(r) => all.merge(r),
            Err(e) => all.errors.push(format!("client task: {e}")),
        }
    }
    all.elapsed = start.elapsed();
    all
}

/// `conversations` taking turns, one message in the broker at a time: conversation 0 sends
/// its first message and waits for the answer, then conversation 1 sends its first, and so
/// on, `messages` rounds. The other reading of "4 conversations sending in turn".
pub async fn in_turn(
    target: &Target,
    mode: Mode,
    run: &str,
    conversations: usize,
    messages: usize,
) -> Results {
    let start = Instant::now();
    let mut all = Results::default();
    for i in 0..messages {
        for c in 0..conversations {
            all.record(send_one(target, mode, run, c, i).await);
        }
    }
    all.elapsed = start.elapsed();
    all
}

/// The most requests the open loop keeps in flight: each holds a socket in this process and
/// one in the API, and past the knee they pile up until the file-descriptor limit (20,000
/// here) would fail sends that the broker never saw.
const OPEN_LOOP_IN_FLIGHT: usize = 4_000;

/// The open loop wakes at most this often: below 2,000 msg/s each message is sent on its own at
/// its planned time; above, what fell due in the last half millisecond goes together, up to
/// 0.5 ms late. (Each wake-up costs the load generator CPU on the machine it shares with the
/// broker.)
const PACE_QUANTUM: Duration = Duration::from_micros(500);

/// Open loop: messages sent at `rate` per second for `duration`, whatever the answers do,
/// spread round-robin over `conversations`. Latency counts from the planned send time, so a
/// late send is charged to the system, not hidden; so is a send that waits because
/// [`OPEN_LOOP_IN_FLIGHT`] requests are already unanswered. How late each send left is kept
/// apart too ([`Results::late_us`]).
///
/// The sends are paced by an [`Alarm`]. The runtime's timer, which paced them before, works in
/// whole milliseconds: a send left up to 2 ms after its planned time (1.15 ms at the median
/// at 200 msg/s, 0.45 ms at 1,000), and that counted as the broker's latency.
pub async fn open_loop(
    target: &Target,
    mode: Mode,
    run: &str,
    conversations: usize,
    rate: f64,
    duration: Duration,
) -> Results {
    let total = (rate * duration.as_secs_f64()).round() as usize;
    let alarm = Alarm::new()
        .map_err(|e| eprintln!("broker-bench: no timerfd ({e}): the runtime's timer paces sends"))
        .ok();
    let start = Instant::now();
    let planned = |k: usize| start + Duration::from_secs_f64(k as f64 / rate);
    let slots = Arc::new(Semaphore::new(OPEN_LOOP_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0usize;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        while sent < due {
            let (c, i) = (sent % conversations, sent / conversations);
            let target = target.clone();
            let run = run.to_owned();
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let planned = planned(sent);
            tasks.spawn(async move {
                let answer = send_one(&target, mode, &run, c, i).await.map(|own| {
                    let all = planned.elapsed();
                    (all, all.saturating_sub(own))
                });
                drop(slot);
                answer
            });
            sent += 1;
        }
        let next = planned(sent).max(Instant::now() + PACE_QUANTUM);
        match &alarm {
            Some(alarm) => alarm.sleep_until(next).await,
            None => tokio::time::sleep_until(next.into()).await,
        }
    }
    let mut all = Results::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((d, late))) => {
                all.latencies_us.push(d.as_micros() as u64);
                all.late_us.push(late.as_micros() as u64);
            }
            Ok(Err(e)) => all.errors.push(e),
            Err(e) => all.errors.push(format!("client task: {e}")),
        }
    }
    all.elapsed = start.elapsed();
    all
}

/// A timer with the kernel's resolution, on the runtime's own thread: a `timerfd` the
/// runtime's `epoll` waits on.
struct Alarm {
    fd: AsyncFd<OwnedFd>,
    /// An instant and the same moment on `CLOCK_MONOTONIC`, which `Instant` reads.
    origin: (Instant, Duration),
}

impl Alarm {
    fn new() -> std::io::Result<Self> {
        #[allow(unsafe_code)]
        // SAFETY: timerfd_create takes no pointers; a descriptor it returns is ours alone.
        let fd = unsafe {
            let raw = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(raw)
        };
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        #[allow(unsafe_code)]
        // SAFETY: clock_gettime writes to a valid pointer to a local struct.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let origin = (
            Instant::now(),
            Duration::new(now.tv_sec as u64, now.tv_nsec as u32),
        );
        #[allow(unsafe_code)]
        // SAFETY: the descriptor is an `OwnedFd` moved into the `AsyncFd`: it stays open, and
        // the same, while the registration lives.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(Self { fd, origin })
    }

    /// Returns at `at`, give or take the kernel's wake-up; at once when it is past or the
    /// timer fails.
    async fn sleep_until(&self, at: Instant) {
        if at <= Instant::now() {
            return;
        }
        let due = self.origin.1 + at.saturating_duration_since(self.origin.0);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: due.as_secs() as libc::time_t,
                tv_nsec: due.subsec_nanos() as libc::c_long,
            },
        };
        #[allow(unsafe_code)]
        // SAFETY: the descriptor is open while `self` lives; `spec` is a valid local struct
        // and the old setting is not asked for (null).
        let set = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if set < 0 {
            return;
        }
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return;
            };
            let mut expirations = [0u8; 8];
            #[allow(unsafe_code)]
            let read = ready.try_io(|fd| {
                // SAFETY: reads at most 8 bytes into an 8-byte local buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(_fired_or_failed) = read {
                return;
            }
        }
    }
}

/// Sends `messages` messages to each of `conversations` conversations with
/// `Prefer: respond-async`, `parallel` at a time, and checks each is accepted. A
/// conversation's messages go one after another, each once the one before it was accepted:
/// their send order is then the order the broker must run them in, which [`check_order`]
/// checks. (Sending message i of every conversation before any message i + 1 let two
/// messages of one conversation be in flight at once when there were fewer conversations
/// than `parallel`, and the check then blamed the broker for the network's order.)
pub async fn preload(
    target: &Target,
    run: &str,
    conversations: usize,
    messages: usize,
    parallel: usize,
) -> Result<(), String> {
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conversations {
        let (gate, target, run) = (gate.clone(), target.clone(), run.to_owned());
        tasks.spawn(async move {
            let user = user(&run, c);
            for i in 0..messages {
                let permit = gate.acquire().await.map_err(|e| e.to_string())?;
                let text = text(&run, c, i);
                let body =
                    serde_json::json!({"user_id": user, "client_id": "bench", "message": text});
                let (status, _) = target
                    .post("prefer: respond-async\r\n", body.to_string().as_bytes())
                    .await?;
                drop(permit);
                if status != 202 {
                    return Err(format!("{text}: status {status}"));
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// The texts of a conversation's started turns, as the mock's record lists them.
pub fn texts_of(started: &Value) -> Vec<String> {
    started
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks, from the mock worker's record, that each conversation's turns started exactly once,
/// in send order, and that no conversation ever had two turns at once. Returns the problems.
pub async fn check_order(
    mock_url: &str,
    run: &str,
    conversations: usize,
    messages: usize,
) -> Vec<String> {
    let stats = match mock_stats(mock_url).await {
        Ok(v) => v,
        Err(e) => return vec![format!("mock stats: {e}")],
    };
    let mut problems = Vec::new();
    if stats["max_in_flight"].as_u64().unwrap_or(0) > 1 {
        problems.push(format!(
            "two turns at once for one conversation: {}",
            stats["violations"]
        ));
    }
    // The mock keys conversations as `<org>:...:<user_id>`.
    let started: HashMap<String, Value> = stats["started"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.rsplit(':').next().unwrap_or(k).to_owned(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    for c in 0..conversations {
        let want: Vec<String> = (0..messages).map(|i| text(run, c, i)).collect();
        let got = started.get(&user(run, c)).map(texts_of).unwrap_or_default();
        if got != want {
            problems.push(format!(
                "conversation {c}: turns started {} times, not in send order once each",
                got.len()
            ));
            if problems.len() > 10 {
                break;
            }
        }
    }
    problems
}

/// The mock worker's record (`GET /mock/stats`).
pub async fn mock_stats(mock_url: &str) -> Result<Value, String> {
    let base: hyper::Uri = mock_url.parse().map_err(|e| format!("{mock_url}: {e}"))?;
    let authority = base
        .authority()
        .map(|a| a.to_string())
        .ok_or_else(|| format!("{mock_url}: no host"))?;
    let client = http1::Client::new(&base, Duration::from_secs(10))?;
    let head = format!("GET /mock/stats HTTP/1.1\r\nhost: {authority}\r\n\r\n");
    let mut r = client
        .request(head.as_bytes(), b"")
        .await
        .map_err(|e| format!("{mock_url}: {e}"))?;
    let b = r.collect(MAX_ANSWER).await.map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!(
            "{mock_url}/mock/stats answered {}: is it the mock worker?",
            r.status
        ));
    }
    serde_json::from_slice(&b).map_err(|e| format!("{mock_url}/mock/stats: {e}"))
}

/// Where the receiver reports a callback's arrival (or what was wrong with it).
type Arrival = oneshot::Sender<Result<Instant, String>>;

/// Receives callbacks and hands each to the client waiting for it (by message text).
#[derive(Clone)]
pub struct Receiver {
    addr: SocketAddr,
    waiting: Arc<Mutex<HashMap<String, Arrival>>>,
    /// Callbacks nobody waited for: a repeat, or a message the bench never sent.
    unexpected: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    /// Listens on `addr` (`127.0.0.1:0` for a port of its own); the callback URL names it.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let receiver = Self {
            addr: listener.local_addr()?,
            waiting: Arc::default(),
            unexpected: Arc::default(),
        };
        let r = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let r = r.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(r.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(receiver)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The callbacks that arrived for nothing the bench waited for.
    pub fn unexpected(&self) -> Vec<String> {
        self.unexpected
            .lock()
            .map(|u| {
                u.iter()
                    .map(|t| format!("unexpected callback: {t}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn expect(&self, text: &str) -> oneshot::Receiver<Result<Instant, String>> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(text.to_owned(), tx);
        }
        rx
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Response::new(Full::new(Bytes::new())),
        };
        let arrived = Instant::now();
        let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let reply = payload
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let text = reply.strip_prefix("echo: ").unwrap_or_default();
        let waiter = self.waiting.lock().ok().and_then(|mut w| w.remove(text));
        if let Some(tx) = waiter {
            let result = if payload.get("status").and_then(Value::as_str) == Some("completed") {
                Ok(arrived)
            } else {
                Err(format!("{text}: callback {payload}"))
            };
            let _ = tx.send(result);
        } else if let Ok(mut u) = self.unexpected.lock() {
            u.push(String::from_utf8_lossy(&body).into_owned());
        }
        Response::new(Full::new(Bytes::new()))
    }
}

/// Appends `text` to `out` as a JSON string.
fn push_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_answer_must_carry_the_messages_own_echo() {
        let check = |body: &str| check_answer("t c1 m2", "echo: t c1 m2", body.as_bytes());
        assert!(check(r#"{"status":"completed","responses":["echo: t c1 m2","more"]}"#).is_ok());
        assert!(check(r#"{"responses":["echo: t c1 m\u0032"]}"#).is_ok());
        for wrong in [
            r#"{"responses":["echo: t c1 m3"]}"#,
            r#"{"responses":[]}"#,
            r#"{"status":"failed"}"#,
            r#"{"responses":["echo: t c1 m2""#,
            "",
        ] {
            assert!(check(wrong).is_err(), "{wrong}");
        }
    }

    /// The pacer's timer never fires early, fires again when set again, and does not wait
    /// for a time already past. (How late it fires is a figure, `send_late_ms`, not a test.)
    #[tokio::test]
    async fn the_alarm_wakes_at_its_time_not_before() {
        let alarm = Alarm::new().expect("timerfd");
        for wait_us in [3_000, 200, 5_000] {
            let at = Instant::now() + Duration::from_micros(wait_us);
            alarm.sleep_until(at).await;
            assert!(Instant::now() >= at, "woke before {wait_us} µs");
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let past = Instant::now();
        for at in [past, past - Duration::from_millis(5)] {
            let mut sleep = std::pin::pin!(alarm.sleep_until(at));
            let ready = std::future::Future::poll(sleep.as_mut(), &mut cx).is_ready();
            assert!(ready, "waited for a past time");
        }
    }
}
