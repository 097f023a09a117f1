//! The Lua scripts and the invariants of docs/design.md §6, through the Rust functions that call them,
//! against a real redis-server.

use std::time::Duration;

use broker_core::queue::{
    Claim, Claimed, Enqueued, Finish, Finished, Mode, NewMessage, Queue, Released, Retention,
    TurnEnd,
};
use broker_core::{redis_conn, replies, Keys};
use broker_proto::{validate_message, Conversation, MessageRequest, ValidationLimits};
use broker_tests::{settings, TestRedis};
use redis::AsyncCommands;
use serde_json::json;

struct Fixture {
    redis: TestRedis,
    queue: Queue,
    keys: Keys,
    blocking: redis::aio::MultiplexedConnection,
}

async fn fixture() -> Fixture {
    let redis = TestRedis::start().await;
    let s = settings(redis.url(), "http://127.0.0.1:9", &[]);
    let keys = Keys::new("bt", "0");
    let queue = Queue::new(redis_conn::shared(&s.redis).unwrap(), keys.clone());
    let client = redis_conn::client(&s.redis).unwrap();
    let blocking = redis_conn::blocking_connection(&client, &s.redis)
        .await
        .unwrap();
    Fixture {
        redis,
        queue,
        keys,
        blocking,
    }
}

fn request(user: &str, text: &str, cmid: Option<&str>) -> MessageRequest {
    let mut body = json!({"user_id": user, "client_id": "web", "message": text});
    if let Some(c) = cmid {
        body["client_message_id"] = json!(c);
    }
    validate_message(
        body.to_string().as_bytes(),
        "uW",
        &ValidationLimits::default(),
    )
    .unwrap()
}

const DAY: Duration = Duration::from_secs(86_400);

/// Enqueues in async mode, whose frames are recorded. The `queued` frame an accepted message
/// comes back with must be its stream's first entry, as a reader would read it; it is checked
/// here and left out of the answer, which the tests compare by position.
async fn enqueue(f: &Fixture, req: &MessageRequest, id: &str) -> Enqueued {
    let r = f
        .queue
        .enqueue(req, id, Mode::Async, None, 50, DAY)
        .await
        .unwrap();
    let Enqueued::Accepted { position, queued } = r else {
        return r;
    };
    let (events, _) = f.queue.read_events(id, None, 10).await.unwrap();
    assert_eq!(queued.as_ref(), events.first(), "{id}: the queued frame");
    assert_eq!(events.len(), 1, "{id}: one frame so far");
    let data: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data["queue_position"], position, "{id}: {data}");
    Enqueued::Accepted {
        position,
        queued: None,
    }
}

/// The `BLMOVE` half of the drainer's take, without its pipelined claim: the tests below then
/// claim by name, to look at each step on its own.
async fn take(f: &mut Fixture, drainer: &str) -> Option<String> {
    f.blocking
        .lmove(
            f.keys.ready(),
            f.keys.processing(drainer),
            redis::Direction::Right,
            redis::Direction::Left,
        )
        .await
        .unwrap()
}

/// The drainer's take: `BLMOVE` and the claim of the list's head in one pipeline.
async fn take_and_claim(f: &mut Fixture, lease: &str) -> Option<(Conversation, Claim)> {
    let mut taken = f
        .queue
        .take_ready(&mut f.blocking, "d1", Duration::from_millis(100), lease, 1)
        .await
        .unwrap();
    assert!(taken.len() <= 1, "room for one, took {taken:?}");
    taken.pop().map(|t| {
        assert_eq!(t.lease, lease);
        (t.conversation, t.claim)
    })
}

async fn claim(f: &Fixture, drainer: &str, conv: &Conversation, lease: &str) -> Claimed {
    match f.queue.claim(drainer, conv, lease).await.unwrap() {
        Claim::Turn(c) => *c,
        other => panic!("nothing to claim: {other:?}"),
    }
}

