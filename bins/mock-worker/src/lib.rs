//! A stand-in for bt-servant-worker that speaks its contract (`docs/worker-contract.md`
//! §1.2–1.8): `POST /api/v1/chat/stream` with the worker's exact SSE framing,
//! `POST /api/v1/chat`, `POST /api/v1/chat/callback` with the `progress_mode` rules
//! (`callback.rs`), `GET /health`, and the data routes clients use (preferences, history,
//! `/api/v1/audio/*`; `data.rs`).
//!
//! It answers every text with `echo: <text>`, so a test can check that each message got its
//! own reply, and it records, per conversation, how many turns run at once and the order in
//! which turns started, so a test can prove one-in-flight and FIFO.
//!
//! Behaviour is set by [`MockSettings`] (latency, jitter, random 429s, 5xx and disconnects)
//! or per message by directives in the text, `[mock:key=value,...]`:
//! - `sleep=MS` turn length; `silent=MS` say nothing at all for MS after accepting;
//! - `status=CODE` answer CODE before the stream (with `code=WORKER_CODE` and
//!   `retry_after_ms=MS` for 429s); `times=N` only for the first N requests with this text;
//! - `disconnect` end the stream after the first frame without a terminal frame;
//! - `error` end with an `error` frame; `invalid` end with a `complete` that is no `ChatResponse`;
//! - `tools=N`, `progress=N`, `gap=MS`, `voice`: the real worker's whole frame sequence with N
//!   tool iterations, N progress frames per iteration, MS between frames, and a
//!   `voice_audio_url` on the mock's own origin (`script.rs`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use broker_proto::{ChatType, Conversation};
use bytes::Bytes;
use serde_json::{json, Value};

pub mod callback;
mod data;
mod script;

/// How the mock behaves when a message carries no directive.
#[derive(Debug, Clone)]
pub struct MockSettings {
    pub host: String,
    pub port: u16,
    /// When set, requests must carry `Authorization: Bearer <key>` (401 missing, 403 wrong).
    pub api_key: Option<String>,
    pub latency: Duration,
    pub jitter: Duration,
    /// Probability of a 429 `CONCURRENT_REQUEST_REJECTED` before the stream.
    pub rate_429: f64,
    /// Probability of a 503 before the stream.
    pub rate_5xx: f64,
    /// Probability of a stream that ends without a terminal frame.
    pub rate_disconnect: f64,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8787,
            api_key: None,
            latency: Duration::from_millis(50),
            jitter: Duration::ZERO,
            rate_429: 0.0,
            rate_5xx: 0.0,
            rate_disconnect: 0.0,
        }
    }
}

impl MockSettings {
    /// Reads `MOCK_HOST`, `MOCK_PORT` (else `PORT`), `MOCK_API_KEY`, `MOCK_LATENCY_MS`,
    /// `MOCK_JITTER_MS`, `MOCK_RATE_429`, `MOCK_RATE_5XX`, `MOCK_RATE_DISCONNECT`.
    pub fn from_env() -> Result<Self, String> {
        let mut s = Self::default();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("{name}: not a number: {v:?}"))
        };
        if let Some(v) = var("MOCK_HOST") {
            s.host = v;
        }
        if let Some(v) = var("MOCK_PORT").or_else(|| var("PORT")) {
            s.port = v
                .parse()
                .map_err(|_| format!("MOCK_PORT: not a port: {v:?}"))?;
        }
        s.api_key = var("MOCK_API_KEY");
        if let Some(v) = var("MOCK_LATENCY_MS") {
            s.latency = Duration::from_millis(number("MOCK_LATENCY_MS", v)? as u64);
        }
        if let Some(v) = var("MOCK_JITTER_MS") {
            s.jitter = Duration::from_millis(number("MOCK_JITTER_MS", v)? as u64);
        }
        if let Some(v) = var("MOCK_RATE_429") {
            s.rate_429 = number("MOCK_RATE_429", v)?;
        }
        if let Some(v) = var("MOCK_RATE_5XX") {
            s.rate_5xx = number("MOCK_RATE_5XX", v)?;
        }
        if let Some(v) = var("MOCK_RATE_DISCONNECT") {
            s.rate_disconnect = number("MOCK_RATE_DISCONNECT", v)?;
        }
        Ok(s)
    }
}

