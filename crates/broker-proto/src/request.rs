//! `POST /api/v1/message`: parsing and validation of the client's body, with the worker's rules.
//!
//! The body is read field by field from a JSON object (not through `deny_unknown_fields`) so
//! that every problem is reported at once and each message names its field. Nothing reaches
//! Redis unless this returns `Ok`.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::conversation::{ChatType, Conversation};
use crate::front::{CallbackFront, Front, ProgressMode, Route, DEFAULT_THROTTLE, MIN_THROTTLE};

/// Longest decoded audio the worker accepts (`docs/worker-contract.md` §1.3).
pub const MAX_AUDIO_BYTES: usize = 25 * 1024 * 1024;
/// Audio formats the worker accepts, bare or as MIME type, compared case-insensitively.
pub const AUDIO_FORMATS: &[&str] = &[
    "ogg",
    "mp3",
    "wav",
    "webm",
    "flac",
    "m4a",
    "audio/ogg",
    "audio/mpeg",
    "audio/mp3",
    "audio/x-wav",
    "audio/wave",
    "audio/x-flac",
    "audio/mp4",
    "audio/x-m4a",
];

/// Every field a client may send; anything else is an error that names it.
const KNOWN_FIELDS: &[&str] = &[
    "user_id",
    "org",
    "org_id",
    "client_id",
    "message_type",
    "message",
    "audio_base64",
    "audio_format",
    "client_message_id",
    "callback_url",
    "chat_type",
    "chat_id",
    "thread_id",
    "speaker",
    "addressed_to_bot",
    "response_language_hint",
    // The worker's routes only (`/api/v1/chat/callback`'s fields, and one always refused).
    "progress_callback_url",
    "message_key",
    "progress_mode",
    "progress_throttle_seconds",
    "is_admin",
];

/// The fields of [`KNOWN_FIELDS`] the broker's own route does not take.
const WORKER_ONLY_FIELDS: &[&str] = &[
    "progress_callback_url",
    "message_key",
    "progress_mode",
    "progress_throttle_seconds",
    "is_admin",
];

/// The fields of [`KNOWN_FIELDS`] the worker's routes ignore, as the worker does.
const BROKER_ONLY_FIELDS: &[&str] = &["client_message_id", "callback_url"];

/// Length limits of the identifier and text fields, in characters.
#[derive(Debug, Clone, Copy)]
pub struct ValidationLimits {
    pub user_id: usize,
    pub org: usize,
    pub client_id: usize,
    pub chat_id: usize,
    pub thread_id: usize,
    pub speaker: usize,
    pub client_message_id: usize,
    pub message: usize,
    pub callback_url: usize,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        Self {
            user_id: 256,
            org: 64,
            client_id: 64,
            chat_id: 128,
            thread_id: 128,
            speaker: 256,
            client_message_id: 256,
            message: 65_536,
            callback_url: 2048,
        }
    }
}

/// A request that passed validation, ready to enqueue.
#[derive(Debug, Clone)]
pub struct MessageRequest {
    pub conversation: Conversation,
    pub user_id: String,
    pub org: String,
    pub client_id: String,
    pub client_message_id: Option<String>,
    pub callback_url: Option<String>,
    /// The body the drainer sends to the worker's `/api/v1/chat/stream`, as compact JSON:
    /// every field the worker understands, `org_id` mapped to `org`.
    pub worker_body: String,
    /// The worker's route it came in on, and what that route keeps (`None` on the broker's
    /// own route).
    pub front: Option<Front>,
    /// The client's W3C `traceparent` header, when it sent a valid one: passed to the worker
    /// and on callbacks, and in the logs of the message.
    pub traceparent: Option<String>,
}

/// Whether `value` is a W3C `traceparent` (version 00: `00-<32 hex>-<16 hex>-<2 hex>`, ids
/// not all zero).
pub fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// Every problem found in a request, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub problems: Vec<String>,
}

impl std::fmt::Display for ValidationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

impl std::error::Error for ValidationError {}

