//! The operators' console, `GET /console`: three files built into the binary, served as they
//! are (no build step, no other server). The page signs in with an admin key and talks to the
//! admin API; it needs no key itself, and shows nothing without one.

use actix_web::{web, HttpResponse};

use crate::error::ApiError;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/app.css");

fn serve(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(body)
}

/// `GET /console`.
pub async fn page() -> HttpResponse {
    serve("text/html; charset=utf-8", INDEX)
}

/// `GET /console/app.js` and `/console/app.css`.
pub async fn file(name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    match name.as_str() {
        "app.js" => Ok(serve("text/javascript; charset=utf-8", SCRIPT)),
        "app.css" => Ok(serve("text/css; charset=utf-8", STYLE)),
        other => Err(ApiError::NotFound(format!("no console file {other}"))),
    }
}
