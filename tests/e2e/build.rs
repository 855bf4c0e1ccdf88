//! Generates the tonic server code of `envoy.service.auth.v3.Authorization` without `protoc`:
//! `tonic_build::manual` describes the service in Rust, and the messages are the prost-derive
//! structs of `src/authz.rs`, encoded with `tonic_prost::ProstCodec` (as ratelimit-service
//! does for the rate-limit services).
//!
//! Output (in `OUT_DIR`): `envoy.service.auth.v3.Authorization.rs`, included by `src/authz.rs`.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let authorization = Service::builder()
        .name("Authorization")
        .package("envoy.service.auth.v3")
        .comment("Envoy's external authorization API (ext_authz over gRPC).")
        .method(
            Method::builder()
                .name("check")
                .route_name("Check")
                .comment("Answers whether the request is allowed (status OK) or not.")
                .input_type("crate::authz::CheckRequest")
                .output_type("crate::authz::CheckResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    Builder::new().build_client(false).compile(&[authorization]);
}
