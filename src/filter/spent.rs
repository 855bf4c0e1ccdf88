//! Counters known to be spent, shared by every worker's VM of one proxy (checkReport mode).
//!
//! A request whose check said `limit_remaining = r` and that spent `t >= r` leaves its counters
//! at or over their limit once its report lands: the service refuses them until the window
//! resets. Between that moment and the report's arrival, a check on another worker would still
//! pass; a mark in the proxy's shared data (`proxy_set_shared_data`), keyed by the check
//! request's bytes (domain and descriptor), lets every worker refuse at once. The value is
//! 8 bytes of the window's end (Unix seconds, little-endian), then the encoded
//! `DescriptorStatus` that names the limit. Marks are never removed (the ABI has no removal);
//! an expired one is ignored, and one is written per spent counter and window.

use super::Host;
use prost::Message;
use ratelimit_proto::DescriptorStatus;

/// Marks the counters of the check request `key` (see [`key`]) spent until `status`'s window
/// resets, when `spent` (the request's fewest tokens in any category it reports) reached what
/// `status` said remained. Nothing is marked without a reset time.
pub(crate) fn mark(host: &mut impl Host, key: &str, status: &DescriptorStatus, spent: u64) {
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
    let mut value = unix_secs(host).saturating_add(reset).to_le_bytes().to_vec();
    value.extend_from_slice(&status.encode_to_vec());
    host.set_shared_data(key, &value);
}

/// The shared-data key of a check request's counters: `token_ratelimit.spent.` and the
/// request's bytes (domain and descriptor) in hex.
pub(crate) fn key(check: &[u8]) -> String {
    use std::fmt::Write;
    let mut key = String::with_capacity(22 + check.len() * 2);
    key.push_str("token_ratelimit.spent.");
    for b in check {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// Seconds since the Unix epoch, by the proxy's clock.
fn unix_secs(host: &mut impl Host) -> u64 {
    host.now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status a still-running mark at `key` carries (see [`mark`]):
/// 8 bytes of the window's end (Unix seconds, little-endian), then the encoded status; its
/// `duration_until_reset` becomes the time left. `None`: no mark, or one whose window ended.
pub(crate) fn status(host: &mut impl Host, key: &str) -> Option<DescriptorStatus> {
    let value = host.shared_data(key)?;
    let (end, status) = value.split_at_checked(8)?;
    let end = u64::from_le_bytes(end.try_into().ok()?);
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