/// What the mock has seen, for tests.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Requests received on the chat endpoints.
    pub requests: u64,
    /// Turns that reached their terminal frame.
    pub completed: u64,
    /// Turns running now, per conversation.
    pub in_flight: HashMap<String, u32>,
    /// The most turns ever running at once for one conversation.
    pub max_in_flight: u32,
    /// Conversations that ever had two turns at once.
    pub violations: Vec<String>,
    /// Message texts of the turns started, per conversation, in start order.
    pub started: HashMap<String, Vec<String>>,
    /// Requests per message text, for the texts that carry `times=N`.
    per_text: HashMap<String, u64>,
    /// The last request body received, per conversation, as sent.
    last_body: HashMap<String, Bytes>,
    /// The last `traceparent` header received, per conversation.
    pub traceparent: HashMap<String, String>,
}

impl Stats {
    /// The last request body received for `conversation`, parsed.
    pub fn last_body(&self, conversation: &str) -> Option<Value> {
        serde_json::from_slice(self.last_body.get(conversation)?).ok()
    }
}

/// `map[key] = value`, allocating the key only when it is new.
fn put<V>(map: &mut HashMap<String, V>, key: &str, value: V) {
    match map.get_mut(key) {
        Some(slot) => *slot = value,
        None => {
            map.insert(key.to_owned(), value);
        }
    }
}

/// The shared state of a running mock.
#[derive(Clone, Default)]
pub struct MockState {
    /// Preferences, history and audio, as the worker keeps them.
    data: Arc<Mutex<data::Store>>,
    settings: Arc<MockSettings>,
    stats: Arc<Mutex<Stats>>,
}

impl MockState {
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn reset(&self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = Stats::default();
        }
    }
}

/// A built mock worker, bound, not yet serving.
pub struct MockWorker {
    port: u16,
    server: Server,
    state: MockState,
}

impl MockWorker {
    pub fn build(settings: MockSettings) -> std::io::Result<Self> {
        let (host, port) = (settings.host.clone(), settings.port);
        let state = MockState {
            data: Arc::default(),
            settings: Arc::new(settings),
            stats: Arc::default(),
        };
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .route(
                    "/health",
                    web::get().to(|| async {
                        HttpResponse::Ok().json(json!({"status": "healthy", "version": "mock"}))
                    }),
                )
                .route("/api/v1/chat/stream", web::post().to(chat_stream))
                .route(
                    "/api/v1/chat/callback",
                    web::post().to(callback::chat_callback),
                )
                .route("/api/v1/chat", web::post().to(chat_final))
                .route(
                    "/api/v1/orgs/{org}/users/{user}/preferences",
                    web::get().to(data::get_preferences),
                )
                .route(
                    "/api/v1/orgs/{org}/users/{user}/preferences",
                    web::put().to(data::put_preferences),
                )
                .route(
                    "/api/v1/orgs/{org}/users/{user}/history",
                    web::get().to(data::get_history),
                )
                .route(
                    "/api/v1/admin/orgs/{org}/users/{user}/history",
                    web::delete().to(data::delete_history),
                )
                .route("/api/v1/audio/{key:.*}", web::get().to(data::get_audio))
                .route("/mock/stats", web::get().to(stats_endpoint))
                .route("/mock/reset", web::post().to(reset_endpoint))
        })
        .disable_signals()
        .shutdown_timeout(1)
        .tcp_nodelay(true)
        // One event loop, as the real worker answers from (and as the bench's machine can
        // spare: a second thread only adds wake-ups between the two).
        .workers(1)
        // Bursts of connections wait in the kernel instead of being dropped for a second:
        // a drainer running 10,000 turns opens thousands at once (std's listener holds 128).
        .backlog(2048)
        .bind((host.as_str(), port))?;
        let port = server
            .addrs()
            .first()
            .map(|a| a.port())
            .ok_or_else(|| std::io::Error::other("the mock worker bound no address"))?;
        let server = server.run();
        Ok(Self {
            port,
            server,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> MockState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let handle = self.server.handle();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            handle.stop(false).await;
        });
        self.server.await?;
        stopper.abort();
        Ok(())
    }
}

