//! Observability end to end: the gateway, meter and billing run as
//! processes (each with its own OpenTelemetry SDK, as in production) and
//! export to a real OTLP/HTTP receiver decoding `opentelemetry-proto`.
//!
//! - One client request with its own `traceparent` gives one trace: the
//!   gateway's server span (a child of the client's span), its upstream
//!   client span, the meter's span per event (children of the gateway's
//!   span, through the event headers), and billing's debit and quota-state
//!   spans linked to it. GenAI attributes are exact; no attribute holds the
//!   key's secret.
//! - Every service's `/metrics` parses as Prometheus text, and the counters
//!   move by exactly what a known set of requests implies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod meter_common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meter_common::{MeterProcess, meter_bin, meter_toml};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate_tests::billing::{ADMIN_KEY, billing_config_text};
use tollgate_tests::harness::TestEnv;
use tollgate_tests::harness::free_port;
use tollgate_tests::otlp::{OtlpReceiver, ReceivedSpan};
use tollgate_tests::stack::{Service, gateway_config_text, start_mock};

const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn bin(name: &str) -> PathBuf {
    let bin = meter_bin().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// The three services on one test namespace, exporting to `receiver`.
struct World {
    env: TestEnv,
    _dir: tempfile::TempDir,
    receiver: std::sync::Arc<OtlpReceiver>,
    _mock: Service,
    billing: MeterProcess,
    gateway: MeterProcess,
    meter: MeterProcess,
    billing_url: String,
    gateway_url: String,
    meter_metrics: String,
    http: reqwest::Client,
}

async fn wait_healthy(http: &reqwest::Client, url: &str, what: &str, log: &dyn Fn() -> String) {
    let what = format!("{what} to start");
    let log = || format!("; its log:\n{}", log());
    tollgate_tests::eventually_or(&what, Duration::from_secs(30), log, async || {
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

impl World {
    async fn start() -> Self {
        Self::start_with("http/protobuf").await
    }

    /// With `OTEL_EXPORTER_OTLP_PROTOCOL=protocol`.
    async fn start_with(protocol: &str) -> Self {
        let env = TestEnv::new();
        env.migrate().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let receiver = std::sync::Arc::new(OtlpReceiver::start().await);
        *RECEIVED.lock().unwrap() = Some(receiver.clone());
        let mock = start_mock().await;
        let otel = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
            // Export every 100 ms rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ];
        let http = reqwest::Client::new();

        let billing_port = free_port().unwrap();
        let billing_toml = dir.path().join("billing.toml");
        std::fs::write(
            &billing_toml,
            billing_config_text(&env).replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{billing_port}\""),
                1,
            ),
        )
        .unwrap();
        let billing = MeterProcess::spawn_program(
            &bin("tollgate-billing"),
            &billing_toml,
            dir.path().join("billing.log"),
            &otel,
            &[],
        );
        let billing_url = format!("http://127.0.0.1:{billing_port}");
        wait_healthy(&http, &billing_url, "billing", &|| billing.log_text()).await;

        let gateway_port = free_port().unwrap();
        let gateway_toml = dir.path().join("gateway.toml");
        let data = dir.path().join("gateway-data");
        std::fs::write(
            &gateway_toml,
            gateway_config_text(&env, &env.nats_url, &mock.url(), &data, "").replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{gateway_port}\""),
                1,
            ),
        )
        .unwrap();
        let gateway = MeterProcess::spawn_program(
            &bin("tollgate-gateway"),
            &gateway_toml,
            dir.path().join("gateway.log"),
            &otel,
            &[],
        );
        let gateway_url = format!("http://127.0.0.1:{gateway_port}");
        wait_healthy(&http, &gateway_url, "gateway", &|| gateway.log_text()).await;

        let meter_port = free_port().unwrap();
        let meter_path = dir.path().join("meter.toml");
        let meter_text = format!(
            "{}[metrics]\nlisten = \"127.0.0.1:{meter_port}\"\n",
            meter_toml(
                &env.nats_url,
                &env.id,
                &env.clickhouse_url,
                &env.database,
                1000,
                30
            )
        );
        std::fs::write(&meter_path, meter_text).unwrap();
        let envs: Vec<(&str, String)> = otel.clone();
        let meter = MeterProcess::spawn(&meter_path, dir.path().join("meter.log"), &envs, &[]);
        let meter_metrics = format!("http://127.0.0.1:{meter_port}");
        wait_healthy(&http, &meter_metrics, "meter", &|| meter.log_text()).await;

        Self {
            env,
            _dir: dir,
            receiver,
            _mock: mock,
            billing,
            gateway,
            meter,
            billing_url,
            gateway_url,
            meter_metrics,
            http,
        }
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method, format!("{}{path}", self.billing_url))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// A postpaid tenant and a key; returns (secret, key id).
    async fn tenant(&self, id: &str) -> (String, String) {
        self.admin(
            reqwest::Method::POST,
            "/admin/tenants",
            json!({"id": id, "billing": "postpaid"}),
        )
        .await;
        let k = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/tenants/{id}/keys"),
                json!({"name": "k"}),
            )
            .await;
        let secret = k["secret"].as_str().unwrap().to_owned();
        let key_id = k["id"]
            .as_str()
            .or_else(|| k["key_id"].as_str())
            .unwrap()
            .to_owned();
        // The gateway learns the key from KV within moments.
        let start = Instant::now();
        loop {
            let r = self
                .http
                .get(format!("{}/v1/models", self.gateway_url))
                .bearer_auth(&secret)
                .send()
                .await
                .unwrap();
            if r.status().is_success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "key never reached the gateway"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (secret, key_id)
    }

    async fn chat(&self, secret: &str, stream: bool, traceparent: Option<&str>) -> Reply {
        let mut body = json!({
            "model": "mock-gpt",
            "messages": [{"role": "user", "content": "Say hello to observability"}],
        });
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let mut req = self
            .http
            .post(format!("{}/v1/chat/completions", self.gateway_url))
            .bearer_auth(secret)
            .json(&body);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let request_id = r
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let cost = r
            .headers()
            .get("x-tollgate-cost")
            .map(|v| v.to_str().unwrap().parse::<Decimal>().unwrap());
        let text = r.text().await.unwrap();
        let usage = if status != 200 {
            None
        } else if stream {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
        } else {
            serde_json::from_str::<Value>(&text)
                .unwrap()
                .get("usage")
                .cloned()
        };
        let (input, output) = usage
            .map(|u| {
                (
                    u["prompt_tokens"].as_u64().unwrap(),
                    u["completion_tokens"].as_u64().unwrap(),
                )
            })
            .unwrap_or((0, 0));
        Reply {
            status,
            request_id,
            cost,
            input,
            output,
        }
    }

    async fn metrics(&self, base: &str) -> Metrics {
        let text = self
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Metrics::parse(&text)
    }
}

