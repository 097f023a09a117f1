//! The worker's data routes, as far as clients use them (`docs/worker-contract.md` §1.2):
//! preferences, history, and the audio a turn's `voice_audio_url` names. All need the key
//! when the mock has one.

use std::collections::{HashMap, HashSet};

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::{authorize, worker_error, MockState};

/// What the mock keeps between turns.
#[derive(Debug, Default)]
pub(crate) struct Store {
    /// `response_language` per `org\0user`.
    languages: HashMap<String, String>,
    /// Turns per `org\0user`, oldest first.
    history: HashMap<String, Vec<Past>>,
    audio: HashSet<String>,
}

impl MockState {
    /// Records a finished turn in its user's history, and the audio it names.
    pub(crate) fn remember(
        &self,
        user: &str,
        message: String,
        answer: String,
        audio: Option<String>,
    ) {
        let Ok(mut store) = self.data.lock() else {
            return;
        };
        if let Some(key) = &audio {
            store.audio.insert(key.clone());
        }
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        store
            .history
            .entry(user.to_owned())
            .or_default()
            .push(Past {
                message,
                answer,
                audio,
                at_ms: at,
            });
    }
}

/// One finished turn in a user's history.
#[derive(Debug, Clone)]
struct Past {
    message: String,
    answer: String,
    audio: Option<String>,
    at_ms: u64,
}

fn user_key(path: &(String, String)) -> String {
    format!("{}\u{0}{}", path.0, path.1)
}

/// `GET /api/v1/orgs/{org}/users/{user}/preferences`: `en` for a user never seen.
pub(crate) async fn get_preferences(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<MockState>,
) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state) {
        return *refused;
    }
    let language = state
        .data
        .lock()
        .ok()
        .and_then(|s| s.languages.get(&user_key(&path)).cloned())
        .unwrap_or_else(|| "en".into());
    HttpResponse::Ok().json(json!({"response_language": language}))
}

/// `PUT /api/v1/orgs/{org}/users/{user}/preferences` with `{"response_language": "xx"}`.
pub(crate) async fn put_preferences(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
    state: web::Data<MockState>,
) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state) {
        return *refused;
    }
    let language = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("response_language")?.as_str().map(str::to_owned))
        .filter(|l| l.len() == 2 && l.bytes().all(|b| b.is_ascii_lowercase()));
    let Some(language) = language else {
        return worker_error(
            400,
            json!({"error": "Invalid response_language", "message": "Must be a valid ISO 639-1 language code"}),
        );
    };
    if let Ok(mut store) = state.data.lock() {
        store.languages.insert(user_key(&path), language.clone());
    }
    HttpResponse::Ok().json(json!({"response_language": language}))
}

/// `GET /api/v1/orgs/{org}/users/{user}/history?limit=&offset=`: oldest first, at most 50.
pub(crate) async fn get_history(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    query: web::Query<HashMap<String, String>>,
    state: web::Data<MockState>,
) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state) {
        return *refused;
    }
    let number = |name: &str, default: usize| {
        query
            .get(name)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let (limit, offset) = (number("limit", 50).min(50), number("offset", 0));
    let origin = format!("http://{}", req.connection_info().host());
    let turns = state
        .data
        .lock()
        .ok()
        .and_then(|s| s.history.get(&user_key(&path)).cloned())
        .unwrap_or_default();
    let entries: Vec<Value> = turns
        .iter()
        .skip(offset)
        .take(limit)
        .map(|past| {
            json!({
                "user_message": past.message,
                "assistant_response": past.answer,
                "timestamp": past.at_ms,
                "voice_audio_key": past.audio,
                "voice_audio_url": past.audio.as_ref().map(|key| format!("{origin}/api/v1/audio/{key}")),
                "attachments": [],
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({
        "user_id": path.1,
        "total_count": turns.len(),
        "limit": limit,
        "offset": offset,
        "entries": entries,
    }))
}

/// `DELETE /api/v1/admin/orgs/{org}/users/{user}/history`.
pub(crate) async fn delete_history(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<MockState>,
) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state) {
        return *refused;
    }
    if let Ok(mut store) = state.data.lock() {
        store.history.remove(&user_key(&path));
    }
    HttpResponse::Ok().json(json!({"message": "User history cleared"}))
}

/// `GET /api/v1/audio/{key}`: the bytes of audio a turn named (`audio/...` keys only).
pub(crate) async fn get_audio(
    req: HttpRequest,
    key: web::Path<String>,
    state: web::Data<MockState>,
) -> HttpResponse {
    if let Err(refused) = authorize(&req, &state) {
        return *refused;
    }
    if !key.starts_with("audio/") {
        return worker_error(400, json!({"error": "Invalid audio key"}));
    }
    let known = state
        .data
        .lock()
        .is_ok_and(|s| s.audio.contains(key.as_str()));
    if !known {
        return worker_error(404, json!({"error": "Audio not found"}));
    }
    HttpResponse::Ok()
        .content_type("audio/ogg")
        .insert_header(("Cache-Control", "private, max-age=86400"))
        .body(format!("mock audio {key}"))
}
