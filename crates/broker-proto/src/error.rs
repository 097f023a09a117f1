//! The one error body of the broker, the same shape as the worker's own errors.

use serde::{Deserialize, Serialize};

/// `{"error": "<short>", "code": "<CODE>", "message": "<human text>"}`, plus `message_id`
/// when the error concerns a message that exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

impl ErrorBody {
    pub fn new(
        error: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            error: error.into(),
            code: code.into(),
            message: message.into(),
            message_id: None,
        }
    }

    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Self {
        self.message_id = Some(message_id.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_the_worker_field_names() {
        let body = ErrorBody::new(
            "invalid request",
            "VALIDATION_ERROR",
            "user_id: is required",
        );
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":"invalid request","code":"VALIDATION_ERROR","message":"user_id: is required"}"#
        );
        let body = body.with_message_id("m1");
        assert!(serde_json::to_string(&body)
            .unwrap()
            .ends_with(r#","message_id":"m1"}"#));
    }
}
