//! Generates the tonic client and server code of the two rate-limit gRPC services without
//! `protoc`: `tonic_build::manual` describes the services in Rust, and the messages are the
//! prost-derive structs of the `ratelimit-proto` crate, encoded with `tonic_prost::ProstCodec`.
//!
//! Output (in `OUT_DIR`): `kuadrant.service.ratelimit.v1.RateLimitService.rs` and
//! `envoy.service.ratelimit.v3.RateLimitService.rs`, included by `src/proto.rs`.

use tonic_build::manual::{Builder, Method, Service};

const REQUEST: &str = "ratelimit_proto::RateLimitRequest";
const RESPONSE: &str = "ratelimit_proto::RateLimitResponse";
const CODEC: &str = "tonic_prost::ProstCodec";

/// A unary method taking `input` and answering `output` (prost messages of `ratelimit-proto`).
fn unary_of(name: &str, route_name: &str, comment: &str, input: &str, output: &str) -> Method {
    Method::builder()
        .name(name)
        .route_name(route_name)
        .comment(comment)
        .input_type(input)
        .output_type(output)
        .codec_path(CODEC)
        .build()
}

/// A unary method of Envoy's `RateLimitRequest` → `RateLimitResponse`.
fn unary(name: &str, route_name: &str, comment: &str) -> Method {
    unary_of(name, route_name, comment, REQUEST, RESPONSE)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");

    let kuadrant = Service::builder()
        .name("RateLimitService")
        .package("kuadrant.service.ratelimit.v1")
        .comment(
            "Limitador's check/report API: CheckRateLimit never writes, Report always adds; \
             Reserve holds an estimate until Commit adds the actual amount.",
        )
        .method(unary(
            "check_rate_limit",
            "CheckRateLimit",
            "Answers whether one more hit would pass, without adding anything.",
        ))
        .method(unary(
            "report",
            "Report",
            "Adds `hits_addend` (0 counts as 1) to every counter that applies, even past its maximum.",
        ))
        .method(unary_of(
            "reserve",
            "Reserve",
            "Holds `amount` against every counter that applies, if it fits once the other \
             outstanding holds are counted, until Commit or expiry.",
            "ratelimit_proto::ReserveRequest",
            "ratelimit_proto::ReserveResponse",
        ))
        .method(unary_of(
            "commit",
            "Commit",
            "Adds `actual_amount` to every counter that applies and releases the reservation's \
             hold if it is still live.",
            "ratelimit_proto::CommitRequest",
            "ratelimit_proto::CommitResponse",
        ))
        .build();

    let envoy = Service::builder()
        .name("RateLimitService")
        .package("envoy.service.ratelimit.v3")
        .comment("Envoy's rate-limit API.")
        .method(unary(
            "should_rate_limit",
            "ShouldRateLimit",
            "Checks and adds `hits_addend` (0 counts as 1) in one step.",
        ))
        .build();

    Builder::new().compile(&[kuadrant, envoy]);
}
