//! Messages of the rate-limit service API spoken by Envoy and Limitador.
//!
//! Sources (field numbers and names are taken from these protos, only the fields this project
//! uses or must round-trip are declared; unknown fields are skipped by prost on decode):
//! - `envoy/service/ratelimit/v3/rls.proto` (`RateLimitRequest`, `RateLimitResponse`),
//! - `envoy/extensions/common/ratelimit/v3/ratelimit.proto` (`RateLimitDescriptor`),
//! - `envoy/config/core/v3/base.proto` (`HeaderValue`),
//! - Limitador's `kuadrant/service/ratelimit/v1/ratelimit.proto`, whose `CheckRateLimit` and
//!   `Report` methods take and return the same two messages, and whose `Reserve` and `Commit`
//!   methods (Kuadrant's reservation protocol) take and return [`ReserveRequest`],
//!   [`ReserveResponse`], [`CommitRequest`] and [`CommitResponse`].
//!
//! Two fields are this project's extensions, not Limitador's: [`ReserveResponse::statuses`]
//! (field 3) and [`ReserveResponse::hold_ttl`] (field 4). Limitador never sends them, and a
//! client that does not know them skips them, so the messages stay wire-compatible both ways.
//!
//! The gRPC method paths are given as constants so that callers (the wasm filter, the service,
//! tests) agree on them.

