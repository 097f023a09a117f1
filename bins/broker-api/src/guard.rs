//! The checks every client request passes before a handler runs and before any byte of its
//! body is read: the API key, the `Host` header of HTTP/1.1, and a declared body length
//! within `BROKER_MAX_BODY_BYTES`. A refused request is answered at once with the API's JSON
//! error and its connection is closed, so nothing of a body an unauthenticated client sends
//! is buffered or decoded.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use actix_web::http::{ConnectionType, Method, Version};
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, ResponseError};

use crate::error::WorkerError;
use crate::{ApiError, AppState};

/// The paths that need a client key; `/health`, `/metrics` and `/public/` do not.
const KEYED: &str = "/api/";

/// The name of the key a request authenticated with, for the handlers.
#[derive(Debug, Clone)]
pub struct KeyName(pub String);

/// Is `path` one of the worker's routes (the chat routes and those proxied to the worker),
/// whose errors are answered in the worker's shapes? The broker's own routes are not.
pub fn is_worker_path(path: &str) -> bool {
    let own = path == "/api/v1/message"
        || path.starts_with("/api/v1/message/")
        || path.starts_with("/api/v1/queue/")
        || path == "/api/v1/stream";
    (path.starts_with(KEYED) && !own) || path.starts_with("/public/")
}

/// Runs the checks; on a refusal the handler (and so the body) is never reached.
pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody, Holding>>, actix_web::Error> {
    let http10 = req.version() < Version::HTTP_11;
    if let Err(refusal) = check(&req) {
        let mut req = req;
        // The body stays unread: the payload is held until the answer is written, and
        // actix-http closes a connection whose payload is unfinished and not dropped (a
        // dropped chunked payload would be read to its end and discarded).
        let unread = req.take_payload();
        let answer = if is_worker_path(req.path()) {
            WorkerError(refusal).error_response()
        } else {
            refusal.error_response()
        };
        let mut response = req
            .into_response(answer)
            .map_body(|_, body| Holding { body, unread });
        response
            .response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
        return Ok(response.map_into_right_body());
    }
    let mut response = next.call(req).await?;
    if http10 && matches!(response.response().body().size(), BodySize::Stream) {
        // HTTP/1.0 has no chunked coding: a streamed answer ends with the connection.
        let head = response.response_mut().head_mut();
        head.no_chunking(true);
        head.set_connection_type(ConnectionType::Close);
    }
    Ok(response.map_into_left_body())
}

/// A refusal's body, holding the request's unread payload until it is written.
pub struct Holding {
    body: BoxBody,
    unread: Payload,
}

impl MessageBody for Holding {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let _ = &self.unread;
        Pin::new(&mut self.body).poll_next(cx)
    }
}

fn check(req: &ServiceRequest) -> Result<(), ApiError> {
    if req.version() == Version::HTTP_11 && !req.headers().contains_key(HOST) {
        return Err(ApiError::Invalid(
            "an HTTP/1.1 request needs a Host header".into(),
        ));
    }
    if req.path().starts_with("/public/") {
        // The worker's public files take no key, so they take no body either: nothing an
        // anonymous client sends is read or passed on.
        let bodiless = matches!(*req.method(), Method::GET | Method::HEAD)
            && !req.headers().contains_key(TRANSFER_ENCODING)
            && req
                .headers()
                .get(CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        if !bodiless {
            return Err(ApiError::Invalid(
                "/public/ serves files: only GET and HEAD, without a body".into(),
            ));
        }
        return Ok(());
    }
    if req.path().starts_with("/admin/") {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return Err(ApiError::Internal("the API's state is missing".into()));
        };
        let name = state.admin_auth.check(req.headers())?;
        tracing::Span::current().record("key", name);
        req.extensions_mut()
            .insert(crate::admin::AdminName(name.to_owned()));
        return Ok(());
    }
    if !req.path().starts_with(KEYED) {
        return Ok(());
    }
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return Err(ApiError::Internal("the API's state is missing".into()));
    };
    let key = state.auth.check(req.headers())?;
    tracing::Span::current().record("key", key);
    req.extensions_mut().insert(KeyName(key.to_owned()));
    if let Some(length) = req.headers().get(CONTENT_LENGTH) {
        let length = length
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ApiError::Invalid("Content-Length is not a number".into()))?;
        let max = state.api.max_body_bytes;
        if length > max as u64 {
            return Err(ApiError::TooLarge(format!(
                "the body is larger than {max} bytes"
            )));
        }
    }
    Ok(())
}
