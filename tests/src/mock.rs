//! The mock upstream LLM: a fast HTTP server that speaks the real OpenAI and
//! Anthropic wire formats (JSON and SSE, usage blocks, error shapes) with
//! deterministic token counts and injectable latency and failures. It ignores
//! auth headers. The binary `tollgate-mock-upstream` wraps [`serve`].
//!
//! # Routes
//!
//! | route | format |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI chat (plain, or SSE with `stream`; `stream_options.include_usage` honoured) |
//! | `POST /v1/completions` | OpenAI legacy completions (plain or SSE) |
//! | `POST /v1/messages` | Anthropic Messages (plain, or SSE with `stream`) |
//! | `POST /v1/messages/count_tokens` | `{"input_tokens":N}` |
//! | `POST /v1/embeddings` | OpenAI embeddings, `encoding_format` `float` (default) or `base64` |
//! | `GET /v1/models` | OpenAI model list (`mock-gpt`, `mock-claude`, `mock-embed`) |
//! | `GET /healthz` | `200 ok` |
//! | `POST /mock/fail-next` | body `{"count":N,"status":S}` (defaults 1 and 503): the next N requests to the `POST /v1/*` routes fail with S |
//! | `GET /mock/stats` | `{"requests":N,"fail_next_remaining":K}`: N counts every `/v1/*` request received |
//! | `POST /mock/reset` | zero the request count and cancel `fail-next` |
//!
//! # Token counts (deterministic)
//!
//! - Prompt tokens of chat and Messages requests: the whitespace-separated
//!   words (`str::split_whitespace`) of all text, plus 3 per entry of
//!   `messages`, at least 1. Text is a string `content` / `system`, or the
//!   `text` and `content` members of content blocks and parts (recursively,
//!   so `tool_result` contents count); images, tool inputs, tool calls, names
//!   and roles count nothing. Anthropic's top-level `system` counts its words
//!   but is not a message (no +3). `count_tokens` returns exactly this.
//! - Legacy completions: words of the prompt string(s) plus one per token of
//!   token-array prompts, at least 1 (no per-message overhead).
//! - Embeddings: the same per input, summed over inputs, at least 1.
//! - Output: the reply is `mock reply word1 word2 ...`, each word followed by
//!   one space (the plain text is exactly the concatenation of the streamed
//!   deltas). Each word is one token. Count: `x-mock-output-tokens` if given
//!   (capped at 100000), else `min(max_tokens, 16)` (`max_completion_tokens`
//!   before `max_tokens` on chat; 16 without either).
//! - Cached tokens `C` (`x-mock-cached-tokens`) come on top of the prompt
//!   rule `P`: OpenAI reports `prompt_tokens = P + C` with
//!   `prompt_tokens_details.cached_tokens = C`; Anthropic reports
//!   `input_tokens = P` and `cache_read_input_tokens = C`. Reasoning tokens
//!   `R` (`x-mock-reasoning-tokens`) come on top of the output words `O`:
//!   OpenAI `completion_tokens = O + R` with
//!   `completion_tokens_details.reasoning_tokens = R`; Anthropic
//!   `output_tokens = O + R`. So a gateway's normalised counts are always
//!   input `P`, cache read `C`, output `O + R`, reasoning `R`.
//!
//! # Controls
//!
//! Each control is a request header `x-mock-<name>: <value>` or, equally, a
//! segment `<name>-<value>` of the requested model name (starting the name
//! or after one of `- _ : / @ . +`), e.g. `mock-gpt-fail-503` or
//! `mock-claude-latency-ms-200-cut-after-3`. A header wins over the model.
//!
//! | name | effect |
//! |---|---|
//! | `latency-ms: N` | sleep N ms before answering (also before an injected failure) |
//! | `chunk-delay-ms: N` | streams: N ms between events (each event its own body chunk) |
//! | `fail: S` | answer status S (400–599) with the provider's error JSON; 429 adds `retry-after: 1` |
//! | `cut-after: N` | streams: send the head events and N token events, then drop the connection (no finish, usage, `[DONE]` or `message_stop`) |
//! | `output-tokens: N` | exactly N output tokens (up to 100000), whatever `max_tokens` says |
//! | `tool-call: NAME` | answer with a call of tool NAME whose arguments are `{"text":"<the reply words>"}` (OpenAI `tool_calls`, `finish_reason:"tool_calls"`; Anthropic `tool_use`, `stop_reason:"tool_use"`); in a model name the tool name is `[A-Za-z0-9_]+`, and a bare `tool-call` means `mock_tool` |
//! | `cached-tokens: N` | report N cache-read tokens (see above) |
//! | `reasoning-tokens: N` | report N reasoning tokens (see above) |
//! | `no-usage: 1` | streams carry no usage: OpenAI omits `"usage":null` and the usage chunk even when asked; Anthropic omits `usage` from `message_start` and `message_delta`. In a model name: `no-usage` |
//!
//! `POST /mock/fail-next` failures are checked before the per-request `fail`.
//! A body that is not valid JSON, or lacks a required field (`model`, and
//! `messages` / `input`), gets a 400 in the provider's error shape.