async fn finish(
    f: &Fixture,
    drainer: &str,
    conv: &Conversation,
    id: &str,
    lease: &str,
) -> Finished {
    f.queue
        .finish(
            drainer,
            conv,
            id,
            lease,
            &Finish::new("completed", r#"{"status":"completed"}"#, "complete", "{}"),
            &Retention {
                result_ttl: DAY,
                dead_list_max: 100,
                events_max: 100,
            },
        )
        .await
        .unwrap()
}

/// Design §6: a conversation is in at most one of ready or a processing list, and in one iff
/// it has queued or running work; idle conversations have no state hash.
async fn check_invariants(f: &Fixture, conversations: &[&Conversation], drainers: &[&str]) {
    let mut conn = f.redis.conn().await;
    let ready: Vec<String> = conn.lrange(f.keys.ready(), 0, -1).await.unwrap();
    let mut processing = Vec::new();
    for d in drainers {
        let list: Vec<String> = conn.lrange(f.keys.processing(d), 0, -1).await.unwrap();
        processing.extend(list);
    }
    for conv in conversations {
        let places = ready
            .iter()
            .chain(processing.iter())
            .filter(|c| *c == conv.as_str())
            .count();
        let depth: u64 = conn.llen(f.keys.queue(conv)).await.unwrap();
        let exists: bool = conn.exists(f.keys.conversation(conv)).await.unwrap();
        if depth > 0 {
            assert_eq!(places, 1, "{conv} has work and must be in exactly one list");
            assert!(exists, "{conv} has work and must have a state hash");
        } else {
            assert_eq!(places, 0, "{conv} is idle and must be in no list");
            assert!(!exists, "{conv} is idle and must have no state hash");
        }
    }
}

#[tokio::test]
async fn positions_claim_finish_and_the_invariants() {
    let mut f = fixture().await;
    let a = request("alice", "1", None);
    let conv = a.conversation.clone();
    assert_eq!(
        enqueue(&f, &a, "m1").await,
        Enqueued::Accepted {
            position: 1,
            queued: None
        }
    );
    assert_eq!(
        enqueue(&f, &a, "m2").await,
        Enqueued::Accepted {
            position: 2,
            queued: None
        }
    );
    check_invariants(&f, &[&conv], &["d1"]).await;

    assert_eq!(take(&mut f, "d1").await.as_deref(), Some(conv.as_str()));
    let c = claim(&f, "d1", &conv, "lease-1").await;
    assert_eq!((c.message_id.as_str(), c.attempts), ("m1", 1));
    assert_eq!(c.mode, "async");
    // A running message is not counted: m3 waits behind m2 only.
    assert_eq!(
        enqueue(&f, &a, "m3").await,
        Enqueued::Accepted {
            position: 2,
            queued: None
        }
    );
    check_invariants(&f, &[&conv], &["d1"]).await;
    // Only the head can run, and nobody else can take the conversation while it runs.
    assert_eq!(take(&mut f, "d2").await, None);

    let record = f.queue.message_record("m3").await.unwrap().unwrap();
    assert_eq!(
        (record.status.as_str(), record.queue_position),
        ("queued", Some(2))
    );
    let health = f.queue.health(Duration::from_secs(15)).await.unwrap();
    assert_eq!(
        (health.active_queues, health.processing, health.queued),
        (1, 1, 2)
    );

    assert_eq!(
        finish(&f, "d1", &conv, "m1", "lease-1").await,
        Finished::Done { left: 2 }
    );
    check_invariants(&f, &[&conv], &["d1"]).await;
    let record = f.queue.message_record("m1").await.unwrap().unwrap();
    assert_eq!(record.status, "completed");
    assert!(record.outcome.is_some());
    let ttl: i64 = f
        .redis
        .conn()
        .await
        .ttl(f.keys.message("m1"))
        .await
        .unwrap();
    assert!(ttl > 0, "a finished message expires");

    // FIFO: m2, then m3, then the conversation goes idle.
    for (id, left) in [("m2", 1), ("m3", 0)] {
        assert_eq!(take(&mut f, "d1").await.as_deref(), Some(conv.as_str()));
        let c = claim(&f, "d1", &conv, id).await;
        assert_eq!(c.message_id, id);
        assert_eq!(
            finish(&f, "d1", &conv, id, id).await,
            Finished::Done { left }
        );
    }
    check_invariants(&f, &[&conv], &["d1"]).await;
    let health = f.queue.health(Duration::from_secs(15)).await.unwrap();
    assert_eq!(
        (health.active_queues, health.processing, health.queued),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn the_drainers_take_claims_what_blmove_moved_in_the_same_round_trip() {
    let mut f = fixture().await;
    let a = request("alice", "1", None);
    let b = request("bob", "1", None);
    enqueue(&f, &a, "a1").await;
    enqueue(&f, &a, "a2").await;
    enqueue(&f, &b, "b1").await;

    let (conv, claim) = take_and_claim(&mut f, "la").await.expect("alice is ready");
    assert_eq!(conv, a.conversation);
    let Claim::Turn(c) = claim else {
        panic!("alice has a message")
    };
    assert_eq!((c.message_id.as_str(), c.attempts), ("a1", 1));
    check_invariants(&f, &[&a.conversation, &b.conversation], &["d1"]).await;

    // A BLMOVE whose claim was lost leaves bob taken but not started; when the next take moves
    // nothing, it claims him from the head of the list. Alice, running, is left alone.
    assert_eq!(
        take(&mut f, "d1").await.as_deref(),
        Some(b.conversation.as_str())
    );
    let (conv, claim) = take_and_claim(&mut f, "lb")
        .await
        .expect("bob waits at the head of the list");
    assert_eq!(conv, b.conversation);
    assert!(matches!(claim, Claim::Turn(c) if c.message_id == "b1"));
    assert!(
        take_and_claim(&mut f, "lc").await.is_none(),
        "nothing ready, and the head of the list already runs"
    );
    let health = f.queue.health(Duration::from_secs(15)).await.unwrap();
    assert_eq!((health.processing, health.queued), (2, 1));

    // An emptied script cache (a restart, SCRIPT FLUSH) costs one more round trip, not a turn.
    assert_eq!(
        finish(&f, "d1", &a.conversation, "a1", "la").await,
        Finished::Done { left: 1 }
    );
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut f.redis.conn().await)
        .await
        .unwrap();
    let (conv, claim) = take_and_claim(&mut f, "ld")
        .await
        .expect("alice is ready again");
    assert_eq!(conv, a.conversation);
    assert!(matches!(claim, Claim::Turn(c) if c.message_id == "a2" && c.attempts == 1));
    check_invariants(&f, &[&a.conversation, &b.conversation], &["d1"]).await;

    // A message that arrives while the BLMOVE blocks starts after it was enqueued: the claim
    // takes the time when it runs, not when the pipeline was sent.
    let c = request("carol", "1", None);
    let mut blocking = f.blocking.clone();
    let queue = f.queue.clone();
    let take = queue.take_ready(&mut blocking, "d1", Duration::from_secs(5), "le", 1);
    let arrive = async {
        let conn = f.redis.conn().await;
        broker_tests::eventually("the BLMOVE to block", Duration::from_secs(5), || {
            let mut conn = conn.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("clients")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                info.contains("blocked_clients:1").then_some(())
            }
        })
        .await;
        // Let the BLMOVE's pipeline age by a few milliseconds before anything is ready.
        let blocked_at = broker_core::clock::now_ms();
        broker_tests::eventually("a later millisecond", Duration::from_secs(1), || async {
            (broker_core::clock::now_ms() >= blocked_at + 20).then_some(())
        })
        .await;
        enqueue(&f, &c, "c1").await;
    };
    let (taken, ()) = tokio::join!(take, arrive);
    let claim = taken
        .unwrap()
        .pop()
        .expect("carol arrived while it blocked")
        .claim;
    let Claim::Turn(claimed) = claim else {
        panic!("carol has a message")
    };
    let record = f.queue.message_record("c1").await.unwrap().unwrap();
    let enqueued = record.enqueued_at.unwrap();
    assert!(
        claimed.started_at >= enqueued && record.started_at.unwrap() >= enqueued,
        "started {} (record {:?}) before it was enqueued at {enqueued}",
        claimed.started_at,
        record.started_at
    );
}

#[tokio::test]
async fn a_take_with_room_starts_the_longest_waiting_conversations_under_their_own_leases() {
    let mut f = fixture().await;
    let users = ["ann", "ben", "cat", "dan", "eve"];
    let requests: Vec<MessageRequest> = users.iter().map(|u| request(u, "1", None)).collect();
    for (r, u) in requests.iter().zip(users) {
        enqueue(&f, r, &format!("{u}1")).await;
    }
    enqueue(&f, &request("ann", "2", None), "ann2").await;
    let convs: Vec<&Conversation> = requests.iter().map(|r| &r.conversation).collect();

    // Room for three: ann, ben and cat, in the order they became ready, each running its head.
    let taken = f
        .queue
        .take_ready(&mut f.blocking, "d1", Duration::from_millis(100), "lb", 3)
        .await
        .unwrap();
    let got: Vec<(&str, String, String)> = taken
        .iter()
        .map(|t| match &t.claim {
            Claim::Turn(c) => (
                t.conversation.as_str(),
                c.message_id.clone(),
                t.lease.clone(),
            ),
            other => panic!("{} has a message: {other:?}", t.conversation),
        })
        .collect();
    let expected: Vec<(&str, String, String)> = vec![
        (convs[0].as_str(), "ann1".into(), "lb".into()),
        (convs[1].as_str(), "ben1".into(), "lb.2".into()),
        (convs[2].as_str(), "cat1".into(), "lb.3".into()),
    ];
    assert_eq!(got, expected);
    check_invariants(&f, &convs, &["d1"]).await;
    let health = f.queue.health(Duration::from_secs(15)).await.unwrap();
    assert_eq!((health.processing, health.queued), (3, 3));

    // Each runs under the lease it was given, and no other: the first's does not finish ben.
    assert_eq!(
        finish(&f, "d1", convs[1], "ben1", "lb").await,
        Finished::Stale
    );
    assert_eq!(
        finish(&f, "d1", convs[1], "ben1", "lb.2").await,
        Finished::Done { left: 0 }
    );
    assert_eq!(
        finish(&f, "d1", convs[0], "ann1", "lb").await,
        Finished::Done { left: 1 }
    );

    // More room than is ready: dan and eve, then ann again (she became ready after them); a
    // take that finds nothing more stops there.
    let taken = f
        .queue
        .take_ready(&mut f.blocking, "d1", Duration::from_millis(100), "lc", 10)
        .await
        .unwrap();
    let got: Vec<(&str, &str)> = taken
        .iter()
        .map(|t| (t.conversation.as_str(), t.lease.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (convs[3].as_str(), "lc"),
            (convs[4].as_str(), "lc.2"),
            (convs[0].as_str(), "lc.3"),
        ]
    );
    assert!(matches!(&taken[2].claim, Claim::Turn(c) if c.message_id == "ann2"));
    check_invariants(&f, &convs, &["d1"]).await;

    // Nothing ready: the take times out and leaves the running head alone.
    let taken = f
        .queue
        .take_ready(&mut f.blocking, "d1", Duration::from_millis(50), "ld", 10)
        .await
        .unwrap();
    assert!(taken.is_empty(), "took {taken:?}");
    check_invariants(&f, &convs, &["d1"]).await;
}

#[tokio::test]
async fn finishing_a_message_that_is_not_the_head_changes_nothing() {
    let mut f = fixture().await;
    let a = request("alice", "1", None);
    let conv = a.conversation.clone();
    enqueue(&f, &a, "m1").await;
    enqueue(&f, &request("alice", "2", None), "m2").await;
    take(&mut f, "d1").await;
    claim(&f, "d1", &conv, "l").await;
    let before = broker_tests::all_keys(&mut f.redis.conn().await).await;
    // The lease holds, but m2 is not what runs: the script pops the head to compare and
    // must put it back.
    assert_eq!(finish(&f, "d1", &conv, "m2", "l").await, Finished::Stale);
    let mut conn = f.redis.conn().await;
    assert_eq!(broker_tests::all_keys(&mut conn).await, before);
    let queue: Vec<String> = conn.lrange(f.keys.queue(&conv), 0, -1).await.unwrap();
    assert_eq!(queue, ["m1", "m2"]);
    assert_eq!(
        finish(&f, "d1", &conv, "m1", "l").await,
        Finished::Done { left: 1 }
    );
    check_invariants(&f, &[&conv], &["d1"]).await;
}

#[tokio::test]
async fn a_stale_lease_changes_nothing() {
    let mut f = fixture().await;
    let a = request("alice", "1", None);
    let conv = a.conversation.clone();
    enqueue(&f, &a, "m1").await;
    take(&mut f, "d1").await;
    claim(&f, "d1", &conv, "good").await;
    let before = broker_tests::all_keys(&mut f.redis.conn().await).await;
    assert_eq!(finish(&f, "d1", &conv, "m1", "bad").await, Finished::Stale);
    assert_eq!(
        f.queue.release("d1", &conv, Some("bad")).await.unwrap(),
        Released::Stale
    );
    assert_eq!(
        broker_tests::all_keys(&mut f.redis.conn().await).await,
        before
    );
    let record = f.queue.message_record("m1").await.unwrap().unwrap();
    assert_eq!(record.status, "running");
}

#[tokio::test]
async fn reaping_a_dead_drainer_requeues_at_the_front_and_fences_it() {
    let mut f = fixture().await;
    let a = request("alice", "a", None);
    let b = request("bob", "b", None);
    enqueue(&f, &a, "a1").await;
    enqueue(&f, &a, "a2").await;
    enqueue(&f, &b, "b1").await;
    // d1 takes alice, then dies mid-turn.
    assert_eq!(
        take(&mut f, "d1").await.as_deref(),
        Some(a.conversation.as_str())
    );
    claim(&f, "d1", &a.conversation, "old").await;
    let mut conn = f.redis.conn().await;
    let _: () = conn.zadd(f.keys.drainers(), "d1", 0).await.unwrap();
    f.queue.heartbeat("d2").await.unwrap();

    let dead = f
        .queue
        .expired_drainers(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(dead, vec!["d1".to_owned()]);
    for conv in f.queue.processing_list("d1").await.unwrap() {
        assert_eq!(
            f.queue
                .release("d1", &Conversation::from_key(conv), None)
                .await
                .unwrap(),
            Released::Done
        );
    }
    assert!(f.queue.forget("d1", Duration::from_secs(15)).await.unwrap());
    check_invariants(&f, &[&a.conversation, &b.conversation], &["d1", "d2"]).await;
    assert_eq!(
        f.queue.message_record("a1").await.unwrap().unwrap().status,
        "queued"
    );

    // The reaped conversation is next, ahead of bob who was already waiting.
    assert_eq!(
        take(&mut f, "d2").await.as_deref(),
        Some(a.conversation.as_str())
    );
    let again = claim(&f, "d2", &a.conversation, "new").await;
    assert_eq!((again.message_id.as_str(), again.attempts), ("a1", 2));
    // The dead drainer's late finish is refused.
    assert_eq!(
        finish(&f, "d1", &a.conversation, "a1", "old").await,
        Finished::Stale
    );
    assert_eq!(
        finish(&f, "d2", &a.conversation, "a1", "new").await,
        Finished::Done { left: 1 }
    );
    check_invariants(&f, &[&a.conversation, &b.conversation], &["d1", "d2"]).await;
}

#[tokio::test]
async fn release_keeps_the_place_and_reconcile_cleans_strays() {
    let mut f = fixture().await;
    let a = request("alice", "a", None);
    let b = request("bob", "b", None);
    enqueue(&f, &a, "a1").await;
    enqueue(&f, &b, "b1").await;
    // Moved by BLMOVE but never claimed (the reply was lost): release puts it back in front.
    assert_eq!(
        take(&mut f, "d1").await.as_deref(),
        Some(a.conversation.as_str())
    );
    assert_eq!(
        f.queue.release("d1", &a.conversation, None).await.unwrap(),
        Released::Done
    );
    assert_eq!(
        f.queue.release("d1", &a.conversation, None).await.unwrap(),
        Released::Absent
    );
    assert_eq!(
        take(&mut f, "d1").await.as_deref(),
        Some(a.conversation.as_str())
    );
    check_invariants(&f, &[&a.conversation, &b.conversation], &["d1"]).await;
}

#[tokio::test]
async fn dedup_and_depth_limits() {
    let f = fixture().await;
    let a = request("alice", "x", Some("wamid.1"));
    assert_eq!(
        enqueue(&f, &a, "m1").await,
        Enqueued::Accepted {
            position: 1,
            queued: None
        }
    );
    assert_eq!(
        enqueue(&f, &a, "m2").await,
        Enqueued::Duplicate {
            original: "m1".into()
        }
    );
    assert!(
        f.queue.message_record("m2").await.unwrap().is_none(),
        "a duplicate writes nothing"
    );
    // Another conversation may use the same client message id.
    let b = request("bob", "x", Some("wamid.1"));
    assert_eq!(
        enqueue(&f, &b, "m3").await,
        Enqueued::Accepted {
            position: 1,
            queued: None
        }
    );

    let c = request("carol", "x", None);
    for i in 0..2 {
        let r = f
            .queue
            .enqueue(&c, &format!("c{i}"), Mode::Async, None, 2, DAY)
            .await
            .unwrap();
        assert!(matches!(r, Enqueued::Accepted { .. }));
    }
    let r = f
        .queue
        .enqueue(&c, "c2", Mode::Async, None, 2, DAY)
        .await
        .unwrap();
    assert_eq!(r, Enqueued::Full { depth: 2 });
    assert!(f.queue.message_record("c2").await.unwrap().is_none());
}

#[tokio::test]
async fn one_enqueue_call_of_several_messages_answers_each_as_if_alone() {
    let f = fixture().await;
    let a = request("alice", "x", Some("wamid.1"));
    let b = request("bob", "y", None);
    let message = |request: &MessageRequest, id: &str, mode: Mode| NewMessage {
        request: request.clone(),
        message_id: id.into(),
        mode,
        reply: None,
    };
    let batch = [
        message(&a, "m1", Mode::Sync),
        // the same client message id again: a duplicate of the one just before it
        message(&a, "m2", Mode::Sync),
        message(&b, "m3", Mode::Sync),
        message(&b, "m4", Mode::Async),
        // over the depth of 2
        message(&b, "m5", Mode::Sync),
    ];
    let results = f.queue.enqueue_many(&batch, 2, DAY).await.unwrap();
    let queued = |r: &Enqueued| {
        matches!(
            r,
            Enqueued::Accepted {
                queued: Some(_),
                ..
            }
        )
    };
    assert_eq!(results.len(), 5);
    assert!(matches!(
        results[0],
        Enqueued::Accepted {
            position: 1,
            queued: None
        }
    ));
    assert_eq!(
        results[1],
        Enqueued::Duplicate {
            original: "m1".into()
        }
    );
    assert!(matches!(
        results[2],
        Enqueued::Accepted {
            position: 1,
            queued: None
        }
    ));
    assert!(
        matches!(results[3], Enqueued::Accepted { position: 2, .. }) && queued(&results[3]),
        "an async message gets its queued frame: {:?}",
        results[3]
    );
    assert_eq!(results[4], Enqueued::Full { depth: 2 });
    assert!(f.queue.message_record("m2").await.unwrap().is_none());
    assert!(f.queue.message_record("m5").await.unwrap().is_none());

    let mut conn = f.redis.conn().await;
    let stored: Vec<String> = conn
        .lrange(f.keys.queue(&b.conversation), 0, -1)
        .await
        .unwrap();
    assert_eq!(stored, ["m3", "m4"]);
    let stats: std::collections::HashMap<String, i64> = conn.hgetall(f.keys.stats()).await.unwrap();
    let counter = |name: &str| stats.get(name).copied().unwrap_or(0);
    assert_eq!(
        [
            counter("enqueued_total"),
            counter("queued"),
            counter("active_queues"),
            counter("deduplicated_total"),
            counter("rejected_full_total"),
        ],
        [3, 3, 2, 1, 1],
        "the counters, written once for the call: {stats:?}"
    );
    check_invariants(&f, &[&a.conversation, &b.conversation], &["d1"]).await;
}

/// Enqueues alice's `m1` in `mode` with the reply channel `bt:reply:api-x`, listens on that
/// channel and on `also`, and starts `m1` under the lease `l`.
async fn running_with_reply(
    f: &mut Fixture,
    mode: Mode,
    also: &[&str],
) -> (MessageRequest, redis::aio::PubSub, Claimed) {
    let a = request("alice", "x", None);
    f.queue
        .enqueue(&a, "m1", mode, Some("bt:reply:api-x"), 50, DAY)
        .await
        .unwrap();
    let client = redis::Client::open(f.redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("bt:reply:api-x").await.unwrap();
    for channel in also {
        pubsub.subscribe(*channel).await.unwrap();
    }
    take(f, "d1").await;
    let c = claim(f, "d1", &a.conversation, "l").await;
    assert_eq!(
        (c.mode.as_str(), c.reply.as_str()),
        (mode.as_str(), "bt:reply:api-x")
    );
    (a, pubsub, c)
}

/// Finishes `m1` of `a` with `done`, and returns what its reply channel heard.
async fn finish_and_hear(
    f: &Fixture,
    a: &MessageRequest,
    done: &Finish,
    pubsub: &mut redis::aio::PubSub,
) -> String {
    let retention = Retention {
        result_ttl: DAY,
        dead_list_max: 100,
        events_max: 100,
    };
    let finished = f
        .queue
        .finish("d1", &a.conversation, "m1", "l", done, &retention)
        .await
        .unwrap();
    assert_eq!(finished, Finished::Done { left: 0 });
    use futures_util::StreamExt;
    let message = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("a reply within 5 s")
        .expect("a message");
    message.get_payload().unwrap()
}

#[tokio::test]
async fn finish_publishes_to_the_reply_channel() {
    let mut f = fixture().await;
    let (a, mut pubsub, c) = running_with_reply(&mut f, Mode::Sync, &[]).await;
    // A sync message records no frames.
    let mut done = Finish::new("completed", r#"{"status":"completed"}"#, "", "");
    done.reply = c.reply;
    let payload = finish_and_hear(&f, &a, &done, &mut pubsub).await;
    assert_eq!(payload, "m1\n{\"status\":\"completed\"}");
}

#[tokio::test]
async fn the_outcomes_of_one_finish_call_for_one_channel_go_in_one_message() {
    let mut f = fixture().await;
    let client = redis::Client::open(f.redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    // `replies:` channels are API processes that read batched outcomes; `reply:` is the
    // name an older API process listens on, which gets one message per outcome.
    let channels = [
        "bt:replies:api-x",
        "bt:replies:api-x",
        "bt:replies:api-y",
        "bt:replies:api-x",
        "bt:reply:api-old",
        "bt:reply:api-old",
    ];
    for channel in ["bt:replies:api-x", "bt:replies:api-y", "bt:reply:api-old"] {
        pubsub.subscribe(channel).await.unwrap();
    }
    let mut turns = Vec::new();
    for (i, reply) in channels.iter().enumerate() {
        let r = request(&format!("user{i}"), "x", None);
        let id = format!("m{i}");
        f.queue
            .enqueue(&r, &id, Mode::Sync, Some(reply), 50, DAY)
            .await
            .unwrap();
        take(&mut f, "d1").await;
        let lease = format!("l{i}");
        let c = claim(&f, "d1", &r.conversation, &lease).await;
        let mut done = Finish::new("completed", &format!(r#"{{"n":{i},"t":"é"}}"#), "", "");
        done.reply = c.reply;
        turns.push(TurnEnd {
            conversation: r.conversation.clone(),
            message_id: id,
            lease,
            finish: done,
        });
    }
    let retention = Retention {
        result_ttl: DAY,
        dead_list_max: 100,
        events_max: 100,
    };
    let results = f.queue.finish_many("d1", &turns, &retention).await.unwrap();
    assert_eq!(results, [Finished::Done { left: 0 }; 6]);
    use futures_util::StreamExt;
    let mut heard = Vec::new();
    let mut messages = pubsub.on_message();
    for _ in 0..4 {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a reply within 5 s")
            .expect("a message");
        heard.push((
            message.get_channel_name().to_owned(),
            message.get_payload::<String>().unwrap(),
        ));
    }
    heard.sort();
    // Read back as the API reads them: the batch split into its replies, each one read.
    let (_, batch) = &heard[0];
    let read: Vec<(&str, &str)> = replies::split(batch)
        .unwrap()
        .map(|reply| {
            let (id, outcome, frames) = replies::read(reply).unwrap();
            assert!(frames.is_none());
            (id, outcome)
        })
        .collect();
    assert_eq!(
        read,
        [
            ("m0", r#"{"n":0,"t":"é"}"#),
            ("m1", r#"{"n":1,"t":"é"}"#),
            ("m3", r#"{"n":3,"t":"é"}"#)
        ]
    );
    let record = |i: usize| format!("m{i}\n{{\"n\":{i},\"t\":\"é\"}}");
    let batch = format!("*\n{}\n{}\n{}", record(0), record(1), record(3));
    assert_eq!(
        heard,
        [
            ("bt:replies:api-x".to_owned(), batch),
            ("bt:replies:api-y".to_owned(), record(2)),
            ("bt:reply:api-old".to_owned(), record(4)),
            ("bt:reply:api-old".to_owned(), record(5)),
        ]
    );
}

#[tokio::test]
async fn a_stream_finish_carries_its_frames_as_sse_on_the_reply_channel() {
    let mut f = fixture().await;
    let (a, mut pubsub, c) = running_with_reply(&mut f, Mode::Stream, &[]).await;
    let mut done = Finish::new(
        "completed",
        r#"{"status":"completed"}"#,
        "complete",
        r#"{"type":"complete"}"#,
    );
    done.frames = vec![("progress".into(), r#"{"type":"progress"}"#.into())];
    done.reply = c.reply;
    let payload = finish_and_hear(&f, &a, &done, &mut pubsub).await;
    let (events, _) = f.queue.read_events("m1", None, 10).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["queued", "progress", "complete"]);
    // The outcome, then the ids of the entry before the new frames and of the last, then the
    // new frames as the API sends them.
    let (queued, progress, complete) = (&events[0].id, &events[1].id, &events[2].id);
    assert_eq!(
        payload,
        format!(
            "m1\n{{\"status\":\"completed\"}}\n{queued} {complete}\n\
             id: {progress}\ndata: {{\"type\":\"progress\"}}\n\n\
             id: {complete}\ndata: {{\"type\":\"complete\"}}\n\n"
        )
    );
    // What the API reads of it (`broker_core::replies`, the format's one reader).
    let (id, outcome, batch) = replies::read(&payload).unwrap();
    assert_eq!((id, outcome), ("m1", r#"{"status":"completed"}"#));
    let batch = batch.unwrap();
    assert_eq!((&batch.before, &batch.last), (queued, complete));
    assert!(batch.terminal);
    assert!(payload.ends_with(std::str::from_utf8(&batch.sse).unwrap()));
}

#[tokio::test]
async fn recorded_frames_are_announced_on_the_reply_channel_too() {
    let mut f = fixture().await;
    let events = f.keys.events("m1");
    let (a, mut pubsub, c) = running_with_reply(&mut f, Mode::Stream, &[&events]).await;
    let frames = [("status".to_owned(), "{\"type\":\"status\"}".to_owned())];
    let written = f
        .queue
        .record_events(&a.conversation, "m1", "l", &frames, 100, &c.reply)
        .await
        .unwrap();
    assert!(written);
    // Without a reply channel, only the events channel hears of them.
    let more = [("progress".to_owned(), "{\"type\":\"progress\"}".to_owned())];
    assert!(f
        .queue
        .record_events(&a.conversation, "m1", "l", &more, 100, "")
        .await
        .unwrap());
    let (recorded, _) = f.queue.read_events("m1", None, 10).await.unwrap();
    let kinds: Vec<&str> = recorded.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["queued", "status", "progress"]);

    use futures_util::StreamExt;
    let mut heard = Vec::new();
    let mut messages = pubsub.on_message();
    while heard.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("an announcement within 5 s")
            .expect("a message");
        let payload: String = message.get_payload().unwrap();
        heard.push((message.get_channel_name().to_owned(), payload));
    }
    assert_eq!(
        heard,
        [
            (events.clone(), recorded[1].id.clone()),
            (
                "bt:reply:api-x".to_owned(),
                format!(
                    "m1\n\n{} {}\nid: {}\ndata: {{\"type\":\"status\"}}\n\n",
                    recorded[0].id, recorded[1].id, recorded[1].id
                )
            ),
            (events, recorded[2].id.clone()),
        ]
    );
}
