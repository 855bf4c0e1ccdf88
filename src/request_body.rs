//! Rewrites of the request body before it goes upstream.
//!
//! An OpenAI chat completion or completion streamed with `"stream": true` reports its usage
//! only when the request sets `stream_options.include_usage: true`
//! ([API](https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options)):
//! the usage then comes in a last chunk before `data: [DONE]`. Without it, a streamed answer
//! could not be charged what it used, so [`inject_include_usage`] asks for it.

use crate::usage::json;
use serde_json::Value;

/// Adds `stream_options.include_usage: true` to an OpenAI request body (UTF-8 JSON) that asks
/// for `"stream": true` without it; for requests to the paths of
/// [`Format::is_openai_streaming`](crate::usage::Format::is_openai_streaming).
///
/// Returns the new body, or `None` when nothing is to change (not UTF-8, not one JSON object,
/// not streaming, usage already requested). As when the body is read as a `serde_json::Value`,
/// the last of duplicate keys counts. Without a `stream_options` member, the member is added
/// last, before the closing brace, and the client's bytes before it are kept as they are (so
/// that only the body's last bytes change: the proxy may have sent the rest on); otherwise the
/// body is parsed and serialized again (compact, the other members of `stream_options` kept).
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    // Most bodies need no rewrite. A body without the bytes `stream` and without any escape
    // (a key could spell `stream` with `\u` escapes) cannot ask for streaming: two byte
    // searches instead of a read.
    if memchr::memmem::find(body, b"stream").is_none() && memchr::memchr(b'\\', body).is_none()
    {
        return None;
    }
    // Otherwise, find out without building the document (its messages).
    let text = std::str::from_utf8(body).ok()?;
    let streaming = json::read(text, json::Read::StreamRequest)?.streaming()?;
    if !streaming.wants_usage {
        return None;
    }
    if !streaming.has_options {
        // The usual case: the member goes last, the client's bytes stay as they are.
        let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
        if body.get(close) != Some(&b'}') {
            return None;
        }
        let member = br#","stream_options":{"include_usage":true}"#;
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(body.get(..close)?);
        out.extend_from_slice(member);
        out.extend_from_slice(body.get(close..)?);
        return Some(out);
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let obj = doc.as_object_mut()?;
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let options = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !options.is_object() {
        *options = Value::Object(serde_json::Map::new());
    }
    let options = options.as_object_mut()?;
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&doc).ok()
}

/// Whether `body` is one complete JSON document (an object or array, as its last byte other
/// than whitespace closes it): a cheap test first, a parse (without building values) only then.
pub fn is_complete_json(body: &[u8]) -> bool {
    let last = body.iter().rposition(|b| !b.is_ascii_whitespace());
    matches!(last.and_then(|i| body.get(i)), Some(b'}' | b']'))
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_is_injected_only_into_streaming_requests_without_it() {
        // Without stream_options, the member is added last and the client's bytes are kept.
        assert_eq!(
            inject_include_usage(b" \n{ \"messages\": [{\"content\": \"stream\"}], \"stream\" : true }\n")
                .as_deref(),
            Some(&b" \n{ \"messages\": [{\"content\": \"stream\"}], \"stream\" : true ,\"stream_options\":{\"include_usage\":true}}\n"[..])
        );
        // Duplicate keys: the last one counts, as when the body is read as a `Value`.
        assert!(inject_include_usage(br#"{"stream":true,"stream":false}"#).is_none());
        assert!(inject_include_usage(br#"{"stream":false,"stream":true}"#).is_some());
        let out = inject_include_usage(br#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let out = inject_include_usage(
            br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert_eq!(
            inject_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        assert_eq!(inject_include_usage(br#"{"stream":false}"#), None);
        assert_eq!(inject_include_usage(br#"{"model":"m"}"#), None);
        assert_eq!(inject_include_usage(b"[1,2]"), None);
        assert_eq!(inject_include_usage(b"\xff not json"), None);
        // A key spelled with escapes is still the key.
        assert!(inject_include_usage(br#"{"\u0073tream":true}"#).is_some());
        assert!(inject_include_usage(br#"{"str\u0065am":true}"#).is_some());
    }

    #[test]
    fn a_body_is_complete_json_only_when_its_document_closes() {
        assert!(is_complete_json(b"{\"a\": [1, {\"b\": 2}]} \r\n"));
        assert!(!is_complete_json(b"{\"a\": [1, {\"b\": 2}]"));
        assert!(!is_complete_json(b"{\"a\": [1, {\"b\": 2}"));
        assert!(!is_complete_json(b"{\"a\": \"}\""));
        assert!(!is_complete_json(b""));
    }
}
