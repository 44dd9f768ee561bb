//! Per-request behaviour controls, from `x-mock-*` headers and from segments
//! of the model name (so they survive a gateway that rewrites the model and
//! drops unknown headers). A header wins over the model name.

use axum::http::{HeaderMap, StatusCode};

/// Most output tokens a reply may have.
pub(super) const MAX_OUTPUT_TOKENS: u64 = 100_000;

/// What one request asked the mock to do.
#[derive(Debug, Default)]
pub(super) struct Controls {
    pub latency_ms: u64,
    pub chunk_delay_ms: u64,
    pub fail: Option<StatusCode>,
    pub cut_after: Option<u64>,
    pub output_tokens: Option<u64>,
    pub tool_call: Option<String>,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub no_usage: bool,
}

/// The numeric controls: header suffix (after `x-mock-`), also the model-name
/// segment prefix.
const NUMERIC: [&str; 7] = [
    "latency-ms",
    "chunk-delay-ms",
    "fail",
    "cut-after",
    "output-tokens",
    "cached-tokens",
    "reasoning-tokens",
];

impl Controls {
    /// Reads the model name's segments first, then the headers over them.
    pub(super) fn new(headers: &HeaderMap, model: &str) -> Self {
        let mut c = Self::default();
        c.apply_model(model);
        for (name, value) in headers {
            if let Some(key) = name.as_str().strip_prefix("x-mock-")
                && let Ok(value) = value.to_str()
            {
                c.set(key, value.trim());
            }
        }
        c
    }

    /// Output tokens of the reply: `x-mock-output-tokens` (capped at
    /// 100000), else `min(max_tokens, 16)`.
    pub(super) fn output_words(&self, max_tokens: Option<u64>) -> u64 {
        match self.output_tokens {
            Some(n) => n.min(MAX_OUTPUT_TOKENS),
            None => max_tokens.unwrap_or(16).min(16),
        }
    }

    fn set(&mut self, key: &str, value: &str) {
        match key {
            "tool-call" => {
                if !value.is_empty() {
                    self.tool_call = Some(value.to_owned());
                }
            }
            "no-usage" => self.no_usage = !matches!(value, "" | "0" | "false"),
            _ => {
                if let Ok(n) = value.parse::<u64>() {
                    self.set_number(key, n);
                }
            }
        }
    }

    fn set_number(&mut self, key: &str, n: u64) {
        match key {
            "latency-ms" => self.latency_ms = n,
            "chunk-delay-ms" => self.chunk_delay_ms = n,
            "fail" => {
                self.fail = u16::try_from(n)
                    .ok()
                    .and_then(|n| StatusCode::from_u16(n).ok())
                    .filter(|s| s.is_client_error() || s.is_server_error());
            }
            "cut-after" => self.cut_after = Some(n),
            "output-tokens" => self.output_tokens = Some(n),
            "cached-tokens" => self.cached_tokens = n,
            "reasoning-tokens" => self.reasoning_tokens = n,
            _ => {}
        }
    }

    /// Model-name segments: `<control>-<number>` for the numeric controls
    /// (e.g. `mock-gpt-fail-503`, `mock-latency-ms-200-cut-after-3`),
    /// `no-usage`, and `tool-call-<name>` (name of `[A-Za-z0-9_]`).
    fn apply_model(&mut self, model: &str) {
        // Every control contains a '-'; most model names have few.
        if !model.contains('-') {
            return;
        }
        for key in NUMERIC {
            if let Some(rest) = segment(model, key)
                && let Some(rest) = rest.strip_prefix('-')
            {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                if let Ok(n) = rest[..digits].parse::<u64>() {
                    self.set_number(key, n);
                }
            }
        }
        if let Some(rest) = segment(model, "no-usage")
            && (rest.is_empty() || rest.starts_with(is_separator))
        {
            self.no_usage = true;
        }
        if let Some(rest) = segment(model, "tool-call") {
            let name = rest.strip_prefix('-').unwrap_or("");
            let len = name
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            self.tool_call = Some(if len == 0 {
                "mock_tool".to_owned()
            } else {
                name[..len].to_owned()
            });
        }
    }
}

fn is_separator(c: char) -> bool {
    matches!(c, '-' | '_' | ':' | '/' | '@' | '.' | '+')
}

/// The text after the first occurrence of `key` in `model` that starts the
/// name or follows a separator.
fn segment<'a>(model: &'a str, key: &str) -> Option<&'a str> {
    model.match_indices(key).find_map(|(i, _)| {
        let at_boundary = model[..i].chars().next_back().is_none_or(is_separator);
        at_boundary.then(|| &model[i + key.len()..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn model_segments() {
        let c = Controls::new(
            &HeaderMap::new(),
            "mock-gpt-fail-503-latency-ms-20-cut-after-3-no-usage-tool-call-get_weather",
        );
        assert_eq!(c.fail, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(c.latency_ms, 20);
        assert_eq!(c.cut_after, Some(3));
        assert!(c.no_usage);
        assert_eq!(c.tool_call.as_deref(), Some("get_weather"));
        assert_eq!(c.output_tokens, None);

        let c = Controls::new(&HeaderMap::new(), "gpt-4o-mini");
        assert!(c.fail.is_none() && c.tool_call.is_none() && !c.no_usage);
        let c = Controls::new(&HeaderMap::new(), "x-prefail-503");
        assert!(c.fail.is_none());
        let c = Controls::new(&HeaderMap::new(), "mock-fail-200");
        assert!(c.fail.is_none());
    }

    #[test]
    fn headers_override_model() {
        let mut h = HeaderMap::new();
        h.insert("x-mock-fail", HeaderValue::from_static("429"));
        h.insert("x-mock-output-tokens", HeaderValue::from_static(" 40 "));
        h.insert("x-mock-no-usage", HeaderValue::from_static("1"));
        let c = Controls::new(&h, "mock-fail-503-output-tokens-5");
        assert_eq!(c.fail, Some(StatusCode::TOO_MANY_REQUESTS));
        assert_eq!(c.output_words(Some(3)), 40);
        assert!(c.no_usage);
        assert_eq!(Controls::default().output_words(None), 16);
        assert_eq!(Controls::default().output_words(Some(5)), 5);
        assert_eq!(Controls::default().output_words(Some(500)), 16);
    }
}
