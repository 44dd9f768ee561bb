//! The events: facts in, money derived.
//!
//! Each event is one JSON object. The common fields (`id`, `schema_version`,
//! `kind`, `occurred_at`, `tenant_id`, `key_id`, `request_id`) are top-level
//! keys; the rest depends on `kind`. Consumers accept any event of the same
//! major `schema_version` and ignore fields they do not know, so adding a field
//! is a minor version bump and never breaks a running meter.
//!
//! `id` is a UUIDv7: time-ordered, so ClickHouse's sorting key and JetStream's
//! dedup window both see ids in roughly arrival order, and an id alone tells
//! when its event was made. It is also the `Nats-Msg-Id`, and it is the one and
//! only identity of an event downstream (never the stream sequence).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version this code writes.
pub const SCHEMA_VERSION: &str = "1.0";
/// The major version this code reads.
pub const SCHEMA_MAJOR: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Request,
    Usage,
    TokenCount,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Request, EventKind::Usage, EventKind::TokenCount];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Request => "request",
            EventKind::Usage => "usage",
            EventKind::TokenCount => "token_count",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The API surface a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiFormat {
    OpenaiChat,
    OpenaiCompletions,
    OpenaiResponses,
    OpenaiEmbeddings,
    OpenaiModels,
    AnthropicMessages,
    AnthropicCountTokens,
    Other,
}

/// Fields every event carries, top-level in its JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventMeta {
    /// UUIDv7; also the `Nats-Msg-Id`. The event's only identity.
    pub id: Uuid,
    /// `MAJOR.MINOR`; readers accept any event of their major.
    pub schema_version: String,
    pub occurred_at: DateTime<Utc>,
    pub tenant_id: String,
    pub key_id: String,
    /// The value the client saw in `x-request-id`.
    pub request_id: String,
}

impl EventMeta {
    /// A fresh id and the current time.
    pub fn new(
        tenant_id: impl Into<String>,
        key_id: impl Into<String>,
        request_id: impl Into<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            schema_version: SCHEMA_VERSION.to_owned(),
            occurred_at: Utc::now(),
            tenant_id: tenant_id.into(),
            key_id: key_id.into(),
            request_id: request_id.into(),
        }
    }
}

/// Token counts by kind, with ARCHITECTURE.md's meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenCounts {
    /// Input excluding cache reads and cache writes.
    pub input_tokens: u64,
    /// Output including reasoning.
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// How many of `output_tokens` were reasoning.
    pub reasoning_tokens: u64,
}

impl TokenCounts {
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens
    }
}

/// One request that reached an upstream: the billable facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageEvent {
    #[serde(flatten)]
    pub meta: EventMeta,
    pub api: ApiFormat,
    /// The public model name the client asked for.
    pub requested_model: String,
    /// The model the upstream says served it.
    pub model: String,
    /// `openai` or `anthropic` (the upstream's wire format).
    pub provider: String,
    /// The configured deployment that served it.
    pub deployment: String,
    pub tokens: TokenCounts,
    /// True when the counts came from the tokenizer (stream cut, upstream gave none).
    pub estimated: bool,
    /// HTTP status the client got.
    pub status: u16,
    pub streamed: bool,
    pub latency_ms: u64,
    /// Time to first token, for streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// Upstream attempts beyond the first.
    #[serde(default)]
    pub retries: u32,
    /// The price-book version `cost` was computed at.
    pub price_version: u64,
    /// Exact, unrounded USD.
    #[serde(with = "rust_decimal::serde::str")]
    #[schemars(with = "String", regex(pattern = r"^-?[0-9]+(\.[0-9]+)?$"))]
    pub cost: Decimal,
}

/// Every request, success or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequestEvent {
    #[serde(flatten)]
    pub meta: EventMeta,
    pub api: ApiFormat,
    pub method: String,
    pub route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub status: u16,
    /// The error type the client got, if any (`invalid_request_error`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    pub streamed: bool,
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    Upstream,
    Tokenizer,
}

/// A token count that is recorded but never billed (`count_tokens`, TPM estimates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenCountEvent {
    #[serde(flatten)]
    pub meta: EventMeta,
    pub api: ApiFormat,
    pub model: String,
    pub input_tokens: u64,
    pub source: CountSource,
}

/// Any event, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Request(RequestEvent),
    Usage(UsageEvent),
    TokenCount(TokenCountEvent),
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed event JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema_version {0:?} (this reader understands {SCHEMA_MAJOR}.x)")]
    UnsupportedVersion(String),
    #[error("invalid event: {0}")]
    Invalid(String),
}

impl Event {
    pub fn meta(&self) -> &EventMeta {
        match self {
            Event::Request(e) => &e.meta,
            Event::Usage(e) => &e.meta,
            Event::TokenCount(e) => &e.meta,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::Request(_) => EventKind::Request,
            Event::Usage(_) => EventKind::Usage,
            Event::TokenCount(_) => EventKind::TokenCount,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types cannot fail: no maps with non-string keys, no
        // custom Serialize that errors. Fall back to an empty object rather than panic.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Decode and validate: version major, non-empty identities.
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        let event: Event = serde_json::from_slice(bytes)?;
        event.validate()?;
        Ok(event)
    }

    pub fn validate(&self) -> Result<(), DecodeError> {
        let meta = self.meta();
        check_version(&meta.schema_version)?;
        if meta.tenant_id.is_empty() {
            return Err(DecodeError::Invalid("empty tenant_id".into()));
        }
        if meta.request_id.is_empty() {
            return Err(DecodeError::Invalid("empty request_id".into()));
        }
        Ok(())
    }
}

/// Accepts `N` or `N.M` where `N` is [`SCHEMA_MAJOR`].
pub fn check_version(v: &str) -> Result<(), DecodeError> {
    let major = v.split('.').next().and_then(|m| m.parse::<u32>().ok());
    if major == Some(SCHEMA_MAJOR) {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion(v.to_owned()))
    }
}

/// The JSON Schema of each event kind, as committed under `schemas/json/`.
pub fn json_schemas() -> Vec<(&'static str, serde_json::Value)> {
    let to_value = |s: schemars::Schema| s.to_value();
    vec![
        ("event.schema.json", to_value(schemars::schema_for!(Event))),
        (
            "request.schema.json",
            to_value(schemars::schema_for!(RequestEvent)),
        ),
        (
            "usage.schema.json",
            to_value(schemars::schema_for!(UsageEvent)),
        ),
        (
            "token_count.schema.json",
            to_value(schemars::schema_for!(TokenCountEvent)),
        ),
    ]
}