impl ValidationError {
    fn single(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

/// One field's value, as far as validation needs to know it. Strings borrow from the body
/// unless an escape in them made that impossible.
#[derive(Debug)]
enum Field<'a> {
    Null,
    Str(Cow<'a, str>),
    Bool(bool),
    Number(f64),
    /// An array or object: read through (and checked as JSON) but not kept.
    Other,
}

impl Field<'_> {
    fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::Bool(v))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Field::Null)
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Field::Number(v as f64))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Field::Number(v as f64))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Field::Number(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Each element is read as a value of its own, so the body is checked as strictly as
        // a `serde_json::Value` would check it.
        while seq.next_element::<Field<'de>>()?.is_some() {}
        Ok(Field::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<Name<'de>, Field<'de>>()?.is_some() {}
        Ok(Field::Other)
    }
}

/// An object key, borrowed from the body where it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A JSON object's keys are always strings.
        match deserializer.deserialize_str(FieldVisitor)? {
            Field::Str(name) => Ok(Name(name)),
            _ => Err(serde::de::Error::custom("a field name must be a string")),
        }
    }
}

/// The body's known fields, by their index in [`KNOWN_FIELDS`], and the names of the others.
/// `None` for a body that is valid JSON but not an object.
struct Body<'a>(Option<Fields<'a>>);

struct Fields<'a> {
    known: [Option<Field<'a>>; KNOWN_FIELDS.len()],
    unknown: Vec<String>,
}

impl<'de> Deserialize<'de> for Body<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = Body<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Fields {
                    known: Default::default(),
                    unknown: Vec::new(),
                };
                // A repeated field counts once, with its last value, as in a JSON object.
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    let value = map.next_value::<Field<'de>>()?;
                    match KNOWN_FIELDS.iter().position(|known| *known == name) {
                        Some(i) => fields.known[i] = Some(value),
                        None if !fields.unknown.iter().any(|u| *u == name) => {
                            fields.unknown.push(name.into_owned());
                        }
                        None => {}
                    }
                }
                Ok(Body(Some(fields)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                FieldVisitor.visit_seq(seq).map(|_| Body(None))
            }

            fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Self::Value, E> {
                Ok(Body(None))
            }

            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Body(None))
            }

            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Body(None))
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Body(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Body(None))
            }

            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Body(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Body(None))
            }
        }
        deserializer.deserialize_any(BodyVisitor)
    }
}

/// Reads the fields of one request, collecting problems as it goes.
struct Reader<'f, 'a> {
    body: &'f Fields<'a>,
    problems: Vec<String>,
}

impl<'f, 'a> Reader<'f, 'a> {
    fn problem(&mut self, field: &str, text: &str) {
        self.problems.push(format!("{field}: {text}"));
    }

    /// A field's value as sent, `None` when it is absent. `field` is one of [`KNOWN_FIELDS`].
    fn get(&self, field: &str) -> Option<&'f Field<'a>> {
        let i = KNOWN_FIELDS.iter().position(|known| *known == field)?;
        self.body.known[i].as_ref()
    }

    /// Whether the field is absent or `null`.
    fn absent(&self, field: &str) -> bool {
        self.get(field).is_none_or(Field::is_null)
    }

    /// A string field; `null` counts as absent.
    fn string(&mut self, field: &str) -> Option<&'f str> {
        match self.get(field) {
            None | Some(Field::Null) => None,
            Some(Field::Str(s)) => Some(s),
            Some(_) => {
                self.problem(field, "must be a string");
                None
            }
        }
    }

    /// An identifier: non-blank, bounded, no control characters.
    fn id(&mut self, field: &str, max: usize, required: bool) -> Option<&'f str> {
        let Some(value) = self.string(field) else {
            if required && self.absent(field) {
                self.problem(field, "is required");
            }
            return None;
        };
        if value.trim().is_empty() {
            self.problem(field, "must not be blank");
            None
        } else if value.chars().count() > max {
            self.problem(field, &format!("must be at most {max} characters"));
            None
        } else if value.chars().any(char::is_control) {
            self.problem(field, "must not contain control characters");
            None
        } else {
            Some(value)
        }
    }

    fn boolean(&mut self, field: &str) -> Option<bool> {
        match self.get(field) {
            None | Some(Field::Null) => None,
            Some(Field::Bool(b)) => Some(*b),
            Some(_) => {
                self.problem(field, "must be true or false");
                None
            }
        }
    }
}

