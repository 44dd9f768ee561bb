//! Records that live in JetStream KV and cross process boundaries: API keys
//! (written by billing or `tollgate-gateway put-key`, read by gateways), the
//! versioned price book and quota states (written by billing, read by gateways).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::TokenCounts;

/// An API key as stored in the keys bucket, under the hex SHA-256 of its
/// secret. The secret itself is never stored. Omitted limits mean unrestricted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub tenant_id: String,
    #[serde(default)]
    pub name: String,
    /// Hex SHA-256 of the secret, compared in constant time on every lookup.
    pub secret_sha256: String,
    /// Public model names the key may use; `None` = every model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub revoked: bool,
    /// Spend budget in USD; `None` = unlimited (enforced with billing's quota states).
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub budget: Option<Decimal>,
}

/// Hex SHA-256 of a key secret: the KV key and the stored digest.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// USD per million tokens of each kind. At most 6 decimal places, so costs
/// are exact at ClickHouse's scale 12 (see [`crate::money`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    #[serde(with = "rust_decimal::serde::str")]
    pub input_per_million: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output_per_million: Decimal,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_read_per_million: Option<Decimal>,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_write_per_million: Option<Decimal>,
}

impl ModelPrice {
    /// Exact cost of `t`. Cache reads default to the input price when not set,
    /// cache writes likewise; reasoning tokens are part of output.
    pub fn cost(&self, t: &TokenCounts) -> Decimal {
        let per_million = Decimal::from(t.input_tokens) * self.input_per_million
            + Decimal::from(t.output_tokens) * self.output_per_million
            + Decimal::from(t.cache_read_tokens)
                * self
                    .cache_read_per_million
                    .unwrap_or(self.input_per_million)
            + Decimal::from(t.cache_write_tokens)
                * self
                    .cache_write_per_million
                    .unwrap_or(self.input_per_million);
        (per_million / Decimal::from(1_000_000u32)).normalize()
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("input_per_million", Some(self.input_per_million)),
            ("output_per_million", Some(self.output_per_million)),
            ("cache_read_per_million", self.cache_read_per_million),
            ("cache_write_per_million", self.cache_write_per_million),
        ] {
            if let Some(p) = p {
                if p.is_sign_negative() {
                    return Err(format!("{name} is negative"));
                }
                if p.normalize().scale() > 6 {
                    return Err(format!("{name} {p} has more than 6 decimal places"));
                }
            }
        }
        Ok(())
    }
}

/// One version of the price book: every model's price.
///
/// In the prices bucket each version is its own key ([`price_book_key`]) and
/// is never rewritten, so history is kept and billing can price any event at
/// the version it carries. A gateway uses the highest version whose
/// `effective_from` has passed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceBook {
    pub version: u64,
    pub models: BTreeMap<String, ModelPrice>,
    /// When this version takes over; `None` = as soon as it is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_from: Option<DateTime<Utc>>,
}

/// KV key of price-book version `version` (zero-padded, so keys sort by version).
pub fn price_book_key(version: u64) -> String {
    format!("v.{version:020}")
}

/// Which budget a quota state describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    /// A tenant's credit balance (prepaid) or monthly limit (postpaid).
    Tenant,
    /// A key's own spend budget.
    Key,
}

impl QuotaScope {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaScope::Tenant => "tenant",
            QuotaScope::Key => "key",
        }
    }
}

/// `ok`, `warning` (a threshold of the limit is used) or `exhausted` (≤ 0 left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaLevel {
    Ok,
    Warning,
    Exhausted,
}

impl QuotaLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaLevel::Ok => "ok",
            QuotaLevel::Warning => "warning",
            QuotaLevel::Exhausted => "exhausted",
        }
    }
}

