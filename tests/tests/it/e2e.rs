//! Process-level end-to-end tests: real redis-server, the real `broker-drainer` binary, the
//! API and the mock worker, and crashes in the middle of turns.

use std::collections::HashMap;
use std::time::Duration;

use broker_tests::{
    assert_fifo, eventually, settings, start_drainer_process, test_env, wait_finished, Http,
    ProcessStack, TestApi, TestDrainer, TestMock, TestRedis,
};
use redis::AsyncCommands;
use serde_json::{json, Value};

fn body(user: &str, text: &str) -> Value {
    json!({"user_id": user, "client_id": "web", "message": text})
}

fn texts(conv: usize, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{conv} m{i}")).collect()
}

/// Sends a conversation's messages one after another in async mode; returns their ids.
async fn send_async(http: &Http, base: &str, user: &str, texts: &[String]) -> Vec<String> {
    let mut ids = Vec::new();
    for text in texts {
        let a = http
            .post_message(base, &body(user, text), &[("prefer", "respond-async")])
            .await
            .unwrap();
        assert_eq!(a.status, 202, "{}", a.text);
        ids.push(a.body["message_id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Waits for every message of every conversation, then checks replies, one-in-flight and
/// FIFO (a turn cut by a crash may run twice in a row); returns the mock's record.
async fn verify_all(
    http: &Http,
    base: &str,
    mock: &TestMock,
    all: &[(usize, Vec<String>, Vec<String>)],
) -> mock_worker::Stats {
    for (_, ids, texts) in all {
        check_replies(http, base, ids, texts, Duration::from_secs(60)).await;
    }
    let stats = mock.state.stats();
    mock.assert_one_in_flight();
    for (conv, _, texts) in all {
        let key = format!("user:unfoldingWord:user{conv}");
        assert_fifo(&key, &stats.started[&key], texts);
    }
    stats
}

/// Waits for every message and checks that each got its own reply.
async fn check_replies(http: &Http, base: &str, ids: &[String], texts: &[String], limit: Duration) {
    for (id, text) in ids.iter().zip(texts) {
        let done = wait_finished(http, base, id, limit).await;
        assert_eq!(done["status"], "completed", "{text}: {done}");
        assert_eq!(
            done["result"]["responses"],
            json!([format!("echo: {text}")]),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_conversations_of_twenty_messages_each_answered_once_in_order() {
    let ProcessStack {
        redis,
        mock,
        api,
        http,
        ..
    } = &ProcessStack::start(TestMock::quick(), 2, &[]).await;

    let mut tasks = Vec::new();
    for conv in 0..50 {
        let http = http.clone();
        let base = api.base.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("user{conv}");
            let texts = texts(conv, 20);
            if conv % 2 == 0 {
                // Sync: each message waits for its own answer before the next is sent.
                for text in &texts {
                    let a = http
                        .post_message(&base, &body(&user, text), &[])
                        .await
                        .unwrap();
                    assert_eq!(a.status, 200, "{}", a.text);
                    assert_eq!(a.body["responses"], json!([format!("echo: {text}")]));
                }
            } else {
                // Async: all twenty queue up behind each other, then the results are read.
                let ids = send_async(&http, &base, &user, &texts).await;
                check_replies(&http, &base, &ids, &texts, Duration::from_secs(60)).await;
            }
            (format!("user:unfoldingWord:{user}"), texts)
        }));
    }
    let mut sent = HashMap::new();
    for t in tasks {
        let (conv, texts) = t.await.unwrap();
        sent.insert(conv, texts);
    }
    let stats = mock.state.stats();
    assert_eq!(
        stats.requests, 1000,
        "each message reached the worker exactly once"
    );
    assert_eq!(stats.completed, 1000);
    mock.assert_one_in_flight();
    for (conv, texts) in &sent {
        assert_eq!(
            stats.started[conv], *texts,
            "{conv}: strict FIFO, no repeats"
        );
    }
    let mut conn = redis.conn().await;
    let ready: u64 = conn.llen("bt:{0}:ready").await.unwrap();
    assert_eq!(ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_one_drainer_loses_nothing_and_keeps_order() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(300));
    let api = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let env = test_env(redis.url(), &mock.url, &[]);
    let mut victim = start_drainer_process(&env);
    let _survivor = start_drainer_process(&env);
    let http = Http::new();

    let mut all = Vec::new();
    for conv in 0..12 {
        let texts = texts(conv, 8);
        let ids = send_async(&http, &api.base, &format!("user{conv}"), &texts).await;
        all.push((conv, ids, texts));
    }
    // Kill one drainer while turns are running on both.
    eventually(
        "turns in flight on the worker",
        Duration::from_secs(10),
        || async {
            let s = mock.state.stats();
            (s.completed >= 12 && s.in_flight.len() >= 6).then_some(())
        },
    )
    .await;
    victim.kill9();

    let stats = verify_all(&http, &api.base, &mock, &all).await;
    assert!(
        stats.requests >= 96,
        "at-least-once: {} turns for 96 messages",
        stats.requests
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_running_turns_exits_0_and_loses_nothing() {
    let redis = TestRedis::start().await;
    // Turns longer than the dead-after period: a draining drainer must keep its heartbeat,
    // or another drainer would reap and re-run turns that are still running.
    let mock = TestMock::start(Duration::from_millis(3000));
    let api = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let env = test_env(
        redis.url(),
        &mock.url,
        &[("DRAINER_SHUTDOWN_GRACE_SECS", "30")],
    );
    let mut drainer = start_drainer_process(&env);
    let http = Http::new();

    let mut all = Vec::new();
    for conv in 0..3 {
        let texts = texts(conv, 2);
        let ids = send_async(&http, &api.base, &format!("user{conv}"), &texts).await;
        all.push((conv, ids, texts));
    }
    eventually("three turns running", Duration::from_secs(10), || async {
        (mock.state.stats().in_flight.len() == 3).then_some(())
    })
    .await;
    let pid = drainer.pid();
    // SAFETY: signalling our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    // Another drainer is running while the first one drains, ready to reap it.
    let _other = TestDrainer::start(settings(redis.url(), &mock.url, &[])).await;
    let status = drainer
        .wait(Duration::from_secs(20))
        .expect("the drainer exits within the grace period");
    assert_eq!(status.code(), Some(0), "a drained stop exits 0");
    for (_, ids, _) in &all {
        let first = http
            .get(&format!("{}/api/v1/message/{}", api.base, ids[0]))
            .await
            .unwrap();
        assert_eq!(
            first.body["status"], "completed",
            "the running turn finished"
        );
        assert_eq!(first.body["attempts"], 1, "and was never run again");
    }
    let mut conn = redis.conn().await;
    let members: Vec<String> = conn.zrange("bt:{0}:drainers", 0, -1).await.unwrap();
    assert_eq!(
        members.len(),
        1,
        "a drained drainer deregisters: {members:?}"
    );

    // The other drainer runs the rest; every message once, in order.
    let stats = verify_all(&http, &api.base, &mock, &all).await;
    for (conv, _, texts) in &all {
        assert_eq!(
            stats.started[&format!("user:unfoldingWord:user{conv}")],
            *texts,
            "no turn ran twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_mid_run_answers_503_then_loses_nothing() {
    // Killed and restarted on the same port and data: always a local redis-server.
    let mut redis = TestRedis::start_local();
    let mock = TestMock::start(Duration::from_millis(200));
    let api = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let env = test_env(redis.url(), &mock.url, &[]);
    let _drainer = start_drainer_process(&env);
    let http = Http::new();

    let mut all = Vec::new();
    for conv in 0..10 {
        let texts = texts(conv, 4);
        let ids = send_async(&http, &api.base, &format!("user{conv}"), &texts).await;
        all.push((conv, ids, texts));
    }
    eventually("turns in flight", Duration::from_secs(10), || async {
        (mock.state.stats().in_flight.len() >= 5).then_some(())
    })
    .await;

    redis.kill();
    let refused = http
        .post_message(
            &api.base,
            &body("late", "while down"),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.body["code"], "REDIS_UNAVAILABLE");
    let health = http
        .send("GET", &format!("{}/health", api.base), &[], None)
        .await
        .unwrap();
    assert_eq!(health.status, 503);
    assert_eq!(health.body["redis_connected"], false);
    // Let some turns end while Redis is down: their outcomes wait in the drainer.
    let before = mock.state.stats().completed;
    eventually(
        "a turn to end while redis is down",
        Duration::from_secs(10),
        || async { (mock.state.stats().completed > before).then_some(()) },
    )
    .await;
    redis.restart();

    let stats = verify_all(&http, &api.base, &mock, &all).await;
    // Nothing was enqueued while Redis was down.
    assert!(!stats.started.contains_key("user:unfoldingWord:late"));
    // Every process reconnected: sync replies arrive over pub/sub again.
    eventually(
        "the reply subscription to come back",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let url = format!("{}/health", api.base);
            async move {
                (http.send("GET", &url, &[], None).await.ok()?.body["reply_subscription"] == true)
                    .then_some(())
            }
        },
    )
    .await;
    let after = http
        .post_message(&api.base, &body("after", "back again"), &[])
        .await
        .unwrap();
    assert_eq!(after.status, 200, "{}", after.text);
    assert_eq!(after.body["responses"], json!(["echo: back again"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_random_worker_failures_and_repeated_kill_9() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start_with(mock_worker::MockSettings {
        port: 0,
        latency: Duration::from_millis(40),
        jitter: Duration::from_millis(60),
        rate_429: 0.05,
        rate_5xx: 0.05,
        rate_disconnect: 0.02,
        ..Default::default()
    });
    let api = TestApi::start(settings(redis.url(), &mock.url, &[])).await;
    let env = test_env(redis.url(), &mock.url, &[]);
    let mut drainers: Vec<_> = (0..3).map(|_| start_drainer_process(&env)).collect();
    let http = Http::new();

    let mut all = Vec::new();
    for conv in 0..20 {
        let texts = texts(conv, 15);
        let ids = send_async(&http, &api.base, &format!("user{conv}"), &texts).await;
        all.push((conv, ids, texts));
    }
    // Four times: let some turns finish, kill a drainer mid-turn, start a fresh one.
    for round in 0..4u64 {
        let target = (round + 1) * 40;
        eventually(
            "progress before the next kill",
            Duration::from_secs(30),
            || async { (mock.state.stats().completed >= target).then_some(()) },
        )
        .await;
        let victim = fastrand::usize(..drainers.len());
        drainers[victim].kill9();
        drainers[victim] = start_drainer_process(&env);
    }

    let mut failed = 0;
    // Messages whose every attempt got a 5xx before the stream (WORKER_UNAVAILABLE) may never
    // have started a turn; every other message must have, in order.
    let mut unavailable = Vec::new();
    for (_, ids, texts) in &all {
        for (id, text) in ids.iter().zip(texts) {
            let done = wait_finished(&http, &api.base, id, Duration::from_secs(90)).await;
            if done["status"] == "completed" {
                assert_eq!(
                    done["result"]["responses"],
                    json!([format!("echo: {text}")]),
                    "{text}"
                );
            } else {
                assert!(done["error"]["code"].is_string(), "{done}");
                failed += 1;
                if done["error"]["code"] == "WORKER_UNAVAILABLE" {
                    unavailable.push(text.clone());
                }
            }
        }
    }
    let stats = mock.state.stats();
    mock.assert_one_in_flight();
    for (conv, _, texts) in &all {
        let key = format!("user:unfoldingWord:user{conv}");
        let started = &stats.started[&key];
        let expected: Vec<String> = texts
            .iter()
            .filter(|t| !unavailable.contains(t) || started.contains(t))
            .cloned()
            .collect();
        assert_fifo(&key, started, &expected);
    }
    assert!(
        failed < 30,
        "{failed} of 300 failed: more than random disconnects explain"
    );
    let mut conn = redis.conn().await;
    let ready: u64 = conn.llen("bt:{0}:ready").await.unwrap();
    assert_eq!(ready, 0);
}
