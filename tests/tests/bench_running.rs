//! `broker-bench` against a broker it did not start (`--api`): here the API, a drainer and the
//! mock worker run in this test's process. The bench must drive and check every mode, measure
//! only the processes it is given, read Redis' counts without resetting them, and refuse what
//! only a stack of its own can do.
// Test helpers panic on purpose: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use broker_tests::{binary, Stack, API_KEY};
use serde_json::Value;

/// Runs `broker-bench` with `args` and the API key `key`, off the runtime that serves the
/// broker.
async fn bench(args: Vec<String>, key: &str) -> Output {
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary("broker-bench"))
            .args(&args)
            .env("BENCH_API_KEY", key)
            .output()
            .expect("run broker-bench")
    })
    .await
    .unwrap()
}

/// The JSON lines of a bench that succeeded.
fn lines(out: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "broker-bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_measures_a_running_broker_without_starting_or_resetting_anything() {
    let s = Stack::start(
        Duration::from_millis(5),
        &[("BROKER_CALLBACK_ALLOWLIST", "127.0.0.1")],
    )
    .await;
    // A count the bench must leave alone: it reads Redis' counts, never resets them.
    let mut conn = s.redis.conn().await;
    let _: String = redis::cmd("ECHO")
        .arg("mine")
        .query_async(&mut conn)
        .await
        .unwrap();

    let me = std::process::id().to_string();
    let args = |scenarios: &[&str]| -> Vec<String> {
        [
            "--api",
            &s.api.base,
            "--mock",
            &s.mock.url,
            "--redis",
            s.redis.url(),
            "--pid",
            &format!("broker={me}"),
            "--conversations",
            "3",
            "--messages",
            "4",
        ]
        .iter()
        .chain(scenarios)
        .map(|a| (*a).to_owned())
        .collect()
    };
    let out = bench(
        args(&["sync", "callback", "stream", "turns", "commands"]),
        API_KEY,
    )
    .await;
    let all = lines(&out);
    assert_eq!(all[0]["api"], s.api.base.as_str(), "{}", all[0]);
    assert!(all[0]["redis"].is_string(), "{}", all[0]);
    let runs: Vec<&Value> = all.iter().filter(|l| l.get("run").is_some()).collect();
    let names: Vec<&str> = runs.iter().map(|l| l["run"].as_str().unwrap()).collect();
    assert_eq!(names, ["sync", "callback", "stream", "turns", "commands"]);
    for line in &runs {
        let msgs = match line["run"].as_str().unwrap() {
            "turns" => 16,
            "commands" => 1000,
            _ => 12,
        };
        assert_eq!(line["msgs"], msgs, "{line}");
        assert_eq!(line["errors"], 0, "{line}");
        assert_eq!(line["running"], true, "{line}");
        // The mock's own latency, read from it, is what the added latency leaves out.
        assert_eq!(line["worker_ms"], 5, "{line}");
        assert!(line.get("drainers").is_none(), "{line}");
        // Only the processes it was given, and itself.
        let measured: Vec<&String> = line["cpu_s"].as_object().unwrap().keys().collect();
        assert_eq!(measured, ["bench", "broker"], "{line}");
        assert!(
            line["peak_rss_mib"]["broker"].as_f64().unwrap() > 0.0,
            "{line}"
        );
        assert!(line["redis_cmds_per_msg"].as_f64().unwrap() > 0.0, "{line}");
    }
    let commands = runs[4];
    assert!(
        commands["redis_sent_per_msg"].as_f64().unwrap() <= 5.0,
        "{commands}"
    );
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(info.contains("cmdstat_echo:calls=1,"), "{info}");

    // Again: the mock remembers the first bench's conversations, and the second's are its own.
    let again = lines(&bench(args(&["sync"]), API_KEY).await);
    assert_eq!(again[1]["errors"], 0, "{}", again[1]);

    // A key the API refuses is named as the problem.
    let refused = bench(args(&["sync"]), "not-a-key").await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("BENCH_API_KEY"), "{stderr}");

    // What only a stack of its own can do is refused before anything is sent.
    for (scenario, why) in [
        ("wide", "wide starts a stack"),
        ("backlog", "backlog starts a stack"),
    ] {
        let out = bench(args(&[scenario]), API_KEY).await;
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{stderr}");
    }
    s.mock.assert_one_in_flight();
}