/// Per-message directives.
#[derive(Debug, Default)]
struct Directives {
    sleep: Option<Duration>,
    silent: Option<Duration>,
    status: Option<u16>,
    code: Option<String>,
    retry_after_ms: Option<u64>,
    times: Option<u64>,
    disconnect: bool,
    error: bool,
    invalid: bool,
    /// Tool iterations before the final answer (`tools=N`): the real worker's frame sequence.
    tools: Option<u64>,
    /// Progress frames per iteration (`progress=N`).
    progress: Option<u64>,
    /// Time between the frames of a turn (`gap=MS`).
    gap: Option<Duration>,
    /// The answer carries a `voice_audio_url` on the mock's origin (`voice`).
    voice: bool,
    /// A hostile worker: keepalives every 50 ms and never a terminal frame (`forever`).
    forever: bool,
    /// A hostile worker: one progress frame of this many bytes, then the answer (`bigframe=N`).
    bigframe: Option<u64>,
}

impl Directives {
    /// Whether the turn follows the real worker's full sequence ([`script`]).
    fn scripted(&self) -> bool {
        self.tools.is_some() || self.progress.is_some() || self.gap.is_some() || self.voice
    }
}

fn directives(text: &str) -> Directives {
    let mut d = Directives::default();
    let mut rest = text;
    while let Some(start) = rest.find("[mock:") {
        let after = &rest[start + 6..];
        let Some(end) = after.find(']') else { break };
        for part in after[..end].split(',') {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let n = value.trim().parse::<u64>().ok();
            match key.trim() {
                "sleep" => d.sleep = n.map(Duration::from_millis),
                "silent" => d.silent = n.map(Duration::from_millis),
                "status" => d.status = n.and_then(|n| u16::try_from(n).ok()),
                "code" => d.code = Some(value.trim().to_owned()),
                "retry_after_ms" => d.retry_after_ms = n,
                "times" => d.times = n,
                "disconnect" => d.disconnect = true,
                "error" => d.error = true,
                "invalid" => d.invalid = true,
                "tools" => d.tools = n,
                "progress" => d.progress = n,
                "gap" => d.gap = n.map(Duration::from_millis),
                "voice" => d.voice = true,
                "forever" => d.forever = true,
                "bigframe" => d.bigframe = n,
                _ => {}
            }
        }
        rest = &after[end..];
    }
    d
}

/// Counts one running turn of a conversation; the count drops with it.
struct InFlight {
    stats: Arc<Mutex<Stats>>,
    conversation: String,
}

impl InFlight {
    fn start(stats: &Arc<Mutex<Stats>>, conversation: &str, text: &str) -> Self {
        if let Ok(mut s) = stats.lock() {
            let n = match s.in_flight.get_mut(conversation) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    s.in_flight.insert(conversation.to_owned(), 1);
                    1
                }
            };
            s.max_in_flight = s.max_in_flight.max(n);
            if n > 1 {
                s.violations.push(conversation.to_owned());
            }
            match s.started.get_mut(conversation) {
                Some(texts) => texts.push(text.to_owned()),
                None => {
                    s.started
                        .insert(conversation.to_owned(), vec![text.to_owned()]);
                }
            }
        }
        Self {
            stats: stats.clone(),
            conversation: conversation.to_owned(),
        }
    }

    fn finish(self, completed: bool) {
        if completed {
            if let Ok(mut s) = self.stats.lock() {
                s.completed += 1;
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut s) = self.stats.lock() {
            if let Some(n) = s.in_flight.get_mut(&self.conversation) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.in_flight.remove(&self.conversation);
                }
            }
        }
    }
}

fn worker_error(status: u16, body: Value) -> HttpResponse {
    let mut response = HttpResponse::build(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    );
    if status == 429 {
        response.insert_header(("Retry-After", "1"));
    }
    response.json(body)
}

