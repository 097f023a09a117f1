//! The console in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven over WebDriver (fantoccini), against the real API, drainer and
//! Redis: sign-in, search, a redrive and a hold, on a phone-sized window.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use broker_tests::{eventually, wait_finished, Stack};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::admin::admin_stack;

const LIMIT: Duration = Duration::from_secs(30);

/// chromedriver, stopped with the test.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser() -> (Driver, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) must be installed"),
    );
    eventually("chromedriver listening", LIMIT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--no-first-run",
                        "--window-size=390,844"]}),
    );
    // The WebDriver client's TLS (unused on loopback) needs a crypto provider chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = ClientBuilder::rustls()
        .expect("TLS for the WebDriver client")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session");
    (driver, client)
}

/// The text of the element `css`, once it exists and `ready` holds for it.
async fn text_when(client: &Client, css: &str, ready: impl Fn(&str) -> bool) -> String {
    eventually(css, LIMIT, || async {
        let element = client.find(Locator::Css(css)).await.ok()?;
        let text = element.text().await.ok()?;
        ready(&text).then_some(text)
    })
    .await
}

async fn click(client: &Client, css: &str) {
    eventually(css, LIMIT, || async {
        client
            .find(Locator::Css(css))
            .await
            .ok()?
            .click()
            .await
            .ok()
    })
    .await;
}

async fn admin_get(s: &Stack, path: &str) -> Value {
    s.http
        .send(
            "GET",
            &format!("{}/admin/v1/{path}", s.api.base),
            &[("authorization", "Bearer admin-secret")],
            None,
        )
        .await
        .unwrap()
        .body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_searches_redrives_and_holds_in_a_real_browser() {
    let s = admin_stack(&[("WORKER_MAX_ATTEMPTS", "1")]).await;
    let base = s.api.base.clone();
    // A message that failed once (it succeeds when redriven), and a few that went well.
    let a = s
        .http
        .post_message(
            &base,
            &json!({"user_id": "dora", "client_id": "web", "message": "once [mock:status=503,times=1]"}),
            &[("prefer", "respond-async")],
        )
        .await
        .unwrap();
    let failed = a.body["message_id"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_finished(&s.http, &base, &failed, LIMIT).await["status"],
        "failed"
    );
    for i in 0..3 {
        let body = json!({"user_id": "eli", "client_id": "web", "message": format!("hi {i}")});
        assert_eq!(
            s.http.post_message(&base, &body, &[]).await.unwrap().status,
            200
        );
    }

    let (_driver, client) = browser().await;
    client.goto(&format!("{base}/console")).await.unwrap();
    // A client key is no admin key.
    let key = client
        .wait()
        .for_element(Locator::Id("admin-key"))
        .await
        .unwrap();
    key.send_keys("test-key").await.unwrap();
    click(&client, "#sign-in-button").await;
    text_when(&client, "#sign-in-error", |t| {
        t.contains("not an admin key")
    })
    .await;
    // Signed in: the figures.
    let key = client.find(Locator::Id("admin-key")).await.unwrap();
    key.clear().await.unwrap();
    key.send_keys("admin-secret").await.unwrap();
    click(&client, "#sign-in-button").await;
    text_when(&client, "#rate-accepted .value", |t| !t.is_empty()).await;
    text_when(&client, "#running .value", |t| t == "0").await;

    // Search by message id: the whole record.
    let search = client.find(Locator::Id("search-text")).await.unwrap();
    search.send_keys(&failed).await.unwrap();
    click(&client, "#search-button").await;
    let record = text_when(&client, "#record", |t| t.contains("\"status\": \"failed\"")).await;
    assert!(record.contains(&failed), "{record}");

    // The dead list: redrive it.
    client.goto(&format!("{base}/console#/dead")).await.unwrap();
    click(
        &client,
        &format!("button.redrive[data-entry='message:{failed}']"),
    )
    .await;
    text_when(&client, "#notice", |t| t.starts_with("Redriven")).await;
    assert_eq!(
        wait_finished(&s.http, &base, &failed, LIMIT).await["status"],
        "completed"
    );
    text_when(&client, "#dead-empty", |t| t.contains("empty")).await;

    // Hold a conversation from its page.
    client
        .goto(&format!(
            "{base}/console#/conversation/user%3AunfoldingWord%3Adora"
        ))
        .await
        .unwrap();
    click(&client, "#hold").await;
    text_when(&client, "#conversation-state", |t| t == "held").await;
    let held = admin_get(&s, "conversations/user:unfoldingWord:dora").await;
    assert_eq!(held["conversation"]["held_by"]["by"], "ops");
    click(&client, "#resume").await;
    text_when(&client, "#conversation-state", |t| t != "held").await;

    // Pause and resume the drainers from the overview.
    client.goto(&format!("{base}/console#/")).await.unwrap();
    click(&client, "#drainers-pause").await;
    text_when(&client, "#paused-badge", |t| t.starts_with("paused by ops")).await;
    assert_eq!(admin_get(&s, "drainers").await["paused"]["by"], "ops");
    click(&client, "#drainers-resume").await;
    text_when(&client, "#paused-badge", |t| t == "running").await;

    // The conversations page, for the README's picture when asked for.
    if let Ok(path) = std::env::var("CONSOLE_SCREENSHOT") {
        client.set_window_size(1100, 760).await.unwrap();
        client.goto(&format!("{base}/console#/")).await.unwrap();
        text_when(&client, "#rate-completed .value", |t| !t.is_empty()).await;
        std::fs::write(path, client.screenshot().await.unwrap()).unwrap();
    }
    client.close().await.unwrap();
}
