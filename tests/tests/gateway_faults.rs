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

fn usage_ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.meta().request_id.clone()).collect()
}

#[tokio::test]
async fn nats_stopped_during_traffic_then_restarted_every_event_arrives_once() {
    let env = TestEnv::new();
    let mut nats = NatsServer::start().unwrap();
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
    assert_eq!(ready.status(), 503, "readyz reports the bus down");
    nats.restart().unwrap();
    rids.extend(send(20).await);
    let events = stack::events(
        &nats.url(),
        &env,
        EventKind::Usage,
        80,
        Duration::from_secs(30),
    )
    .await;
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

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let port = free_port().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"listen = "127.0.0.1:{port}"
data_dir = "{data}"
[nats]
url = "{nats}"
namespace = "{ns}"
[[models]]
name = "mock-gpt"
[[models.deployments]]
name = "mock-openai"
provider = "openai"
base_url = "{mock}/v1"
"#,
            data = dir.path().join("data").display(),
            nats = nats.url(),
            ns = env.id,
            mock = mock.url()
        ),
    )
    .unwrap();
    stack::put_key(&nats.url(), &env, "tg_kill", stack::key("acme", "k1")).await;
    let spawn = || {
        KillOnDrop(
            Command::new(gateway_bin())
                .args(["--config", config_path.to_str().unwrap(), "run"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let wait_up = || async {
        for _ in 0..200 {
            if http.get(format!("{base}/healthz")).send().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway binary did not start");
    };
    let mut child = spawn();
    wait_up().await;
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
    child.0.kill().unwrap(); // SIGKILL: no drain, no flush
    child.0.wait().unwrap();
    assert!(spool.exists());
    nats.restart().unwrap();
    let child = spawn();
    wait_up().await;
    let events = stack::events(
        &nats.url(),
        &env,
        EventKind::Usage,
        rids.len(),
        Duration::from_secs(30),
    )
    .await;
    drop(child);
    let got: HashSet<String> = usage_ids(&events).into_iter().collect();
    for rid in &rids[1..] {
        assert!(got.contains(rid), "usage of {rid} was lost");
    }
}
