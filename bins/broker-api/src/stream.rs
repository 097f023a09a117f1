//! SSE to clients (docs/design.md §4): a message's recorded frames, from the start or from
//! `Last-Event-ID`, then live until its one terminal frame.
//!
//! Frames are read from the message's Redis stream, so any API process serves any message and
//! a reconnecting client misses nothing. The process that took a stream message is handed its
//! frames by the drainer's announcements as well, and reads the stream only when a batch does
//! not follow on from the last frame it sent. Each frame goes out as the worker framed it
//! (`data: <compact JSON>` and a blank line, LF only) with an `id:` line for resuming; a
//! `{"type":"keepalive"}` frame without an id goes out after every quiet period.

use std::convert::Infallible;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use tokio::time::Instant;

use broker_core::queue::{Event, Mode};
use broker_core::replies::Batch;

use crate::error::ApiError;
use crate::waiters::EventWatch;
use crate::AppState;

/// Frames read from Redis per round trip.
const BATCH: usize = 256;

const KEEPALIVE: &str = "data: {\"type\":\"keepalive\"}\n\n";

/// The worker's own first frame for a message that waits behind another turn.
const QUEUED_STATUS: &str =
    "{\"type\":\"status\",\"message\":\"Queued — processing will begin shortly\"}";

/// How a message's frames are shown to its reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The broker's own route: every recorded frame as it is, the broker's `queued` first.
    Broker,
    /// The worker's `/api/v1/chat/stream` (docs/worker-contract.md §1.5): only frames the
    /// worker itself sends. The broker's `queued` frame becomes the worker's "Queued" status
    /// when the message waits behind another, and is left out when it runs at once.
    Worker,
}

impl Framing {
    pub fn of(route: broker_proto::Route) -> Self {
        if route.is_worker_route() {
            Self::Worker
        } else {
            Self::Broker
        }
    }

    /// One recorded frame as SSE, with its id for resuming; `None` when this framing leaves
    /// it out.
    fn frame(self, event: &Event) -> Option<String> {
        if self == Self::Worker && event.kind == "queued" {
            let waits = serde_json::from_str::<serde_json::Value>(&event.data)
                .ok()
                .and_then(|v| v["ahead"].as_u64())
                .is_some_and(|ahead| ahead > 0);
            return waits.then(|| format!("id: {}\ndata: {QUEUED_STATUS}\n\n", event.id));
        }
        Some(format!("id: {}\ndata: {}\n\n", event.id, event.data))
    }
}

/// `GET /api/v1/stream?message_id=…` (`user_id` accepted for older clients).
pub async fn get_stream(
    req: HttpRequest,
    query: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut problems = Vec::new();
    for name in query.keys() {
        if !["message_id", "user_id"].contains(&name.as_str()) {
            problems.push(format!("unknown query parameter `{name}`"));
        }
    }
    let message_id = query.get("message_id").cloned().unwrap_or_default();
    if message_id.is_empty() {
        problems.push("message_id: required".into());
    } else if let Err(e) = crate::routes::check_message_id(&message_id) {
        problems.push(e.to_string());
    }
    let after = match last_event_id(&req) {
        Ok(after) => after,
        Err(e) => {
            problems.push(e);
            None
        }
    };
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems.join("; ")));
    }
    let record = state
        .queue
        .message_record(&message_id)
        .await?
        .ok_or_else(|| ApiError::no_message(&message_id))?;
    if let Some(user_id) = query.get("user_id") {
        if *user_id != record.user_id {
            // Same answer as an unknown id: a wrong user learns nothing about the message.
            return Err(ApiError::no_message(&message_id));
        }
    }
    if Mode::parse(&record.mode).is_some_and(|m| !m.records_events()) {
        return Err(ApiError::NotStreamable(format!(
            "message_id: message {message_id} was sent in {} mode, whose frames are not recorded; \
             only stream and async (Prefer: respond-async) messages can be streamed",
            record.mode
        )));
    }
    let framing = match record.front.as_deref().and_then(broker_proto::Front::parse) {
        Some(front) => Framing::of(front.route),
        None => Framing::Broker,
    };
    let watch = state.waiters.watch(&message_id, true);
    Ok(sse_response(
        state,
        message_id,
        After::Id(after),
        watch,
        framing,
    ))
}

/// The `Last-Event-ID` header, if any: an id this API sent (`<ms>-<seq>`).
fn last_event_id(req: &HttpRequest) -> Result<Option<String>, String> {
    let Some(value) = req.headers().get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let valid = text.split_once('-').is_some_and(|(ms, seq)| {
        [ms, seq]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    });
    if valid {
        Ok(Some(text.to_owned()))
    } else {
        Err("Last-Event-ID: must be an event id this API sent, like 1732000000000-0".into())
    }
}

