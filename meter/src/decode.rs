//! From a delivered message to a ClickHouse row, or to a reason it is poison.
//!
//! Usage events are the hot path (one per billable request, the bulk of the
//! stream), so they are deserialized straight into a flat wire struct chosen
//! by the subject's kind: no `#[serde(flatten)]` (which buffers every field in
//! an intermediate map) and no intermediate `Event`. The slower generic path,
//! `Event::from_json`, is the ground truth: it decodes request and
//! token-count events, and whenever the fast path refuses a message the
//! generic path decides what it is, so the reason a message is dead-lettered
//! never depends on which path saw it. `fast_path_agrees_with_event_from_json`
//! pins the two together.
//!
//! Accepted: any event of this major `schema_version` with a non-empty
//! `tenant_id` and `request_id` (the contract's `Event::validate`), whose body
//! `kind` matches the subject's, and which fits the columns: `occurred_at`
//! between 1970 and 2106 (`DateTime`), `cost` with at most 12 decimal places.
//! `api` is stored as the string the gateway sent, so a newer gateway's API
//! format is recorded rather than refused.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use tollgate_schemas::events::{
    ApiFormat, CountSource, DecodeError, Event, EventKind, RequestEvent, TokenCountEvent,
    TokenCounts, check_version,
};
use tollgate_schemas::money::to_ch_decimal;
use uuid::Uuid;

use crate::rows::{RequestRow, TokenCountRow, UsageRow};

/// One decoded event, as the row for its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Usage(UsageRow),
    Request(RequestRow),
    TokenCount(TokenCountRow),
}

impl Decoded {
    pub fn kind(&self) -> EventKind {
        match self {
            Decoded::Usage(_) => EventKind::Usage,
            Decoded::Request(_) => EventKind::Request,
            Decoded::TokenCount(_) => EventKind::TokenCount,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Decoded::Usage(r) => &r.event_id,
            Decoded::Request(r) => &r.event_id,
            Decoded::TokenCount(r) => &r.event_id,
        }
    }

    pub fn tenant_id(&self) -> &str {
        match self {
            Decoded::Usage(r) => &r.tenant_id,
            Decoded::Request(r) => &r.tenant_id,
            Decoded::TokenCount(r) => &r.tenant_id,
        }
    }
}

/// Why a message can never be stored. Retrying will not help: it goes to the
/// dead-letter subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    #[error("malformed event: {0}")]
    Malformed(String),
    #[error("unsupported schema_version {0:?}")]
    UnsupportedVersion(String),
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("subject kind {subject} but body kind {body}")]
    KindMismatch {
        subject: &'static str,
        body: &'static str,
    },
}

impl Poison {
    /// A bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Poison::Malformed(_) => "malformed",
            Poison::UnsupportedVersion(_) => "unsupported_version",
            Poison::Invalid(_) => "invalid",
            Poison::KindMismatch { .. } => "kind_mismatch",
        }
    }
}

impl From<DecodeError> for Poison {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Json(e) => Poison::Malformed(e.to_string()),
            DecodeError::UnsupportedVersion(v) => Poison::UnsupportedVersion(v),
            DecodeError::Invalid(m) => Poison::Invalid(m),
        }
    }
}

/// Decodes one message. `subject_kind` is the kind its subject names (if it
/// names one); `seq` is its stream sequence; `now` the insert time (seconds).
pub fn decode(
    subject_kind: Option<EventKind>,
    payload: &[u8],
    seq: u64,
    now: u32,
) -> Result<Decoded, Poison> {
    if subject_kind == Some(EventKind::Usage)
        && let Ok(row) = decode_usage_fast(payload, seq, now)
    {
        return Ok(Decoded::Usage(row));
    }
    let event = Event::from_json(payload).map_err(|e| classify(payload, e))?;
    if let Some(subject) = subject_kind
        && subject != event.kind()
    {
        return Err(Poison::KindMismatch {
            subject: subject.as_str(),
            body: event.kind().as_str(),
        });
    }
    from_event(event, seq, now)
}

/// A refused event of another major version is reported as such, even when
/// (as is likely) its fields no longer match this version's.
fn classify(payload: &[u8], error: DecodeError) -> Poison {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, default)]
        schema_version: Option<Cow<'a, str>>,
    }
    if let Ok(Probe {
        schema_version: Some(v),
    }) = serde_json::from_slice::<Probe<'_>>(payload)
        && check_version(&v).is_err()
    {
        return Poison::UnsupportedVersion(v.into_owned());
    }
    error.into()
}

