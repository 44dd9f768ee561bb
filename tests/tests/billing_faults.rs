//! Billing under faults, with prepaid traffic flowing: `kill -9` of billing,
//! and a ClickHouse outage. Billing runs as the built binary (a child
//! process, so a kill is a real one); the gateway, the meter and the mock
//! upstream run in this process.
//!
//! ClickHouse, in the outage test, is the test's own server, killed with
//! `kill -9` and started again on the same data.
//!
//! What they try to break (issue 16, defect 3): the quota marker
//! `priced_seq` a gateway trusts must never pass a usage event billing has
//! not priced, or the gateway drops its local debit for an event nobody
//! counts and admits a tenant whose credit is gone. A sampler reads the
//! tenant's snapshot from the quota bucket, then the debits in ClickHouse,
//! every 100 ms; afterwards every usage event at a position ≤ a sampled
//! marker must have had its debit by that sample (or, for samples taken while
//! ClickHouse was down, by the next sample that could look). After recovery
//! each 200 the clients saw has one `usage` row and one debit, and the
//! balance is the grants minus the costs the clients were told.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod meter_common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meter_common::{InProcessMeter, MeterProcess, consumer_idle, meter_bin, meter_toml};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::time::Instant;
use tollgate_schemas::bus::{ConsumerSpec, EventBus, JetStreamBus, StreamSettings};
use tollgate_schemas::events::{Event, EventKind};
use tollgate_schemas::records::{QuotaScope, QuotaState, quota_key};
use tollgate_tests::billing::{ADMIN_KEY, billing_config_text};
use tollgate_tests::eventually;
use tollgate_tests::harness::{ClickHouseServer, NatsServer, TestEnv, ch_client, free_port};
use tollgate_tests::stack::{self, Service};

/// Concurrent clients of the one tenant, all through one gateway replica.
const CLIENTS: usize = 6;

fn bin(name: &str) -> PathBuf {
    let bin = meter_bin().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

struct Stack {
    env: TestEnv,
    dir: tempfile::TempDir,
    ch_url: String,
    db: String,
    _mock: Service,
    gateway: Service,
    meter: Option<InProcessMeter>,
    billing: Option<MeterProcess>,
    billing_port: u16,
    billings: usize,
    http: reqwest::Client,
}

impl Stack {
    /// Everything on `env`'s NATS namespace, with ClickHouse at `ch_url`
    /// (database `db`) for billing and the meter.
    async fn start(env: TestEnv, ch_url: String, db: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Migrated once up front: billing and the meter would otherwise race
        // each other's migrations at start.
        tollgate_schemas::migrations::apply(&ch_client(&ch_url), &db)
            .await
            .unwrap();
        let mock = stack::start_mock().await;
        let billing_port = free_port().unwrap();
        let billing_toml = billing_config_text(&env)
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{billing_port}\""),
                1,
            )
            .replacen(&env.clickhouse_url, &ch_url, 1)
            .replacen(
                &format!("database = \"{}\"", env.database),
                &format!("database = \"{db}\""),
                1,
            );
        std::fs::write(dir.path().join("billing.toml"), billing_toml).unwrap();
        let data = dir.path().join("gateway");
        let config = stack::gateway_config(&env, &env.nats_url, &mock.url(), &data, "");
        let gateway = stack::start_gateway(config).await;
        let meter = tollgate_meter::Config::from_toml(&meter_toml(
            &env.nats_url,
            &env.id,
            &ch_url,
            &db,
            1000,
            5,
        ))
        .unwrap();
        let mut s = Self {
            env,
            dir,
            ch_url,
            db,
            _mock: mock,
            gateway,
            meter: Some(InProcessMeter::start(meter, None)),
            billing: None,
            billing_port,
            billings: 0,
            http: reqwest::Client::new(),
        };
        s.start_billing().await;
        s
    }

    fn billing_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.billing_port)
    }

    fn ch(&self) -> clickhouse::Client {
        ch_client(&self.ch_url).with_database(&self.db)
    }

    /// Starts the billing binary and waits until it answers.
    async fn start_billing(&mut self) {
        self.billings += 1;
        let log = self
            .dir
            .path()
            .join(format!("billing-{}.log", self.billings));
        let mut child = MeterProcess::spawn_program(
            &bin("tollgate-billing"),
            &self.dir.path().join("billing.toml"),
            log,
            &[],
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/healthz", self.billing_url()))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline && matches!(child.child.try_wait(), Ok(None)),
                "billing did not start; its log:\n{}",
                child.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.billing = Some(child);
    }

    fn kill9_billing(&mut self) {
        if let Some(mut b) = self.billing.take() {
            b.kill9();
        }
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.billing_url()))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// A prepaid tenant with a key; returns the secret.
    async fn prepaid_tenant(&self, id: &str) -> String {
        self.tenant(id, "prepaid").await
    }

    /// A tenant with a key; returns the secret.
    async fn tenant(&self, id: &str, billing: &str) -> String {
        self.admin(
            reqwest::Method::POST,
            "/admin/tenants",
            Some(json!({"id": id, "billing": billing})),
        )
        .await;
        let k = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/tenants/{id}/keys"),
                Some(json!({"name": "k"})),
            )
            .await;
        k["secret"].as_str().unwrap().to_owned()
    }

    async fn grant(&self, tenant: &str, amount: Decimal) {
        self.admin(
            reqwest::Method::POST,
            &format!("/admin/tenants/{tenant}/credits"),
            Some(json!({"amount": amount.to_string()})),
        )
        .await;
    }

    async fn balance(&self, tenant: &str) -> Option<Decimal> {
        let r = self
            .http
            .get(format!(
                "{}/admin/tenants/{tenant}/balance",
                self.billing_url()
            ))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["balance"].as_str()?.parse().ok()
    }
}

