//! Request attributes: which ones a CEL expression reads, where Envoy keeps them, and how
//! Envoy encodes them.
//!
//! CEL sees Envoy's attribute vocabulary (`request.*`, `source.*`, `destination.*`,
//! `connection.*`, `xds.*`, `metadata`, `filter_state`) plus `auth` (and its Kuadrant spelling
//! `request.auth`), the dynamic metadata an auth filter left. Every field of the vocabulary is
//! known here with its type ([`known_field`]); an unknown one is refused at configure time.
//!
//! Attributes are fetched from the host with `get_property` (path segments) and decoded from
//! Envoy's encodings (source: Envoy's `source/extensions/common/wasm/context.cc`,
//! `serializeValue`): strings as their bytes, int64 and uint64 as 8 little-endian bytes, bools
//! as 1 byte, timestamps as int64 nanoseconds since the Unix epoch, durations as int64
//! nanoseconds. `request.headers` is read through the header map API instead (one host call
//! for the whole map).
//!
//! Dynamic metadata is typed: Envoy flattens a `google.protobuf.Struct` below `metadata` into
//! proxy-wasm pairs that do not say which value is a string, a number, a bool or a nested map,
//! but it hands `metadata` itself over as the serialized `envoy.config.core.v3.Metadata`
//! message. That message is read once per request and each namespace's Struct becomes a CEL
//! map: Struct maps are maps, lists are lists, strings strings, bools bools, null null, and
//! numbers (doubles on the wire) ints when whole and within ±2^53, doubles otherwise
//! ([`struct_to_cel`]).

use cel_interpreter::objects::{Key, Map};
use cel_interpreter::Value;
use chrono::{DateTime, FixedOffset};
use std::collections::HashMap;
use std::sync::Arc;

/// The CEL function that reads the request body as JSON: `requestBodyJSON('/model')` (a
/// constant JSON pointer) is compiled into an attribute of this name.
pub const REQUEST_BODY_JSON: &str = "requestBodyJSON";

/// Root variables of the attribute vocabulary; any other free identifier is refused.
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

impl Kind {
    /// The CEL type name (`string`, `int`, ...), for messages.
    pub fn cel_type(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Int => "int",
            Kind::UInt => "uint",
            Kind::Bool => "bool",
            Kind::Timestamp => "timestamp",
            Kind::Duration => "duration",
        }
    }
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
    /// One namespace of a metadata property: `get_property(property)` returns a serialized
    /// `envoy.config.core.v3.Metadata`, whose `filter_metadata[namespace]` Struct becomes a
    /// CEL map (absent: no value).
    Metadata {
        /// The property holding the Metadata message: `["metadata"]` (the stream's dynamic
        /// metadata) or `["xds", "route_metadata"]` and the like.
        property: Vec<String>,
        /// The `filter_metadata` key.
        namespace: String,
    },
    /// The value at a JSON pointer in the request body (parsed once per request).
    RequestBodyJson(String),
}

/// One attribute an expression reads: its CEL path (e.g. `["request", "url_path"]`, or
/// `["auth"]` for the whole identity Struct) and where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attribute {
    /// Path as seen from CEL, root first.
    pub cel_path: Vec<String>,
    /// Where the value is read from.
    pub source: Source,
}

/// What a field of Envoy's attribute vocabulary holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A value of this kind.
    Value(Kind),
    /// `request.headers`: a `map(string, string)`.
    Headers,
    /// A serialized `envoy.config.core.v3.Metadata` (`xds.route_metadata`, ...): read as
    /// `<field>.filter_metadata["<namespace>"]`.
    Metadata,
    /// `xds.node`: read as `xds.node.id` or `xds.node.cluster` (strings).
    Node,
    /// Only known after the upstream is picked, later than the policy is evaluated.
    AfterUpstream,
}

