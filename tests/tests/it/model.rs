//! Randomised model test of the scripts: thousands of interleavings of enqueues (several
//! messages in one call now and then), the
//! drainer's pipelined BLMOVE + claim (taking up to three conversations), a BLMOVE whose claim
//! was lost, claim, finishes of several turns in one call (a stale one among them now and
//! then), stale finishes, drainer deaths (reap), releases and cancels
//! against a real Redis, checking docs/design.md §6's invariants and the counters against a simple
//! model after every step. The seed is printed; `MODEL_SEED=<n>` replays a run.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use broker_core::queue::{
    Cancelled, Claim, Enqueued, Finish, Finished, Mode, NewMessage, Queue, Released, Retention,
    TurnEnd,
};
use broker_core::{redis_conn, Keys};
use broker_proto::{validate_message, Conversation, ValidationLimits};
use broker_tests::{settings, TestRedis};
use redis::AsyncCommands;
use serde_json::json;

const CONVERSATIONS: usize = 4;
const DRAINERS: [&str; 3] = ["d0", "d1", "d2"];
const DAY: Duration = Duration::from_secs(86_400);

/// Where a conversation stands, as the model sees it.
#[derive(Debug, Clone, PartialEq)]
enum Hold {
    /// Nothing taken: in ready (when it has messages) or idle.
    Free,
    /// Moved into a drainer's processing list, not claimed yet.
    Taken(&'static str),
    /// Running its head under a lease.
    Running {
        drainer: &'static str,
        lease: String,
        message: String,
    },
}

fn retention() -> Retention {
    Retention {
        result_ttl: DAY,
        dead_list_max: 10,
        events_max: 100,
    }
}

/// Finishes a turn as completed with an empty outcome.
async fn finish(
    queue: &Queue,
    drainer: &str,
    conv: &Conversation,
    message: &str,
    lease: &str,
) -> Finished {
    queue
        .finish(
            drainer,
            conv,
            message,
            lease,
            &Finish::new("completed", "{}", "complete", "{}"),
            &retention(),
        )
        .await
        .unwrap()
}

/// Checks a claim against the model and records what it started.
fn apply_claim(
    hold: &mut Hold,
    queued: &VecDeque<String>,
    claim: Claim,
    drainer: &'static str,
    lease: String,
    context: &str,
) {
    match claim {
        Claim::Turn(c) => {
            assert_eq!(
                Some(&c.message_id),
                queued.front(),
                "{context}: only the head runs"
            );
            *hold = Hold::Running {
                drainer,
                lease,
                message: c.message_id,
            };
        }
        Claim::Empty => {
            assert!(queued.is_empty(), "{context}");
            *hold = Hold::Free;
        }
        // The model holds no conversation and never pauses the drainers.
        Claim::Held | Claim::Paused => panic!("{context}: {claim:?}"),
    }
}

#[tokio::test]
async fn random_interleavings_keep_the_invariants() {
    let seed = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("MODEL_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let redis = TestRedis::start().await;
    let s = settings(redis.url(), "http://127.0.0.1:9", &[]);
    let keys = Keys::new("bt", "0");
    let queue = Queue::new(redis_conn::shared(&s.redis).unwrap(), keys.clone());
    let client = redis_conn::client(&s.redis).unwrap();
    let mut blocking = redis_conn::blocking_connection(&client, &s.redis)
        .await
        .unwrap();
    let mut conn = redis.conn().await;

    let requests: Vec<_> = (0..CONVERSATIONS)
        .map(|i| {
            let body = json!({"user_id": format!("u{i}"), "client_id": "web", "message": "x"});
            validate_message(
                body.to_string().as_bytes(),
                "o",
                &ValidationLimits::default(),
            )
            .unwrap()
        })
        .collect();
    let convs: Vec<Conversation> = requests.iter().map(|r| r.conversation.clone()).collect();
    let mut model: Vec<VecDeque<String>> = vec![VecDeque::new(); CONVERSATIONS];
    let mut hold: Vec<Hold> = vec![Hold::Free; CONVERSATIONS];
    let mut stale: Vec<(usize, &'static str, String, String)> = Vec::new();
    let mut next_id = 0u64;
    let mut done = 0u64;

    for step in 0..3000 {
        let op = rng.u8(..8);
        // Claim and finish act on a conversation that can take them, if there is one.
        let eligible: Vec<usize> = (0..CONVERSATIONS)
            .filter(|&c| match op {
                3 => matches!(hold[c], Hold::Taken(_)),
                4 => matches!(hold[c], Hold::Running { .. }),
                _ => true,
            })
            .collect();
        let i = if eligible.is_empty() {
            rng.usize(..CONVERSATIONS)
        } else {
            eligible[rng.usize(..eligible.len())]
        };
        let conv = &convs[i];
        let context = format!("seed {seed}, step {step}");
        match op {
            0 | 1 => {
                // One enqueue call of one to three messages: to this conversation, and maybe
                // to others or to this one again (then they queue in the order given).
                let targets: Vec<usize> = (0..rng.usize(1..=3))
                    .map(|j| {
                        if j == 0 {
                            i
                        } else {
                            rng.usize(..CONVERSATIONS)
                        }
                    })
                    .collect();
                let messages: Vec<NewMessage> = targets
                    .iter()
                    .map(|&c| {
                        next_id += 1;
                        NewMessage {
                            request: requests[c].clone(),
                            message_id: format!("m{next_id}"),
                            mode: Mode::Async,
                            reply: None,
                        }
                    })
                    .collect();
                let results = queue.enqueue_many(&messages, 50, DAY).await.unwrap();
                assert_eq!(results.len(), messages.len(), "{context}");
                for ((&c, message), r) in targets.iter().zip(&messages).zip(results) {
                    if model[c].len() >= 50 {
                        assert_eq!(
                            r,
                            Enqueued::Full {
                                depth: model[c].len() as u64
                            },
                            "{context}"
                        );
                        continue;
                    }
                    let running = matches!(hold[c], Hold::Running { .. });
                    let expected = model[c].len() as u64 + if running { 0 } else { 1 };
                    assert!(
                        matches!(r, Enqueued::Accepted { position, queued: Some(_) } if position == expected),
                        "{context}: {r:?}, expected position {expected} and the queued frame"
                    );
                    model[c].push_back(message.message_id.clone());
                }
            }
            2 => {
                let drainer = DRAINERS[rng.usize(..DRAINERS.len())];
                let waiting: Vec<usize> = (0..CONVERSATIONS)
                    .filter(|&c| hold[c] == Hold::Free && !model[c].is_empty())
                    .collect();
                if rng.bool() {
                    // A BLMOVE whose pipelined claim never ran (the connection dropped between
                    // the two): the conversation waits in the list, taken but not claimed.
                    let moved: Option<String> = conn
                        .lmove(
                            keys.ready(),
                            keys.processing(drainer),
                            redis::Direction::Right,
                            redis::Direction::Left,
                        )
                        .await
                        .unwrap();
                    match moved {
                        Some(key) => {
                            let c = convs.iter().position(|x| x.as_str() == key).unwrap();
                            assert!(waiting.contains(&c), "{context}: moved {key}, not waiting");
                            hold[c] = Hold::Taken(drainer);
                        }
                        None => assert!(waiting.is_empty(), "{context}: {waiting:?} wait"),
                    }
                } else {
                    // The drainer's take: BLMOVE and the claim of the list's head, pipelined,
                    // with room for up to three turns.
                    let head: Option<String> =
                        conn.lindex(keys.processing(drainer), 0).await.unwrap();
                    let head_taken = head.as_ref().and_then(|key| {
                        let c = convs.iter().position(|x| x.as_str() == key)?;
                        (hold[c] == Hold::Taken(drainer)).then_some(c)
                    });
                    // Ready is taken from its right end: the longest waiting first.
                    let ready: Vec<String> = conn.lrange(keys.ready(), 0, -1).await.unwrap();
                    let room = rng.usize(1..=3);
                    let lease = format!("l{step}");
                    let taken = queue
                        .take_ready(
                            &mut blocking,
                            drainer,
                            Duration::from_millis(10),
                            &lease,
                            room,
                        )
                        .await
                        .unwrap();
                    let order: Vec<usize> = taken
                        .iter()
                        .map(|t| convs.iter().position(|x| x == &t.conversation).unwrap())
                        .collect();
                    if waiting.is_empty() {
                        let expected: Vec<usize> = head_taken.into_iter().collect();
                        assert_eq!(
                            order, expected,
                            "{context}: nothing moved, so only a taken head is claimed"
                        );
                    } else {
                        let expected: Vec<usize> = ready
                            .iter()
                            .rev()
                            .take(room)
                            .map(|key| convs.iter().position(|x| x.as_str() == key).unwrap())
                            .collect();
                        assert_eq!(
                            order, expected,
                            "{context}: takes the longest waiting, up to the room"
                        );
                    }
                    for (t, c) in taken.into_iter().zip(order) {
                        apply_claim(&mut hold[c], &model[c], t.claim, drainer, t.lease, &context);
                    }
                }
            }
            3 => {
                if let Hold::Taken(drainer) = hold[i] {
                    let lease = format!("l{step}");
                    let claim = queue.claim(drainer, conv, &lease).await.unwrap();
                    apply_claim(&mut hold[i], &model[i], claim, drainer, lease, &context);
                }
            }
            4 => {
                // The drainer finishes this turn together with some of its other running
                // turns and, now and then, a stale one of its own: one call, in any order.
                if let Hold::Running { drainer, .. } = hold[i].clone() {
                    let mut batch: Vec<(usize, String, String, bool)> = (0..CONVERSATIONS)
                        .filter_map(|c| match &hold[c] {
                            Hold::Running {
                                drainer: d,
                                lease,
                                message,
                            } if *d == drainer && (c == i || rng.bool()) => {
                                Some((c, lease.clone(), message.clone(), true))
                            }
                            _ => None,
                        })
                        .collect();
                    if let Some(at) = stale.iter().position(|s| s.1 == drainer) {
                        if rng.bool() {
                            let (c, _, lease, message) = stale.remove(at);
                            batch.push((c, lease, message, false));
                        }
                    }
                    rng.shuffle(&mut batch);
                    let turns: Vec<TurnEnd> = batch
                        .iter()
                        .map(|(c, lease, message, _)| TurnEnd {
                            conversation: convs[*c].clone(),
                            message_id: message.clone(),
                            lease: lease.clone(),
                            finish: Finish::new("completed", "{}", "complete", "{}"),
                        })
                        .collect();
                    let results = queue
                        .finish_many(drainer, &turns, &retention())
                        .await
                        .unwrap();
                    assert_eq!(results.len(), batch.len(), "{context}");
                    for ((c, _, message, live), r) in batch.into_iter().zip(results) {
                        if !live {
                            assert_eq!(r, Finished::Stale, "{context}: a stale lease in a batch");
                            continue;
                        }
                        assert_eq!(model[c].pop_front().as_ref(), Some(&message), "{context}");
                        assert_eq!(
                            r,
                            Finished::Done {
                                left: model[c].len() as u64
                            },
                            "{context}"
                        );
                        hold[c] = Hold::Free;
                        done += 1;
                    }
                }
            }
            5 => {
                // A drainer dies: everything in its list is reaped; its leases go stale.
                let dead = DRAINERS[rng.usize(..DRAINERS.len())];
                for key in queue.processing_list(dead).await.unwrap() {
                    let c = convs.iter().position(|x| x.as_str() == key).unwrap();
                    let r = queue.release(dead, &convs[c], None).await.unwrap();
                    assert_eq!(r, Released::Done, "{context}");
                    if let Hold::Running {
                        drainer,
                        lease,
                        message,
                    } = hold[c].clone()
                    {
                        stale.push((c, drainer, lease, message));
                    }
                    hold[c] = Hold::Free;
                }
            }
            6 => {
                // A stale lease (from a reaped drainer, or a made-up one) changes nothing.
                let (c, drainer, lease, message) = match (stale.pop(), &hold[i]) {
                    (Some(old), _) => old,
                    (
                        None,
                        Hold::Running {
                            drainer, message, ..
                        },
                    ) => (i, *drainer, "bogus".into(), message.clone()),
                    (None, _) => continue,
                };
                let r = finish(&queue, drainer, &convs[c], &message, &lease).await;
                assert_eq!(r, Finished::Stale, "{context}");
                let r = queue
                    .release(drainer, &convs[c], Some(&lease))
                    .await
                    .unwrap();
                assert!(
                    matches!(r, Released::Stale | Released::Absent),
                    "{context}: {r:?}"
                );
            }
            _ => {
                // Cancel a random message of the conversation: only a queued one goes.
                let Some(pos) = (!model[i].is_empty()).then(|| rng.usize(..model[i].len())) else {
                    continue;
                };
                let id = model[i][pos].clone();
                let running = matches!(&hold[i], Hold::Running { message, .. } if *message == id);
                match queue.cancel(&id, "{}", "{}", DAY).await.unwrap() {
                    Cancelled::Done => {
                        assert!(!running, "{context}: cancelled a running message");
                        model[i].remove(pos);
                        if model[i].is_empty() && hold[i] == Hold::Free {
                            hold[i] = Hold::Free;
                        }
                    }
                    Cancelled::NotQueued { status } => {
                        assert!(running && status == "running", "{context}: {status}")
                    }
                    Cancelled::Absent => panic!("{context}: {id} vanished"),
                }
            }
        }

        // Invariants of docs/design.md §6, and the counters against the model.
        let ready: Vec<String> = conn.lrange(keys.ready(), 0, -1).await.unwrap();
        let mut lists = HashMap::new();
        for d in DRAINERS {
            let l: Vec<String> = conn.lrange(keys.processing(d), 0, -1).await.unwrap();
            lists.insert(d, l);
        }
        for (c, key) in convs.iter().enumerate() {
            let in_ready = ready.iter().filter(|k| *k == key.as_str()).count();
            let in_processing: usize = lists
                .values()
                .map(|l| l.iter().filter(|k| *k == key.as_str()).count())
                .sum();
            let stored: Vec<String> = conn.lrange(keys.queue(key), 0, -1).await.unwrap();
            assert_eq!(
                stored,
                Vec::from(model[c].clone()),
                "{context}: {key} holds its messages in order"
            );
            match &hold[c] {
                Hold::Free if model[c].is_empty() => {
                    assert_eq!(
                        in_ready + in_processing,
                        0,
                        "{context}: idle {key} is in no list"
                    );
                    let exists: bool = conn.exists(keys.conversation(key)).await.unwrap();
                    assert!(!exists, "{context}: idle {key} has no state");
                }
                Hold::Free => assert_eq!(
                    (in_ready, in_processing),
                    (1, 0),
                    "{context}: waiting {key} is in ready once"
                ),
                Hold::Taken(d) | Hold::Running { drainer: d, .. } => {
                    assert_eq!(in_ready, 0, "{context}");
                    assert_eq!(
                        lists[d].iter().filter(|k| *k == key.as_str()).count(),
                        1,
                        "{context}: {key} in {d}'s list once"
                    );
                    assert_eq!(in_processing, 1, "{context}");
                }
            }
        }
        let health = queue.health(Duration::from_secs(15)).await.unwrap();
        let active = model.iter().filter(|q| !q.is_empty()).count() as i64;
        let running = hold
            .iter()
            .filter(|h| matches!(h, Hold::Running { .. }))
            .count() as i64;
        let total: i64 = model.iter().map(|q| q.len() as i64).sum();
        assert_eq!(health.processing, running, "{context}: processing counter");
        assert_eq!(health.queued, total - running, "{context}: queued counter");
        // A conversation emptied by cancel while taken keeps its state until its claim.
        let emptied_taken = (0..CONVERSATIONS)
            .filter(|&c| model[c].is_empty() && matches!(hold[c], Hold::Taken(_)))
            .count() as i64;
        assert_eq!(
            health.active_queues,
            active + emptied_taken,
            "{context}: active_queues counter"
        );
    }
    assert!(done > 100, "the run finished only {done} turns");
}
