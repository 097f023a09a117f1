//! The mock worker's shapes of the real worker that the worker-contract front is tested
//! against: tool iterations in a stream, several progress frames, a voice URL on its own
//! origin, and the preferences, history and audio routes, all behind its key.

use std::time::Duration;

use broker_tests::{eventually, Behaviour, Http, Receiver, Sse, TestMock};
use serde_json::{json, Value};

const KEY: &str = "worker-key";

fn mock() -> TestMock {
    TestMock::start_with(mock_worker::MockSettings {
        port: 0,
        api_key: Some(KEY.into()),
        latency: Duration::from_millis(20),
        ..Default::default()
    })
}

const BEARER: (&str, &str) = ("authorization", "Bearer worker-key");

async fn stream(mock: &TestMock, text: &str) -> Vec<Value> {
    let body = json!({"user_id": "alice", "client_id": "web", "message": text}).to_string();
    let mut sse = Sse::open(
        "POST",
        &format!("{}/api/v1/chat/stream", mock.url),
        &[BEARER, ("content-type", "application/json")],
        Some(body),
    )
    .await;
    assert_eq!(sse.status, 200);
    sse.read_to_end(Duration::from_secs(10))
        .await
        .iter()
        .map(|f| f.json())
        .collect()
}

#[tokio::test]
async fn a_tool_using_turn_streams_the_real_workers_sequence() {
    let mock = mock();
    let frames = stream(&mock, "hi [mock:tools=2,progress=3]").await;
    let kinds: Vec<&str> = frames.iter().filter_map(|f| f["type"].as_str()).collect();
    let statuses: Vec<&str> = frames
        .iter()
        .filter(|f| f["type"] == "status")
        .filter_map(|f| f["message"].as_str())
        .collect();
    assert_eq!(
        statuses,
        [
            "Processing your request...",
            "Executing 1 tool(s)...",
            "Preparing your response...",
            "Executing 1 tool(s)...",
            "Preparing your response...",
        ]
    );
    assert_eq!(kinds.iter().filter(|k| **k == "tool_use").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "tool_result").count(), 2);
    // Three pieces per iteration, and "\n" between iterations.
    assert_eq!(
        kinds.iter().filter(|k| **k == "progress").count(),
        3 * 3 + 2
    );
    assert_eq!(kinds.last(), Some(&"complete"));
    let progress: String = frames
        .iter()
        .filter(|f| f["type"] == "progress")
        .filter_map(|f| f["text"].as_str())
        .collect();
    let response = &frames.last().unwrap()["response"];
    let responses: Vec<&str> = response["responses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(progress, responses.join("\n"));
    assert_eq!(
        responses.last(),
        Some(&"echo: hi [mock:tools=2,progress=3]")
    );
    assert_eq!(response["voice_audio_url"], Value::Null);
    let stats = mock.state.stats();
    assert_eq!((stats.completed, stats.max_in_flight), (1, 1));
}

#[tokio::test]
async fn a_voice_answer_is_fetchable_from_the_mock_with_its_key() {
    let mock = mock();
    let frames = stream(&mock, "speak [mock:voice]").await;
    let url = frames.last().unwrap()["response"]["voice_audio_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        url.starts_with(&format!(
            "{}/api/v1/audio/audio/unfoldingWord/alice/",
            mock.url
        )),
        "{url}"
    );
    let http = Http::new();
    let audio = http.send("GET", &url, &[BEARER], None).await.unwrap();
    assert_eq!(audio.status, 200);
    assert_eq!(audio.headers["content-type"], "audio/ogg");
    assert!(
        audio.text.starts_with("mock audio audio/"),
        "{}",
        audio.text
    );
    assert_eq!(http.send("GET", &url, &[], None).await.unwrap().status, 401);
    let wrong = http
        .send("GET", &url, &[("authorization", "Bearer nope")], None)
        .await
        .unwrap();
    assert_eq!(wrong.status, 403);
    let missing = format!("{}/api/v1/audio/audio/none.opus", mock.url);
    assert_eq!(
        http.send("GET", &missing, &[BEARER], None)
            .await
            .unwrap()
            .status,
        404
    );
    let bad = format!("{}/api/v1/audio/secrets.txt", mock.url);
    assert_eq!(
        http.send("GET", &bad, &[BEARER], None)
            .await
            .unwrap()
            .status,
        400
    );
}