/// The worker's key check on every `/api/*` route, when the mock has a key; `Err` is the
/// answer to send.
fn authorize(req: &HttpRequest, state: &MockState) -> Result<(), Box<HttpResponse>> {
    if let Some(key) = &state.settings.api_key {
        match req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            None => {
                return Err(Box::new(worker_error(
                    401,
                    json!({"error": "Authorization header with Bearer token required"}),
                )))
            }
            Some(token) if token != key => {
                return Err(Box::new(worker_error(
                    403,
                    json!({"error": "Invalid API key"}),
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The chat route a request came in on: the callback fields are required on one, refused on
/// the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Callback,
}

/// The checks the worker makes before a turn starts; `Err` is the answer to send.
struct Accepted {
    conversation: String,
    org: String,
    user_id: String,
    text: String,
    directives: Directives,
}

/// What the mock reads of a chat request, borrowed from the body where it can be: read into a
/// `Value` first, a request cost the mock a tenth of its work.
#[derive(serde::Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    user_id: Option<Text<'a>>,
    #[serde(borrow)]
    client_id: Option<Text<'a>>,
    #[serde(borrow)]
    org: Option<Text<'a>>,
    #[serde(borrow)]
    org_id: Option<Text<'a>>,
    #[serde(borrow)]
    chat_type: Option<Text<'a>>,
    #[serde(borrow)]
    chat_id: Option<Text<'a>>,
    #[serde(borrow)]
    thread_id: Option<Text<'a>>,
    #[serde(borrow)]
    message: Option<Text<'a>>,
    // Refused when present at all, `null` included.
    #[serde(default, deserialize_with = "present")]
    progress_callback_url: bool,
    #[serde(default, deserialize_with = "present")]
    message_key: bool,
    #[serde(default, deserialize_with = "present")]
    is_admin: bool,
}

impl<'a> ChatRequest<'a> {
    /// `None` unless `body` is a JSON object.
    fn read(body: &'a [u8]) -> Option<Self> {
        // serde reads a struct from an array too, by position: not a request.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(body).ok()
    }
}

/// A field's JSON value, read as text only when it is a string (as `Value::as_str` did).
#[derive(serde::Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] &'a serde_json::value::RawValue);

impl<'a> Text<'a> {
    /// The string, when the value is a string that is not empty (escapes decoded).
    fn non_empty(&self) -> Option<Cow<'a, str>> {
        let raw: &'a str = self.0.get();
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        let text = if inner.contains('\\') {
            Cow::Owned(serde_json::from_str(raw).ok()?)
        } else {
            Cow::Borrowed(inner)
        };
        (!text.is_empty()).then_some(text)
    }
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d).map(|_| true)
}

fn accept(
    req: &HttpRequest,
    body: &Bytes,
    state: &MockState,
    route: Route,
) -> Result<Accepted, Box<HttpResponse>> {
    authorize(req, state)?;
    let Some(request) = ChatRequest::read(body) else {
        return Err(Box::new(worker_error(
            400,
            json!({"error": "Invalid JSON body"}),
        )));
    };
    fn field<'a>(value: &Option<Text<'a>>) -> Option<Cow<'a, str>> {
        value.as_ref().and_then(Text::non_empty)
    }
    let (Some(user_id), Some(_)) = (field(&request.user_id), field(&request.client_id)) else {
        return Err(Box::new(worker_error(
            400,
            json!({"error": "user_id and client_id are required"}),
        )));
    };
    for (forbidden, present) in [
        ("progress_callback_url", request.progress_callback_url),
        ("message_key", request.message_key),
        ("is_admin", request.is_admin),
    ] {
        if present && (route == Route::Chat || forbidden == "is_admin") {
            return Err(Box::new(worker_error(
                400,
                json!({"error": format!("{forbidden} is not allowed here")}),
            )));
        }
    }
    let org = field(&request.org).or_else(|| field(&request.org_id));
    let org = org.as_deref().unwrap_or("unfoldingWord");
    let chat_type = field(&request.chat_type)
        .as_deref()
        .and_then(ChatType::parse)
        .unwrap_or(ChatType::Private);
    let conversation = Conversation::for_chat(
        org,
        chat_type,
        &user_id,
        field(&request.chat_id).as_deref(),
        field(&request.thread_id).as_deref(),
    );
    let text = field(&request.message)
        .map(Cow::into_owned)
        .unwrap_or_default();
    let directives = directives(&text);
    let conversation = conversation.to_string();
    let seen = state
        .stats
        .lock()
        .map(|mut s| {
            s.requests += 1;
            // A copy: `body` may share a connection's whole read buffer.
            put(
                &mut s.last_body,
                &conversation,
                Bytes::copy_from_slice(body),
            );
            if let Some(t) = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
            {
                put(&mut s.traceparent, &conversation, t.to_owned());
            }
            if directives.times.is_none() {
                return 1;
            }
            let n = s.per_text.get(&text).copied().unwrap_or(0) + 1;
            put(&mut s.per_text, &text, n);
            n
        })
        .unwrap_or(1);
    let applies = directives.times.is_none_or(|times| seen <= times);
    if let (Some(status), true) = (directives.status, applies) {
        let code = directives.code.clone().unwrap_or_else(|| match status {
            429 => "CONCURRENT_REQUEST_REJECTED".into(),
            s if s >= 500 => "INTERNAL_ERROR".into(),
            _ => "VALIDATION_ERROR".into(),
        });
        let mut body = json!({"error": "Injected failure", "code": code, "message": format!("mock answered {status}")});
        if let Some(ms) = directives.retry_after_ms {
            body["retry_after_ms"] = json!(ms);
        }
        return Err(Box::new(worker_error(status, body)));
    }
    let s = &state.settings;
    if s.rate_429 > 0.0 && fastrand::f64() < s.rate_429 {
        return Err(Box::new(worker_error(
            429,
            json!({"error": "Request in progress", "code": "CONCURRENT_REQUEST_REJECTED", "message": "Another request for this user is currently being processed. Please retry.", "retry_after_ms": 100}),
        )));
    }
    if s.rate_5xx > 0.0 && fastrand::f64() < s.rate_5xx {
        return Err(Box::new(worker_error(
            503,
            json!({"error": "Service Unavailable"}),
        )));
    }
    Ok(Accepted {
        conversation,
        org: org.to_owned(),
        user_id: user_id.into_owned(),
        text,
        directives,
    })
}

