//! Network faults between the broker's processes (docs/reliability.md), through a
//! fault-injecting TCP proxy on loopback: latency on every leg, and a drainer cut off from
//! Redis (packets dropped silently, no reset) for longer than the dead-after limit.

use std::time::Duration;

use broker_tests::{
    assert_fifo, eventually, settings, wait_finished, FaultyProxy, Http, TestApi, TestDrainer,
    TestMock, TestRedis,
};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

fn authority(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_owned()
}

async fn post_async(http: &Http, base: &str, user: &str, text: &str) -> String {
    let body = json!({"user_id": user, "client_id": "web", "message": text});
    let a = http
        .post_message(base, &body, &[("prefer", "respond-async")])
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    a.body["message_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latency_on_every_leg_loses_nothing_and_keeps_order() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let api_redis = FaultyProxy::start(&authority(redis.url())).await;
    let drainer_redis = FaultyProxy::start(&authority(redis.url())).await;
    let worker = FaultyProxy::start(&authority(&mock.url)).await;
    for p in [&api_redis, &drainer_redis, &worker] {
        p.delay(30);
    }
    let api = TestApi::start(settings(&api_redis.redis_url(), &mock.url, &[])).await;
    let worker_url = format!("http://127.0.0.1:{}", worker.port);
    let _drainer = TestDrainer::start(settings(&drainer_redis.redis_url(), &worker_url, &[])).await;
    let http = Http::new();
    let mut sent = Vec::new();
    for conv in 0..8 {
        let texts: Vec<String> = (0..4).map(|i| format!("c{conv} m{i}")).collect();
        let mut ids = Vec::new();
        for t in &texts {
            ids.push(post_async(&http, &api.base, &format!("lat{conv}"), t).await);
        }
        sent.push((conv, ids, texts));
    }
    for (_, ids, texts) in &sent {
        for (id, text) in ids.iter().zip(texts) {
            let done = wait_finished(&http, &api.base, id, LIMIT).await;
            assert_eq!(
                done["result"]["responses"],
                json!([format!("echo: {text}")])
            );
        }
    }
    mock.assert_one_in_flight();
    let stats = mock.state.stats();
    for (conv, _, texts) in &sent {
        let key = format!("user:unfoldingWord:lat{conv}");
        assert_fifo(&key, &stats.started[&key], texts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drainer_cut_off_from_redis_stops_its_turn_before_its_successor_runs_it() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let proxy = FaultyProxy::start(&authority(redis.url())).await;
    let fast = [("REDIS_TIMEOUT_MS", "300")];
    let api = TestApi::start(settings(redis.url(), &mock.url, &fast)).await;
    // Drainer A reaches Redis through the proxy; it takes the turn.
    let _a = TestDrainer::start(settings(&proxy.redis_url(), &mock.url, &fast)).await;
    let http = Http::new();
    // Frames every 100 ms for 4 s: a stream the worker keeps writing to.
    let text = "long [mock:progress=40,gap=100]";
    let id = post_async(&http, &api.base, "net", text).await;
    let conv = "user:unfoldingWord:net";
    eventually("the turn running on A", LIMIT, || async {
        mock.state
            .stats()
            .started
            .get(conv)
            .map(|s| s.len() == 1)
            .unwrap_or(false)
            .then_some(())
    })
    .await;
    // Drainer B, reaching Redis directly; then A is cut off (no reset, packets dropped).
    let _b = TestDrainer::start(settings(redis.url(), &mock.url, &fast)).await;
    proxy.partition();
    // B reaps A and runs the turn again. A still reaches the worker, but stops its turn
    // before that: never two turns of the conversation at once.
    let done = wait_finished(&http, &api.base, &id, LIMIT).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["result"]["responses"],
        json!([format!("echo: {text}")])
    );
    mock.assert_one_in_flight();
    assert_eq!(
        mock.state.stats().started[conv],
        [text, text],
        "it ran again on B"
    );
    // Healed, A stores nothing (its lease is gone) and takes part again.
    proxy.heal();
    let next = post_async(&http, &api.base, "net", "after").await;
    assert_eq!(
        wait_finished(&http, &api.base, &next, LIMIT).await["status"],
        "completed"
    );
    mock.assert_one_in_flight();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_cut_off_from_redis_refuses_with_503_and_recovers_when_healed() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let proxy = FaultyProxy::start(&authority(redis.url())).await;
    let fast = [("REDIS_TIMEOUT_MS", "300")];
    let api = TestApi::start(settings(&proxy.redis_url(), &mock.url, &fast)).await;
    let _drainer = TestDrainer::start(settings(redis.url(), &mock.url, &fast)).await;
    let http = Http::new();
    let before = post_async(&http, &api.base, "amy", "before").await;
    proxy.partition();
    let body = json!({"user_id": "amy", "client_id": "web", "message": "during"});
    let refused = http.post_message(&api.base, &body, &[]).await.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(
        refused.body["code"], "REDIS_TIMEOUT",
        "may or may not be queued: said so"
    );
    proxy.heal();
    // Healed: the broken connection is replaced, and every acknowledged message is answered.
    let after = eventually("the API back", LIMIT, || async {
        let body = json!({"user_id": "amy", "client_id": "web", "message": "after"});
        let a = http
            .post_message(&api.base, &body, &[("prefer", "respond-async")])
            .await
            .ok()?;
        (a.status == 202).then(|| a.body["message_id"].as_str().unwrap().to_owned())
    })
    .await;
    for id in [&before, &after] {
        assert_eq!(
            wait_finished(&http, &api.base, id, LIMIT).await["status"],
            "completed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_mid_turn_fails_it_at_the_idle_timeout_and_the_conversation_goes_on() {
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let worker = FaultyProxy::start(&authority(&mock.url)).await;
    let pairs = [("WORKER_IDLE_TIMEOUT_SECS", "1")];
    let api = TestApi::start(settings(redis.url(), &mock.url, &pairs)).await;
    let worker_url = format!("http://127.0.0.1:{}", worker.port);
    let _drainer = TestDrainer::start(settings(redis.url(), &worker_url, &pairs)).await;
    let http = Http::new();
    let cut = post_async(&http, &api.base, "wes", "long [mock:progress=50,gap=100]").await;
    eventually("the turn running", LIMIT, || async {
        mock.state
            .stats()
            .started
            .contains_key("user:unfoldingWord:wes")
            .then_some(())
    })
    .await;
    worker.partition();
    let done = wait_finished(&http, &api.base, &cut, LIMIT).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "TIMEOUT", "{done}");
    worker.heal();
    let next = post_async(&http, &api.base, "wes", "next").await;
    assert_eq!(
        wait_finished(&http, &api.base, &next, LIMIT).await["status"],
        "completed"
    );
}

/// Packet loss, leg by leg and then on all three at once: in a network namespace of the
/// test's own, nftables drops 20% of the packets each way between the API and Redis, a
/// drainer and Redis, a drainer and the worker. TCP retransmits; every accepted message is
/// answered once, in order, one turn at a time.
#[test]
fn packet_loss_on_each_leg_loses_nothing_and_keeps_order() {
    broker_tests::isolated(|ns| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(packet_loss(ns));
    });
}

/// Sends a message as a careful client does: a 503 (the queue store did not answer, the
/// message may or may not be queued) is retried with the same `client_message_id`. Returns
/// the answer and how many 503s came first.
async fn send_retrying(
    http: &Http,
    base: &str,
    user: &str,
    text: &str,
    asynchronous: bool,
) -> (broker_tests::Answer, usize) {
    let body = json!({"user_id": user, "client_id": "web", "message": text,
                      "client_message_id": text});
    let prefer: &[(&str, &str)] = if asynchronous {
        &[("prefer", "respond-async")]
    } else {
        &[]
    };
    let mut refused = 0;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let a = http.post_message(base, &body, prefer).await.unwrap();
        if a.status != 503 {
            assert_eq!(a.status, if asynchronous { 202 } else { 200 }, "{}", a.text);
            return (a, refused);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still 503: {}",
            a.text
        );
        refused += 1;
    }
}

async fn packet_loss(ns: &broker_tests::Netns) {
    const PERCENT: u8 = 20;
    let redis = TestRedis::start().await;
    let mock = TestMock::start(Duration::from_millis(5));
    // Pass-through proxies give each leg to Redis a port of its own to drop packets on.
    let api_redis = FaultyProxy::start(&authority(redis.url())).await;
    let drainer_redis = FaultyProxy::start(&authority(redis.url())).await;
    let api = TestApi::start(settings(&api_redis.redis_url(), &mock.url, &[])).await;
    let _drainer = TestDrainer::start(settings(&drainer_redis.redis_url(), &mock.url, &[])).await;
    let worker_port: u16 = mock.url.rsplit(':').next().unwrap().parse().unwrap();
    let legs = [
        ("API to Redis", vec![api_redis.port]),
        ("drainer to Redis", vec![drainer_redis.port]),
        ("drainer to worker", vec![worker_port]),
        (
            "all three",
            vec![api_redis.port, drainer_redis.port, worker_port],
        ),
    ];
    let http = Http::new();
    let mut sent: Vec<(String, Vec<String>)> = Vec::new();
    for (phase, (leg, ports)) in legs.iter().enumerate() {
        ns.lose(ports, PERCENT);
        let (mut accepted, mut answered, mut refused) = (0usize, 0usize, 0usize);
        // Six conversations of four asynchronous messages, and two of sync requests (their
        // answers come back over the API's Redis subscription), all at once.
        let asynchronous = futures_util::future::join_all((0..6).map(|c| {
            let (http, base) = (&http, &api.base);
            async move {
                let user = format!("loss{phase}a{c}");
                let texts: Vec<String> = (0..4).map(|i| format!("p{phase} a{c} m{i}")).collect();
                let (mut ids, mut refused) = (Vec::new(), 0);
                for t in &texts {
                    let (a, r) = send_retrying(http, base, &user, t, true).await;
                    ids.push(a.body["message_id"].as_str().unwrap().to_owned());
                    refused += r;
                }
                let mut answered = 0;
                for (id, t) in ids.iter().zip(&texts) {
                    let done = wait_finished(http, base, id, LIMIT).await;
                    assert_eq!(done["result"]["responses"], json!([format!("echo: {t}")]));
                    answered += 1;
                }
                (user, texts, answered, refused)
            }
        }));
        let synchronous = futures_util::future::join_all((0..2).map(|c| {
            let (http, base) = (&http, &api.base);
            async move {
                let user = format!("loss{phase}s{c}");
                let texts: Vec<String> = (0..3).map(|i| format!("p{phase} s{c} m{i}")).collect();
                let (mut answered, mut refused) = (0, 0);
                for t in &texts {
                    let (a, r) = send_retrying(http, base, &user, t, false).await;
                    assert_eq!(a.body["responses"], json!([format!("echo: {t}")]));
                    answered += 1;
                    refused += r;
                }
                (user, texts, answered, refused)
            }
        }));
        let (a, s) = tokio::join!(asynchronous, synchronous);
        for (user, texts, n, r) in a.into_iter().chain(s) {
            accepted += texts.len();
            answered += n;
            refused += r;
            sent.push((format!("user:unfoldingWord:{user}"), texts));
        }
        let dropped = ns.dropped();
        ns.heal();
        assert!(dropped > 0, "{leg}: no packet was dropped");
        let stats = mock.state.stats();
        let duplicated: usize = sent
            .iter()
            .filter(|(key, _)| key.starts_with(&format!("user:unfoldingWord:loss{phase}")))
            .map(|(key, texts)| stats.started[key].len() - texts.len())
            .sum();
        eprintln!(
            "{leg}: {PERCENT}% loss, {dropped} packets dropped; {accepted} accepted \
             ({refused} 503s retried), {answered} answered, {} lost, {duplicated} turns run twice",
            accepted - answered
        );
    }
    mock.assert_one_in_flight();
    let stats = mock.state.stats();
    for (key, texts) in &sent {
        assert_fifo(key, &stats.started[key], texts);
    }
}
