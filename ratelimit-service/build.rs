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

fn unary(name: &str, route_name: &str, comment: &str) -> Method {
    Method::builder()
        .name(name)
        .route_name(route_name)
        .comment(comment)
        .input_type(REQUEST)
        .output_type(RESPONSE)
        .codec_path(CODEC)
        .build()
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");

    let kuadrant = Service::builder()
        .name("RateLimitService")
        .package("kuadrant.service.ratelimit.v1")
        .comment("Limitador's check/report API: CheckRateLimit never writes, Report always adds.")
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