struct Reply {
    status: u16,
    request_id: String,
    /// `x-tollgate-cost` (plain responses only: a stream's is known at its end).
    cost: Option<Decimal>,
    input: u64,
    output: u64,
}

impl Reply {
    /// mock-gpt at the demo prices: $0.15 in, $0.60 out per million tokens.
    fn expected_cost(&self) -> Decimal {
        let cost = (Decimal::from(self.input) * Decimal::new(15, 2)
            + Decimal::from(self.output) * Decimal::new(60, 2))
            / Decimal::from(1_000_000);
        if let Some(c) = self.cost {
            assert_eq!(c, cost, "x-tollgate-cost");
        }
        cost
    }
}

/// A scrape, parsed by `prometheus-parse`: sample values by name and labels.
struct Metrics {
    samples: Vec<prometheus_parse::Sample>,
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines)
            .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{text}"));
        for s in &scrape.samples {
            assert!(
                s.metric.starts_with("tollgate_"),
                "unprefixed metric {}",
                s.metric
            );
        }
        Self {
            samples: scrape.samples,
        }
    }

    /// The value of a counter, gauge or histogram count with these labels
    /// (0 when absent: a counter that never moved is not rendered).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for s in &self.samples {
            if s.metric != name || !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
                continue;
            }
            total += match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            };
        }
        total
    }

    fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.samples.iter().map(|s| s.metric.as_str()).collect();
        n.dedup();
        n
    }
}

