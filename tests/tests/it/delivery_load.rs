//! 50 conversations × 10 messages in callback mode and in two-step stream mode, through two
//! real `broker-drainer` processes: everything delivered once, in order.

use std::collections::HashMap;
use std::time::Duration;

use broker_tests::{
    eventually, without_keepalives, Behaviour, ProcessStack, Receiver, Sse, TestMock,
};
use serde_json::{json, Value};

const CONVERSATIONS: usize = 50;
const MESSAGES: usize = 10;

fn texts(conv: usize) -> Vec<String> {
    (0..MESSAGES).map(|i| format!("c{conv} m{i}")).collect()
}

/// The ordering key of an SSE id (`<ms>-<seq>`).
fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callback_mode_delivers_everything_once_in_order() {
    // The first attempt of every callback fails, so retries happen under load too.
    let receiver = Receiver::start(Behaviour::FailFirst(503, 1)).await;
    let allow = format!("127.0.0.1:{}", receiver.port);
    let extra = [("BROKER_CALLBACK_ALLOWLIST", allow.as_str())];
    let ProcessStack {
        mock, api, http, ..
    } = &ProcessStack::start(TestMock::quick(), 2, &extra).await;

    let mut tasks = Vec::new();
    for conv in 0..CONVERSATIONS {
        let (http, base, url) = (http.clone(), api.base.clone(), receiver.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for text in texts(conv) {
                let body = json!({"user_id": format!("user{conv}"), "client_id": "whatsapp", "message": text, "callback_url": url});
                let a = http.post_message(&base, &body, &[]).await.unwrap();
                assert_eq!(a.status, 202, "{}", a.text);
                ids.push(a.body["message_id"].as_str().unwrap().to_owned());
            }
            (conv, ids)
        }));
    }
    let mut sent = HashMap::new();
    for t in tasks {
        let (conv, ids) = t.await.unwrap();
        sent.insert(conv, ids);
    }
    let total = CONVERSATIONS * MESSAGES;
    let accepted = eventually("every callback", Duration::from_secs(120), || async {
        let got = receiver.accepted();
        (got.len() >= total).then_some(got)
    })
    .await;
    assert_eq!(accepted.len(), total, "each callback accepted exactly once");
    let mut by_user: HashMap<String, Vec<Value>> = HashMap::new();
    for callback in &accepted {
        assert!(callback.verifies(), "signature of {}", callback.webhook_id);
        let payload = callback.json();
        assert_eq!(payload["message_id"], callback.webhook_id.as_str());
        by_user
            .entry(payload["user_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(payload);
    }
    for (conv, ids) in &sent {
        let got = &by_user[&format!("user{conv}")];
        let got_ids: Vec<&str> = got
            .iter()
            .map(|p| p["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(got_ids, *ids, "user{conv}: callbacks out of order");
        for (payload, text) in got.iter().zip(texts(*conv)) {
            assert_eq!(payload["status"], "completed");
            assert_eq!(payload["responses"], json!([format!("echo: {text}")]));
        }
    }
    let stats = mock.state.stats();
    assert_eq!(stats.requests as usize, total, "each turn ran once");
    mock.assert_one_in_flight();
    for conv in 0..CONVERSATIONS {
        assert_eq!(
            stats.started[&format!("user:unfoldingWord:user{conv}")],
            texts(conv)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_step_stream_mode_delivers_everything_once_in_order() {
    let ProcessStack {
        mock, api, http, ..
    } = &ProcessStack::start(TestMock::quick(), 2, &[]).await;

    let mut tasks = Vec::new();
    for conv in 0..CONVERSATIONS {
        let (http, base) = (http.clone(), api.base.clone());
        tasks.push(tokio::spawn(async move {
            // Step one: queue all ten.
            let mut ids = Vec::new();
            for text in texts(conv) {
                let body =
                    json!({"user_id": format!("user{conv}"), "client_id": "web", "message": text});
                let a = http
                    .post_message(&base, &body, &[("prefer", "respond-async")])
                    .await
                    .unwrap();
                assert_eq!(a.status, 202, "{}", a.text);
                ids.push(a.body["message_id"].as_str().unwrap().to_owned());
            }
            // Step two: attach to every one at once and read each to its end.
            let streams = ids.iter().map(|id| {
                let base = base.clone();
                let id = id.clone();
                async move {
                    let mut sse = Sse::attach(&base, &id, None).await;
                    assert_eq!(sse.status, 200, "{}", sse.error_body);
                    without_keepalives(&sse.read_to_end(Duration::from_secs(60)).await)
                }
            });
            let results = futures_util::future::join_all(streams).await;
            let mut last_terminal = (0, 0);
            for ((frames, text), id) in results.iter().zip(texts(conv)).zip(&ids) {
                let kinds: Vec<String> = frames.iter().map(|f| f.kind()).collect();
                assert_eq!(kinds, ["queued", "status", "progress", "complete"], "{id}");
                assert_eq!(frames[0].json()["message_id"], id.as_str());
                let complete = frames[3].json();
                assert_eq!(
                    complete["response"]["responses"],
                    json!([format!("echo: {text}")])
                );
                // Each message's terminal frame was written after its predecessor's.
                let order = id_order(frames[3].id.as_deref().unwrap());
                assert!(
                    order > last_terminal,
                    "{id}: finished before the message ahead of it"
                );
                last_terminal = order;
            }
            conv
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = mock.state.stats();
    assert_eq!(
        stats.requests as usize,
        CONVERSATIONS * MESSAGES,
        "each turn ran once"
    );
    mock.assert_one_in_flight();
    for conv in 0..CONVERSATIONS {
        assert_eq!(
            stats.started[&format!("user:unfoldingWord:user{conv}")],
            texts(conv)
        );
    }
}
