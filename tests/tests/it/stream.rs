//! Stream mode (docs/design.md §4): SSE answers to `POST /api/v1/message` with
//! `Accept: text/event-stream`, and `GET /api/v1/stream` from the start or `Last-Event-ID`,
//! with a real redis-server, the API and drainer, and the mock worker.

use std::time::Duration;

use broker_tests::{
    eventually, settings, wait_finished, without_keepalives, Http, Sse, SseFrame, Stack, TestApi,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(20);

async fn setup(extra: &[(&str, &str)]) -> Stack {
    Stack::start(Duration::from_millis(100), extra).await
}

fn body(user: &str, text: &str) -> Value {
    json!({"user_id": user, "client_id": "web", "message": text})
}

async fn post_stream(base: &str, body: &Value) -> Sse {
    Sse::open(
        "POST",
        &format!("{base}/api/v1/message"),
        &[
            ("content-type", "application/json"),
            ("accept", "text/event-stream"),
        ],
        Some(body.to_string()),
    )
    .await
}

async fn post_async(http: &Http, base: &str, body: &Value) -> String {
    let a = http
        .post_message(base, body, &[("prefer", "respond-async")])
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    a.body["message_id"].as_str().unwrap().to_owned()
}

/// The data of the frames the mock worker sends for a normal turn, byte for byte.
fn mock_frames(text: &str) -> [String; 3] {
    [
        json!({"type": "status", "message": "Processing your request..."}).to_string(),
        json!({"type": "progress", "text": "echo: "}).to_string(),
        json!({"type": "complete", "response": {"responses": [format!("echo: {text}")], "response_language": "en", "voice_audio_base64": null, "voice_audio_url": null}}).to_string(),
    ]
}

/// Keepalives between the first frame and the worker's `status`.
fn keepalives_before_status(kinds: &[String]) -> usize {
    let status_at = kinds.iter().position(|k| k == "status").unwrap();
    kinds[1..status_at]
        .iter()
        .filter(|k| *k == "keepalive")
        .count()
}

fn assert_ends_with_one_complete(kinds: &[String]) {
    assert_eq!(kinds.last().unwrap(), "complete", "{kinds:?}");
    let terminals = kinds.iter().filter(|k| *k == "complete" || *k == "error");
    assert_eq!(terminals.count(), 1, "{kinds:?}");
}

fn kinds(frames: &[SseFrame]) -> Vec<String> {
    frames.iter().map(SseFrame::kind).collect()
}

#[tokio::test]
async fn a_normal_turn_streams_queued_then_the_worker_frames_unchanged() {
    let s = setup(&[]).await;
    let mut sse = post_stream(&s.api.base, &body("alice", "hello")).await;
    assert_eq!(sse.status, 200, "{}", sse.error_body);
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-store");
    let frames = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(
        kinds(&frames),
        ["queued", "status", "progress", "complete"],
        "{frames:#?}"
    );
    let queued = frames[0].json();
    let message_id = queued["message_id"].as_str().unwrap().to_owned();
    assert_eq!(queued["queue_position"], 1);
    // The worker's frames pass through unchanged, each with an id for resuming.
    let data: Vec<&str> = frames[1..].iter().map(|f| f.data.as_str()).collect();
    assert_eq!(data, mock_frames("hello"));
    let ids: Vec<&str> = frames.iter().map(|f| f.id.as_deref().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    });
    sorted.dedup();
    assert_eq!(ids, sorted, "ids must be increasing and unique");
    // The message is recorded like any other.
    let record = wait_finished(&s.http, &s.api.base, &message_id, LIMIT).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["result"]["responses"], json!(["echo: hello"]));
}

