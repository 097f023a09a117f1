//! Callback mode (docs/design.md §8) against a real HTTP receiver: order, signatures, retries within
//! the budget, the dead list, and the SSRF guard.

use std::collections::HashMap;
use std::time::Duration;

use broker_tests::{
    all_keys, eventually, settings, wait_finished, Behaviour, Http, Receiver, Stack, TestApi,
    TestMock, TestRedis, CALLBACK_SECRET,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

/// Redis, the mock worker, an API and a drainer; the receiver's port is allow-listed.
async fn setup(receiver: &Receiver, extra: &[(&str, &str)]) -> Stack {
    let allow = format!("127.0.0.1:{}", receiver.port);
    let mut pairs = vec![("BROKER_CALLBACK_ALLOWLIST", allow.as_str())];
    pairs.extend_from_slice(extra);
    Stack::start(Duration::from_millis(20), &pairs).await
}

fn body(user: &str, text: &str, callback_url: &str) -> Value {
    json!({"user_id": user, "client_id": "whatsapp", "message": text, "callback_url": callback_url})
}

async fn post(http: &Http, base: &str, body: &Value) -> (String, u64) {
    let a = http.post_message(base, body, &[]).await.unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(a.body["status"], "queued");
    (
        a.body["message_id"].as_str().unwrap().to_owned(),
        a.body["queue_position"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn callbacks_arrive_signed_and_in_order_per_conversation() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let s = setup(&receiver, &[]).await;
    let mut sent: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for i in 0..8 {
        for user in ["ann", "ben"] {
            let text = format!("{user} {i}");
            let mut b = body(user, &text, &receiver.url);
            b["client_message_id"] = json!(format!("{user}-{i}"));
            let (id, position) = post(&s.http, &s.api.base, &b).await;
            assert!(position >= 1);
            sent.entry(user.to_owned()).or_default().push((id, text));
        }
    }
    // One failing turn: its callback says so.
    let (failed, _) = post(
        &s.http,
        &s.api.base,
        &body("ann", "[mock:error]", &receiver.url),
    )
    .await;
    let callbacks = eventually("17 callbacks", LIMIT, || async {
        let got = receiver.accepted();
        (got.len() >= 17).then_some(got)
    })
    .await;
    assert_eq!(callbacks.len(), 17, "each callback once");
    for callback in &callbacks {
        assert!(callback.verifies(), "signature of {}", callback.webhook_id);
        let payload = callback.json();
        assert_eq!(payload["message_id"], callback.webhook_id.as_str());
        let now = broker_core::clock::now_ms() / 1000;
        let ts: u64 = callback.timestamp.parse().unwrap();
        assert!(ts <= now && now - ts < 60, "timestamp {ts} vs {now}");
    }
    for (user, messages) in &sent {
        let got: Vec<Value> = callbacks
            .iter()
            .map(|c| c.json())
            .filter(|p| p["user_id"] == user.as_str() && p["status"] == "completed")
            .collect();
        let ids: Vec<&str> = got
            .iter()
            .map(|p| p["message_id"].as_str().unwrap())
            .collect();
        let expected: Vec<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, expected, "{user}: callbacks out of order");
        for (payload, (_, text)) in got.iter().zip(messages) {
            assert_eq!(payload["responses"], json!([format!("echo: {text}")]));
            assert_eq!(
                payload["conversation"],
                format!("user:unfoldingWord:{user}")
            );
            assert!(payload["client_message_id"]
                .as_str()
                .unwrap()
                .starts_with(user.as_str()));
            assert!(payload["queue_wait_ms"].is_u64() && payload["processing_ms"].is_u64());
        }
    }
    let error = callbacks
        .iter()
        .map(|c| c.json())
        .find(|p| p["message_id"] == failed.as_str())
        .unwrap();
    assert_eq!(error["status"], "error");
    assert_eq!(error["code"], "WORKER_ERROR");
    assert_eq!(error["client_message_id"], Value::Null);
    // The record says the callback was delivered.
    let record = wait_finished(&s.http, &s.api.base, &sent["ben"][0].0, LIMIT).await;
    assert_eq!(
        record["callback"],
        json!({"status": "delivered", "attempts": 1})
    );
    let metrics = s
        .http
        .send("GET", &format!("{}/metrics", s.api.base), &[], None)
        .await
        .unwrap()
        .text;
    assert!(
        metrics.contains("\nbroker_callbacks_delivered_total 17\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nbroker_callbacks_failed_total 0\n"),
        "{metrics}"
    );
    // The failed turn is in the dead list as a message; no callback is.
    let dead = s.dead_list().await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0]["kind"], "message");
    assert_eq!(dead[0]["message_id"], failed.as_str());
}

