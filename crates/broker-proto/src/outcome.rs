//! The outcome a drainer stores for a finished message and publishes to sync waiters.
//!
//! It is written once, by the complete/fail script, as compact JSON; the API turns it into
//! the client's answer without knowing how the turn went.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorBody;

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// The worker's `ChatResponse`, with the broker's timings.
    Completed {
        message_id: String,
        responses: Vec<String>,
        #[serde(default)]
        response_language: Option<String>,
        #[serde(default)]
        voice_audio_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attachments: Option<Value>,
        #[serde(default)]
        voice_audio_base64: Option<String>,
        queue_wait_ms: u64,
        processing_ms: u64,
    },
    /// The turn failed for good.
    Failed {
        message_id: String,
        #[serde(flatten)]
        failure: Failure,
        queue_wait_ms: u64,
        processing_ms: u64,
    },
}

/// Why a message failed, and the HTTP status a sync client gets for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub http_status: u16,
    pub error: String,
    pub code: String,
    pub message: String,
}

impl Failure {
    pub fn new(http_status: u16, error: &str, code: &str, message: impl Into<String>) -> Self {
        Self {
            http_status,
            error: error.to_owned(),
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The client-facing error body.
    pub fn body(&self, message_id: &str) -> ErrorBody {
        ErrorBody::new(&self.error, &self.code, &self.message).with_message_id(message_id)
    }
}

impl Outcome {
    pub fn message_id(&self) -> &str {
        match self {
            Self::Completed { message_id, .. } | Self::Failed { message_id, .. } => message_id,
        }
    }

    /// Whether `json`, an outcome as [`Outcome`]'s serialisation writes it (the `status` tag
    /// first), is a completed one: its text is then the sync answer as it stands, and the API
    /// passes it on without parsing it. `false` for anything else, which is then parsed.
    pub fn is_completed_json(json: &str) -> bool {
        json.starts_with(r#"{"status":"completed","#)
    }

    /// The outcome as compact JSON, the `status` tag first (see [`Self::is_completed_json`]).
    pub fn to_json(&self) -> String {
        // Strings, numbers and a JSON value: serialising them cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `completed` or `failed`: the message status this outcome leaves.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completed_outcome_is_the_sync_response_body() {
        let outcome = Outcome::Completed {
            message_id: "m".into(),
            responses: vec!["hi".into()],
            response_language: Some("en".into()),
            voice_audio_url: None,
            attachments: None,
            voice_audio_base64: None,
            queue_wait_ms: 3,
            processing_ms: 40,
        };
        let value = serde_json::to_value(&outcome).unwrap();
        assert_eq!(
            value,
            json!({"status": "completed", "message_id": "m", "responses": ["hi"], "response_language": "en",
                   "voice_audio_url": null, "voice_audio_base64": null, "queue_wait_ms": 3, "processing_ms": 40})
        );
        let back: Outcome = serde_json::from_value(value).unwrap();
        assert_eq!(back, outcome);
        assert!(Outcome::is_completed_json(
            &serde_json::to_string(&outcome).unwrap()
        ));
    }

    #[test]
    fn failed_outcome_carries_status_and_code() {
        let outcome = Outcome::Failed {
            message_id: "m".into(),
            failure: Failure::new(
                503,
                "worker unavailable",
                "WORKER_UNAVAILABLE",
                "gave up after 3 attempts",
            ),
            queue_wait_ms: 0,
            processing_ms: 7,
        };
        let value = serde_json::to_value(&outcome).unwrap();
        assert_eq!(
            value,
            json!({"status": "failed", "message_id": "m", "http_status": 503, "error": "worker unavailable",
                   "code": "WORKER_UNAVAILABLE", "message": "gave up after 3 attempts", "queue_wait_ms": 0, "processing_ms": 7})
        );
        assert_eq!(serde_json::from_value::<Outcome>(value).unwrap(), outcome);
        let text = serde_json::to_string(&outcome).unwrap();
        assert!(!Outcome::is_completed_json(&text));
        // A failure whose message reads like a completed outcome is still a failure.
        let mut sly = outcome;
        if let Outcome::Failed { failure, .. } = &mut sly {
            failure.message = r#"{"status":"completed","#.into();
        }
        assert!(!Outcome::is_completed_json(
            &serde_json::to_string(&sly).unwrap()
        ));
    }
}
