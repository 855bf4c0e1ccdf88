//! Request attributes: which ones a CEL expression reads, where Envoy keeps them, and how
//! Envoy encodes them.
//!
//! CEL sees Envoy's attribute vocabulary (`request.*`, `source.*`, `destination.*`,
//! `connection.*`, `upstream.*`, `xds.*`, `metadata`, `filter_state`) plus `auth`, a view of the
//! dynamic metadata an auth filter left. Attributes are fetched from the host with
//! `get_property` (path segments), and decoded from Envoy's encodings (source: Envoy's
//! `source/extensions/common/wasm/context.cc`, `serializeValue`): strings as their bytes, int64
//! and uint64 as 8 little-endian bytes, bools as 1 byte, timestamps as int64 nanoseconds since
//! the Unix epoch, durations as int64 nanoseconds. `request.headers` is read through the header
//! map API instead (one host call for the whole map).

use cel_interpreter::objects::{Key, Map};
use cel_interpreter::Value;
use chrono::{DateTime, FixedOffset};
use std::collections::HashMap;
use std::sync::Arc;

/// The CEL function that reads the request body as JSON: `requestBodyJSON('/model')` (a
/// constant JSON pointer) is compiled into an attribute of this name.
pub const REQUEST_BODY_JSON: &str = "requestBodyJSON";

/// Root variables of the attribute vocabulary; any other identifier is not an attribute.
pub const ROOTS: [&str; 10] = [
    REQUEST_BODY_JSON,
    "request",
    "source",
    "destination",
    "connection",
    "upstream",
    "xds",
    "metadata",
    "filter_state",
    "auth",
];

/// How the bytes of a property are turned into a CEL value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The bytes as UTF-8 text (invalid sequences become U+FFFD).
    String,
    /// 8 bytes, little-endian int64.
    Int,
    /// 8 bytes, little-endian uint64.
    UInt,
    /// 1 byte, non-zero is true.
    Bool,
    /// int64 nanoseconds since the Unix epoch.
    Timestamp,
    /// int64 nanoseconds.
    Duration,
}

/// Where one attribute comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// All request headers as a `map(string, string)`, names lowercase.
    RequestHeaders,
    /// `get_property(path)`, decoded as `kind`.
    Property {
        /// The property path, segment by segment.
        path: Vec<String>,
        /// How its bytes decode.
        kind: Kind,
    },
    /// The value at a JSON pointer in the request body (parsed once per request).
    RequestBodyJson(String),
}

/// One attribute an expression reads: its CEL path (e.g. `["auth", "identity", "userid"]`)
/// and where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attribute {
    /// Path as seen from CEL, root first.
    pub cel_path: Vec<String>,
    /// Where the value is read from.
    pub source: Source,
}

fn known_kind(root: &str, field: &str) -> Kind {
    match (root, field) {
        ("request", "time") => Kind::Timestamp,
        ("request", "duration") => Kind::Duration,
        ("request", "size" | "total_size") => Kind::Int,
        ("source" | "destination" | "upstream", "port") => Kind::Int,
        ("connection", "id") => Kind::UInt,
        ("connection", "mtls") => Kind::Bool,
        ("upstream", "tls_version") => Kind::String,
        _ => Kind::String,
    }
}

impl Attribute {
    /// Resolves a CEL path to its source. `auth_namespace` is the dynamic-metadata namespace
    /// behind `auth`. Returns `None` for a bare root (`request` alone), which cannot be fetched.
    pub fn resolve(cel_path: &[String], auth_namespace: &str) -> Option<Attribute> {
        let root = cel_path.first()?.as_str();
        if cel_path.len() < 2 {
            return None;
        }
        if root == REQUEST_BODY_JSON {
            return Some(Attribute {
                cel_path: cel_path[..2].to_vec(),
                source: Source::RequestBodyJson(cel_path[1].clone()),
            });
        }
        if root == "request" && cel_path[1] == "headers" {
            return Some(Attribute {
                cel_path: vec!["request".into(), "headers".into()],
                source: Source::RequestHeaders,
            });
        }
        let (path, kind) = match root {
            "auth" => {
                let mut p = vec![
                    "metadata".to_string(),
                    "filter_metadata".to_string(),
                    auth_namespace.to_string(),
                ];
                p.extend(cel_path[1..].iter().cloned());
                (p, Kind::String)
            }
            "metadata" | "filter_state" => (cel_path.to_vec(), Kind::String),
            _ => {
                let kind = if cel_path.len() == 2 {
                    known_kind(root, &cel_path[1])
                } else {
                    Kind::String
                };
                (cel_path.to_vec(), kind)
            }
        };
        Some(Attribute {
            cel_path: cel_path.to_vec(),
            source: Source::Property { path, kind },
        })
    }
}

/// The host as seen by attribute evaluation. Implemented by the wasm layer over proxy-wasm
/// host calls, and by tests over plain maps.
pub trait AttributeHost {
    /// The property at `path`, as raw bytes in Envoy's encoding; `None` when absent.
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>>;
    /// All request headers (name lowercase, value as bytes).
    fn request_headers(&mut self) -> Vec<(String, Vec<u8>)>;
    /// The value at `pointer` (RFC 6901) in the request body parsed as JSON; `None` when there
    /// is no body, it is not JSON, or nothing is there.
    fn request_body_json(&mut self, _pointer: &str) -> Option<serde_json::Value> {
        None
    }
}

