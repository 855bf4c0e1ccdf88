//! Withholding the usage event the filter asked for: when it added
//! `stream_options.include_usage` to a request that lacked it, the upstream ends the stream with
//! an event the client never asked for (`"choices": []` and `usage`, before `data: [DONE]`),
//! on which a naive client (`chunk.choices[0]`) fails. [`UsageEventWithholder`] takes the body
//! chunks as they pass and answers what goes on to the client: everything, as it arrives, but
//! that event. Only a partial event at a chunk's end that could still be the usage event is
//! held back (bounded), until its end shows what it is.
//!
//! The usage event is one whose lines are all `data:` lines and whose data is a JSON object
//! with `"choices": []` and a `usage` object. A chunk that carries choices and usage (some
//! servers put usage on the last chunk with choices) goes on, as does any event with another
//! field (`event:`, `id:`, a comment) or data that is not a JSON object (`[DONE]`).

use super::sse::data_field;

/// Where the scanner stands in the current line of the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// The line so far is a `\r` (a blank line if `\n` follows).
    Cr,
    /// The line so far is the first `n` bytes of `data:`.
    Name(usize),
    /// Right after `data:` (one space is skipped).
    DataStart,
    /// In a `data:` line's value.
    Data,
    /// In any other non-blank line.
    Other,
}

/// Where a JSON object's top level stands, for the key being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    /// A key (or the object's end) comes next.
    Key,
    /// A `:` comes next.
    Colon,
    /// A value comes next, or is being read.
    Value,
}

/// An incremental look at the data of an event: whether it can still be the usage event (a
/// JSON object whose top-level `choices` is an empty array). It only rules events out; the
/// complete event is parsed to rule it in.
#[derive(Debug, Clone)]
struct Scan {
    /// The object's `{` was seen.
    started: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
    member: Member,
    /// The top-level key being read (its first bytes), and whether it is longer or escaped.
    key: [u8; 8],
    key_len: usize,
    key_odd: bool,
    /// The current top-level value is `choices`'s.
    choices: bool,
    /// Just inside `choices`'s `[`: the next non-blank byte says whether the array is empty.
    choices_open: bool,
}

impl Default for Scan {
    fn default() -> Self {
        Scan {
            started: false,
            depth: 0,
            in_string: false,
            escaped: false,
            member: Member::Key,
            key: [0; 8],
            key_len: 0,
            key_odd: false,
            choices: false,
            choices_open: false,
        }
    }
}

fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scan {
    /// Takes the next data byte; `false` once the event cannot be the usage event.
    fn feed(&mut self, b: u8) -> bool {
        if !self.started {
            if blank(b) {
                return true;
            }
            self.started = b == b'{';
            self.depth = 1;
            return self.started;
        }
        let top_key = self.depth == 1 && self.member == Member::Key;
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
                self.key_odd |= top_key;
            } else if b == b'"' {
                self.in_string = false;
                if top_key {
                    self.choices =
                        !self.key_odd && self.key.get(..self.key_len) == Some(b"choices");
                    self.member = Member::Colon;
                }
            } else if top_key {
                match self.key.get_mut(self.key_len) {
                    Some(slot) => {
                        *slot = b;
                        self.key_len += 1;
                    }
                    None => self.key_odd = true,
                }
            }
            return true;
        }
        if self.choices_open {
            if blank(b) {
                return true;
            }
            if b != b']' {
                return false;
            }
            self.choices_open = false;
        }
        match b {
            b'"' => {
                self.in_string = true;
                if top_key {
                    self.key_len = 0;
                    self.key_odd = false;
                }
            }
            b'{' | b'[' => {
                if self.depth == 1 && self.member == Member::Value && self.choices && b == b'[' {
                    self.choices_open = true;
                }
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 1 => self.member = Member::Value,
            b',' if self.depth == 1 => {
                self.member = Member::Key;
                self.choices = false;
            }
            _ => {}
        }
        true
    }
}

