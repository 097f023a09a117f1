//! The client API in-process against real Redis and the mock worker: validation, auth,
//! sync and async modes, idempotency, queue status and health.

use std::time::Duration;

use broker_tests::{
    all_keys, settings, wait_finished, Http, TestApi, TestDrainer, TestMock, TestRedis, API_KEY,
};
use serde_json::{json, Value};

struct Stack {
    redis: TestRedis,
    mock: TestMock,
    api: TestApi,
    http: Http,
}

async fn stack(with_drainer: bool, extra: &[(&str, &str)]) -> (Stack, Option<TestDrainer>) {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(20));
    let s = settings(redis.url(), &mock.url, extra);
    let api = TestApi::start(s.clone()).await;
    let drainer = if with_drainer {
        Some(TestDrainer::start(s).await)
    } else {
        None
    };
    (
        Stack {
            redis,
            mock,
            api,
            http: Http::new(),
        },
        drainer,
    )
}

fn text(user: &str, message: &str) -> Value {
    json!({"user_id": user, "client_id": "web", "message": message})
}

#[tokio::test]
async fn every_validation_rule_is_a_400_that_names_the_field_and_writes_nothing() {
    let (s, _) = stack(false, &[]).await;
    let base = &s.api.base;
    let mut conn = s.redis.conn().await;
    let before = all_keys(&mut conn).await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"client_id": "web", "message": "x"}), "user_id"),
        (
            json!({"user_id": "", "client_id": "web", "message": "x"}),
            "user_id",
        ),
        (
            json!({"user_id": "a\u{1}b", "client_id": "web", "message": "x"}),
            "user_id",
        ),
        (
            json!({"user_id": "a".repeat(257), "client_id": "web", "message": "x"}),
            "user_id",
        ),
        (json!({"user_id": "a", "message": "x"}), "client_id"),
        (
            json!({"user_id": "a", "client_id": "web", "message": " \n "}),
            "message",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "message_type": "image"}),
            "message_type",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_format": "ogg"}),
            "audio_base64",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "QUJD"}),
            "audio_format",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "QUJD", "audio_format": "aac"}),
            "audio_format",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "!!!!", "audio_format": "ogg"}),
            "audio_base64",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "chat_type": "group"}),
            "chat_id",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "chat_type": "channel"}),
            "chat_type",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "response_language_hint": "eng"}),
            "response_language_hint",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "addressed_to_bot": 1}),
            "addressed_to_bot",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "speaker": "x".repeat(300)}),
            "speaker",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "client_message_id": "\u{0}"}),
            "client_message_id",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "progress_callback_url": "https://x"}),
            "progress_callback_url",
        ),
        (
            json!({"user_id": "a", "client_id": "web", "message": "x", "callback_url": "http://x.example/cb"}),
            "callback_url",
        ),
        (json!(["not", "an", "object"]), "body"),
    ];
    for (body, field) in cases {
        let answer = s.http.post_message(base, &body, &[]).await.unwrap();
        assert_eq!(answer.status, 400, "{body}: {}", answer.text);
        assert_eq!(answer.body["code"], "VALIDATION_ERROR");
        let message = answer.body["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{body}: message {message:?} does not name {field}"
        );
    }
    // Malformed JSON, wrong media type, oversized body.
    let answer = s
        .http
        .send(
            "POST",
            &format!("{base}/api/v1/message"),
            &[("x-api-key", API_KEY), ("content-type", "application/json")],
            Some("{".into()),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 400);
    assert!(answer.body["message"].as_str().unwrap().contains("body"));
    let answer = s
        .http
        .send(
            "POST",
            &format!("{base}/api/v1/message"),
            &[("x-api-key", API_KEY), ("content-type", "text/plain")],
            Some("{}".into()),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 415);
    assert_eq!(
        all_keys(&mut conn).await,
        before,
        "a refused request must write nothing to redis"
    );
}