#[tokio::test]
async fn a_failed_turn_ends_with_exactly_one_error_frame() {
    let s = setup(&[("WORKER_MAX_ATTEMPTS", "2")]).await;
    // The worker's own error frame passes unchanged.
    let mut sse = post_stream(&s.api.base, &body("bob", "boom [mock:error]")).await;
    let frames = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(
        kinds(&frames),
        ["queued", "status", "progress", "error"],
        "{frames:#?}"
    );
    assert_eq!(
        frames[3].data,
        json!({"type": "error", "error": "Injected turn failure"}).to_string()
    );
    // A failure of the broker's own (the worker never answers 200) gets the broker's frame.
    let mut sse = post_stream(&s.api.base, &body("bob", "down [mock:status=503]")).await;
    let frames = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(kinds(&frames), ["queued", "error"], "{frames:#?}");
    let error = frames[1].json();
    assert_eq!(error["code"], "WORKER_UNAVAILABLE");
    assert!(error["error"]
        .as_str()
        .unwrap()
        .contains("could not be reached"));
    // A turn whose stream breaks: no complete from the worker, one error from the broker.
    let mut sse = post_stream(&s.api.base, &body("bob", "cut [mock:disconnect]")).await;
    let frames = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(kinds(&frames), ["queued", "status", "error"], "{frames:#?}");
    assert_eq!(frames[2].json()["code"], "WORKER_DISCONNECTED");
}

#[tokio::test]
async fn a_message_queued_behind_another_gets_keepalives_while_it_waits() {
    let s = setup(&[("BROKER_SSE_KEEPALIVE_MS", "200")]).await;
    let first = post_async(
        &s.http,
        &s.api.base,
        &body("carol", "long [mock:sleep=1500]"),
    )
    .await;
    eventually("the first turn to start", LIMIT, || {
        let http = s.http.clone();
        let url = format!("{}/api/v1/message/{first}", s.api.base);
        async move { (http.get(&url).await.ok()?.body["status"] == "running").then_some(()) }
    })
    .await;
    let mut sse = post_stream(&s.api.base, &body("carol", "second")).await;
    let frames = sse.read_to_end(LIMIT).await;
    let kinds = kinds(&frames);
    assert_eq!(kinds[0], "queued");
    assert_eq!(frames[0].json()["queue_position"], 1);
    let waiting = keepalives_before_status(&kinds);
    assert!(
        waiting >= 3,
        "expected keepalives while queued for ~1.5 s, got {kinds:?}"
    );
    assert!(
        frames
            .iter()
            .filter(|f| f.kind() == "keepalive")
            .all(|f| f.id.is_none() && f.data == r#"{"type":"keepalive"}"#),
        "keepalives carry no id"
    );
    assert_ends_with_one_complete(&kinds);
}

#[tokio::test]
async fn a_silent_worker_gets_keepalives_from_the_broker() {
    let s = setup(&[("BROKER_SSE_KEEPALIVE_MS", "200")]).await;
    let mut sse = post_stream(&s.api.base, &body("kit", "hush [mock:silent=1200]")).await;
    let frames = sse.read_to_end(LIMIT).await;
    let kinds = kinds(&frames);
    let quiet = keepalives_before_status(&kinds);
    assert!(
        quiet >= 3,
        "expected keepalives while the worker was silent, got {kinds:?}"
    );
    assert_ends_with_one_complete(&kinds);
}

#[tokio::test]
async fn reconnecting_with_last_event_id_resumes_with_no_gap_and_no_repeat() {
    let s = setup(&[]).await;
    let id = post_async(
        &s.http,
        &s.api.base,
        &body("dave", "slow [mock:sleep=1200]"),
    )
    .await;
    // Read the first two frames, then drop the connection mid-turn.
    let mut first = Sse::attach(&s.api.base, &id, None).await;
    assert_eq!(first.status, 200, "{}", first.error_body);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let frame = first.next(LIMIT).await.unwrap();
        if frame.kind() != "keepalive" {
            seen.push(frame);
        }
    }
    drop(first);
    assert_eq!(kinds(&seen), ["queued", "status"]);
    let last = seen[1].id.clone().unwrap();
    let mut resumed = Sse::attach(&s.api.base, &id, Some(&last)).await;
    let rest = without_keepalives(&resumed.read_to_end(LIMIT).await);
    assert_eq!(kinds(&rest), ["progress", "complete"], "{rest:#?}");
    // The same frames, with the same ids, as one uninterrupted read from the start.
    let mut whole = Sse::attach(&s.api.base, &id, None).await;
    let whole = without_keepalives(&whole.read_to_end(LIMIT).await);
    let joined: Vec<SseFrame> = seen.into_iter().chain(rest).collect();
    assert_eq!(joined, whole);
    // Resuming after the terminal frame ends at once with nothing.
    let terminal = whole.last().unwrap().id.clone().unwrap();
    let mut after_end = Sse::attach(&s.api.base, &id, Some(&terminal)).await;
    assert!(after_end.read_to_end(LIMIT).await.is_empty());
}

