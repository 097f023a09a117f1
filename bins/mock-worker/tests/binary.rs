//! The `mock-worker` binary itself (the benchmark and `./dev run` start it as a process).

use std::process::Command;

#[test]
fn a_bad_setting_is_named_and_exits_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_mock-worker"))
        .env("MOCK_PORT", "not-a-port")
        .output()
        .expect("run mock-worker");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MOCK_PORT"), "{stderr}");
}