/// Parses and validates a `POST /api/v1/message` body.
///
/// `default_org` applies when neither `org` nor `org_id` is given.
pub fn validate_message(
    body: &[u8],
    default_org: &str,
    limits: &ValidationLimits,
) -> Result<MessageRequest, ValidationError> {
    validate_request(body, Route::Message, default_org, limits)
}

/// Is a field "truthy" as the worker's JavaScript tests it (`!body.field` is false)?
fn truthy(field: Option<&Field<'_>>) -> bool {
    match field {
        None | Some(Field::Null) => false,
        Some(Field::Str(s)) => !s.is_empty(),
        Some(Field::Bool(b)) => *b,
        Some(Field::Number(n)) => *n != 0.0 && !n.is_nan(),
        Some(Field::Other) => true,
    }
}

/// The worker's own checks of a chat request, in its order, with its messages
/// (`validateChatBody`, docs/worker-contract.md §1.3): the first that fails.
fn worker_check(r: &Reader<'_, '_>, route: Route) -> Option<String> {
    if !truthy(r.get("user_id")) {
        return Some("user_id is required".into());
    }
    if !truthy(r.get("client_id")) {
        return Some("client_id is required".into());
    }
    if r.get("is_admin").is_some() {
        return Some(
            "is_admin is not a valid field; admin origin is derived from client_id".into(),
        );
    }
    let chat_type = r.get("chat_type").filter(|t| truthy(Some(t)));
    if let Some(t) = chat_type {
        let text = match t {
            Field::Str(s) => s.to_string(),
            Field::Number(n) => n.to_string(),
            Field::Bool(b) => b.to_string(),
            _ => "[object Object]".into(),
        };
        if !matches!(text.as_str(), "private" | "group" | "supergroup") {
            return Some(format!(
                "Invalid chat_type: {}. Must be one of: private, group, supergroup",
                truncate(&text, 40)
            ));
        }
        if text != "private" && !truthy(r.get("chat_id")) {
            return Some("chat_id is required for group/supergroup chats".into());
        }
    }
    if route == Route::ChatCallback {
        for field in ["progress_callback_url", "message_key"] {
            if !truthy(r.get(field)) {
                return Some(format!("{field} is required on /api/v1/chat/callback"));
            }
        }
    } else {
        for field in [
            "progress_callback_url",
            "progress_mode",
            "progress_throttle_seconds",
            "message_key",
        ] {
            if r.get(field).is_some() {
                return Some(format!(
                    "{field} is not valid on {} — use /api/v1/chat/callback",
                    route.path()
                ));
            }
        }
    }
    match r.get("response_language_hint") {
        None => None,
        Some(Field::Str(h)) if h.len() == 2 && h.bytes().all(|b| b.is_ascii_lowercase()) => None,
        Some(_) => Some(
            "response_language_hint must be a valid ISO 639-1 language code (2 lowercase letters)"
                .into(),
        ),
    }
}

