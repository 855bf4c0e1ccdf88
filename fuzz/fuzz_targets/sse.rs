//! The server-sent events parser of the usage extractor.
//!
//! Input: one byte whose low nibble is the number of cut points and whose high nibble holds
//! flags (bit 0: a small bound; bit 1: the first line of the rest is a list of custom JSON
//! pointers, separated by spaces, dealt to prompt, completion, total, cached, cache write and
//! reasoning in turn), the cut
//! points (u16 LE each), then the event stream.
//!
//! Checked, besides "never panics", for every format:
//! - the same usage and model however the stream is cut into chunks (when nothing overflowed);
//! - the same usage and model with LF or CRLF line ends (for streams without a CR of their own);
//! - a model is never empty nor longer than `MODEL_MAX_BYTES`.
#![no_main]

mod common;

use common::{chunks, split_cuts};
use libfuzzer_sys::fuzz_target;
use token_ratelimit::config::TokenCategory;
use token_ratelimit::usage::{BodyFormat, Encoding, Format, Usage, UsageExtractor, UsagePaths, MODEL_MAX_BYTES};

const FORMATS: [Format; 5] = [Format::OpenAi, Format::Responses, Format::Anthropic, Format::Gemini, Format::Unknown];

/// The usage and model found, whether something overflowed, the bytes seen.
type Outcome = ((Option<Usage>, Option<String>), bool, u64);

fn run(format: Format, paths: &UsagePaths, max: usize, parts: &[&[u8]]) -> Outcome {
    let mut x = UsageExtractor::new(format, BodyFormat::EventStream, Encoding::Identity, paths.clone(), max);
    for p in parts {
        x.feed(p);
    }
    let usage = x.finish();
    if let Some(u) = usage {
        for c in [TokenCategory::Total, TokenCategory::Prompt, TokenCategory::Completion] {
            let _ = u.tokens(c);
        }
    }
    // A second finish (end of stream, then on_log) must not panic either.
    let _ = x.finish();
    let model = x.model().map(str::to_owned);
    if let Some(m) = &model {
        assert!(!m.is_empty() && m.len() <= MODEL_MAX_BYTES, "model {m:?}");
    }
    ((usage, model), x.overflowed(), x.body_bytes())
}

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0) >> 4;
    let (cuts, mut body) = split_cuts(data);
    let max = if flags & 1 != 0 { 48 } else { 1 << 20 };
    let mut paths = UsagePaths::default();
    if flags & 2 != 0 {
        let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
        let line = String::from_utf8_lossy(&body[..end]).into_owned();
        body = body.get(end + 1..).unwrap_or(&[]);
        let mut lists: [Vec<String>; 6] = Default::default();
        for (i, p) in line.split(' ').filter(|p| !p.is_empty()).enumerate() {
            lists[i % 6].push(p.to_string());
        }
        let [prompt, completion, total, cached, cache_write, reasoning] = lists;
        match UsagePaths::new(prompt, completion, total).and_then(|p| p.with_reported(cached, cache_write, reasoning)) {
            Ok(p) => paths = p,
            Err(e) => assert!(e.contains("JSON pointer"), "{e}"),
        }
    }

    let parts = chunks(body, &cuts);
    let crlf: Option<Vec<u8>> = (!body.contains(&b'\r')).then(|| {
        let mut out = Vec::with_capacity(body.len() * 2);
        for &b in body {
            if b == b'\n' {
                out.push(b'\r');
            }
            out.push(b);
        }
        out
    });
    for f in FORMATS {
        let whole = run(f, &paths, max, &[body]);
        let cut = run(f, &paths, max, &parts);
        assert_eq!(whole.2, body.len() as u64);
        if !whole.1 && !cut.1 {
            assert_eq!(whole.0, cut.0, "{f:?}: cutting the stream changed the usage or model");
        }
        if let Some(crlf) = &crlf {
            let other = run(f, &paths, max, &chunks(crlf, &cuts));
            if !whole.1 && !other.1 {
                assert_eq!(whole.0, other.0, "{f:?}: CRLF line ends changed the usage or model");
            }
        }
    }
});
