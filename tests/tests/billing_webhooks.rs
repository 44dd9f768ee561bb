//! Billing webhooks against real NATS (JetStream) and ClickHouse, with a real
//! HTTP receiver that verifies every signature with the `standardwebhooks`
//! crate, as a tenant's server would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_billing::webhooks::{WebhookConfig, Webhooks};
use tollgate_tests::eventually;
use tollgate_tests::harness::TestEnv;

const TENANT: &str = "acme";
const OTHER: &str = "globex";

// ---------------------------------------------------------------- helpers

/// Aborts a spawned task when dropped, so a failing test leaks nothing.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn fast_config() -> WebhookConfig {
    WebhookConfig {
        allow_private: true,
        timeout: Duration::from_secs(2),
        max_age: Duration::from_secs(120),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(3),
    }
}

async fn open(env: &TestEnv, config: WebhookConfig) -> Webhooks {
    let js = async_nats::jetstream::new(env.nats().await.unwrap());
    Webhooks::open(js, &env.names, env.ch(), &env.database, config)
        .await
        .unwrap()
}

/// Runs the worker until the returned token is cancelled (or the task drops).
fn start_worker(wh: &Webhooks) -> (CancellationToken, Task) {
    let token = CancellationToken::new();
    let handle = tokio::spawn(wh.clone().run(token.clone()));
    (token, Task(handle))
}

/// The admin routes served on a free port, as billing's admin router would.
struct Admin {
    base: String,
    http: reqwest::Client,
    _task: Task,
}

impl Admin {
    async fn serve(wh: &Webhooks) -> Self {
        let router = wh.admin_router(Arc::new(|t: &str| t == TENANT || t == OTHER));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            _task: Task(task),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// Creates an endpoint; returns (id, secret).
    async fn create(&self, tenant: &str, url: &str, events: Option<&[&str]>) -> (String, String) {
        let mut body = json!({ "url": url });
        if let Some(ev) = events {
            body["events"] = json!(ev);
        }
        let (status, v) = self
            .post(&format!("/admin/tenants/{tenant}/webhooks"), body)
            .await;
        assert_eq!(status, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_owned(),
            v["secret"].as_str().unwrap().to_owned(),
        )
    }

    async fn deliveries(&self, tenant: &str, wid: &str) -> Vec<Value> {
        let (status, v) = self
            .get(&format!(
                "/admin/tenants/{tenant}/webhooks/{wid}/deliveries"
            ))
            .await;
        assert_eq!(status, 200, "{v}");
        v["data"].as_array().unwrap().clone()
    }
}

/// One request the receiver got.
#[derive(Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Hit {
    fn webhook_id(&self) -> String {
        self.headers["webhook-id"].to_str().unwrap().to_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn verifies_with(&self, secret: &str) -> bool {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&self.body, &self.headers)
            .is_ok()
    }
}

/// Scripted answers: (status, Retry-After seconds).
type Script = Arc<Mutex<VecDeque<(u16, Option<u64>)>>>;

/// A tenant's webhook server: answers from a script (status, Retry-After),
/// then 200, and records every request.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Script,
}

impl Receiver {
    fn new(script: &[(u16, Option<u64>)]) -> Self {
        let r = Self::default();
        r.script.lock().unwrap().extend(script.iter().copied());
        r
    }