/// Parses and validates a chat request that came in on `route`: the broker's own rules, and
/// on the worker's routes the worker's rules first, with its messages.
///
/// On the worker's routes unknown fields are ignored (not passed on), as the worker ignores
/// them; `progress_mode` must be one the worker knows.
pub fn validate_request(
    body: &[u8],
    route: Route,
    default_org: &str,
    limits: &ValidationLimits,
) -> Result<MessageRequest, ValidationError> {
    let worker_route = route.is_worker_route();
    let parsed = serde_json::from_slice(body).map_err(|e| {
        ValidationError::single(if worker_route {
            "Invalid JSON body".to_owned()
        } else {
            format!("body: is not valid JSON ({e})")
        })
    });
    let Body(parsed) = parsed?;
    let Some(mut fields) = parsed else {
        return Err(ValidationError::single(if worker_route {
            "Invalid JSON body"
        } else {
            "body: must be a JSON object"
        }));
    };
    // Each route's fields: the others are unknown on the broker's route, ignored on the
    // worker's.
    let not_taken = if worker_route {
        BROKER_ONLY_FIELDS
    } else {
        WORKER_ONLY_FIELDS
    };
    for (i, name) in KNOWN_FIELDS.iter().enumerate() {
        if not_taken.contains(name) && fields.known[i].take().is_some() && !worker_route {
            fields.unknown.push((*name).to_owned());
        }
    }
    if worker_route {
        fields.unknown.clear();
    }
    let mut r = Reader {
        body: &fields,
        problems: Vec::new(),
    };
    if worker_route {
        if let Some(problem) = worker_check(&r, route) {
            return Err(ValidationError::single(problem));
        }
    }

    if !fields.unknown.is_empty() {
        let mut unknown: Vec<&str> = fields.unknown.iter().map(String::as_str).collect();
        unknown.sort_unstable();
        let names = unknown
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        r.problems.push(format!("unknown field(s) {names}"));
    }

    let user_id = r.id("user_id", limits.user_id, true);
    let client_id = r.id("client_id", limits.client_id, true);
    let org_field = r.id("org", limits.org, false);
    let org_id_field = r.id("org_id", limits.org, false);
    let org = org_field.or(org_id_field).unwrap_or(default_org);

    let message_type = match r.string("message_type") {
        None => "text",
        Some(t @ ("text" | "audio")) => t,
        Some(_) => {
            r.problem("message_type", "must be \"text\" or \"audio\"");
            "text"
        }
    };
    let message = r.string("message");
    if let Some(text) = message {
        if text.len() > limits.message {
            r.problem(
                "message",
                &format!("must be at most {} bytes", limits.message),
            );
        } else if text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            r.problem(
                "message",
                "must not contain control characters other than newlines and tabs",
            );
        }
    }
    let audio_base64 = r.string("audio_base64");
    let audio_format = r.string("audio_format");
    if message_type == "audio" {
        match audio_base64 {
            None => r.problem("audio_base64", "is required when message_type is audio"),
            Some(data) => {
                if let Err(text) = check_base64_audio(data) {
                    r.problem("audio_base64", &text);
                }
            }
        }
        match audio_format {
            None => r.problem("audio_format", "is required when message_type is audio"),
            Some(format) if !AUDIO_FORMATS.iter().any(|f| f.eq_ignore_ascii_case(format)) => {
                let text = format!(
                    "unsupported audio format {:?}; use one of {}",
                    truncate(format, 40),
                    AUDIO_FORMATS.join(", ")
                );
                r.problem("audio_format", &text);
            }
            Some(_) => {}
        }
    } else {
        let wrong_type = r
            .get("message")
            .is_some_and(|v| !matches!(v, Field::Str(_) | Field::Null));
        if !wrong_type && message.is_none_or(|m| m.trim().is_empty()) {
            r.problem(
                "message",
                "is required and must not be blank when message_type is text",
            );
        }
        if audio_base64.is_some() {
            r.problem("audio_base64", "is only allowed when message_type is audio");
        }
        if audio_format.is_some() {
            r.problem("audio_format", "is only allowed when message_type is audio");
        }
    }

    let chat_type = match r.string("chat_type") {
        None => ChatType::Private,
        Some(t) => ChatType::parse(t).unwrap_or_else(|| {
            r.problem(
                "chat_type",
                "must be \"private\", \"group\" or \"supergroup\"",
            );
            ChatType::Private
        }),
    };
    let chat_id = r.id("chat_id", limits.chat_id, false);
    if chat_type.is_group() && r.absent("chat_id") {
        r.problem(
            "chat_id",
            "is required when chat_type is group or supergroup",
        );
    }
    let thread_id = r.id("thread_id", limits.thread_id, false);
    let speaker = r.id("speaker", limits.speaker, false);
    let addressed_to_bot = r.boolean("addressed_to_bot");
    let hint = r.string("response_language_hint");
    if let Some(h) = hint {
        if !(h.len() == 2 && h.bytes().all(|b| b.is_ascii_lowercase())) {
            r.problem(
                "response_language_hint",
                "must be two lowercase letters (ISO 639-1), like \"en\"",
            );
        }
    }
    let client_message_id = r.id("client_message_id", limits.client_message_id, false);
    let mut callback_url = r.id("callback_url", limits.callback_url, false);
    let mut callback_front = None;
    if route == Route::ChatCallback {
        callback_url = r.id("progress_callback_url", limits.callback_url, true);
        let message_key = r.id("message_key", limits.client_message_id, true);
        let mode = match r.string("progress_mode") {
            None => ProgressMode::Iteration,
            Some(m) => ProgressMode::parse(m).unwrap_or_else(|| {
                r.problem(
                    "progress_mode",
                    "must be one of complete, iteration, periodic, sentence",
                );
                ProgressMode::Iteration
            }),
        };
        let throttle = match r.get("progress_throttle_seconds") {
            None | Some(Field::Null) => DEFAULT_THROTTLE,
            Some(Field::Number(n)) if *n > 0.0 && *n <= 3600.0 => {
                std::time::Duration::from_secs_f64(*n)
            }
            Some(Field::Number(n)) if *n <= 0.0 => DEFAULT_THROTTLE,
            Some(_) => {
                r.problem(
                    "progress_throttle_seconds",
                    "must be a number of seconds, at most 3600",
                );
                DEFAULT_THROTTLE
            }
        };
        let throttle = if matches!(mode, ProgressMode::Periodic | ProgressMode::Sentence) {
            throttle.max(MIN_THROTTLE)
        } else {
            throttle
        };
        if let (Some(user_id), Some(message_key)) = (user_id, message_key) {
            callback_front = Some(CallbackFront {
                message_key: message_key.to_owned(),
                mode,
                throttle_ms: u64::try_from(throttle.as_millis()).unwrap_or(u64::MAX),
                user_id: user_id.to_owned(),
                chat_id: chat_id.map(str::to_owned),
                thread_id: thread_id.map(str::to_owned),
            });
        }
    }

    if !r.problems.is_empty() {
        return Err(ValidationError {
            problems: r.problems,
        });
    }
    // Every required field was checked above; these cannot be missing here.
    let (Some(user_id), Some(client_id)) = (user_id, client_id) else {
        return Err(ValidationError::single("user_id: is required"));
    };

    let conversation = Conversation::for_chat(org, chat_type, user_id, chat_id, thread_id);
    // The worker's body: every field it understands, in the order of their names (as a
    // `serde_json::Map` would write them), `org_id` mapped to `org`.
    #[derive(serde::Serialize)]
    struct WorkerBody<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        addressed_to_bot: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        audio_base64: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        audio_format: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        chat_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        chat_type: Option<&'a str>,
        client_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a str>,
        message_type: &'a str,
        org: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        response_language_hint: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        speaker: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        thread_id: Option<&'a str>,
        user_id: &'a str,
    }
    let worker_body = serde_json::to_string(&WorkerBody {
        addressed_to_bot,
        audio_base64,
        audio_format,
        chat_id,
        chat_type: r.get("chat_type").map(|_| chat_type.as_str()),
        client_id,
        message,
        message_type,
        org,
        response_language_hint: hint,
        speaker,
        thread_id,
        user_id,
    })
    // Strings and a boolean: serialising them cannot fail.
    .unwrap_or_default();

    Ok(MessageRequest {
        conversation,
        user_id: user_id.to_owned(),
        org: org.to_owned(),
        client_id: client_id.to_owned(),
        client_message_id: client_message_id.map(str::to_owned),
        callback_url: callback_url.map(str::to_owned),
        worker_body,
        front: worker_route.then_some(Front {
            route,
            key: None,
            callback: callback_front,
        }),
        traceparent: None,
    })
}