/// What one request got.
enum Answer {
    Served { rid: String, cost: Decimal },
    Refused,
    Other(u16, String),
}

async fn chat(http: &reqwest::Client, gateway: &str, secret: &str) -> Answer {
    let resp = match http
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&json!({"model": "mock-claude", "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Answer::Other(0, e.to_string()),
    };
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (rid, cost) = (header("x-request-id"), header("x-tollgate-cost"));
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    match (status, rid, cost) {
        (200, Some(rid), Some(cost)) => Answer::Served {
            rid,
            cost: cost.parse().unwrap(),
        },
        (429, _, _) if body["error"]["code"] == "insufficient_quota" => Answer::Refused,
        _ => Answer::Other(status, body.to_string()),
    }
}

/// Waits until a request is served (the grant reached the gateway).
async fn await_admitted(s: &Stack, secret: &str) -> (String, Decimal) {
    eventually(
        "a grant to lift the refusal",
        Duration::from_secs(10),
        async || match chat(&s.http, &s.gateway.url(), secret).await {
            Answer::Served { rid, cost } => Some((rid, cost)),
            Answer::Refused => None,
            Answer::Other(status, body) => panic!("unexpected answer {status}: {body}"),
        },
    )
    .await
}

/// The clients' shared record.
#[derive(Default)]
struct Load {
    served: Mutex<Vec<(String, Decimal)>>,
    refused: AtomicU64,
    /// 200s for requests sent after some client had been refused.
    admitted_after_refusal: AtomicU64,
    others: Mutex<Vec<String>>,
    refused_once: AtomicBool,
    stop: AtomicBool,
    /// Each client's pause after a 200 (none: as fast as it can).
    pause: Duration,
}

impl Load {
    fn spent(&self) -> Decimal {
        self.served.lock().unwrap().iter().map(|(_, c)| *c).sum()
    }
}

/// `CLIENTS` clients that keep asking (a refused one waits 25 ms and asks
/// again, a served one `load.pause`) until `load.stop`.
fn spawn_clients(s: &Stack, secret: &str, load: &Arc<Load>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|_| {
            let (http, url, secret, load) = (
                s.http.clone(),
                s.gateway.url(),
                secret.to_owned(),
                load.clone(),
            );
            tokio::spawn(async move {
                while !load.stop.load(Ordering::Relaxed) {
                    let after_refusal = load.refused_once.load(Ordering::Relaxed);
                    match chat(&http, &url, &secret).await {
                        Answer::Served { rid, cost } => {
                            if after_refusal {
                                load.admitted_after_refusal.fetch_add(1, Ordering::Relaxed);
                            }
                            load.served.lock().unwrap().push((rid, cost));
                            if !load.pause.is_zero() {
                                tokio::time::sleep(load.pause).await;
                            }
                        }
                        Answer::Refused => {
                            load.refused_once.store(true, Ordering::Relaxed);
                            load.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Answer::Other(status, body) => {
                            load.others
                                .lock()
                                .unwrap()
                                .push(format!("{status}: {body}"));
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                    }
                }
            })
        })
        .collect()
}

/// Samples of the tenant's marker against the debits ClickHouse holds.
#[derive(Default)]
struct Samples {
    /// (marker, whether ClickHouse answered right after it was read).
    markers: Vec<(u64, bool)>,
    /// Event id → the first sample whose ClickHouse query saw its debit.
    first_debited: HashMap<String, usize>,
}

fn spawn_sampler(
    s: &Stack,
    tenant: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Samples> {
    let (nats, bucket, ch, tenant) = (
        s.env.nats_url.clone(),
        s.env.names.kv_quota.clone(),
        s.ch(),
        tenant.to_owned(),
    );
    tokio::spawn(async move {
        let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
        let kv = tollgate_schemas::kv::ensure(&js, &bucket, 1).await.unwrap();
        let key = quota_key(QuotaScope::Tenant, &tenant);
        let mut out = Samples::default();
        while !stop.load(Ordering::Relaxed) {
            // The marker first, then the debits: an honest marker's events
            // were debited before it was written, so the query sees them.
            let marker = match kv.get(&key).await {
                Ok(Some(b)) => serde_json::from_slice::<QuotaState>(&b).unwrap().priced_seq,
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let debited = tokio::time::timeout(
                Duration::from_secs(2),
                ch.query(
                    "SELECT entry_id FROM ledger_entries WHERE tenant_id = ? AND kind = 'debit'",
                )
                .bind(&tenant)
                .fetch_all::<String>(),
            )
            .await;
            let i = out.markers.len();
            let answered = matches!(debited, Ok(Ok(_)));
            if let Ok(Ok(ids)) = debited {
                for id in ids {
                    out.first_debited.entry(id).or_insert(i);
                }
            }
            out.markers.push((marker, answered));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out
    })
}

/// Every usage event of `tenant` in the stream: (position, event id).
async fn usage_positions(env: &TestEnv, tenant: &str) -> Vec<(u64, String)> {
    let bus = JetStreamBus::connect(&env.nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap();
    let mut c = bus
        .consumer(ConsumerSpec::new(env.names.kind_filter(EventKind::Usage)))
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let batch = c.fetch(1000, Duration::from_millis(500)).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        for d in batch {
            if let Ok(Event::Usage(u)) = Event::from_json(&d.payload)
                && u.meta.tenant_id == tenant
            {
                out.push((d.position, u.meta.id.to_string()));
            }
        }
    }
}

/// Checks the samples; returns how many samples could be checked.
fn assert_marker_never_passed_an_unpriced_event(samples: &Samples, usage: &[(u64, String)]) {
    let mut checked = 0;
    let mut worst: Option<(usize, u64, usize)> = None;
    for (i, (marker, _)) in samples.markers.iter().enumerate() {
        // The first sample at or after `i` whose query answered: a debit
        // present at `i` is present then too.
        let Some(j) = (i..samples.markers.len()).find(|&j| samples.markers[j].1) else {
            continue;
        };
        checked += 1;
        let unpriced = usage
            .iter()
            .filter(|(p, id)| {
                *p <= *marker && samples.first_debited.get(id).is_none_or(|&at| at > j)
            })
            .count();
        if unpriced > 0 && worst.is_none_or(|(_, _, n)| unpriced > n) {
            worst = Some((i, *marker, unpriced));
        }
    }
    println!(
        "{} marker samples, {checked} checked against ClickHouse",
        samples.markers.len()
    );
    assert!(checked >= 10, "too few samples could be checked: {checked}");
    if let Some((i, marker, n)) = worst {
        panic!(
            "sample {i}: priced_seq {marker} passed {n} usage events that had no debit yet \
             (a gateway drops its local debit for them)"
        );
    }
}

/// After the load: waits until everything is priced and stored, then checks
/// that each 200 has one `usage` row and one debit, and the balance.
async fn assert_settled(s: &Stack, tenant: &str, granted: Decimal, load: &Load) {
    let served = load.served.lock().unwrap().clone();
    let total: Decimal = served.iter().map(|(_, c)| *c).sum();
    let want = granted - total;
    let ch = s.ch();
    let n = served.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = ch
            .query("SELECT count() FROM usage WHERE tenant_id = ?")
            .bind(tenant)
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        let debits = ch
            .query("SELECT count() FROM ledger WHERE tenant_id = ? AND kind = 'debit'")
            .bind(tenant)
            .fetch_one::<u64>()
            .await
            .unwrap_or(0);
        let balance = s.balance(tenant).await;
        if rows == n && debits == n && balance == Some(want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after 60 s: {rows} usage rows and {debits} debits for {n} 200s, \
             balance {balance:?} want {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct U {
        request_id: String,
        event_id: String,
        n: u64,
    }
    let usage = ch
        .query(
            "SELECT request_id, toString(event_id) AS event_id, count() AS n FROM usage
             WHERE tenant_id = ? GROUP BY request_id, event_id",
        )
        .bind(tenant)
        .fetch_all::<U>()
        .await
        .unwrap();
    let by_rid: HashMap<&str, &U> = usage.iter().map(|u| (u.request_id.as_str(), u)).collect();
    assert_eq!(usage.len(), served.len(), "one usage row per 200");
    for (rid, _) in &served {
        let u = by_rid
            .get(rid.as_str())
            .unwrap_or_else(|| panic!("no usage row for {rid}"));
        assert_eq!(u.n, 1, "{rid} has {} usage rows", u.n);
    }
    let debited: Vec<String> = ch
        .query("SELECT entry_id FROM ledger WHERE tenant_id = ? AND kind = 'debit'")
        .bind(tenant)
        .fetch_all::<String>()
        .await
        .unwrap();
    let debited_set: BTreeSet<&str> = debited.iter().map(String::as_str).collect();
    assert_eq!(debited_set.len(), debited.len(), "a debit appears twice");
    let events: BTreeSet<&str> = usage.iter().map(|u| u.event_id.as_str()).collect();
    assert_eq!(debited_set, events, "one debit per usage event");
    let ledger_sum: String = ch
        .query("SELECT toString(sum(amount)) FROM ledger WHERE tenant_id = ?")
        .bind(tenant)
        .fetch_one::<String>()
        .await
        .unwrap();
    assert_eq!(
        ledger_sum.parse::<Decimal>().unwrap().normalize(),
        want.normalize(),
        "ledger: grants − debits"
    );
    // Nothing else is on its way: the meter has committed everything
    // (refusals publish request events too, so this can take a moment).
    let (url, names) = (s.env.nats_url.clone(), s.env.names.clone());
    eventually("the meter idle", Duration::from_secs(30), || {
        let (url, names) = (url.clone(), names.clone());
        async move { consumer_idle(&url, &names, "meter").await }
    })
    .await;
    let rows = ch
        .query("SELECT count() FROM usage WHERE tenant_id = ?")
        .bind(tenant)
        .fetch_one::<u64>()
        .await
        .unwrap();
    assert_eq!(rows, n, "usage rows once the meter is idle");
}

/// The documented bound, one replica with C concurrent requests: at most C
/// requests past zero, each at most the largest request's cost.
fn assert_overspend_within_bound(granted: Decimal, load: &Load) -> Decimal {
    let served = load.served.lock().unwrap().clone();
    let total: Decimal = served.iter().map(|(_, c)| *c).sum();
    let max = served.iter().map(|(_, c)| *c).max().unwrap();
    let overspend = total - granted;
    println!(
        "granted {granted}, served {} requests for {total}: overspend {overspend} \
         (bound {CLIENTS} × {max} = {}); {} refusals, {} admitted after a refusal",
        served.len(),
        max * Decimal::from(CLIENTS),
        load.refused.load(Ordering::Relaxed),
        load.admitted_after_refusal.load(Ordering::Relaxed),
    );
    assert!(
        overspend <= max * Decimal::from(CLIENTS),
        "overspend {overspend} exceeds {CLIENTS} × {max}"
    );
    let others = load.others.lock().unwrap();
    assert!(
        others.is_empty(),
        "unexpected answers: {:?}",
        &others[..others.len().min(5)]
    );
    overspend
}

/// Calibrates one request's cost, then grants enough for `secs` of the
/// clients' traffic (measured on a postpaid tenant first: this machine's
/// rate varies tenfold with its load), so that the credit outlasts a fault
/// and spending goes on after it; returns what was granted in all.
async fn fund(
    s: &Stack,
    tenant: &str,
    secret: &str,
    secs: u64,
    pause: Duration,
) -> (Decimal, (String, Decimal)) {
    let warm = s.tenant("warmup", "postpaid").await;
    let _ = await_admitted(s, &warm).await;
    let load = Arc::new(Load {
        pause,
        ..Load::default()
    });
    let clients = spawn_clients(s, &warm, &load);
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let rate = load.served.lock().unwrap().len() as i64;
    s.grant(tenant, Decimal::new(1, 2)).await;
    let first = await_admitted(s, secret).await;
    let requests = (rate * i64::try_from(secs).unwrap()).max(300);
    println!("{rate} requests/s with {CLIENTS} clients: credit for {requests}");
    let more = first.1 * Decimal::from(requests);
    s.grant(tenant, more).await;
    (Decimal::new(1, 2) + more, first)
}

/// After a fault is over: keeps the clients going until they have run into
/// zero, and for a while after (at least `after_recovery` since `recovered`),
/// so that the time a fault's leftovers take to come back is covered.
async fn run_into_zero(load: &Load, recovered: Instant, after_recovery: Duration) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while load.refused.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the clients did not run into zero within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = (Instant::now() + Duration::from_secs(3)).max(recovered + after_recovery);
    tokio::time::sleep_until(until).await;
}

/// Stops the clients and checks they reached zero (else the test proves nothing).
async fn stop_clients(load: &Load, clients: Vec<tokio::task::JoinHandle<()>>) {
    load.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(
        load.refused.load(Ordering::Relaxed) > 0,
        "the clients never reached zero; the test proves nothing"
    );
}

async fn wait_spent(load: &Load, at_least: Decimal, within: Duration) {
    let deadline = Instant::now() + within;
    while load.spent() < at_least {
        assert!(
            Instant::now() < deadline,
            "the clients spent {} of the {at_least} wanted within {within:?}",
            load.spent()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_billing_under_prepaid_traffic_never_forgets_spend() {
    let env = TestEnv::new();
    let (ch_url, db) = (env.clickhouse_url.clone(), env.database.clone());
    let mut s = Stack::start(env, ch_url, db).await;
    let tenant = "crash";
    let secret = s.prepaid_tenant(tenant).await;
    // Enough credit to outlast the fault, so that spending goes on after
    // billing is back while what the dead process held is not priced yet.
    let (granted, first) = fund(&s, tenant, &secret, 12, Duration::ZERO).await;
    let load = Arc::new(Load::default());
    load.served.lock().unwrap().push(first);
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(&s, tenant, stop_sampling.clone());
    let clients = spawn_clients(&s, &secret, &load);

    // Kill billing with a twentieth of the credit spent: what it had fetched
    // and not acknowledged (and what its client had prefetched) stays with
    // the dead process until ack_wait.
    wait_spent(&load, granted / Decimal::from(20), Duration::from_secs(60)).await;
    let killed_at = Instant::now();
    s.kill9_billing();
    let spent_at_kill = load.spent();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.start_billing().await;
    let spent_at_recovery = load.spent();
    println!(
        "billing killed with {spent_at_kill} of {granted} spent, back after {:?} with {spent_at_recovery} spent",
        killed_at.elapsed()
    );
    assert!(
        spent_at_recovery < granted,
        "the credit ran out while billing was down; spending after it is not tested"
    );
    // Long enough for the dead process's messages to come back (ack_wait
    // 5 s) and for the clients to run into zero.
    run_into_zero(&load, Instant::now(), Duration::from_secs(10)).await;
    stop_clients(&load, clients).await;
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let usage = usage_positions(&s.env, tenant).await;
    assert_marker_never_passed_an_unpriced_event(&samples, &usage);
    let overspend = assert_overspend_within_bound(granted, &load);
    assert_settled(&s, tenant, granted, &load).await;
    println!("kill -9 of billing: overspend {overspend}, every 200 priced once");
    if let Some(m) = s.meter.take() {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clickhouse_outage_under_prepaid_traffic_never_forgets_spend() {
    let env = TestEnv::new();
    let mut clickhouse = tokio::task::spawn_blocking(ClickHouseServer::start)
        .await
        .unwrap()
        .unwrap();
    let s = Stack::start(env, clickhouse.http_url(), "tollgate".into()).await;
    let tenant = "outage";
    let secret = s.prepaid_tenant(tenant).await;
    // Enough credit to outlast the outage, so that spending goes on after
    // ClickHouse is back while what failed during it is not priced yet.
    // Paced clients: what arrives during the outage stays below billing's
    // in-flight limit (4 batches), so a billing that skipped a failed batch
    // would go on to price later ones, which is what this must catch.
    let pause = Duration::from_millis(20);
    let (granted, first) = fund(&s, tenant, &secret, 15, pause).await;
    let load = Arc::new(Load {
        pause,
        ..Load::default()
    });
    load.served.lock().unwrap().push(first);
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = spawn_sampler(&s, tenant, stop_sampling.clone());
    let clients = spawn_clients(&s, &secret, &load);

    wait_spent(&load, granted / Decimal::from(20), Duration::from_secs(60)).await;
    let spent_at_stop = load.spent();
    let down_at = Instant::now();
    clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.kill9();
        clickhouse
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.restart().unwrap();
        clickhouse
    })
    .await
    .unwrap();
    println!(
        "ClickHouse killed (-9) and back after {:?}, with {spent_at_stop} of {granted} spent at the kill",
        down_at.elapsed()
    );
    let spent_at_recovery = load.spent();
    assert!(
        spent_at_recovery < granted,
        "the credit ran out during the outage; spending after it is not tested"
    );
    run_into_zero(&load, Instant::now(), Duration::from_secs(10)).await;
    println!(
        "{spent_at_recovery} spent when ClickHouse was back, {} at the end",
        load.spent()
    );
    stop_clients(&load, clients).await;
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let down = samples.markers.iter().filter(|(_, ok)| !ok).count();
    println!("{down} samples taken while ClickHouse could not answer");
    assert!(down > 0, "no sample fell in the outage");
    let usage = usage_positions(&s.env, tenant).await;
    assert_marker_never_passed_an_unpriced_event(&samples, &usage);
    let overspend = assert_overspend_within_bound(granted, &load);
    assert_settled(&s, tenant, granted, &load).await;
    println!("ClickHouse outage: overspend {overspend}, every 200 priced once");
    let mut s = s;
    if let Some(m) = s.meter.take() {
        m.shutdown().await;
    }
    s.kill9_billing();
    drop(clickhouse);
}

/// NATS stopped (`SIGTERM`) and restarted twelve times under prepaid
/// traffic: the gateway spools, the meter and billing reconnect, and after
/// it every 200 the clients saw has one `usage` row and one debit, the
/// balance is grants − costs, and the overspend stays within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restarts_under_prepaid_traffic_lose_and_double_count_nothing() {
    let mut nats = NatsServer::start().unwrap();
    let mut env = TestEnv::new();
    env.nats_url = nats.url();
    let (ch_url, db) = (env.clickhouse_url.clone(), env.database.clone());
    let mut s = Stack::start(env, ch_url, db).await;
    let tenant = "restarts";
    let secret = s.prepaid_tenant(tenant).await;
    let (granted, first) = fund(&s, tenant, &secret, 20, Duration::ZERO).await;
    let load = Arc::new(Load::default());
    load.served.lock().unwrap().push(first);
    let clients = spawn_clients(&s, &secret, &load);
    wait_spent(&load, granted / Decimal::from(20), Duration::from_secs(60)).await;
    for _ in 0..12 {
        nats.stop();
        tokio::time::sleep(Duration::from_millis(100)).await;
        nats.restart().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let spent_after = load.spent();
    println!("12 NATS restarts done with {spent_after} of {granted} spent");
    assert!(
        spent_after < granted,
        "the credit ran out during the restarts; spending after them is not tested"
    );
    run_into_zero(&load, Instant::now(), Duration::from_secs(10)).await;
    stop_clients(&load, clients).await;
    let overspend = assert_overspend_within_bound(granted, &load);
    assert_settled(&s, tenant, granted, &load).await;
    println!("12 NATS restarts: overspend {overspend}, every 200 metered and priced once");
    if let Some(m) = s.meter.take() {
        m.shutdown().await;
    }
    s.kill9_billing();
}
