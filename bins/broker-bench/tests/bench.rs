//! The benchmark tool itself, run small: it starts its own stack of real processes, checks
//! every answer, and prints one JSON line per run with every figure the performance report
//! uses. No figure here is a timing assertion; the command count per message is a count.
//!
//! The binaries it starts (`broker-api`, `broker-drainer`, `mock-worker`) sit next to it:
//! `cargo test --workspace` builds them, since each of their packages has tests of its own.
// Test helpers panic on purpose: a failed step fails the test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use broker_tests::{Stack, API_KEY};
use serde_json::Value;

/// Runs `broker-bench` with `args` and `env`.
fn run<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_broker-bench"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run broker-bench")
}

/// The JSON lines of a bench that succeeded. Fails the test if it failed.
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

/// Runs `broker-bench` with `args`; returns its JSON lines. Fails the test if it failed.
fn bench(args: &[&str]) -> Vec<Value> {
    lines(&run(args, &[]))
}

fn assert_run_line(line: &Value, msgs: u64) {
    assert_eq!(line["msgs"], msgs, "{line}");
    assert_run_line_figures(line);
}

fn assert_run_line_figures(line: &Value) {
    assert_eq!(line["errors"], 0, "{line}");
    assert!(line["msgs_per_s"].as_f64().unwrap() > 0.0, "{line}");
    for q in ["p50", "p90", "p99", "max"] {
        assert!(line["added_ms"][q].is_number(), "{q}: {line}");
    }
    assert!(line["redis_cmds_per_msg"].as_f64().unwrap() > 0.0, "{line}");
    for process in ["api", "drainer0", "mock", "redis", "bench"] {
        assert!(line["cpu_s"][process].is_number(), "{process}: {line}");
        assert!(
            line["peak_rss_mib"][process].as_f64().unwrap() > 0.0,
            "{process}: {line}"
        );
    }
    // The machine's speed, probed before the measurement.
    for figure in ["cpu_ms", "wake_rtt_us"] {
        assert!(
            line["probe"][figure].as_f64().unwrap() > 0.0,
            "{figure}: {line}"
        );
    }
}

#[test]
fn every_mode_runs_checked_and_reports_its_figures() {
    let lines = bench(&[
        "--conversations",
        "3",
        "--messages",
        "4",
        "sync",
        "callback",
        "stream",
    ]);
    assert!(lines[0]["machine"].is_string(), "{}", lines[0]);
    let runs: Vec<&Value> = lines.iter().filter(|l| l.get("run").is_some()).collect();
    assert_eq!(runs.len(), 3, "{lines:?}");
    for (line, mode) in runs.iter().zip(["sync", "callback", "stream"]) {
        assert_eq!(line["mode"], mode);
        assert_run_line(line, 12);
    }
}

#[test]
fn turns_runs_four_conversations_one_message_at_a_time() {
    let lines = bench(&["turns", "--messages", "50"]);
    let line = lines
        .iter()
        .find(|l| l["run"] == "turns")
        .unwrap_or_else(|| panic!("no turns line: {lines:?}"));
    assert_eq!(line["conversations"], 4, "{line}");
    assert_eq!(line["in_turn"], true, "{line}");
    assert_run_line(line, 200);
}

/// What only a running broker's options mean, or only a stack of the bench's own can do, is
/// refused before anything starts, with the reason.
#[test]
fn options_for_a_running_broker_are_checked_before_anything_starts() {
    let mock = ["--mock", "http://127.0.0.1:9"];
    let api = ["--api", "http://127.0.0.1:9"];
    let me = format!("me={}", std::process::id());
    let twice = ["--pid", me.as_str(), "--pid", me.as_str()];
    for (args, why) in [
        (&api[..], "--api needs --mock"),
        (&mock[..], "--mock: only for a running broker"),
        (
            &["--redis", "redis://:pw@127.0.0.1:9"][..],
            "--redis: only for a running broker",
        ),
        (
            &[&api[..], &mock[..], &["wide"]].concat()[..],
            "wide starts a stack",
        ),
        (
            &[&api[..], &mock[..], &["commands"]].concat()[..],
            "give the broker's Redis with --redis",
        ),
        (
            &[&api[..], &mock[..], &["--drainers", "2"]].concat()[..],
            "a running broker (--api) has its own",
        ),
        (
            &[&api[..], &mock[..], &["--pid", "x=4294967295"]].concat()[..],
            "no process 4294967295",
        ),
        (
            &[&api[..], &mock[..], &["--receiver", "0.0.0.0:9"]].concat()[..],
            "name the host",
        ),
        (
            &[&api[..], &mock[..], &twice[..]].concat()[..],
            "me is named twice",
        ),
        (
            &["--api", "127.0.0.1:9", "--mock", "http://127.0.0.1:9"][..],
            "--api: not a http or https URL",
        ),
    ] {
        let out = run(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stderr.contains(":pw@"), "a password in an error: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed a line");
    }
}

