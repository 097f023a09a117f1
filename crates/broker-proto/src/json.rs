//! JSON text written by hand where building a `serde_json::Value` first would cost more than
//! the output: the worker's request body and the broker's log lines.

use std::fmt::{self, Write as _};

/// Writes `text` as a JSON string: quoted, with quotes, backslashes and control characters
/// escaped. Generic, so that writing to a `String` compiles to plain pushes: through
/// `dyn fmt::Write` each piece of a log line was a call through a table.
pub fn write_string<W: fmt::Write + ?Sized>(out: &mut W, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_str(text)?;
    out.write_char('"')
}

/// Appends `text` to `out` as a JSON string (writing to a `String` cannot fail).
pub fn push_string(out: &mut String, text: &str) {
    let _ = write_string(out, text);
}

/// Appends `text` as a JSON string, or `null` for none.
pub fn push_string_or_null(out: &mut String, text: Option<&str>) {
    match text {
        Some(text) => push_string(out, text),
        None => out.push_str("null"),
    }
}

/// Appends `texts` as a JSON array of strings.
pub fn push_strings(out: &mut String, texts: &[String]) {
    out.push('[');
    for (i, text) in texts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_string(out, text);
    }
    out.push(']');
}

/// Appends `n` as a JSON number.
pub fn push_number(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Escapes what is written through it for the inside of a JSON string.
pub struct Escaping<'a, W: fmt::Write + ?Sized>(pub &'a mut W);

/// Whether a byte must be escaped in a JSON string. All such bytes are ASCII, so a byte
/// that is not one of them, including every byte of a multi-byte character, is copied as is.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

impl<W: fmt::Write + ?Sized> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let bytes = text.as_bytes();
        // Most text has nothing to escape: a check without an early exit, which the
        // compiler turns into wide compares, finds that out faster than a walk by characters
        // (the walk was a quarter of what logging cost the API).
        if !bytes.iter().fold(false, |any, &b| any | needs_escape(b)) {
            return self.0.write_str(text);
        }
        let mut plain = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if !needs_escape(b) {
                continue;
            }
            // `i` is at an ASCII byte, so both slices end on character boundaries.
            self.0.write_str(&text[plain..i])?;
            match b {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                // As serde_json writes them, so that text written here is byte for byte
                // what it would write (`Outcome::to_json` relies on it).
                0x08 => self.0.write_str("\\b")?,
                0x0c => self.0.write_str("\\f")?,
                _ => write!(self.0, "\\u{b:04x}")?,
            }
            plain = i + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json_reads_them_back() {
        let mut texts: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        texts.extend(
            [
                "",
                "plain",
                "é\"ü\u{1f}✓",
                "\\\\",
                "end\n",
                "日本語\t語",
                "\u{7f}\u{80}",
            ]
            .map(str::to_owned),
        );
        for text in texts {
            let mut out = String::new();
            write_string(&mut out, &text).expect("write");
            let back: String = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!(back, text, "{out}");
            assert!(!out[1..out.len() - 1].bytes().any(|b| b < 0x20), "{out}");
        }
    }
}
