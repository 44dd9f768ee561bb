//! Token estimates with a real tokenizer (tiktoken's `o200k_base`), used when
//! an upstream gives no usage (stream cut, client gone) and for TPM limits.
//! The vocabulary ships inside the crate: nothing is downloaded.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

fn bpe() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

/// Loads the vocabulary now rather than on the first estimate.
pub fn warm_up() {
    let _ = bpe();
}

pub fn count(text: &str) -> u64 {
    match bpe() {
        Some(b) => b.encode_ordinary(text).len() as u64,
        // Unreachable in practice (the vocabulary is compiled in); a rough
        // 4-bytes-per-token fallback beats refusing to meter.
        None => (text.len() as u64).div_ceil(4),
    }
}

/// Input tokens of a chat or completions request body, OpenAI's way:
/// 3 tokens of framing per message plus 3 for the reply's priming.
pub fn estimate_request_input(body: &serde_json::Map<String, Value>) -> u64 {
    let mut n = 0;
    if let Some(Value::Array(msgs)) = body.get("messages") {
        for m in msgs {
            n += 3;
            if let Some(obj) = m.as_object() {
                for (k, v) in obj {
                    if k == "role" || k == "content" || k == "name" || k == "tool_calls" {
                        n += count_value(v);
                    }
                }
            }
        }
        n += 3;
    }
    if let Some(p) = body.get("input") {
        n += count_value(p);
    }
    if let Some(p) = body.get("prompt") {
        n += count_value(p);
    }
    if let Some(s) = body.get("system") {
        n += count_value(s);
    }
    if let Some(t) = body.get("tools") {
        n += count(&t.to_string());
    }
    n
}

fn count_value(v: &Value) -> u64 {
    match v {
        Value::String(s) => count(s),
        Value::Array(a) => a.iter().map(count_value).sum(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                if k == "text" || k == "content" || k == "arguments" {
                    count_value(v)
                } else if k == "type" {
                    0
                } else {
                    count_value(v)
                }
            })
            .sum(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_real_vocabulary() {
        assert_eq!(count("hello world"), 2);
        let body = serde_json::json!({"messages": [{"role": "user", "content": "hello world"}]});
        let n = estimate_request_input(body.as_object().unwrap());
        assert_eq!(n, 3 + 1 + 2 + 3);
    }
}