/// The shared `eventually`, listing the spans received so far on a timeout.
async fn eventually<T>(what: &str, timeout: Duration, f: impl AsyncFnMut() -> Option<T>) -> T {
    tollgate_tests::eventually_or(what, timeout, received_spans, f).await
}

fn received_spans() -> String {
    let spans: Vec<String> = RECEIVED
        .lock()
        .unwrap()
        .as_ref()
        .map(|r| r.spans())
        .unwrap_or_default()
        .iter()
        .map(|s| {
            format!(
                "{} {} {} parent={} links={:?}",
                s.service, s.name, s.trace_id, s.parent_span_id, s.links
            )
        })
        .collect();
    format!("; spans received:\n{}", spans.join("\n"))
}

/// The receiver, for timeout diagnostics.
static RECEIVED: std::sync::Mutex<Option<std::sync::Arc<OtlpReceiver>>> =
    std::sync::Mutex::new(None);

fn by_id(spans: &[ReceivedSpan]) -> BTreeMap<&str, &ReceivedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_gateway_meter_and_billing() {
    let w = World::start().await;
    let (secret, key_id) = w.tenant("otel").await;

    for stream in [false, true] {
        let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
        let tp = format!("00-{trace_id}-{CLIENT_SPAN}-01");
        let reply = w.chat(&secret, stream, Some(&tp)).await;
        assert_eq!(reply.status, 200);
        assert!(reply.input > 0 && reply.output > 0);

        // Gateway: server span + upstream client span; meter: one span per
        // event (request + usage); billing: debit + quota state.
        let spans = eventually("the whole trace", Duration::from_secs(30), async || {
            let spans = w.receiver.trace(&trace_id);
            let has = |service: &str, name: &str| {
                spans.iter().any(|s| s.service == service && s.name == name)
            };
            let meter_events = spans
                .iter()
                .filter(|s| s.service == "tollgate-meter" && s.name.starts_with("process "))
                .count();
            (has("tollgate-gateway", "POST /v1/chat/completions")
                && has("tollgate-gateway", "chat mock-gpt-4o-mini")
                && meter_events >= 2)
                .then_some(spans)
        })
        .await;
        let ids = by_id(&spans);

        let server = spans
            .iter()
            .find(|s| s.name == "POST /v1/chat/completions")
            .unwrap();
        assert_eq!(server.service, "tollgate-gateway");
        assert_eq!(server.kind, 2, "server span kind");
        assert_eq!(
            server.parent_span_id, CLIENT_SPAN,
            "continues the client's span"
        );
        for (k, v) in [
            ("gen_ai.system", "openai"),
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.request.model", "mock-gpt"),
            ("gen_ai.response.model", "mock-gpt-4o-mini"),
            ("tollgate.tenant_id", "otel"),
            ("tollgate.key_id", key_id.as_str()),
            ("tollgate.request_id", reply.request_id.as_str()),
            ("http.response.status_code", "200"),
        ] {
            assert_eq!(server.attr(k), Some(v), "server span {k}: {server:#?}");
        }
        assert_eq!(
            server.attr("gen_ai.usage.input_tokens"),
            Some(reply.input.to_string().as_str())
        );
        assert_eq!(
            server.attr("gen_ai.usage.output_tokens"),
            Some(reply.output.to_string().as_str())
        );

        let upstream = spans
            .iter()
            .find(|s| s.name == "chat mock-gpt-4o-mini")
            .unwrap();
        assert_eq!(upstream.kind, 3, "client span kind");
        assert_eq!(upstream.parent_span_id, server.span_id);
        for (k, v) in [
            ("gen_ai.system", "openai"),
            ("gen_ai.request.model", "mock-gpt-4o-mini"),
            ("gen_ai.response.model", "mock-gpt-4o-mini"),
            ("tollgate.tenant_id", "otel"),
            ("tollgate.key_id", key_id.as_str()),
            ("tollgate.request_id", reply.request_id.as_str()),
        ] {
            assert_eq!(
                upstream.attr(k),
                Some(v),
                "upstream span {k}: {upstream:#?}"
            );
        }
        assert_eq!(
            upstream.attr("gen_ai.usage.output_tokens"),
            Some(reply.output.to_string().as_str())
        );

        // The meter's spans hang off the gateway's server span.
        let meter: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.service == "tollgate-meter" && s.name.starts_with("process "))
            .collect();
        for m in &meter {
            assert_eq!(
                m.parent_span_id, server.span_id,
                "meter span parent: {m:#?}"
            );
            assert_eq!(m.kind, 5, "consumer span kind");
            assert_eq!(m.attr("tollgate.tenant_id"), Some("otel"));
        }
        let kinds: Vec<&str> = meter
            .iter()
            .filter_map(|m| m.attr("tollgate.event_kind"))
            .collect();
        assert!(
            kinds.contains(&"usage") && kinds.contains(&"request"),
            "{kinds:?}"
        );
        // Committed: spans end after the commit, and say so.
        eventually(
            "committed meter spans",
            Duration::from_secs(10),
            async || {
                w.receiver
                    .trace(&trace_id)
                    .iter()
                    .filter(|s| s.name.starts_with("process "))
                    .all(|s| s.attr("tollgate.outcome") == Some("committed"))
                    .then_some(())
            },
        )
        .await;
        // Every span of the trace hangs together (no orphan parents apart
        // from the client's own span).
        for s in &spans {
            assert!(
                s.parent_span_id == CLIENT_SPAN || ids.contains_key(s.parent_span_id.as_str()),
                "orphan span {s:#?}"
            );
        }

        // Billing's batch spans live in their own traces, linked to this one.
        let linked = eventually(
            "billing spans linked to the trace",
            Duration::from_secs(30),
            async || {
                let all = w.receiver.spans();
                let linked: Vec<ReceivedSpan> = all
                    .into_iter()
                    .filter(|s| s.service == "tollgate-billing")
                    .filter(|s| {
                        s.links
                            .iter()
                            .any(|(t, sp)| t == &trace_id && sp == &server.span_id)
                    })
                    .collect();
                let names: Vec<&str> = linked.iter().map(|s| s.name.as_str()).collect();
                (names.contains(&"billing.debit") && names.contains(&"billing.quota_state"))
                    .then_some(linked)
            },
        )
        .await;
        let debit = linked.iter().find(|s| s.name == "billing.debit").unwrap();
        assert_eq!(debit.attr("tollgate.tenant_id"), Some("otel"));
        assert_eq!(debit.attr("tollgate.key_id"), Some(key_id.as_str()));
        assert_eq!(
            debit
                .attr("tollgate.cost_usd")
                .map(|c| c.parse::<Decimal>().unwrap()),
            Some(reply.expected_cost()),
            "billing debits the request's tokens at the demo prices"
        );
    }

    // No attribute anywhere holds the secret (or any part of a bearer header).
    let all = w.receiver.spans();
    assert!(!all.is_empty());
    for s in &all {
        for (k, v) in &s.attributes {
            assert!(
                !v.contains(&secret) && !v.contains(&secret[secret.len() - 12..]),
                "span {} attribute {k} holds the key's secret",
                s.name
            );
            assert!(
                !v.contains(ADMIN_KEY),
                "span {} attribute {k} holds the admin key",
                s.name
            );
        }
    }
    for (name, log) in [
        ("gateway", w.gateway.log_text()),
        ("billing", w.billing.log_text()),
        ("meter", w.meter.log_text()),
    ] {
        assert!(
            !log.contains(&secret),
            "the {name} log holds the key's secret"
        );
    }

    // A request without a traceparent starts its own trace, and the gateway's
    // logs carry trace ids (JSON lines, one per event).
    let reply = w.chat(&secret, false, None).await;
    assert_eq!(reply.status, 200);
    let server = eventually("a root server span", Duration::from_secs(30), async || {
        w.receiver.spans().into_iter().find(|s| {
            s.attr("tollgate.request_id") == Some(reply.request_id.as_str()) && s.kind == 2
        })
    })
    .await;
    assert!(
        server.parent_span_id.is_empty(),
        "a new trace has a root span"
    );

    // Log lines inside a request carry its trace id: an upstream failure
    // logs a warning in the request's span.
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let tp = format!("00-{trace_id}-{CLIENT_SPAN}-01");
    let r = w
        .http
        .post(format!("{}/v1/chat/completions", w.gateway_url))
        .bearer_auth(&secret)
        .header("traceparent", &tp)
        .json(&json!({"model": "mock-broken", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error());
    let line = eventually(
        "a log line with the trace id",
        Duration::from_secs(10),
        async || {
            w.gateway
                .log_text()
                .lines()
                .find(|l| l.contains("upstream failed"))
                .map(str::to_owned)
        },
    )
    .await;
    let line: Value = serde_json::from_str(&line).expect("JSON log lines");
    assert_eq!(line["span"]["trace_id"], json!(trace_id), "{line}");
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_count_exactly() {
    let w = World::start().await;
    let (secret, _key_id) = w.tenant("metrics").await;
    let g0 = w.metrics(&w.gateway_url).await;
    let m0 = w.metrics(&w.meter_metrics).await;
    let b0 = w.metrics(&w.billing_url).await;

    // Known traffic: 3 plain + 2 streamed successes, 1 bad key, 1 unknown model.
    let mut replies = Vec::new();
    for stream in [false, false, false, true, true] {
        let r = w.chat(&secret, stream, None).await;
        assert_eq!(r.status, 200);
        replies.push(r);
    }
    assert_eq!(w.chat("sk-not-a-key", false, None).await.status, 401);
    let unknown = w
        .http
        .post(format!("{}/v1/chat/completions", w.gateway_url))
        .bearer_auth(&secret)
        .json(&json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let input: u64 = replies.iter().map(|r| r.input).sum();
    let output: u64 = replies.iter().map(|r| r.output).sum();
    let micro: Decimal = replies
        .iter()
        .map(|r| (r.expected_cost() * Decimal::from(1_000_000)).round())
        .sum();

    let g1 = w.metrics(&w.gateway_url).await;
    let d = |name: &str, labels: &[(&str, &str)]| g1.value(name, labels) - g0.value(name, labels);
    let route = ("route", "/v1/chat/completions");
    assert_eq!(
        d(
            "tollgate_gateway_requests_total",
            &[route, ("model", "mock-gpt"), ("status", "200")]
        ),
        5.0
    );
    assert_eq!(
        d(
            "tollgate_gateway_requests_total",
            &[route, ("status", "401")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "tollgate_gateway_requests_total",
            &[route, ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "tollgate_gateway_tokens_total",
            &[("model", "mock-gpt"), ("kind", "input")]
        ),
        input as f64
    );
    assert_eq!(
        d(
            "tollgate_gateway_tokens_total",
            &[("model", "mock-gpt"), ("kind", "output")]
        ),
        output as f64
    );
    assert_eq!(
        d(
            "tollgate_gateway_cost_microdollars_total",
            &[("model", "mock-gpt")]
        )
        .to_string(),
        micro.to_string()
    );
    assert_eq!(
        d("tollgate_gateway_request_duration_seconds_count", &[route]),
        7.0
    );
    assert_eq!(d("tollgate_gateway_overhead_seconds_count", &[route]), 5.0);
    assert!(g1.value("tollgate_gateway_overhead_seconds_sum", &[route]) > 0.0);
    for name in [
        "tollgate_gateway_publish_seconds_count",
        "tollgate_gateway_spool_events",
        "tollgate_gateway_bus_healthy",
        "tollgate_gateway_price_book_version",
    ] {
        assert!(
            g1.names().contains(&name),
            "gateway metrics lack {name}: {:?}",
            g1.names()
        );
    }
    // 7 request events + 5 usage events, published (the publisher is async).
    let published = eventually("published events", Duration::from_secs(10), async || {
        let g = w.metrics(&w.gateway_url).await;
        let n = g.value("tollgate_gateway_events_published_total", &[])
            - g0.value("tollgate_gateway_events_published_total", &[]);
        (n >= 12.0).then_some(n)
    })
    .await;
    assert_eq!(published, 12.0);

    // The meter stores exactly those: 5 usage, 7 request events.
    eventually(
        "the meter's counters",
        Duration::from_secs(30),
        async || {
            let m = w.metrics(&w.meter_metrics).await;
            let d = |kind: &str| {
                m.value("tollgate_meter_events_total", &[("kind", kind)])
                    - m0.value("tollgate_meter_events_total", &[("kind", kind)])
            };
            (d("usage") == 5.0 && d("request") == 7.0).then_some(())
        },
    )
    .await;
    // Counted when shipped; the insert's latency lands once it is in.
    let m1 = eventually(
        "the meter's insert latency",
        Duration::from_secs(30),
        async || {
            let m = w.metrics(&w.meter_metrics).await;
            (m.value("tollgate_meter_insert_duration_seconds_count", &[]) >= 1.0).then_some(m)
        },
    )
    .await;
    for name in [
        "tollgate_meter_batch_size_messages_count",
        "tollgate_meter_consumer_lag_messages",
    ] {
        assert!(
            m1.names().contains(&name),
            "meter metrics lack {name}: {:?}",
            m1.names()
        );
    }
    assert_eq!(
        m1.value("tollgate_meter_dead_letters_total", &[]),
        m0.value("tollgate_meter_dead_letters_total", &[])
    );

    // Billing prices exactly the 5 usage events.
    eventually("billing's counters", Duration::from_secs(30), async || {
        let b = w.metrics(&w.billing_url).await;
        let n = b.value("tollgate_billing_events_priced_total", &[])
            - b0.value("tollgate_billing_events_priced_total", &[]);
        (n == 5.0).then_some(())
    })
    .await;
    // Quota states are counted by scope and state: this tenant's snapshot is ok.
    let b1 = w.metrics(&w.billing_url).await;
    assert!(
        b1.value(
            "tollgate_billing_quota_state",
            &[("scope", "tenant"), ("state", "ok")]
        ) >= 1.0
    );
    for name in [
        "tollgate_billing_batch_seconds_count",
        "tollgate_billing_priced_seq",
    ] {
        assert!(
            b1.names().contains(&name),
            "billing metrics lack {name}: {:?}",
            b1.names()
        );
    }
    let _ = &w.env;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_export_carries_the_same_trace() {
    let w = World::start_with("grpc").await;
    let (secret, _key_id) = w.tenant("grpc").await;
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let tp = format!("00-{trace_id}-{CLIENT_SPAN}-01");
    assert_eq!(w.chat(&secret, true, Some(&tp)).await.status, 200);
    let spans = eventually(
        "gateway and meter spans over gRPC",
        Duration::from_secs(30),
        async || {
            let spans = w.receiver.trace(&trace_id);
            let gateway = spans
                .iter()
                .find(|s| s.service == "tollgate-gateway" && s.kind == 2)?;
            let meter = spans
                .iter()
                .filter(|s| s.service == "tollgate-meter" && s.parent_span_id == gateway.span_id)
                .count();
            (meter >= 2).then_some(spans)
        },
    )
    .await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(server.parent_span_id, CLIENT_SPAN);
    assert_eq!(server.attr("gen_ai.system"), Some("openai"));
    eventually(
        "billing's linked spans over gRPC",
        Duration::from_secs(30),
        async || {
            w.receiver
                .spans()
                .iter()
                .any(|s| {
                    s.service == "tollgate-billing"
                        && s.name == "billing.debit"
                        && s.links.iter().any(|(t, _)| t == &trace_id)
                })
                .then_some(())
        },
    )
    .await;
}
