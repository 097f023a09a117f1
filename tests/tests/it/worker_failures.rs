//! The worker failure table of docs/design.md §5, case by case, through the real API and drainer.

use std::time::Duration;

use broker_tests::{Stack, TestMock, TestRedis};
use serde_json::{json, Value};

async fn case(extra: &[(&str, &str)]) -> Stack {
    Stack::start(Duration::from_millis(10), extra).await
}

async fn send(c: &Stack, user: &str, message: &str) -> (u16, Value) {
    let a = c
        .http
        .post_message(
            &c.api.base,
            &json!({"user_id": user, "client_id": "web", "message": message}),
            &[],
        )
        .await
        .unwrap();
    (a.status, a.body)
}

#[tokio::test]
async fn busy_429s_are_waited_out_and_do_not_count_as_attempts() {
    // One attempt allowed: if a busy 429 counted, the turn would fail.
    let c = case(&[("WORKER_MAX_ATTEMPTS", "1")]).await;
    for code in [
        "CONCURRENT_REQUEST_REJECTED",
        "QUEUE_DEPTH_EXCEEDED",
        "RATE_LIMIT_EXCEEDED",
    ] {
        c.mock.state.reset();
        let text = format!("busy {code} [mock:status=429,code={code},times=2,retry_after_ms=30]");
        let (status, body) = send(&c, "u", &text).await;
        assert_eq!(status, 200, "{code}: {body}");
        assert_eq!(body["responses"], json!([format!("echo: {text}")]));
        assert_eq!(
            c.mock.state.stats().requests,
            3,
            "{code}: two 429s then the turn"
        );
    }
}

#[tokio::test]
async fn a_5xx_before_the_stream_is_retried_with_back_off() {
    let c = case(&[("WORKER_MAX_ATTEMPTS", "3")]).await;
    let (status, body) = send(&c, "u", "flaky [mock:status=503,times=2]").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.mock.state.stats().requests, 3);
}

#[tokio::test]
async fn a_worker_that_keeps_failing_gives_503_worker_unavailable_and_a_dead_entry() {
    let c = case(&[("WORKER_MAX_ATTEMPTS", "3")]).await;
    let (status, body) = send(&c, "u", "down [mock:status=500]").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "WORKER_UNAVAILABLE");
    assert!(body["message_id"].is_string());
    assert_eq!(c.mock.state.stats().requests, 3);
    let dead = c.dead_list().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["code"], "WORKER_UNAVAILABLE");
    assert_eq!(dead[0]["message_id"], body["message_id"]);
    // The conversation moves on.
    let (status, _) = send(&c, "u", "next").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_unreachable_worker_gives_503() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::ZERO);
    let closed = format!(
        "http://127.0.0.1:{}",
        broker_core::local_redis::free_port().unwrap()
    );
    let c = Stack::with(redis, mock, Some(&closed), &[("WORKER_MAX_ATTEMPTS", "2")]).await;
    let (status, body) = send(&c, "u", "anyone?").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "WORKER_UNAVAILABLE");
}

#[tokio::test]
async fn a_4xx_fails_at_once_passing_the_worker_status_and_body() {
    let c = case(&[]).await;
    let (status, body) = send(&c, "u", "bad [mock:status=400,code=VALIDATION_ERROR]").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "VALIDATION_ERROR");
    assert_eq!(body["error"], "Injected failure");
    assert_eq!(c.mock.state.stats().requests, 1);
    // An MCP-limit 429 is a failure, not "busy": passed on, not retried.
    let (status, body) = send(
        &c,
        "u",
        "limit [mock:status=429,code=MCP_CALL_LIMIT_EXCEEDED]",
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "MCP_CALL_LIMIT_EXCEEDED");
    assert_eq!(c.mock.state.stats().requests, 2);
    assert!(
        c.dead_list().await.is_empty(),
        "client-side failures are not dead letters"
    );
}

#[tokio::test]
async fn a_broken_stream_fails_with_worker_disconnected_and_is_not_resent() {
    let c = case(&[]).await;
    let (status, body) = send(&c, "u", "cut [mock:disconnect]").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "WORKER_DISCONNECTED");
    assert_eq!(c.mock.state.stats().requests, 1);
}

#[tokio::test]
async fn a_silent_worker_times_out() {
    let c = case(&[("WORKER_IDLE_TIMEOUT_SECS", "1")]).await;
    let (status, body) = send(&c, "u", "quiet [mock:silent=2500]").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "TIMEOUT");
}

#[tokio::test]
async fn a_worker_that_never_ends_its_turn_is_cut_at_the_turn_limit() {
    // Keepalives every 50 ms: never silent, never done.
    let c = case(&[("WORKER_MAX_TURN_SECS", "1")]).await;
    let (status, body) = send(&c, "u", "endless [mock:forever]").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "TURN_TOO_LONG");
    // The conversation goes on.
    let (status, body) = send(&c, "u", "next").await;
    assert_eq!(
        (status, body["responses"].clone()),
        (200, json!(["echo: next"]))
    );
}

#[tokio::test]
async fn a_frame_larger_than_the_limit_fails_the_turn_and_a_large_one_within_it_passes() {
    let c = case(&[("WORKER_MAX_FRAME_BYTES", "1000000")]).await;
    let (status, body) = send(&c, "u", "huge [mock:bigframe=3000000]").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "FRAME_TOO_LARGE");
    let (status, body) = send(&c, "u", "large [mock:bigframe=500000]").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["responses"],
        json!(["echo: large [mock:bigframe=500000]"])
    );
}

#[tokio::test]
async fn a_100_mb_frame_is_cut_at_the_default_limit() {
    let c = case(&[]).await;
    let (status, body) = send(&c, "u", "huge [mock:bigframe=100000000]").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "FRAME_TOO_LARGE");
    let (status, _) = send(&c, "u", "next").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_error_event_or_an_invalid_complete_fails_the_turn_with_502() {
    let c = case(&[]).await;
    let (status, body) = send(&c, "u", "oops [mock:error]").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "WORKER_ERROR");
    assert_eq!(body["message"], "Injected turn failure");
    let (status, body) = send(&c, "u", "garbled [mock:invalid]").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "INVALID_WORKER_RESPONSE");
    let (status, _) = send(&c, "u", "fine").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_worker_gets_the_bearer_key() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start_with(mock_worker::MockSettings {
        port: 0,
        api_key: Some("worker-secret".into()),
        latency: Duration::from_millis(5),
        ..Default::default()
    });
    let c = Stack::with(redis, mock, None, &[("WORKER_API_KEY", "worker-secret")]).await;
    let (status, body) = send(&c, "u", "with key").await;
    assert_eq!(status, 200, "{body}");
}