/// gRPC service name of Limitador's check/report API.
pub const KUADRANT_SERVICE: &str = "kuadrant.service.ratelimit.v1.RateLimitService";
/// Method that answers whether one more hit would pass, without adding anything.
pub const CHECK_RATE_LIMIT: &str = "CheckRateLimit";
/// Method that adds `hits_addend` to the counters, even past their maximum.
pub const REPORT: &str = "Report";
/// Method that holds an estimated amount against the counters until `Commit` or expiry
/// ([`ReserveRequest`] → [`ReserveResponse`]).
pub const RESERVE: &str = "Reserve";
/// Method that adds the actual amount to the counters and releases a reservation's hold
/// ([`CommitRequest`] → [`CommitResponse`]).
pub const COMMIT: &str = "Commit";
/// gRPC service name of Envoy's own rate-limit API.
pub const ENVOY_SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// Envoy's check-and-add method (a hits_addend of 0 counts as 1).
pub const SHOULD_RATE_LIMIT: &str = "ShouldRateLimit";

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry`: one key/value pair.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`: an ordered list of entries.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    /// The domain (Limitador: namespace) the counters live in.
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// Hits to add (tokens, for this project). 0 is treated as 1 by Envoy's and Limitador's APIs.
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Unit {
    Unknown = 0,
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl Unit {
    /// The unit's length in seconds (months are 30 days, years 365), or `None` for `Unknown`.
    pub fn seconds(self) -> Option<u64> {
        match self {
            Unit::Unknown => None,
            Unit::Second => Some(1),
            Unit::Minute => Some(60),
            Unit::Hour => Some(3_600),
            Unit::Day => Some(86_400),
            Unit::Week => Some(7 * 86_400),
            Unit::Month => Some(30 * 86_400),
            Unit::Year => Some(365 * 86_400),
        }
    }

    /// The unit whose length is exactly `seconds`, if any.
    pub fn from_seconds(seconds: u64) -> Option<Unit> {
        [
            Unit::Second,
            Unit::Minute,
            Unit::Hour,
            Unit::Day,
            Unit::Week,
            Unit::Month,
            Unit::Year,
        ]
        .into_iter()
        .find(|u| u.seconds() == Some(seconds))
    }
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit`: the limit a status refers to.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<prost_types::Duration>,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
    #[prost(message, repeated, tag = "3")]
    pub response_headers_to_add: Vec<HeaderValue>,
    #[prost(message, repeated, tag = "4")]
    pub request_headers_to_add: Vec<HeaderValue>,
    #[prost(bytes = "vec", tag = "5")]
    pub raw_body: Vec<u8>,
}

/// `kuadrant.service.ratelimit.v1.ReserveRequest` (Limitador's `kuadrantrls.proto`): hold
/// `amount` against every counter the descriptors select, if it fits once the other outstanding
/// holds are counted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveRequest {
    /// The domain (Limitador: namespace) the counters live in.
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// The estimated amount (tokens) to hold.
    #[prost(uint64, tag = "3")]
    pub amount: u64,
    /// How long the hold may last before it expires by itself; the server shortens it to its
    /// own maximum and to the end of each counter's window.
    #[prost(message, optional, tag = "4")]
    pub ttl: Option<prost_types::Duration>,
}

/// `d` as a `google.protobuf.Duration`; a duration beyond `i64::MAX` seconds saturates.
pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

/// Milliseconds of a `google.protobuf.Duration` from an untrusted peer: a negative part counts
/// as 0, and the sum saturates. (Not `std::time::Duration::try_from`: its error path negates
/// the seconds, which overflows on `i64::MIN` where overflow checks are on.)
pub fn duration_ms(d: &prost_types::Duration) -> u64 {
    u64::try_from(d.seconds.max(0))
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(d.nanos.max(0)).unwrap_or(0) / 1_000_000)
}

/// `kuadrant.service.ratelimit.v1.ReserveResponse` (Limitador's `kuadrantrls.proto`), plus
/// `statuses` (field 3), this project's extension.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveResponse {
    /// `OK` (admitted, held), `OVER_LIMIT` (refused, nothing held) or `UNKNOWN`.
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    /// Set only with `OK`, and then only when something is held: pass it back to `Commit`.
    #[prost(string, tag = "2")]
    pub reservation_id: String,
    /// **Extension, not Limitador's**: one status per request descriptor, as
    /// `RateLimitResponse.statuses` carries them (most restrictive counter, its limit, what
    /// remains once the outstanding holds, this one included, are counted, and the time until
    /// its window resets). Limitador never sends this field; a client that does not know it
    /// skips it.
    #[prost(message, repeated, tag = "3")]
    pub statuses: Vec<DescriptorStatus>,
    /// **Extension, not Limitador's**: how long the hold lives from when the service answered
    /// (the request's `ttl`, shortened to the service's longest hold and to the end of every
    /// counter's window), set when something is held. Limitador never sends this field; a
    /// client that does not know it skips it.
    #[prost(message, optional, tag = "4")]
    pub hold_ttl: Option<prost_types::Duration>,
}

/// `kuadrant.service.ratelimit.v1.CommitRequest` (Limitador's `kuadrantrls.proto`): add the
/// actual amount to the counters the descriptors select and release the reservation's hold.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitRequest {
    /// The domain (Limitador: namespace) the counters live in.
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// The id a `Reserve` answered; empty when it answered none.
    #[prost(string, tag = "3")]
    pub reservation_id: String,
    /// The amount actually used (tokens), added to the counters whatever became of the hold.
    #[prost(uint64, tag = "4")]
    pub actual_amount: u64,
}

/// `kuadrant.service.ratelimit.v1.CommitResponse` (Limitador's `kuadrantrls.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitResponse {
    /// Whether a live hold with the request's id was found and released.
    #[prost(bool, tag = "1")]
    pub reservation_released: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn request_round_trips_with_envoy_field_numbers() {
        let req = RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "limit.free".into(),
                    value: "1".into(),
                }],
            }],
            hits_addend: 7,
        };
        let bytes = req.encode_to_vec();
        // field 1 (domain), length-delimited: tag byte 0x0a, length 3, "llm"
        assert_eq!(&bytes[..5], b"\x0a\x03llm");
        // field 3 (hits_addend), varint: tag byte 0x18, value 7, at the end
        assert_eq!(&bytes[bytes.len() - 2..], b"\x18\x07");
        assert_eq!(RateLimitRequest::decode(bytes.as_slice()).unwrap(), req);
    }

    fn descriptor() -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: vec![Entry {
                key: "limit.free".into(),
                value: "1".into(),
            }],
        }
    }

    fn status() -> DescriptorStatus {
        DescriptorStatus {
            code: Code::Ok as i32,
            current_limit: Some(RateLimit {
                name: "free".into(),
                requests_per_unit: 100,
                unit: Unit::Minute as i32,
            }),
            limit_remaining: 42,
            duration_until_reset: Some(prost_types::Duration {
                seconds: 30,
                nanos: 5,
            }),
        }
    }

    #[test]
    fn response_round_trips_with_every_field() {
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![status(), DescriptorStatus::default()],
            response_headers_to_add: vec![HeaderValue {
                key: "X-RateLimit-Remaining".into(),
                value: "0".into(),
                raw_value: Vec::new(),
            }],
            request_headers_to_add: vec![HeaderValue {
                key: "k".into(),
                value: String::new(),
                raw_value: b"raw".to_vec(),
            }],
            raw_body: b"body".to_vec(),
        };
        let bytes = resp.encode_to_vec();
        // field 1 (overall_code), varint: tag byte 0x08, value 2 (OVER_LIMIT), first
        assert_eq!(&bytes[..2], b"\x08\x02");
        assert_eq!(RateLimitResponse::decode(bytes.as_slice()).unwrap(), resp);
    }

    #[test]
    fn reserve_and_commit_round_trip_with_limitador_field_numbers() {
        let req = ReserveRequest {
            domain: "llm".into(),
            descriptors: vec![descriptor()],
            amount: 300,
            ttl: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
        };
        let bytes = req.encode_to_vec();
        assert_eq!(&bytes[..5], b"\x0a\x03llm");
        // field 3 (amount), varint 300 = 0xac 0x02; then field 4 (ttl), length-delimited:
        // tag 0x22, length 2, Duration {seconds (field 1) = 2}
        assert!(
            bytes.ends_with(b"\x18\xac\x02\x22\x02\x08\x02"),
            "{bytes:x?}"
        );
        assert_eq!(ReserveRequest::decode(bytes.as_slice()).unwrap(), req);

        let resp = ReserveResponse {
            code: Code::Ok as i32,
            reservation_id: "id-1".into(),
            statuses: vec![status()],
            hold_ttl: None,
        };
        let bytes = resp.encode_to_vec();
        assert_eq!(&bytes[..8], b"\x08\x01\x12\x04id-1");
        // field 3 (statuses), length-delimited: tag byte 0x1a
        assert_eq!(bytes[8], 0x1a);
        assert_eq!(ReserveResponse::decode(bytes.as_slice()).unwrap(), resp);

        let req = CommitRequest {
            domain: "llm".into(),
            descriptors: vec![descriptor()],
            reservation_id: "id-1".into(),
            actual_amount: 7,
        };
        let bytes = req.encode_to_vec();
        // field 3 (reservation_id): tag 0x1a; field 4 (actual_amount), varint: tag 0x20
        assert!(bytes.ends_with(b"\x1a\x04id-1\x20\x07"), "{bytes:x?}");
        assert_eq!(CommitRequest::decode(bytes.as_slice()).unwrap(), req);

        let resp = CommitResponse {
            reservation_released: true,
        };
        let bytes = resp.encode_to_vec();
        assert_eq!(bytes, b"\x08\x01");
        assert_eq!(CommitResponse::decode(bytes.as_slice()).unwrap(), resp);
    }

    /// Limitador's own `ReserveResponse`: fields 1 and 2 only.
    #[derive(Clone, PartialEq, prost::Message)]
    struct LimitadorReserveResponse {
        #[prost(enumeration = "Code", tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        reservation_id: String,
    }

    #[test]
    fn reserve_response_statuses_extension_is_wire_compatible_both_ways() {
        let ours = ReserveResponse {
            code: Code::Ok as i32,
            reservation_id: "id-2".into(),
            statuses: vec![status()],
            hold_ttl: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        };
        // A client that does not know field 3 skips it.
        let theirs = LimitadorReserveResponse::decode(ours.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            theirs,
            LimitadorReserveResponse {
                code: Code::Ok as i32,
                reservation_id: "id-2".into(),
            }
        );
        // Limitador's answer decodes here with no statuses.
        let decoded = ReserveResponse::decode(theirs.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.code, Code::Ok as i32);
        assert_eq!(decoded.reservation_id, "id-2");
        assert!(decoded.statuses.is_empty());
        assert_eq!(decoded.hold_ttl, None);
    }

    #[test]
    fn durations_convert_with_negatives_as_zero_and_saturation() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration_ms(&d(2, 500_000_000)), 2_500);
        assert_eq!(duration_ms(&d(-5, 0)), 0);
        assert_eq!(duration_ms(&d(i64::MIN, i32::MIN)), 0);
        assert_eq!(duration_ms(&d(i64::MAX, 0)), u64::MAX);
        assert_eq!(
            duration(std::time::Duration::from_millis(1_500)),
            d(1, 500_000_000)
        );
        assert_eq!(duration(std::time::Duration::MAX), d(i64::MAX, 999_999_999));
    }

    #[test]
    fn units_map_to_seconds_and_back() {
        assert_eq!(Unit::from_seconds(60), Some(Unit::Minute));
        assert_eq!(Unit::from_seconds(61), None);
        assert_eq!(Unit::Day.seconds(), Some(86_400));
    }
}
