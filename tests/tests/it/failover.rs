//! Redis failing over to a replica (docs/reliability.md): a primary with one replica, the
//! replica cut off, the primary killed and the replica promoted (`REPLICAOF NO ONE`). Counts
//! what the API had acknowledged and what the promoted replica still holds, without and with
//! `BROKER_REDIS_WAIT_REPLICAS`.

use std::time::Duration;

use broker_tests::{
    eventually, settings, wait_finished, Http, TestApi, TestDrainer, TestMock, TestRedis,
};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);

async fn command(redis: &TestRedis, args: &[&str]) -> String {
    let mut conn = redis.conn().await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let value: redis::Value = cmd.query_async(&mut conn).await.unwrap();
    match value {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        redis::Value::SimpleString(s) => s,
        other => format!("{other:?}"),
    }
}

/// A primary and its replica, the link up.
async fn pair() -> (TestRedis, TestRedis) {
    let primary = TestRedis::start_local();
    let replica = TestRedis::start_local();
    let port = primary.url().rsplit(':').next().unwrap().to_owned();
    command(&replica, &["REPLICAOF", "127.0.0.1", &port]).await;
    eventually("the replica in sync", LIMIT, || async {
        command(&replica, &["INFO", "replication"])
            .await
            .contains("master_link_status:up")
            .then_some(())
    })
    .await;
    (primary, replica)
}

/// Stops the replica's process and closes its link: writes from now on reach only the primary.
async fn cut_off(primary: &TestRedis, replica: &TestRedis) -> i32 {
    let info = command(replica, &["INFO", "server"]).await;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: a signal to the test's own redis-server child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    command(primary, &["CLIENT", "KILL", "TYPE", "replica"]).await;
    pid
}

/// Kills the primary and promotes the replica.
async fn fail_over(primary: &mut TestRedis, replica: &TestRedis, pid: i32) {
    primary.kill();
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    command(replica, &["REPLICAOF", "NO", "ONE"]).await;
}

async fn post(http: &Http, base: &str, text: &str) -> (u16, Option<String>) {
    let body = json!({"user_id": "fay", "client_id": "web", "message": text});
    let a = http
        .post_message(base, &body, &[("prefer", "respond-async")])
        .await
        .unwrap();
    (a.status, a.body["message_id"].as_str().map(str::to_owned))
}

async fn held_by(redis: &TestRedis, ids: &[String]) -> usize {
    let mut conn = redis.conn().await;
    let mut n = 0;
    for id in ids {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("bt:{{0}}:msg:{id}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        n += usize::try_from(exists).unwrap();
    }
    n
}

#[tokio::test]
async fn without_wait_a_failover_loses_what_the_replica_had_not_received() {
    let (mut primary, replica) = pair().await;
    let mock = TestMock::start(Duration::from_millis(5));
    // The API alone: the messages stay queued.
    let api = TestApi::start(settings(primary.url(), &mock.url, &[])).await;
    let http = Http::new();
    let pid = cut_off(&primary, &replica).await;
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let (status, id) = post(&http, &api.base, &format!("m{i}")).await;
        assert_eq!(status, 202);
        acknowledged.push(id.unwrap());
    }
    // Before the failover the primary holds them all.
    assert_eq!(held_by(&primary, &acknowledged).await, acknowledged.len());
    fail_over(&mut primary, &replica, pid).await;
    // Asynchronous replication: every one of them is gone.
    assert_eq!(held_by(&replica, &acknowledged).await, 0);
}

#[tokio::test]
async fn with_wait_nothing_acknowledged_is_lost_in_a_failover() {
    let (mut primary, replica) = pair().await;
    let mock = TestMock::start(Duration::from_millis(5));
    let waiting = [
        ("BROKER_REDIS_WAIT_REPLICAS", "1"),
        ("BROKER_REDIS_WAIT_TIMEOUT_MS", "300"),
    ];
    let api = TestApi::start(settings(primary.url(), &mock.url, &waiting)).await;
    let http = Http::new();
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let (status, id) = post(&http, &api.base, &format!("before {i}")).await;
        assert_eq!(status, 202);
        acknowledged.push(id.unwrap());
    }
    // Cut off: no replica confirms, so nothing is acknowledged.
    let pid = cut_off(&primary, &replica).await;
    for i in 0..5 {
        let (status, _) = post(&http, &api.base, &format!("during {i}")).await;
        assert_eq!(status, 503, "a message no replica has is not acknowledged");
    }
    fail_over(&mut primary, &replica, pid).await;
    assert_eq!(
        held_by(&replica, &acknowledged).await,
        acknowledged.len(),
        "every acknowledged message is on the promoted replica"
    );
    // The broker, pointed at the promoted replica, answers every one of them.
    let s = settings(replica.url(), &mock.url, &[]);
    let api = TestApi::start(s.clone()).await;
    let _drainer = TestDrainer::start(s).await;
    for id in &acknowledged {
        let done = wait_finished(&http, &api.base, id, LIMIT).await;
        assert_eq!(done["status"], "completed", "{id}");
    }
}
