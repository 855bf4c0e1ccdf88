//! Helpers shared by the fuzz targets (each target includes this file as `mod common`).
#![allow(dead_code)]

/// The filter's own mock host: properties by dotted path (in Envoy's encoding), request
/// headers, and the request body as JSON.
#[allow(unused_imports)]
pub use token_ratelimit::filter::MockHost as MapHost;

/// Splits `body` at `cuts` (positions taken modulo the length, sorted): the chunks a filter
/// would be handed.
pub fn chunks<'a>(body: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| if body.is_empty() { 0 } else { c as usize % (body.len() + 1) })
        .collect();
    at.sort_unstable();
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut start = 0;
    for p in at {
        out.push(&body[start..p]);
        start = p;
    }
    out.push(&body[start..]);
    out
}

/// Reads the cut points at the head of a raw input: one byte `n` (how many, at most 15), then
/// `n` little-endian u16s. Returns the cuts and the rest.
pub fn split_cuts(data: &[u8]) -> (Vec<u16>, &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let mut cuts = Vec::new();
    for _ in 0..(n & 0x0f) {
        if rest.len() < 2 {
            break;
        }
        cuts.push(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    (cuts, rest)
}
