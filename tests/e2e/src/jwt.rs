//! JSON Web Tokens for the `envoy.filters.http.jwt_authn` tests: HS256 (RFC 7518 §3.2) over a
//! JWKS key of type `oct`, signed here, and the key read back from an Envoy configuration's
//! `local_jwks`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// An HS256 key of a JWKS (`kty: oct`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OctKey {
    /// The key id (`kid`), put in the header of the tokens signed with it.
    pub kid: Option<String>,
    /// The secret (`k`, base64url-decoded).
    pub secret: Vec<u8>,
}

/// Base64url without padding, as JWS uses it.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS of `claims` (any JSON object) signed with HS256 under `key`.
pub fn sign_hs256(key: &OctKey, claims: &serde_json::Value) -> String {
    sign_hs256_raw(key, &claims.to_string())
}

/// [`sign_hs256`] of a payload given as JSON text, byte for byte (e.g. to choose the order of
/// an object's keys).
pub fn sign_hs256_raw(key: &OctKey, payload: &str) -> String {
    let mut header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    if let Some(kid) = &key.kid {
        header["kid"] = kid.as_str().into();
    }
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload.as_bytes())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.secret).expect("HMAC takes any key size");
    mac.update(signing_input.as_bytes());
    let signature = mac.finalize().into_bytes();
    format!("{signing_input}.{}", b64url(&signature))
}

/// The claims of a compact JWS, not verified (to check what a token carries).
pub fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a compact JWS");
    let bytes = URL_SAFE_NO_PAD.decode(payload).expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// The `oct` keys of every `local_jwks.inline_string` in an Envoy configuration (YAML), in
/// document order.
pub fn oct_keys_of(config: &str) -> Vec<OctKey> {
    fn walk(v: &serde_json::Value, out: &mut Vec<OctKey>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(jwks) = map
                    .get("local_jwks")
                    .and_then(|j| j["inline_string"].as_str())
                {
                    let jwks: serde_json::Value =
                        serde_json::from_str(jwks).expect("local_jwks.inline_string is a JWKS");
                    for key in jwks["keys"].as_array().into_iter().flatten() {
                        if key["kty"] == "oct" {
                            let k = key["k"].as_str().expect("an oct key has k");
                            out.push(OctKey {
                                kid: key["kid"].as_str().map(String::from),
                                secret: URL_SAFE_NO_PAD
                                    .decode(k.trim_end_matches('='))
                                    .expect("k is base64url"),
                            });
                        }
                    }
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let doc: serde_json::Value = serde_yaml::from_str(config).expect("the configuration is YAML");
    let mut keys = Vec::new();
    walk(&doc, &mut keys);
    keys
}
