//! Quota enforcement with the local debit, and the price book from KV, end
//! to end: real NATS, the mock upstream, the gateway in-process, no billing
//! (the tests write billing's KV records themselves).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::time::Instant;
use tollgate_schemas::bus::{ConsumerSpec, EventBus, JetStreamBus, StreamSettings};
use tollgate_schemas::events::{Event, EventKind};
use tollgate_schemas::records::{ModelPrice, PriceBook, QuotaLevel, QuotaScope, QuotaState};
use tollgate_tests::harness::TestEnv;
use tollgate_tests::stack::{self, Service};

const K1: &str = "tg_quota_k1";
const K2: &str = "tg_quota_k2";

struct Fixture {
    env: TestEnv,
    _mock: Service,
    gw: Service,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    /// Requests answered 200 on a model route: each has a usage event.
    admitted: AtomicUsize,
}

async fn fixture() -> Fixture {
    start(TestEnv::new()).await
}

/// A gateway on `env`, with keys `k1` and `k2` of tenant `acme`.
async fn start(env: TestEnv) -> Fixture {
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = stack::gateway_config(&env, &env.nats_url, &mock.url(), dir.path(), "");
    let gw = stack::start_gateway(config).await;
    stack::put_key(&env.nats_url, &env, K1, stack::key("acme", "k1")).await;
    stack::put_key(&env.nats_url, &env, K2, stack::key("acme", "k2")).await;
    Fixture {
        env,
        _mock: mock,
        gw,
        _dir: dir,
        http: reqwest::Client::new(),
        admitted: AtomicUsize::new(0),
    }
}

/// One response, read to the end.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    fn cost(&self) -> Decimal {
        self.headers["x-tollgate-cost"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn rid(&self) -> String {
        self.headers["x-request-id"].to_str().unwrap().to_owned()
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "mock-gpt", "stream": stream,
           "messages": [{"role": "user", "content": "say something nice"}]})
}

fn message(model: &str) -> Value {
    json!({"model": model, "max_tokens": 64,
           "messages": [{"role": "user", "content": "hello there"}]})
}