#[tokio::test]
async fn two_clients_through_two_api_processes_see_the_same_frames() {
    let s = setup(&[]).await;
    let other = TestApi::start(settings(s.redis.url(), &s.mock.url, &[])).await;
    let id = post_async(
        &s.http,
        &s.api.base,
        &body("erin", "shared [mock:sleep=600]"),
    )
    .await;
    let (a, b) = tokio::join!(
        async {
            let mut sse = Sse::attach(&s.api.base, &id, None).await;
            without_keepalives(&sse.read_to_end(LIMIT).await)
        },
        async {
            let mut sse = Sse::attach(&other.base, &id, None).await;
            without_keepalives(&sse.read_to_end(LIMIT).await)
        }
    );
    assert_eq!(kinds(&a), ["queued", "status", "progress", "complete"]);
    assert_eq!(a, b);
}

#[tokio::test]
async fn a_client_that_disconnects_does_not_cancel_or_release_the_turn() {
    let s = setup(&[]).await;
    let mut sse = post_stream(&s.api.base, &body("fred", "keep going [mock:sleep=800]")).await;
    let queued = sse.next(LIMIT).await.unwrap();
    let id = queued.json()["message_id"].as_str().unwrap().to_owned();
    let status = sse.next(LIMIT).await.unwrap();
    assert_eq!(status.kind(), "status");
    drop(sse);
    let next = post_async(&s.http, &s.api.base, &body("fred", "after")).await;
    let record = wait_finished(&s.http, &s.api.base, &id, LIMIT).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["attempts"], 1);
    let record = wait_finished(&s.http, &s.api.base, &next, LIMIT).await;
    assert_eq!(record["status"], "completed");
    let stats = s.mock.state.stats();
    assert_eq!(stats.requests, 2, "each turn ran once");
    assert_eq!(
        stats.started["user:unfoldingWord:fred"],
        ["keep going [mock:sleep=800]", "after"]
    );
    s.mock.assert_one_in_flight();
}

/// A request (URL, headers), the status it must get, and a word its error must hold.
type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);

#[tokio::test]
async fn stream_requests_are_checked() {
    let s = setup(&[]).await;
    let base = &s.api.base;
    let id = post_async(&s.http, base, &body("gina", "x")).await;
    wait_finished(&s.http, base, &id, LIMIT).await;
    let cases: [Case; 6] = [
        (format!("{base}/api/v1/stream"), vec![], 400, "message_id"),
        (
            format!("{base}/api/v1/stream?message_id={id}&since=1"),
            vec![],
            400,
            "since",
        ),
        (
            format!("{base}/api/v1/stream?message_id=bad%20id"),
            vec![],
            400,
            "message_id",
        ),
        (
            format!("{base}/api/v1/stream?message_id={id}"),
            vec![("last-event-id", "yesterday")],
            400,
            "Last-Event-ID",
        ),
        (
            format!("{base}/api/v1/stream?message_id=00000000-0000-0000-0000-000000000000"),
            vec![],
            404,
            "no message",
        ),
        (
            format!("{base}/api/v1/stream?user_id=someone-else&message_id={id}"),
            vec![],
            404,
            "no message",
        ),
    ];
    for (url, headers, status, names) in cases {
        let sse = Sse::open("GET", &url, &headers, None).await;
        assert_eq!(sse.status, status, "{url}: {}", sse.error_body);
        assert!(sse.error_body.contains(names), "{url}: {}", sse.error_body);
    }
    // The older form with user_id works.
    let mut sse = Sse::open(
        "GET",
        &format!("{base}/api/v1/stream?user_id=gina&message_id={id}"),
        &[],
        None,
    )
    .await;
    assert_eq!(sse.status, 200, "{}", sse.error_body);
    assert_eq!(
        kinds(&without_keepalives(&sse.read_to_end(LIMIT).await)),
        ["queued", "status", "progress", "complete"]
    );
    // No key, no stream.
    let answer = s
        .http
        .send(
            "GET",
            &format!("{base}/api/v1/stream?message_id={id}"),
            &[],
            None,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 401);
    // Callback and stream at once is a contradiction.
    let mut b = body("gina", "y");
    b["callback_url"] = json!("https://hooks.example/cb");
    let sse = post_stream(base, &b).await;
    assert_eq!(sse.status, 400);
    assert!(
        sse.error_body.contains("callback_url"),
        "{}",
        sse.error_body
    );
}

