//! A turn with the real worker's whole frame sequence (`docs/worker-contract.md` §1.5), for
//! messages that ask for it with `tools=N`, `progress=N`, `gap=MS` or `voice`:
//!
//! `status` "Processing your request...", then per iteration its `progress` pieces and, for
//! the N tool iterations, `status` "Executing 1 tool(s)...", `tool_use`, `tool_result`; each
//! iteration after the first starts with `progress` "\n" and `status` "Preparing your
//! response..."; last `complete`, whose `responses` are the iterations' texts (so that
//! `responses.join("\n")` is every progress text in order). The final iteration's text is
//! `echo: <message>`; a tool iteration's is `Looking up <i>.`.

use std::time::Duration;

use actix_web::HttpResponse;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::{pause, Accepted, InFlight, MockState};

/// The frames of one scripted turn, with the pause before each.
pub(crate) struct Turn {
    frames: Vec<Value>,
    gap: Duration,
    /// The audio key the answer names, stored when the turn completes.
    audio: Option<String>,
    history: (String, String, String),
}

impl Turn {
    pub(crate) fn new(accepted: &Accepted, origin: &str, length: Duration) -> Self {
        let d = &accepted.directives;
        let tools = d.tools.unwrap_or(0);
        let pieces = d.progress.unwrap_or(1).max(1);
        let mut frames = vec![json!({"type": "status", "message": "Processing your request..."})];
        let mut responses = Vec::new();
        for i in 0..=tools {
            if i > 0 {
                frames.push(json!({"type": "progress", "text": "\n"}));
                frames.push(json!({"type": "status", "message": "Preparing your response..."}));
            }
            let text = if i == tools {
                format!("echo: {}", accepted.text)
            } else {
                format!("Looking up {}.", i + 1)
            };
            for piece in split(&text, pieces) {
                frames.push(json!({"type": "progress", "text": piece}));
            }
            responses.push(text);
            if i < tools {
                frames.push(json!({"type": "status", "message": "Executing 1 tool(s)..."}));
                frames.push(json!({"type": "tool_use", "tool": "fetch_scripture", "input": {"reference": format!("Gen {}:1", i + 1)}}));
                frames.push(json!({"type": "tool_result", "tool": "fetch_scripture", "result": {"text": format!("In the beginning ({})", i + 1)}}));
            }
        }
        let audio = d.voice.then(|| {
            format!(
                "audio/{}/{}/{:016x}.opus",
                accepted.org,
                accepted.user_id,
                fastrand::u64(..)
            )
        });
        let voice_url = audio
            .as_ref()
            .map(|key| format!("{origin}/api/v1/audio/{key}"));
        frames.push(json!({"type": "complete", "response": {
            "responses": responses,
            "response_language": "en",
            "voice_audio_base64": null,
            "voice_audio_url": voice_url,
        }}));
        // Without `gap`, the turn's length is spread over its frames.
        let gap = d
            .gap
            .unwrap_or_else(|| length / u32::try_from(frames.len()).unwrap_or(u32::MAX));
        Self {
            frames,
            gap,
            audio,
            history: (
                format!("{}\u{0}{}", accepted.org, accepted.user_id),
                accepted.text.clone(),
                responses.join("\n"),
            ),
        }
    }
}

impl Turn {
    pub(crate) fn frames(&self) -> &[Value] {
        &self.frames
    }

    pub(crate) fn gap(&self) -> Duration {
        self.gap
    }

    /// Records the finished turn in its user's history (and its audio).
    pub(crate) fn remember(self, state: &MockState) {
        let (user, message, answer) = self.history;
        state.remember(&user, message, answer, self.audio);
    }
}

/// `text` in `n` pieces of about equal length (by characters; fewer when it is shorter).
fn split(text: &str, n: u64) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let n = usize::try_from(n).unwrap_or(1).clamp(1, chars.len().max(1));
    let size = chars.len().div_ceil(n).max(1);
    chars
        .chunks(size)
        .map(|c| c.iter().collect::<String>())
        .collect()
}

/// The streamed answer of a scripted turn; the turn counts as running until its last frame.
pub(crate) fn respond(turn: Turn, guard: InFlight, state: &MockState) -> HttpResponse {
    let state = state.clone();
    let Turn {
        frames,
        gap,
        audio,
        history,
    } = turn;
    let total = frames.len();
    let mut guard = Some(guard);
    let mut finish = Some((audio, history, state));
    let stream = futures_util::stream::unfold(frames.into_iter().enumerate(), move |mut frames| {
        let next = frames.next();
        let done = next.as_ref().is_some_and(|(i, _)| i + 1 == total);
        let (guard, finish) = if done {
            (guard.take(), finish.take())
        } else {
            (None, None)
        };
        async move {
            let (i, frame) = next?;
            if i > 0 {
                pause(gap).await;
            }
            if let Some(guard) = guard {
                guard.finish(true);
            }
            if let Some((audio, (user, message, answer), state)) = finish {
                state.remember(&user, message, answer, audio);
            }
            let bytes = Bytes::from(format!("data: {frame}\n\n"));
            Some((Ok::<_, actix_web::Error>(bytes), frames))
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream)
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn text_is_split_into_pieces_that_join_to_it() {
        assert_eq!(split("echo: hi", 3), ["ech", "o: ", "hi"]);
        assert_eq!(split("ab", 5), ["a", "b"]);
        assert_eq!(split("", 2), [""]);
        assert_eq!(split("é✓x", 1), ["é✓x"]);
    }
}
