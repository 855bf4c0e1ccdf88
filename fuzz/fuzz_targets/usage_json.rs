//! The JSON usage extractor and the response decoders.
//!
//! Input: one byte whose low nibble is the number of cut points and whose high nibble holds
//! flags (bit 0: custom usage paths, bit 1: a small bound, bits 2-3: the format tried with the
//! encodings), the cut points (u16 LE each), then the response body.
//!
//! Checked, besides "never panics":
//! - `read_document` for every format, `usage::from_json`;
//! - the extractor (JSON framing, identity) finds the same usage however the body is cut;
//! - gzip, deflate and br decoders fed the raw bytes (garbage, mostly) never panic;
//! - the body compressed with gzip, deflate and br, cut at the same points, yields what the
//!   identity body yields, and the same decoded byte count (when nothing overflowed).
#![no_main]

mod common;

use common::{chunks, split_cuts};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use token_ratelimit::config::TokenCategory;
use token_ratelimit::usage::{self, BodyFormat, Encoding, Format, Usage, UsageExtractor, UsagePaths};

const FORMATS: [Format; 5] = [Format::OpenAi, Format::Responses, Format::Anthropic, Format::Gemini, Format::Unknown];

#[derive(Debug, PartialEq)]
struct Outcome {
    usage: Option<Usage>,
    overflowed: bool,
    body_bytes: u64,
    /// The text estimate: the same however the body is split or encoded.
    text_tokens: u64,
    /// The model named: the same however the body is split or encoded.
    model: Option<String>,
}

fn run(format: Format, encoding: Encoding, paths: &UsagePaths, max: usize, parts: &[&[u8]]) -> Outcome {
    let mut x = UsageExtractor::new(format, BodyFormat::Json, encoding, paths.clone(), max);
    for p in parts {
        x.feed(p);
    }
    let usage = x.finish();
    if let Some(u) = usage {
        for c in [TokenCategory::Total, TokenCategory::Prompt, TokenCategory::Completion] {
            let _ = u.tokens(c);
        }
    }
    let model = x.model().map(str::to_owned);
    if let Some(m) = &model {
        assert!(!m.is_empty() && m.len() <= usage::MODEL_MAX_BYTES, "model {m:?}");
    }
    Outcome { usage, overflowed: x.overflowed(), body_bytes: x.body_bytes(), text_tokens: x.text_tokens(), model }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

fn zlib(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

fn brotli(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = brotli::CompressorWriter::new(&mut out, 4096, 1, 22);
        e.write_all(body).unwrap();
    }
    out
}

fn paths(custom: bool) -> UsagePaths {
    if custom {
        UsagePaths::new(
            vec!["/meta/input_tokens".into(), "/usage/prompt_tokens".into()],
            vec!["/meta/output_tokens".into(), "/a~1b/0/c~0d".into()],
            vec!["/meta/total".into()],
        )
        .and_then(|p| {
            p.with_reported(
                vec!["/meta/cached".into(), "/usage/prompt_tokens_details/cached_tokens".into()],
                vec!["/meta/cache_write".into()],
                vec!["/meta/reasoning".into()],
            )
        })
        .expect("valid pointers")
    } else {
        UsagePaths::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0) >> 4;
    let (cuts, body) = split_cuts(data);
    let paths = paths(flags & 1 != 0);
    let max = if flags & 2 != 0 { 64 } else { 1 << 20 };
    let format = FORMATS[(flags >> 2) as usize % FORMATS.len()];

    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) {
        for f in FORMATS {
            let _ = usage::read_document(f, &paths, &doc);
        }
    }
    let _ = usage::from_json(body);

    let parts = chunks(body, &cuts);
    let mut identity = None;
    for f in FORMATS {
        let whole = run(f, Encoding::Identity, &paths, max, &[body]);
        let cut = run(f, Encoding::Identity, &paths, max, &parts);
        assert_eq!(whole, cut, "{f:?}: cutting the body changed the outcome");
        assert_eq!(whole.body_bytes, body.len() as u64);
        if f == format {
            identity = Some(whole);
        }
    }
    let identity = identity.unwrap();

    // Garbage (or whatever the input is) claimed to be compressed.
    for enc in [Encoding::Gzip, Encoding::Deflate, Encoding::Brotli, Encoding::Unsupported] {
        let _ = run(format, enc, &paths, max, &parts);
    }

    // The body really compressed: the decompressed copy must give what the plain body gives.
    for (enc, compressed) in [(Encoding::Gzip, gzip(body)), (Encoding::Deflate, zlib(body)), (Encoding::Brotli, brotli(body))] {
        let got = run(format, enc, &paths, max, &chunks(&compressed, &cuts));
        if !identity.overflowed {
            assert_eq!(got, identity, "{enc:?} differs from identity");
        } else {
            assert_eq!(got.usage, None);
            assert_eq!(got.model, None);
        }
    }
});