/// The flat wire form of a usage event: the contract's `UsageEvent` fields
/// plus `kind`, in one struct.
#[derive(Deserialize)]
struct UsageWire<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    schema_version: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    occurred_at: DateTime<Utc>,
    tenant_id: String,
    key_id: String,
    request_id: String,
    api: String,
    requested_model: String,
    model: String,
    provider: String,
    deployment: String,
    tokens: TokenCounts,
    estimated: bool,
    status: u16,
    streamed: bool,
    latency_ms: u64,
    #[serde(default)]
    ttft_ms: Option<u64>,
    #[serde(default)]
    retries: u32,
    price_version: u64,
    #[serde(with = "rust_decimal::serde::str")]
    cost: Decimal,
}

/// The fast path. Any error here sends the message down the generic path,
/// which decides (and words) the verdict.
fn decode_usage_fast(payload: &[u8], seq: u64, now: u32) -> Result<UsageRow, Poison> {
    let w: UsageWire<'_> =
        serde_json::from_slice(payload).map_err(|e| Poison::Malformed(e.to_string()))?;
    if w.kind != EventKind::Usage.as_str() {
        return Err(Poison::Malformed("not a usage event".into()));
    }
    check_version(&w.schema_version)?;
    let id = Uuid::try_parse(&w.id).map_err(|e| Poison::Malformed(e.to_string()))?;
    check_identities(&w.tenant_id, &w.request_id)?;
    Ok(UsageRow {
        event_id: event_id(id),
        occurred_at: seconds(w.occurred_at)?,
        tenant_id: w.tenant_id,
        key_id: w.key_id,
        request_id: w.request_id,
        api: w.api,
        requested_model: w.requested_model,
        model: w.model,
        provider: w.provider,
        deployment: w.deployment,
        input_tokens: w.tokens.input_tokens,
        output_tokens: w.tokens.output_tokens,
        cache_read_tokens: w.tokens.cache_read_tokens,
        cache_write_tokens: w.tokens.cache_write_tokens,
        reasoning_tokens: w.tokens.reasoning_tokens,
        cost: cost(w.cost)?,
        price_version: w.price_version,
        estimated: w.estimated,
        streamed: w.streamed,
        status: w.status,
        latency_ms: w.latency_ms,
        ttft_ms: w.ttft_ms,
        retries: w.retries,
        schema_version: w.schema_version.into_owned(),
        stream_seq: seq,
        inserted_at: now,
    })
}

/// The generic path: an already validated `Event` to its row.
pub fn from_event(event: Event, seq: u64, now: u32) -> Result<Decoded, Poison> {
    Ok(match event {
        Event::Usage(e) => Decoded::Usage(UsageRow {
            event_id: event_id(e.meta.id),
            occurred_at: seconds(e.meta.occurred_at)?,
            tenant_id: e.meta.tenant_id,
            key_id: e.meta.key_id,
            request_id: e.meta.request_id,
            api: api_str(e.api).to_owned(),
            requested_model: e.requested_model,
            model: e.model,
            provider: e.provider,
            deployment: e.deployment,
            input_tokens: e.tokens.input_tokens,
            output_tokens: e.tokens.output_tokens,
            cache_read_tokens: e.tokens.cache_read_tokens,
            cache_write_tokens: e.tokens.cache_write_tokens,
            reasoning_tokens: e.tokens.reasoning_tokens,
            cost: cost(e.cost)?,
            price_version: e.price_version,
            estimated: e.estimated,
            streamed: e.streamed,
            status: e.status,
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            retries: e.retries,
            schema_version: e.meta.schema_version,
            stream_seq: seq,
            inserted_at: now,
        }),
        Event::Request(e) => Decoded::Request(request_row(e, seq, now)?),
        Event::TokenCount(e) => Decoded::TokenCount(token_count_row(e, seq, now)?),
    })
}

fn request_row(e: RequestEvent, seq: u64, now: u32) -> Result<RequestRow, Poison> {
    Ok(RequestRow {
        event_id: event_id(e.meta.id),
        occurred_at: seconds(e.meta.occurred_at)?,
        tenant_id: e.meta.tenant_id,
        key_id: e.meta.key_id,
        request_id: e.meta.request_id,
        api: api_str(e.api).to_owned(),
        method: e.method,
        route: e.route,
        model: e.model,
        status: e.status,
        error_type: e.error_type,
        streamed: e.streamed,
        latency_ms: e.latency_ms,
        deployment: e.deployment,
        schema_version: e.meta.schema_version,
        stream_seq: seq,
        inserted_at: now,
    })
}

