//! The checks every client request passes before a handler runs and before any byte of its
//! body is read: the API key, the `Host` header of HTTP/1.1, and a declared body length
//! within `BROKER_MAX_BODY_BYTES`. A refused request is answered at once with the API's JSON
//! error and its connection is closed, so nothing of a body an unauthenticated client sends
//! is buffered or decoded.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{CONTENT_LENGTH, HOST};
use actix_web::http::{ConnectionType, Version};
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, ResponseError};

use crate::{ApiError, AppState};

/// The paths that need a client key; `/health` and `/metrics` do not.
const KEYED: &str = "/api/";

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
        let mut response = req
            .into_response(refusal.error_response())
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
    if !req.path().starts_with(KEYED) {
        return Ok(());
    }
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return Err(ApiError::Internal("the API's state is missing".into()));
    };
    let key = state.auth.check(req.headers())?;
    tracing::Span::current().record("key", key);
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