/// Whether a complete event (its raw lines, blank line included) is the usage event: only
/// `data:` lines, whose joined data is a JSON object with `"choices": []` and a `usage` object.
pub fn is_usage_event(event: &[u8]) -> bool {
    let mut data = Vec::with_capacity(event.len());
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let Some(value) = data_field(line) else {
            return false;
        };
        if !data.is_empty() {
            data.push(b'\n');
        }
        data.extend_from_slice(value);
    }
    let Ok(serde_json::Value::Object(doc)) = serde_json::from_slice(&data) else {
        return false;
    };
    let no_choices = doc
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .is_some_and(Vec::is_empty);
    no_choices && doc.get("usage").is_some_and(serde_json::Value::is_object)
}

/// Removes the usage events from an event stream as it passes (see the
/// [module documentation](self)): fed each body chunk, it answers the bytes the client gets
/// now. Holds at most `max_bytes` of a partial event; one that grows beyond goes on.
#[derive(Debug)]
pub struct UsageEventWithholder {
    max_bytes: usize,
    /// The current event's bytes, not passed on yet: it may be the usage event.
    held: Vec<u8>,
    /// The current event is not the usage event: its bytes go on as they come.
    passing: bool,
    line: Line,
    scan: Scan,
    withheld: usize,
}

impl UsageEventWithholder {
    /// A withholder for one response, holding at most `max_bytes` of a partial event.
    pub fn new(max_bytes: usize) -> Self {
        UsageEventWithholder {
            max_bytes,
            held: Vec::new(),
            passing: false,
            line: Line::Start,
            scan: Scan::default(),
            withheld: 0,
        }
    }

    /// How many usage events were withheld so far.
    pub fn withheld(&self) -> usize {
        self.withheld
    }

    /// Takes the next body chunk; answers what goes on to the client in its place, or `None`
    /// when that is the chunk as it is (the usual case).
    pub fn chunk(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        if chunk.is_empty() {
            return None;
        }
        // The current event's bytes from earlier chunks, held.
        let mut prefix = std::mem::take(&mut self.held);
        let mut changed = !prefix.is_empty();
        let mut out = Vec::with_capacity(prefix.len() + chunk.len());
        // Where the current event's bytes in `chunk` start.
        let mut start = 0;
        let mut i = 0;
        while i < chunk.len() {
            if self.passing && !matches!(self.line, Line::Start | Line::Cr) {
                // Nothing but the line's end matters now: skip to it.
                match memchr::memchr(b'\n', chunk.get(i..).unwrap_or_default()) {
                    Some(n) => i += n,
                    None => break,
                }
            }
            let b = chunk.get(i).copied().unwrap_or_default();
            i += 1;
            let end = self.step(b);
            if !self.passing && !end && prefix.len() + (i - start) > self.max_bytes {
                // Too large to be held: it goes on.
                self.passing = true;
            }
            if self.passing && !prefix.is_empty() {
                out.append(&mut prefix);
            }
            if !end {
                continue;
            }
            let part = chunk.get(start..i).unwrap_or_default();
            let withhold = !self.passing && {
                if prefix.is_empty() {
                    is_usage_event(part)
                } else {
                    prefix.extend_from_slice(part);
                    is_usage_event(&prefix)
                }
            };
            if withhold {
                self.withheld += 1;
                changed = true;
            } else if prefix.is_empty() {
                out.extend_from_slice(part);
            } else {
                out.append(&mut prefix);
            }
            prefix.clear();
            start = i;
            self.passing = false;
            self.scan = Scan::default();
        }
        let rest = chunk.get(start..).unwrap_or_default();
        if self.passing {
            out.append(&mut prefix);
            out.extend_from_slice(rest);
        } else {
            prefix.extend_from_slice(rest);
            changed |= !prefix.is_empty();
            self.held = prefix;
        }
        changed.then_some(out)
    }

    /// The end of the body: the partial event still held goes on (a client drops an event
    /// the stream ends in).
    pub fn finish(&mut self) -> Vec<u8> {
        self.passing = false;
        self.line = Line::Start;
        self.scan = Scan::default();
        std::mem::take(&mut self.held)
    }