fn token_count_row(e: TokenCountEvent, seq: u64, now: u32) -> Result<TokenCountRow, Poison> {
    Ok(TokenCountRow {
        event_id: event_id(e.meta.id),
        occurred_at: seconds(e.meta.occurred_at)?,
        tenant_id: e.meta.tenant_id,
        key_id: e.meta.key_id,
        request_id: e.meta.request_id,
        api: api_str(e.api).to_owned(),
        model: e.model,
        input_tokens: e.input_tokens,
        source: match e.source {
            CountSource::Upstream => "upstream",
            CountSource::Tokenizer => "tokenizer",
        }
        .to_owned(),
        schema_version: e.meta.schema_version,
        stream_seq: seq,
        inserted_at: now,
    })
}

fn check_identities(tenant_id: &str, request_id: &str) -> Result<(), Poison> {
    if tenant_id.is_empty() {
        return Err(Poison::Invalid("empty tenant_id".into()));
    }
    if request_id.is_empty() {
        return Err(Poison::Invalid("empty request_id".into()));
    }
    Ok(())
}

/// The canonical text of an id (lowercase, hyphenated), whatever form the
/// JSON used: one event, one `event_id`, one row after `FINAL`.
fn event_id(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn seconds(t: DateTime<Utc>) -> Result<u32, Poison> {
    u32::try_from(t.timestamp()).map_err(|_| {
        Poison::Invalid(format!(
            "occurred_at {t} is outside ClickHouse DateTime's range"
        ))
    })
}

fn cost(c: Decimal) -> Result<i128, Poison> {
    to_ch_decimal(c).map_err(|e| Poison::Invalid(format!("cost: {e}")))
}

/// The serde name of an API format (what the JSON carries).
pub fn api_str(api: ApiFormat) -> &'static str {
    match api {
        ApiFormat::OpenaiChat => "openai_chat",
        ApiFormat::OpenaiCompletions => "openai_completions",
        ApiFormat::OpenaiResponses => "openai_responses",
        ApiFormat::OpenaiEmbeddings => "openai_embeddings",
        ApiFormat::OpenaiModels => "openai_models",
        ApiFormat::AnthropicMessages => "anthropic_messages",
        ApiFormat::AnthropicCountTokens => "anthropic_count_tokens",
        ApiFormat::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use serde_json::{Value, json};
    use tollgate_schemas::events::{EventMeta, UsageEvent};

    use super::*;

    fn usage() -> UsageEvent {
        UsageEvent {
            meta: EventMeta::new("acme", "key-1", "req-\"quoted\"-é"),
            api: ApiFormat::AnthropicMessages,
            requested_model: "claude".into(),
            model: "claude-x".into(),
            provider: "anthropic".into(),
            deployment: "d1".into(),
            tokens: TokenCounts {
                input_tokens: 10,
                output_tokens: 20,
                cache_read_tokens: 3,
                cache_write_tokens: 4,
                reasoning_tokens: 5,
            },
            estimated: true,
            status: 200,
            streamed: true,
            latency_ms: 321,
            ttft_ms: Some(12),
            retries: 1,
            price_version: 7,
            cost: Decimal::from_str("0.000123456789").unwrap(),
        }
    }

    fn json_of(e: &UsageEvent) -> Value {
        serde_json::from_slice(&Event::Usage(e.clone()).to_json()).unwrap()
    }

    fn generic(payload: &[u8]) -> Result<Decoded, Poison> {
        let event = Event::from_json(payload)?;
        from_event(event, 9, 100)
    }

    #[test]
    fn api_names_match_serde() {
        for api in [
            ApiFormat::OpenaiChat,
            ApiFormat::OpenaiCompletions,
            ApiFormat::OpenaiResponses,
            ApiFormat::OpenaiEmbeddings,
            ApiFormat::OpenaiModels,
            ApiFormat::AnthropicMessages,
            ApiFormat::AnthropicCountTokens,
            ApiFormat::Other,
        ] {
            assert_eq!(serde_json::to_value(api).unwrap(), json!(api_str(api)));
        }
    }

    /// The fast path accepts exactly what the contract accepts, and produces
    /// the same row.
    #[test]
    fn fast_path_agrees_with_event_from_json() {
        let base = json_of(&usage());
        let mut cases: Vec<Value> = vec![base.clone()];
        let edits: Vec<(&str, Value)> = vec![
            ("schema_version", json!("1.7")),
            ("schema_version", json!("2.0")),
            ("schema_version", json!("x")),
            ("tenant_id", json!("")),
            ("request_id", json!("")),
            ("tenant_id", json!(5)),
            ("kind", json!("request")),
            ("kind", json!("nope")),
            ("cost", json!("1.5")),
            ("cost", json!(1.5)),
            ("cost", json!("0.0000000000001")),
            ("status", json!(70000)),
            ("ttft_ms", Value::Null),
            ("id", json!("not-a-uuid")),
            ("id", json!("0191A2B3-C4D5-7E6F-8A9B-0C1D2E3F4A5B")),
            ("occurred_at", json!("2026-03-01T12:00:00.999+02:00")),
            ("occurred_at", json!("1960-01-01T00:00:00Z")),
            ("unknown_future_field", json!({"a": [1, 2]})),
            (
                "tokens",
                json!({"input_tokens": 1, "output_tokens": 2, "cache_read_tokens": 0, "cache_write_tokens": 0}),
            ),
        ];
        for (k, v) in edits {
            let mut c = base.clone();
            c[k] = v;
            cases.push(c);
        }
        for k in [
            "ttft_ms", "retries", "model", "id", "kind", "cost", "tokens",
        ] {
            let mut c = base.clone();
            c.as_object_mut().unwrap().remove(k);
            cases.push(c);
        }
        for case in cases {
            let bytes = serde_json::to_vec(&case).unwrap();
            let fast = decode_usage_fast(&bytes, 9, 100).map(Decoded::Usage);
            let slow = generic(&bytes);
            match (&fast, &slow) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{case}"),
                (Err(_), Err(_)) => {}
                _ => panic!("paths disagree on {case}: fast {fast:?}, generic {slow:?}"),
            }
            // And the public entry point always follows the generic verdict.
            match (decode(Some(EventKind::Usage), &bytes, 9, 100), slow) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (Err(Poison::KindMismatch { .. }), Ok(b)) => assert_ne!(b.kind(), EventKind::Usage),
                (a, b) => panic!("decode disagrees on {case}: {a:?} vs {b:?}"),
            }
        }
    }

    #[test]
    fn usage_row_carries_every_fact() {
        let e = usage();
        let bytes = Event::Usage(e.clone()).to_json();
        let Decoded::Usage(row) = decode(Some(EventKind::Usage), &bytes, 42, 1_000).unwrap() else {
            panic!("not usage")
        };
        assert_eq!(row.event_id, e.meta.id.to_string());
        assert_eq!(row.request_id, "req-\"quoted\"-é");
        assert_eq!(row.api, "anthropic_messages");
        assert_eq!(
            (
                row.input_tokens,
                row.output_tokens,
                row.cache_read_tokens,
                row.cache_write_tokens,
                row.reasoning_tokens
            ),
            (10, 20, 3, 4, 5)
        );
        assert_eq!(row.cost, 123_456_789);
        assert_eq!(
            (row.stream_seq, row.inserted_at, row.ttft_ms),
            (42, 1_000, Some(12))
        );
        assert_eq!(i64::from(row.occurred_at), e.meta.occurred_at.timestamp());
    }

    #[test]
    fn kind_mismatch_and_garbage_are_poison() {
        let req = Event::Request(RequestEvent {
            meta: EventMeta::new("acme", "k", "r"),
            api: ApiFormat::OpenaiChat,
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            model: None,
            status: 400,
            error_type: Some("invalid_request_error".into()),
            streamed: false,
            latency_ms: 3,
            deployment: None,
        });
        let bytes = req.to_json();
        assert!(matches!(
            decode(Some(EventKind::Request), &bytes, 1, 0),
            Ok(Decoded::Request(_))
        ));
        assert!(matches!(
            decode(None, &bytes, 1, 0),
            Ok(Decoded::Request(_))
        ));
        assert_eq!(
            decode(Some(EventKind::Usage), &bytes, 1, 0)
                .unwrap_err()
                .label(),
            "kind_mismatch"
        );
        assert_eq!(
            decode(Some(EventKind::Usage), b"{not json", 1, 0)
                .unwrap_err()
                .label(),
            "malformed"
        );
        let mut v = json_of(&usage());
        v["schema_version"] = json!("2.0");
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(
            decode(Some(EventKind::Usage), &bytes, 1, 0)
                .unwrap_err()
                .label(),
            "unsupported_version"
        );
    }
}
