//! Routing: public model name → ordered deployments, with a circuit breaker
//! per deployment.
//!
//! Order: by priority (lower first); within a priority, a weighted random
//! shuffle so equal deployments share traffic by weight. Deployments whose
//! breaker is open go to the back (they are still tried if nothing else is
//! left, so a fully-open model degrades to "try anyway", not to "refuse").
//!
//! Breaker: `failures` consecutive failures open it for `open_ms`; then it is
//! half-open and lets one trial through; a success closes it, a failure
//! reopens it. Failures are what also trigger failover: connect errors,
//! timeouts, 5xx and 429.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::{BreakerConfig, Config, ProviderKind, Timeouts};

pub struct Deployment {
    pub name: String,
    pub model: String,
    pub provider: ProviderKind,
    /// Base URL without a trailing slash.
    pub base_url: String,
    pub api_key: Option<String>,
    pub upstream_model: String,
    pub weight: u32,
    pub priority: u32,
    /// Client header prefixes passed through to this upstream.
    pub forward_headers: Vec<String>,
    /// Serves `/responses` natively (else the gateway bridges over chat).
    pub responses_api: bool,
    /// One pooled client per deployment.
    pub client: reqwest::Client,
    pub breaker: Breaker,
}

impl Deployment {
    /// Does this deployment take the client header `name` (lowercase)?
    pub fn forwards(&self, name: &str) -> bool {
        self.forward_headers
            .iter()
            .any(|p| name.starts_with(p.as_str()))
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the upstream key.
        f.debug_struct("Deployment")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish()
    }
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    consecutive: AtomicU32,
    /// Millis since `epoch` when it opened; 0 = closed.
    opened_at: AtomicU64,
    trial_in_flight: AtomicBool,
    clock: Clock,
}

/// Where the breaker reads the time: the monotonic clock in the service; in
/// unit tests a clock the test advances by hand, so the open window is
/// checked at its exact edges without sleeping.
#[derive(Debug)]
enum Clock {
    /// Millis since this instant.
    Monotonic(Instant),
    #[cfg(test)]
    Manual(Arc<AtomicU64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Self {
        Self {
            threshold: cfg.failures.max(1),
            open_for: Duration::from_millis(cfg.open_ms),
            consecutive: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            trial_in_flight: AtomicBool::new(false),
            clock: Clock::Monotonic(Instant::now()),
        }
    }

    fn now_ms(&self) -> u64 {
        let ms = match &self.clock {
            Clock::Monotonic(epoch) => epoch.elapsed().as_millis() as u64,
            #[cfg(test)]
            Clock::Manual(ms) => ms.load(Ordering::Acquire),
        };
        ms.max(1)
    }

    pub fn state(&self) -> BreakerState {
        let opened = self.opened_at.load(Ordering::Acquire);
        if opened == 0 {
            BreakerState::Closed
        } else if self.now_ms().saturating_sub(opened) < self.open_for.as_millis() as u64 {
            BreakerState::Open
        } else {
            BreakerState::HalfOpen
        }
    }

    /// May a request go to this deployment now? Half-open admits one trial.
    pub fn allow(&self) -> bool {
        match self.state() {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !self.trial_in_flight.swap(true, Ordering::AcqRel),
        }
    }

    pub fn record_success(&self) {
        self.consecutive.store(0, Ordering::Release);
        if self.opened_at.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("circuit breaker closed");
        }
        self.trial_in_flight.store(false, Ordering::Release);
    }

    pub fn record_failure(&self) {
        let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        let state = self.state();
        if state == BreakerState::HalfOpen || (state == BreakerState::Closed && n >= self.threshold)
        {
            self.opened_at.store(self.now_ms(), Ordering::Release);
            tracing::warn!(failures = n, "circuit breaker opened");
        }
        self.trial_in_flight.store(false, Ordering::Release);
    }
}

/// All models and their deployments.
pub struct Router {
    models: HashMap<String, Vec<Arc<Deployment>>>,
    /// Public names in config order, for `/v1/models`.
    pub names: Vec<String>,
}

impl Router {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let mut models = HashMap::new();
        let mut names = Vec::new();
        for m in &config.models {
            let mut deps = Vec::new();
            for d in &m.deployments {
                let api_key = match &d.api_key_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        anyhow::anyhow!(
                            "models.{}.deployments.{}: environment variable {var} is not set",
                            m.name,
                            d.name
                        )
                    })?),
                    None => None,
                };
                deps.push(Arc::new(Deployment {
                    name: d.name.clone(),
                    model: m.name.clone(),
                    provider: d.provider,
                    base_url: d.base_url.trim_end_matches('/').to_owned(),
                    api_key,
                    upstream_model: d.upstream_model.clone().unwrap_or_else(|| m.name.clone()),
                    weight: d.weight,
                    priority: d.priority,
                    responses_api: d.responses_api,
                    // Anthropic upstreams always get the client's beta flags.
                    forward_headers: d
                        .forward_headers
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .chain(
                            (d.provider == ProviderKind::Anthropic)
                                .then(|| "anthropic-beta".to_owned()),
                        )
                        .collect(),
                    client: http_client(&config.timeouts)?,
                    breaker: Breaker::new(&config.breaker),
                }));
            }
            names.push(m.name.clone());
            models.insert(m.name.clone(), deps);
        }
        Ok(Self { models, names })
    }

    pub fn contains(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }

    /// The deployments to try for `model`, in order.
    pub fn plan(&self, model: &str) -> Vec<Arc<Deployment>> {
        let Some(deps) = self.models.get(model) else {
            return Vec::new();
        };
        let mut rng = rand::rng();
        // Weighted shuffle: sort by u^(1/w) descending (Efraimidis–Spirakis).
        let mut keyed: Vec<(u32, bool, f64, Arc<Deployment>)> = deps
            .iter()
            .map(|d| {
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                let open = d.breaker.state() == BreakerState::Open;
                (
                    d.priority,
                    open,
                    u.powf(1.0 / f64::from(d.weight)),
                    d.clone(),
                )
            })
            .collect();
        keyed.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)).then(b.2.total_cmp(&a.2)));
        keyed.into_iter().map(|k| k.3).collect()
    }
}

fn http_client(t: &Timeouts) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(t.connect_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A breaker on a clock the test advances by hand (millis).
    fn manual(cfg: &BreakerConfig) -> (Breaker, Arc<AtomicU64>) {
        let ms = Arc::new(AtomicU64::new(0));
        let b = Breaker {
            clock: Clock::Manual(ms.clone()),
            ..Breaker::new(cfg)
        };
        (b, ms)
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let (b, clock) = manual(&BreakerConfig {
            failures: 2,
            open_ms: 50,
        });
        let advance = |ms| clock.fetch_add(ms, Ordering::AcqRel);
        assert!(b.allow());
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Closed);
        advance(10);
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        // Open for exactly open_ms: still open 1 ms before, half-open at it.
        advance(49);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        advance(1);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allow(), "one trial");
        assert!(!b.allow(), "only one trial");
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Open);
        // The failed trial reopened it for a full window from now.
        advance(49);
        assert!(!b.allow());
        advance(1);
        assert!(b.allow());
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
