//! A small HTTP client for the tests, and polling with a deadline.

#[allow(unused_imports)]
use super::*;

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
    pub text: String,
}

/// A small HTTP/1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<Answer, String> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let res = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            headers,
            body,
            text,
        })
    }

    /// `POST /api/v1/message` with the test key and JSON.
    pub async fn post_message(
        &self,
        base: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut headers = vec![("x-api-key", API_KEY), ("content-type", "application/json")];
        headers.extend_from_slice(extra);
        self.send(
            "POST",
            &format!("{base}/api/v1/message"),
            &headers,
            Some(body.to_string()),
        )
        .await
    }

    pub async fn get(&self, url: &str) -> Result<Answer, String> {
        self.send("GET", url, &[("x-api-key", API_KEY)], None).await
    }
}

/// Polls `check` until it returns `Some`, or panics after `limit` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `GET /api/v1/message/{id}` until the message is completed or failed.
pub async fn wait_finished(http: &Http, base: &str, message_id: &str, limit: Duration) -> Value {
    let url = format!("{base}/api/v1/message/{message_id}");
    eventually(&format!("message {message_id} to finish"), limit, || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let answer = http.get(&url).await.ok()?;
            let status = answer.body.get("status")?.as_str()?.to_owned();
            (status == "completed" || status == "failed").then_some(answer.body)
        }
    })
    .await
}
