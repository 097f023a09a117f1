//! TLS to the worker and to a callback receiver, end to end: the drainer reaches both through
//! a TLS front whose certificate a test authority signed (`tests/fixtures/tls`), trusting that
//! authority through `BROKER_EXTRA_CA_FILE`, and refuses the same front without it.

use std::time::Duration;

use broker_tests::{
    eventually, tls_fixture, tls_proxy, Answer, Behaviour, Receiver, Stack, TestMock, TestRedis,
};
use serde_json::{json, Value};

/// Posts `body` to the stack's API.
async fn post(s: &Stack, body: &Value) -> Answer {
    s.http.post_message(&s.api.base, body, &[]).await.unwrap()
}

/// The port of a `http://127.0.0.1:<port>` URL.
fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_worker_and_a_callback_receiver_are_reached_over_tls_with_the_extra_ca() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::ZERO);
    let worker = format!("https://127.0.0.1:{}", tls_proxy(port_of(&mock.url)).await);
    let receiver = Receiver::start(Behaviour::Accept).await;
    let front = tls_proxy(receiver.port).await;
    let callback_url = receiver.url.replacen(
        &format!("http://127.0.0.1:{}", receiver.port),
        &format!("https://127.0.0.1:{front}"),
        1,
    );
    assert!(callback_url.starts_with("https://"), "{callback_url}");
    let ca = tls_fixture("ca.pem");
    let allow = format!("127.0.0.1:{front}");
    let s = Stack::with(
        redis,
        mock,
        Some(&worker),
        &[
            ("BROKER_EXTRA_CA_FILE", ca.to_str().unwrap()),
            ("BROKER_CALLBACK_ALLOWLIST", &allow),
        ],
    )
    .await;

    let answer = post(
        &s,
        &json!({"user_id": "tls", "client_id": "web", "message": "over tls"}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["responses"], json!(["echo: over tls"]));

    let queued = post(
        &s,
        &json!({"user_id": "tls-cb", "client_id": "web", "message": "call me back",
                "callback_url": callback_url}),
    )
    .await;
    assert_eq!(queued.status, 202, "{}", queued.text);
    let delivered = eventually("the callback over TLS", Duration::from_secs(30), || async {
        let accepted = receiver.accepted();
        (!accepted.is_empty()).then_some(accepted)
    })
    .await;
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].verifies(), "the signature does not verify");
    let payload = delivered[0].json();
    assert_eq!(payload["status"], "completed", "{payload}");
    assert_eq!(
        payload["message_id"], queued.body["message_id"],
        "{payload}"
    );
}

#[tokio::test]
async fn without_the_extra_ca_the_same_worker_is_not_trusted() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::ZERO);
    let worker = format!("https://127.0.0.1:{}", tls_proxy(port_of(&mock.url)).await);
    let s = Stack::with(redis, mock, Some(&worker), &[("WORKER_MAX_ATTEMPTS", "2")]).await;
    let answer = post(
        &s,
        &json!({"user_id": "tls", "client_id": "web", "message": "trust me"}),
    )
    .await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(answer.body["code"], "WORKER_UNAVAILABLE");
    assert!(
        s.mock.state.stats().started.is_empty(),
        "the worker was reached through an untrusted certificate"
    );
}
