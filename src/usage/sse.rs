use super::Format;

/// The value of a `data:` line (one leading space removed; a trailing `\r` too), or `None` for
/// another field.
pub(super) fn data_field(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    Some(data.strip_prefix(b" ").unwrap_or(data))
}

/// The rest after a blank line (`\n` or `\r\n`) at the start of `bytes`.
pub(super) fn blank_line(bytes: &[u8]) -> Option<&[u8]> {
    bytes
        .strip_prefix(b"\n")
        .or_else(|| bytes.strip_prefix(b"\r\n"))
}

/// Prebuilt searchers for [`Format::markers`] (built once per VM, not per event).
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
