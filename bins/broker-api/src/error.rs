//! The API's one error type, mapped once to HTTP with the broker's error body.

use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use broker_proto::ErrorBody;

/// Everything a handler can fail with. Client mistakes are 4xx with a clear message;
/// internal failures are logged and answered without detail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing API key")]
    MissingKey,
    #[error("invalid API key")]
    BadKey,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A request body that did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    Conflict(String),
    /// A sync or callback message: its frames are not recorded.
    #[error("{0}")]
    NotStreamable(String),
    #[error("queue full")]
    QueueFull { depth: u64, retry_after_secs: u64 },
    /// The worker could not be reached for a proxied route.
    #[error("{0}")]
    BadGateway(String),
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis did not answer in time: a write may or may not have happened.
    #[error("redis timed out: {0}")]
    Uncertain(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<broker_core::queue::QueueError> for ApiError {
    fn from(e: broker_core::queue::QueueError) -> Self {
        match e {
            broker_core::queue::QueueError::Protocol(text) => Self::Internal(text),
            // Written but not acknowledged: whether it survives a failover is not known.
            broker_core::queue::QueueError::NotReplicated(text) => Self::Uncertain(text),
            broker_core::queue::QueueError::Redis(e) if e.is_timeout() => {
                Self::Uncertain(e.to_string())
            }
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl ApiError {
    /// A message id that names no record (never existed, or its result expired).
    pub fn no_message(id: &str) -> Self {
        Self::NotFound(format!("no message {id} (unknown, or its result expired)"))
    }

    fn body(&self) -> ErrorBody {
        match self {
            Self::MissingKey => ErrorBody::new(
                "unauthorized",
                "UNAUTHORIZED",
                "an API key is required: send X-API-Key: <key> or Authorization: Bearer <key>",
            ),
            Self::BadKey => ErrorBody::new("forbidden", "FORBIDDEN", "the API key is not valid"),
            Self::Invalid(text) => ErrorBody::new("invalid request", "VALIDATION_ERROR", text),
            Self::NotFound(text) => ErrorBody::new("not found", "NOT_FOUND", text),
            Self::TooLarge(text) => ErrorBody::new("payload too large", "PAYLOAD_TOO_LARGE", text),
            Self::UnsupportedMediaType(text) => {
                ErrorBody::new("unsupported media type", "UNSUPPORTED_MEDIA_TYPE", text)
            }
            Self::RequestTimeout(text) => {
                ErrorBody::new("request timeout", "REQUEST_TIMEOUT", text)
            }
            Self::NotAcceptable(text) => ErrorBody::new("not acceptable", "NOT_ACCEPTABLE", text),
            Self::Conflict(text) => ErrorBody::new("conflict", "NOT_CANCELLABLE", text),
            Self::NotStreamable(text) => ErrorBody::new("not streamable", "NOT_STREAMABLE", text),
            Self::QueueFull { depth, .. } => ErrorBody::new(
                "queue full",
                "QUEUE_FULL",
                format!("this conversation already has {depth} messages waiting; retry later"),
            ),
            Self::BadGateway(text) => ErrorBody::new("bad gateway", "WORKER_UNAVAILABLE", text),
            Self::Unavailable(_) => ErrorBody::new(
                "service unavailable",
                "REDIS_UNAVAILABLE",
                "the queue store is unavailable; nothing was enqueued, retry later",
            ),
            Self::Uncertain(_) => ErrorBody::new(
                "service unavailable",
                "REDIS_TIMEOUT",
                "the queue store did not answer in time; the request may or may not have taken effect: \
                 retry with the same client_message_id to be safe",
            ),
            Self::Internal(_) => ErrorBody::new(
                "internal error",
                "INTERNAL_ERROR",
                "an internal error occurred",
            ),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MissingKey => StatusCode::UNAUTHORIZED,
            Self::BadKey => StatusCode::FORBIDDEN,
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::Conflict(_) | Self::NotStreamable(_) => StatusCode::CONFLICT,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Unavailable(_) | Self::Uncertain(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Unavailable(cause) => tracing::warn!(%cause, "redis unavailable"),
            Self::Uncertain(cause) => tracing::warn!(%cause, "redis timed out"),
            Self::Internal(cause) => tracing::error!(%cause, "internal error"),
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code()).json(self.body());
        if let Self::QueueFull {
            retry_after_secs, ..
        } = self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                response.headers_mut().insert(RETRY_AFTER, v);
            }
        }
        response
    }
}

/// An [`ApiError`] on one of the worker's routes, answered in the worker's shapes
/// (docs/worker-contract.md §1.1, §1.7, §1.8): `{"error": "<sentence>"}`, with a `code` where
/// the worker gives one, and the same status as on the broker's own routes.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct WorkerError(#[from] pub ApiError);

impl ResponseError for WorkerError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let e = &self.0;
        let body = match e {
            ApiError::MissingKey => {
                serde_json::json!({"error": "Authorization header with Bearer token required"})
            }
            ApiError::BadKey => serde_json::json!({"error": "Invalid API key"}),
            ApiError::QueueFull { depth, .. } => serde_json::json!({
                "error": "Queue full",
                "code": "QUEUE_DEPTH_EXCEEDED",
                "message": format!("Queue depth limit ({depth}) exceeded."),
            }),
            ApiError::Unavailable(_) | ApiError::Uncertain(_) | ApiError::Internal(_) => {
                let body = e.body();
                serde_json::json!({"error": body.message, "code": body.code})
            }
            other => serde_json::json!({"error": other.to_string()}),
        };
        // Logged, and Retry-After set, as on the broker's routes.
        let mut response = e.error_response();
        let mut worker = HttpResponse::build(self.status_code()).json(body);
        if let Some(retry) = response.headers_mut().remove(RETRY_AFTER).next() {
            worker.headers_mut().insert(RETRY_AFTER, retry);
        }
        worker
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::queue::QueueError;

    #[test]
    fn a_timeout_is_uncertain_and_a_refusal_is_not() {
        let timeout =
            redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert!(timeout.is_timeout());
        let uncertain = ApiError::from(QueueError::Redis(timeout));
        assert_eq!(uncertain.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(uncertain.body().code, "REDIS_TIMEOUT");
        assert!(uncertain.body().message.contains("client_message_id"));

        let refused = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "down",
        ));
        let unavailable = ApiError::from(QueueError::Redis(refused));
        assert_eq!(unavailable.body().code, "REDIS_UNAVAILABLE");
        assert!(unavailable.body().message.contains("nothing was enqueued"));
    }
}
