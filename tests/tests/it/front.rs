//! The worker's own contract on the broker (docs/worker-contract.md §1): clients written
//! against the worker, pointed at the broker with only their base URL changed. The chat
//! routes go through the broker's queues; the other routes pass through to the mock worker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_tests::{
    assert_fifo, eventually, start_drainer_process, test_env, Behaviour, Http, Receiver, Sse,
    SseFrame, Stack, TestApi, TestMock, TestRedis, API_KEY,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);
/// The mock worker's own key: the broker calls it with this one.
const WORKER_KEY: &str = "worker-key";
/// A second client key, named `gateway`.
const GATEWAY_KEY: &str = "gateway-secret";

fn keyed_mock(latency: Duration, jitter: Duration) -> TestMock {
    TestMock::start_with(mock_worker::MockSettings {
        port: 0,
        api_key: Some(WORKER_KEY.into()),
        latency,
        jitter,
        ..Default::default()
    })
}

/// The settings every stack here runs with: the worker's key, two client keys (the default
/// one, and `gateway`), the receiver's port allowed, then `extra`.
fn env<'a>(allow: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut pairs = vec![
        ("WORKER_API_KEY", WORKER_KEY),
        ("BROKER_API_KEYS", "web=test-key,gateway=gateway-secret"),
        ("BROKER_CALLBACK_ALLOWLIST", allow),
    ];
    pairs.extend_from_slice(extra);
    pairs
}

async fn stack(mock: TestMock, allow: &str, extra: &[(&str, &str)]) -> Stack {
    Stack::with(TestRedis::start().await, mock, None, &env(allow, extra)).await
}

fn chat_body(user: &str, text: &str) -> Value {
    json!({"client_id": "web", "user_id": user, "org": "unfoldingWord", "message_type": "text", "message": text})
}

fn callback_body(user: &str, text: &str, url: &str, key: &str) -> Value {
    json!({"client_id": "whatsapp", "user_id": user, "org": "unfoldingWord", "message_type": "text",
           "message": text, "message_key": key, "progress_callback_url": url,
           "progress_mode": "iteration", "progress_throttle_seconds": 3})
}

/// A POST as the worker's clients send it: JSON with `Authorization: Bearer <key>`.
async fn post(http: &Http, url: &str, key: &str, body: &Value) -> broker_tests::Answer {
    let bearer = format!("Bearer {key}");
    http.send(
        "POST",
        url,
        &[
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ],
        Some(body.to_string()),
    )
    .await
    .unwrap()
}

/// Opens `/api/v1/chat/stream` as the web client does.
async fn open_stream(base: &str, body: &Value) -> Sse {
    Sse::open(
        "POST",
        &format!("{base}/api/v1/chat/stream"),
        &[
            ("authorization", "Bearer test-key"),
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
        ],
        Some(body.to_string()),
    )
    .await
}

/// A stream's frames to its end, keepalives left out, each checked readable by the web client.
async fn frames_of(sse: &mut Sse) -> Vec<Value> {
    let frames: Vec<SseFrame> = sse.read_to_end(LIMIT).await;
    frames
        .iter()
        .inspect(|f| f.assert_web_client_readable())
        .map(SseFrame::json)
        .filter(|f| f["type"] != "keepalive")
        .collect()
}

/// How many messages of a conversation the broker holds, queued or running.
async fn held(http: &Http, base: &str, user: &str) -> usize {
    let a = http
        .get(&format!("{base}/api/v1/queue/{user}?org=unfoldingWord"))
        .await
        .unwrap();
    a.body["message_ids"].as_array().map_or(0, Vec::len)
}

