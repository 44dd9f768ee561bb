//! Billing end to end: real NATS and ClickHouse, billing and gateways
//! in-process, the mock upstream over HTTP. These tests try to break the
//! money guarantees: overspend under concurrency and across replicas, double
//! pricing under duplicates, restarts and replays.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::time::Instant;
use tollgate_schemas::bus::{EventBus, JetStreamBus, Outgoing, StreamSettings};
use tollgate_schemas::events::{Event, EventKind};
use tollgate_tests::billing::{ADMIN_KEY, Billing, billing_config};
use tollgate_tests::harness::{ClickHouseServer, TestEnv};
use tollgate_tests::stack::{self, Service};

struct World {
    env: TestEnv,
    _mock: Service,
    billing: Billing,
    gateways: Vec<Service>,
    _dirs: Vec<tempfile::TempDir>,
    http: reqwest::Client,
}

async fn world(replicas: usize) -> World {
    let env = TestEnv::new();
    let mock = stack::start_mock().await;
    let billing = Billing::start(billing_config(&env)).await;
    let mut gateways = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..replicas {
        let dir = tempfile::tempdir().unwrap();
        let config = stack::gateway_config(&env, &env.nats_url, &mock.url(), dir.path(), "");
        gateways.push(stack::start_gateway(config).await);
        dirs.push(dir);
    }
    World {
        env,
        _mock: mock,
        billing,
        gateways,
        _dirs: dirs,
        http: reqwest::Client::new(),
    }
}

fn dec(v: &Value) -> Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}"))
        .parse()
        .unwrap()
}