#[tokio::test]
async fn a_receiver_that_fails_twice_gets_each_callback_exactly_once() {
    for status in [503, 429] {
        let receiver = Receiver::start(Behaviour::FailFirst(status, 2)).await;
        let s = setup(&receiver, &[]).await;
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(
                post(
                    &s.http,
                    &s.api.base,
                    &body("cat", &format!("m{i}"), &receiver.url),
                )
                .await
                .0,
            );
        }
        let accepted = eventually("4 accepted callbacks", LIMIT, || async {
            let got = receiver.accepted();
            (got.len() >= 4).then_some(got)
        })
        .await;
        let accepted_ids: Vec<&str> = accepted.iter().map(|r| r.webhook_id.as_str()).collect();
        assert_eq!(accepted_ids, ids, "{status}: once each, in order");
        // Every attempt of one callback carried the same webhook-id and a valid signature.
        let all = receiver.received();
        assert_eq!(all.len(), 12, "{status}: three attempts per callback");
        for id in &ids {
            let attempts: Vec<_> = all.iter().filter(|r| &r.webhook_id == id).collect();
            assert_eq!(attempts.len(), 3);
            assert!(attempts
                .iter()
                .all(|r| r.verifies() && r.body == attempts[0].body));
        }
        let record = wait_finished(&s.http, &s.api.base, &ids[3], LIMIT).await;
        assert_eq!(
            record["callback"],
            json!({"status": "delivered", "attempts": 3})
        );
        assert!(s.dead_list().await.is_empty());
    }
}

#[tokio::test]
async fn a_receiver_that_never_succeeds_lands_in_the_dead_list_and_the_conversation_goes_on() {
    let budget_ms = 1_500u64;
    let receiver = Receiver::start(Behaviour::Always(500)).await;
    let budget = budget_ms.to_string();
    let s = setup(&receiver, &[("BROKER_CALLBACK_BUDGET_MS", &budget)]).await;
    let (first, _) = post(&s.http, &s.api.base, &body("dan", "one", &receiver.url)).await;
    let (second, _) = post(&s.http, &s.api.base, &body("dan", "two", &receiver.url)).await;
    let record = wait_finished(&s.http, &s.api.base, &second, LIMIT).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["callback"]["status"], "failed");
    let dead = s.dead_list().await;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    // Newest first.
    for (entry, id) in dead.iter().zip([&second, &first]) {
        assert_eq!(entry["kind"], "callback");
        assert_eq!(entry["message_id"], id.as_str());
        assert_eq!(entry["payload"]["message_id"], id.as_str());
        assert_eq!(entry["payload"]["status"], "completed");
        assert!(
            entry["last_error"].as_str().unwrap().contains("500"),
            "{entry}"
        );
        assert!(entry["attempts"].as_u64().unwrap() >= 2, "{entry}");
    }
    // Each delivery gave up within its budget.
    let all = receiver.received();
    for id in [&first, &second] {
        let attempts: Vec<_> = all.iter().filter(|r| &r.webhook_id == id).collect();
        let span = attempts.last().unwrap().at - attempts[0].at;
        assert!(
            span <= Duration::from_millis(budget_ms),
            "attempts spread over {span:?}, beyond the budget"
        );
    }
    assert_eq!(s.mock.state.stats().requests, 2);

    // A receiver that refuses for good (4xx other than 408/429) is not retried.
    let gone = Receiver::start(Behaviour::Always(410)).await;
    let s = setup(&gone, &[]).await;
    let (id, _) = post(&s.http, &s.api.base, &body("eve", "x", &gone.url)).await;
    let record = wait_finished(&s.http, &s.api.base, &id, LIMIT).await;
    assert_eq!(
        record["callback"],
        json!({"status": "failed", "attempts": 1})
    );
    assert_eq!(gone.received().len(), 1);
    let dead = s.dead_list().await;
    assert!(dead[0]["last_error"].as_str().unwrap().contains("410"));
}

