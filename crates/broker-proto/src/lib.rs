//! Wire types of the BT Servant message broker and the validation of what clients send.
//!
//! This crate knows serde and nothing else: every shape that crosses a process boundary
//! (client requests, error bodies, the worker's chat request and SSE frames, the outcome a
//! drainer stores for a message) is defined here, so the API, the drainer and the mock
//! worker cannot disagree about a field name.

pub mod conversation;
pub mod error;
pub mod front;
pub mod outcome;
pub mod request;
pub mod sse;

pub use conversation::{ChatType, Conversation};
pub use error::ErrorBody;
pub use front::{Front, Route};
pub use outcome::{Failure, Outcome};
pub use request::{
    valid_traceparent, validate_message, validate_request, MessageRequest, ValidationError,
    ValidationLimits,
};
pub use sse::ChatResponse;
