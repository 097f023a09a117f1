//! A client's SSE connection, read frame by frame the way the web client reads it.

#[allow(unused_imports)]
use super::*;

/// One SSE frame as the client received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseFrame {
    /// The whole block, without the blank line that ends it.
    pub raw: String,
    pub id: Option<String>,
    /// The first `data: ` line's payload.
    pub data: String,
}

impl SseFrame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    pub fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap_or("").to_owned()
    }

    /// The web client's parser rules (docs/worker-contract.md §2.2): LF framing, and a first
    /// `data: ` line holding a JSON object whose `type` the client knows.
    pub fn assert_web_client_readable(&self) {
        assert!(!self.raw.contains('\r'), "CR in frame {:?}", self.raw);
        let first = self
            .raw
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("no `data: ` line in {:?}", self.raw));
        let value: Value = serde_json::from_str(first)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", self.raw));
        let kind = value["type"].as_str().unwrap_or("");
        assert!(
            [
                "queued",
                "status",
                "progress",
                "tool_use",
                "tool_result",
                "keepalive",
                "complete",
                "error"
            ]
            .contains(&kind),
            "unknown type in {:?}",
            self.raw
        );
    }
}

/// A client's SSE connection, read frame by frame.
pub struct Sse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    pub error_body: String,
}

impl Sse {
    /// Sends a request and keeps its body open for reading.
    pub async fn open(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Self {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("x-api-key", API_KEY);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        let res = client.request(req).await.expect("SSE request");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let mut sse = Self {
            status,
            headers,
            body: res.into_body(),
            buffer: Vec::new(),
            error_body: String::new(),
        };
        if status != 200 {
            let bytes = (&mut sse.body).collect().await.map(|b| b.to_bytes());
            sse.error_body = String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned();
        }
        sse
    }

    /// `GET /api/v1/stream?message_id=…`, optionally resuming after `last_event_id`.
    pub async fn attach(base: &str, message_id: &str, last_event_id: Option<&str>) -> Self {
        let url = format!("{base}/api/v1/stream?message_id={message_id}");
        match last_event_id {
            Some(id) => Self::open("GET", &url, &[("last-event-id", id)], None).await,
            None => Self::open("GET", &url, &[], None).await,
        }
    }

    /// The next frame, or `None` when the server ended the stream. Panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<SseFrame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).take(end).collect();
                let raw = String::from_utf8(block).expect("utf-8 frame");
                let id = raw
                    .lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .map(str::to_owned);
                let data = raw
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("")
                    .to_owned();
                return Some(SseFrame { raw, id, data });
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no SSE frame within {limit:?}; pending {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    )
                });
            match frame {
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "stream ended inside a frame: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
                Some(Err(e)) => panic!("SSE stream broke: {e}"),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Every frame until the server ends the stream.
    pub async fn read_to_end(&mut self, limit: Duration) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next(limit).await {
            frame.assert_web_client_readable();
            frames.push(frame);
        }
        frames
    }
}

/// Frames without the keepalives (which carry no id and may come at any quiet moment).
pub fn without_keepalives(frames: &[SseFrame]) -> Vec<SseFrame> {
    frames
        .iter()
        .filter(|f| f.kind() != "keepalive")
        .cloned()
        .collect()
}
