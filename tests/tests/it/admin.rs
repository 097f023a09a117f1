//! The admin API (`/admin/v1/`) and `/metrics` as operators use them: real Redis, the API and
//! a drainer, the mock worker, real callback receivers.

use std::time::Duration;

use broker_tests::{
    eventually, wait_finished, Behaviour, Http, Receiver, Stack, TestMock, TestRedis, API_KEY,
    CALLBACK_SECRET,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

pub async fn admin_stack(extra: &[(&str, &str)]) -> Stack {
    let mut pairs = vec![("BROKER_ADMIN_KEYS", "ops=admin-secret")];
    pairs.extend_from_slice(extra);
    Stack::with(
        TestRedis::start().await,
        TestMock::start(Duration::from_millis(5)),
        None,
        &pairs,
    )
    .await
}

async fn admin(http: &Http, method: &str, url: &str) -> broker_tests::Answer {
    http.send(
        method,
        url,
        &[("authorization", "Bearer admin-secret")],
        None,
    )
    .await
    .unwrap()
}

fn body(user: &str, text: &str) -> Value {
    json!({"user_id": user, "client_id": "web", "message": text})
}

async fn post_async(s: &Stack, user: &str, text: &str) -> String {
    let a = s
        .http
        .post_message(
            &s.api.base,
            &body(user, text),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 202, "{}", a.text);
    a.body["message_id"].as_str().unwrap().to_owned()
}

fn started(s: &Stack, user: &str) -> Vec<String> {
    s.mock
        .state
        .stats()
        .started
        .get(&format!("user:unfoldingWord:{user}"))
        .cloned()
        .unwrap_or_default()
}

async fn conversation(s: &Stack, user: &str) -> Value {
    let url = format!(
        "{}/admin/v1/conversations/user:unfoldingWord:{user}",
        s.api.base
    );
    let a = admin(&s.http, "GET", &url).await;
    assert_eq!(a.status, 200, "{}", a.text);
    a.body["conversation"].clone()
}

#[tokio::test]
async fn admin_routes_take_admin_keys_only() {
    let s = admin_stack(&[]).await;
    let url = format!("{}/admin/v1/conversations", s.api.base);
    let none = s.http.send("GET", &url, &[], None).await.unwrap();
    assert_eq!(none.status, 401);
    let client = s
        .http
        .send(
            "GET",
            &url,
            &[("authorization", &format!("Bearer {API_KEY}"))],
            None,
        )
        .await
        .unwrap();
    assert_eq!(client.status, 403, "a client key is no admin key");
    assert_eq!(admin(&s.http, "GET", &url).await.status, 200);
    // The admin key opens none of the client routes.
    let chat = s
        .http
        .send(
            "GET",
            &format!("{}/api/v1/queue/alice", s.api.base),
            &[("authorization", "Bearer admin-secret")],
            None,
        )
        .await
        .unwrap();
    assert_eq!(chat.status, 403);
    // Bad input is a 400 that names it.
    let bad = admin(&s.http, "GET", &format!("{url}?state=sleepy")).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body["message"].as_str().unwrap().contains("state"));
    let bad = admin(
        &s.http,
        "GET",
        &format!("{}/admin/v1/conversations/nobody", s.api.base),
    )
    .await;
    assert_eq!(bad.status, 400);
    // The console is a page anyone may load; it shows nothing without a key.
    let page = s
        .http
        .send("GET", &format!("{}/console", s.api.base), &[], None)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page.text.contains("Admin key"));
}

