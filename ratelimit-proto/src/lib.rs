//! Messages of the rate-limit service API spoken by Envoy and Limitador.
//!
//! Sources (field numbers and names are taken from these protos, only the fields this project
//! uses or must round-trip are declared; unknown fields are skipped by prost on decode):
//! - `envoy/service/ratelimit/v3/rls.proto` (`RateLimitRequest`, `RateLimitResponse`),
//! - `envoy/extensions/common/ratelimit/v3/ratelimit.proto` (`RateLimitDescriptor`),
//! - `envoy/config/core/v3/base.proto` (`HeaderValue`),
//! - Limitador's `kuadrant/service/ratelimit/v1/ratelimit.proto`, whose `CheckRateLimit` and
//!   `Report` methods take and return the same two messages.
//!
//! The gRPC method paths are given as constants so that callers (the wasm filter, the service,
//! tests) agree on them.

/// gRPC service name of Limitador's check/report API.
pub const KUADRANT_SERVICE: &str = "kuadrant.service.ratelimit.v1.RateLimitService";
/// Method that answers whether one more hit would pass, without adding anything.
pub const CHECK_RATE_LIMIT: &str = "CheckRateLimit";
/// Method that adds `hits_addend` to the counters, even past their maximum.
pub const REPORT: &str = "Report";
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

    #[test]
    fn units_map_to_seconds_and_back() {
        assert_eq!(Unit::from_seconds(60), Some(Unit::Minute));
        assert_eq!(Unit::from_seconds(61), None);
        assert_eq!(Unit::Day.seconds(), Some(86_400));
    }
}