    /// Takes one byte of the stream: follows the line and, while the event may be the usage
    /// event, its data. Returns whether the byte ends the event (the `\n` of a blank line).
    fn step(&mut self, b: u8) -> bool {
        const DATA: &[u8] = b"data:";
        let candidate = !self.passing;
        let mut rule_out = false;
        let (line, end) = match (self.line, b) {
            (Line::Start | Line::Cr, b'\n') => (Line::Start, true),
            (line, b'\n') => {
                match line {
                    Line::Data | Line::DataStart => rule_out = candidate && !self.scan.feed(b),
                    Line::Name(_) => rule_out = true,
                    _ => {}
                }
                (Line::Start, false)
            }
            (Line::Start, b'\r') => (Line::Cr, false),
            (Line::Start, b'd') => (Line::Name(1), false),
            (Line::Name(n), b) if DATA.get(n) == Some(&b) => {
                if n + 1 == DATA.len() {
                    (Line::DataStart, false)
                } else {
                    (Line::Name(n + 1), false)
                }
            }
            (Line::DataStart, b' ') => (Line::Data, false),
            (Line::DataStart | Line::Data, b) => {
                rule_out = candidate && !self.scan.feed(b);
                (Line::Data, false)
            }
            // Another field, a comment, a lone `\r`: not the usage event.
            _ => {
                rule_out = true;
                (Line::Other, false)
            }
        };
        self.line = line;
        if rule_out {
            self.passing = true;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    /// What the client gets when `body` arrives in the chunks `cuts` make.
    fn through(body: &[u8], cuts: &[usize], max: usize) -> (Vec<u8>, usize) {
        let mut w = UsageEventWithholder::new(max);
        let mut got = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&body.len())) {
            let chunk = &body[at..cut];
            match w.chunk(chunk) {
                Some(out) => got.extend_from_slice(&out),
                None => got.extend_from_slice(chunk),
            }
            at = cut;
        }
        got.extend_from_slice(&w.finish());
        (got, w.withheld())
    }

    fn crlf(s: &str) -> String {
        s.replace('\n', "\r\n")
    }

    #[test]
    fn the_usage_event_is_withheld_at_every_split_lf_and_crlf_with_and_without_space() {
        let lf = format!("{CONTENT}{CONTENT}{USAGE}{DONE}");
        let want_lf = format!("{CONTENT}{CONTENT}{DONE}");
        let nospace = lf.replace("data: ", "data:");
        let want_nospace = want_lf.replace("data: ", "data:");
        for (body, want) in [
            (crlf(&lf), crlf(&want_lf)),
            (lf, want_lf),
            (crlf(&nospace), crlf(&want_nospace)),
            (nospace, want_nospace),
        ] {
            for cut in 0..=body.len() {
                let (got, n) = through(body.as_bytes(), &[cut], 1 << 20);
                assert_eq!(String::from_utf8_lossy(&got), want, "cut at {cut}");
                assert_eq!(n, 1);
            }
            // Two cuts, every pair around the usage event.
            let usage_at = body
                .find("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],")
                .or_else(|| {
                    body.find(
                        "data:{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],",
                    )
                })
                .unwrap();
            for a in usage_at.saturating_sub(3)..body.len() {
                for b in a..=body.len() {
                    let (got, _) = through(body.as_bytes(), &[a, b], 1 << 20);
                    assert_eq!(String::from_utf8_lossy(&got), want, "cuts {a} {b}");
                }
            }
        }
    }

    #[test]
    fn other_events_go_on_at_once() {
        let mut w = UsageEventWithholder::new(1 << 20);
        // Whole events, no usage event: the chunk as it is.
        assert_eq!(w.chunk(format!("{CONTENT}{CONTENT}").as_bytes()), None);
        // A content chunk cut after its choices opened: ruled out, it goes on at once.
        let cut = CONTENT.find("[{").unwrap() + 2;
        assert_eq!(w.chunk(&CONTENT.as_bytes()[..cut]), None);
        assert_eq!(w.chunk(&CONTENT.as_bytes()[cut..]), None);
        // `[DONE]` is not held, nor a comment, nor an event with another field.
        assert_eq!(w.chunk(b"data: [DO"), None);
        assert_eq!(w.chunk(b"NE]\n\n: keep"), None);
        assert_eq!(w.chunk(b"alive\n\nevent: x\ndata: {\"choices\":[],"), None);
        assert_eq!(w.chunk(b"\"usage\":{}}\n\n"), None);
        // A partial event that may be the usage event is held, then goes on once it is not.
        assert_eq!(w.chunk(b"data: {\"id\":1,"), Some(Vec::new()));
        assert_eq!(
            w.chunk(b"\"choices\":[],\"x\":1}\n\n"),
            Some(b"data: {\"id\":1,\"choices\":[],\"x\":1}\n\n".to_vec())
        );
        assert_eq!(w.withheld(), 0);
    }