#[tokio::test]
async fn a_held_conversation_keeps_its_messages_and_starts_none_until_resumed() {
    let s = admin_stack(&[]).await;
    let base = s.api.base.clone();
    // Held while a slow turn runs: that turn finishes, the next does not start.
    let first = post_async(&s, "hal", "one [mock:sleep=600]").await;
    eventually("the first turn running", LIMIT, || async {
        (started(&s, "hal").len() == 1).then_some(())
    })
    .await;
    let hold = admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/conversations/user:unfoldingWord:hal/hold"),
    )
    .await;
    assert_eq!(hold.status, 200, "{}", hold.text);
    let second = post_async(&s, "hal", "two").await;
    let third = post_async(&s, "hal", "three").await;
    let done = wait_finished(&s.http, &base, &first, LIMIT).await;
    assert_eq!(done["status"], "completed");
    // The drainer took it and parked it: held, its two messages waiting.
    let parked = eventually("the conversation parked", LIMIT, || async {
        let c = conversation(&s, "hal").await;
        (c["state"] == "held").then_some(c)
    })
    .await;
    assert_eq!(parked["held"], true);
    assert_eq!(parked["waiting"], 2);
    assert_eq!(parked["held_by"]["by"], "ops");
    // Other conversations go on meanwhile, and this one still started nothing.
    let other = post_async(&s, "ivy", "meanwhile").await;
    assert_eq!(
        wait_finished(&s.http, &base, &other, LIMIT).await["status"],
        "completed"
    );
    assert_eq!(started(&s, "hal"), ["one [mock:sleep=600]"]);
    let listed = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/conversations?state=held"),
    )
    .await;
    assert_eq!(
        listed.body["conversations"][0]["conversation"],
        "user:unfoldingWord:hal"
    );
    // Resumed: both run, in order.
    let resume = admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/conversations/user:unfoldingWord:hal/resume"),
    )
    .await;
    assert_eq!(
        (resume.status, resume.body["was_held"].clone()),
        (200, json!(true))
    );
    for id in [&second, &third] {
        assert_eq!(
            wait_finished(&s.http, &base, id, LIMIT).await["status"],
            "completed"
        );
    }
    assert_eq!(started(&s, "hal"), ["one [mock:sleep=600]", "two", "three"]);
}

#[tokio::test]
async fn paused_drainers_start_nothing_until_resumed_and_listings_rank_the_oldest_first() {
    let s = admin_stack(&[]).await;
    let base = s.api.base.clone();
    let pause = admin(&s.http, "POST", &format!("{base}/admin/v1/drainers/pause")).await;
    assert_eq!(pause.status, 200);
    let mut ids = Vec::new();
    for user in ["u1", "u2", "u3"] {
        ids.push(post_async(&s, user, &format!("hello from {user}")).await);
    }
    // The drainer took conversations and gave them back, twice over: nothing started.
    let conn = s.redis.conn().await;
    eventually("the drainer turned back twice", LIMIT, || async {
        let n: Option<i64> =
            redis::AsyncCommands::hget(&mut conn.clone(), "bt:{0}:stats", "paused_takes")
                .await
                .unwrap();
        (n.unwrap_or(0) >= 2).then_some(())
    })
    .await;
    assert_eq!(s.mock.state.stats().requests, 0);
    let listed = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/conversations?state=waiting&limit=10"),
    )
    .await;
    let names: Vec<&str> = listed.body["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "user:unfoldingWord:u1",
            "user:unfoldingWord:u2",
            "user:unfoldingWord:u3"
        ]
    );
    let overview = admin(&s.http, "GET", &format!("{base}/admin/v1/overview")).await;
    assert_eq!(overview.body["paused"]["by"], "ops");
    assert!(
        overview.body["oldest_waiting_at"].is_u64(),
        "{}",
        overview.text
    );
    let drainers = admin(&s.http, "GET", &format!("{base}/admin/v1/drainers")).await;
    assert_eq!(drainers.body["drainers"].as_array().unwrap().len(), 1);
    let resume = admin(&s.http, "POST", &format!("{base}/admin/v1/drainers/resume")).await;
    assert_eq!(resume.body["was_paused"], true);
    for id in &ids {
        assert_eq!(
            wait_finished(&s.http, &base, id, LIMIT).await["status"],
            "completed"
        );
    }
    let empty = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/conversations?state=any"),
    )
    .await;
    assert_eq!(empty.body["conversations"], json!([]));
}

#[tokio::test]
async fn a_redriven_message_runs_before_what_queued_after_it() {
    let s = admin_stack(&[("WORKER_MAX_ATTEMPTS", "1")]).await;
    let base = s.api.base.clone();
    let failed = post_async(&s, "rex", "first [mock:status=503,times=1]").await;
    assert_eq!(
        wait_finished(&s.http, &base, &failed, LIMIT).await["status"],
        "failed"
    );
    let dead = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/dead?kind=message"),
    )
    .await;
    let entry = dead.body["entries"][0].clone();
    assert_eq!(entry["message_id"], failed.as_str());
    assert_eq!(entry["entry"], format!("message:{failed}"));
    // Later messages wait behind a hold, so that the order is the redrive's to keep.
    admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/conversations/user:unfoldingWord:rex/hold"),
    )
    .await;
    let second = post_async(&s, "rex", "second").await;
    let third = post_async(&s, "rex", "third").await;
    let redrive = admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/dead/message:{failed}/redrive"),
    )
    .await;
    assert_eq!(redrive.status, 200, "{}", redrive.text);
    assert_eq!(redrive.body["queue_position"], 1);
    let queue = conversation(&s, "rex").await;
    let order: Vec<&str> = queue["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(order, [failed.as_str(), second.as_str(), third.as_str()]);
    admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/conversations/user:unfoldingWord:rex/resume"),
    )
    .await;
    for id in [&failed, &second, &third] {
        assert_eq!(
            wait_finished(&s.http, &base, id, LIMIT).await["status"],
            "completed",
            "{id}"
        );
    }
    // (The mock logs a turn when it streams: the refused first try is not in it.)
    assert_eq!(
        started(&s, "rex"),
        ["first [mock:status=503,times=1]", "second", "third"]
    );
    let dead = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/dead?kind=message"),
    )
    .await;
    assert_eq!(
        dead.body["entries"],
        json!([]),
        "the entry left the dead list"
    );
    // Its whole record, and finding it.
    let record = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/messages/{failed}"),
    )
    .await;
    assert_eq!(record.body["status"], "completed");
    assert!(record.body["redriven_at"].is_u64());
    let found = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/messages?user=rex"),
    )
    .await;
    assert_eq!(found.body["conversation"], "user:unfoldingWord:rex");
}

