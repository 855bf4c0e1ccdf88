//! Counters known to be spent, shared by every worker's VM of one proxy (checkReport mode).
//!
//! A request whose check said `limit_remaining = r` and that spent `t >= r` leaves its counters
//! at or over their limit once its report lands: the service refuses them until the window
//! resets. Between that moment and the report's arrival, a check on another worker would still
//! pass; a mark in the proxy's shared data (`proxy_set_shared_data`), keyed by a hash of the
//! check request's bytes (domain and descriptor), lets every worker refuse at once. The value
//! is 8 bytes of the window's end (Unix seconds, little-endian), the check request's length
//! (4 bytes, little-endian) and bytes, then the encoded `DescriptorStatus` that names the
//! limit. Marks are never removed (the ABI has no removal);
//! an expired one is ignored, and one is written per spent counter and window.

use super::Host;
use prost::Message;
use ratelimit_proto::DescriptorStatus;

/// Marks the counters of the check request `key` (see [`key`]) spent until `status`'s window
/// resets, when `spent` (the request's fewest tokens in any category it reports) reached what
/// `status` said remained. Nothing is marked without a reset time.
pub(crate) fn mark(
    host: &mut impl Host,
    key: &str,
    check: &[u8],
    status: &DescriptorStatus,
    spent: u64,
) {
    if u64::from(status.limit_remaining) > spent {
        return;
    }
    let reset = status
        .duration_until_reset
        .as_ref()
        .map_or(0, |d| u64::try_from(d.seconds).unwrap_or(0));
    if reset == 0 {
        return;
    }
    let Ok(len) = u32::try_from(check.len()) else {
        return;
    };
    let mut value = unix_secs(host).saturating_add(reset).to_le_bytes().to_vec();
    value.extend_from_slice(&len.to_le_bytes());
    value.extend_from_slice(check);
    value.extend_from_slice(&status.encode_to_vec());
    host.set_shared_data(key, &value);
}

/// The shared-data key of a check request's counters: `token_ratelimit.spent.` and the
/// 64-bit FNV-1a hash of the request's bytes (domain and descriptor) in hex. The mark stores
/// the bytes themselves, so a hash collision never refuses another counter.
pub(crate) fn key(check: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in check {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut key = String::with_capacity(38);
    key.push_str("token_ratelimit.spent.");
    for shift in (0..16).rev() {
        let nibble = (hash >> (shift * 4)) & 0xf;
        key.push(char::from(HEX[nibble as usize]));
    }
    key
}

/// Seconds since the Unix epoch, by the proxy's clock.
fn unix_secs(host: &mut impl Host) -> u64 {
    host.now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status a still-running mark of the check request `check` carries at `key` (see
/// [`mark`]): its `duration_until_reset` becomes the time left. `None`: no mark, a mark of
/// other counters (a hash collision), or one whose window ended.
pub(crate) fn status(host: &mut impl Host, key: &str, check: &[u8]) -> Option<DescriptorStatus> {
    let value = host.shared_data(key)?;
    let (end, rest) = value.split_at_checked(8)?;
    let end = u64::from_le_bytes(end.try_into().ok()?);
    let (len, rest) = rest.split_at_checked(4)?;
    let len = usize::try_from(u32::from_le_bytes(len.try_into().ok()?)).ok()?;
    let (marked, status) = rest.split_at_checked(len)?;
    if marked != check {
        return None;
    }
    let now = unix_secs(host);
    if end <= now {
        return None;
    }
    let mut status = DescriptorStatus::decode(status).ok()?;
    status.duration_until_reset = Some(prost_types::Duration {
        seconds: i64::try_from(end - now).unwrap_or(i64::MAX),
        nanos: 0,
    });
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::MockHost;

    fn status_resetting_in(seconds: i64) -> DescriptorStatus {
        DescriptorStatus {
            limit_remaining: 5,
            duration_until_reset: Some(prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn a_mark_refuses_only_the_counters_it_names_until_the_window_ends() {
        let mut host = MockHost::default();
        let key = key(b"counters of alice");
        mark(
            &mut host,
            &key,
            b"counters of alice",
            &status_resetting_in(30),
            5,
        );
        let s = status(&mut host, &key, b"counters of alice").unwrap();
        assert_eq!(s.duration_until_reset.map(|d| d.seconds), Some(30));
        // The same key for other bytes (a hash collision) is not a mark of them.
        assert_eq!(status(&mut host, &key, b"counters of bob"), None);
        host.now += std::time::Duration::from_secs(30);
        assert_eq!(status(&mut host, &key, b"counters of alice"), None);
    }

    #[test]
    fn nothing_is_marked_while_budget_remains_or_without_a_reset_time() {
        let mut host = MockHost::default();
        mark(&mut host, "k", b"c", &status_resetting_in(30), 4);
        mark(&mut host, "k", b"c", &status_resetting_in(0), 9);
        assert!(host.shared.is_empty());
        // A truncated or foreign value reads as no mark.
        host.shared.insert("k".into(), vec![1, 2, 3]);
        assert_eq!(status(&mut host, "k", b"c"), None);
    }

    #[test]
    fn keys_differ_for_different_counters_and_are_short() {
        assert_ne!(key(b"a"), key(b"b"));
        assert_eq!(key(b"a"), key(b"a"));
        assert_eq!(key(&[0u8; 500]).len(), 38);
    }
}