mod anthropic;
mod controls;
mod openai;
mod parse;
mod sse;
mod wire;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use base64::Engine;
use tokio::net::TcpListener;

use controls::Controls;
use openai::Reply;
use parse::{ChatRequest, CompletionRequest, EmbeddingsRequest, FailNext, MessagesRequest};
use wire::{Api, Usage, error_response, json_response, push_json_str, push_u64, sse_response};

/// Largest request body accepted.
const BODY_LIMIT: usize = 64 * 1024 * 1024;
/// Embedding dimension without `dimensions`.
const DEFAULT_DIMENSIONS: u64 = 8;
/// Largest `dimensions` accepted.
const MAX_DIMENSIONS: u64 = 16_384;

const MODELS: &str = concat!(
    r#"{"object":"list","data":["#,
    r#"{"id":"mock-gpt","object":"model","created":1700000000,"owned_by":"tollgate-mock"},"#,
    r#"{"id":"mock-claude","object":"model","created":1700000000,"owned_by":"tollgate-mock"},"#,
    r#"{"id":"mock-embed","object":"model","created":1700000000,"owned_by":"tollgate-mock"}"#,
    r#"]}"#
);

/// Serves the mock upstream on `listener` until `shutdown` completes, then
/// finishes the requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        // Small SSE writes must not wait for delayed ACKs.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The mock's router, with fresh counters, for callers that serve it
/// themselves.
pub fn app() -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/mock/fail-next", post(fail_next))
        .route("/mock/stats", get(stats))
        .route("/mock/reset", post(reset))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(Arc::new(Shared::default()))
}

/// Counters shared by all requests.
#[derive(Default)]
struct Shared {
    requests: AtomicU64,
    /// `fail-next`: status in the top 16 bits, remaining count below.
    fail_next: AtomicU64,
}

const COUNT_MASK: u64 = (1 << 48) - 1;

impl Shared {
    fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn take_fail_next(&self) -> Option<StatusCode> {
        if self.fail_next.load(Ordering::Relaxed) & COUNT_MASK == 0 {
            return None;
        }
        let prev = self
            .fail_next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & COUNT_MASK != 0).then(|| v - 1)
            })
            .ok()?;
        StatusCode::from_u16((prev >> 48) as u16).ok()
    }
}

type AppState = State<Arc<Shared>>;

/// The 400 for a body that is not the JSON the route expects.
fn bad_json(api: Api, e: &serde_json::Error) -> Response {
    error_response(
        api,
        StatusCode::BAD_REQUEST,
        &format!("We could not parse the JSON body of your request: {e}"),
    )
}

/// The answer to a body that could not be read (too large, or broken off).
fn unreadable_body(api: Api) -> Response {
    error_response(
        api,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large or unreadable",
    )
}

/// The latency, then the injected failures, of a request.
async fn gate(st: &Shared, controls: &Controls, api: Api) -> Option<Response> {
    if controls.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(controls.latency_ms)).await;
    }
    let status = st.take_fail_next().or(controls.fail)?;
    Some(error_response(api, status, &wire::injected_message(status)))
}

/// The common start of every generating route: count, read, parse, controls,
/// latency and failures.
macro_rules! prepare {
    ($st:expr, $req:expr, $api:expr, $body:ident, $ty:ty) => {{
        $st.count();
        let (parts, body) = $req.into_parts();
        $body = match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => return unreadable_body($api),
        };
        let parsed: $ty = match serde_json::from_slice(&$body) {
            Ok(p) => p,
            Err(e) => return bad_json($api, &e),
        };
        let controls = Controls::new(&parts.headers, &parsed.model);
        if let Some(resp) = gate(&$st, &controls, $api).await {
            return resp;
        }
        (parsed, controls)
    }};
}

