//! Scanning of server-sent events (`text/event-stream`, as the
//! [HTML standard](https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)
//! defines it): the pieces [`super::UsageExtractor`] frames a stream with. An event is its
//! `data:` lines, joined with `\n`, up to a blank line; other fields (`event:`, `id:`, `retry:`)
//! and comments carry no usage. Lines end in `\n` or `\r\n` (a lone `\r`, which the standard
//! also allows, is not taken for a line end).

use super::Format;

/// The value of a `data:` line (one leading space removed; a trailing `\r` too), or `None` for
/// another field.
pub(super) fn data_field(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    Some(data.strip_prefix(b" ").unwrap_or(data))
}

/// The rest after a blank line (`\n` or `\r\n`) at the start of `bytes`, or `None` when
/// `bytes` does not start with one.
pub(super) fn blank_line(bytes: &[u8]) -> Option<&[u8]> {
    bytes
        .strip_prefix(b"\n")
        .or_else(|| bytes.strip_prefix(b"\r\n"))
}

/// Searchers for the quoted keys that an event in `format` holds its usage under (`"usage"`,
/// `"usageMetadata"`, or both for [`Format::Unknown`]): an event that contains none of them is not
/// parsed. Built once per VM, not per event.
pub(super) fn markers(format: Format) -> &'static [memchr::memmem::Finder<'static>] {
    use memchr::memmem::Finder;
    use std::sync::OnceLock;
    static USAGE: OnceLock<[Finder<'static>; 1]> = OnceLock::new();
    static METADATA: OnceLock<[Finder<'static>; 1]> = OnceLock::new();
    static BOTH: OnceLock<[Finder<'static>; 2]> = OnceLock::new();
    match format {
        Format::OpenAi | Format::Responses | Format::Anthropic => {
            USAGE.get_or_init(|| [Finder::new(b"\"usage\"")])
        }
        Format::Gemini => METADATA.get_or_init(|| [Finder::new(b"\"usageMetadata\"")]),
        Format::Unknown => {
            BOTH.get_or_init(|| [Finder::new(b"\"usage\""), Finder::new(b"\"usageMetadata\"")])
        }
    }
}
