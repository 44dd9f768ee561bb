//! Byte-level JSON writing helpers, the deterministic reply words, random ids
//! and the providers' error bodies. Everything writes into a caller-owned
//! `Vec<u8>`, so a response is built with one allocation.

use axum::body::Body;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use rand::Rng;

pub(super) const JSON: HeaderValue = HeaderValue::from_static("application/json");
pub(super) const EVENT_STREAM: HeaderValue =
    HeaderValue::from_static("text/event-stream; charset=utf-8");
pub(super) const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");

/// Which provider's conventions a route follows (error shape, ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Api {
    OpenAi,
    Anthropic,
}

/// Token counts of one reply, in the mock's own terms (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Usage {
    /// Uncached prompt tokens: the word rule.
    pub prompt: u64,
    /// Cache-read tokens (`x-mock-cached-tokens`), on top of `prompt`.
    pub cached: u64,
    /// Visible output tokens: the reply's words.
    pub output: u64,
    /// Reasoning tokens (`x-mock-reasoning-tokens`), on top of `output`.
    pub reasoning: u64,
}

/// Appends the decimal digits of `n`.
pub(super) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `s` as a JSON string literal, quotes included.
pub(super) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    push_json_str_inner(out, s);
    out.push(b'"');
}

/// Appends `s` escaped for the inside of a JSON string literal.
pub(super) fn push_json_str_inner(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Appends output token `i` (0-based): `mock`, `reply`, `word1`, `word2`, ...
pub(super) fn push_word(out: &mut Vec<u8>, i: u64) {
    match i {
        0 => out.extend_from_slice(b"mock"),
        1 => out.extend_from_slice(b"reply"),
        _ => {
            out.extend_from_slice(b"word");
            push_u64(out, i - 1);
        }
    }
}

/// Appends the whole reply text of `n` tokens: every word followed by one
/// space, exactly the concatenation of the streamed deltas.
pub(super) fn push_words(out: &mut Vec<u8>, n: u64) {
    for i in 0..n {
        push_word(out, i);
        out.push(b' ');
    }
}

/// Appends `n` random ASCII letters and digits.
pub(super) fn push_random_id(out: &mut Vec<u8>, n: usize) {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    for _ in 0..n {
        out.push(ALPHABET[rng.random_range(0..ALPHABET.len())]);
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whitespace-separated words in `s`.
pub(super) fn count_words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Appends an OpenAI `usage` object. `detailed` adds the
/// `prompt_tokens_details` / `completion_tokens_details` objects (chat always;
/// legacy completions only when there are cached or reasoning tokens).
pub(super) fn push_openai_usage(out: &mut Vec<u8>, u: &Usage, detailed: bool) {
    let prompt = u.prompt + u.cached;
    let completion = u.output + u.reasoning;
    out.extend_from_slice(b"{\"prompt_tokens\":");
    push_u64(out, prompt);
    out.extend_from_slice(b",\"completion_tokens\":");
    push_u64(out, completion);
    out.extend_from_slice(b",\"total_tokens\":");
    push_u64(out, prompt + completion);
    if detailed {
        out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
        push_u64(out, u.cached);
        out.extend_from_slice(
            b",\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":",
        );
        push_u64(out, u.reasoning);
        out.extend_from_slice(
            b",\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}",
        );
    }
    out.push(b'}');
}

/// Appends an Anthropic `usage` object (`output` overrides the output count,
/// for `message_start`'s `output_tokens: 1`).
pub(super) fn push_anthropic_usage(out: &mut Vec<u8>, u: &Usage, output: u64) {
    out.extend_from_slice(b"{\"input_tokens\":");
    push_u64(out, u.prompt);
    out.extend_from_slice(b",\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":");
    push_u64(out, u.cached);
    out.extend_from_slice(b",\"output_tokens\":");
    push_u64(out, output);
    out.push(b'}');
}

/// A complete `application/json` response.
pub(super) fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, JSON);
    resp
}

/// A `text/event-stream` response around a streaming body.
pub(super) fn sse_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, EVENT_STREAM);
    headers.insert(CACHE_CONTROL, NO_CACHE);
    resp
}

/// An error in the provider's own shape. 429s carry `retry-after: 1`.
///
/// OpenAI: `{"error":{"message":..,"type":..,"param":null,"code":..}}`.
/// Anthropic: `{"type":"error","error":{"type":..,"message":..}}`.
pub(super) fn error_response(api: Api, status: StatusCode, message: &str) -> Response {
    let mut out = Vec::with_capacity(128 + message.len());
    match api {
        Api::OpenAi => {
            let (kind, code) = openai_error_kind(status);
            out.extend_from_slice(b"{\"error\":{\"message\":");
            push_json_str(&mut out, message);
            out.extend_from_slice(b",\"type\":\"");
            out.extend_from_slice(kind.as_bytes());
            out.extend_from_slice(b"\",\"param\":null,\"code\":");
            match code {
                Some(code) => {
                    out.push(b'"');
                    out.extend_from_slice(code.as_bytes());
                    out.push(b'"');
                }
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b"}}");
        }
        Api::Anthropic => {
            out.extend_from_slice(b"{\"type\":\"error\",\"error\":{\"type\":\"");
            out.extend_from_slice(anthropic_error_kind(status).as_bytes());
            out.extend_from_slice(b"\",\"message\":");
            push_json_str(&mut out, message);
            out.extend_from_slice(b"}}");
        }
    }
    let mut resp = json_response(status, out);
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// The error `message` the mock uses for an injected failure.
pub(super) fn injected_message(status: StatusCode) -> String {
    format!(
        "mock upstream: injected failure {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    )
}

/// OpenAI's error `type` and `code` for a status, as the real API uses them.
fn openai_error_kind(status: StatusCode) -> (&'static str, Option<&'static str>) {
    match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => (
            "invalid_request_error",
            Some("unsupported_country_region_territory"),
        ),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    }
}

/// Anthropic's error `type` for a status, per its errors documentation.
fn anthropic_error_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_words() {
        let mut out = Vec::new();
        push_u64(&mut out, 0);
        out.push(b' ');
        push_u64(&mut out, 18_446_744_073_709_551_615);
        out.push(b' ');
        push_words(&mut out, 4);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "0 18446744073709551615 mock reply word1 word2 "
        );
    }

    #[test]
    fn json_escaping_round_trips() {
        let s = "a\"b\\c\nd\u{1}e\u{7f}é\t";
        let mut out = Vec::new();
        push_json_str(&mut out, s);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, s);
    }
}
