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
/// parsed (for its usage). Built once per VM, not per event.
pub(super) fn markers(format: Format) -> &'static [memchr::memmem::Finder<'static>] {
    static USAGE: Markers = Markers::new(&["\"usage\""]);
    static METADATA: Markers = Markers::new(&["\"usageMetadata\""]);
    static BOTH: Markers = Markers::new(&["\"usage\"", "\"usageMetadata\""]);
    per_format(format, [&USAGE, &METADATA, &BOTH])
}

/// Searchers for the quoted keys that an event in `format` names its model under (`"model"`,
/// `"modelVersion"` for Gemini, both for [`Format::Unknown`]): until the model is found, an
/// event that contains one of them is parsed even without usage. Built once per VM.
pub(super) fn model_markers(format: Format) -> &'static [memchr::memmem::Finder<'static>] {
    static MODEL: Markers = Markers::new(&["\"model\""]);
    static VERSION: Markers = Markers::new(&["\"modelVersion\""]);
    static BOTH: Markers = Markers::new(&["\"model\"", "\"modelVersion\""]);
    per_format(format, [&MODEL, &VERSION, &BOTH])
}

/// The searchers for `format`: the first of `markers` for the OpenAI, Responses and Anthropic
/// formats, the second for Gemini, the third for [`Format::Unknown`].
fn per_format(
    format: Format,
    [openai, gemini, unknown]: [&'static Markers; 3],
) -> &'static [memchr::memmem::Finder<'static>] {
    match format {
        Format::OpenAi | Format::Responses | Format::Anthropic => openai,
        Format::Gemini => gemini,
        Format::Unknown => unknown,
    }
    .get()
}

/// Searchers for a few quoted keys, built on first use.
struct Markers {
    keys: &'static [&'static str],
    finders: std::sync::OnceLock<Vec<memchr::memmem::Finder<'static>>>,
}

impl Markers {
    const fn new(keys: &'static [&'static str]) -> Markers {
        Markers {
            keys,
            finders: std::sync::OnceLock::new(),
        }
    }

    fn get(&self) -> &[memchr::memmem::Finder<'static>] {
        self.finders.get_or_init(|| {
            self.keys
                .iter()
                .map(|k| memchr::memmem::Finder::new(k.as_bytes()))
                .collect()
        })
    }
}