#[test]
fn a_sync_message_costs_at_most_five_redis_round_trips() {
    let lines = bench(&["commands"]);
    let line = lines.iter().find(|l| l["run"] == "commands").unwrap();
    assert_run_line(line, 1000);
    let sent = line["redis_sent_per_msg"].as_f64().unwrap();
    // enqueue, BLMOVE, claim, finish: 4, plus the drainer's heartbeats and reconciles.
    assert!(sent <= 5.0, "{sent} commands sent per message: {line}");
    assert!(line["redis_in_scripts_per_msg"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_sweep_draws_latency_against_offered_load() {
    let dir = std::env::temp_dir().join(format!("bench-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("sweep.svg");
    let lines = bench(&[
        "sweep",
        "--rates",
        "50,100",
        "--step-secs",
        "1",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let steps: Vec<&Value> = lines
        .iter()
        .filter(|l| l["run"] == "sweep" && l.get("msgs").is_some())
        .collect();
    // A step that saturates ends the sweep; 50 messages/s does not, even in a debug build.
    assert!(!steps.is_empty(), "{lines:?}");
    assert_eq!(steps[0]["offered_per_s"], 50.0);
    assert_eq!(steps[0]["msgs"], 50);
    assert_run_line_figures(steps[0]);
    // How late the sends left: part of the added latency, never more than it.
    let late = &steps[0]["send_late_ms"];
    for q in ["p50", "p99", "max"] {
        assert!(late[q].as_f64().is_some_and(|v| v >= 0.0), "{late}");
    }
    assert!(
        late["max"].as_f64() <= steps[0]["added_ms"]["max"].as_f64(),
        "{}",
        steps[0]
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "{picture}");
    assert_eq!(picture.matches("<polyline").count(), 3, "{picture}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_backlog_drains_in_mirrored_order_and_weighs_what_redis_keeps() {
    let lines = bench(&[
        "backlog",
        "--backlog",
        "2,8",
        "--backlog-messages",
        "16",
        "--backlog-rounds",
        "2",
    ]);
    let runs: Vec<&Value> = lines
        .iter()
        .filter(|l| l["run"] == "backlog" && l.get("msgs").is_some())
        .collect();
    let order: Vec<u64> = runs
        .iter()
        .map(|l| l["conversations"].as_u64().unwrap())
        .collect();
    assert_eq!(order, [2, 8, 8, 2], "{lines:?}");
    for line in &runs {
        assert_eq!(line["msgs"], 16, "{line}");
        assert_eq!(line["errors"], 0, "{line}");
        assert!(line["drain_us_per_msg"].as_f64().unwrap() > 0.0, "{line}");
        // Every queued message holds a record, a place in its queue and its stream of frames
        // (async), and every finished one keeps its record and frames for the result TTL.
        for figure in ["redis_bytes_per_queued", "redis_bytes_per_finished"] {
            assert!(line[figure].as_u64().unwrap() > 0, "{figure}: {line}");
        }
        for kind in ["conv", "queue", "message", "events"] {
            let bytes = &line["redis_key_bytes_queued"][kind];
            assert!(bytes.as_u64().unwrap() > 0, "{kind}: {line}");
        }
        for kind in ["message", "events"] {
            let bytes = &line["redis_key_bytes_finished"][kind];
            assert!(bytes.as_u64().unwrap() > 0, "{kind}: {line}");
        }
        // A drained conversation leaves no state or queue behind.
        for kind in ["conv", "queue"] {
            assert!(
                line["redis_key_bytes_finished"][kind].is_null(),
                "{kind}: {line}"
            );
        }
    }
    let ratio = lines
        .iter()
        .find(|l| l.get("cost_ratio").is_some())
        .expect("a cost_ratio line");
    assert!(ratio["cost_ratio"].as_f64().unwrap() > 0.0, "{ratio}");
}

/// The processes a bench killed with SIGKILL started stop with it, instead of staying behind.
#[test]
fn a_killed_bench_leaves_no_process_behind() {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_broker-bench"))
        .args(["sync", "--conversations", "20", "--messages", "1000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run broker-bench");
    let parent = bench.id().to_string();
    // The children of `pid`, from /proc.
    let children = |pid: &str| -> Vec<String> {
        std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| {
                        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                        // pid (comm) state ppid ...: the comm may hold spaces, the ')' ends it
                        let after = stat.rsplit_once(')')?.1;
                        let ppid = after.split_whitespace().nth(1)?;
                        (ppid == pid).then(|| e.file_name().to_string_lossy().into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // redis-server, the mock worker, the API and the drainer
    let started = loop {
        let now = children(&parent);
        if now.len() >= 4 {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bench did not start its processes: {now:?}"
        );
        std::thread::yield_now();
    };
    bench.kill().expect("kill the bench");
    bench.wait().expect("wait");
    let gone = |pid: &String| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, s)| s.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.iter().all(gone) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running after the bench was killed: {:?}",
            started.iter().filter(|p| !gone(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // What a killed bench cannot remove itself: its directory (`broker-bench-<pid>-<n>`).
    let mine = format!("broker-bench-{parent}-");
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&mine) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `broker-bench` with `args` and the API key `key`, off the runtime that serves the
/// broker of [`the_bench_measures_a_running_broker_without_starting_or_resetting_anything`].
async fn bench_off_runtime(args: Vec<String>, key: &str) -> Output {
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || run(&args, &[("BENCH_API_KEY", &key)]))
        .await
        .unwrap()
}

/// `broker-bench` against a broker it did not start (`--api`): here the API, a drainer and
/// the mock worker run in this test's process. The bench must drive and check every mode,
/// measure only the processes it is given, read Redis' counts without resetting them, and
/// refuse what only a stack of its own can do.
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
    let out = bench_off_runtime(
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
    let again = lines(&bench_off_runtime(args(&["sync"]), API_KEY).await);
    assert_eq!(again[1]["errors"], 0, "{}", again[1]);

    // A key the API refuses is named as the problem.
    let refused = bench_off_runtime(args(&["sync"]), "not-a-key").await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("BENCH_API_KEY"), "{stderr}");

    // What only a stack of its own can do is refused before anything is sent.
    for (scenario, why) in [
        ("wide", "wide starts a stack"),
        ("backlog", "backlog starts a stack"),
    ] {
        let out = bench_off_runtime(args(&[scenario]), API_KEY).await;
        assert_eq!(out.status.code(), Some(64), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{stderr}");
    }
    s.mock.assert_one_in_flight();
}
