//! Content codings of a response body ([RFC 9110 §8.4](https://www.rfc-editor.org/rfc/rfc9110#section-8.4)):
//! which ones the filter reads ([`Encoding`], [`readable_accept_encoding`]) and the streaming
//! decompression of a copy of the body for the extractor (`Decoder`).

use std::io::Write;

/// A response `content-encoding`, as far as usage can be read through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No coding (`identity`, or no header).
    Identity,
    /// `gzip` or `x-gzip` ([RFC 1952](https://www.rfc-editor.org/rfc/rfc1952)); several
    /// members in a row are read as one body.
    Gzip,
    /// `deflate`: the zlib format ([RFC 1950](https://www.rfc-editor.org/rfc/rfc1950)), as
    /// HTTP defines it. A raw deflate stream, which some servers send, fails to decode.
    Deflate,
    /// `br` ([RFC 7932](https://www.rfc-editor.org/rfc/rfc7932)).
    Brotli,
    /// An encoding this filter cannot read (`zstd`, `compress`, several codings in one header,
    /// ...): no usage.
    Unsupported,
}

impl Encoding {
    /// The encoding for a `content-encoding` header value (absent: identity). Case and
    /// surrounding whitespace are ignored; anything not listed is [`Encoding::Unsupported`].
    pub fn from_header(value: Option<&str>) -> Encoding {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Encoding::Identity,
            Some("gzip") | Some("x-gzip") => Encoding::Gzip,
            Some("deflate") => Encoding::Deflate,
            Some("br") => Encoding::Brotli,
            Some(_) => Encoding::Unsupported,
        }
    }
}

/// The `accept-encoding` to send upstream for a limited request: the client's codings that
/// this filter can decompress (`gzip`, `x-gzip`, `deflate`, `br`, `identity`, case-insensitive,
/// kept as written with their q-values, joined with `", "`), or `None` when none is left (the
/// header is then removed: identity). `value` is the client's header
/// ([RFC 9110 §12.5.3](https://www.rfc-editor.org/rfc/rfc9110#section-12.5.3)).
pub fn readable_accept_encoding(value: &str) -> Option<String> {
    let kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|item| {
            let coding = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(
                coding.as_str(),
                "gzip" | "x-gzip" | "deflate" | "br" | "identity"
            )
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

/// A sink that keeps what a decoder writes, for the extractor to take.
#[derive(Default)]
pub(super) struct Sink(Vec<u8>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The streaming decompressor of one response body, per [`Encoding`]: fed the chunks as they
/// pass, it hands back what each one decodes to.
pub(super) enum Decoder {
    /// Nothing to decode: the chunks are the body.
    Identity,
    /// [`Encoding::Gzip`], every member.
    Gzip(Box<flate2::write::MultiGzDecoder<Sink>>),
    /// [`Encoding::Deflate`] (zlib).
    Deflate(Box<flate2::write::ZlibDecoder<Sink>>),
    /// [`Encoding::Brotli`].
    Brotli(Box<brotli_decompressor::DecompressorWriter<Sink>>),
    /// Undecodable: everything is dropped.
    Failed,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Identity => "Identity",
            Decoder::Gzip(_) => "Gzip",
            Decoder::Deflate(_) => "Deflate",
            Decoder::Brotli(_) => "Brotli",
            Decoder::Failed => "Failed",
        })
    }
}

impl Decoder {
    /// The decoder for a body in `encoding` ([`Decoder::Failed`] for an unsupported one).
    pub(super) fn new(encoding: Encoding) -> Decoder {
        match encoding {
            Encoding::Identity => Decoder::Identity,
            Encoding::Gzip => Decoder::Gzip(Box::new(flate2::write::MultiGzDecoder::new(
                Sink::default(),
            ))),
            Encoding::Deflate => {
                Decoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(Sink::default())))
            }
            Encoding::Brotli => Decoder::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Sink::default(), 4096),
            )),
            Encoding::Unsupported => Decoder::Failed,
        }
    }

    /// Decodes `chunk`; returns the decoded bytes (empty when nothing came out or it failed).
    /// The output of one chunk is not bounded here: the caller bounds what it keeps. A decoding
    /// error turns the decoder into [`Decoder::Failed`] for the rest of the body.
    pub(super) fn decode(&mut self, chunk: &[u8]) -> Vec<u8> {
        let result = match self {
            Decoder::Identity => return chunk.to_vec(),
            Decoder::Failed => return Vec::new(),
            Decoder::Gzip(d) => d
                .write_all(chunk)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(&mut d.get_mut().0)),
            Decoder::Deflate(d) => d
                .write_all(chunk)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(&mut d.get_mut().0)),
            Decoder::Brotli(d) => d
                .write_all(chunk)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(&mut d.get_mut().0)),
        };
        match result {
            Ok(out) => out,
            Err(_) => {
                *self = Decoder::Failed;
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{BodyFormat, Format, Usage, UsageExtractor, UsagePaths};

    fn u(p: u64, c: u64, t: Option<u64>) -> Option<Usage> {
        Some(Usage {
            prompt: Some(p),
            completion: Some(c),
            total: t,
            ..Usage::default()
        })
    }

    #[test]
    fn compressed_bodies_are_read_from_a_decompressed_copy() {
        use flate2::write::{GzEncoder, ZlibEncoder};
        let body = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(body).unwrap();
        let zl = zl.finish().unwrap();
        for (enc, bytes) in [(Encoding::Gzip, gz), (Encoding::Deflate, zl)] {
            for cut in 0..=bytes.len() {
                let mut x = UsageExtractor::new(
                    Format::OpenAi,
                    BodyFormat::Json,
                    enc,
                    UsagePaths::default(),
                    1 << 16,
                );
                x.feed(&bytes[..cut]);
                x.feed(&bytes[cut..]);
                assert_eq!(x.finish(), u(3, 4, Some(7)), "{enc:?} cut {cut}");
                assert_eq!(x.body_bytes(), body.len() as u64);
            }
        }
        // Garbage that claims to be gzip yields nothing, and never panics.
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::Json,
            Encoding::Gzip,
            UsagePaths::default(),
            1 << 16,
        );
        x.feed(b"\x1f\x8b\x08\x00garbage garbage");
        assert_eq!(x.finish(), None);
        assert!(x.overflowed());
    }

    #[test]
    fn accept_encoding_keeps_only_readable_codings() {
        assert_eq!(
            readable_accept_encoding("gzip, deflate, br, zstd"),
            Some("gzip, deflate, br".into())
        );
        assert_eq!(
            readable_accept_encoding("zstd;q=1.0, gzip;q=0.5"),
            Some("gzip;q=0.5".into())
        );
        assert_eq!(readable_accept_encoding("zstd, *"), None);
    }
}