/// Where a reader starts in a message's frames.
pub enum After {
    /// After this entry id (`Last-Event-ID`), or from the beginning.
    Id(Option<String>),
    /// With this frame, the first of the stream (the `queued` frame enqueue wrote and
    /// returned): it is sent as it is, and the stream is read only once told of more.
    First(Event),
}

/// A `200 text/event-stream` answer that serves `message_id`'s frames from `after`, woken by
/// `watch` (registered before anything could have been announced).
///
/// The body is the reader itself: each time the connection wants more, it reads what is new
/// and hands over every frame of that read as one chunk. When the client goes away the body
/// is dropped, and the reader with it; nothing about the message changes.
pub fn sse_response(
    state: web::Data<AppState>,
    message_id: String,
    after: After,
    watch: EventWatch,
    framing: Framing,
) -> HttpResponse {
    let (after, first) = match after {
        After::Id(after) => (after, None),
        After::First(event) => (
            Some(event.id.clone()),
            Some(framing.frame(&event).map(Bytes::from)),
        ),
    };
    // The message's id, for resuming on `GET /api/v1/stream` (the worker's framing has no
    // other place for it).
    let id_header = ("x-message-id", message_id.clone());
    let reader = Reader {
        keepalive: state.api.sse_keepalive,
        recheck: state.api.waiter_recheck.min(state.api.sse_keepalive),
        shutdown: state.shutdown.clone(),
        state,
        message_id,
        after,
        // With the first frame in hand, the stream has nothing else yet: wait to be told.
        read_now: first.is_none(),
        first: first.flatten(),
        watch,
        framing,
        last_sent: Instant::now(),
        ended: false,
    };
    let body = futures_util::stream::unfold(reader, |mut reader| async move {
        reader
            .next()
            .await
            .map(|b| (Ok::<_, Infallible>(b), reader))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .insert_header(id_header)
        .streaming(body)
}

/// What a reader makes of the batches a wake-up carried.
#[derive(Debug, PartialEq)]
struct Followed {
    /// The frames to send: each batch that starts right after the last frame sent.
    chunk: Vec<u8>,
    /// The terminal frame is in `chunk`.
    ended: bool,
    /// Something is missing (a wake without its frames, or a batch that does not start
    /// right after the last frame sent): the stream must be read.
    read: bool,
}

/// Takes, in order, the batches that follow on from `after` (the id of the last frame sent,
/// `None` before any), moving `after` along; skips batches already sent, and stops at the
/// first gap.
fn follow(after: &mut Option<String>, batches: Vec<Batch>, incomplete: bool) -> Followed {
    let mut followed = Followed {
        chunk: Vec::new(),
        ended: false,
        read: incomplete,
    };
    for batch in batches {
        if followed.read || followed.ended {
            break;
        }
        if batch.before == after.as_deref().unwrap_or("") {
            followed.chunk.extend_from_slice(&batch.sse);
            followed.ended = batch.terminal;
            *after = Some(batch.last);
        } else if !after.as_deref().is_some_and(|after| {
            matches!((entry_order(&batch.last), entry_order(after)), (Some(last), Some(after)) if last <= after)
        }) {
            // Not sent yet, and not next: frames in between were missed.
            followed.read = true;
        }
    }
    followed.read &= !followed.ended;
    followed
}

/// A stream entry id (`<ms>-<seq>`) as numbers, for ordering.
fn entry_order(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// One SSE client's progress through a message's frames.
struct Reader {
    state: web::Data<AppState>,
    message_id: String,
    /// The id of the last frame sent.
    after: Option<String>,
    /// A frame to send before anything else.
    first: Option<Bytes>,
    /// Read the stream before waiting (false right after a read that found the end of it).
    read_now: bool,
    watch: EventWatch,
    framing: Framing,
    keepalive: std::time::Duration,
    recheck: std::time::Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
    last_sent: Instant,
    /// The terminal frame (or the stream's end) was sent.
    ended: bool,
}

impl Reader {
    /// The next chunk of the body, once there is one; `None` ends the response.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            self.last_sent = Instant::now();
            return Some(first);
        }
        if self.ended {
            return None;
        }
        loop {
            if self.read_now {
                if let Some(chunk) = self.read().await {
                    self.last_sent = Instant::now();
                    return Some(chunk);
                }
                if self.ended {
                    return None;
                }
            }
            self.read_now = true;
            tokio::select! {
                () = self.watch.inbox.notify.notified() => {
                    if let Some(chunk) = self.carried() {
                        self.last_sent = Instant::now();
                        return Some(chunk);
                    }
                }
                _ = self.watch.resubscribed.changed() => {}
                () = tokio::time::sleep_until(self.last_sent + self.keepalive) => {
                    self.last_sent = Instant::now();
                    self.read_now = false;
                    return Some(Bytes::from_static(KEEPALIVE.as_bytes()));
                }
                () = tokio::time::sleep(self.recheck) => {}
                // The client resumes on another API process with Last-Event-ID.
                _ = self.shutdown.changed() => return None,
            }
        }
    }

    /// The frames the wake-ups since the last call carried, from `after` on, as one chunk.
    /// Leaves `read_now` set when something is missing (the stream is read then).
    fn carried(&mut self) -> Option<Bytes> {
        let (batches, incomplete) = self.watch.inbox.take();
        let followed = follow(&mut self.after, batches, incomplete);
        self.ended = followed.ended;
        self.read_now = followed.read;
        (!followed.chunk.is_empty()).then(|| Bytes::from(followed.chunk))
    }

    /// Reads the frames after `after`: all of them as one chunk, or `None` when there are
    /// none (then `ended` says whether more can come).
    async fn read(&mut self) -> Option<Bytes> {
        let (events, status) = match self
            .state
            .queue
            .read_events(&self.message_id, self.after.as_deref(), BATCH)
            .await
        {
            Ok(read) => read,
            Err(e) => {
                tracing::debug!(error = %e, message_id = %self.message_id, "events not readable yet; retrying");
                self.read_now = false;
                return None;
            }
        };
        // A full batch may have more behind it: read again at once.
        self.read_now = events.len() == BATCH;
        if events.is_empty() {
            match status.as_deref() {
                // The record is gone (its result expired): nothing more will come.
                None => {
                    self.ended = true;
                    return Some(Bytes::from(format!(
                        "data: {}\n\n",
                        serde_json::json!({"type": "error", "error": "the message is unknown or its result expired", "code": "NOT_FOUND", "message_id": self.message_id})
                    )));
                }
                // Finished, and its terminal frame was at or before Last-Event-ID.
                Some("completed" | "failed" | "cancelled") => self.ended = true,
                Some(_) => {}
            }
            return None;
        }
        let mut chunk = String::new();
        for event in events {
            if let Some(frame) = self.framing.frame(&event) {
                chunk.push_str(&frame);
            }
            if event.is_terminal() {
                self.ended = true;
                break;
            }
            self.after = Some(event.id);
        }
        if chunk.is_empty() {
            // Only frames this framing leaves out: read on.
            self.read_now = true;
            return None;
        }
        Some(Bytes::from(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(before: &str, last: &str, terminal: bool) -> Batch {
        Batch {
            before: before.into(),
            last: last.into(),
            sse: Bytes::from(format!("id: {last}\ndata: {{}}\n\n")),
            terminal,
        }
    }

    fn sent(followed: &Followed) -> String {
        String::from_utf8(followed.chunk.clone()).unwrap_or_default()
    }

    #[test]
    fn batches_that_follow_on_are_sent_in_one_chunk() {
        let mut after = Some("5-0".to_owned());
        let batches = vec![batch("5-0", "6-1", false), batch("6-1", "7-0", true)];
        let followed = follow(&mut after, batches, false);
        assert_eq!(
            sent(&followed),
            "id: 6-1\ndata: {}\n\nid: 7-0\ndata: {}\n\n"
        );
        assert!(followed.ended && !followed.read);
        assert_eq!(after.as_deref(), Some("7-0"));
        // From the start of an empty stream.
        let mut after = None;
        let followed = follow(&mut after, vec![batch("", "1-0", false)], false);
        assert_eq!(sent(&followed), "id: 1-0\ndata: {}\n\n");
        assert!(!followed.ended && !followed.read);
    }

    #[test]
    fn a_gap_or_a_wake_without_frames_means_reading_the_stream() {
        // A batch after one that never came: nothing of it is sent.
        let mut after = Some("5-0".to_owned());
        let batches = vec![batch("5-0", "6-0", false), batch("6-5", "7-0", false)];
        let followed = follow(&mut after, batches, false);
        assert_eq!(sent(&followed), "id: 6-0\ndata: {}\n\n");
        assert!(followed.read && !followed.ended);
        assert_eq!(after.as_deref(), Some("6-0"));
        // Before any frame was sent, a batch that does not start the stream is a gap.
        let mut after = None;
        assert!(follow(&mut after, vec![batch("3-0", "4-0", false)], false).read);
        // A wake that carried nothing.
        let mut after = Some("5-0".to_owned());
        let followed = follow(&mut after, vec![batch("5-0", "6-0", false)], true);
        assert!(followed.chunk.is_empty() && followed.read);
        assert_eq!(after.as_deref(), Some("5-0"));
        // A malformed id is never taken as sent.
        assert!(follow(&mut after, vec![batch("x", "y", false)], false).read);
    }

    #[test]
    fn batches_already_sent_are_skipped() {
        // Read from the stream before its announcement arrived.
        let mut after = Some("9-0".to_owned());
        let batches = vec![batch("5-0", "6-0", false), batch("6-0", "9-0", false)];
        let followed = follow(&mut after, batches, false);
        assert!(followed.chunk.is_empty() && !followed.read && !followed.ended);
        assert_eq!(after.as_deref(), Some("9-0"));
    }
}