/// The fields of `root` in Envoy's attribute vocabulary (Envoy's "Attributes" reference),
/// with what each holds; `None` for a root without a fixed field list.
pub fn fields(root: &str) -> Option<&'static [(&'static str, Field)]> {
    use Field::{AfterUpstream as Up, Headers, Metadata, Node, Value as V};
    use Kind::{Bool, Duration, Int, String as S, Timestamp, UInt};
    Some(match root {
        "request" => &[
            ("path", V(S)),
            ("url_path", V(S)),
            ("host", V(S)),
            ("scheme", V(S)),
            ("method", V(S)),
            ("headers", Headers),
            ("referer", V(S)),
            ("useragent", V(S)),
            ("time", V(Timestamp)),
            ("id", V(S)),
            ("protocol", V(S)),
            ("query", V(S)),
            ("duration", V(Duration)),
            ("size", V(Int)),
            ("total_size", V(Int)),
        ],
        "source" | "destination" => &[("address", V(S)), ("port", V(Int))],
        "connection" => &[
            ("id", V(UInt)),
            ("mtls", V(Bool)),
            ("requested_server_name", V(S)),
            ("tls_version", V(S)),
            ("subject_local_certificate", V(S)),
            ("subject_peer_certificate", V(S)),
            ("dns_san_local_certificate", V(S)),
            ("dns_san_peer_certificate", V(S)),
            ("uri_san_local_certificate", V(S)),
            ("uri_san_peer_certificate", V(S)),
            ("sha256_peer_certificate", V(S)),
            ("transport_failure_reason", V(S)),
            ("termination_details", V(S)),
        ],
        "upstream" => &[
            ("address", Up),
            ("port", Up),
            ("tls_version", Up),
            ("subject_local_certificate", Up),
            ("subject_peer_certificate", Up),
            ("dns_san_local_certificate", Up),
            ("dns_san_peer_certificate", Up),
            ("uri_san_local_certificate", Up),
            ("uri_san_peer_certificate", Up),
            ("sha256_peer_certificate", Up),
            ("local_address", Up),
            ("transport_failure_reason", Up),
            ("request_attempt_count", Up),
            ("cx_pool_ready_duration", Up),
            ("locality", Up),
        ],
        "xds" => &[
            ("node", Node),
            ("cluster_name", V(S)),
            ("cluster_metadata", Metadata),
            ("route_name", V(S)),
            ("route_metadata", Metadata),
            ("virtual_host_name", V(S)),
            ("virtual_host_metadata", Metadata),
            ("listener_metadata", Metadata),
            ("listener_direction", V(Int)),
            ("filter_chain_name", V(S)),
            ("upstream_host_metadata", Up),
        ],
        _ => return None,
    })
}

/// The field `name` of `root`, when the vocabulary has it.
pub fn known_field(root: &str, name: &str) -> Option<Field> {
    fields(root)?
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

/// The field names of `root` a policy can read, comma-separated, for messages.
fn field_list(root: &str) -> String {
    let mut names: Vec<&str> = fields(root)
        .map(|f| {
            f.iter()
                .filter(|(_, k)| *k != Field::AfterUpstream)
                .map(|(n, _)| *n)
                .collect()
        })
        .unwrap_or_default();
    if root == "request" {
        names.push("auth");
    }
    names.join(", ")
}

/// The attribute of a metadata namespace; `cel_path` is what CEL sees (`auth`,
/// `request.auth`, `metadata.filter_metadata.<ns>`).
fn metadata_attribute(cel_path: &[String], property: &[&str], namespace: &str) -> Attribute {
    Attribute {
        cel_path: cel_path.to_vec(),
        source: Source::Metadata {
            property: property.iter().map(|s| s.to_string()).collect(),
            namespace: namespace.to_string(),
        },
    }
}

/// A property attribute read at `cel_path` itself.
fn property_attribute(cel_path: &[String], kind: Kind) -> Attribute {
    Attribute {
        cel_path: cel_path.to_vec(),
        source: Source::Property {
            path: cel_path.to_vec(),
            kind,
        },
    }
}

impl Attribute {
    /// Resolves a CEL path (root first, as selected in an expression) to the attribute it
    /// reads. `auth_namespace` is the dynamic-metadata namespace behind `auth` and
    /// `request.auth`.
    ///
    /// # Errors
    ///
    /// Why the path cannot be read, with what to write instead: a field that is not in
    /// Envoy's vocabulary, one only known after the upstream is picked, a field of a scalar,
    /// or a root or map that cannot be fetched as a whole.
    pub fn resolve(cel_path: &[String], auth_namespace: &str) -> Result<Attribute, String> {
        let dotted = cel_path.join(".");
        let Some((root, rest)) = cel_path.split_first() else {
            return Err("empty attribute path".into());
        };
        let root = root.as_str();
        match (root, rest) {
            ("auth", _) => Ok(metadata_attribute(
                &cel_path[..1],
                &["metadata"],
                auth_namespace,
            )),
            (REQUEST_BODY_JSON, [pointer, ..]) => Ok(Attribute {
                cel_path: cel_path[..2].to_vec(),
                source: Source::RequestBodyJson(pointer.clone()),
            }),
            ("request", [auth, ..]) if auth == "auth" => Ok(metadata_attribute(
                &cel_path[..2],
                &["metadata"],
                auth_namespace,
            )),
            ("metadata", [fm, ns, ..]) if fm == "filter_metadata" => {
                Ok(metadata_attribute(&cel_path[..3], &["metadata"], ns))
            }
            ("metadata", _) => Err(format!(
                "`{dotted}`: dynamic metadata is read by namespace, as \
                 `metadata.filter_metadata[\"<namespace>\"].<key>` (or `auth.<key>` for the \
                 namespace of auth.metadataNamespace)"
            )),
            ("filter_state", [_]) => Ok(property_attribute(cel_path, Kind::String)),
            ("filter_state", _) => Err(format!(
                "`{dotted}`: a filter state object is read as a whole, as \
                 `filter_state[\"<key>\"]` (its serialized bytes, as a string)"
            )),
            (_, []) => Err(format!(
                "`{root}` cannot be read as a whole; select one of its fields: {}",
                field_list(root)
            )),
            (_, [name, deeper @ ..]) => {
                let Some(field) = known_field(root, name) else {
                    let hint = if root == "request" {
                        format!(
                            " (a request header is `request.headers[\"{}\"]`)",
                            name.to_ascii_lowercase().replace('_', "-")
                        )
                    } else {
                        String::new()
                    };
                    return Err(format!(
                        "`{root}.{name}` is not an Envoy attribute; the fields of `{root}` are: {}{hint}",
                        field_list(root)
                    ));
                };
                match (field, deeper) {
                    (Field::Headers, _) => Ok(Attribute {
                        cel_path: cel_path[..2].to_vec(),
                        source: Source::RequestHeaders,
                    }),
                    (Field::AfterUpstream, _) => Err(format!(
                        "`{root}.{name}` is only known once the upstream is picked, after the \
                         policy is evaluated: it would never have a value"
                    )),
                    (Field::Metadata, [fm, ns, ..]) if fm == "filter_metadata" => Ok(
                        metadata_attribute(&cel_path[..4], &[root, name.as_str()], ns),
                    ),
                    (Field::Metadata, _) => Err(format!(
                        "`{root}.{name}` is metadata: read it by namespace, as \
                         `{root}.{name}.filter_metadata[\"<namespace>\"].<key>`"
                    )),
                    (Field::Node, [f]) if f == "id" || f == "cluster" => {
                        Ok(property_attribute(cel_path, Kind::String))
                    }
                    (Field::Node, _) => {
                        Err("`xds.node` is read as `xds.node.id` or `xds.node.cluster`".into())
                    }
                    (Field::Value(kind), []) => Ok(property_attribute(cel_path, kind)),
                    (Field::Value(kind), [sub, ..]) => Err(format!(
                        "`{root}.{name}` is a {}: it has no field `{sub}`",
                        kind.cel_type()
                    )),
                }
            }
        }
    }
}

/// The dynamic metadata of a stream as Envoy hands it over for the property `metadata`:
/// `envoy.config.core.v3.Metadata` (`envoy/config/core/v3/base.proto`). Only
/// `filter_metadata` (field 1) is declared; `typed_filter_metadata` is skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    /// A Struct per namespace (by convention the name of the filter that wrote it).
    #[prost(map = "string, message", tag = "1")]
    pub filter_metadata: HashMap<String, prost_types::Struct>,
}