#[tokio::test]
async fn oversized_audio_and_bodies_are_refused() {
    let (s, _) = stack(false, &[("BROKER_MAX_BODY_BYTES", "1000")]).await;
    let big = json!({"user_id": "a", "client_id": "web", "message": "x".repeat(2000)});
    let answer = s.http.post_message(&s.api.base, &big, &[]).await.unwrap();
    assert_eq!(answer.status, 413);
    assert_eq!(answer.body["code"], "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn auth_401_without_a_key_403_with_a_wrong_one() {
    let (s, _) = stack(false, &[]).await;
    let url = format!("{}/api/v1/message", s.api.base);
    let body = Some(text("a", "x").to_string());
    let none = s
        .http
        .send(
            "POST",
            &url,
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(none.status, 401);
    assert_eq!(none.body["code"], "UNAUTHORIZED");
    let wrong = s
        .http
        .send("POST", &url, &[("x-api-key", "nope")], body.clone())
        .await
        .unwrap();
    assert_eq!(wrong.status, 403);
    let bearer = s
        .http
        .send(
            "GET",
            &format!("{}/api/v1/queue/a", s.api.base),
            &[("authorization", &format!("Bearer {API_KEY}"))],
            None,
        )
        .await
        .unwrap();
    assert_eq!(bearer.status, 200);
    for path in ["/api/v1/queue/a", "/api/v1/message/abc"] {
        let answer = s
            .http
            .send("GET", &format!("{}{path}", s.api.base), &[], None)
            .await
            .unwrap();
        assert_eq!(answer.status, 401, "{path}");
    }
    // Health needs no key; routes that are no one's answer in the error shape (those under
    // `/api/` that are not the broker's go to the worker).
    assert_eq!(
        s.http
            .send("GET", &format!("{}/health", s.api.base), &[], None)
            .await
            .unwrap()
            .status,
        200
    );
    let missing = s
        .http
        .get(&format!("{}/v1/nothing", s.api.base))
        .await
        .unwrap();
    assert_eq!(
        (missing.status, missing.body["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
}

#[tokio::test]
async fn sync_mode_answers_with_the_worker_result() {
    let (s, _d) = stack(true, &[]).await;
    let answer = s
        .http
        .post_message(&s.api.base, &json!({"user_id": "alice", "client_id": "web", "message": "hello", "org_id": "uW", "chat_type": "group", "chat_id": "-100", "thread_id": "7", "speaker": "Al", "addressed_to_bot": true, "response_language_hint": "fr"}), &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["status"], "completed");
    assert_eq!(answer.body["responses"], json!(["echo: hello"]));
    for field in [
        "message_id",
        "response_language",
        "voice_audio_url",
        "voice_audio_base64",
        "queue_wait_ms",
        "processing_ms",
    ] {
        assert!(
            answer.body.get(field).is_some(),
            "{field} missing in {}",
            answer.text
        );
    }
    // The worker saw the group conversation key, so the broker and the worker agree.
    assert!(s.mock.state.stats().started.contains_key("group:uW:-100:7"));
    let id = answer.body["message_id"].as_str().unwrap();
    let record = s
        .http
        .get(&format!("{}/api/v1/message/{id}", s.api.base))
        .await
        .unwrap();
    assert_eq!(record.body["status"], "completed");
    assert_eq!(record.body["result"]["responses"], json!(["echo: hello"]));
    assert_eq!(record.body["attempts"], 1);
}

#[tokio::test]
async fn async_mode_queue_status_and_positions() {
    let (s, _) = stack(false, &[]).await;
    let mut ids = Vec::new();
    for i in 1..=3 {
        let a = s
            .http
            .post_message(
                &s.api.base,
                &text("bob", &format!("m{i}")),
                &[("prefer", "respond-async")],
            )
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{}", a.text);
        assert_eq!(a.body["status"], "queued");
        assert_eq!(a.body["queue_position"], i);
        ids.push(a.body["message_id"].as_str().unwrap().to_owned());
    }
    let q = s
        .http
        .get(&format!("{}/api/v1/queue/bob", s.api.base))
        .await
        .unwrap();
    assert_eq!(q.body["conversation"], "user:unfoldingWord:bob");
    assert_eq!(q.body["queue_length"], 3);
    assert_eq!(q.body["is_processing"], false);
    assert_eq!(q.body["message_ids"], json!(ids));
    let m = s
        .http
        .get(&format!("{}/api/v1/message/{}", s.api.base, ids[2]))
        .await
        .unwrap();
    assert_eq!(
        (m.body["status"].as_str(), m.body["queue_position"].as_u64()),
        (Some("queued"), Some(3))
    );
    let bad = s
        .http
        .get(&format!("{}/api/v1/queue/bob?colour=red", s.api.base))
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.body["message"].as_str().unwrap().contains("colour"));
    let unknown = s
        .http
        .get(&format!(
            "{}/api/v1/message/00000000-0000-0000-0000-000000000000",
            s.api.base
        ))
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    let malformed = s
        .http
        .get(&format!("{}/api/v1/message/a%20b", s.api.base))
        .await
        .unwrap();
    assert_eq!(malformed.status, 400);

    // A drainer starts later and runs them all, in order.
    let _d = TestDrainer::start(settings(s.redis.url(), &s.mock.url, &[])).await;
    for id in &ids {
        wait_finished(&s.http, &s.api.base, id, Duration::from_secs(10)).await;
    }
    assert_eq!(
        s.mock.state.stats().started["user:unfoldingWord:bob"],
        vec!["m1", "m2", "m3"]
    );
}

#[tokio::test]
async fn a_repeated_client_message_id_answers_for_the_original() {
    let (s, _d) = stack(true, &[]).await;
    let body = json!({"user_id": "carol", "client_id": "whatsapp", "message": "once", "client_message_id": "wamid.42"});
    let first = s.http.post_message(&s.api.base, &body, &[]).await.unwrap();
    assert_eq!(first.status, 200);
    let again = s.http.post_message(&s.api.base, &body, &[]).await.unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.body["message_id"], first.body["message_id"]);
    let async_again = s
        .http
        .post_message(&s.api.base, &body, &[("prefer", "respond-async")])
        .await
        .unwrap();
    assert_eq!(
        async_again.status, 200,
        "a finished original answers with its result: {}",
        async_again.text
    );
    assert_eq!(
        s.mock.state.stats().requests,
        1,
        "the worker saw the message once"
    );
}

#[tokio::test]
async fn a_full_conversation_gets_429_with_retry_after() {
    let (s, _) = stack(false, &[("BROKER_MAX_QUEUE_DEPTH", "2")]).await;
    for i in 0..2 {
        let a = s
            .http
            .post_message(
                &s.api.base,
                &text("dan", &i.to_string()),
                &[("prefer", "respond-async")],
            )
            .await
            .unwrap();
        assert_eq!(a.status, 202);
    }
    let full = s
        .http
        .post_message(
            &s.api.base,
            &text("dan", "3"),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    assert_eq!(full.status, 429);
    assert_eq!(full.body["code"], "QUEUE_FULL");
    assert!(full.headers.get("retry-after").is_some());
    // Other conversations are not affected.
    let other = s
        .http
        .post_message(
            &s.api.base,
            &text("eve", "1"),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    assert_eq!(other.status, 202);
}

#[tokio::test]
async fn sync_timeout_answers_202_and_the_message_keeps_its_place() {
    let (s, _d) = stack(true, &[("BROKER_SYNC_TIMEOUT_SECS", "1")]).await;
    let slow = s
        .http
        .post_message(&s.api.base, &text("fay", "slow [mock:sleep=2500]"), &[])
        .await
        .unwrap();
    assert_eq!(slow.status, 202, "{}", slow.text);
    assert_eq!(slow.body["status"], "running");
    let id = slow.body["message_id"].as_str().unwrap();
    assert!(slow.headers.get("location").is_some());
    let done = wait_finished(&s.http, &s.api.base, id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "completed");
}

#[tokio::test]
async fn health_is_cheap_and_counts() {
    let (s, _d) = stack(true, &[]).await;
    let h = broker_tests::eventually("a live drainer in health", Duration::from_secs(5), || {
        let http = s.http.clone();
        let url = format!("{}/health", s.api.base);
        async move {
            let a = http.send("GET", &url, &[], None).await.ok()?;
            (a.body["drainers_alive"] == 1).then_some(a)
        }
    })
    .await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body["status"], "healthy");
    assert_eq!(h.body["redis_connected"], true);
    for field in ["active_queues", "messages_processing", "version"] {
        assert!(h.body.get(field).is_some(), "{field}");
    }
}

#[tokio::test]
async fn bad_query_values_are_a_400_in_the_error_shape() {
    let (s, _) = stack(false, &[]).await;
    for query in ["org=%01", "org=", "thread_id=7"] {
        let answer = s
            .http
            .get(&format!("{}/api/v1/queue/bob?{query}", s.api.base))
            .await
            .unwrap();
        assert_eq!(answer.status, 400, "{query}: {}", answer.text);
        assert_eq!(answer.body["code"], "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn cancel_removes_a_queued_message_and_refuses_a_running_one() {
    let (s, _) = stack(false, &[]).await;
    let base = &s.api.base;
    let mut ids = Vec::new();
    for i in 1..=3 {
        let a = s
            .http
            .post_message(
                base,
                &text("gil", &format!("m{i}")),
                &[("prefer", "respond-async")],
            )
            .await
            .unwrap();
        ids.push(a.body["message_id"].as_str().unwrap().to_owned());
    }
    let url = |id: &str| format!("{base}/api/v1/message/{id}");
    let headers = [("x-api-key", API_KEY)];
    let cancelled = s
        .http
        .send("DELETE", &url(&ids[1]), &headers, None)
        .await
        .unwrap();
    assert_eq!(
        (cancelled.status, cancelled.body["status"].as_str()),
        (200, Some("cancelled")),
        "{}",
        cancelled.text
    );
    let again = s
        .http
        .send("DELETE", &url(&ids[1]), &headers, None)
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.body["code"].as_str()),
        (409, Some("NOT_CANCELLABLE"))
    );
    let unknown = s
        .http
        .send(
            "DELETE",
            &url("00000000-0000-0000-0000-000000000000"),
            &headers,
            None,
        )
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    let record = s.http.get(&url(&ids[1])).await.unwrap();
    assert_eq!(record.body["status"], "cancelled");
    assert_eq!(record.body["error"]["code"], "CANCELLED");
    let third = s.http.get(&url(&ids[2])).await.unwrap();
    assert_eq!(
        third.body["queue_position"], 2,
        "positions close up behind a cancelled message"
    );

    // The other two run, in order; the cancelled one never reaches the worker.
    let slow = s
        .http
        .post_message(
            base,
            &text("gil", "slow [mock:sleep=1500]"),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    let slow_id = slow.body["message_id"].as_str().unwrap().to_owned();
    let drainer = TestDrainer::start(settings(s.redis.url(), &s.mock.url, &[])).await;
    for id in [&ids[0], &ids[2]] {
        wait_finished(&s.http, base, id, Duration::from_secs(10)).await;
    }
    broker_tests::eventually("the slow turn to run", Duration::from_secs(10), || async {
        s.mock
            .state
            .stats()
            .in_flight
            .contains_key("user:unfoldingWord:gil")
            .then_some(())
    })
    .await;
    let running = s
        .http
        .send("DELETE", &url(&slow_id), &headers, None)
        .await
        .unwrap();
    assert_eq!(running.status, 409, "{}", running.text);
    assert!(running.body["message"]
        .as_str()
        .unwrap()
        .contains("running"));
    wait_finished(&s.http, base, &slow_id, Duration::from_secs(10)).await;
    assert_eq!(
        s.mock.state.stats().started["user:unfoldingWord:gil"],
        vec!["m1", "m3", "slow [mock:sleep=1500]"]
    );

    // Cancelling the only message of a waiting conversation leaves nothing behind.
    drainer.running.stop().await;
    let lone = s
        .http
        .post_message(base, &text("hal", "alone"), &[("prefer", "respond-async")])
        .await
        .unwrap();
    let lone_id = lone.body["message_id"].as_str().unwrap();
    assert_eq!(
        s.http
            .send("DELETE", &url(lone_id), &headers, None)
            .await
            .unwrap()
            .status,
        200
    );
    let mut conn = s.redis.conn().await;
    let ready: Vec<String> = redis::AsyncCommands::lrange(&mut conn, "bt:{0}:ready", 0, -1)
        .await
        .unwrap();
    assert!(ready.is_empty(), "{ready:?}");
    let conv: bool = redis::AsyncCommands::exists(&mut conn, "bt:{0}:conv:user:unfoldingWord:hal")
        .await
        .unwrap();
    assert!(!conv);

    let metrics = s
        .http
        .send("GET", &format!("{base}/metrics"), &[], None)
        .await
        .unwrap();
    assert_eq!(metrics.status, 200);
    for line in [
        "broker_redis_up 1",
        "broker_messages_cancelled_total 2",
        "broker_messages_completed_total 3",
        "broker_active_queues 0",
    ] {
        assert!(
            metrics.text.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            metrics.text
        );
    }
}

#[tokio::test]
async fn a_sync_client_whose_message_is_cancelled_gets_409() {
    let (s, _) = stack(false, &[]).await;
    let waiting = {
        let http = s.http.clone();
        let base = s.api.base.clone();
        tokio::spawn(async move {
            http.post_message(&base, &text("ida", "never mind"), &[])
                .await
                .unwrap()
        })
    };
    let id = broker_tests::eventually(
        "the sync message to be queued",
        Duration::from_secs(5),
        || async {
            let q = s
                .http
                .get(&format!("{}/api/v1/queue/ida", s.api.base))
                .await
                .ok()?;
            q.body["message_ids"].get(0)?.as_str().map(str::to_owned)
        },
    )
    .await;
    let cancelled = s
        .http
        .send(
            "DELETE",
            &format!("{}/api/v1/message/{id}", s.api.base),
            &[("x-api-key", API_KEY)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.status, 200);
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter is answered")
        .unwrap();
    assert_eq!(
        (answer.status, answer.body["code"].as_str()),
        (409, Some("CANCELLED")),
        "{}",
        answer.text
    );
    assert_eq!(answer.body["message_id"], id.as_str());
}

#[tokio::test]
async fn stopping_the_api_answers_waiting_sync_clients_with_202() {
    let (s, _) = stack(false, &[]).await;
    let waiting = {
        let http = s.http.clone();
        let base = s.api.base.clone();
        tokio::spawn(async move {
            http.post_message(&base, &text("jon", "waits"), &[])
                .await
                .unwrap()
        })
    };
    broker_tests::eventually(
        "the sync message to be queued",
        Duration::from_secs(5),
        || async {
            let q = s
                .http
                .get(&format!("{}/api/v1/queue/jon", s.api.base))
                .await
                .ok()?;
            (q.body["queue_length"] == 1).then_some(())
        },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), s.api.running.stop())
        .await
        .expect("the API stops promptly");
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status, 202, "{}", answer.text);
    assert_eq!(answer.body["status"], "queued");
    assert!(answer.body["status_url"]
        .as_str()
        .unwrap()
        .starts_with("/api/v1/message/"));
}

#[tokio::test]
async fn a_drainer_serves_its_own_health() {
    let (s, drainer) = stack(true, &[]).await;
    let drainer = drainer.unwrap();
    let h = broker_tests::eventually("a heartbeat", Duration::from_secs(5), || {
        let http = s.http.clone();
        let url = drainer.health.clone();
        async move {
            let a = http.send("GET", &url, &[], None).await.ok()?;
            (a.body["redis_connected"] == true).then_some(a)
        }
    })
    .await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body["status"], "healthy");
    assert_eq!(h.body["drainer_id"], drainer.id.as_str());
    assert_eq!(h.body["running_turns"], 0);
}

#[tokio::test]
async fn the_worker_gets_every_field_it_understands_unchanged() {
    let (s, _d) = stack(true, &[]).await;
    // About 1 MB of audio.
    let audio = "T2dnUwACAAAA".repeat(90_000);
    let request = json!({
        "user_id": "123456789", "org_id": "uW", "client_id": "telegram-gateway", "message_type": "audio",
        "message": "caption", "audio_base64": audio, "audio_format": "audio/ogg", "chat_type": "supergroup",
        "chat_id": "-100123", "thread_id": "42", "speaker": "Alice", "addressed_to_bot": true,
        "response_language_hint": "ru", "client_message_id": "tg-1"
    });
    let answer = s
        .http
        .post_message(&s.api.base, &request, &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = s
        .mock
        .state
        .stats()
        .last_body("group:uW:-100123:42")
        .expect("the worker got the message");
    let expected = json!({
        "user_id": "123456789", "org": "uW", "client_id": "telegram-gateway", "message_type": "audio",
        "message": "caption", "audio_base64": audio, "audio_format": "audio/ogg", "chat_type": "supergroup",
        "chat_id": "-100123", "thread_id": "42", "speaker": "Alice", "addressed_to_bot": true,
        "response_language_hint": "ru"
    });
    assert_eq!(
        body, expected,
        "org_id becomes org; broker-only fields stay with the broker"
    );
    // The finished record no longer carries the audio.
    let id = answer.body["message_id"].as_str().unwrap();
    let mut conn = s.redis.conn().await;
    let stored: Option<String> =
        redis::AsyncCommands::hget(&mut conn, format!("bt:{{0}}:msg:{id}"), "body")
            .await
            .unwrap();
    assert!(stored.is_none());
}