    #[test]
    fn usage_on_a_chunk_with_choices_goes_on() {
        let last = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n";
        let body = format!("{CONTENT}{last}{DONE}");
        for cut in 0..=body.len() {
            assert_eq!(
                through(body.as_bytes(), &[cut], 1 << 20),
                (body.clone().into_bytes(), 0)
            );
        }
        // `choices` inside a nested object or a string is not the top-level one.
        let nested = "data: {\"x\":{\"choices\":[{}]},\"s\":\"\\\"choices\\\":[1]\",\"choices\":[ ],\"usage\":{\"total_tokens\":1}}\n\n";
        for cut in 0..=nested.len() {
            assert_eq!(
                through(nested.as_bytes(), &[cut], 1 << 20),
                (Vec::new(), 1),
                "cut {cut}"
            );
        }
        // No usage, or a usage that is not an object: not withheld.
        for event in [
            "data: {\"choices\":[]}\n\n",
            "data: {\"choices\":[],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{}\n\n",
        ] {
            assert_eq!(
                through(event.as_bytes(), &[3], 1 << 20),
                (event.as_bytes().to_vec(), 0)
            );
        }
    }

    #[test]
    fn a_usage_event_over_the_bound_goes_on_and_an_unfinished_one_at_the_end() {
        let body = format!("{CONTENT}{USAGE}{DONE}");
        for cut in 0..=body.len() {
            let (got, n) = through(body.as_bytes(), &[cut], 40);
            // Held at most 40 bytes: the usage event (longer) may go on when cut.
            assert!(n <= 1);
            if n == 0 {
                assert_eq!(got, body.as_bytes());
            }
        }
        let (got, n) = through(USAGE.trim_end().as_bytes(), &[10], 1 << 20);
        assert_eq!((got, n), (USAGE.trim_end().as_bytes().to_vec(), 0));
    }

    #[test]
    fn multi_line_data_is_joined() {
        let event = "data: {\"choices\":[],\ndata: \"usage\":{\"total_tokens\":3}}\r\n\r\n";
        assert!(is_usage_event(event.as_bytes()));
        for cut in 0..=event.len() {
            assert_eq!(through(event.as_bytes(), &[cut], 1 << 20), (Vec::new(), 1));
        }
    }

    #[test]
    fn real_llama_server_capture() {
        // Real bytes from llama.cpp's `llama-server` (the samples folder beside the repository;
        // skipped when it is not there): its usage chunk has `"choices":[]` and more fields.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/samples/llama-server/chat-stream-include-usage.sse"
        );
        let Ok(body) = std::fs::read(path) else {
            return;
        };
        let text = String::from_utf8_lossy(&body).into_owned();
        let at = text.find("data: {\"choices\":[],").unwrap();
        let end = at + text[at..].find("\n\n").unwrap() + 2;
        let want = format!("{}{}", &text[..at], &text[end..]);
        for size in [1, 7, 64, 4096] {
            let cuts: Vec<usize> = (size..body.len()).step_by(size).collect();
            let (got, n) = through(&body, &cuts, 1 << 16);
            assert_eq!(
                (String::from_utf8_lossy(&got).into_owned(), n),
                (want.clone(), 1)
            );
        }
    }

    #[test]
    fn random_bytes_never_panic_and_lose_nothing_but_usage_events() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = b"data: {}[]\"choices:usage,\r\n\\x";
        for _ in 0..500 {
            let mut body = Vec::new();
            for _ in 0..200 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let cut = (seed % 200) as usize;
            let (got, n) = through(&body, &[cut], 64);
            if n == 0 {
                assert_eq!(got, body);
            }
        }
    }
}