/// A `google.protobuf.Struct` as a CEL map (see the module docs for the types).
pub fn struct_to_cel(s: prost_types::Struct) -> Value {
    let map: HashMap<Key, Value> = s
        .fields
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k)), proto_value_to_cel(v)))
        .collect();
    Value::Map(Map { map: Arc::new(map) })
}

/// 2^53: every integer of at most this magnitude is exact in a double.
const EXACT_DOUBLE_INT: f64 = 9_007_199_254_740_992.0;

/// A `google.protobuf.Value` as a CEL value.
fn proto_value_to_cel(v: prost_types::Value) -> Value {
    use prost_types::value::Kind as K;
    match v.kind {
        None | Some(K::NullValue(_)) => Value::Null,
        Some(K::BoolValue(b)) => Value::Bool(b),
        Some(K::StringValue(s)) => Value::String(Arc::new(s)),
        Some(K::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= EXACT_DOUBLE_INT => {
            Value::Int(n as i64)
        }
        Some(K::NumberValue(n)) => Value::Float(n),
        Some(K::StructValue(s)) => struct_to_cel(s),
        Some(K::ListValue(l)) => Value::List(Arc::new(
            l.values.into_iter().map(proto_value_to_cel).collect(),
        )),
    }
}

/// The Struct of `namespace` in serialized Metadata bytes, as a CEL map; `None` when the
/// bytes are not a Metadata message or the namespace is not there.
pub fn decode_metadata_namespace(bytes: &[u8], namespace: &str) -> Option<Value> {
    use prost::Message;
    let mut metadata = Metadata::decode(bytes).ok()?;
    metadata
        .filter_metadata
        .remove(namespace)
        .map(struct_to_cel)
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
        Source::Metadata {
            property,
            namespace,
        } => {
            let segments: Vec<&str> = property.iter().map(String::as_str).collect();
            decode_metadata_namespace(&host.property(&segments)?, namespace)
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
    fn auth_and_request_auth_read_the_whole_namespace_struct() {
        for (p, cel) in [
            ("auth.identity.userid", "auth"),
            ("request.auth.identity.metadata", "request.auth"),
            (
                "metadata.filter_metadata.ns.identity",
                "metadata.filter_metadata.ns",
            ),
        ] {
            let a = Attribute::resolve(&path(p), "ns").unwrap();
            assert_eq!(a.cel_path, path(cel), "{p}");
            assert_eq!(
                a.source,
                Source::Metadata {
                    property: vec!["metadata".into()],
                    namespace: "ns".into()
                },
                "{p}"
            );
        }
        let a = Attribute::resolve(&path("xds.route_metadata.filter_metadata.team.tier"), "ns")
            .unwrap();
        assert_eq!(
            a.source,
            Source::Metadata {
                property: path("xds.route_metadata"),
                namespace: "team".into()
            }
        );
    }

    #[test]
    fn headers_collapse_to_the_header_map() {
        let a = Attribute::resolve(&path("request.headers.x-key"), "ns").unwrap();
        assert_eq!(a.source, Source::RequestHeaders);
        assert_eq!(a.cel_path, path("request.headers"));
    }

    #[test]
    fn paths_outside_the_vocabulary_are_refused_with_what_to_write() {
        let refused = |p: &str| Attribute::resolve(&path(p), "ns").unwrap_err();
        let e = refused("request.user_agent");
        assert!(e.starts_with("`request.user_agent` is not an Envoy attribute; the fields of `request` are: path, url_path"), "{e}");
        assert!(e.contains("request.headers[\"user-agent\"]"), "{e}");
        assert!(refused("request").contains("cannot be read as a whole"));
        assert!(refused("source.ip").contains("the fields of `source` are: address, port"));
        assert!(refused("connection.sni").contains("requested_server_name"));
        assert!(refused("upstream.address").contains("only known once the upstream is picked"));
        assert!(refused("request.path.x").contains("is a string: it has no field `x`"));
        assert!(refused("metadata.foo").contains("metadata.filter_metadata"));
        assert!(refused("xds.route_metadata.x").contains("filter_metadata"));
        assert!(refused("filter_state").contains("filter_state[\"<key>\"]"));
        assert!(refused("xds.node.metadata").contains("xds.node.id"));
        assert_eq!(
            Attribute::resolve(&path("connection.mtls"), "ns")
                .unwrap()
                .source,
            Source::Property {
                path: path("connection.mtls"),
                kind: Kind::Bool
            }
        );
    }

    #[test]
    fn metadata_structs_become_typed_cel_values() {
        // The bytes Envoy 1.40 answers for the property `metadata` after a Lua filter set
        // `{userid = "u1", groups = {"free", "x"}, exp = 1700000000, admin = true,
        // ratio = 0.5, metadata = {annotations = {["kuadrant.io/groups"] = "free,b"}}}` and
        // `plain = "str"` under envoy.filters.http.ext_authz (recorded from a real Envoy).
        let hex = "0ae5010a1c656e766f792e66696c746572732e687474702e6578745f617574687a12c4010a0e0a05706c61696e12051a037374720ab1010a086964656e7469747912a4012aa1010a0e0a0675736572696412041a0275310a410a086d6574616461746112352a330a310a0b616e6e6f746174696f6e7312222a200a1e0a126b75616472616e742e696f2f67726f75707312081a06667265652c620a120a05726174696f120911000000000000e03f0a0b0a0561646d696e120220010a190a0667726f757073120f320d0a061a04667265650a031a01780a100a0365787012091100000040fc54d941";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let v = decode_metadata_namespace(&bytes, "envoy.filters.http.ext_authz").unwrap();
        let ctx = crate::cel::functions::root_context();
        let mut scope = ctx.new_inner_scope();
        scope.add_variable_from_value("auth", v);
        let eval = |src: &str| scope.resolve(&cel_parser::parse(src).unwrap()).unwrap();
        assert_eq!(eval("auth.plain"), Value::String(Arc::new("str".into())));
        assert_eq!(eval("auth.identity.exp"), Value::Int(1_700_000_000));
        assert_eq!(eval("auth.identity.ratio"), Value::Float(0.5));
        assert_eq!(eval("auth.identity.admin"), Value::Bool(true));
        assert_eq!(
            eval(r#"auth.identity.groups.exists(g, g == "x")"#),
            Value::Bool(true)
        );
        assert_eq!(eval("size(auth.identity.groups)"), Value::Int(2));
        assert_eq!(
            eval(r#"auth.identity.metadata.annotations["kuadrant.io/groups"].split(",")[1]"#),
            Value::String(Arc::new("b".into()))
        );
        assert_eq!(decode_metadata_namespace(&bytes, "other"), None);
        assert_eq!(decode_metadata_namespace(b"\xff\xff", "ns"), None);
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