#[tokio::test]
async fn a_receiver_answering_after_9_s_gets_its_callback_once_with_the_default_settings() {
    let receiver = Receiver::start(Behaviour::Slow(9_000)).await;
    let s = setup(&receiver, &[]).await;
    let (id, _) = post(&s.http, &s.api.base, &body("sue", "patient", &receiver.url)).await;
    let record = eventually("the callback delivered", LIMIT, || async {
        let r = wait_finished(&s.http, &s.api.base, &id, LIMIT).await;
        (r["callback"]["status"] != "pending").then_some(r)
    })
    .await;
    assert_eq!(
        record["callback"],
        json!({"status": "delivered", "attempts": 1}),
        "within BROKER_CALLBACK_TIMEOUT_MS (10 s): one attempt, not cut and sent again"
    );
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn a_receiver_slower_than_the_attempt_timeout_is_given_up_and_the_conversation_goes_on() {
    // It answers after 2 s; each attempt may take 300 ms, all of them 1 s.
    let receiver = Receiver::start(Behaviour::Slow(2_000)).await;
    let s = setup(
        &receiver,
        &[
            ("BROKER_CALLBACK_TIMEOUT_MS", "300"),
            ("BROKER_CALLBACK_BUDGET_MS", "1000"),
        ],
    )
    .await;
    let (slow, _) = post(&s.http, &s.api.base, &body("sly", "first", &receiver.url)).await;
    let (next, _) = post(&s.http, &s.api.base, &body("sly", "second", &receiver.url)).await;
    for id in [&slow, &next] {
        let record = eventually("the callback given up", LIMIT, || async {
            let r = wait_finished(&s.http, &s.api.base, id, LIMIT).await;
            (r["callback"]["status"] == "failed").then_some(r)
        })
        .await;
        assert_eq!(record["status"], "completed");
    }
    let dead = s.dead_list().await;
    assert!(
        dead.iter().any(|d| d["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("no answer within 300 ms")),
        "{dead:?}"
    );
}

#[tokio::test]
async fn callback_urls_are_guarded_unless_allow_listed() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(10));
    let http = Http::new();
    // No allow-list.
    let api = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let mut conn = redis.conn().await;
    let before = all_keys(&mut conn).await;
    for (url, names) in [
        (receiver.url.clone(), "https"),
        ("http://hooks.example/cb".to_owned(), "https"),
        ("https://127.0.0.1/cb".to_owned(), "127.0.0.1"),
        ("https://localhost/cb".to_owned(), "localhost"),
        ("https://[::1]/cb".to_owned(), "::1"),
        ("https://10.1.2.3/cb".to_owned(), "10.1.2.3"),
        ("https://192.168.0.10/cb".to_owned(), "192.168.0.10"),
        (
            "https://169.254.169.254/latest/meta-data".to_owned(),
            "169.254.169.254",
        ),
        ("https://0.0.0.0/cb".to_owned(), "0.0.0.0"),
        ("https://[fd00::1]/cb".to_owned(), "fd00::1"),
        ("https://user:pw@hooks.example/cb".to_owned(), "credentials"),
        ("ftp://hooks.example/cb".to_owned(), "https"),
        ("not a url".to_owned(), "callback_url"),
    ] {
        let a = http
            .post_message(&api.base, &body("fay", "x", &url), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 400, "{url}: {}", a.text);
        let message = a.body["message"].as_str().unwrap();
        assert!(message.contains("callback_url"), "{url}: {message}");
        assert!(message.contains(names), "{url}: {message}");
        assert!(
            !message.contains("pw@"),
            "{url}: the error repeats a credential"
        );
    }
    assert_eq!(all_keys(&mut conn).await, before, "nothing reached Redis");

    // Allow-listed host and port: plain http on loopback is fine; another port is not.
    let allowed = format!("127.0.0.1:{}", receiver.port);
    let api = TestApi::start(settings(
        redis.url(),
        &mock.url,
        &[("BROKER_CALLBACK_ALLOWLIST", &allowed)],
    ))
    .await;
    let a = http
        .post_message(&api.base, &body("fay", "x", &receiver.url), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    let other_port = format!("http://127.0.0.1:{}/cb", receiver.port.wrapping_add(1));
    let a = http
        .post_message(&api.base, &body("fay", "x", &other_port), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 400, "{}", a.text);

    // Without a signing secret, callbacks are refused up front.
    let api = TestApi::start(settings(
        redis.url(),
        &mock.url,
        &[
            ("BROKER_CALLBACK_SECRET", ""),
            ("BROKER_CALLBACK_ALLOWLIST", &allowed),
        ],
    ))
    .await;
    let a = http
        .post_message(&api.base, &body("fay", "x", &receiver.url), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.text.contains("BROKER_CALLBACK_SECRET"), "{}", a.text);
}

/// The README's verification snippet, run as a receiver would run it.
#[tokio::test]
async fn a_signature_verifies_with_the_readme_procedure_and_a_tampered_body_does_not() {
    let receiver = Receiver::start(Behaviour::Accept).await;
    let s = setup(&receiver, &[]).await;
    post(&s.http, &s.api.base, &body("gus", "sign me", &receiver.url)).await;
    let callback = eventually("a callback", LIMIT, || async {
        receiver.accepted().into_iter().next()
    })
    .await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let snippet = readme
        .split("```python verify-webhook")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a ```python verify-webhook block");
    let run = |body: &[u8]| {
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "{snippet}\nimport sys\nbody = sys.stdin.buffer.read()\nprint(verify(\"{CALLBACK_SECRET}\", {{\"webhook-id\": \"{}\", \"webhook-timestamp\": \"{}\", \"webhook-signature\": \"{}\"}}, body))",
                callback.webhook_id, callback.timestamp, callback.signature
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (installed by .ci/run)");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(body).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(run(&callback.body), "True");
    let mut tampered = callback.body.to_vec();
    let at = tampered.iter().position(|b| *b == b'e').unwrap();
    tampered[at] = b'E';
    assert_eq!(run(&tampered), "False");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drainer_killed_while_delivering_leaves_the_callback_to_another_with_the_same_id() {
    use broker_tests::{start_drainer_process, test_env};
    // Five failures: the first drainer is killed long before it could get past them.
    let receiver = Receiver::start(Behaviour::FailFirst(503, 5)).await;
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(10));
    let allow = format!("127.0.0.1:{}", receiver.port);
    let extra = [("BROKER_CALLBACK_ALLOWLIST", allow.as_str())];
    let api = TestApi::start(settings(redis.url(), &mock.url, &extra)).await;
    let env = test_env(redis.url(), &mock.url, &extra);
    let mut victim = start_drainer_process(&env);
    let http = Http::new();
    let (id, _) = post(&http, &api.base, &body("kim", "deliver me", &receiver.url)).await;
    eventually("two failed attempts", LIMIT, || async {
        (receiver.received().len() >= 2).then_some(())
    })
    .await;
    victim.kill9();
    let _heir = start_drainer_process(&env);
    let record = wait_finished(&http, &api.base, &id, LIMIT).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["callback"]["status"], "delivered");
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].webhook_id, id);
    assert!(receiver
        .received()
        .iter()
        .all(|r| r.webhook_id == id && r.verifies()));
    // The turn ran again (at-least-once); the receiver can tell by the webhook-id.
    assert_eq!(mock.state.stats().requests, 2);
}

#[tokio::test]
async fn a_receiver_that_trickles_its_answer_is_bounded_by_the_attempt_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Reads the request, then answers one byte every 50 ms, for ever.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buffer).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n"
                    .iter()
                    .chain(std::iter::repeat(&b'x'));
                for byte in answer {
                    if socket.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    });
    let allow = format!("127.0.0.1:{port}");
    let s = Stack::start(
        Duration::from_millis(20),
        &[
            ("BROKER_CALLBACK_ALLOWLIST", allow.as_str()),
            ("BROKER_CALLBACK_TIMEOUT_MS", "500"),
            ("BROKER_CALLBACK_BUDGET_MS", "1500"),
        ],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/hook");
    let (first, _) = post(&s.http, &s.api.base, &body("tom", "first", &url)).await;
    let (second, _) = post(&s.http, &s.api.base, &body("tom", "second", &url)).await;
    for id in [&first, &second] {
        let record = eventually("the callback given up", LIMIT, || async {
            let r = wait_finished(&s.http, &s.api.base, id, LIMIT).await;
            (r["callback"]["status"] == "failed").then_some(r)
        })
        .await;
        assert_eq!(record["status"], "completed");
    }
    server.abort();
}