async fn chat(State(st): AppState, req: Request) -> Response {
    let bytes;
    let (r, controls) = prepare!(st, req, Api::OpenAi, bytes, ChatRequest<'_>);
    let words = controls.output_words(r.max_completion_tokens.or(r.max_tokens));
    let reply = Reply {
        model: &r.model,
        words,
        tool: controls.tool_call.as_deref(),
        usage: Usage {
            prompt: chat_prompt_tokens(r.messages.words, r.messages.count),
            cached: controls.cached_tokens,
            output: words,
            reasoning: controls.reasoning_tokens,
        },
    };
    if r.stream.unwrap_or(false) {
        let include_usage = !controls.no_usage
            && r.stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        let script = openai::chat_stream(&reply, include_usage);
        sse_response(script.into_body(controls.cut_after, controls.chunk_delay_ms))
    } else {
        json_response(StatusCode::OK, openai::chat_json(&reply))
    }
}

async fn completions(State(st): AppState, req: Request) -> Response {
    let bytes;
    let (r, controls) = prepare!(st, req, Api::OpenAi, bytes, CompletionRequest<'_>);
    let words = controls.output_words(r.max_tokens);
    let reply = Reply {
        model: &r.model,
        words,
        tool: None,
        usage: Usage {
            prompt: r.prompt.0.max(1),
            cached: controls.cached_tokens,
            output: words,
            reasoning: controls.reasoning_tokens,
        },
    };
    if r.stream.unwrap_or(false) {
        let include_usage = !controls.no_usage
            && r.stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        let script = openai::completion_stream(&reply, include_usage);
        sse_response(script.into_body(controls.cut_after, controls.chunk_delay_ms))
    } else {
        json_response(StatusCode::OK, openai::completion_json(&reply))
    }
}

async fn messages(State(st): AppState, req: Request) -> Response {
    let bytes;
    let (r, controls) = prepare!(st, req, Api::Anthropic, bytes, MessagesRequest<'_>);
    let words = controls.output_words(r.max_tokens);
    let reply = Reply {
        model: &r.model,
        words,
        tool: controls.tool_call.as_deref(),
        usage: Usage {
            prompt: anthropic_prompt_tokens(&r),
            cached: controls.cached_tokens,
            output: words,
            reasoning: controls.reasoning_tokens,
        },
    };
    if r.stream.unwrap_or(false) {
        let script = anthropic::message_stream(&reply, !controls.no_usage);
        sse_response(script.into_body(controls.cut_after, controls.chunk_delay_ms))
    } else {
        json_response(StatusCode::OK, anthropic::message_json(&reply))
    }
}

async fn count_tokens(State(st): AppState, req: Request) -> Response {
    let bytes;
    let (r, _) = prepare!(st, req, Api::Anthropic, bytes, MessagesRequest<'_>);
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(b"{\"input_tokens\":");
    push_u64(&mut out, anthropic_prompt_tokens(&r));
    out.push(b'}');
    json_response(StatusCode::OK, out)
}

async fn embeddings(State(st): AppState, req: Request) -> Response {
    let bytes;
    let (r, _) = prepare!(st, req, Api::OpenAi, bytes, EmbeddingsRequest<'_>);
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return error_response(
                Api::OpenAi,
                StatusCode::BAD_REQUEST,
                &format!(
                    "Invalid value for 'encoding_format': '{other}'. Expected 'float' or 'base64'."
                ),
            );
        }
    };
    let dimensions = r.dimensions.unwrap_or(DEFAULT_DIMENSIONS);
    if dimensions == 0 || dimensions > MAX_DIMENSIONS {
        return error_response(
            Api::OpenAi,
            StatusCode::BAD_REQUEST,
            &format!("Invalid value for 'dimensions': must be between 1 and {MAX_DIMENSIONS}."),
        );
    }
    let dims = dimensions as usize;
    let inputs = &r.input.0;
    let per_input = if base64 {
        dims * 4 * 4 / 3 + 80
    } else {
        dims * 12 + 64
    };
    let mut out = Vec::with_capacity(128 + r.model.len() + inputs.len() * per_input);
    let mut vector = Vec::with_capacity(dims);
    let mut raw = Vec::with_capacity(if base64 { dims * 4 } else { 0 });
    let mut encoded = String::new();
    let mut tokens = 0u64;
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    for (index, input) in inputs.iter().enumerate() {
        tokens += input.tokens;
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
        push_u64(&mut out, index as u64);
        out.extend_from_slice(b",\"embedding\":");
        embedding_vector(input.seed, dims, &mut vector);
        if base64 {
            raw.clear();
            for v in &vector {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            encoded.clear();
            base64::engine::general_purpose::STANDARD.encode_string(&raw, &mut encoded);
            out.push(b'"');
            out.extend_from_slice(encoded.as_bytes());
            out.push(b'"');
        } else {
            out.push(b'[');
            for (i, v) in vector.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_f32(&mut out, *v);
            }
            out.push(b']');
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"model\":");
    push_json_str(&mut out, &r.model);
    let tokens = tokens.max(1);
    out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
    push_u64(&mut out, tokens);
    out.extend_from_slice(b",\"total_tokens\":");
    push_u64(&mut out, tokens);
    out.extend_from_slice(b"}}");
    json_response(StatusCode::OK, out)
}

async fn models(State(st): AppState) -> Response {
    st.count();
    json_response(StatusCode::OK, MODELS)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn fail_next(State(st): AppState, body: Bytes) -> Response {
    let req: FailNext = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_json(Api::OpenAi, &e),
    };
    let status = match StatusCode::from_u16(req.status) {
        Ok(s) if s.is_client_error() || s.is_server_error() => s,
        _ => {
            return error_response(
                Api::OpenAi,
                StatusCode::BAD_REQUEST,
                "'status' must be an HTTP error status (400-599)",
            );
        }
    };
    let count = req.count.min(COUNT_MASK);
    st.fail_next.store(
        (u64::from(status.as_u16()) << 48) | count,
        Ordering::Release,
    );
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(b"{\"count\":");
    push_u64(&mut out, count);
    out.extend_from_slice(b",\"status\":");
    push_u64(&mut out, u64::from(status.as_u16()));
    out.push(b'}');
    json_response(StatusCode::OK, out)
}

async fn stats(State(st): AppState) -> Response {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"requests\":");
    push_u64(&mut out, st.requests.load(Ordering::Relaxed));
    out.extend_from_slice(b",\"fail_next_remaining\":");
    push_u64(&mut out, st.fail_next.load(Ordering::Acquire) & COUNT_MASK);
    out.push(b'}');
    json_response(StatusCode::OK, out)
}

async fn reset(State(st): AppState) -> Response {
    st.requests.store(0, Ordering::Relaxed);
    st.fail_next.store(0, Ordering::Release);
    json_response(StatusCode::OK, "{}")
}

async fn not_found(req: Request) -> Response {
    let message = format!(
        "mock upstream: no route {} {}",
        req.method(),
        req.uri().path()
    );
    error_response(Api::OpenAi, StatusCode::NOT_FOUND, &message)
}

/// Chat prompt rule: words + 3 per message, at least 1.
fn chat_prompt_tokens(words: u64, messages: u64) -> u64 {
    (words + 3 * messages).max(1)
}

/// Messages prompt rule: the chat rule plus the words of `system`.
fn anthropic_prompt_tokens(r: &MessagesRequest<'_>) -> u64 {
    let system = r.system.map_or(0, |w| w.0);
    chat_prompt_tokens(r.messages.words + system, r.messages.count)
}

/// A deterministic unit vector from `seed` (splitmix64 draws in [-1, 1)).
fn embedding_vector(seed: u64, dims: usize, out: &mut Vec<f32>) {
    out.clear();
    let mut state = seed;
    let mut norm = 0.0f64;
    for _ in 0..dims {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let v = (z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0;
        norm += v * v;
        out.push(v as f32);
    }
    let norm = norm.sqrt();
    if norm > 0.0 {
        for v in out.iter_mut() {
            *v = (f64::from(*v) / norm) as f32;
        }
    }
}

/// Appends an f32 as a JSON number (shortest representation that reads back
/// as the same f32).
fn push_f32(out: &mut Vec<u8>, v: f32) {
    use std::io::Write;
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push(b'0');
    }
}
