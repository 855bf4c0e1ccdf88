//! The proxy-wasm encodings the host calls exchange, pure and bounds-checked: header maps
//! ("pairs") and property paths. Compiled natively too, for its tests.

/// A header map in the proxy-wasm encoding: `[u32 count][count × (u32 key length, u32 value
/// length)]`, then for each pair its key, a NUL, its value, a NUL (integers little-endian).
pub(crate) fn encode_pairs<'a>(
    pairs: impl Iterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Vec<u8> {
    let (count, size) = pairs.clone().fold((0u32, 4usize), |(n, size), (k, v)| {
        (
            n.saturating_add(1),
            size.saturating_add(10)
                .saturating_add(k.len())
                .saturating_add(v.len()),
        )
    });
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&len32(k.len()).to_le_bytes());
        out.extend_from_slice(&len32(v.len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a header map in the proxy-wasm encoding (see [`encode_pairs`]); `None` when the
/// bytes are malformed (a length past the end, a missing NUL). No bytes at all is an empty map.
/// Names that are not UTF-8 have their invalid bytes replaced by U+FFFD.
pub(crate) fn decode_pairs(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = usize::try_from(read_u32(bytes, 0)?).ok()?;
    // Every pair takes at least 10 bytes: a bigger count cannot be honest (and must not size
    // the allocation below).
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    if count.checked_mul(10)?.checked_add(4)? > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for n in 0..count {
        let sizes = n.checked_mul(8)?.checked_add(4)?;
        let key_len = usize::try_from(read_u32(bytes, sizes)?).ok()?;
        let value_len = usize::try_from(read_u32(bytes, sizes.checked_add(4)?)?).ok()?;
        let (key, next) = terminated(bytes, data, key_len)?;
        let (value, next) = terminated(bytes, next, value_len)?;
        data = next;
        pairs.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
    }
    Some(pairs)
}

/// The `len` bytes at `at` followed by a NUL, and the offset past that NUL.
fn terminated(bytes: &[u8], at: usize, len: usize) -> Option<(&[u8], usize)> {
    let end = at.checked_add(len)?;
    let field = bytes.get(at..end)?;
    (*bytes.get(end)? == 0).then_some((field, end.checked_add(1)?))
}

/// The little-endian `u32` at `at`.
fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(b).ok()?))
}

/// A property path in the proxy-wasm encoding: its segments separated by NULs.
pub(crate) fn encode_path(path: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        path.iter()
            .map(|s| s.len())
            .fold(path.len(), usize::saturating_add),
    );
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(segment.as_bytes());
    }
    out
}

/// A length as the ABI's `u32` (a wasm32 `usize` always fits).
pub(crate) fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn pairs_round_trip() {
        let map = [(":path", "/v1/chat"), ("x-empty", ""), ("", "no name")];
        let bytes = encode_pairs(map.iter().map(|(k, v)| (*k, v.as_bytes())));
        assert_eq!(&bytes[..4], &[3, 0, 0, 0]);
        assert_eq!(decode_pairs(&bytes), Some(pairs(&map)));
    }

    #[test]
    fn the_encoding_is_the_abis() {
        let bytes = encode_pairs([("ab", &b"c"[..])].into_iter());
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, b'a', b'b', 0, b'c', 0]
        );
        assert_eq!(encode_pairs(std::iter::empty()), [0, 0, 0, 0]);
    }

    #[test]
    fn no_bytes_is_an_empty_map() {
        assert_eq!(decode_pairs(&[]), Some(Vec::new()));
        assert_eq!(decode_pairs(&[0, 0, 0, 0]), Some(Vec::new()));
    }

    #[test]
    fn every_truncation_and_corruption_reads_as_absent() {
        let map = [("content-type", "application/json"), ("x", "y")];
        let bytes = encode_pairs(map.iter().map(|(k, v)| (*k, v.as_bytes())));
        for len in 1..bytes.len() {
            assert_eq!(decode_pairs(&bytes[..len]), None, "truncated to {len}");
        }
        // A missing NUL.
        let mut b = bytes.clone();
        let last = b.len() - 1;
        b[last] = b'!';
        assert_eq!(decode_pairs(&b), None);
        // Lengths past the end, and a count that cannot fit.
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&b), None);
        let mut b = bytes;
        b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&b), None);
        assert_eq!(decode_pairs(&[1, 0, 0]), None);
    }

    #[test]
    fn names_that_are_not_utf8_are_replaced() {
        let bytes = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0, 0xfe, 0];
        assert_eq!(
            decode_pairs(&bytes),
            Some(vec![("\u{fffd}".to_string(), vec![0xfe])])
        );
    }

    #[test]
    fn paths_are_nul_separated() {
        assert_eq!(encode_path(&["request", "path"]), b"request\0path");
        assert_eq!(encode_path(&["a"]), b"a");
        assert_eq!(encode_path(&[]), b"");
    }
}
