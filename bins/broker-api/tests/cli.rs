//! The real `broker-api` binary refuses to start without an API key, and with a bad setting;
//! its log lines reach standard output while it runs, and all of them by the time it exits.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn refuses_to_start_without_a_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_broker-api"))
        .env_clear()
        .env("PORT", "0")
        .output()
        .expect("run broker-api");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BROKER_API_KEY"), "{err}");
}

#[test]
fn a_bad_setting_names_itself() {
    let out = Command::new(env!("CARGO_BIN_EXE_broker-api"))
        .env_clear()
        .env("BROKER_API_KEY", "k")
        .env("BROKER_SYNC_TIMEOUT_SECS", "soon")
        .output()
        .expect("run broker-api");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BROKER_SYNC_TIMEOUT_SECS"));
}

#[test]
fn log_lines_are_written_while_it_runs_and_the_last_ones_at_exit() {
    // No Redis behind the URL: the API starts all the same and logs that it is listening.
    let mut api = Command::new(env!("CARGO_BIN_EXE_broker-api"))
        .env_clear()
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("BROKER_API_WORKERS", "1")
        .env("BROKER_INSECURE_NO_AUTH", "true")
        .env("REDIS_URL", "redis://127.0.0.1:1/")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run broker-api");
    let (tx, lines) = mpsc::channel();
    let out = BufReader::new(api.stdout.take().expect("stdout"));
    let reader = std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("broker-api listening"))
    {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = api.kill();
                panic!("no listening line while it runs ({e}); it wrote {seen:?}");
            }
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &api.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = api.wait().expect("wait");
    assert!(status.success(), "{status}");
    reader.join().expect("reader");
    seen.extend(lines.try_iter());
    assert!(
        seen.last()
            .is_some_and(|l| l.contains("\"broker-api stopped\"")),
        "the last line is not the one logged at exit: {seen:?}"
    );
    for line in &seen {
        assert!(
            line.starts_with("{\"timestamp\":") && line.ends_with('}'),
            "not one whole JSON line: {line}"
        );
    }
}
