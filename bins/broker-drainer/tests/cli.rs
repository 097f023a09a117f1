//! The real `broker-drainer` binary refuses a bad configuration with every problem and exit 64.
//! (Having an integration test here also makes `cargo test` build the binary that the
//! process-level tests in `tests/` start.)

use std::process::Command;

#[test]
fn bad_configuration_is_reported_all_at_once_with_exit_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_broker-drainer"))
        .env_clear()
        .env("REDIS_URL", "http://nope")
        .env("DRAINER_CONCURRENCY", "0")
        .output()
        .expect("run broker-drainer");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("REDIS_URL") && err.contains("DRAINER_CONCURRENCY"),
        "{err}"
    );
}
