//! The worker leg: one `POST {WORKER_BASE_URL}/api/v1/chat/stream` per turn, read to its
//! terminal frame, with the failure handling of docs/design.md §5:
//!
//! | what happens | what the drainer does |
//! |---|---|
//! | 429 `CONCURRENT_REQUEST_REJECTED` / `QUEUE_DEPTH_EXCEEDED` / `RATE_LIMIT_EXCEEDED` | wait `Retry-After` (or `retry_after_ms`), retry; not a failed attempt |
//! | connection refused, 5xx before the stream | back off with jitter, retry up to the attempt limit, then `WORKER_UNAVAILABLE` (503) |
//! | any other 4xx (validation, MCP limits) | fail at once with the worker's status and body |
//! | the stream ends without `complete`/`error` | `WORKER_DISCONNECTED` (502); never resent |
//! | no event for the idle timeout | `TIMEOUT` (504) |
//! | an `error` frame | `WORKER_ERROR` (502) with the worker's message |
//! | a `complete` frame that is not a `ChatResponse` | `INVALID_WORKER_RESPONSE` (502) |

use std::time::Duration;

use broker_proto::sse::{Frame, FrameParser};
use broker_proto::{ChatResponse, Failure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Uri};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::config::WorkerSettings;
use crate::http_client::{self, HttpClient};

/// 429 codes that mean "busy, come back later", as opposed to a limit the turn hit.
pub const BUSY_CODES: &[&str] = &[
    "CONCURRENT_REQUEST_REJECTED",
    "QUEUE_DEPTH_EXCEEDED",
    "RATE_LIMIT_EXCEEDED",
];

/// The largest error body read from the worker.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How a turn ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnResult {
    /// The worker's `ChatResponse`, read, and as it was sent.
    Completed {
        response: ChatResponse,
        json: String,
    },
    Failed(Failure),
}

/// Calls the worker's stream endpoint.
#[derive(Clone)]
pub struct WorkerClient {
    client: HttpClient,
    uri: Uri,
    /// `Bearer <WORKER_API_KEY>`, marked sensitive; none without a key.
    authorization: Option<HeaderValue>,
    settings: WorkerSettings,
}

/// The answer to one attempt before its stream is read.
enum Opened {
    Stream(Incoming),
    Busy(Duration),
    Retryable(String),
    Rejected(Failure),
}

/// A failed turn with the usual error texts.
fn fail(status: u16, error: &str, code: &str, message: impl Into<String>) -> TurnResult {
    TurnResult::Failed(Failure::new(status, error, code, message))
}

impl WorkerClient {
    /// A client keeping up to `max_idle` idle connections: a drainer keeps as many as it runs
    /// turns at once, so that turns ending together do not close connections the next turns
    /// open again.
    pub fn new(settings: &WorkerSettings, max_idle: usize) -> Result<Self, String> {
        let uri: Uri = format!("{}/api/v1/chat/stream", settings.base_url)
            .parse()
            .map_err(|e| format!("WORKER_BASE_URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err("WORKER_BASE_URL: must be an http or https URL with a host".into());
        }
        let client = HttpClient::new(
            http_client::plain_dial(settings.connect_timeout),
            &settings.trust,
            max_idle,
        )
        .map_err(|e| format!("WORKER_BASE_URL: {e}"))?;
        let key = settings.api_key.expose_secret();
        let authorization = if key.is_empty() {
            None
        } else {
            // Checked as a header value: no line breaks can reach the request.
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "WORKER_API_KEY: not a valid header value".to_owned())?;
            value.set_sensitive(true);
            Some(value)
        };
        Ok(Self {
            client,
            uri,
            authorization,
            settings: settings.clone(),
        })
    }