#[tokio::test]
async fn bulk_redrive_since_a_time_and_by_client_message_id() {
    let s = admin_stack(&[("WORKER_MAX_ATTEMPTS", "1")]).await;
    let base = s.api.base.clone();
    let before = broker_core::clock::now_ms();
    let mut failed = Vec::new();
    for user in ["sam", "sue"] {
        let mut b = body(user, &format!("{user} [mock:status=503,times=1]"));
        b["client_message_id"] = json!(format!("cm-{user}"));
        let a = s
            .http
            .post_message(&base, &b, &[("prefer", "respond-async")])
            .await
            .unwrap();
        let id = a.body["message_id"].as_str().unwrap().to_owned();
        assert_eq!(
            wait_finished(&s.http, &base, &id, LIMIT).await["status"],
            "failed"
        );
        failed.push(id);
    }
    let found = admin(
        &s.http,
        "GET",
        &format!(
            "{base}/admin/v1/messages?client_message_id=cm-sue&conversation=user:unfoldingWord:sue"
        ),
    )
    .await;
    assert_eq!(found.body["messages"][0]["message_id"], failed[1].as_str());
    // Nothing since a time after both.
    let none = admin(
        &s.http,
        "POST",
        &format!(
            "{base}/admin/v1/dead/redrive?kind=message&since={}",
            broker_core::clock::now_ms() + 1000
        ),
    )
    .await;
    assert_eq!(none.body["of"], 0);
    let all = admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/dead/redrive?kind=message&since={before}"),
    )
    .await;
    assert_eq!(
        (all.body["redriven"].clone(), all.body["of"].clone()),
        (json!(2), json!(2)),
        "{}",
        all.text
    );
    for id in &failed {
        assert_eq!(
            wait_finished(&s.http, &base, id, LIMIT).await["status"],
            "completed"
        );
    }
}

#[tokio::test]
async fn a_redriven_callback_reaches_a_receiver_that_was_down() {
    // A port with nobody on it: the callback is refused until its budget is spent.
    let gone = Receiver::start(Behaviour::Accept).await;
    let port = gone.port;
    let url = gone.url.clone();
    drop(gone);
    let allow = format!("127.0.0.1:{port}");
    let s = admin_stack(&[
        ("BROKER_CALLBACK_ALLOWLIST", allow.as_str()),
        ("BROKER_CALLBACK_BUDGET_MS", "300"),
    ])
    .await;
    let base = s.api.base.clone();
    let mut b = body("cal", "call me");
    b["callback_url"] = json!(url);
    let a = s.http.post_message(&base, &b, &[]).await.unwrap();
    let id = a.body["message_id"].as_str().unwrap().to_owned();
    let record = eventually("the callback given up", LIMIT, || async {
        let r = wait_finished(&s.http, &base, &id, LIMIT).await;
        (r["callback"]["status"] == "failed").then_some(r)
    })
    .await;
    assert_eq!(record["status"], "completed");
    // The receiver is back.
    let receiver = Receiver::start_at(port, Behaviour::Accept).await;
    let dead = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/dead?kind=callback"),
    )
    .await;
    let entry = dead.body["entries"][0]["entry"]
        .as_str()
        .unwrap()
        .to_owned();
    let redrive = admin(
        &s.http,
        "POST",
        &format!("{base}/admin/v1/dead/{entry}/redrive"),
    )
    .await;
    assert_eq!(redrive.status, 200, "{}", redrive.text);
    let got = receiver.accepted();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].webhook_id, id, "the same webhook-id");
    assert!(got[0].verifies(), "signed afresh with {CALLBACK_SECRET}");
    assert_eq!(got[0].json()["message_id"], id.as_str());
    let after = wait_finished(&s.http, &base, &id, LIMIT).await;
    assert_eq!(after["callback"]["status"], "delivered");
    let dead = admin(
        &s.http,
        "GET",
        &format!("{base}/admin/v1/dead?kind=callback"),
    )
    .await;
    assert_eq!(dead.body["entries"], json!([]));
}

