//! Delivery through failures: SSE readers across a Redis restart, and a drainer stopped while
//! a callback is still being retried. Real redis-server, the real `broker-drainer` binary.

use std::time::Duration;

use broker_tests::{
    eventually, settings, start_drainer_process, test_env, wait_finished, without_keepalives,
    Behaviour, Http, Receiver, Sse, SseFrame, TestApi, TestMock, TestRedis,
};
use redis::AsyncCommands;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sse_reader_keeps_its_stream_through_a_redis_restart() {
    // Killed and restarted on the same port and data: always a local redis-server.
    let mut redis = TestRedis::start_local();
    let mock = TestMock::start(Duration::from_millis(10));
    let extra = [("BROKER_SSE_KEEPALIVE_MS", "200")];
    let api = TestApi::start(settings(redis.url(), &mock.url, &extra)).await;
    let env = test_env(redis.url(), &mock.url, &extra);
    let _drainer = start_drainer_process(&env);
    let http = Http::new();
    let body =
        json!({"user_id": "lea", "client_id": "web", "message": "through it [mock:sleep=3000]"});
    let a = http
        .post_message(&api.base, &body, &[("prefer", "respond-async")])
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    let id = a.body["message_id"].as_str().unwrap().to_owned();
    let mut sse = Sse::attach(&api.base, &id, None).await;
    let mut frames: Vec<SseFrame> = Vec::new();
    while !frames.iter().any(|f| f.kind() == "status") {
        frames.push(sse.next(LIMIT).await.unwrap());
    }
    redis.kill();
    // The stream stays open (keepalives) while Redis is gone...
    let mut during = 0;
    while during < 3 {
        let frame = sse.next(LIMIT).await.unwrap();
        assert_eq!(frame.kind(), "keepalive", "{frame:?}");
        frames.push(frame);
        during += 1;
    }
    redis.restart();
    // ...and carries on to the end once it is back: nothing missed, nothing twice.
    while let Some(frame) = sse.next(LIMIT).await {
        frame.assert_web_client_readable();
        frames.push(frame);
    }
    let frames = without_keepalives(&frames);
    let kinds: Vec<String> = frames.iter().map(SseFrame::kind).collect();
    assert_eq!(
        kinds,
        ["queued", "status", "progress", "complete"],
        "{frames:#?}"
    );
    let mut fresh = Sse::attach(&api.base, &id, None).await;
    assert_eq!(without_keepalives(&fresh.read_to_end(LIMIT).await), frames);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drainer_stopped_while_retrying_a_callback_stores_the_result_and_the_dead_entry() {
    let receiver = Receiver::start(Behaviour::Always(503)).await;
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(10));
    let allow = format!("127.0.0.1:{}", receiver.port);
    let extra = [
        ("BROKER_CALLBACK_ALLOWLIST", allow.as_str()),
        ("DRAINER_SHUTDOWN_GRACE_SECS", "1"),
    ];
    let api = TestApi::start(settings(redis.url(), &mock.url, &extra)).await;
    let env = test_env(redis.url(), &mock.url, &extra);
    let mut drainer = start_drainer_process(&env);
    let http = Http::new();
    let body = json!({"user_id": "max", "client_id": "whatsapp", "message": "x", "callback_url": receiver.url});
    let a = http.post_message(&api.base, &body, &[]).await.unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    let id = a.body["message_id"].as_str().unwrap().to_owned();
    eventually("a failed delivery attempt", LIMIT, || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    let status = drainer
        .terminate(Duration::from_secs(10))
        .expect("the drainer stops after its grace period");
    assert_eq!(status.code(), Some(0));
    let record = wait_finished(&http, &api.base, &id, LIMIT).await;
    assert_eq!(record["status"], "completed");
    assert_eq!(record["callback"]["status"], "failed");
    assert_eq!(mock.state.stats().requests, 1, "the turn is not run again");
    let mut conn = redis.conn().await;
    let dead: Vec<String> = conn.lrange("bt:{0}:dead", 0, -1).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let entry: Value = serde_json::from_str(&dead[0]).unwrap();
    assert_eq!(entry["kind"], "callback");
    assert_eq!(entry["message_id"], id.as_str());
    assert!(
        entry["last_error"].as_str().unwrap().contains("stopped"),
        "{entry}"
    );
    // The conversation is free for the next message.
    let processing: Vec<String> = conn.keys("bt:{0}:processing:*").await.unwrap();
    assert!(processing.is_empty(), "{processing:?}");
}