#[tokio::test]
async fn preferences_and_history_are_kept_per_user() {
    let mock = mock();
    let http = Http::new();
    let prefs = format!(
        "{}/api/v1/orgs/unfoldingWord/users/alice@example.org/preferences",
        mock.url
    );
    let got = http.send("GET", &prefs, &[BEARER], None).await.unwrap();
    assert_eq!(
        (got.status, got.body.clone()),
        (200, json!({"response_language": "en"}))
    );
    let json_type = ("content-type", "application/json");
    let put = http
        .send(
            "PUT",
            &prefs,
            &[BEARER, json_type],
            Some(r#"{"response_language":"es"}"#.into()),
        )
        .await
        .unwrap();
    assert_eq!(
        (put.status, put.body),
        (200, json!({"response_language": "es"}))
    );
    let got = http.send("GET", &prefs, &[BEARER], None).await.unwrap();
    assert_eq!(got.body, json!({"response_language": "es"}));
    let bad = http
        .send(
            "PUT",
            &prefs,
            &[BEARER, json_type],
            Some(r#"{"response_language":"Spanish"}"#.into()),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"], "Invalid response_language");

    stream(&mock, "first [mock:progress=2]").await;
    stream(&mock, "second [mock:gap=1]").await;
    let history = format!(
        "{}/api/v1/orgs/unfoldingWord/users/alice/history?limit=50&offset=0",
        mock.url
    );
    let got = http.send("GET", &history, &[BEARER], None).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body["total_count"], 2);
    let answers: Vec<&str> = got.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["assistant_response"].as_str())
        .collect();
    assert_eq!(
        answers,
        ["echo: first [mock:progress=2]", "echo: second [mock:gap=1]"]
    );
    let clear = format!(
        "{}/api/v1/admin/orgs/unfoldingWord/users/alice/history",
        mock.url
    );
    let cleared = http.send("DELETE", &clear, &[BEARER], None).await.unwrap();
    assert_eq!(cleared.body, json!({"message": "User history cleared"}));
    let got = http.send("GET", &history, &[BEARER], None).await.unwrap();
    assert_eq!(got.body["total_count"], 0);
    assert_eq!(
        http.send("GET", &history, &[], None).await.unwrap().status,
        401
    );
}

#[tokio::test]
async fn callbacks_follow_the_progress_mode_and_carry_the_engine_token() {
    let mock = mock();
    let receiver = Receiver::start(Behaviour::Accept).await;
    let http = Http::new();
    let url = format!("{}/api/v1/chat/callback", mock.url);
    let json_type = ("content-type", "application/json");
    let body = json!({
        "user_id": "15551234567", "client_id": "whatsapp", "chat_id": "-100",
        "message": "hi [mock:tools=1,progress=2]",
        "message_key": "wamid.1", "progress_callback_url": receiver.url,
        "progress_mode": "iteration", "progress_throttle_seconds": 3,
    });
    let accepted = http
        .send("POST", &url, &[BEARER, json_type], Some(body.to_string()))
        .await
        .unwrap();
    assert_eq!(accepted.status, 202);
    assert!(accepted.body["message_id"].is_string(), "{}", accepted.text);
    // The complete callback is posted last.
    let received = eventually("the complete callback", Duration::from_secs(10), || async {
        let got = receiver.received();
        got.iter()
            .any(|r| r.json()["type"] == "complete")
            .then_some(got)
    })
    .await;
    let mut bodies = Vec::new();
    for r in &received {
        assert_eq!(r.engine_token, KEY);
        let mut json = r.json();
        let fields = json.as_object_mut().unwrap();
        assert_eq!(fields.remove("user_id"), Some(json!("15551234567")));
        assert_eq!(fields.remove("message_key"), Some(json!("wamid.1")));
        assert_eq!(fields.remove("chat_id"), Some(json!("-100")));
        assert!(fields.remove("timestamp").is_some_and(|t| t.is_string()));
        assert!(!fields.contains_key("thread_id"));
        bodies.push(json);
    }
    assert_eq!(
        bodies,
        [
            json!({"type": "status", "message": "Processing your request..."}),
            json!({"type": "status", "message": "Executing 1 tool(s)..."}),
            json!({"type": "progress", "text": "Looking up 1."}),
            json!({"type": "status", "message": "Preparing your response..."}),
            json!({"type": "complete", "text": "\necho: hi [mock:tools=1,progress=2]"}),
        ]
    );

    // The callback fields are required here, refused on the other chat routes.
    let mut missing = body.clone();
    missing.as_object_mut().unwrap().remove("message_key");
    let refused = http
        .send(
            "POST",
            &url,
            &[BEARER, json_type],
            Some(missing.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 400);
    let stream_url = format!("{}/api/v1/chat/stream", mock.url);
    let refused = http
        .send(
            "POST",
            &stream_url,
            &[BEARER, json_type],
            Some(body.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 400);
    let mut admin = body.clone();
    admin["is_admin"] = json!(true);
    let refused = http
        .send("POST", &url, &[BEARER, json_type], Some(admin.to_string()))
        .await
        .unwrap();
    assert_eq!(refused.status, 400);
}
