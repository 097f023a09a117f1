//! A real HTTP server receiving callbacks, and the Standard-Webhooks signature check.

#[allow(unused_imports)]
use super::*;

/// The callback signing secret of the tests, in Standard-Webhooks form
/// (`whsec_` + base64 of `test-callback-secret`).
pub const CALLBACK_SECRET: &str = "whsec_dGVzdC1jYWxsYmFjay1zZWNyZXQ=";

/// Checks a Standard-Webhooks signature: base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
/// with the base64-decoded part of a `whsec_` secret; any `v1,` entry may match.
pub fn verify_signature(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
) -> bool {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a whsec_ secret");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    header.split(' ').any(|entry| {
        entry
            .strip_prefix("v1,")
            .and_then(|sig| b64.decode(sig).ok())
            .is_some_and(|sig| ring::hmac::verify(&key, &signed, &sig).is_ok())
    })
}

/// What a test receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 200 to everything.
    Accept,
    /// This status to the first `n` attempts of every webhook id, then 200.
    FailFirst(u16, u32),
    /// This status, always.
    Always(u16),
    /// 200, but only after this many milliseconds (a slow receiver).
    Slow(u64),
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub webhook_id: String,
    pub timestamp: String,
    pub signature: String,
    /// The worker's callback header (`X-Engine-Token`), empty when absent.
    pub engine_token: String,
    pub traceparent: String,
    pub body: Bytes,
    pub answered: u16,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn verifies(&self) -> bool {
        verify_signature(
            CALLBACK_SECRET,
            &self.webhook_id,
            &self.timestamp,
            &self.body,
            &self.signature,
        )
    }
}

/// A real HTTP server that receives callbacks on 127.0.0.1 and records them.
pub struct Receiver {
    pub url: String,
    pub port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Self {
        Self::start_at(0, behaviour).await
    }

    /// A receiver on a given loopback port (0: any free one), for one that comes back up
    /// where another was.
    pub async fn start_at(port: u16, behaviour: Behaviour) -> Self {
        use hyper::service::service_fn;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind receiver");
        let port = listener.local_addr().expect("receiver addr").port();
        let log: Arc<Mutex<Vec<Received>>> = Arc::default();
        let shared = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (webhook_id, timestamp, signature, engine_token) = (
                                header("webhook-id"),
                                header("webhook-timestamp"),
                                header("webhook-signature"),
                                header("x-engine-token"),
                            );
                            let traceparent = header("traceparent");
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if let Behaviour::Slow(ms) = behaviour {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let mut log = log.lock().expect("receiver log");
                            let tries = log.iter().filter(|r| r.webhook_id == webhook_id).count();
                            let answered = match behaviour {
                                Behaviour::Accept => 200,
                                Behaviour::FailFirst(status, n) if (tries as u32) < n => status,
                                Behaviour::FailFirst(..) => 200,
                                Behaviour::Always(status) => status,
                                Behaviour::Slow(_) => 200,
                            };
                            log.push(Received {
                                webhook_id,
                                timestamp,
                                signature,
                                engine_token,
                                traceparent,
                                body,
                                answered,
                                at: Instant::now(),
                            });
                            let mut response = hyper::Response::new(Full::new(Bytes::from("{}")));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(answered).expect("status");
                            if answered == 429 {
                                response.headers_mut().insert(
                                    hyper::header::RETRY_AFTER,
                                    hyper::header::HeaderValue::from_static("0"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hooks"),
            port,
            log,
            task,
        }
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().expect("receiver log").clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
