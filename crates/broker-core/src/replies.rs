//! The messages on an API worker's reply channel (`bt:replies:<instance>-<n>`), a private
//! wire format between the scripts that write them (`lua/finish.lua`, `lua/told.lua`) and the
//! API that reads them:
//!
//! - `<message id>\n<outcome JSON>`: the message finished;
//! - `<message id>\n` and no outcome: a stream message got new frames;
//! - either followed by the frames the drainer carried, `\n<id before them> <last id>\n<their
//!   SSE text>`;
//! - `*\n` and several replies, one after the other on their own lines: the sync outcomes one
//!   finish call stored for one channel.
//!
//! An outcome is compact JSON, without a line feed.

/// Frames a drainer published with their ids: the SSE text of entries `before` (exclusive,
/// empty for the start of the stream) to `last`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub before: String,
    pub last: String,
    pub sse: bytes::Bytes,
    /// The batch ends with the message's terminal frame.
    pub terminal: bool,
}

/// The replies of a message that carries several (`*\n` and then each reply, `<message
/// id>\n<outcome JSON>`, one after the other on their own lines; the finish script publishes
/// the sync outcomes of a batch of turns so), or `None` for a message of one reply. An
/// outcome is compact JSON, without a line feed.
pub fn split(payload: &str) -> Option<impl Iterator<Item = &str>> {
    let mut rest = payload.strip_prefix("*\n")?;
    Some(std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let id_end = line_end(rest).unwrap_or(rest.len());
        let end = rest[id_end..]
            .get(1..)
            .and_then(line_end)
            .map_or(rest.len(), |at| id_end + 1 + at);
        let (reply, after) = rest.split_at(end);
        rest = after.strip_prefix('\n').unwrap_or(after);
        Some(reply)
    }))
}

/// Where the first line feed of `text` is. An outcome is a few hundred bytes of JSON that
/// every reply scans twice for its end: `memchr` reads it in vector-sized steps.
fn line_end(text: &str) -> Option<usize> {
    memchr::memchr(b'\n', text.as_bytes())
}

/// `text` split at its first line feed, which goes to neither side.
fn split_line(text: &str) -> Option<(&str, &str)> {
    // A line feed is one byte: the positions either side of it are character boundaries.
    line_end(text).map(|at| (&text[..at], &text[at + 1..]))
}

/// Reads a reply: `<message id>\n<outcome JSON, or nothing for frames alone>`, then, when the
/// drainer carried the frames it wrote, `\n<id before them> <last id>\n<their SSE text>`
/// (an outcome is compact JSON, without a line feed). The batch of an outcome ends with the
/// terminal frame.
pub fn read(payload: &str) -> Option<(&str, &str, Option<Batch>)> {
    let (message_id, rest) = split_line(payload)?;
    let Some((outcome, carried)) = split_line(rest) else {
        return Some((message_id, rest, None));
    };
    let batch = split_line(carried).and_then(|(ids, sse)| {
        let (before, last) = ids.split_once(' ')?;
        Some(Batch {
            before: before.to_owned(),
            last: last.to_owned(),
            sse: bytes::Bytes::copy_from_slice(sse.as_bytes()),
            terminal: !outcome.is_empty(),
        })
    });
    Some((message_id, outcome, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_of_several_replies_is_split_into_them() {
        let one = "m1\n{\"a\":\"é\"}";
        let two = "m2\n{}";
        let payload = format!("*\n{one}\n{two}");
        let replies: Vec<&str> = split(&payload).unwrap().collect();
        assert_eq!(replies, [one, two]);
        assert!(split(one).is_none(), "one reply alone is not split");
        // A last id without its outcome is passed on as it is (deliver warns and drops it).
        let cut: Vec<&str> = split("*\nm1\n{}\nm2").unwrap().collect();
        assert_eq!(cut, ["m1\n{}", "m2"]);
        assert_eq!(split("*\n").unwrap().count(), 0);
    }

    #[test]
    fn replies_read_with_and_without_their_frames() {
        assert_eq!(read("m1\n{\"a\":1}"), Some(("m1", "{\"a\":1}", None)));
        assert_eq!(read("m1\n"), Some(("m1", "", None)));
        assert_eq!(read("m1"), None);
        let frames = "id: 5-0\ndata: {\"type\":\"status\"}\n\nid: 5-1\ndata: {}\n\n";
        let reply = format!("m1\n{{\"a\":1}}\n4-0 5-1\n{frames}");
        let (id, outcome, batch) = read(&reply).unwrap();
        assert_eq!((id, outcome), ("m1", "{\"a\":1}"));
        let batch = batch.unwrap();
        assert_eq!((batch.before.as_str(), batch.last.as_str()), ("4-0", "5-1"));
        assert_eq!(&batch.sse[..], frames.as_bytes());
        assert!(batch.terminal);
        // Frames alone, written to an empty stream.
        let reply = format!("m1\n\n 5-1\n{frames}");
        let (_, outcome, batch) = read(&reply).unwrap();
        assert_eq!(outcome, "");
        let batch = batch.unwrap();
        assert_eq!(batch.before, "");
        assert!(!batch.terminal);
    }
}