/// A JSON value as a CEL value (objects become maps with string keys).
pub fn json_to_cel(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s)),
        serde_json::Value::Array(items) => {
            Value::List(Arc::new(items.into_iter().map(json_to_cel).collect()))
        }
        serde_json::Value::Object(map) => {
            let map: HashMap<Key, Value> = map
                .into_iter()
                .map(|(k, v)| (Key::String(Arc::new(k)), json_to_cel(v)))
                .collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

/// Fetches an attribute's value from the host. `None` when the host has no value or its bytes
/// do not decode as the attribute's kind.
pub fn fetch(attr: &Attribute, host: &mut dyn AttributeHost) -> Option<Value> {
    match &attr.source {
        Source::RequestHeaders => Some(fetch_headers(host, None)),
        Source::Property { path, kind } => {
            let segments: Vec<&str> = path.iter().map(String::as_str).collect();
            let bytes = host.property(&segments)?;
            decode(&bytes, *kind)
        }
        Source::RequestBodyJson(pointer) => host.request_body_json(pointer).map(json_to_cel),
    }
}

/// The request headers as a CEL `map(string, string)`. With `names`, only those headers are
/// put in the map: the policy reads no other (the rest are never converted).
pub fn fetch_headers(host: &mut dyn AttributeHost, names: Option<&[String]>) -> Value {
    let headers = host.request_headers();
    let capacity = names.map_or(headers.len(), <[String]>::len);
    let mut map: HashMap<Key, Value> = HashMap::with_capacity(capacity);
    for (name, value) in headers {
        if names.is_some_and(|names| !names.contains(&name)) {
            continue;
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        // Repeated headers are joined with ',' as Envoy's own CEL does.
        match map.entry(Key::String(Arc::new(name))) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if let Value::String(prev) = e.get() {
                    let joined = format!("{prev},{value}");
                    e.insert(Value::String(Arc::new(joined)));
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Value::String(Arc::new(value)));
            }
        }
    }
    Value::Map(Map { map: Arc::new(map) })
}

fn le_i64(bytes: &[u8]) -> Option<i64> {
    let arr: [u8; 8] = bytes.try_into().ok()?;
    Some(i64::from_le_bytes(arr))
}

/// Decodes Envoy's encoding of a property value (see the module docs).
pub fn decode(bytes: &[u8], kind: Kind) -> Option<Value> {
    match kind {
        Kind::String => Some(Value::String(Arc::new(
            String::from_utf8_lossy(bytes).into_owned(),
        ))),
        Kind::Int => le_i64(bytes).map(Value::Int),
        Kind::UInt => le_i64(bytes).map(|v| Value::UInt(v as u64)),
        Kind::Bool => match bytes {
            [b] => Some(Value::Bool(*b != 0)),
            _ => None,
        },
        Kind::Timestamp => {
            let nanos = le_i64(bytes)?;
            let utc = DateTime::from_timestamp(
                nanos.div_euclid(1_000_000_000),
                nanos.rem_euclid(1_000_000_000) as u32,
            )?;
            let offset = FixedOffset::east_opt(0)?;
            Some(Value::Timestamp(utc.with_timezone(&offset)))
        }
        Kind::Duration => le_i64(bytes).map(|n| Value::Duration(chrono::Duration::nanoseconds(n))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(String::from).collect()
    }

    #[test]
    fn auth_reads_dynamic_metadata_namespace() {
        let a = Attribute::resolve(&path("auth.identity.userid"), "ns").unwrap();
        assert_eq!(
            a.source,
            Source::Property {
                path: path("metadata.filter_metadata.ns.identity.userid"),
                kind: Kind::String
            }
        );
    }

    #[test]
    fn headers_collapse_to_the_header_map() {
        let a = Attribute::resolve(&path("request.headers.x-key"), "ns").unwrap();
        assert_eq!(a.source, Source::RequestHeaders);
        assert_eq!(a.cel_path, path("request.headers"));
        assert!(Attribute::resolve(&path("request"), "ns").is_none());
    }

    #[test]
    fn decodes_envoy_encodings() {
        assert_eq!(
            decode(&8080i64.to_le_bytes(), Kind::Int),
            Some(Value::Int(8080))
        );
        assert_eq!(decode(&[1, 2, 3], Kind::Int), None);
        assert_eq!(decode(&[1], Kind::Bool), Some(Value::Bool(true)));
        assert_eq!(decode(&[], Kind::Bool), None);
        let ts = decode(&1_700_000_000_000_000_000i64.to_le_bytes(), Kind::Timestamp).unwrap();
        match ts {
            Value::Timestamp(t) => assert_eq!(t.timestamp(), 1_700_000_000),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(b"\xff/v1", Kind::String),
            Some(Value::String(Arc::new("\u{fffd}/v1".into())))
        );
    }
}