impl Fixture {
    async fn post(&self, secret: &str, path: &str, body: &Value) -> Answer {
        let resp = self
            .http
            .post(format!("{}{}", self.gw.url(), path))
            .bearer_auth(secret)
            .header("anthropic-version", "2023-06-01")
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        if status == StatusCode::OK && !path.ends_with("count_tokens") {
            self.admitted.fetch_add(1, Ordering::SeqCst);
        }
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    async fn chat(&self, secret: &str) -> Answer {
        self.post(secret, "/v1/chat/completions", &chat(false))
            .await
    }

    async fn quota(&self, state: QuotaState) {
        stack::put_quota(&self.env.nats_url, &self.env, &state).await;
    }

    /// Sends `send` until it is answered with `want`, for at most `within`;
    /// returns that answer and how long it took.
    async fn until<F, Fut>(&self, want: StatusCode, within: Duration, send: F) -> (Answer, Duration)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Answer>,
    {
        let started = Instant::now();
        loop {
            let a = send().await;
            if a.status == want {
                return (a, started.elapsed());
            }
            assert!(
                started.elapsed() < within,
                "still {} after {within:?} (wanted {want}): {}",
                a.status,
                a.text
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sequential requests until one is refused with `refused`; the costs of
    /// those admitted. The first must be admitted.
    async fn spend_until_refused<F, Fut>(
        &self,
        refused: StatusCode,
        send: F,
    ) -> (Vec<Decimal>, Answer)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Answer>,
    {
        let mut costs = Vec::new();
        for _ in 0..50 {
            let a = send().await;
            if a.status == refused {
                return (costs, a);
            }
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
            costs.push(a.cost());
        }
        panic!("never refused after {} requests", costs.len());
    }

    /// Position of each usage event in the stream, by request id, once at
    /// least `at_least` are there.
    async fn usage_positions(&self, at_least: usize) -> HashMap<String, u64> {
        let bus = JetStreamBus::connect(
            &self.env.nats_url,
            self.env.names.clone(),
            StreamSettings::default(),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = bus
                .consumer(ConsumerSpec::new(
                    self.env.names.kind_filter(EventKind::Usage),
                ))
                .await
                .unwrap();
            let mut out = HashMap::new();
            loop {
                let batch = c.fetch(1000, Duration::from_millis(300)).await.unwrap();
                if batch.is_empty() {
                    break;
                }
                for d in batch {
                    let e = Event::from_json(&d.payload).unwrap();
                    out.insert(e.meta().request_id.clone(), d.position);
                }
            }
            if out.len() >= at_least || Instant::now() >= deadline {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The stream's head once the usage event of every request admitted so
    /// far is in it: a `priced_seq` saying billing has priced them all.
    async fn head(&self) -> u64 {
        let n = self.admitted.load(Ordering::SeqCst);
        let got = self.usage_positions(n).await;
        assert!(got.len() >= n, "only {} usage events of {n}", got.len());
        stack::stream_head(&self.env.nats_url, &self.env).await
    }
}

fn snapshot(
    scope: QuotaScope,
    id: &str,
    version: u64,
    remaining: Option<Decimal>,
    priced_seq: u64,
) -> QuotaState {
    let exhausted = remaining.is_some_and(|r| r <= Decimal::ZERO);
    QuotaState {
        scope,
        id: id.into(),
        tenant_id: "acme".into(),
        state: if exhausted {
            QuotaLevel::Exhausted
        } else {
            QuotaLevel::Ok
        },
        remaining,
        limit: None,
        threshold: None,
        version,
        priced_seq,
        updated_at: Utc::now(),
    }
}

fn tenant(version: u64, remaining: Decimal, priced_seq: u64) -> QuotaState {
    snapshot(
        QuotaScope::Tenant,
        "acme",
        version,
        Some(remaining),
        priced_seq,
    )
}

const WITHIN: Duration = Duration::from_secs(2);

fn assert_openai_refusal(a: &Answer, what: &str) {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
    assert!(a.headers.contains_key("x-request-id"));
    let e = &a.body["error"];
    assert_eq!(e["type"], "insufficient_quota");
    assert_eq!(e["code"], "insufficient_quota");
    assert!(e["param"].is_null());
    let msg = e["message"].as_str().unwrap();
    assert!(msg.starts_with("You exceeded your current quota"), "{msg}");
    assert!(msg.contains(what), "{msg}");
}

/// Σ admitted − remaining: how far past zero the client went.
fn overshoot(costs: &[Decimal], remaining: Decimal) -> Decimal {
    costs.iter().copied().sum::<Decimal>() - remaining
}

#[tokio::test]
async fn sequential_chat_goes_at_most_one_request_past_zero_and_a_new_snapshot_lifts_it() {
    let f = fixture().await;
    // Without a snapshot nothing is limited; this measures one request.
    let probe = f.chat(K1).await;
    assert_eq!(probe.status, StatusCode::OK);
    let c = probe.cost();
    assert!(c > Decimal::ZERO);

    // Exhausted: refused as soon as the gateway has it.
    f.quota(tenant(1, Decimal::ZERO, 0)).await;
    let (refused, took) = f
        .until(StatusCode::TOO_MANY_REQUESTS, WITHIN, || f.chat(K1))
        .await;
    assert_openai_refusal(&refused, "credit");
    assert!(took < WITHIN);

    // 2.5 requests' worth: admitted while the estimate is > 0, then refused.
    // Billing has priced everything so far (a request admitted before the
    // gateway saw version 1 was debited under it, and is priced now).
    let remaining = c * Decimal::new(25, 1);
    f.quota(tenant(2, remaining, f.head().await)).await;
    let (first, _) = f.until(StatusCode::OK, WITHIN, || f.chat(K1)).await;
    let (mut costs, refused) = f
        .spend_until_refused(StatusCode::TOO_MANY_REQUESTS, || f.chat(K1))
        .await;
    costs.insert(0, first.cost());
    assert_openai_refusal(&refused, "credit");
    let over = overshoot(&costs, remaining);
    assert!(over >= Decimal::ZERO, "refused before zero: {costs:?}");
    assert!(over < c, "more than one request past zero: {costs:?}");
    assert_eq!(costs.len(), 3);

    // Billing catches up (priced everything) and grants more: lifted.
    let head = f.head().await;
    f.quota(tenant(3, remaining, head)).await;
    let (_, took) = f.until(StatusCode::OK, WITHIN, || f.chat(K1)).await;
    assert!(took < WITHIN);

    // The refusals were recorded as such.
    let reqs = stack::events(
        &f.env.nats_url,
        &f.env,
        EventKind::Request,
        costs.len() + 3,
        Duration::from_secs(5),
    )
    .await;
    let rid = refused.rid();
    let Some(Event::Request(r)) = reqs.iter().find(|e| e.meta().request_id == rid) else {
        panic!("no request event for {rid}");
    };
    assert_eq!(r.status, 429);
    assert_eq!(r.error_type.as_deref(), Some("insufficient_quota"));
    let metrics = f
        .http
        .get(format!("{}/metrics", f.gw.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_gateway_quota_refusals_total{scope=\"tenant\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_gateway_quota_snapshots"));
}

#[tokio::test]
async fn messages_are_refused_with_anthropics_credit_balance_error() {
    let f = fixture().await;
    let body = message("mock-claude");
    let send = || f.post(K1, "/v1/messages", &body);
    let probe = send().await;
    assert_eq!(probe.status, StatusCode::OK, "{}", probe.text);
    let c = probe.cost();

    f.quota(tenant(1, Decimal::ZERO, 0)).await;
    let (refused, _) = f.until(StatusCode::BAD_REQUEST, WITHIN, send).await;
    assert_eq!(refused.body["type"], "error");
    assert_eq!(refused.body["error"]["type"], "invalid_request_error");
    let msg = refused.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("Your credit balance is too low"), "{msg}");
    let rid = refused.rid();
    assert_eq!(refused.headers["request-id"].to_str().unwrap(), rid);

    // Counting tokens and listing models are never refused for quota.
    let count = f
        .post(K1, "/v1/messages/count_tokens", &message("mock-claude"))
        .await;
    assert_eq!(count.status, StatusCode::OK, "{}", count.text);
    let models = f
        .http
        .get(format!("{}/v1/models", f.gw.url()))
        .bearer_auth(K1)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::OK);
    // The OpenAI-format model through /v1/messages is refused the same way.
    let translated = f.post(K1, "/v1/messages", &message("mock-gpt")).await;
    assert_eq!(translated.status, StatusCode::BAD_REQUEST);

    let remaining = c * Decimal::new(15, 1);
    f.quota(tenant(2, remaining, f.head().await)).await;
    let (first, _) = f.until(StatusCode::OK, WITHIN, send).await;
    let (mut costs, refused) = f.spend_until_refused(StatusCode::BAD_REQUEST, send).await;
    costs.insert(0, first.cost());
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("credit balance is too low")
    );
    let over = overshoot(&costs, remaining);
    assert!(
        over >= Decimal::ZERO && over < c,
        "{costs:?} vs {remaining}"
    );

    let reqs = stack::events(
        &f.env.nats_url,
        &f.env,
        EventKind::Request,
        4,
        Duration::from_secs(5),
    )
    .await;
    let Some(Event::Request(r)) = reqs.iter().find(|e| e.meta().request_id == rid) else {
        panic!("no request event for {rid}");
    };
    assert_eq!(
        (r.status, r.error_type.as_deref()),
        (400, Some("insufficient_quota"))
    );
}

#[tokio::test]
async fn a_key_budget_refuses_that_key_only() {
    let f = fixture().await;
    f.quota(snapshot(QuotaScope::Key, "k1", 1, Some(Decimal::ZERO), 0))
        .await;
    let (refused, _) = f
        .until(StatusCode::TOO_MANY_REQUESTS, WITHIN, || f.chat(K1))
        .await;
    assert_openai_refusal(&refused, "budget");
    let other = f.chat(K2).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text);
    // An unlimited tenant snapshot changes nothing for either key.
    f.quota(snapshot(QuotaScope::Tenant, "acme", 1, None, 0))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.chat(K2).await.status, StatusCode::OK);
    assert_eq!(f.chat(K1).await.status, StatusCode::TOO_MANY_REQUESTS);
    // And the Anthropic route says it is the key's budget.
    let a = f.post(K1, "/v1/messages", &message("mock-claude")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("credit balance is too low") && msg.contains("budget"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_stale_snapshot_is_ignored() {
    let f = fixture().await;
    f.quota(tenant(5, Decimal::ZERO, 0)).await;
    f.until(StatusCode::TOO_MANY_REQUESTS, WITHIN, || f.chat(K1))
        .await;
    // Older than what the gateway holds: ignored, however generous.
    f.quota(tenant(4, Decimal::from(100), 0)).await;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(f.chat(K1).await.status, StatusCode::TOO_MANY_REQUESTS);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The same version again: ignored too.
    f.quota(tenant(5, Decimal::from(100), 0)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.chat(K1).await.status, StatusCode::TOO_MANY_REQUESTS);
    f.quota(tenant(6, Decimal::from(100), 0)).await;
    f.until(StatusCode::OK, WITHIN, || f.chat(K1)).await;
}

#[tokio::test]
async fn entries_billing_has_priced_are_dropped() {
    let f = fixture().await;
    let probe = f.chat(K1).await;
    let c = probe.cost();
    f.quota(tenant(1, Decimal::ZERO, 0)).await;
    f.until(StatusCode::TOO_MANY_REQUESTS, WITHIN, || f.chat(K1))
        .await;

    // 1.5 requests' worth, billing up to date: two admitted, then refused.
    let remaining = c * Decimal::new(15, 1);
    let head = f.head().await;
    f.quota(tenant(2, remaining, head)).await;
    let (r1, _) = f.until(StatusCode::OK, WITHIN, || f.chat(K1)).await;
    let r2 = f.chat(K1).await;
    assert_eq!(r2.status, StatusCode::OK);
    assert_eq!(f.chat(K1).await.status, StatusCode::TOO_MANY_REQUESTS);

    // Billing has priced r1 (and says the same amount is left, e.g. after a
    // top-up): only r2 is still the gateway's own, so 0.5 is left.
    let positions = f.usage_positions(f.admitted.load(Ordering::SeqCst)).await;
    let (p1, p2) = (positions[&r1.rid()], positions[&r2.rid()]);
    assert!(p1 < p2);
    f.quota(tenant(3, remaining, p1)).await;
    let (r3, _) = f.until(StatusCode::OK, WITHIN, || f.chat(K1)).await;
    // r2 and r3 are both local again: refused.
    assert_eq!(f.chat(K1).await.status, StatusCode::TOO_MANY_REQUESTS);

    // Billing has priced everything: the estimate is the snapshot's again.
    let positions = f.usage_positions(f.admitted.load(Ordering::SeqCst)).await;
    let p3 = positions[&r3.rid()];
    f.quota(tenant(4, remaining, p3)).await;
    let (first, _) = f.until(StatusCode::OK, WITHIN, || f.chat(K1)).await;
    let (costs, _) = f
        .spend_until_refused(StatusCode::TOO_MANY_REQUESTS, || f.chat(K1))
        .await;
    assert_eq!(1 + costs.len(), 2, "1.5 requests' worth admits two");
    assert!(first.cost() == c);
}

fn mock_gpt_book(
    version: u64,
    input: &str,
    output: &str,
    from: Option<chrono::DateTime<Utc>>,
) -> PriceBook {
    let mut models = BTreeMap::new();
    models.insert(
        "mock-gpt".to_owned(),
        ModelPrice {
            input_per_million: input.parse().unwrap(),
            output_per_million: output.parse().unwrap(),
            cache_read_per_million: None,
            cache_write_per_million: None,
        },
    );
    PriceBook {
        version,
        models,
        effective_from: from,
    }
}

/// The cost of a plain chat answer at `input`/`output` USD per million.
fn priced(a: &Answer, input: &str, output: &str) -> Decimal {
    let u = &a.body["usage"];
    let prompt = Decimal::from(u["prompt_tokens"].as_u64().unwrap());
    let completion = Decimal::from(u["completion_tokens"].as_u64().unwrap());
    let i: Decimal = input.parse().unwrap();
    let o: Decimal = output.parse().unwrap();
    ((prompt * i + completion * o) / Decimal::from(1_000_000)).normalize()
}

#[tokio::test]
async fn price_book_versions_from_kv_take_over_in_time() {
    let f = fixture().await;
    // No version in the bucket: the config's book (version 7).
    let a = f.chat(K1).await;
    assert_eq!(a.cost(), priced(&a, "0.15", "0.60"));
    assert_eq!(
        stack::usage_event(&f.env.nats_url, &f.env, &a.rid())
            .await
            .price_version,
        7
    );

    // Version 2, effective now: used within 2 s, even though it is lower
    // than the config's version.
    stack::put_price_book(&f.env.nats_url, &f.env, &mock_gpt_book(2, "1", "2", None)).await;
    let written = Instant::now();
    let a = loop {
        let a = f.chat(K1).await;
        if a.cost() == priced(&a, "1", "2") {
            break a;
        }
        assert_eq!(a.cost(), priced(&a, "0.15", "0.60"));
        assert!(written.elapsed() < WITHIN, "version 2 not used within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let u = stack::usage_event(&f.env.nats_url, &f.env, &a.rid()).await;
    assert_eq!((u.price_version, u.cost), (2, a.cost()));

    // Version 3, effective in 3 s: not before, and within 2 s after.
    let from = Utc::now() + chrono::Duration::seconds(3);
    stack::put_price_book(
        &f.env.nats_url,
        &f.env,
        &mock_gpt_book(3, "5", "10", Some(from)),
    )
    .await;
    while Utc::now() < from - chrono::Duration::milliseconds(300) {
        let a = f.chat(K1).await;
        assert_eq!(a.cost(), priced(&a, "1", "2"), "version 3 used early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = loop {
        let a = f.chat(K1).await;
        if a.cost() == priced(&a, "5", "10") {
            break a;
        }
        assert!(
            Utc::now() < from + chrono::Duration::seconds(2),
            "version 3 not used within 2 s of its effective time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let u = stack::usage_event(&f.env.nats_url, &f.env, &a.rid()).await;
    assert_eq!((u.price_version, u.cost), (3, a.cost()));
}

#[tokio::test]
async fn a_streamed_request_is_debited_before_its_end() {
    let f = fixture().await;
    f.quota(tenant(1, Decimal::ZERO, 0)).await;
    f.until(StatusCode::TOO_MANY_REQUESTS, WITHIN, || f.chat(K1))
        .await;
    // A sliver left: one streamed request gets in, and uses it up.
    f.quota(tenant(2, Decimal::new(1, 9), f.head().await)).await;
    let body = chat(true);
    let (streamed, _) = f
        .until(StatusCode::OK, WITHIN, || {
            f.post(K1, "/v1/chat/completions", &body)
        })
        .await;
    assert!(streamed.text.contains("data: [DONE]"), "{}", streamed.text);
    // The stream has ended, so its cost is settled: the next is refused.
    let next = f.chat(K1).await;
    assert_openai_refusal(&next, "credit");
    let next = f.post(K1, "/v1/chat/completions", &chat(true)).await;
    assert_eq!(next.status, StatusCode::TOO_MANY_REQUESTS);
    let u = stack::usage_event(&f.env.nats_url, &f.env, &streamed.rid()).await;
    assert!(u.streamed && u.cost > Decimal::ZERO);
}

#[tokio::test]
async fn what_the_buckets_hold_at_start_up_applies_to_the_first_request() {
    let env = TestEnv::new();
    stack::put_price_book(&env.nats_url, &env, &mock_gpt_book(1, "1", "2", None)).await;
    stack::put_price_book(
        &env.nats_url,
        &env,
        &mock_gpt_book(2, "3", "4", Some(Utc::now() + chrono::Duration::hours(1))),
    )
    .await;
    stack::put_quota(
        &env.nats_url,
        &env,
        &snapshot(QuotaScope::Key, "k2", 3, Some(Decimal::ZERO), 0),
    )
    .await;
    let f = start(env).await;
    // Version 1 is in force (2 is not effective yet), from the first request on.
    let a = f.chat(K1).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.cost(), priced(&a, "1", "2"));
    // k2's exhausted budget was loaded before the gateway served anything.
    assert_openai_refusal(&f.chat(K2).await, "budget");
}
