//! Client authentication: `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared in
//! constant time (`subtle`) against every configured key.

use actix_web::http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use broker_core::config::ApiKey;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Named once: a header looked up by `&str` has its name parsed (and, not being a standard
/// one, allocated) on every request.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The configured keys, or none in insecure development mode.
#[derive(Clone)]
pub struct Auth {
    keys: Vec<ApiKey>,
    insecure: bool,
}

impl Auth {
    pub fn new(keys: Vec<ApiKey>, insecure: bool) -> Self {
        Self { keys, insecure }
    }

    /// The key named `name`, for `X-Engine-Token` on a redelivered callback.
    pub fn key_of(&self, name: &str) -> Option<String> {
        self.keys
            .iter()
            .find(|k| k.name == name)
            .map(|k| k.key.expose_secret().to_owned())
    }

    /// Returns the name of the key that matched.
    pub fn check(&self, headers: &HeaderMap) -> Result<&str, ApiError> {
        if self.insecure {
            return Ok("insecure");
        }
        let presented = headers
            .get(X_API_KEY)
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::MissingKey)?;
        // Compare against every key without stopping early.
        let mut matched = None;
        for key in &self.keys {
            let equal: bool = presented
                .as_bytes()
                .ct_eq(key.key.expose_secret().as_bytes())
                .into();
            if equal && matched.is_none() {
                matched = Some(key.name.as_str());
            }
        }
        matched.ok_or(ApiError::BadKey)
    }
}
