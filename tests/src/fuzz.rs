//! The fuzz targets: every reader of bytes that come from outside a process (clients' request
//! bodies, the worker's SSE stream and JSON, callback URLs, Redis replies and the private
//! formats the scripts write). Each takes arbitrary bytes and must return: no panic, no hang.
//! `fuzz/` runs them under cargo-fuzz (`./dev fuzz`); the test suite replays the committed
//! corpus and a fixed number of mutations of it on stable (`tests/it/fuzz.rs`).

use broker_core::callback::Policy;
use broker_core::config::Allowlist;
use broker_proto::front::{Progress, ProgressMode, Rewrite};
use broker_proto::sse::{ChatResponse, Frame, FrameParser};
use broker_proto::{valid_traceparent, validate_request, Front, Outcome, Route, ValidationLimits};

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus folder (`fuzz/corpus/<name>`).
pub const TARGETS: &[(&str, Target)] = &[
    ("request", request),
    ("sse", sse),
    ("url", url),
    ("replies", replies),
    ("claim", claim),
    ("worker_json", worker_json),
];

/// A request body on each route.
pub fn request(data: &[u8]) {
    for route in [
        Route::Message,
        Route::Chat,
        Route::ChatStream,
        Route::ChatCallback,
    ] {
        let _ = validate_request(data, route, "unfoldingWord", &ValidationLimits::default());
    }
}

/// The worker's SSE stream, cut into chunks where the data says, each frame parsed.
pub fn sse(data: &[u8]) {
    let mut parser = FrameParser::new();
    let cut = usize::from(data.first().copied().unwrap_or(7)).max(1);
    for chunk in data.chunks(cut) {
        parser.feed(chunk);
        while let Some(frame) = parser.next_frame() {
            let frame = frame.into_owned();
            let _ = Frame::parse(&frame).is_terminal();
        }
    }
    let _ = parser.pending();
}

/// A callback URL through the guard's checks that need no network, a `traceparent`, and the
/// URL rewriting of answers.
pub fn url(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(allow) = Allowlist::parse("example.org,127.0.0.1:8080") {
        let _ = Policy::new(allow).target(text);
    }
    let _ = Allowlist::parse(text);
    let _ = valid_traceparent(text);
    let rewrite = Rewrite::new("http://w.example:8787", "https://broker.example");
    let _ = rewrite.url(text);
    let _ = rewrite.json(text);
}

/// The reply channel's messages.
pub fn replies(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(replies) = broker_core::replies::split(text) {
        for reply in replies.take(10_000) {
            let _ = broker_core::replies::read(reply);
        }
    }
    let _ = broker_core::replies::read(text);
}

/// The claim and enqueue scripts' replies, as one string and as a list of them.
pub fn claim(data: &[u8]) {
    use redis::Value;
    let _ = broker_core::queue::parse_claim(&Value::BulkString(data.to_vec()), 7);
    let parts: Vec<Value> = data
        .split(|b| *b == b'|')
        .map(|p| Value::BulkString(p.to_vec()))
        .collect();
    let list = Value::Array(parts);
    let _ = broker_core::queue::parse_claim(&list, 7);
    let _ = broker_core::queue::parse_enqueued(&list);
}

/// JSON from the worker and from Redis: a `ChatResponse`, an outcome, a front, and lines of
/// worker frames through every `progress_mode`.
pub fn worker_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ChatResponse::parse(text);
    let _ = serde_json::from_str::<Outcome>(text);
    let _ = Front::parse(text);
    for mode in [
        ProgressMode::Complete,
        ProgressMode::Iteration,
        ProgressMode::Periodic,
        ProgressMode::Sentence,
    ] {
        let mut rules = Progress::new(mode, std::time::Duration::from_millis(5));
        rules.resume_after(text.chars().take(8).collect());
        for (i, line) in text.lines().enumerate() {
            let at = std::time::Duration::from_millis(i as u64 * 3);
            if let Ok(frame) = serde_json::from_str::<serde_json::Value>(line) {
                let _ = rules.frame(&frame, at);
            }
            let _ = rules.tick(at);
            let _ = rules.covered();
        }
    }
}

/// A mutation of `seed` (bit flips, byte changes, inserts, deletes, splices with `other`,
/// repeats), for the stable replay.
pub fn mutate(seed: &[u8], other: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let len = out.len();
        match rng.u8(0..6) {
            0 if len > 0 => {
                let i = rng.usize(0..len);
                out[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(0..len);
                out[i] = *[
                    b'"', b'\n', b'{', b'}', b':', b',', b'\\', 0, 0xff, b'-', b' ',
                ]
                .get(rng.usize(0..11))
                .unwrap_or(&b'x');
            }
            2 => {
                let i = rng.usize(0..=len);
                let byte = rng.u8(..);
                out.insert(i, byte);
            }
            3 if len > 0 => {
                let i = rng.usize(0..len);
                let j = rng.usize(i..=len.min(i + 16));
                out.drain(i..j);
            }
            4 if !other.is_empty() => {
                let i = rng.usize(0..=len);
                let a = rng.usize(0..other.len());
                let b = rng.usize(a..=other.len());
                out.splice(i..i, other[a..b].iter().copied());
            }
            _ if len > 0 && len < 100_000 => {
                let i = rng.usize(0..len);
                let j = rng.usize(i..=len.min(i + 8));
                let piece = out[i..j].to_vec();
                for _ in 0..rng.usize(1..64) {
                    out.splice(j..j, piece.iter().copied());
                }
            }
            _ => {}
        }
    }
    out
}