    /// Runs one turn to its end. `on_frame` sees every frame the worker sends, in order: its
    /// data as sent and how it parsed (the events a stream client would see). `traceparent`
    /// (the client's W3C trace context, checked) goes to the worker as it came.
    pub async fn run_turn(
        &self,
        body: &str,
        traceparent: Option<&str>,
        on_frame: &mut (dyn FnMut(&str, &Frame) + Send),
    ) -> TurnResult {
        let mut failures = 0u32;
        loop {
            match self.open(body.as_bytes(), traceparent).await {
                Opened::Stream(response) => return self.read_stream(response, on_frame).await,
                Opened::Rejected(failure) => return TurnResult::Failed(failure),
                Opened::Busy(wait) => {
                    tracing::info!(
                        wait_ms = wait.as_millis() as u64,
                        "worker busy, waiting to retry"
                    );
                    tokio::time::sleep(wait).await;
                }
                Opened::Retryable(reason) => {
                    failures += 1;
                    if failures >= self.settings.max_attempts {
                        return fail(
                            503,
                            "worker unavailable",
                            "WORKER_UNAVAILABLE",
                            format!("the worker could not be reached after {failures} attempts"),
                        );
                    }
                    let delay =
                        backoff(self.settings.retry_base, self.settings.retry_max, failures);
                    tracing::warn!(%reason, attempt = failures, delay_ms = delay.as_millis() as u64, "worker call failed, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends one request to the worker as it is, on `path_and_query` of its base URL, with the
    /// broker's worker key; the answer once its head has come (within the idle timeout).
    /// For the worker's routes the API passes through (its proxy).
    pub async fn forward(
        &self,
        method: hyper::Method,
        path_and_query: &str,
        headers: hyper::HeaderMap,
        body: Bytes,
    ) -> Result<hyper::Response<Incoming>, String> {
        let uri: Uri = format!("{}{path_and_query}", self.settings.base_url)
            .parse()
            .map_err(|_| "not a valid path".to_owned())?;
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(h) = request.headers_mut() {
            *h = headers;
            match &self.authorization {
                Some(authorization) => {
                    h.insert(AUTHORIZATION, authorization.clone());
                }
                None => {
                    h.remove(AUTHORIZATION);
                }
            }
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("the request could not be built: {e}"))?;
        match tokio::time::timeout(self.settings.idle_timeout, self.client.send(request)).await {
            Err(_) => Err("no answer within the idle timeout".into()),
            Ok(Err(e)) => Err(format!("request failed: {e}")),
            Ok(Ok(response)) => Ok(response),
        }
    }

    async fn open(&self, body: &[u8], traceparent: Option<&str>) -> Opened {
        let mut request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream");
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let Ok(request) = request.body(Full::new(Bytes::copy_from_slice(body))) else {
            return Opened::Rejected(Failure::new(
                500,
                "internal error",
                "INTERNAL_ERROR",
                "the worker request could not be built",
            ));
        };
        let response =
            match tokio::time::timeout(self.settings.idle_timeout, self.client.send(request)).await
            {
                Err(_) => {
                    return Opened::Retryable("no response headers within the idle timeout".into())
                }
                Ok(Err(e)) => return Opened::Retryable(format!("request failed: {e}")),
                Ok(Ok(response)) => response,
            };
        let status = response.status().as_u16();
        let retry_after = http_client::retry_after(&response).map(Duration::from_secs);
        let mut response = response.into_body();
        if status == 200 {
            return Opened::Stream(response);
        }
        let bytes = match tokio::time::timeout(
            self.settings.idle_timeout,
            http_client::collect(&mut response, MAX_ERROR_BODY),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            _ => Vec::new(),
        };
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let text = |field: &str| json.get(field).and_then(Value::as_str).map(str::to_owned);
        if (500..600).contains(&status) {
            return Opened::Retryable(format!("worker answered {status}"));
        }
        if status == 429 {
            if let Some(code) = text("code").filter(|c| BUSY_CODES.contains(&c.as_str())) {
                let hinted = json
                    .get("retry_after_ms")
                    .and_then(Value::as_u64)
                    .map(Duration::from_millis)
                    .or(retry_after)
                    .unwrap_or(Duration::from_secs(5));
                tracing::debug!(%code, "worker is busy");
                return Opened::Busy(hinted.min(self.settings.busy_max_wait));
            }
        }
        if (400..500).contains(&status) {
            let error = text("error").unwrap_or_else(|| "worker rejected the request".into());
            let code = text("code").unwrap_or_else(|| "WORKER_REJECTED".into());
            let message = text("message").unwrap_or_else(|| error.clone());
            return Opened::Rejected(Failure::new(status, &error, &code, message));
        }
        Opened::Rejected(Failure::new(
            502,
            "invalid worker response",
            "INVALID_WORKER_RESPONSE",
            format!("the worker answered {status}"),
        ))
    }

    async fn read_stream(
        &self,
        mut response: Incoming,
        on_frame: &mut (dyn FnMut(&str, &Frame) + Send),
    ) -> TurnResult {
        let mut parser = FrameParser::new();
        let idle = self.settings.idle_timeout;
        let end = tokio::time::Instant::now() + self.settings.max_turn;
        loop {
            let wait = idle.min(end.saturating_duration_since(tokio::time::Instant::now()));
            let next = match tokio::time::timeout(wait, response.frame()).await {
                Err(_) if tokio::time::Instant::now() >= end => {
                    return fail(
                        504,
                        "worker timeout",
                        "TURN_TOO_LONG",
                        format!(
                            "the turn did not end within {} s (WORKER_MAX_TURN_SECS)",
                            self.settings.max_turn.as_secs()
                        ),
                    );
                }
                Err(_) => {
                    return fail(
                        504,
                        "worker timeout",
                        "TIMEOUT",
                        format!("no event from the worker for {} s", idle.as_secs()),
                    );
                }
                Ok(next) => next,
            };
            match next {
                None => {
                    return fail(
                        502,
                        "worker disconnected",
                        "WORKER_DISCONNECTED",
                        "the worker's stream ended before the turn finished",
                    );
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "worker stream broke");
                    return fail(
                        502,
                        "worker disconnected",
                        "WORKER_DISCONNECTED",
                        "the worker's stream broke before the turn finished",
                    );
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => parser.feed(&data),
                    Err(_) => continue, // trailers
                },
            }
            if parser.pending() > self.settings.max_frame_bytes {
                return fail(
                    502,
                    "invalid worker response",
                    "FRAME_TOO_LARGE",
                    format!(
                        "the worker sent a frame of more than {} bytes (WORKER_MAX_FRAME_BYTES)",
                        self.settings.max_frame_bytes
                    ),
                );
            }
            while let Some(data) = parser.next_frame() {
                let frame = Frame::parse(&data);
                on_frame(&data, &frame);
                let ended = match frame {
                    Frame::Complete(json) => Some(match ChatResponse::parse(&json) {
                        Some(response) => TurnResult::Completed { response, json },
                        None => fail(
                            502,
                            "invalid worker response",
                            "INVALID_WORKER_RESPONSE",
                            "the worker's complete event carried no valid response",
                        ),
                    }),
                    Frame::Error(message) => {
                        Some(fail(502, "worker error", "WORKER_ERROR", message))
                    }
                    Frame::Invalid => {
                        tracing::warn!("worker sent a frame that is not a JSON object with a type");
                        None
                    }
                    Frame::Keepalive | Frame::Other(_) => None,
                };
                if let Some(result) = ended {
                    // The stream's end follows the terminal frame; read on the side, the
                    // connection goes back to the pool once it has come.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(STREAM_END_WAIT, async {
                            while let Some(Ok(_)) = response.frame().await {}
                        })
                        .await;
                    });
                    return result;
                }
            }
        }
    }
}

/// How long after the terminal frame the end of the worker's stream may take before its
/// connection is given up rather than reused.
const STREAM_END_WAIT: Duration = Duration::from_secs(1);

/// Exponential back-off with jitter: half fixed, half random, capped.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(
        1u32.checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX),
    );
    let capped = exp.min(max);
    let half = capped / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        for _ in 0..100 {
            let first = backoff(base, max, 1);
            assert!(first >= Duration::from_millis(50) && first <= base);
            let late = backoff(base, max, 30);
            assert!(late >= Duration::from_millis(500) && late <= max);
        }
    }
}