    /// Serves on `listener`; the URL of its hook path.
    fn serve(&self, listener: TcpListener) -> (String, Task) {
        let addr: SocketAddr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(self.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        (format!("http://{addr}/hook"), Task(task))
    }

    async fn start(script: &[(u16, Option<u64>)]) -> (Self, String, Task) {
        let r = Self::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (url, task) = r.serve(listener);
        (r, url, task)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Hit> {
        let hits = eventually(&format!("{n} webhook requests"), within, || async {
            let h = self.hits();
            (h.len() >= n).then_some(h)
        })
        .await;
        assert_eq!(hits.len(), n, "more requests than expected");
        hits
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    r.hits.lock().unwrap().push(Hit {
        headers,
        body,
        at: Instant::now(),
    });
    let next = r.script.lock().unwrap().pop_front();
    match next {
        None => StatusCode::OK.into_response(),
        Some((status, retry_after)) => {
            let status = StatusCode::from_u16(status).unwrap();
            match retry_after {
                Some(s) => (status, [("retry-after", s.to_string())], "slow down").into_response(),
                None => (status, "receiver says no").into_response(),
            }
        }
    }
}

/// The endpoint's log once it holds `n` attempts (newest first).
async fn log_with(admin: &Admin, tenant: &str, wid: &str, n: usize) -> Vec<Value> {
    eventually(
        &format!("{n} logged attempts"),
        Duration::from_secs(20),
        || async {
            let rows = admin.deliveries(tenant, wid).await;
            (rows.len() >= n).then_some(rows)
        },
    )
    .await
}

/// Waits until the webhook queue is drained: every message in the stream has
/// been pulled and settled (acked or terminated; a nak'd delivery waiting out
/// its delay still counts as pending). The receiver records a request before
/// it answers and the worker settles only after the answer, so once this
/// returns the receivers hold every delivery of what was emitted so far:
/// "nothing more arrived" is then a fact, not a guess about how long to wait.
async fn drained(env: &TestEnv) {
    let js = async_nats::jetstream::new(env.nats().await.unwrap());
    let stream = js.get_stream(&env.names.webhooks_stream).await.unwrap();
    eventually("the webhook queue drained", Duration::from_secs(30), || {
        let mut stream = stream.clone();
        async move {
            let last = stream.info().await.unwrap().state.last_sequence;
            let c = stream
                .consumer_info("tollgate-billing-webhooks")
                .await
                .unwrap();
            (c.num_pending == 0 && c.num_ack_pending == 0 && c.ack_floor.stream_sequence == last)
                .then_some(())
        }
    })
    .await;
}

async fn setup(config: WebhookConfig) -> (TestEnv, Webhooks, Admin) {
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    let wh = open(&env, config).await;
    let admin = Admin::serve(&wh).await;
    (env, wh, admin)
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_delivered_once_signed_with_the_documented_body() {
    let (env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[]).await;
    let (other, other_url, _o) = Receiver::start(&[]).await;
    let (wid, secret) = admin.create(TENANT, &url, Some(&["quota.warning"])).await;
    // Subscribed to another type only: gets nothing.
    admin
        .create(TENANT, &other_url, Some(&["invoice.finalized"]))
        .await;

    // The endpoint as the API shows it: no secret outside creation.
    let (status, one) = admin
        .get(&format!("/admin/tenants/{TENANT}/webhooks/{wid}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["url"], url);
    assert_eq!(one["enabled"], true);
    assert_eq!(one["events"], json!(["quota.warning"]));
    assert!(one.get("secret").is_none());
    let (_, listed) = admin
        .get(&format!("/admin/tenants/{TENANT}/webhooks"))
        .await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);
    assert!(!listed.to_string().contains("whsec_"));

    let (_stop, _worker) = start_worker(&wh);
    wh.emit(
        TENANT,
        "quota.warning",
        json!({"remaining": "1.50", "threshold": "0.8"}),
        "quota.warning:acme:1",
    )
    .await
    .unwrap();

    let hits = receiver.wait_for(1, Duration::from_secs(15)).await;
    let hit = &hits[0];
    assert!(hit.verifies_with(&secret), "signature does not verify");
    assert_eq!(hit.headers["content-type"], "application/json");
    assert!(hit.webhook_id().starts_with("msg_"));
    assert!(
        hit.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .starts_with("v1,")
    );
    let body = hit.json();
    assert_eq!(body["type"], "quota.warning");
    assert!(chrono::DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).is_ok());
    assert_eq!(body["data"]["tenant_id"], TENANT);
    assert_eq!(body["data"]["remaining"], "1.50");

    // Logged once as delivered; nothing more arrives.
    let rows = log_with(&admin, TENANT, &wid, 1).await;
    assert_eq!(rows[0]["outcome"], "delivered");
    assert_eq!(rows[0]["status_code"], 200);
    assert_eq!(rows[0]["attempt"], 1);
    assert_eq!(rows[0]["delivery_id"], hit.webhook_id());
    drained(&env).await;
    assert_eq!(receiver.hits().len(), 1);
    assert!(
        other.hits().is_empty(),
        "unsubscribed endpoint got an event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_backoff_under_the_same_webhook_id() {
    let (_env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[(500, None), (500, None), (503, None)]).await;
    let (wid, secret) = admin.create(TENANT, &url, None).await;
    let (_stop, _worker) = start_worker(&wh);
    wh.emit(
        TENANT,
        "credits.granted",
        json!({"amount": "10"}),
        "grant-1",
    )
    .await
    .unwrap();

    let hits = receiver.wait_for(4, Duration::from_secs(20)).await;
    let id = hits[0].webhook_id();
    for h in &hits {
        assert_eq!(h.webhook_id(), id);
        assert!(h.verifies_with(&secret));
        assert_eq!(h.body, hits[0].body, "the body changed between attempts");
    }
    // Nak with a delay is honoured (nats-server 2.9): the gaps follow
    // 200 ms, 400 ms, 800 ms (±20 % jitter), not an immediate redelivery.
    for (i, expected_ms) in [200u64, 400, 800].into_iter().enumerate() {
        let gap = hits[i + 1].at - hits[i].at;
        assert!(
            gap >= Duration::from_millis(expected_ms * 3 / 4),
            "gap {i} was {gap:?}, expected about {expected_ms} ms"
        );
    }

    let rows = log_with(&admin, TENANT, &wid, 4).await;
    let outcomes: Vec<_> = rows.iter().map(|r| r["outcome"].clone()).collect();
    assert_eq!(outcomes, ["delivered", "failed", "failed", "failed"]);
    let attempts: Vec<_> = rows
        .iter()
        .map(|r| r["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [4, 3, 2, 1]);
    assert_eq!(rows[1]["status_code"], 503);
    assert_eq!(rows[3]["status_code"], 500);
    assert!(rows[3]["error"].as_str().unwrap().contains("500"));
    assert!(rows[3]["next_attempt_at"].is_string());
    assert!(rows[0]["next_attempt_at"].is_null());
    assert!(rows.iter().all(|r| r["delivery_id"] == id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_survives_a_billing_restart_while_the_receiver_is_down() {
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    // A port nothing listens on yet: the receiver is down.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/hook");

    let first = open(&env, fast_config()).await;
    let admin = Admin::serve(&first).await;
    let (wid, secret) = admin.create(TENANT, &url, None).await;
    let (_stop, worker) = start_worker(&first);
    first
        .emit(
            TENANT,
            "invoice.finalized",
            json!({"invoice_id": "inv_1"}),
            "inv_1",
        )
        .await
        .unwrap();
    let rows = log_with(&admin, TENANT, &wid, 1).await;
    assert_eq!(rows[0]["outcome"], "failed");
    assert_eq!(rows[0]["status_code"], 0);
    let delivery_id = rows[0]["delivery_id"].as_str().unwrap().to_owned();

    // Billing dies: the worker is aborted mid-schedule, its connection goes.
    drop(worker);
    drop(admin);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A new billing process on the same NATS and ClickHouse; the receiver
    // comes up.
    let second = open(&env, fast_config()).await;
    let (_stop2, _worker2) = start_worker(&second);
    let receiver = Receiver::default();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (_, _r) = receiver.serve(listener);

    let hits = receiver.wait_for(1, Duration::from_secs(60)).await;
    assert_eq!(hits[0].webhook_id(), delivery_id);
    assert!(hits[0].verifies_with(&secret));
    assert_eq!(hits[0].json()["data"]["invoice_id"], "inv_1");
    let admin = Admin::serve(&second).await;
    // The log is ordered by second, then attempt; attempts of both processes
    // can share a second, so look for the delivered one rather than at the top.
    let rows = eventually("the delivered attempt", Duration::from_secs(20), || async {
        let rows = admin.deliveries(TENANT, &wid).await;
        rows.iter()
            .any(|r| r["outcome"] == "delivered")
            .then_some(rows)
    })
    .await;
    assert!(rows.len() >= 2, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["outcome"] == "failed" || r["outcome"] == "delivered"),
        "{rows:?}"
    );
    assert_eq!(
        rows.iter().filter(|r| r["outcome"] == "delivered").count(),
        1,
        "{rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let (_env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[(429, Some(2))]).await;
    let (wid, _) = admin.create(TENANT, &url, None).await;
    let (_stop, _worker) = start_worker(&wh);
    wh.emit(TENANT, "quota.exhausted", json!({}), "exhausted-1")
        .await
        .unwrap();
    let hits = receiver.wait_for(2, Duration::from_secs(20)).await;
    let gap = hits[1].at - hits[0].at;
    // The backoff alone would be about 200 ms.
    assert!(gap >= Duration::from_millis(1_900), "retried after {gap:?}");
    let rows = log_with(&admin, TENANT, &wid, 2).await;
    assert_eq!(rows[1]["status_code"], 429);
    assert_eq!(rows[1]["outcome"], "failed");
    assert_eq!(rows[0]["outcome"], "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint() {
    let (env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[(410, None)]).await;
    let (wid, _) = admin.create(TENANT, &url, None).await;
    let (_stop, _worker) = start_worker(&wh);
    wh.emit(TENANT, "quota.warning", json!({}), "w-1")
        .await
        .unwrap();
    receiver.wait_for(1, Duration::from_secs(15)).await;

    let path = format!("/admin/tenants/{TENANT}/webhooks/{wid}");
    eventually("the endpoint disabled", Duration::from_secs(10), || async {
        let (_, v) = admin.get(&path).await;
        (v["enabled"] == false).then_some(())
    })
    .await;
    let rows = log_with(&admin, TENANT, &wid, 1).await;
    assert_eq!(rows[0]["outcome"], "gone");
    assert_eq!(rows[0]["status_code"], 410);

    // Later events are not delivered, and the 410'd one is not retried.
    wh.emit(TENANT, "quota.exhausted", json!({}), "e-1")
        .await
        .unwrap();
    drained(&env).await;
    assert_eq!(receiver.hits().len(), 1);

    // Re-enabled by the admin, it receives again.
    let (status, v) = admin
        .send(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["enabled"], true);
    wh.emit(TENANT, "quota.restored", json!({}), "r-1")
        .await
        .unwrap();
    let hits = receiver.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(hits[1].json()["type"], "quota.restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_are_refused_unless_allowed() {
    let strict_config = WebhookConfig {
        allow_private: false,
        ..fast_config()
    };
    let (env, _permissive, permissive_admin) = setup(fast_config()).await;
    let strict = open(&env, strict_config).await;
    let strict_admin = Admin::serve(&strict).await;
    let path = format!("/admin/tenants/{TENANT}/webhooks");
    let private = [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.1.2.3/hook",
        "http://[::1]:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0:80/",
        "http://[::ffff:192.168.0.1]/",
    ];
    for url in private {
        let (status, v) = strict_admin.post(&path, json!({ "url": url })).await;
        assert_eq!(status, 400, "{url} was accepted: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    for url in private {
        let (status, v) = permissive_admin.post(&path, json!({ "url": url })).await;
        assert_eq!(status, 201, "{url} refused with allow_private: {v}");
    }
    // Other validation, whatever allow_private says.
    for body in [
        json!({"url": "ftp://example.com/x"}),
        json!({"url": "not a url"}),
        json!({"url": "http://example.com/", "events": ["quota.warning", "tokens.burned"]}),
        json!({"url": "http://example.com/", "surprise": true}),
        json!({}),
    ] {
        let (status, v) = permissive_admin.post(&path, body.clone()).await;
        assert_eq!(status, 400, "{body} was accepted: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    // Checked again at each attempt: an endpoint created while private
    // destinations were allowed is not called by a strict worker.
    let (receiver, url, _r) = Receiver::start(&[]).await;
    let (wid, _) = permissive_admin.create(OTHER, &url, None).await;
    let (_stop, _worker) = start_worker(&strict);
    strict
        .emit(OTHER, "quota.warning", json!({}), "private-1")
        .await
        .unwrap();
    let rows = log_with(&strict_admin, OTHER, &wid, 1).await;
    assert_eq!(rows[0]["outcome"], "failed");
    assert!(
        rows[0]["error"].as_str().unwrap().contains("private"),
        "{}",
        rows[0]["error"]
    );
    assert!(receiver.hits().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_idempotency_key_is_delivered_once() {
    let (env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[]).await;
    let (wid, _) = admin.create(TENANT, &url, None).await;
    // Emitted twice before the worker runs, then once more while it runs.
    for n in 0..2 {
        wh.emit(TENANT, "credits.granted", json!({ "n": n }), "grant-7")
            .await
            .unwrap();
    }
    let (_stop, _worker) = start_worker(&wh);
    let hits = receiver.wait_for(1, Duration::from_secs(15)).await;
    wh.emit(TENANT, "credits.granted", json!({ "n": 2 }), "grant-7")
        .await
        .unwrap();
    drained(&env).await;
    assert_eq!(receiver.hits().len(), 1);
    assert_eq!(hits[0].json()["data"]["n"], 0);

    // Another key is another delivery, with another webhook-id.
    wh.emit(TENANT, "credits.granted", json!({ "n": 3 }), "grant-8")
        .await
        .unwrap();
    let hits = receiver.wait_for(2, Duration::from_secs(15)).await;
    assert_ne!(hits[0].webhook_id(), hits[1].webhook_id());
    let rows = log_with(&admin, TENANT, &wid, 2).await;
    assert_eq!(rows.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_standard_and_rotation_signs_with_the_new_one() {
    let (_env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[]).await;
    let (wid, old) = admin.create(TENANT, &url, None).await;
    let raw = old.strip_prefix("whsec_").expect("whsec_ prefix");
    let key = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .unwrap();
    assert!(key.len() >= 24, "secret has {} bytes", key.len());

    let (_stop, _worker) = start_worker(&wh);
    wh.emit(TENANT, "quota.warning", json!({}), "k-1")
        .await
        .unwrap();
    let hits = receiver.wait_for(1, Duration::from_secs(15)).await;
    assert!(hits[0].verifies_with(&old));

    let (status, v) = admin
        .post(
            &format!("/admin/tenants/{TENANT}/webhooks/{wid}/rotate-secret"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], wid.as_str());
    let new = v["secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_"));
    assert_ne!(new, old);

    wh.emit(TENANT, "quota.exhausted", json!({}), "k-2")
        .await
        .unwrap();
    let hits = receiver.wait_for(2, Duration::from_secs(15)).await;
    assert!(hits[1].verifies_with(&new));
    assert!(!hits[1].verifies_with(&old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_endpoints_or_deliveries() {
    let (env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[]).await;
    let (wid, _) = admin.create(TENANT, &url, None).await;
    let (_stop, _worker) = start_worker(&wh);
    wh.emit(TENANT, "quota.warning", json!({}), "iso-1")
        .await
        .unwrap();
    receiver.wait_for(1, Duration::from_secs(15)).await;
    let rows = log_with(&admin, TENANT, &wid, 1).await;
    let delivery_id = rows[0]["delivery_id"].as_str().unwrap().to_owned();

    let theirs = format!("/admin/tenants/{OTHER}/webhooks/{wid}");
    assert_eq!(admin.get(&theirs).await.0, 404);
    assert_eq!(admin.get(&format!("{theirs}/deliveries")).await.0, 404);
    assert_eq!(
        admin
            .post(&format!("{theirs}/rotate-secret"), json!({}))
            .await
            .0,
        404
    );
    assert_eq!(
        admin
            .send(
                reqwest::Method::PATCH,
                &theirs,
                Some(json!({"enabled": false}))
            )
            .await
            .0,
        404
    );
    assert_eq!(
        admin.send(reqwest::Method::DELETE, &theirs, None).await.0,
        404
    );
    assert_eq!(
        admin
            .post(
                &format!("/admin/tenants/{OTHER}/webhook-deliveries/{delivery_id}/redeliver"),
                json!({}),
            )
            .await
            .0,
        404
    );
    let (_, list) = admin.get(&format!("/admin/tenants/{OTHER}/webhooks")).await;
    assert_eq!(list["data"], json!([]));
    // Unknown tenants are 404 everywhere.
    assert_eq!(admin.get("/admin/tenants/ghost/webhooks").await.0, 404);
    assert_eq!(
        admin
            .post("/admin/tenants/ghost/webhooks", json!({"url": url}))
            .await
            .0,
        404
    );
    // Another tenant's events never reach this endpoint.
    wh.emit(OTHER, "quota.warning", json!({}), "iso-2")
        .await
        .unwrap();
    drained(&env).await;
    assert_eq!(receiver.hits().len(), 1);
    // And the endpoint is intact for its owner.
    let (status, v) = admin
        .get(&format!("/admin/tenants/{TENANT}/webhooks/{wid}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["enabled"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_resends_the_same_message_and_deleted_endpoints_are_skipped() {
    let (env, wh, admin) = setup(fast_config()).await;
    let (receiver, url, _r) = Receiver::start(&[]).await;
    let (wid, secret) = admin.create(TENANT, &url, None).await;
    let (_stop, _worker) = start_worker(&wh);
    wh.emit(
        TENANT,
        "invoice.finalized",
        json!({"invoice_id": "inv_9"}),
        "inv_9",
    )
    .await
    .unwrap();
    let first = receiver.wait_for(1, Duration::from_secs(15)).await;
    let rows = log_with(&admin, TENANT, &wid, 1).await;
    let delivery_id = rows[0]["delivery_id"].as_str().unwrap().to_owned();

    let (status, v) = admin
        .post(
            &format!("/admin/tenants/{TENANT}/webhook-deliveries/{delivery_id}/redeliver"),
            json!({}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let hits = receiver.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(hits[1].webhook_id(), delivery_id);
    assert_eq!(hits[1].body, first[0].body);
    assert!(hits[1].verifies_with(&secret));
    let rows = log_with(&admin, TENANT, &wid, 2).await;
    assert_eq!(rows[0]["attempt"], 2);
    assert_eq!(rows[0]["outcome"], "delivered");

    let (status, _) = admin
        .post(
            &format!("/admin/tenants/{TENANT}/webhook-deliveries/msg_unknown/redeliver"),
            json!({}),
        )
        .await;
    assert_eq!(status, 404);

    // An endpoint deleted while a delivery waits out a retry: the retry is
    // skipped, not sent.
    let (receiver2, url2, _r2) = Receiver::start(&[(429, Some(3))]).await;
    let (wid2, _) = admin.create(TENANT, &url2, None).await;
    wh.emit(TENANT, "quota.warning", json!({}), "del-1")
        .await
        .unwrap();
    receiver2.wait_for(1, Duration::from_secs(15)).await;
    let (status, _) = admin
        .send(
            reqwest::Method::DELETE,
            &format!("/admin/tenants/{TENANT}/webhooks/{wid2}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        admin
            .get(&format!("/admin/tenants/{TENANT}/webhooks/{wid2}"))
            .await
            .0,
        404
    );
    let ch = env.ch();
    let outcomes = eventually("the skipped attempt", Duration::from_secs(20), || {
        let (ch, wid2) = (ch.clone(), wid2.clone());
        async move {
            let rows: Vec<(u32, String)> = ch
                .query(
                    "SELECT attempt, outcome FROM webhook_deliveries FINAL
                     WHERE endpoint_id = ? ORDER BY attempt",
                )
                .bind(wid2.as_str())
                .fetch_all()
                .await
                .unwrap();
            (rows.len() >= 2).then_some(rows)
        }
    })
    .await;
    assert_eq!(
        outcomes,
        [(1, "failed".to_owned()), (2, "skipped".to_owned())]
    );
    assert_eq!(receiver2.hits().len(), 1, "a deleted endpoint was called");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_that_keep_failing_expire_after_max_age() {
    let config = WebhookConfig {
        max_age: Duration::from_secs(2),
        ..fast_config()
    };
    let (env, wh, admin) = setup(config).await;
    let (receiver, url, _r) = Receiver::start(&[(500, None); 50]).await;
    let (wid, _) = admin.create(TENANT, &url, None).await;
    let (_stop, _worker) = start_worker(&wh);
    wh.emit(TENANT, "quota.warning", json!({}), "doomed")
        .await
        .unwrap();
    let rows = eventually("the expired attempt", Duration::from_secs(30), || async {
        let rows = admin.deliveries(TENANT, &wid).await;
        (rows.first()?["outcome"] == "expired").then_some(rows)
    })
    .await;
    assert!(
        rows[1..].iter().all(|r| r["outcome"] == "failed"),
        "{rows:?}"
    );
    assert_eq!(rows[0]["status_code"], 500);
    // Terminated: no more attempts.
    let sent = receiver.hits().len();
    assert_eq!(sent, rows.len());
    drained(&env).await;
    assert_eq!(receiver.hits().len(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_durable_unbounded_and_follows_the_timeout() {
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    open(&env, fast_config()).await;
    let longer = WebhookConfig {
        timeout: Duration::from_secs(40),
        ..fast_config()
    };
    open(&env, longer.clone()).await;

    let js = async_nats::jetstream::new(env.nats().await.unwrap());
    let mut stream = js.get_stream(&env.names.webhooks_stream).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(
        config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert!(config.max_age >= longer.max_age + Duration::from_secs(86_400));
    assert_eq!(config.subjects, [env.names.webhooks_filter()]);
    let consumer = stream
        .consumer_info("tollgate-billing-webhooks")
        .await
        .unwrap();
    assert!(consumer.config.ack_wait > longer.timeout);
    assert_eq!(consumer.config.max_deliver, -1);
    // No cap on deliveries waiting out a backoff (see the queue module).
    assert_eq!(consumer.config.max_ack_pending, -1);
    assert!(consumer.config.durable_name.is_some());
}