/// One chat request; `Ok(cost)` when served, `Err(status, body)` otherwise.
async fn chat(w: &World, replica: usize, secret: &str) -> Result<Decimal, (u16, Value)> {
    let resp = w
        .http
        .post(format!("{}/v1/chat/completions", w.gateways[replica].url()))
        .bearer_auth(secret)
        .json(&json!({"model": "mock-claude", "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let cost = resp
        .headers()
        .get("x-tollgate-cost")
        .map(|v| v.to_str().unwrap().parse::<Decimal>().unwrap());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    match (status, cost) {
        (200, Some(c)) => Ok(c),
        _ => Err((status, body)),
    }
}

fn is_quota_refusal((status, body): &(u16, Value)) -> bool {
    *status == 429 && body["error"]["code"] == "insufficient_quota"
}

async fn tenant_with_key(w: &World, id: &str, billing: &str) -> String {
    w.billing
        .ok(
            "POST",
            "/admin/tenants",
            Some(json!({"id": id, "billing": billing})),
            201,
        )
        .await;
    let k = w
        .billing
        .ok(
            "POST",
            &format!("/admin/tenants/{id}/keys"),
            Some(json!({"name": "k"})),
            201,
        )
        .await;
    k["secret"].as_str().unwrap().to_owned()
}

async fn grant(w: &World, tenant: &str, amount: Decimal) {
    w.billing
        .ok(
            "POST",
            &format!("/admin/tenants/{tenant}/credits"),
            Some(json!({"amount": amount.to_string()})),
            201,
        )
        .await;
}

async fn balance(w: &World, tenant: &str) -> Value {
    w.billing
        .ok(
            "GET",
            &format!("/admin/tenants/{tenant}/balance"),
            None,
            200,
        )
        .await
}

/// Waits until billing's balance for `tenant` equals `want`.
async fn await_balance(w: &World, tenant: &str, want: Decimal) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = balance(w, tenant).await;
        if dec(&b["balance"]) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "balance {b} never reached {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a request on `replica` is served (the grant reached it).
async fn await_admitted(w: &World, replica: usize, secret: &str) -> Decimal {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match chat(w, replica, secret).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(is_quota_refusal(&e), "unexpected refusal {e:?}");
                assert!(
                    Instant::now() < deadline,
                    "a grant did not lift the refusal within 3 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_clients_overspend_within_the_bound() {
    let w = Arc::new(world(1).await);
    let secret = tenant_with_key(&w, "conc", "prepaid").await;
    // Calibrate: one request's cost (the mock's reply is deterministic).
    grant(&w, "conc", Decimal::new(1, 2)).await;
    let one = await_admitted(&w, 0, &secret).await;
    let granted = Decimal::new(1, 2) + one * Decimal::from(40);
    grant(&w, "conc", one * Decimal::from(40)).await;
    let spent = Arc::new(std::sync::Mutex::new(vec![one]));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (w, secret, spent) = (w.clone(), secret.clone(), spent.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match chat(&w, 0, &secret).await {
                    Ok(c) => spent.lock().unwrap().push(c),
                    Err(e) if is_quota_refusal(&e) => return,
                    Err(e) => panic!("unexpected answer {e:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let spent = spent.lock().unwrap().clone();
    let total: Decimal = spent.iter().sum();
    let max = spent.iter().max().copied().unwrap();
    let overspend = total - granted;
    eprintln!(
        "granted {granted}, spent {total} in {} requests, overspend {overspend} (one request {one})",
        spent.len()
    );
    assert!(
        total > granted - one,
        "clients stopped before the credit ran out"
    );
    // The documented bound with concurrency C on one replica: C requests
    // admitted while the estimate was > 0, each costing at most `max`.
    assert!(
        overspend <= max * Decimal::from(50),
        "overspend {overspend} exceeds 50 × {max}"
    );
    // Billing's ledger agrees with the gateway's figures exactly.
    await_balance(&w, "conc", granted - total).await;
    let b = balance(&w, "conc").await;
    assert_eq!(b["state"], "exhausted", "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_bound_per_replica_top_up_and_revocation() {
    let w = world(2).await;
    let secret = tenant_with_key(&w, "duo", "prepaid").await;
    grant(&w, "duo", Decimal::new(1, 2)).await;
    let one = await_admitted(&w, 0, &secret).await;
    await_admitted(&w, 1, &secret).await;
    let granted = Decimal::new(1, 2);
    // A sequential client alternating between the replicas until both refuse.
    // Each replica refuses once its own estimate (billing's snapshot minus its
    // own unpriced spend) is <= 0, so it goes at most one request past zero
    // of what it knows; what the *other* replica served and billing has not
    // priced yet (billing prices within 2 s) is invisible to it. The bound
    // with R replicas is therefore R requests + the other replicas' spend in
    // the pricing window, and that is what we check.
    let mut served: Vec<(Instant, usize, Decimal)> = Vec::new();
    let mut refused: [Option<Instant>; 2] = [None, None];
    let mut i = 0usize;
    while refused.iter().any(Option::is_none) {
        let r = i % 2;
        i += 1;
        if refused[r].is_some() {
            continue;
        }
        match chat(&w, r, &secret).await {
            Ok(c) => served.push((Instant::now(), r, c)),
            Err(e) if is_quota_refusal(&e) => refused[r] = Some(Instant::now()),
            Err(e) => panic!("unexpected answer {e:?}"),
        }
        assert!(i < 20_000, "never refused");
    }
    let total: Decimal = one * Decimal::from(2) + served.iter().map(|s| s.2).sum::<Decimal>();
    let overspend = total - granted;
    let first_refusal = refused.iter().flatten().min().copied().unwrap();
    let window: Decimal = served
        .iter()
        .filter(|s| s.0 + Duration::from_secs(2) >= first_refusal)
        .map(|s| s.2)
        .sum();
    eprintln!(
        "granted {granted}, spent {total} in {} requests, overspend {overspend}, one request {one}, spend in the last 2 s before the first refusal {window}",
        served.len() + 2
    );
    assert!(overspend > -one, "stopped early");
    assert!(
        overspend <= one * Decimal::from(2) + window,
        "overspend {overspend} exceeds one request per replica ({one}) + the pricing window ({window})"
    );
    // Once billing has priced everything, neither replica admits.
    await_balance(&w, "duo", granted - total).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in 0..2 {
        let e = chat(&w, r, &secret).await.unwrap_err();
        assert!(is_quota_refusal(&e), "{e:?}");
    }
    // Anthropic's convention on /v1/messages.
    let resp = w
        .http
        .post(format!("{}/v1/messages", w.gateways[1].url()))
        .header("x-api-key", &secret)
        .json(&json!({"model": "mock-claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("credit balance is too low")
    );

    // A top-up lifts the refusal at both replicas within 2 s.
    let t0 = Instant::now();
    grant(&w, "duo", Decimal::ONE).await;
    await_admitted(&w, 0, &secret).await;
    await_admitted(&w, 1, &secret).await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "top-up took {:?}",
        t0.elapsed()
    );

    // Revocation reaches both replicas within seconds.
    let keys = w
        .billing
        .ok("GET", "/admin/tenants/duo/keys", None, 200)
        .await;
    let key_id = keys["data"][0]["id"].as_str().unwrap().to_owned();
    assert!(
        keys["data"][0].get("secret").is_none(),
        "a listed key shows its secret"
    );
    w.billing
        .ok("DELETE", &format!("/admin/keys/{key_id}"), None, 204)
        .await;
    for r in 0..2 {
        tollgate_tests::eventually(
            &format!("replica {r} to refuse the revoked key"),
            Duration::from_secs(5),
            async || matches!(chat(&w, r, &secret).await, Err((401, _))),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_restarts_and_republish_never_change_the_balance() {
    let mut w = world(1).await;
    let secret = tenant_with_key(&w, "dup", "prepaid").await;
    let granted = Decimal::ONE;
    grant(&w, "dup", granted).await;
    let mut total = Decimal::ZERO;
    for _ in 0..10 {
        total += await_admitted(&w, 0, &secret).await;
    }
    await_balance(&w, "dup", granted - total).await;

    // Re-publish every usage event with new message ids: a redelivery the
    // bus cannot deduplicate.
    let events = stack::events(
        &w.env.nats_url,
        &w.env,
        EventKind::Usage,
        10,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(events.len(), 10);
    let bus = JetStreamBus::connect(
        &w.env.nats_url,
        w.env.names.clone(),
        StreamSettings::default(),
    )
    .await
    .unwrap();
    for e in &events {
        let Event::Usage(u) = e else { unreachable!() };
        let r = bus
            .publish(Outgoing {
                subject: w
                    .env
                    .names
                    .event_subject(EventKind::Usage, &u.meta.tenant_id),
                id: uuid::Uuid::now_v7().to_string(),
                payload: e.to_json().into(),
                headers: vec![],
            })
            .await
            .unwrap();
        assert!(!r.duplicate);
    }
    // Kill billing (no graceful stop) and start it again: state comes back
    // from KV and ClickHouse, the re-published events are skipped.
    let config = billing_config(&w.env);
    let old = std::mem::replace(&mut w.billing, Billing::start(config.clone()).await);
    old.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    await_balance(&w, "dup", granted - total).await;
    let debits: u64 = w
        .env
        .ch()
        .query("SELECT count() FROM ledger WHERE tenant_id = 'dup' AND kind = 'debit'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(debits, 10);
    // Billing's debits equal the gateway's costs, event by event.
    let sum: String = w
        .env
        .ch()
        .query(
            "SELECT toString(-sum(amount)) FROM ledger WHERE tenant_id = 'dup' AND kind = 'debit'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(sum.parse::<Decimal>().unwrap(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_the_stream_into_an_empty_clickhouse_gives_identical_invoices() {
    let w = world(1).await;
    let secret = tenant_with_key(&w, "inv", "postpaid").await;
    grant(&w, "inv", Decimal::new(5, 5)).await;
    // A price change mid-period: lines per price version.
    for i in 0..6 {
        if i == 3 {
            let v = w
                .billing
                .ok(
                    "PUT",
                    "/admin/prices/mock-claude",
                    Some(json!({"input_per_million": "2.5", "output_per_million": "12.5"})),
                    201,
                )
                .await;
            assert_eq!(v["version"], 2);
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        await_admitted(&w, 0, &secret).await;
    }
    // A period ends at a whole second, exclusive (ClickHouse's DateTime
    // resolution): usage in the finalizing second belongs to the next period.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let inv = w
        .billing
        .ok("POST", "/admin/tenants/inv/invoices/finalize", None, 200)
        .await;
    assert_eq!(inv["status"], "finalized");
    let versions: std::collections::BTreeSet<u64> = inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["price_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions.len(), 2, "{inv}");
    let subtotal: Decimal = inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| dec(&l["amount"]))
        .sum();
    assert_eq!(dec(&inv["subtotal"]), subtotal);
    assert_eq!(dec(&inv["total"]) + dec(&inv["credits_applied"]), subtotal);
    // Finance reads the same from ClickHouse.
    let id = inv["id"].as_str().unwrap();
    let total: String = w
        .env
        .ch()
        .query("SELECT toString(total) FROM invoices WHERE invoice_id = ?")
        .bind(id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(total.parse::<Decimal>().unwrap(), dec(&inv["total"]));

    // A second billing on an empty database, with its own consumer, replays
    // the stream and computes the same invoice for the same period.
    let db = format!("{}_replay", w.env.database);
    tollgate_tests::harness::shared()
        .clickhouse
        .exec(&format!("CREATE DATABASE {db}"))
        .unwrap();
    let mut config = billing_config(&w.env);
    config.clickhouse.database = db.clone();
    config.consumer.durable = "billing-replay".into();
    let replay = tollgate_billing::service::Billing::open(config)
        .await
        .unwrap();
    let pricing = tokio::spawn(
        replay
            .clone()
            .run_pricing(tokio_util::sync::CancellationToken::new()),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while replay.pending_usage().await != Some(0) {
        assert!(Instant::now() < deadline, "replay did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = chrono::DateTime::parse_from_rfc3339(inv["period_start"].as_str().unwrap())
        .unwrap()
        .to_utc();
    let end = chrono::DateTime::parse_from_rfc3339(inv["period_end"].as_str().unwrap())
        .unwrap()
        .to_utc();
    let again = replay.invoice_for("inv", start, end).await.unwrap();
    pricing.abort();
    tollgate_tests::harness::shared()
        .clickhouse
        .exec(&format!("DROP DATABASE {db}"))
        .unwrap();
    assert_eq!(serde_json::to_value(&again.lines).unwrap(), inv["lines"]);
    assert_eq!(again.subtotal, dec(&inv["subtotal"]));
    assert_eq!(again.total, dec(&inv["total"]));
    assert_eq!(again.id, id);
}

#[tokio::test]
async fn admin_errors_are_clear_and_isolated() {
    let w = world(0).await;
    let (s, v) = w
        .billing
        .admin(
            "POST",
            "/admin/tenants",
            Some(json!({"id": "bad id!", "billing": "prepaid"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    assert_eq!(v["error"]["field"], "id", "{v}");
    let (s, _) = w
        .billing
        .admin(
            "POST",
            "/admin/tenants",
            Some(json!({"id": "ok", "billing": "prepaid"})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = w
        .billing
        .admin(
            "POST",
            "/admin/tenants",
            Some(json!({"id": "ok", "billing": "prepaid"})),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, _) = w
        .billing
        .admin(
            "POST",
            "/admin/tenants/nobody/credits",
            Some(json!({"amount": "1"})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, v) = w
        .billing
        .admin(
            "POST",
            "/admin/tenants/ok/credits",
            Some(json!({"amount": "-1"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "amount", "a 400 names the field: {v}");
    let (s, v) = w
        .billing
        .admin(
            "POST",
            "/admin/tenants/ok/credits",
            Some(json!({"amount": 1})),
        )
        .await;
    assert_eq!(
        s, 400,
        "a number amount must be refused (decimals are strings): {v}"
    );
    let r = w
        .http
        .get(format!("{}/admin/tenants", w.billing.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = w
        .http
        .get(format!("{}/admin/tenants", w.billing.url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A tenant key sees its own balance and nobody else's invoices.
    let a = w
        .billing
        .ok("POST", "/admin/tenants/ok/keys", Some(json!({})), 201)
        .await;
    w.billing
        .ok(
            "POST",
            "/admin/tenants",
            Some(json!({"id": "other", "billing": "postpaid"})),
            201,
        )
        .await;
    let r = w
        .http
        .get(format!("{}/v1/billing/balance", w.billing.url))
        .bearer_auth(a["secret"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["tenant_id"], "ok");
    assert_eq!(
        b["state"], "exhausted",
        "a prepaid tenant without credit is exhausted: {b}"
    );
    let r = w
        .http
        .get(format!("{}/v1/billing/invoices", w.billing.url))
        .bearer_auth(a["secret"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let inv: Value = r.json().await.unwrap();
    assert!(
        inv["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["tenant_id"] == "ok"),
        "{inv}"
    );
    let r = w
        .http
        .get(format!("{}/v1/billing/balance", w.billing.url))
        .bearer_auth("sk-tg-nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The OpenAPI document is served.
    let r = w
        .http
        .get(format!("{}/openapi.json", w.billing.url))
        .send()
        .await
        .unwrap();
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
}

/// An admin call that needs ClickHouse while ClickHouse is down is the
/// dependency's outage, not a bug: 503 with `Retry-After`, in the usual error
/// shape, and billing answers again once ClickHouse is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_while_clickhouse_is_down_is_a_503_with_retry_after() {
    let mut clickhouse = tokio::task::spawn_blocking(ClickHouseServer::start)
        .await
        .unwrap()
        .unwrap();
    let mut env = TestEnv::new();
    env.clickhouse_url = clickhouse.http_url();
    let billing = Billing::start(billing_config(&env)).await;
    let spend = || async {
        billing
            .http
            .get(format!("{}/admin/spend", billing.url))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(spend().await.status(), 200);

    clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.stop();
        clickhouse
    })
    .await
    .unwrap();
    let r = spend().await;
    assert_eq!(r.status(), 503);
    let retry = r
        .headers()
        .get("retry-after")
        .expect("a 503 carries Retry-After")
        .to_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(retry > 0);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "unavailable_error", "{v}");
    assert_eq!(v["error"]["retry_after"], retry, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ClickHouse"),
        "{v}"
    );
    // Calls that need only billing's own state still answer.
    let (s, _) = billing.admin("GET", "/admin/tenants", None).await;
    assert_eq!(s, 200);

    clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.restart().unwrap();
        clickhouse
    })
    .await
    .unwrap();
    let back = Instant::now();
    while spend().await.status() != 200 {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "billing never answered after ClickHouse came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    billing.kill();
    drop(clickhouse);
}