#[tokio::test]
async fn a_sync_message_is_not_streamable_and_leaves_no_events() {
    let s = setup(&[]).await;
    let base = &s.api.base;
    let sync = s
        .http
        .post_message(base, &body("hana", "quick"), &[])
        .await
        .unwrap();
    assert_eq!(sync.status, 200, "{}", sync.text);
    let id = sync.body["message_id"].as_str().unwrap().to_owned();
    let sse = Sse::attach(base, &id, None).await;
    assert_eq!(sse.status, 409, "{}", sse.error_body);
    assert!(
        sse.error_body.contains("NOT_STREAMABLE") && sse.error_body.contains("sync mode"),
        "{}",
        sse.error_body
    );
    // Nothing was written for its frames.
    let mut redis = s.redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("bt:{0}:events:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn a_cancelled_message_streams_one_error_frame() {
    let s = setup(&[]).await;
    let base = &s.api.base;
    let first = post_async(&s.http, base, &body("hal", "long [mock:sleep=800]")).await;
    let second = post_async(&s.http, base, &body("hal", "cancel me")).await;
    let answer = s
        .http
        .send(
            "DELETE",
            &format!("{base}/api/v1/message/{second}"),
            &[("x-api-key", broker_tests::API_KEY)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    let mut sse = Sse::attach(base, &second, None).await;
    let frames = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(kinds(&frames), ["queued", "error"]);
    assert_eq!(frames[1].json()["code"], "CANCELLED");
    wait_finished(&s.http, base, &first, LIMIT).await;
}

#[tokio::test]
async fn a_stopping_api_ends_its_streams_and_another_resumes_them() {
    let s = setup(&[]).await;
    let other = TestApi::start(settings(s.redis.url(), &s.mock.url, &[])).await;
    let id = post_async(&s.http, &other.base, &body("ivy", "slow [mock:sleep=1500]")).await;
    let mut sse = Sse::attach(&s.api.base, &id, None).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let frame = sse.next(LIMIT).await.unwrap();
        if frame.kind() != "keepalive" {
            seen.push(frame);
        }
    }
    assert_eq!(kinds(&seen), ["queued", "status"]);
    // A deploy stops this API process: its stream ends without a terminal frame...
    tokio::time::timeout(Duration::from_secs(10), s.api.running.stop())
        .await
        .expect("the API stops promptly with a stream open");
    let rest: Vec<SseFrame> = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert!(rest.is_empty(), "{rest:#?}");
    // ...and the client resumes on another process where it left off.
    let last = seen[1].id.clone().unwrap();
    let mut resumed = Sse::attach(&other.base, &id, Some(&last)).await;
    let rest = without_keepalives(&resumed.read_to_end(LIMIT).await);
    assert_eq!(kinds(&rest), ["progress", "complete"]);
}

#[tokio::test]
async fn a_gone_client_leaves_no_reader_behind() {
    let s = setup(&[("BROKER_SSE_KEEPALIVE_MS", "200")]).await;
    let readers = || async {
        let m = s
            .http
            .send("GET", &format!("{}/metrics", s.api.base), &[], None)
            .await
            .unwrap();
        m.text
            .lines()
            .find_map(|l| l.strip_prefix("broker_sse_readers "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let id = post_async(&s.http, &s.api.base, &body("jay", "slow [mock:sleep=3000]")).await;
    let mut sse = Sse::attach(&s.api.base, &id, None).await;
    sse.next(LIMIT).await.unwrap();
    assert_eq!(readers().await, 1);
    drop(sse);
    eventually("the reader to go", LIMIT, || async {
        (readers().await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_posted_stream_hears_of_frames_on_its_reply_channel_without_subscribing() {
    // No periodic re-read to fall back on: the reader must be told of each frame.
    let s = setup(&[("BROKER_WAITER_RECHECK_SECS", "3600")]).await;
    let mut sse = post_stream(&s.api.base, &body("gina", "slow [mock:sleep=2000]")).await;
    assert_eq!(sse.status, 200, "{}", sse.error_body);
    let mut conn = s.redis.conn().await;
    let mut id = String::new();
    for expected in ["queued", "status", "progress"] {
        let frame = loop {
            let frame = sse.next(LIMIT).await.expect("a frame");
            if frame.kind() != "keepalive" {
                break frame;
            }
        };
        assert_eq!(frame.kind(), expected, "{frame:?}");
        if expected == "queued" {
            id = frame.json()["message_id"].as_str().unwrap().to_owned();
            continue;
        }
        // The frame came while the turn still ran: it was announced, not read after the end.
        let record = s
            .http
            .get(&format!("{}/api/v1/message/{id}", s.api.base))
            .await
            .unwrap();
        assert_eq!(record.body["status"], "running", "after {expected}");
        // The API process that took the message listens on its reply channel only.
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("*events*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(channels, Vec::<String>::new());
    }
    let rest = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(kinds(&rest), ["complete"], "{rest:#?}");
}

#[tokio::test]
async fn frames_announced_after_a_gap_are_read_from_the_stream_instead() {
    let s = setup(&[("BROKER_WAITER_RECHECK_SECS", "3600")]).await;
    let mut sse = post_stream(&s.api.base, &body("hana", "gap [mock:sleep=800]")).await;
    assert_eq!(sse.status, 200, "{}", sse.error_body);
    let queued = sse.next(LIMIT).await.expect("the queued frame");
    assert_eq!(queued.kind(), "queued");
    let id = queued.json()["message_id"].as_str().unwrap().to_owned();
    // An announcement whose frames do not follow on from the queued frame: the reader must
    // not send them, and must not miss what lies between either.
    let mut conn = s.redis.conn().await;
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("*replies*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!channels.is_empty());
    let forged = format!(
        "{id}\n\n99999999999990-0 99999999999990-1\n\
         id: 99999999999990-1\ndata: {{\"type\":\"forged\"}}\n\n"
    );
    // Each of the API's workers has a channel; the one that took the message heeds it.
    for channel in &channels {
        let heard: u64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(&forged)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(heard, 1);
    }
    let rest = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(
        kinds(&rest),
        ["status", "progress", "complete"],
        "{rest:#?}"
    );
    let data: Vec<&str> = rest.iter().map(|f| f.data.as_str()).collect();
    assert_eq!(data, mock_frames("gap [mock:sleep=800]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_never_read_hold_nothing_up() {
    use tokio::io::AsyncWriteExt;
    let s = setup(&[("BROKER_SSE_KEEPALIVE_MS", "100")]).await;
    // A message with a 1 MB frame, and 100 clients reading its stream that never read.
    let text = "big [mock:bigframe=1000000]";
    let id = post_async(&s.http, &s.api.base, &body("nora", text)).await;
    let addr = s.api.base.trim_start_matches("http://").to_owned();
    let request = format!(
        "GET /api/v1/stream?message_id={id} HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {}\r\n\r\n",
        broker_tests::API_KEY
    );
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        stalled.push(c);
    }
    // The turn ends, a client that reads gets all of it, other requests are served.
    assert_eq!(
        wait_finished(&s.http, &s.api.base, &id, LIMIT).await["status"],
        "completed"
    );
    let mut sse = Sse::attach(&s.api.base, &id, None).await;
    let frames = without_keepalives(&sse.read_to_end(LIMIT).await);
    assert_eq!(frames.last().unwrap().kind(), "complete");
    assert!(frames.iter().any(|f| f.data.len() > 1_000_000));
    let other = post_async(&s.http, &s.api.base, &body("otto", "meanwhile")).await;
    assert_eq!(
        wait_finished(&s.http, &s.api.base, &other, LIMIT).await["status"],
        "completed"
    );
    // Gone, they leave no reader behind.
    drop(stalled);
    eventually("no readers left", LIMIT, || async {
        let m = s
            .http
            .send("GET", &format!("{}/metrics", s.api.base), &[], None)
            .await
            .unwrap();
        m.text
            .lines()
            .any(|l| l == "broker_sse_readers 0")
            .then_some(())
    })
    .await;
}
