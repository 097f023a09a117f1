//! The real `broker-api` binary refuses to start without an API key, and with a bad setting.

use std::process::Command;

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
