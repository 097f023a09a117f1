//! Client authentication: `X-API-Key: <key>` or `Authorization: Bearer <key>`, compared in
//! constant time against every configured key.

use actix_web::http::header::{HeaderName, AUTHORIZATION};
use actix_web::HttpRequest;
use broker_core::config::ApiKey;
use secrecy::ExposeSecret;

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

    /// Returns the name of the key that matched.
    pub fn check(&self, req: &HttpRequest) -> Result<&str, ApiError> {
        if self.insecure {
            return Ok("insecure");
        }
        let headers = req.headers();
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
            if constant_time_eq(presented.as_bytes(), key.key.expose_secret().as_bytes())
                && matched.is_none()
            {
                matched = Some(key.name.as_str());
            }
        }
        matched.ok_or(ApiError::BadKey)
    }
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_keys() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