/// A quota snapshot billing writes to the quota bucket under [`quota_key`].
///
/// Gateways admit a request while `remaining` minus their own spend on events
/// after `priced_seq` (and on events the bus has not acknowledged yet) is
/// above zero (ARCHITECTURE.md, "Local debit").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaState {
    pub scope: QuotaScope,
    /// Tenant id or key id.
    pub id: String,
    pub tenant_id: String,
    pub state: QuotaLevel,
    /// USD left; `None` = unlimited.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub remaining: Option<Decimal>,
    /// The amount the thresholds are fractions of (live grants, budget or
    /// monthly limit); `None` = unlimited.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub limit: Option<Decimal>,
    /// The highest warning threshold (a fraction of `limit`) reached, if any.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub threshold: Option<Decimal>,
    /// Only ever increases; a gateway ignores a snapshot older than the one it has.
    pub version: u64,
    /// Billing has priced every usage event up to this event-stream position.
    pub priced_seq: u64,
    pub updated_at: DateTime<Utc>,
}

/// KV key of a quota state: `tenant.<id>` or `key.<id>`.
pub fn quota_key(scope: QuotaScope, id: &str) -> String {
    format!("{}.{id}", scope.as_str())
}

impl PriceBook {
    /// Cost of `tokens` on `model` at this version; zero for an unpriced model.
    pub fn cost(&self, model: &str, tokens: &TokenCounts) -> Decimal {
        self.models
            .get(model)
            .map(|p| p.cost(tokens))
            .unwrap_or(Decimal::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(i: &str, o: &str) -> ModelPrice {
        ModelPrice {
            input_per_million: i.parse().unwrap(),
            output_per_million: o.parse().unwrap(),
            cache_read_per_million: Some("0.075".parse().unwrap()),
            cache_write_per_million: None,
        }
    }

    #[test]
    fn cost_is_exact() {
        let p = price("0.15", "0.6");
        let t = TokenCounts {
            input_tokens: 7,
            output_tokens: 3,
            cache_read_tokens: 1,
            cache_write_tokens: 2,
            reasoning_tokens: 1,
        };
        // 7*0.15 + 3*0.6 + 1*0.075 + 2*0.15 = 1.05 + 1.8 + 0.075 + 0.3 = 3.225 per million
        assert_eq!(p.cost(&t), "0.000003225".parse::<Decimal>().unwrap());
        assert!(crate::money::to_ch_decimal(p.cost(&t)).is_ok());
    }

    #[test]
    fn prices_with_more_than_6_places_are_refused() {
        assert!(price("0.1234567", "1").validate().is_err());
        assert!(price("0.123456", "1").validate().is_ok());
    }

    #[test]
    fn price_book_keys_sort_by_version() {
        assert!(price_book_key(9) < price_book_key(10));
        let old: PriceBook = serde_json::from_str(r#"{"version":1,"models":{}}"#).unwrap();
        assert_eq!(old.effective_from, None);
    }

    #[test]
    fn quota_state_round_trips_with_string_decimals() {
        let q = QuotaState {
            scope: QuotaScope::Tenant,
            id: "acme".into(),
            tenant_id: "acme".into(),
            state: QuotaLevel::Warning,
            remaining: Some("0.25".parse().unwrap()),
            limit: Some("2".parse().unwrap()),
            threshold: Some("0.8".parse().unwrap()),
            version: 7,
            priced_seq: 42,
            updated_at: Utc::now(),
        };
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["remaining"], "0.25");
        assert_eq!(json["state"], "warning");
        assert_eq!(quota_key(q.scope, &q.id), "tenant.acme");
        assert_eq!(serde_json::from_value::<QuotaState>(json).unwrap(), q);
    }

    #[test]
    fn key_json_defaults_to_unrestricted() {
        let k: KeyRecord =
            serde_json::from_str(r#"{"key_id":"k","tenant_id":"t","secret_sha256":"ab"}"#).unwrap();
        assert!(k.models.is_none() && k.rpm.is_none() && !k.disabled && k.budget.is_none());
    }
}
