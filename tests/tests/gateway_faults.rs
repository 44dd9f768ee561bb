//! Guarantee 1 at the gateway: usage the gateway has produced is never lost,
//! whether NATS goes away during traffic or the gateway is killed with
//! events still in its spool.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tollgate_schemas::events::{Event, EventKind};
use tollgate_tests::harness::{NatsServer, TestEnv, free_port};
use tollgate_tests::stack;

fn chat() -> serde_json::Value {
    json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "count me"}]})
}

/// A test's own NATS (to stop and restart), the mock and an in-process gateway.
struct InProcess {
    env: TestEnv,
    nats: NatsServer,
    mock: stack::Service,
    dir: tempfile::TempDir,
    gw: stack::Service,
}

impl InProcess {
    async fn start() -> Self {
        let env = TestEnv::new();
        let nats = NatsServer::start().unwrap();
        let mock = stack::start_mock().await;
        let dir = tempfile::tempdir().unwrap();
        let gw = stack::start_gateway(stack::gateway_config(
            &env,
            &nats.url(),
            &mock.url(),
            dir.path(),
            "",
        ))
        .await;
        Self {
            env,
            nats,
            mock,
            dir,
            gw,
        }
    }
}

fn usage_ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.meta().request_id.clone()).collect()
}

#[tokio::test]
async fn nats_stopped_during_traffic_then_restarted_every_event_arrives_once() {
    let InProcess {
        env,
        mut nats,
        mock: _mock,
        dir: _dir,
        gw,
    } = InProcess::start().await;
    stack::put_key(&nats.url(), &env, "tg_fault", stack::key("acme", "k1")).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let mut rids = Vec::new();
    let send = |n: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let r = http
                    .post(&url)
                    .bearer_auth("tg_fault")
                    .json(&chat())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "requests keep working while NATS is down");
                out.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
            }
            out
        }
    };
    rids.extend(send(20).await);
    nats.stop();
    rids.extend(send(40).await);
    // The key stays cached; events go to the spool.
    let ready = http
        .get(format!("{}/readyz", gw.url()))
        .send()
        .await
        .unwrap();
    // It can still accept work (the spool takes it): ready, saying why it spools.
    assert_eq!(
        ready.status(),
        200,
        "readyz is 503 only when the gateway cannot accept work"
    );
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["bus"], "unreachable", "{body}");
    assert_eq!(body["spooling"], true, "{body}");
    nats.restart().unwrap();
    rids.extend(send(20).await);
    let events = usage_events(&nats, &env, 80, Duration::from_secs(30)).await;
    let ids = usage_ids(&events);
    assert_eq!(ids.len(), 80, "every usage event arrives exactly once");
    assert_eq!(
        ids.iter().collect::<HashSet<_>>(),
        rids.iter().collect::<HashSet<_>>()
    );
    let event_ids: HashSet<_> = events.iter().map(|e| e.meta().id).collect();
    assert_eq!(event_ids.len(), 80);
}

/// A child process killed when dropped, so a failing test leaks nothing.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    /// `kill -9`, and waits for the process to be gone.
    fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The built gateway binary on a free port, with a temp config and data dir.
struct GatewayBin {
    config: std::path::PathBuf,
    base: String,
    http: reqwest::Client,
}

