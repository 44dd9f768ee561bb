//! Endpoint records in the billing KV bucket, under `webhook.<endpoint_id>`.
//!
//! The record holds the signing secret, so its `Debug` redacts it and the API
//! view ([`Endpoint::view`]) leaves it out. Updates (rotate, disable on 410,
//! patch) are compare-and-set on the KV revision, so a worker disabling an
//! endpoint and an admin rotating its secret never lose each other's change.

use std::time::Duration;

use crate::error::{Error, ResultExt as _};
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, ReplayPolicy, push},
    kv,
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Key prefix of endpoint records in the billing bucket.
const PREFIX: &str = "webhook.";
/// Random bytes in a signing secret (the spec asks for 24 to 64).
const SECRET_BYTES: usize = 32;

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub id: String,
    pub tenant_id: String,
    pub url: String,
    /// `None` = every event type.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    pub enabled: bool,
    /// `whsec_` + base64 of the key. Never logged, never in the list view.
    pub secret: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Why the endpoint was disabled (`gone` after a 410), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("events", &self.events)
            .field("enabled", &self.enabled)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn subscribed(&self, event_type: &str) -> bool {
        match &self.events {
            None => true,
            Some(list) => list.is_empty() || list.iter().any(|e| e == event_type),
        }
    }

    /// What the API shows: everything but the secret.
    pub fn view(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "tenant_id": self.tenant_id,
            "url": self.url,
            "events": self.events,
            "enabled": self.enabled,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        });
        if let (Some(reason), Some(map)) = (&self.disabled_reason, v.as_object_mut()) {
            map.insert("disabled_reason".into(), Value::String(reason.clone()));
        }
        v
    }
}

