//! OpenAI's Responses API: bridged over chat completions for upstreams that
//! only speak chat, and passed through to upstreams that serve it (here a
//! second gateway, which itself bridges), with usage recorded like chat.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use tollgate_tests::harness::TestEnv;
use tollgate_tests::stack;

const SECRET: &str = "tg_responses_test";

#[tokio::test]
async fn responses_bridged_and_passed_through_plain_and_streamed() {
    let env = TestEnv::new();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let inner = stack::start_gateway(stack::gateway_config(
        &env,
        &env.nats_url,
        &mock.url(),
        dir.path(),
        "",
    ))
    .await;
    // The outer gateway serves "via-inner" from the inner one's /v1/responses.
    let extra = format!(
        r#"
[[models]]
name = "via-inner"
[[models.deployments]]
name = "inner-gateway"
provider = "openai"
base_url = "{}/v1"
upstream_model = "mock-gpt"
responses_api = true
forward_headers = ["authorization"]
"#,
        inner.url()
    );
    let dir2 = tempfile::tempdir().unwrap();
    let outer = stack::start_gateway(stack::gateway_config(
        &env,
        &env.nats_url,
        &mock.url(),
        dir2.path(),
        &extra,
    ))
    .await;
    stack::put_key(&env.nats_url, &env, SECRET, stack::key("acme", "k1")).await;
    let http = reqwest::Client::new();

    for model in ["mock-gpt", "mock-claude", "via-inner"] {
        // Plain.
        let r = http
            .post(format!("{}/v1/responses", outer.url()))
            .bearer_auth(SECRET)
            .json(&json!({"model": model, "input": "say hello", "instructions": "be brief"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{model}");
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "response", "{model}: {v}");
        assert_eq!(v["status"], "completed");
        let text = v["output"][0]["content"][0]["text"].as_str().unwrap();
        assert!(!text.is_empty());
        let u = stack::usage_event(&env.nats_url, &env, &rid).await;
        assert_eq!(
            u.tokens.input_tokens,
            v["usage"]["input_tokens"].as_u64().unwrap(),
            "{model}"
        );
        assert_eq!(
            u.tokens.output_tokens,
            v["usage"]["output_tokens"].as_u64().unwrap(),
            "{model}"
        );
        assert!(!u.estimated);

        // Streamed.
        let r = http
            .post(format!("{}/v1/responses", outer.url()))
            .bearer_auth(SECRET)
            .json(&json!({"model": model, "input": [{"role": "user", "content": "say hello"}], "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let events = stack::sse_events(&r.text().await.unwrap());
        let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types.first(),
            Some(&"response.created"),
            "{model}: {types:?}"
        );
        assert_eq!(
            types.last(),
            Some(&"response.completed"),
            "{model}: {types:?}"
        );
        assert!(types.contains(&"response.output_text.delta"));
        let deltas: String = events
            .iter()
            .filter(|(t, _)| t == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
            .collect();
        let done = &events.last().unwrap().1["response"];
        assert_eq!(
            done["output"][0]["content"][0]["text"].as_str().unwrap(),
            deltas
        );
        let u = stack::usage_event(&env.nats_url, &env, &rid).await;
        assert!(u.streamed && !u.estimated, "{model}");
        assert_eq!(
            u.tokens.output_tokens,
            done["usage"]["output_tokens"].as_u64().unwrap()
        );
        assert_eq!(u.api, tollgate_schemas::events::ApiFormat::OpenaiResponses);
    }
}