/// Waits for each conversation's task (its conversation and the texts it sent, in order),
/// then checks that the worker ran them one at a time, in that order.
async fn check_fifo(mock: &TestMock, tasks: Vec<tokio::task::JoinHandle<(String, Vec<String>)>>) {
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.unwrap());
    }
    mock.assert_one_in_flight();
    let stats = mock.state.stats();
    for (conversation, texts) in &sent {
        assert_fifo(conversation, &stats.started[conversation], texts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_conversations_of_ten_through_chat_each_answered_its_own_in_order() {
    let s = stack(TestMock::quick(), "127.0.0.1:1", &[]).await;
    let url = format!("{}/api/v1/chat", s.api.base);
    let mut tasks = Vec::new();
    for conv in 0..50 {
        let (http, url, base) = (s.http.clone(), url.clone(), s.api.base.clone());
        tasks.push(tokio::spawn(async move {
            let user = format!("user{conv}");
            let answered = Arc::new(AtomicUsize::new(0));
            let mut waiting = Vec::new();
            let texts: Vec<String> = (0..10).map(|i| format!("c{conv} m{i}")).collect();
            for (i, text) in texts.iter().enumerate() {
                let (client, url, done) = (http.clone(), url.clone(), answered.clone());
                let body = chat_body(&user, text);
                let text = text.clone();
                waiting.push(tokio::spawn(async move {
                    let a = post(&client, &url, API_KEY, &body).await;
                    done.fetch_add(1, Ordering::AcqRel);
                    assert_eq!(a.status, 200, "{}", a.text);
                    let fields: HashSet<&str> = a
                        .body
                        .as_object()
                        .unwrap()
                        .keys()
                        .map(String::as_str)
                        .collect();
                    assert_eq!(
                        fields,
                        HashSet::from([
                            "message_id",
                            "responses",
                            "response_language",
                            "voice_audio_base64",
                            "voice_audio_url"
                        ]),
                        "{}",
                        a.text
                    );
                    assert!(a.body["message_id"].is_string());
                    assert_eq!(a.body["responses"], json!([format!("echo: {text}")]));
                }));
                // The next one only once this one is queued: the order the broker saw is
                // the order sent. (Answered ones are counted first: one that finishes in
                // between is then counted nowhere, never twice.)
                eventually("the message queued", LIMIT, || async {
                    let done = answered.load(Ordering::Acquire);
                    (done + held(&http, &base, &user).await > i).then_some(())
                })
                .await;
            }
            for w in waiting {
                w.await.unwrap();
            }
            (format!("user:unfoldingWord:{user}"), texts)
        }));
    }
    check_fifo(&s.mock, tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_conversations_of_ten_through_chat_stream_each_streamed_its_own_in_order() {
    let s = stack(TestMock::quick(), "127.0.0.1:1", &[]).await;
    let mut tasks = Vec::new();
    for conv in 0..50 {
        let base = s.api.base.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("user{conv}");
            let texts: Vec<String> = (0..10).map(|i| format!("c{conv} m{i}")).collect();
            // The stream's head comes once the message is queued: opened in order, read
            // together.
            let mut streams = Vec::new();
            for text in &texts {
                let sse = open_stream(&base, &chat_body(&user, text)).await;
                assert_eq!(sse.status, 200, "{}", sse.error_body);
                streams.push(sse);
            }
            let mut readers = Vec::new();
            for (mut sse, text) in streams.into_iter().zip(texts.clone()) {
                readers.push(tokio::spawn(async move {
                    let frames = frames_of(&mut sse).await;
                    let last = frames.last().unwrap();
                    assert_eq!(last["type"], "complete", "{frames:?}");
                    assert_eq!(
                        last["response"]["responses"],
                        json!([format!("echo: {text}")])
                    );
                    // Only the worker's frame types, one terminal.
                    for f in &frames[..frames.len() - 1] {
                        assert!(
                            ["status", "progress", "tool_use", "tool_result"]
                                .contains(&f["type"].as_str().unwrap()),
                            "{f}"
                        );
                    }
                }));
            }
            for r in readers {
                r.await.unwrap();
            }
            (format!("user:unfoldingWord:{user}"), texts)
        }));
    }
    check_fifo(&s.mock, tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_conversations_of_ten_through_chat_callback_called_back_in_order() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let allow = format!("127.0.0.1:{}", receiver.port);
    let s = stack(TestMock::quick(), &allow, &[]).await;
    let url = format!("{}/api/v1/chat/callback", s.api.base);
    let mut tasks = Vec::new();
    for conv in 0..50 {
        let (http, url, hook) = (s.http.clone(), url.clone(), receiver.url.clone());
        tasks.push(tokio::spawn(async move {
            let user = format!("1555000{conv:04}");
            let mut texts = Vec::new();
            for i in 0..10 {
                let text = format!("c{conv} m{i}");
                let key = format!("wamid.{conv}.{i}");
                let a = post(
                    &http,
                    &url,
                    GATEWAY_KEY,
                    &callback_body(&user, &text, &hook, &key),
                )
                .await;
                assert_eq!(a.status, 202, "{}", a.text);
                assert_eq!(
                    a.body.as_object().unwrap().keys().collect::<Vec<_>>(),
                    ["message_id"]
                );
                texts.push(text);
            }
            (user, texts)
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.unwrap());
    }
    let completes = eventually("500 complete callbacks", LIMIT, || async {
        let got: Vec<Value> = receiver
            .accepted()
            .iter()
            .map(|r| r.json())
            .filter(|p| p["type"] == "complete")
            .collect();
        (got.len() >= 500).then_some(got)
    })
    .await;
    assert_eq!(completes.len(), 500);
    for r in receiver.received() {
        assert_eq!(
            r.engine_token, GATEWAY_KEY,
            "X-Engine-Token is the client's key"
        );
        assert!(r.verifies(), "signed as well");
    }
    for (user, texts) in &sent {
        let theirs: Vec<&Value> = completes.iter().filter(|p| p["user_id"] == *user).collect();
        let got: Vec<&str> = theirs.iter().map(|p| p["text"].as_str().unwrap()).collect();
        let expected: Vec<String> = texts.iter().map(|t| format!("echo: {t}")).collect();
        assert_eq!(got, expected, "{user}: each its own, in order");
        for (i, p) in theirs.iter().enumerate() {
            assert!(p["message_key"]
                .as_str()
                .unwrap()
                .ends_with(&format!(".{i}")));
            assert!(
                p.get("chat_id").is_none(),
                "no chat_id on a private chat without one"
            );
        }
    }
    s.mock.assert_one_in_flight();
    let stats = s.mock.state.stats();
    for (user, texts) in &sent {
        let conversation = format!("user:unfoldingWord:{user}");
        assert_fifo(&conversation, &stats.started[&conversation], texts);
    }
}

/// The payloads a receiver got, without `timestamp` (each checked to be one).
fn payloads(receiver: &Receiver) -> Vec<Value> {
    receiver
        .accepted()
        .iter()
        .map(|r| {
            let mut p = r.json();
            let ts = p.as_object_mut().unwrap().remove("timestamp").unwrap();
            assert!(ts.as_str().unwrap().ends_with('Z'), "{ts}");
            p
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_progress_mode_calls_back_what_the_worker_itself_would() {
    let through_broker = Receiver::start(Behaviour::Accept).await;
    let from_worker = Receiver::start(Behaviour::Accept).await;
    let allow = format!("127.0.0.1:{}", through_broker.port);
    let s = stack(
        keyed_mock(Duration::from_millis(5), Duration::ZERO),
        &allow,
        &[],
    )
    .await;
    let http = Http::new();
    // Periodic is timed: frames 780 ms apart against a 2.5 s timer keep every text, and the
    // end, at least 460 ms from a tick.
    for (mode, throttle, gap) in [
        ("complete", 3.0, 20),
        ("iteration", 3.0, 20),
        ("sentence", 3.0, 20),
        ("periodic", 2.5, 780),
    ] {
        let text = format!("Tell me. More please [mock:tools=1,progress=2,gap={gap}]");
        let mut body = callback_body("15551234567", &text, &through_broker.url, mode);
        body["progress_mode"] = json!(mode);
        body["progress_throttle_seconds"] = json!(throttle);
        body["chat_id"] = json!("-100");
        body["thread_id"] = json!("7");
        body["chat_type"] = json!("supergroup");
        let a = post(
            &http,
            &format!("{}/api/v1/chat/callback", s.api.base),
            GATEWAY_KEY,
            &body,
        )
        .await;
        assert_eq!(a.status, 202, "{}", a.text);
        // The same request at the worker itself.
        body["progress_callback_url"] = json!(from_worker.url);
        let a = post(
            &http,
            &format!("{}/api/v1/chat/callback", s.mock.url),
            WORKER_KEY,
            &body,
        )
        .await;
        assert_eq!(a.status, 202, "{}", a.text);
        let ended = |r: &Receiver| {
            r.accepted()
                .iter()
                .any(|c| c.json()["message_key"] == mode && c.json()["type"] == "complete")
        };
        eventually(mode, LIMIT, || async {
            (ended(&through_broker) && ended(&from_worker)).then_some(())
        })
        .await;
        let of_mode = |r: &Receiver| -> Vec<Value> {
            payloads(r)
                .into_iter()
                .filter(|p| p["message_key"] == mode)
                .collect()
        };
        let (ours, theirs) = (of_mode(&through_broker), of_mode(&from_worker));
        assert_eq!(ours, theirs, "{mode}: payload by payload");
        assert!(ours
            .iter()
            .all(|p| p["chat_id"] == "-100" && p["thread_id"] == "7"));
        if mode != "complete" {
            assert!(
                ours.iter().any(|p| p["type"] == "progress"),
                "{mode}: {ours:?}"
            );
        }
    }
    for r in through_broker.received() {
        assert_eq!(r.engine_token, GATEWAY_KEY);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drainer_killed_mid_callback_turns_posts_no_progress_twice() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let allow = format!("127.0.0.1:{}", receiver.port);
    let mock = keyed_mock(Duration::from_millis(5), Duration::ZERO);
    let redis = TestRedis::start().await;
    let pairs = env(&allow, &[]);
    let api = TestApi::start(broker_tests::settings(redis.url(), &mock.url, &pairs)).await;
    let drainer_env = test_env(redis.url(), &mock.url, &pairs);
    let mut first = start_drainer_process(&drainer_env);
    let http = Http::new();
    let url = format!("{}/api/v1/chat/callback", api.base);
    // Turns of three tool iterations, 150 ms between frames (about 2 s each).
    let mut keys = Vec::new();
    for conv in 0..6 {
        for i in 0..3 {
            let key = format!("k{conv}-{i}");
            let text = format!("c{conv} m{i} [mock:tools=3,gap=150]");
            let a = post(
                &http,
                &url,
                GATEWAY_KEY,
                &callback_body(&format!("u{conv}"), &text, &receiver.url, &key),
            )
            .await;
            assert_eq!(a.status, 202, "{}", a.text);
            keys.push(key);
        }
    }
    // Killed once turns have posted progress, in the middle of their iterations.
    eventually("progress under way", LIMIT, || async {
        (receiver
            .accepted()
            .iter()
            .filter(|r| r.json()["type"] == "progress")
            .count()
            >= 4)
            .then_some(())
    })
    .await;
    first.kill9();
    let _second = start_drainer_process(&drainer_env);
    let all = eventually("every complete", Duration::from_secs(120), || async {
        let got: Vec<Value> = receiver.accepted().iter().map(|r| r.json()).collect();
        let done: HashSet<&str> = got
            .iter()
            .filter(|p| p["type"] == "complete")
            .filter_map(|p| p["message_key"].as_str())
            .collect();
        (done.len() == keys.len()).then_some(got.clone())
    })
    .await;
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for p in all.iter().filter(|p| p["type"] == "progress") {
        let k = (
            p["message_key"].as_str().unwrap().to_owned(),
            p["text"].as_str().unwrap().to_owned(),
        );
        *seen.entry(k).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "progress posted twice: {twice:?}");
    // Each message's complete carries the end of its own answer.
    for key in &keys {
        let (conv, i) = key[1..].split_once('-').unwrap();
        let whole = format!(
            "Looking up 1.\nLooking up 2.\nLooking up 3.\necho: c{conv} m{i} [mock:tools=3,gap=150]"
        );
        for p in all
            .iter()
            .filter(|p| p["message_key"] == key.as_str() && p["type"] == "complete")
        {
            let text = p["text"].as_str().unwrap();
            assert!(whole.ends_with(text), "{key}: {text:?}");
        }
    }
    // In order per conversation: the completes of u0 come k0-0, k0-1, k0-2.
    for conv in 0..6 {
        let order: Vec<&str> = all
            .iter()
            .filter(|p| p["type"] == "complete" && p["user_id"] == format!("u{conv}"))
            .filter_map(|p| p["message_key"].as_str())
            .collect();
        let mut dedup = order.clone();
        dedup.dedup();
        let expected: Vec<String> = (0..3).map(|i| format!("k{conv}-{i}")).collect();
        assert_eq!(dedup, expected, "u{conv}: {order:?}");
    }
    mock.assert_one_in_flight();
    // The crash did cut turns: some ran again from the start.
    let stats = mock.state.stats();
    assert!(
        stats
            .started
            .values()
            .any(|s| s.windows(2).any(|w| w[0] == w[1])),
        "no turn ran twice: {:?}",
        stats.started
    );
}

#[tokio::test]
async fn every_rule_of_the_workers_validation_with_its_status_and_body() {
    let s = stack(TestMock::quick(), "127.0.0.1:1", &[]).await;
    let route = |path: &str| format!("{}/api/v1/{path}", s.api.base);
    let chat = chat_body("alice", "hi");
    let callback = callback_body(
        "alice",
        "hi",
        "https://gw.example.org/progress-callback",
        "k1",
    );
    let with = |base: &Value, field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b
    };
    let without = |base: &Value, field: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(field);
        b
    };
    let not_valid = |field: &str, path: &str| {
        format!("{field} is not valid on /api/v1/{path} — use /api/v1/chat/callback")
    };
    let cases: Vec<(&str, Value, String)> =
        vec![
        ("chat", without(&chat, "user_id"), "user_id is required".into()),
        ("chat/stream", with(&chat, "user_id", json!("")), "user_id is required".into()),
        ("chat/callback", without(&callback, "client_id"), "client_id is required".into()),
        (
            "chat",
            with(&chat, "is_admin", json!(false)),
            "is_admin is not a valid field; admin origin is derived from client_id".into(),
        ),
        (
            "chat/callback",
            with(&callback, "is_admin", Value::Null),
            "is_admin is not a valid field; admin origin is derived from client_id".into(),
        ),
        (
            "chat",
            with(&chat, "chat_type", json!("channel")),
            "Invalid chat_type: channel. Must be one of: private, group, supergroup".into(),
        ),
        (
            "chat/stream",
            with(&chat, "chat_type", json!("group")),
            "chat_id is required for group/supergroup chats".into(),
        ),
        (
            "chat",
            with(&chat, "progress_callback_url", json!("https://x.example")),
            not_valid("progress_callback_url", "chat"),
        ),
        (
            "chat/stream",
            with(&chat, "message_key", Value::Null),
            not_valid("message_key", "chat/stream"),
        ),
        (
            "chat",
            with(&chat, "progress_mode", json!("iteration")),
            not_valid("progress_mode", "chat"),
        ),
        (
            "chat/stream",
            with(&chat, "progress_throttle_seconds", json!(3)),
            not_valid("progress_throttle_seconds", "chat/stream"),
        ),
        (
            "chat/callback",
            without(&callback, "progress_callback_url"),
            "progress_callback_url is required on /api/v1/chat/callback".into(),
        ),
        (
            "chat/callback",
            with(&callback, "message_key", json!("")),
            "message_key is required on /api/v1/chat/callback".into(),
        ),
        (
            "chat",
            with(&chat, "response_language_hint", json!("pt-br")),
            "response_language_hint must be a valid ISO 639-1 language code (2 lowercase letters)"
                .into(),
        ),
    ];
    let http = &s.http;
    for (path, body, error) in &cases {
        let a = post(http, &route(path), API_KEY, body).await;
        assert_eq!(a.status, 400, "{path} {body}: {}", a.text);
        assert_eq!(a.body, json!({"error": error}), "{path} {body}");
    }
    // Malformed JSON.
    let bad = http
        .send(
            "POST",
            &route("chat"),
            &[
                ("authorization", "Bearer test-key"),
                ("content-type", "application/json"),
            ],
            Some("{\"user_id\":".into()),
        )
        .await
        .unwrap();
    assert_eq!(
        (bad.status, bad.body.clone()),
        (400, json!({"error": "Invalid JSON body"}))
    );
    // What the worker would only find during the turn is refused before it is queued.
    for (path, body, field) in [
        ("chat", with(&chat, "message", json!("  ")), "message"),
        (
            "chat/callback",
            with(
                &with(&callback, "message_type", json!("audio")),
                "audio_base64",
                json!("T2dnUw=="),
            ),
            "audio_format",
        ),
        (
            "chat/callback",
            with(
                &with(
                    &with(&callback, "message_type", json!("audio")),
                    "audio_base64",
                    json!("T2dnUw=="),
                ),
                "audio_format",
                json!("aac"),
            ),
            "audio_format",
        ),
        (
            "chat/callback",
            with(&callback, "progress_mode", json!("bogus")),
            "progress_mode",
        ),
        (
            "chat/callback",
            with(
                &callback,
                "progress_callback_url",
                json!("http://10.0.0.7/hook"),
            ),
            "progress_callback_url",
        ),
    ] {
        let a = post(http, &route(path), API_KEY, &body).await;
        assert_eq!(a.status, 400, "{path} {body}: {}", a.text);
        let error = a.body["error"].as_str().unwrap();
        assert!(error.contains(field), "{path}: {error}");
    }
    // The worker's auth answers.
    let none = http
        .send(
            "POST",
            &route("chat"),
            &[("content-type", "application/json")],
            Some(chat.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(
        (none.status, none.body),
        (
            401,
            json!({"error": "Authorization header with Bearer token required"})
        )
    );
    let wrong = post(http, &route("chat/stream"), "not-the-key", &chat).await;
    assert_eq!(
        (wrong.status, wrong.body),
        (403, json!({"error": "Invalid API key"}))
    );
    let wrong = post(
        http,
        &route("orgs/unfoldingWord/users/a/preferences"),
        "nope",
        &chat,
    )
    .await;
    assert_eq!(wrong.status, 403);
    // Nothing of it reached the queues or the worker.
    assert_eq!(s.mock.state.stats().requests, 0);
    let mut conn = s.redis.conn().await;
    let keys = broker_tests::all_keys(&mut conn).await;
    assert!(keys.iter().all(|k| !k.contains(":msg:")), "{keys:?}");
}

#[tokio::test]
async fn a_stream_that_waits_opens_with_the_workers_queued_status_and_can_be_resumed() {
    let s = stack(
        keyed_mock(Duration::from_millis(5), Duration::ZERO),
        "127.0.0.1:1",
        &[("BROKER_SSE_KEEPALIVE_MS", "200")],
    )
    .await;
    // Alone: the worker's frames from its first.
    let mut alone = open_stream(&s.api.base, &chat_body("ann", "one [mock:tools=1]")).await;
    assert_eq!(alone.status, 200);
    assert_eq!(alone.headers["content-type"], "text/event-stream");
    let frames = frames_of(&mut alone).await;
    assert_eq!(
        frames[0],
        json!({"type": "status", "message": "Processing your request..."})
    );
    assert_eq!(frames.iter().filter(|f| f["type"] == "complete").count(), 1);
    // Behind a turn of about 2 s: the worker's queued status, keepalives, then the turn.
    let mut first = open_stream(&s.api.base, &chat_body("ann", "slow [mock:gap=200]")).await;
    let mut second = open_stream(&s.api.base, &chat_body("ann", "next")).await;
    let queued = second.next(LIMIT).await.unwrap();
    assert_eq!(
        queued.json(),
        json!({"type": "status", "message": "Queued — processing will begin shortly"})
    );
    let keepalive = second.next(LIMIT).await.unwrap();
    assert_eq!(keepalive.json(), json!({"type": "keepalive"}));
    // Resumed elsewhere after the queued status: the rest, in the worker's framing.
    let message_id = second.headers["x-message-id"].to_str().unwrap().to_owned();
    drop(second);
    let mut resumed = Sse::attach(&s.api.base, &message_id, queued.id.as_deref()).await;
    let rest = frames_of(&mut resumed).await;
    assert_eq!(
        rest[0],
        json!({"type": "status", "message": "Processing your request..."})
    );
    assert_eq!(
        rest.last().unwrap()["response"]["responses"],
        json!(["echo: next"])
    );
    assert!(rest.iter().all(|f| f["type"] != "queued"));
    frames_of(&mut first).await;
}

#[tokio::test]
async fn the_brokers_own_failures_read_as_sentences_and_chat_answers_the_workers_errors() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let allow = format!("127.0.0.1:{}", receiver.port);
    let s = stack(
        keyed_mock(Duration::from_millis(5), Duration::ZERO),
        &allow,
        &[
            ("WORKER_MAX_ATTEMPTS", "2"),
            ("BROKER_MAX_QUEUE_DEPTH", "2"),
        ],
    )
    .await;
    let mut sse = open_stream(&s.api.base, &chat_body("bo", "down [mock:status=503]")).await;
    let frames = frames_of(&mut sse).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(
        frames[0]["error"],
        "The assistant cannot be reached right now. Please try again in a few minutes."
    );
    // The worker's own failure passes as the worker answers /chat.
    let url = format!("{}/api/v1/chat", s.api.base);
    let a = post(
        &s.http,
        &url,
        API_KEY,
        &chat_body("bo", "boom [mock:error]"),
    )
    .await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(a.body["code"], "WORKER_ERROR");
    assert_eq!(a.body["message"], "Injected turn failure");
    // A full queue: the worker's 429.
    let hook = receiver.url.as_str();
    let callback = format!("{}/api/v1/chat/callback", s.api.base);
    let mut answers = Vec::new();
    for i in 0..4 {
        let body = callback_body(
            "bo",
            &format!("wait {i} [mock:gap=300]"),
            hook,
            &format!("k{i}"),
        );
        answers.push(post(&s.http, &callback, API_KEY, &body).await);
    }
    let full = answers
        .iter()
        .find(|a| a.status == 429)
        .unwrap_or_else(|| panic!("a full queue: {answers:?}"));
    assert_eq!(
        full.body,
        json!({"error": "Queue full", "code": "QUEUE_DEPTH_EXCEEDED", "message": "Queue depth limit (2) exceeded."})
    );
    assert!(full.headers.contains_key("retry-after"));
    // A callback client gets the same sentence as the worker's `error` callback.
    let body = callback_body("cy", "down [mock:status=503]", hook, "kd");
    assert_eq!(post(&s.http, &callback, API_KEY, &body).await.status, 202);
    let error = eventually("the error callback", LIMIT, || async {
        receiver
            .accepted()
            .into_iter()
            .find(|r| r.json()["message_key"] == "kd")
    })
    .await;
    assert_eq!(error.engine_token, API_KEY);
    assert_eq!(error.webhook_id.rsplit('.').next(), Some("error"));
    let mut payload = error.json();
    payload.as_object_mut().unwrap().remove("timestamp");
    assert_eq!(
        payload,
        json!({"type": "error", "user_id": "cy", "message_key": "kd",
               "error": "The assistant cannot be reached right now. Please try again in a few minutes."})
    );
}

#[tokio::test]
async fn the_workers_other_routes_pass_through_and_audio_urls_lead_to_the_broker() {
    let s = stack(
        keyed_mock(Duration::from_millis(5), Duration::ZERO),
        "127.0.0.1:1",
        &[("BROKER_PUBLIC_URL", "https://broker.example/")],
    )
    .await;
    let http = &s.http;
    let (ours, theirs) = (s.api.base.as_str(), s.mock.url.as_str());
    let client = [("authorization", "Bearer test-key")];
    let worker = [("authorization", "Bearer worker-key")];
    // A voice answer: its URL is on the broker's public origin, and fetches through it.
    let a = post(
        http,
        &format!("{ours}/api/v1/chat"),
        API_KEY,
        &chat_body("eve@example.org", "speak [mock:voice]"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let voice = a.body["voice_audio_url"].as_str().unwrap();
    let path = voice.strip_prefix("https://broker.example").expect(voice);
    assert!(path.starts_with("/api/v1/audio/audio/"), "{voice}");
    let through = http
        .send("GET", &format!("{ours}{path}"), &client, None)
        .await
        .unwrap();
    let direct = http
        .send("GET", &format!("{theirs}{path}"), &worker, None)
        .await
        .unwrap();
    assert_eq!(through.status, 200);
    assert_eq!(through.text, direct.text);
    for h in ["content-type", "cache-control", "content-length"] {
        assert_eq!(through.headers.get(h), direct.headers.get(h), "{h}");
    }
    let no_key = http
        .send("GET", &format!("{ours}{path}"), &[], None)
        .await
        .unwrap();
    assert_eq!(no_key.status, 401);
    // Preferences and history, as the worker answers them (history's URLs moved too).
    let prefs = "/api/v1/orgs/unfoldingWord/users/eve@example.org/preferences";
    let json_type = ("content-type", "application/json");
    let put = http
        .send(
            "PUT",
            &format!("{ours}{prefs}"),
            &[client[0], json_type],
            Some(r#"{"response_language":"es"}"#.into()),
        )
        .await
        .unwrap();
    assert_eq!(
        (put.status, put.body),
        (200, json!({"response_language": "es"}))
    );
    let bad = http
        .send(
            "PUT",
            &format!("{ours}{prefs}"),
            &[client[0], json_type],
            Some(r#"{"response_language":"xx-yy"}"#.into()),
        )
        .await
        .unwrap();
    let bad_direct = http
        .send(
            "PUT",
            &format!("{theirs}{prefs}"),
            &[worker[0], json_type],
            Some(r#"{"response_language":"xx-yy"}"#.into()),
        )
        .await
        .unwrap();
    assert_eq!(
        (bad.status, &bad.text),
        (bad_direct.status, &bad_direct.text)
    );
    let history = "/api/v1/orgs/unfoldingWord/users/eve@example.org/history?limit=50&offset=0";
    let h = http
        .send("GET", &format!("{ours}{history}"), &client, None)
        .await
        .unwrap();
    assert_eq!(h.status, 200, "{}", h.text);
    assert_eq!(h.body["entries"][0]["voice_audio_url"], voice);
    // Anything else the worker has, or has not: its status and bytes.
    for path in [
        "/api/v1/admin/orgs/unfoldingWord/modes",
        "/public/ptxprint/pdfs/none.pdf",
    ] {
        let through = http
            .send("GET", &format!("{ours}{path}"), &client, None)
            .await
            .unwrap();
        let direct = http
            .send("GET", &format!("{theirs}{path}"), &worker, None)
            .await
            .unwrap();
        assert_eq!(
            (through.status, &through.text),
            (direct.status, &direct.text),
            "{path}"
        );
    }
    // The public files take no key, and so no body.
    let posted = http
        .send(
            "POST",
            &format!("{ours}/public/ptxprint/pdfs/x.pdf"),
            &[],
            Some("x".repeat(1000)),
        )
        .await
        .unwrap();
    assert_eq!(posted.status, 400, "{}", posted.text);
    // Paths that are no one's stay the broker's 404.
    let nothing = http
        .send("GET", &format!("{ours}/elsewhere"), &client, None)
        .await
        .unwrap();
    assert_eq!(nothing.status, 404);
}