impl GatewayBin {
    fn new(dir: &std::path::Path, nats: &NatsServer, env: &TestEnv, mock: &str) -> Self {
        let port = free_port().unwrap();
        let config = dir.join("gateway.toml");
        let text = stack::gateway_config_text(env, &nats.url(), mock, &dir.join("data"), "")
            .replace(
                r#"listen = "127.0.0.1:0""#,
                &format!(r#"listen = "127.0.0.1:{port}""#),
            );
        std::fs::write(&config, text).unwrap();
        Self {
            config,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    fn spawn(&self) -> KillOnDrop {
        KillOnDrop(
            Command::new(gateway_bin())
                .args(["--config", self.config.to_str().unwrap(), "run"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    async fn wait_up(&self) {
        for _ in 0..200 {
            if self
                .http
                .get(format!("{}/healthz", self.base))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway binary did not start");
    }

    async fn chat(&self, secret: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(secret)
            .json(&chat())
            .send()
            .await
            .unwrap()
    }
}

fn rid(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// The usage events in `env`'s stream, waiting up to `timeout` for `n`.
async fn usage_events(nats: &NatsServer, env: &TestEnv, n: usize, timeout: Duration) -> Vec<Event> {
    stack::events(&nats.url(), env, EventKind::Usage, n, timeout).await
}

/// Every request id of `rids` has exactly one usage event.
fn assert_exactly_once(events: &[Event], rids: &[String]) {
    let mut by_rid: std::collections::HashMap<String, HashSet<String>> = Default::default();
    for e in events {
        by_rid
            .entry(e.meta().request_id.clone())
            .or_default()
            .insert(e.meta().id.to_string());
    }
    let lost: Vec<&String> = rids.iter().filter(|r| !by_rid.contains_key(*r)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} usage events lost: {lost:?}",
        lost.len(),
        rids.len()
    );
    for r in rids {
        assert_eq!(
            by_rid[r].len(),
            1,
            "request {r} has more than one usage event"
        );
    }
    assert_eq!(events.len(), rids.len(), "a usage event was stored twice");
}

fn rejected_lines(data_dir: &std::path::Path) -> usize {
    std::fs::read_to_string(data_dir.join("spool/rejected/rejected.jsonl"))
        .map_or(0, |s| s.lines().count())
}

/// Defect: while nats-server shut down, "no stream found" was taken as a
/// permanent error and the event parked in `rejected/` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sigterm_and_restart_twelve_times_under_traffic_loses_nothing() {
    let InProcess {
        env,
        mut nats,
        mock: _mock,
        dir,
        gw,
    } = InProcess::start().await;
    stack::put_key(&nats.url(), &env, "tg_cycle", stack::key("acme", "k1")).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients at about 50 requests/s each, one plain, one streamed.
    let clients: Vec<_> = [false, true]
        .into_iter()
        .map(|streamed| {
            let (url, stop) = (format!("{}/v1/chat/completions", gw.url()), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut body = chat();
                if streamed {
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                }
                let mut rids = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    let r = http
                        .post(&url)
                        .bearer_auth("tg_cycle")
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "requests keep working while NATS restarts");
                    let id = rid(&r);
                    r.bytes().await.unwrap();
                    rids.push(id);
                }
                rids
            })
        })
        .collect();
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.stop(); // SIGTERM: a graceful shutdown, stream lookups fail meanwhile
        tokio::time::sleep(Duration::from_millis(100)).await;
        nats.restart().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rids = Vec::new();
    for c in clients {
        rids.extend(c.await.unwrap());
    }
    assert!(
        rids.len() > 200,
        "traffic ran throughout: {} requests",
        rids.len()
    );
    let events = usage_events(&nats, &env, rids.len(), Duration::from_secs(60)).await;
    assert_exactly_once(&events, &rids);
    assert_eq!(
        rejected_lines(&dir.path().join("data")),
        0,
        "no event was parked as rejected"
    );
    gw.shutdown().await.unwrap();
}

/// Defect: events were only in the gateway's memory until the bus acked
/// them; a kill -9 with NATS frozen lost everything since it froze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_while_nats_is_frozen_loses_no_event() {
    let env = TestEnv::new();
    let nats = NatsServer::start().unwrap();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBin::new(dir.path(), &nats, &env, &mock.url());
    stack::put_key(&nats.url(), &env, "tg_frozen", stack::key("acme", "k1")).await;
    let mut child = gw.spawn();
    gw.wait_up().await;
    let r = gw.chat("tg_frozen").await;
    assert_eq!(r.status(), 200);
    let mut rids = vec![rid(&r)];
    nats.freeze().unwrap();
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < until {
        let r = gw.chat("tg_frozen").await;
        assert_eq!(r.status(), 200);
        rids.push(rid(&r));
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // The client had its answer; now the gateway dies with no chance to flush.
    child.kill9(); // no drain, no flush: only what is on disk survives
    nats.thaw().unwrap();
    let child = gw.spawn();
    gw.wait_up().await;
    let events = usage_events(&nats, &env, rids.len(), Duration::from_secs(30)).await;
    drop(child);
    assert!(rids.len() > 40, "{} requests while frozen", rids.len());
    assert_exactly_once(&events, &rids);
    drop(nats);
}

/// Defect: the gateway could not start while NATS was down. Now it starts,
/// authenticates the keys it had cached, spools, and says so on /readyz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_starts_and_serves_while_nats_is_down() {
    let env = TestEnv::new();
    let mut nats = NatsServer::start().unwrap();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBin::new(dir.path(), &nats, &env, &mock.url());
    stack::put_key(&nats.url(), &env, "tg_cold", stack::key("acme", "k1")).await;
    // A first run caches the key (and writes its state cache on a graceful stop).
    let mut child = gw.spawn();
    gw.wait_up().await;
    let r = gw.chat("tg_cold").await;
    assert_eq!(r.status(), 200);
    let mut rids = vec![rid(&r)];
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    child.0.wait().unwrap();
    assert!(
        dir.path().join("data/state/keys.json").exists(),
        "the state cache was written"
    );

    nats.stop();
    let started = std::time::Instant::now();
    let child = gw.spawn();
    gw.wait_up().await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "started in {:?}",
        started.elapsed()
    );
    let ready = gw
        .http
        .get(format!("{}/readyz", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "it can accept work");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["bus"], "unreachable", "{body}");
    assert_eq!(body["spooling"], true, "{body}");
    assert_eq!(body["keys"], "unreachable", "{body}");
    for _ in 0..10 {
        let r = gw.chat("tg_cold").await;
        assert_eq!(r.status(), 200, "a cached key is served without NATS");
        rids.push(rid(&r));
    }
    // A key it never saw cannot be checked: 503, in the API's shape.
    let r = gw.chat("tg_never_seen").await;
    assert_eq!(r.status(), 503);
    let err: serde_json::Value = r.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");

    nats.restart().unwrap();
    let events = usage_events(&nats, &env, rids.len(), Duration::from_secs(30)).await;
    assert_exactly_once(&events, &rids);
    // Once NATS is back, keys it never cached work too.
    stack::put_key(&nats.url(), &env, "tg_new", stack::key("acme", "k2")).await;
    let mut ok = false;
    for _ in 0..100 {
        if gw.chat("tg_new").await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a new key authenticates once the keys bucket is open");
    drop(child);
}

/// A gateway killed while its usage events were still in the spool (NATS
/// frozen, so billing never saw them) must not forget that spend when it
/// restarts: it re-debits what its spool holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_still_counts_the_spend_in_its_spool() {
    use rust_decimal::Decimal;
    use tollgate_schemas::records::{QuotaLevel, QuotaScope, QuotaState};
    let env = TestEnv::new();
    let nats = NatsServer::start().unwrap();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBin::new(dir.path(), &nats, &env, &mock.url());
    stack::put_key(&nats.url(), &env, "tg_spent", stack::key("acme", "k1")).await;
    // About three requests' worth of credit (one costs about 0.000011 USD),
    // as billing would write it having priced everything up to `priced_seq`.
    let snapshot = |version: u64, priced_seq: u64| QuotaState {
        scope: QuotaScope::Tenant,
        id: "acme".into(),
        tenant_id: "acme".into(),
        state: QuotaLevel::Ok,
        remaining: Some(Decimal::new(30, 6)),
        limit: None,
        threshold: None,
        version,
        priced_seq,
        updated_at: chrono::Utc::now(),
    };
    stack::put_quota(&nats.url(), &env, &snapshot(1, 0)).await;
    let mut child = gw.spawn();
    gw.wait_up().await;
    assert_eq!(
        gw.chat("tg_spent").await.status(),
        200,
        "warms the key cache"
    );
    // Billing has priced the warm-up: only what follows is the gateway's own.
    let mut head = 0;
    for _ in 0..100 {
        head = stack::stream_head(&nats.url(), &env).await;
        if head >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack::put_quota(&nats.url(), &env, &snapshot(2, head)).await;
    // The state cache (keys, quota) is on disk within its write interval.
    let state = dir.path().join("data/state");
    let cached = |file: &str, what: &str| {
        std::fs::read_to_string(state.join(file)).is_ok_and(|s| s.contains(what))
    };
    for _ in 0..150 {
        if cached("quota.json", r#""version":2"#) && cached("keys.json", "k1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cached("keys.json", "k1"), "the key is in the state cache");
    nats.freeze().unwrap();
    let mut admitted = 0;
    loop {
        let r = gw.chat("tg_spent").await;
        if r.status() == 429 {
            break;
        }
        assert_eq!(r.status(), 200);
        admitted += 1;
        assert!(
            admitted < 20,
            "the local debit refuses once the credit is spent"
        );
    }
    child.kill9(); // no drain, no flush: only what is on disk survives
    let child = gw.spawn();
    gw.wait_up().await;
    let r = gw.chat("tg_spent").await;
    assert_eq!(
        r.status(),
        429,
        "after {admitted} admitted requests and a restart, the spend in the spool still counts"
    );
    drop(child);
    nats.thaw().unwrap();
}

fn gateway_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("tollgate-gateway");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn gateway_killed_with_events_in_the_spool_delivers_them_after_restart() {
    let env = TestEnv::new();
    let mut nats = NatsServer::start().unwrap();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayBin::new(dir.path(), &nats, &env, &mock.url());
    stack::put_key(&nats.url(), &env, "tg_kill", stack::key("acme", "k1")).await;
    let http = reqwest::Client::new();
    let base = gw.base.clone();
    let mut child = gw.spawn();
    gw.wait_up().await;
    // Warm the key cache, then take NATS away and send traffic.
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("tg_kill")
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    nats.stop();
    let mut rids = vec![r.headers()["x-request-id"].to_str().unwrap().to_owned()];
    for _ in 0..30 {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth("tg_kill")
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        rids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
    }
    // Wait until the spool holds them (publish attempts time out into it).
    let spool = dir.path().join("data").join("spool");
    for _ in 0..200 {
        let body: serde_json::Value = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["spool_events"].as_u64().unwrap_or(0) >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill9(); // no drain, no flush: only what is on disk survives
    assert!(spool.exists());
    nats.restart().unwrap();
    let child = gw.spawn();
    gw.wait_up().await;
    let events = usage_events(&nats, &env, rids.len(), Duration::from_secs(30)).await;
    drop(child);
    let got: HashSet<String> = usage_ids(&events).into_iter().collect();
    for rid in &rids[1..] {
        assert!(got.contains(rid), "usage of {rid} was lost");
    }
}