/// `whsec_` + base64 of 32 random bytes.
pub(crate) fn new_secret() -> String {
    let mut key = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// `ep_` + a UUIDv7 (time-ordered, so listings come out in creation order).
pub(crate) fn new_id() -> String {
    format!("ep_{}", uuid::Uuid::now_v7().simple())
}

/// Ids we hand out are `[A-Za-z0-9_-]`; anything else in a path is unknown
/// (and could not be a KV key or a subject token anyway).
pub(crate) fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(crate) struct Endpoints {
    js: jetstream::Context,
    kv: kv::Store,
}

impl Endpoints {
    pub fn new(js: jetstream::Context, kv: kv::Store) -> Self {
        Self { js, kv }
    }

    fn key(id: &str) -> String {
        format!("{PREFIX}{id}")
    }

    /// The record and its revision; `None` when absent, deleted or malformed id.
    async fn entry(&self, id: &str) -> crate::error::Result<Option<(Endpoint, u64)>> {
        if !plausible_id(id) {
            return Ok(None);
        }
        let Some(entry) = self.kv.entry(Self::key(id)).await? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put || entry.value.is_empty() {
            return Ok(None);
        }
        let ep: Endpoint = serde_json::from_slice(&entry.value)
            .internal_ctx(|| format!("decode webhook endpoint {id}"))?;
        Ok(Some((ep, entry.revision)))
    }

    pub async fn get(&self, id: &str) -> crate::error::Result<Option<Endpoint>> {
        Ok(self.entry(id).await?.map(|(ep, _)| ep))
    }

    /// The endpoint if it exists and belongs to `tenant_id`.
    pub async fn get_for(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> crate::error::Result<Option<Endpoint>> {
        Ok(self.get(id).await?.filter(|ep| ep.tenant_id == tenant_id))
    }

    pub async fn create(&self, ep: &Endpoint) -> crate::error::Result<()> {
        self.kv
            .create(Self::key(&ep.id), serde_json::to_vec(ep)?.into())
            .await
            .nats_ctx(|| format!("create webhook endpoint {}", ep.id))?;
        Ok(())
    }

    /// Applies `change` to the tenant's endpoint with compare-and-set,
    /// retrying on a concurrent write. `None` when it does not exist (for
    /// this tenant).
    pub async fn modify(
        &self,
        tenant_id: &str,
        id: &str,
        change: impl Fn(&mut Endpoint),
    ) -> crate::error::Result<Option<Endpoint>> {
        for _ in 0..8 {
            let Some((mut ep, revision)) = self.entry(id).await? else {
                return Ok(None);
            };
            if ep.tenant_id != tenant_id {
                return Ok(None);
            }
            change(&mut ep);
            ep.updated_at = Utc::now();
            match self
                .kv
                .update(Self::key(id), serde_json::to_vec(&ep)?.into(), revision)
                .await
            {
                Ok(_) => return Ok(Some(ep)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(Error::nats("update webhook endpoint", e)),
            }
        }
        Err(Error::conflict(format!(
            "webhook endpoint {id} kept changing under concurrent updates"
        )))
    }

    /// Deletes the tenant's endpoint; false when it did not exist.
    pub async fn delete(&self, tenant_id: &str, id: &str) -> crate::error::Result<bool> {
        if self.get_for(tenant_id, id).await?.is_none() {
            return Ok(false);
        }
        self.kv
            .delete(Self::key(id))
            .await
            .nats_ctx(|| "delete webhook endpoint".into())?;
        Ok(true)
    }

    /// Every endpoint of `tenant_id`, oldest first.
    ///
    /// One pass over the latest value of each `webhook.*` key (an ordered
    /// consumer, last per subject), filtered here: the tenant is inside the
    /// record, not the key, so tenant ids need no escaping.
    pub async fn list_tenant(&self, tenant_id: &str) -> crate::error::Result<Vec<Endpoint>> {
        let mut out: Vec<Endpoint> = self
            .scan()
            .await?
            .into_iter()
            .filter(|ep| ep.tenant_id == tenant_id)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn scan(&self) -> crate::error::Result<Vec<Endpoint>> {
        let filter = format!("{}{PREFIX}>", self.kv.prefix);
        let consumer = self
            .kv
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                description: Some("webhook endpoint scan".into()),
                filter_subject: filter,
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .nats_ctx(|| "scan webhook endpoints".into())?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer.messages().await?;
        let mut out = Vec::new();
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                Err(e) => return Err(Error::nats("scan webhook endpoints: timed out", e)),
                Ok(None) => break,
                Ok(Some(m)) => m.nats_ctx(|| "scan webhook endpoints".into())?,
            };
            let pending = msg.info().map(|i| i.pending).unwrap_or(0);
            let deleted = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            if !deleted && !msg.payload.is_empty() {
                match serde_json::from_slice::<Endpoint>(&msg.payload) {
                    Ok(ep) => out.push(ep),
                    Err(e) => {
                        tracing::warn!(subject = %msg.subject, error = %e, "undecodable webhook endpoint record")
                    }
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_whsec_and_long_enough() {
        let s = new_secret();
        let raw = s.strip_prefix("whsec_").unwrap();
        let key = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .unwrap();
        assert!(key.len() >= 24);
        assert_ne!(new_secret(), s);
        assert!(standardwebhooks::Webhook::new(&s).is_ok());
    }

    #[test]
    fn debug_redacts_the_secret() {
        let ep = Endpoint {
            id: new_id(),
            tenant_id: "acme".into(),
            url: "https://example.com/hook".into(),
            events: None,
            enabled: true,
            secret: new_secret(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            disabled_reason: None,
        };
        let dbg = format!("{ep:?}");
        assert!(!dbg.contains(&ep.secret));
        assert!(!ep.view().to_string().contains("whsec_"));
        assert!(ep.subscribed("quota.warning"));
    }

    #[test]
    fn ids_outside_our_alphabet_are_unknown() {
        assert!(plausible_id(&new_id()));
        assert!(!plausible_id("a.b"));
        assert!(!plausible_id("a>"));
        assert!(!plausible_id(""));
    }
}