/// Checks base64 audio the way the worker does, and its decoded size arithmetically.
fn check_base64_audio(data: &str) -> Result<(), String> {
    if data.is_empty() {
        return Err("must not be empty".into());
    }
    let bytes = data.as_bytes();
    let padding = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if padding > 2 {
        return Err("is not valid base64 (too much padding)".into());
    }
    let body = &bytes[..bytes.len() - padding];
    if let Some(pos) = body
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'+' || b == b'/'))
    {
        return Err(format!(
            "is not valid base64 (unexpected character at offset {pos})"
        ));
    }
    if bytes.len() % 4 == 1 || (padding > 0 && !bytes.len().is_multiple_of(4)) {
        return Err("is not valid base64 (bad length)".into());
    }
    let decoded = body.len() * 3 / 4;
    if decoded > MAX_AUDIO_BYTES {
        return Err(format!(
            "decoded audio is {decoded} bytes; the limit is {MAX_AUDIO_BYTES} bytes (25 MB)"
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn check(body: Value) -> Result<MessageRequest, ValidationError> {
        validate_message(
            body.to_string().as_bytes(),
            "unfoldingWord",
            &ValidationLimits::default(),
        )
    }

    fn problems(body: Value) -> String {
        check(body).expect_err("should be refused").to_string()
    }

    #[test]
    fn a_minimal_text_message_passes_and_maps_to_the_worker_body() {
        let req =
            check(json!({"user_id": "alice", "client_id": "web", "message": "hi", "org_id": "uW"}))
                .unwrap();
        assert_eq!(req.conversation.as_str(), "user:uW:alice");
        let worker: Value = serde_json::from_str(&req.worker_body).unwrap();
        assert_eq!(
            worker,
            json!({"client_id": "web", "user_id": "alice", "org": "uW", "message_type": "text", "message": "hi"})
        );
    }

    #[test]
    fn traceparents_are_checked_as_w3c_says() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx: y",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn each_route_takes_its_own_fields() {
        let callback = json!({"user_id": "u", "client_id": "whatsapp", "message": "hi",
            "message_key": "k", "progress_callback_url": "https://gw.example/cb",
            "progress_mode": "sentence", "progress_throttle_seconds": 0.2, "chat_id": "-1",
            "client_message_id": "ignored", "_mcp_servers": []});
        // The broker's own route knows none of the callback route's fields.
        let refused = problems(callback.clone());
        assert!(
            refused.contains("`message_key`") && refused.contains("`_mcp_servers`"),
            "{refused}"
        );
        let req = validate_request(
            callback.to_string().as_bytes(),
            Route::ChatCallback,
            "unfoldingWord",
            &ValidationLimits::default(),
        )
        .unwrap();
        assert_eq!(req.callback_url.as_deref(), Some("https://gw.example/cb"));
        assert_eq!(
            req.client_message_id, None,
            "ignored, as the worker ignores it"
        );
        let front = req.front.unwrap().callback.unwrap();
        assert_eq!(front.mode, ProgressMode::Sentence);
        assert_eq!(front.throttle_ms, 1000, "at least a second");
        assert_eq!(front.chat_id.as_deref(), Some("-1"));
        let worker: Value = serde_json::from_str(&req.worker_body).unwrap();
        assert!(worker.get("message_key").is_none() && worker.get("progress_mode").is_none());
    }

    #[test]
    fn org_wins_over_org_id_and_the_default_applies() {
        let req = check(
            json!({"user_id": "a", "client_id": "web", "message": "x", "org": "A", "org_id": "B"}),
        )
        .unwrap();
        assert_eq!(req.org, "A");
        let req = check(json!({"user_id": "a", "client_id": "web", "message": "x"})).unwrap();
        assert_eq!(req.conversation.as_str(), "user:unfoldingWord:a");
    }

    #[test]
    fn group_fields_pass_through_and_key_the_conversation() {
        let req = check(json!({
            "user_id": "7", "client_id": "telegram-gateway", "message": "x", "chat_type": "supergroup",
            "chat_id": "-100", "thread_id": "42", "speaker": "Alice", "addressed_to_bot": false,
            "response_language_hint": "ru"
        }))
        .unwrap();
        assert_eq!(req.conversation.as_str(), "group:unfoldingWord:-100:42");
        let worker: Value = serde_json::from_str(&req.worker_body).unwrap();
        assert_eq!(worker["chat_type"], "supergroup");
        assert_eq!(worker["speaker"], "Alice");
        assert_eq!(worker["addressed_to_bot"], false);
        assert_eq!(worker["response_language_hint"], "ru");
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases = [
            (
                json!({"client_id": "web", "message": "x"}),
                "user_id: is required",
            ),
            (
                json!({"user_id": "  ", "client_id": "web", "message": "x"}),
                "user_id: must not be blank",
            ),
            (
                json!({"user_id": "a\u{7}", "client_id": "web", "message": "x"}),
                "user_id: must not contain control characters",
            ),
            (
                json!({"user_id": "a".repeat(300), "client_id": "web", "message": "x"}),
                "user_id: must be at most 256",
            ),
            (
                json!({"user_id": 5, "client_id": "web", "message": "x"}),
                "user_id: must be a string",
            ),
            (
                json!({"user_id": "a", "message": "x"}),
                "client_id: is required",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "   "}),
                "message: is required and must not be blank",
            ),
            (
                json!({"user_id": "a", "client_id": "web"}),
                "message: is required",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "message_type": "video"}),
                "message_type: must be",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_format": "ogg"}),
                "audio_base64: is required",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "AAAA"}),
                "audio_format: is required",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "AAAA", "audio_format": "aac"}),
                "audio_format: unsupported audio format",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "AA*A", "audio_format": "ogg"}),
                "audio_base64: is not valid base64",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "audio_base64": "AAAA"}),
                "audio_base64: is only allowed",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "chat_type": "channel"}),
                "chat_type: must be",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "chat_type": "group"}),
                "chat_id: is required when chat_type",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "response_language_hint": "EN"}),
                "response_language_hint: must be two lowercase letters",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "addressed_to_bot": "yes"}),
                "addressed_to_bot: must be true or false",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "client_message_id": ""}),
                "client_message_id: must not be blank",
            ),
            (
                json!({"user_id": "a", "client_id": "web", "message": "x", "is_admin": true, "zzz": 1}),
                "unknown field(s) `is_admin`, `zzz`",
            ),
        ];
        for (body, expected) in cases {
            let got = problems(body.clone());
            assert!(
                got.contains(expected),
                "{body} gave {got:?}, expected {expected:?}"
            );
        }
    }

    /// The worker's body as the fields map to it: what `validate_message` wrote by building a
    /// `serde_json::Map` before it wrote the text itself.
    fn expected_worker_body(body: &Value) -> String {
        let mut worker = serde_json::Map::new();
        for (name, value) in body.as_object().expect("an object") {
            let name = match name.as_str() {
                "org_id" if body.get("org").is_some() => continue,
                "org_id" => "org",
                "client_message_id" | "callback_url" => continue,
                "chat_type" if value.is_null() => {
                    worker.insert(name.clone(), "private".into());
                    continue;
                }
                other => other,
            };
            if !value.is_null() {
                worker.insert(name.to_owned(), value.clone());
            }
        }
        worker
            .entry("org")
            .or_insert_with(|| "unfoldingWord".into());
        worker
            .entry("message_type")
            .or_insert_with(|| "text".into());
        Value::Object(worker).to_string()
    }

    #[test]
    fn the_worker_body_is_the_fields_as_json_writes_them() {
        let bodies = [
            json!({"user_id": "alice", "client_id": "web", "message": "hi"}),
            json!({"user_id": "a\"b\\c", "client_id": "wé✓", "message": "line\none\ttab \u{1f600}", "org_id": "uW"}),
            json!({"user_id": "7", "client_id": "tg", "message": "x", "chat_type": "supergroup",
                "chat_id": "-100", "thread_id": "42", "speaker": "Alice", "addressed_to_bot": true,
                "response_language_hint": "ru", "client_message_id": "m1", "org": "A", "org_id": "B"}),
            json!({"user_id": "a", "client_id": "web", "message": "x", "chat_type": null,
                "speaker": null, "addressed_to_bot": false, "message_type": "text"}),
            json!({"user_id": "a", "client_id": "web", "message_type": "audio",
                "audio_base64": "QUJD", "audio_format": "Audio/OGG"}),
        ];
        for body in bodies {
            let req = check(body.clone()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(req.worker_body, expected_worker_body(&body), "{body}");
        }
    }

    #[test]
    fn the_body_is_read_as_json_reads_it() {
        let limits = ValidationLimits::default();
        let read = |text: &str| validate_message(text.as_bytes(), "o", &limits);
        // A repeated field counts with its last value; escapes in names and values are read.
        let req = read(r#"{"user_id":"a","user_id":"b","client_id":"web","message":"x","\u006dessage":"y\u00e9"}"#)
            .expect("valid");
        assert_eq!(req.user_id, "b");
        let worker: Value = serde_json::from_str(&req.worker_body).expect("json");
        assert_eq!(worker["message"], "yé");
        // Values of any kind, nested, are read through and named when they are not allowed.
        let got = read(r#"{"user_id":"a","client_id":"web","message":"x","extra":[1,{"a":[null]}],"extra":2,"speaker":{"a":1}}"#)
            .expect_err("refused")
            .to_string();
        assert_eq!(got, "unknown field(s) `extra`; speaker: must be a string");
        // Numbers JSON cannot hold, anywhere, make the body invalid JSON.
        let got = read(r#"{"user_id":"a","client_id":"web","message":"x","n":[1e400]}"#)
            .expect_err("refused")
            .to_string();
        assert!(got.starts_with("body: is not valid JSON"), "{got}");
        for text in [
            "\"x\"",
            "1",
            "-2.5",
            "null",
            "true",
            "[]",
            "[{\"user_id\":\"a\"}]",
        ] {
            let got = read(text).expect_err("refused").to_string();
            assert_eq!(got, "body: must be a JSON object", "{text}");
        }
        for text in ["", "{", "{\"a\":}", "{} {}", "{\"a\":1,}"] {
            let got = read(text).expect_err("refused").to_string();
            assert!(got.starts_with("body: is not valid JSON"), "{text}: {got}");
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let got = check(json!({"message_type": "audio", "chat_type": "x"})).unwrap_err();
        assert!(got.problems.len() >= 4, "{got}");
    }

    #[test]
    fn non_objects_and_bad_json_are_refused() {
        let limits = ValidationLimits::default();
        assert!(validate_message(b"[1]", "o", &limits)
            .unwrap_err()
            .to_string()
            .contains("body: must be a JSON object"));
        assert!(validate_message(b"{", "o", &limits)
            .unwrap_err()
            .to_string()
            .contains("body: is not valid JSON"));
    }

    #[test]
    fn audio_size_is_computed_from_the_base64_length() {
        assert!(check_base64_audio("QUJD").is_ok());
        assert!(check_base64_audio("QUI=").is_ok());
        let just_over = "A".repeat((MAX_AUDIO_BYTES / 3 + 1) * 4);
        assert!(check_base64_audio(&just_over)
            .unwrap_err()
            .contains("the limit is"));
        let at_limit = "A".repeat(MAX_AUDIO_BYTES / 3 * 4);
        assert!(check_base64_audio(&at_limit).is_ok());
    }

    #[test]
    fn audio_formats_are_case_insensitive() {
        let req = check(
            json!({"user_id": "a", "client_id": "web", "message_type": "audio", "audio_base64": "QUJD", "audio_format": "Audio/OGG"}),
        );
        assert!(req.is_ok());
    }
}
