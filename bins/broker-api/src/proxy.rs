//! The worker's other routes on the broker's base URL (docs/worker-contract.md §1.2):
//! preferences, history, audio, voice submissions, the admin routes, `/public/ptxprint/*`.
//! Each request goes to the worker as it came (method, path, query, headers, body), with the
//! broker's worker key instead of the client's; the answer comes back as the worker gave it
//! (status, headers, bytes), streamed. A JSON answer is read whole only when `BROKER_PUBLIC_URL`
//! is set, to move the URLs it carries onto the broker's origin.

use actix_web::body::SizedStream;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::{ApiError, WorkerError};
use crate::guard::is_worker_path;
use crate::AppState;

/// The most of a JSON answer read to rewrite its URLs; a larger one passes unchanged.
const MAX_REWRITTEN: usize = 8 * 1024 * 1024;

/// Headers of one hop, never passed on (RFC 9110 §7.6.1), and those the proxy sets itself.
/// (actix-web and hyper use different versions of the `http` types: headers cross by name
/// and bytes.)
fn passes(name: &str) -> bool {
    !matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
    )
}

/// Any route the broker does not serve itself: passed to the worker when it is one of the
/// worker's (`/api/...`, `/public/...`), a `404` otherwise.
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if !is_worker_path(req.path()) {
        return Err(crate::routes::no_route(&req).into());
    }
    Ok(pass(req, payload, state).await?)
}

/// Passes one request to the worker and its answer back.
async fn pass(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, WorkerError> {
    let body = crate::routes::read_body_in_time(&mut payload, &state).await?;
    let mut headers = hyper::HeaderMap::new();
    for (name, value) in req.headers() {
        if passes(name.as_str()) {
            if let (Ok(name), Ok(value)) = (
                hyper::header::HeaderName::from_bytes(name.as_str().as_bytes()),
                hyper::header::HeaderValue::from_bytes(value.as_bytes()),
            ) {
                headers.append(name, value);
            }
        }
    }
    let method = hyper::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|_| WorkerError(ApiError::Invalid("unknown method".into())))?;
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_owned(), |p| p.as_str().to_owned());
    let response = state
        .worker
        .forward(method, &path_and_query, headers, body)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, path = req.path(), "the worker could not be reached");
            WorkerError(ApiError::BadGateway(
                "The worker could not be reached; please try again.".into(),
            ))
        })?;
    let (head, incoming) = response.into_parts();
    let status = StatusCode::from_u16(head.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut answer = HttpResponse::build(status);
    for (name, value) in &head.headers {
        if passes(name.as_str()) {
            answer.append_header((name.as_str(), value.as_bytes()));
        }
    }
    let length = head
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let json = head
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("json"));
    if let (Some(rewrite), true) = (&state.rewrite, json) {
        if length.is_some_and(|l| l <= MAX_REWRITTEN as u64) {
            let mut incoming = incoming;
            let bytes = broker_core::http_client::collect(&mut incoming, MAX_REWRITTEN)
                .await
                .map_err(|e| {
                    WorkerError(ApiError::BadGateway(format!(
                        "The worker's answer broke off: {e}"
                    )))
                })?;
            let text = String::from_utf8_lossy(&bytes);
            let body = rewrite
                .json(&text)
                .map_or(bytes.clone(), String::into_bytes);
            return Ok(answer.body(body));
        }
    }
    let stream = http_body_util::BodyStream::new(incoming).filter_map(|frame| async move {
        match frame {
            Ok(frame) => frame.into_data().ok().map(Ok::<Bytes, std::io::Error>),
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    });
    Ok(match length {
        Some(length) => answer.body(SizedStream::new(length, stream.boxed_local())),
        None => answer.streaming(stream),
    })
}
