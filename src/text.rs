//! Text from outside, bounded: what an error message, a log line or a stored note quotes of
//! input the daemon did not write (WeChat's fields, a request body, a row of the merchant's
//! table). Nothing outside this module decides how much of such a value is kept.
//!
//! - [`quote`]: for messages and logs. At most [`MAX_QUOTE_CHARS`] characters, in quotes,
//!   control characters escaped (a newline in WeChat's `return_msg` cannot forge a log line),
//!   and the size of what was left out.
//! - [`note`]: for the database. At most [`MAX_NOTE_CHARS`] characters, cut on a character
//!   boundary, control characters escaped: it fits every backend's column (MySQL's `TEXT` holds
//!   65,535 bytes; a character is at most 4).

use std::fmt::Write as _;

/// The most characters of one outside value that a message or a log line quotes.
pub const MAX_QUOTE_CHARS: usize = 64;

/// The most characters a stored note (`last_error`, an event's `detail`, `set_aside_reason`)
/// keeps, escapes included.
pub const MAX_NOTE_CHARS: usize = 1024;

/// `s` quoted for a message or a log line: `"…"`, escaped, at most [`MAX_QUOTE_CHARS`]
/// characters of it, then `… (+N bytes)` when longer.
pub fn quote(s: &str) -> String {
    quote_with(s, MAX_QUOTE_CHARS)
}

/// [`quote`] with another bound.
pub fn quote_with(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 2) + 16);
    out.push('"');
    let mut kept_bytes = 0;
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            break;
        }
        escape_into(&mut out, c, true);
        kept_bytes += c.len_utf8();
    }
    out.push('"');
    if kept_bytes < s.len() {
        let _ = write!(out, "… (+{} bytes)", s.len() - kept_bytes);
    }
    out
}

/// Bytes that may not be UTF-8 (a request body), quoted like [`quote`].
pub fn quote_bytes(b: &[u8]) -> String {
    // Only the first characters are shown: decoding a prefix is enough.
    let prefix = &b[..b.len().min(MAX_QUOTE_CHARS * 4)];
    let lossy = String::from_utf8_lossy(prefix);
    let mut q = quote(&lossy);
    if prefix.len() < b.len() && !q.ends_with(" bytes)") {
        let _ = write!(q, "… (+{} bytes)", b.len() - prefix.len());
    }
    q
}

/// `s` bounded for a column: control characters escaped, at most [`MAX_NOTE_CHARS`]
/// characters in all, cut on a character boundary and marked with `…` when cut.
pub fn note(s: &str) -> String {
    note_with(s, MAX_NOTE_CHARS)
}

/// [`note`] with another bound (a `VARCHAR(n)` column counts characters: `max_chars` = n).
pub fn note_with(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars));
    let mut chars = 0;
    for c in s.chars() {
        let before = out.len();
        escape_into(&mut out, c, false);
        chars += out[before..].chars().count();
        if chars > max_chars.saturating_sub(1) {
            out.truncate(before);
            out.push('…');
            return out;
        }
    }
    out
}

/// Escapes `c` when it could break a line or a terminal (and, inside quotes, a quote).
fn escape_into(out: &mut String, c: char, quoted: bool) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '"' if quoted => out.push_str("\\\""),
        '\\' if quoted => out.push_str("\\\\"),
        c if c.is_control() || is_invisible_format(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// Characters that reorder or hide text on a terminal (bidirectional overrides and the like).
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quotes_are_bounded_and_escaped() {
        assert_eq!(quote("abc"), "\"abc\"");
        assert_eq!(quote("a\nb\"c\\"), "\"a\\nb\\\"c\\\\\"");
        assert_eq!(quote("\u{1b}[31m"), "\"\\u{1b}[31m\"");
        let long = "\"".repeat(40_000);
        let q = quote(&long);
        assert!(q.len() < 200, "{q}");
        assert!(q.ends_with("(+39936 bytes)"), "{q}");
        assert_eq!(quote_bytes(b"ab\xffc"), "\"ab\u{fffd}c\"");
        let big = vec![b'x'; 70_000];
        assert!(quote_bytes(&big).ends_with("bytes)"));
    }

    #[test]
    fn notes_fit_every_column() {
        let n = note(&"界".repeat(5000));
        assert_eq!(n.chars().count(), MAX_NOTE_CHARS);
        assert!(n.ends_with('…'));
        assert_eq!(note("fine"), "fine");
        assert_eq!(note("a\nb"), "a\\nb");
    }

    proptest! {
        #[test]
        fn never_over_the_bounds(s in any::<String>()) {
            let n = note(&s);
            prop_assert!(n.chars().count() <= MAX_NOTE_CHARS);
            prop_assert!(n.len() <= MAX_NOTE_CHARS * 4);
            prop_assert!(!n.contains('\n'));
            let q = quote(&s);
            prop_assert!(q.chars().count() <= MAX_QUOTE_CHARS * 12 + 40);
            prop_assert!(!q.contains('\n') && !q.contains('\r'));
        }
    }
}
