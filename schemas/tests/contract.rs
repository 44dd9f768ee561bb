//! The event contract: JSON Schemas are current, events round-trip, readers
//! accept their major version and unknown fields.

use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use tollgate_schemas::events::*;
use uuid::Uuid;

fn json_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json")
}

/// Fails when `schemas/json/` does not match the types. Regenerate with
/// `TOLLGATE_BLESS=1 cargo test -p tollgate-schemas --test contract`.
#[test]
fn json_schemas_are_current() {
    let bless = std::env::var("TOLLGATE_BLESS").is_ok();
    let mut stale = Vec::new();
    for (file, schema) in json_schemas() {
        let want = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        let path = json_dir().join(file);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            if bless {
                std::fs::write(&path, &want).unwrap();
            } else {
                stale.push(file);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "stale JSON Schemas {stale:?}: run TOLLGATE_BLESS=1 cargo test -p tollgate-schemas --test contract"
    );
}

fn arb_meta() -> impl Strategy<Value = EventMeta> {
    (
        any::<u128>(),
        0i64..4_000_000_000,
        "[a-z0-9_-]{1,16}",
        "[a-z0-9]{0,12}",
        "[a-zA-Z0-9-]{1,36}",
        0u32..1000,
    )
        .prop_map(|(id, secs, tenant, key, req, nanos_ms)| EventMeta {
            id: Uuid::from_u128(id),
            schema_version: SCHEMA_VERSION.into(),
            occurred_at: Utc.timestamp_opt(secs, nanos_ms * 1_000_000).unwrap(),
            tenant_id: tenant,
            key_id: key,
            request_id: req,
        })
}

fn arb_api() -> impl Strategy<Value = ApiFormat> {
    prop_oneof![
        Just(ApiFormat::OpenaiChat),
        Just(ApiFormat::OpenaiCompletions),
        Just(ApiFormat::OpenaiEmbeddings),
        Just(ApiFormat::AnthropicMessages),
        Just(ApiFormat::AnthropicCountTokens),
    ]
}

fn arb_tokens() -> impl Strategy<Value = TokenCounts> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(a, b, c, d, e)| TokenCounts {
            input_tokens: a.into(),
            output_tokens: b.into(),
            cache_read_tokens: c.into(),
            cache_write_tokens: d.into(),
            reasoning_tokens: e.into(),
        })
}

fn arb_event() -> impl Strategy<Value = Event> {
    let usage = (
        arb_meta(),
        arb_api(),
        "[a-z0-9.-]{1,20}",
        arb_tokens(),
        any::<bool>(),
        any::<bool>(),
        100u16..600,
        any::<u32>(),
        proptest::option::of(any::<u32>()),
        any::<u64>(),
        (any::<i64>(), 0u32..=12),
    )
        .prop_map(
            |(meta, api, model, tokens, estimated, streamed, status, latency, ttft, pv, (m, s))| {
                Event::Usage(UsageEvent {
                    meta,
                    api,
                    requested_model: model.clone(),
                    model,
                    provider: "openai".into(),
                    deployment: "d1".into(),
                    tokens,
                    estimated,
                    streamed,
                    status,
                    latency_ms: latency.into(),
                    ttft_ms: ttft.map(u64::from),
                    retries: 0,
                    price_version: pv,
                    cost: Decimal::new(m, s),
                })
            },
        );
    let request = (
        arb_meta(),
        arb_api(),
        proptest::option::of("[a-z-]{1,10}"),
        100u16..600,
        any::<bool>(),
    )
        .prop_map(|(meta, api, model, status, streamed)| {
            Event::Request(RequestEvent {
                meta,
                api,
                method: "POST".into(),
                route: "/v1/chat/completions".into(),
                model,
                status,
                error_type: (status >= 400).then(|| "invalid_request_error".into()),
                streamed,
                latency_ms: 3,
                deployment: None,
            })
        });
    let count = (arb_meta(), "[a-z-]{1,10}", any::<u32>()).prop_map(|(meta, model, n)| {
        Event::TokenCount(TokenCountEvent {
            meta,
            api: ApiFormat::AnthropicCountTokens,
            model,
            input_tokens: n.into(),
            source: CountSource::Tokenizer,
        })
    });
    prop_oneof![usage, request, count]
}

proptest! {
    #[test]
    fn any_event_round_trips(event in arb_event()) {
        let bytes = event.to_json();
        let back = Event::from_json(&bytes).unwrap();
        prop_assert_eq!(back, event);
    }

    #[test]
    fn common_fields_are_top_level(event in arb_event()) {
        let v: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        for k in ["id", "schema_version", "kind", "occurred_at", "tenant_id", "key_id", "request_id"] {
            prop_assert!(v.get(k).is_some(), "missing {}", k);
        }
        prop_assert_eq!(v["kind"].as_str().unwrap(), event.kind().as_str());
    }
}

fn sample_usage_json() -> serde_json::Value {
    serde_json::json!({
        "id": "0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b",
        "schema_version": "1.0",
        "kind": "usage",
        "occurred_at": "2026-11-24T10:00:00.123Z",
        "tenant_id": "acme",
        "key_id": "k1",
        "request_id": "req-1",
        "api": "openai_chat",
        "requested_model": "gpt",
        "model": "gpt-4o",
        "provider": "openai",
        "deployment": "primary",
        "tokens": {"input_tokens": 10, "output_tokens": 5, "cache_read_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0},
        "estimated": false,
        "status": 200,
        "streamed": false,
        "latency_ms": 12,
        "price_version": 3,
        "cost": "0.000012500000"
    })
}

#[test]
fn readers_ignore_unknown_fields_and_accept_minor_versions() {
    let mut v = sample_usage_json();
    v["schema_version"] = "1.7".into();
    v["a_field_from_the_future"] = serde_json::json!({"x": 1});
    let e = Event::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    let Event::Usage(u) = e else {
        panic!("not usage")
    };
    assert_eq!(u.cost, "0.0000125".parse::<Decimal>().unwrap());
    assert_eq!(u.tokens.input_tokens, 10);
}

#[test]
fn readers_refuse_another_major_version() {
    let mut v = sample_usage_json();
    v["schema_version"] = "2.0".into();
    let err = Event::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(matches!(err, DecodeError::UnsupportedVersion(_)), "{err}");
}

#[test]
fn cost_is_a_decimal_string_never_a_float() {
    let v = sample_usage_json();
    let e = Event::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    let out: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
    assert!(out["cost"].is_string());
    assert!(Event::from_json(br#"{"kind":"usage"}"#).is_err());
}

#[test]
fn new_ids_are_uuid_v7() {
    let m = EventMeta::new("t", "k", "r");
    assert_eq!(m.id.get_version_num(), 7);
    assert_eq!(m.schema_version, SCHEMA_VERSION);
}