fn turn_length(settings: &MockSettings, directives: &Directives) -> Duration {
    if let Some(sleep) = directives.sleep {
        return sleep;
    }
    let jitter = settings.jitter.as_millis() as u64;
    settings.latency
        + Duration::from_millis(if jitter > 0 {
            fastrand::u64(0..=jitter)
        } else {
            0
        })
}

fn chat_response(text: &str) -> Value {
    json!({"responses": [format!("echo: {text}")], "response_language": "en", "voice_audio_base64": null, "voice_audio_url": null})
}

/// The `complete` frame of a turn that echoes `text`: what [`frame`] writes for
/// `{"type": "complete", "response": chat_response(text)}`, keys in the same order, written
/// directly. Built as a `Value` and formatted, it was a fifth of the mock's work per turn.
fn complete_frame(text: &str) -> Bytes {
    let mut out = String::with_capacity(160 + text.len());
    out.push_str(r#"data: {"response":{"response_language":"en","responses":["#);
    out.push_str(&serde_json::to_string(&format!("echo: {text}")).unwrap_or_default());
    out.push_str(r#"],"voice_audio_base64":null,"voice_audio_url":null},"type":"complete"}"#);
    out.push_str("\n\n");
    Bytes::from(out)
}

fn frame(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The frames every turn sends, as [`frame`] writes them (keys in order), made once.
const STATUS_FRAME: &str =
    "data: {\"message\":\"Processing your request...\",\"type\":\"status\"}\n\n";
const PROGRESS_FRAME: &str = "data: {\"text\":\"echo: \",\"type\":\"progress\"}\n\n";
const KEEPALIVE_FRAME: &str = "data: {\"type\":\"keepalive\"}\n\n";

async fn chat_stream(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    let accepted = match accept(&req, &body, &state, Route::Chat) {
        Ok(a) => a,
        Err(response) => return *response,
    };
    let guard = InFlight::start(&state.stats, &accepted.conversation, &accepted.text);
    let length = turn_length(&state.settings, &accepted.directives);
    if accepted.directives.forever || accepted.directives.bigframe.is_some() {
        return hostile(&accepted, guard);
    }
    if accepted.directives.scripted() {
        let origin = format!("http://{}", req.connection_info().host());
        let turn = script::Turn::new(&accepted, &origin, length);
        return script::respond(turn, guard, &state);
    }
    let disconnect = accepted.directives.disconnect
        || (state.settings.rate_disconnect > 0.0
            && fastrand::f64() < state.settings.rate_disconnect);
    let plan = Plan {
        step: 0,
        guard: Some(guard),
        text: accepted.text,
        length,
        silent: accepted.directives.silent,
        disconnect,
        error: accepted.directives.error,
        invalid: accepted.directives.invalid,
    };
    let stream = futures_util::stream::unfold(plan, |mut plan| async move {
        let bytes = plan.next().await?;
        Some((Ok::<_, actix_web::Error>(bytes), plan))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream)
}

/// A worker that never ends its turn (keepalives forever), or sends one frame of `bigframe`
/// bytes, in 64 KiB pieces, before its answer.
fn hostile(accepted: &Accepted, guard: InFlight) -> HttpResponse {
    const PIECE: usize = 64 * 1024;
    struct State {
        forever: bool,
        step: u64,
        left: usize,
        answer: Bytes,
        guard: Option<InFlight>,
    }
    let state = State {
        forever: accepted.directives.forever,
        step: 0,
        left: usize::try_from(accepted.directives.bigframe.unwrap_or(0)).unwrap_or(0),
        answer: complete_frame(&accepted.text),
        guard: Some(guard),
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        s.step += 1;
        let bytes = if s.forever {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Bytes::from_static(KEEPALIVE_FRAME.as_bytes())
        } else if s.step == 1 {
            Bytes::from_static(b"data: {\"type\":\"progress\",\"text\":\"")
        } else if s.left > 0 {
            let n = s.left.min(PIECE);
            s.left -= n;
            Bytes::from(vec![b'x'; n])
        } else {
            let guard = s.guard.take()?;
            guard.finish(true);
            let mut end = b"\"}\n\n".to_vec();
            end.extend_from_slice(&s.answer);
            Bytes::from(end)
        };
        Some((Ok::<_, actix_web::Error>(bytes), s))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .streaming(stream)
}

/// Sleeps, unless there is nothing to wait for: a zero sleep still waits for the timer's next
/// tick (up to 1 ms), which a "0 ms" worker must not add.
async fn pause(length: Duration) {
    if !length.is_zero() {
        tokio::time::sleep(length).await;
    }
}

/// The frames of one streamed turn, produced one at a time.
struct Plan {
    step: u8,
    guard: Option<InFlight>,
    text: String,
    length: Duration,
    silent: Option<Duration>,
    disconnect: bool,
    error: bool,
    invalid: bool,
}

impl Plan {
    async fn next(&mut self) -> Option<Bytes> {
        self.step += 1;
        match self.step {
            1 => {
                if let Some(silent) = self.silent {
                    tokio::time::sleep(silent).await;
                }
                Some(Bytes::from_static(STATUS_FRAME.as_bytes()))
            }
            2 => {
                if self.disconnect {
                    // The connection ends with no terminal frame; the turn "ran".
                    self.guard.take();
                    return None;
                }
                pause(self.length / 2).await;
                Some(Bytes::from_static(PROGRESS_FRAME.as_bytes()))
            }
            3 => Some(Bytes::from_static(KEEPALIVE_FRAME.as_bytes())),
            4 => {
                pause(self.length / 2).await;
                // The turn is over once its terminal frame is produced.
                if let Some(guard) = self.guard.take() {
                    guard.finish(!self.error);
                }
                if self.error {
                    Some(frame(
                        &json!({"type": "error", "error": "Injected turn failure"}),
                    ))
                } else if self.invalid {
                    Some(frame(
                        &json!({"type": "complete", "response": {"nothing": true}}),
                    ))
                } else {
                    Some(complete_frame(&self.text))
                }
            }
            _ => None,
        }
    }
}

async fn chat_final(req: HttpRequest, body: Bytes, state: web::Data<MockState>) -> HttpResponse {
    let accepted = match accept(&req, &body, &state, Route::Chat) {
        Ok(a) => a,
        Err(response) => return *response,
    };
    let busy = state
        .stats
        .lock()
        .map(|s| s.in_flight.contains_key(&accepted.conversation))
        .unwrap_or(false);
    if busy {
        return worker_error(
            429,
            json!({"error": "Request in progress", "code": "CONCURRENT_REQUEST_REJECTED", "message": "Another request for this user is currently being processed. Please retry.", "retry_after_ms": 5000}),
        );
    }
    let guard = InFlight::start(&state.stats, &accepted.conversation, &accepted.text);
    pause(turn_length(&state.settings, &accepted.directives)).await;
    guard.finish(true);
    let mut response = chat_response(&accepted.text);
    response["message_id"] = json!(uuid_like());
    HttpResponse::Ok().json(response)
}

fn uuid_like() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

async fn stats_endpoint(state: web::Data<MockState>) -> HttpResponse {
    let s = state.stats();
    HttpResponse::Ok().json(json!({
        "requests": s.requests,
        "completed": s.completed,
        "in_flight": s.in_flight.values().sum::<u32>(),
        "max_in_flight": s.max_in_flight,
        "violations": s.violations,
        "started": s.started,
        // What a turn waits before its answer, so a benchmark against a running mock can
        // tell the broker's time from the worker's.
        "latency_ms": state.settings.latency.as_millis() as u64,
        "jitter_ms": state.settings.jitter.as_millis() as u64,
    }))
}

async fn reset_endpoint(state: web::Data<MockState>) -> HttpResponse {
    state.reset();
    HttpResponse::NoContent().finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_read_from_the_text() {
        let d =
            directives("hello [mock:status=429,code=QUEUE_DEPTH_EXCEEDED,times=2] [mock:sleep=10]");
        assert_eq!(d.status, Some(429));
        assert_eq!(d.code.as_deref(), Some("QUEUE_DEPTH_EXCEEDED"));
        assert_eq!(d.times, Some(2));
        assert_eq!(d.sleep, Some(Duration::from_millis(10)));
        assert!(!directives("plain").disconnect);
        assert!(directives("[mock:disconnect]").disconnect);
    }

    #[test]
    fn the_fixed_frames_are_the_ones_the_worker_writes() {
        let status = json!({"type": "status", "message": "Processing your request..."});
        assert_eq!(frame(&status), STATUS_FRAME.as_bytes());
        for text in [
            "hi",
            "",
            "quote \" back \\ nl \n é ✓ \u{1}",
            "[mock:sleep=5]",
        ] {
            assert_eq!(
                complete_frame(text),
                frame(&json!({"type": "complete", "response": chat_response(text)})),
                "{text:?}"
            );
        }
        let progress = json!({"type": "progress", "text": "echo: "});
        assert_eq!(frame(&progress), PROGRESS_FRAME.as_bytes());
        assert_eq!(
            frame(&json!({"type": "keepalive"})),
            KEEPALIVE_FRAME.as_bytes()
        );
    }

    #[test]
    fn requests_are_read_as_the_value_based_reader_read_them() {
        let read = |body: &str| {
            ChatRequest::read(body.as_bytes()).map(|r| {
                let text = |t: &Option<Text<'_>>| {
                    t.as_ref().and_then(Text::non_empty).map(Cow::into_owned)
                };
                (
                    text(&r.user_id),
                    text(&r.org),
                    text(&r.message),
                    (r.progress_callback_url, r.message_key, r.is_admin),
                )
            })
        };
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            read(r#" {"user_id":"u","org":"o","message":"a \"b\" \u00e9","extra":{"x":[1]}}"#),
            Some((
                some("u"),
                some("o"),
                some("a \"b\" é"),
                (false, false, false)
            ))
        );
        // not strings, or empty: as if absent
        assert_eq!(
            read(r#"{"user_id":7,"org":"","message":["m"]}"#),
            Some((None, None, None, (false, false, false)))
        );
        // present at all, null included
        assert_eq!(
            read(r#"{"is_admin":null,"message_key":false,"progress_callback_url":"x"}"#),
            Some((None, None, None, (true, true, true)))
        );
        for bad in ["[\"u\"]", "null", "\"x\"", "{\"user_id\":", ""] {
            assert!(read(bad).is_none(), "{bad}");
        }
    }
}
