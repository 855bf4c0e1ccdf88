//! Response compression (`--compress`, `x-simulator-compress`): gzip, br or deflate chosen
//! from the request's `accept-encoding`. Streamed bodies are flushed after every chunk the
//! handler writes (one SSE event, or one element of a Gemini JSON array), so a client can
//! decode each event as it arrives.

use std::io::Write;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;

use crate::{header_str, HEADER_COMPRESS};

/// A content coding the simulator can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `gzip` (also accepted as `x-gzip`).
    Gzip,
    /// `br` (Brotli).
    Brotli,
    /// `deflate` (the zlib format, RFC 1950, as HTTP defines it).
    Deflate,
}

impl Encoding {
    /// Preference order when several are equally acceptable.
    const PREFERENCE: [Encoding; 3] = [Encoding::Gzip, Encoding::Brotli, Encoding::Deflate];

    /// The `content-encoding` token.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
            Encoding::Deflate => "deflate",
        }
    }
}

/// The coding to use for an `accept-encoding` value: the acceptable one (q > 0) with the
/// highest q, ties going to gzip, then br, then deflate. `*` stands for the codings not
/// named. `None` when none is acceptable (e.g. `identity` only).
pub fn negotiate(accept_encoding: &str) -> Option<Encoding> {
    let mut named: [Option<f32>; 3] = [None; 3];
    let mut wildcard: Option<f32> = None;
    for item in accept_encoding.split(',') {
        let mut params = item.split(';');
        let name = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0_f32;
        for p in params {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
        }
        let slot = match name.as_str() {
            "gzip" | "x-gzip" => 0,
            "br" => 1,
            "deflate" => 2,
            "*" => {
                wildcard = Some(q);
                continue;
            }
            _ => continue,
        };
        named[slot] = Some(q);
    }
    let mut best: Option<(Encoding, f32)> = None;
    for (slot, enc) in Encoding::PREFERENCE.iter().enumerate() {
        let q = named[slot].or(wildcard).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((*enc, q));
        }
    }
    best.map(|(e, _)| e)
}

/// A streaming compressor that hands out its output after every flushed chunk.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(encoding: Encoding) -> Self {
        let level = flate2::Compression::default();
        match encoding {
            Encoding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            Encoding::Deflate => {
                Encoder::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level))
            }
            // quality 5, window 2^22: a common setting for dynamic content.
            Encoding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
        }
    }

    /// Compresses `data` and sync-flushes, returning everything produced so far.
    fn push(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let out = match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                e.get_mut()
            }
            Encoder::Deflate(e) => {
                e.write_all(data)?;
                e.flush()?;
                e.get_mut()
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                e.flush()?;
                e.get_mut()
            }
        };
        Ok(std::mem::take(out))
    }

    /// Ends the compressed stream, returning its last bytes.
    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Deflate(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
        }
    }
}

/// Whether `x-simulator-compress` turns compression on or off for this request (`None`:
/// absent or not a boolean, the `--compress` default applies).
fn header_choice(req: &Request) -> Option<bool> {
    let v = header_str(req.headers(), HEADER_COMPRESS)?;
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// The middleware: compresses the answer when enabled (by `--compress` or the header) and the
/// client's `accept-encoding` allows a coding.
pub(crate) async fn middleware(
    State(default_on): State<bool>,
    req: Request,
    next: Next,
) -> Response {
    let on = header_choice(&req).unwrap_or(default_on);
    let encoding = if on {
        req.headers()
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .and_then(negotiate)
    } else {
        None
    };
    let resp = next.run(req).await;
    match encoding {
        Some(enc) => compress(resp, enc).await,
        None => resp,
    }
}

async fn compress(resp: Response, encoding: Encoding) -> Response {
    let (mut parts, body) = resp.into_parts();
    if parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
        || parts.headers.contains_key(header::CONTENT_ENCODING)
    {
        return Response::from_parts(parts, body);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.as_str()),
    );
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    let mut encoder = Encoder::new(encoding);

    if body.size_hint().exact().is_some() {
        // A whole body (JSON): compress it in one go, so it keeps a content-length.
        let whole = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(b) => b,
            Err(e) => {
                return Response::from_parts(
                    parts,
                    Body::from_stream(futures_util::stream::once(
                        async move { Err::<Bytes, _>(e) },
                    )),
                )
            }
        };
        let compressed = encoder.push(&whole).and_then(|mut out| {
            out.extend(encoder.finish()?);
            Ok(out)
        });
        return match compressed {
            Ok(out) => Response::from_parts(parts, Body::from(out)),
            Err(e) => Response::from_parts(
                parts,
                Body::from_stream(futures_util::stream::once(
                    async move { Err::<Bytes, _>(e) },
                )),
            ),
        };
    }

    // A stream: one compressed, flushed chunk per chunk of the handler; an error of the
    // handler's stream (e.g. a simulated abort) is passed on without ending the compressed
    // stream, so the connection is dropped the same way.
    let chunks = body.into_data_stream();
    let stream = futures_util::stream::unfold(Some((chunks, encoder)), |state| async move {
        let (mut chunks, mut encoder) = state?;
        loop {
            match chunks.next().await {
                Some(Ok(chunk)) => match encoder.push(&chunk) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Some((Ok(Bytes::from(out)), Some((chunks, encoder)))),
                    Err(e) => return Some((Err(e), None)),
                },
                Some(Err(e)) => return Some((Err(std::io::Error::other(e)), None)),
                None => return Some((encoder.finish().map(Bytes::from), None)),
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate("gzip"), Some(Encoding::Gzip));
        assert_eq!(negotiate("gzip, deflate, br"), Some(Encoding::Gzip));
        assert_eq!(negotiate("br;q=1.0, gzip;q=0.8"), Some(Encoding::Brotli));
        assert_eq!(negotiate("deflate"), Some(Encoding::Deflate));
        assert_eq!(negotiate("x-gzip"), Some(Encoding::Gzip));
        assert_eq!(negotiate("gzip;q=0, deflate"), Some(Encoding::Deflate));
        assert_eq!(negotiate("*"), Some(Encoding::Gzip));
        assert_eq!(negotiate("gzip;q=0, *;q=0.5"), Some(Encoding::Brotli));
        assert_eq!(negotiate("identity"), None);
        assert_eq!(negotiate(""), None);
        assert_eq!(negotiate("*;q=0"), None);
    }

    #[test]
    fn encoders_round_trip_per_chunk() {
        use std::io::Read;
        for enc in Encoding::PREFERENCE {
            let mut e = Encoder::new(enc);
            let first = e.push(b"data: one\n\n").unwrap_or_default();
            assert!(!first.is_empty(), "{enc:?} flushes each chunk");
            let mut all = first;
            all.extend(e.push(b"data: two\n\n").unwrap_or_default());
            all.extend(e.finish().unwrap_or_default());
            let mut out = String::new();
            let read = match enc {
                Encoding::Gzip => flate2::read::GzDecoder::new(&all[..]).read_to_string(&mut out),
                Encoding::Deflate => {
                    flate2::read::ZlibDecoder::new(&all[..]).read_to_string(&mut out)
                }
                Encoding::Brotli => {
                    brotli::Decompressor::new(&all[..], 4096).read_to_string(&mut out)
                }
            };
            assert!(read.is_ok(), "{enc:?}: {read:?}");
            assert_eq!(out, "data: one\n\ndata: two\n\n");
        }
    }
}
