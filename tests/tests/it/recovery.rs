//! Recovery paths that the happy path never exercises: a lost `BLMOVE` reply (reconcile),
//! a dropped reply subscription, and a waiter on another API process (record re-reads).

use std::time::Duration;

use broker_tests::{
    eventually, settings, wait_finished, Http, TestApi, TestDrainer, TestMock, TestRedis,
};
use redis::AsyncCommands;
use serde_json::json;

#[tokio::test]
async fn reconcile_releases_what_a_lost_blmove_left_in_a_live_drainers_list() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let api = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let http = Http::new();
    let a = http
        .post_message(
            &api.base,
            &json!({"user_id": "zoe", "client_id": "web", "message": "lost"}),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    let id = a.body["message_id"].as_str().unwrap().to_owned();
    // What a BLMOVE whose reply never arrived leaves behind: the conversation sits in the
    // processing list of a drainer that does not know it has it.
    let mut conn = redis.conn().await;
    let moved: Option<String> = redis::cmd("LMOVE")
        .arg("bt:{0}:ready")
        .arg("bt:{0}:processing:d-live")
        .arg("RIGHT")
        .arg("LEFT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(moved.as_deref(), Some("user:unfoldingWord:zoe"));
    // That drainer is alive (so nobody reaps it); only its reconcile can give the work back.
    let _d = TestDrainer::start(settings(
        redis.url(),
        &mock.url,
        &[("DRAINER_ID", "d-live")],
    ))
    .await;
    let done = wait_finished(&http, &api.base, &id, Duration::from_secs(10)).await;
    assert_eq!(done["result"]["responses"], json!(["echo: lost"]));
    let left: Vec<String> = conn
        .lrange("bt:{0}:processing:d-live", 0, -1)
        .await
        .unwrap();
    assert!(left.is_empty());
}

#[tokio::test]
async fn sync_waiters_survive_a_killed_reply_subscription() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    // Record re-reads only every 300 s: the answer must come over pub/sub.
    let s = settings(
        redis.url(),
        &mock.url,
        // Three worker threads, whatever the cores (so the setting is seen to count): each
        // must resubscribe.
        &[
            ("BROKER_WAITER_RECHECK_SECS", "300"),
            ("BROKER_API_WORKERS", "3"),
        ],
    );
    let workers = s.api.workers as i64;
    let api = TestApi::start(s.clone()).await;
    let _d = TestDrainer::start(s).await;
    let http = Http::new();
    let mut conn = redis.conn().await;
    let probe = conn.clone();
    let url = format!("{}/health", api.base);
    // Every worker thread resubscribes on its own after a kill: wait until /health says so
    // and Redis shows one reply channel per worker thread.
    let subscribed = || {
        let http = http.clone();
        let url = url.clone();
        let mut conn = probe.clone();
        async move {
            let health = http.send("GET", &url, &[], None).await.ok()?;
            let channels: Vec<redis::Value> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("bt:replies:*")
                .query_async(&mut conn)
                .await
                .ok()?;
            (health.body["reply_subscription"] == true && channels.len() as i64 == workers)
                .then_some(())
        }
    };
    for round in 0..3 {
        eventually(
            "the reply subscription",
            Duration::from_secs(10),
            subscribed,
        )
        .await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            killed, workers,
            "the API holds one pub/sub connection per worker thread"
        );
        // Whether the reply comes over the new subscription or from the re-read that follows
        // a resubscription, the waiter must get it well before its 300 s re-read.
        let text = format!("after kill {round} [mock:sleep=200]");
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            http.post_message(
                &api.base,
                &json!({"user_id": "yan", "client_id": "web", "message": text}),
                &[],
            ),
        )
        .await
        .expect("answered after the subscription was killed")
        .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    // Subscriptions left over per request would keep the count above one per worker thread.
    eventually(
        "one subscription per API worker thread, not one per request",
        Duration::from_secs(10),
        subscribed,
    )
    .await;
}

#[tokio::test]
async fn a_duplicate_on_another_api_process_is_answered_from_the_record() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let s = settings(redis.url(), &mock.url, &[]);
    let api_a = TestApi::start(s.clone()).await;
    let api_b = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let _d = TestDrainer::start(s).await;
    let http = Http::new();
    let body = json!({"user_id": "xia", "client_id": "web", "message": "once [mock:sleep=800]", "client_message_id": "k-1"});
    let (first, second) = tokio::join!(http.post_message(&api_a.base, &body, &[]), async {
        // Sent while the original runs; B never gets a pub/sub reply for A's message.
        eventually(
            "the original to be running",
            Duration::from_secs(10),
            || async {
                mock.state
                    .stats()
                    .in_flight
                    .contains_key("user:unfoldingWord:xia")
                    .then_some(())
            },
        )
        .await;
        http.post_message(&api_b.base, &body, &[]).await
    });
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(
        (first.status, second.status),
        (200, 200),
        "{} / {}",
        first.text,
        second.text
    );
    assert_eq!(first.body["message_id"], second.body["message_id"]);
    assert_eq!(
        second.body["responses"],
        json!(["echo: once [mock:sleep=800]"])
    );
    assert_eq!(mock.state.stats().requests, 1);
}

#[tokio::test]
async fn a_message_restarted_too_often_fails_without_reaching_the_worker() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let s = settings(redis.url(), &mock.url, &[("BROKER_MAX_CLAIMS", "3")]);
    let api = TestApi::start(s.clone()).await;
    let http = Http::new();
    let a = http
        .post_message(
            &api.base,
            &json!({"user_id": "wes", "client_id": "web", "message": "poison"}),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    let id = a.body["message_id"].as_str().unwrap().to_owned();
    // As if three drainers had died running it.
    let mut conn = redis.conn().await;
    let _: () = conn
        .hset(format!("bt:{{0}}:msg:{id}"), "attempts", 3)
        .await
        .unwrap();
    let _d = TestDrainer::start(s).await;
    let done = wait_finished(&http, &api.base, &id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "RETRIES_EXHAUSTED");
    assert_eq!(
        mock.state.stats().requests,
        0,
        "the worker never saw it again"
    );
    let dead: Vec<String> = conn.lrange("bt:{0}:dead", 0, -1).await.unwrap();
    assert_eq!(dead.len(), 1);
    // The conversation goes on.
    let next = http
        .post_message(
            &api.base,
            &json!({"user_id": "wes", "client_id": "web", "message": "fine"}),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(next.status, 200, "{}", next.text);
}