/// `/metrics`, parsed as Prometheus parses it: the value of a sample.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text scrape");
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|l| l == *v))
        })
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_parse_and_the_histograms_move_as_turns_run() {
    let s = admin_stack(&[("WORKER_MAX_ATTEMPTS", "1")]).await;
    let base = s.api.base.clone();
    let scrape = || async {
        let m = s
            .http
            .send("GET", &format!("{base}/metrics"), &[], None)
            .await
            .unwrap();
        assert_eq!(m.status, 200);
        m.text
    };
    let before = scrape().await;
    assert_eq!(sample(&before, "broker_redis_up", &[]), Some(1.0));
    assert_eq!(
        sample(&before, "broker_turn_ms_count", &[("mode", "sync")]),
        None
    );
    for i in 0..3 {
        let a = s
            .http
            .post_message(&base, &body("mia", &format!("m{i}")), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    let id = post_async(&s, "mia", "down [mock:status=503]").await;
    wait_finished(&s.http, &base, &id, LIMIT).await;
    let after = scrape().await;
    assert_eq!(
        sample(&after, "broker_turn_ms_count", &[("mode", "sync")]),
        Some(3.0)
    );
    assert_eq!(
        sample(&after, "broker_queue_wait_ms_count", &[("mode", "async")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "broker_end_to_end_ms_count", &[("mode", "sync")]),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &after,
            "broker_failures_total",
            &[("code", "WORKER_UNAVAILABLE")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&after, "broker_messages_completed_total", &[]),
        Some(3.0)
    );
    assert_eq!(sample(&after, "broker_held_conversations", &[]), Some(0.0));
    assert_eq!(sample(&after, "broker_drainers_paused", &[]), Some(0.0));
    assert!(sample(&after, "broker_oldest_message_age_seconds", &[]).is_some());
}

#[tokio::test]
async fn a_clients_traceparent_reaches_the_worker_the_callback_and_every_log_line_of_its_turn() {
    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let receiver = Receiver::start(Behaviour::Accept).await;
    let allow = format!("127.0.0.1:{}", receiver.port);
    let mock = TestMock::start(Duration::from_millis(5));
    let redis = TestRedis::start().await;
    let pairs = [("BROKER_CALLBACK_ALLOWLIST", allow.as_str())];
    let api =
        broker_tests::TestApi::start(broker_tests::settings(redis.url(), &mock.url, &pairs)).await;
    // A real drainer whose JSON log lines go to a file.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut env = broker_tests::test_env(redis.url(), &mock.url, &pairs);
    env.retain(|(k, _)| k != "LOG_LEVEL");
    env.push(("LOG_LEVEL".into(), "info".into()));
    env.push(("LOG_FORMAT".into(), "json".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut drainer = broker_tests::Process::start_logging(
        "broker-drainer",
        &env,
        std::process::Stdio::from(log.reopen().unwrap()),
    );
    let http = Http::new();
    let mut b = body("tia", "traced");
    b["callback_url"] = json!(receiver.url);
    let a = http
        .post_message(&api.base, &b, &[("traceparent", TRACE)])
        .await
        .unwrap();
    let id = a.body["message_id"].as_str().unwrap().to_owned();
    let got = eventually("the callback", LIMIT, || async {
        receiver.accepted().into_iter().next()
    })
    .await;
    assert_eq!(got.traceparent, TRACE);
    let stats = mock.state.stats();
    assert_eq!(stats.traceparent["user:unfoldingWord:tia"], TRACE);
    // A malformed one is dropped, not passed on.
    let a = http
        .post_message(
            &api.base,
            &body("ugo", "untraced"),
            &[("traceparent", "00-zz-1-01")],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert!(!mock
        .state
        .stats()
        .traceparent
        .contains_key("user:unfoldingWord:ugo"));
    // Flushed at exit: every line of the turn carries the trace id.
    drainer.terminate(LIMIT);
    let text = std::fs::read_to_string(log.path()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.to_string().contains(&id))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert!(
            line.to_string()
                .contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{line}"
        );
    }
}
