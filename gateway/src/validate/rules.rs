//! The tables: each route's known top-level parameters with their types and
//! ranges, in the order the provider reports them (the first fault wins).
//!
//! OpenAI's ranges are those of its OpenAPI description
//! (`CreateChatCompletionRequest`, `CreateCompletionRequest`,
//! `CreateEmbeddingRequest`, `CreateResponse`), plus `max_tokens` /
//! `max_completion_tokens` >= 1 on chat, which the API enforces and the
//! description leaves open. Anthropic's are those of the Messages API
//! (`temperature` and `top_p` 0..1, `top_k` >= 0, `max_tokens` required >= 1).

use serde_json::{Map, Value};

use super::nested;
use super::{Api, Check, Checked, Fault, Field, Invalid, Loc};

const fn req(name: &'static str, check: Check) -> Field {
    Field {
        name,
        required: true,
        check,
    }
}

const fn opt(name: &'static str, check: Check) -> Field {
    Field {
        name,
        required: false,
        check,
    }
}

const fn int(min: Option<i64>, max: Option<i64>) -> Check {
    Check::Int { min, max }
}

const fn num(min: f64, max: f64) -> Check {
    Check::Num { min, max }
}

const PENALTY: Check = num(-2.0, 2.0);
const OPENAI_TEMPERATURE: Check = num(0.0, 2.0);
const UNIT: Check = num(0.0, 1.0);
/// OpenAI's `n`: 1..=128.
const N: Check = int(Some(1), Some(128));
const AT_LEAST_ONE: Check = int(Some(1), None);
const SEED: Check = int(None, None);
const STOP: Check = Check::StrOrStrs { max: 4 };

const CHAT: &[Field] = &[
    req("model", Check::Str),
    req("messages", Check::With(nested::openai_messages)),
    opt("temperature", OPENAI_TEMPERATURE),
    opt("top_p", UNIT),
    opt("n", N),
    opt("max_tokens", AT_LEAST_ONE),
    opt("max_completion_tokens", AT_LEAST_ONE),
    opt("presence_penalty", PENALTY),
    opt("frequency_penalty", PENALTY),
    opt("stream", Check::Bool),
    opt("stream_options", Check::With(nested::stream_options)),
    opt("stop", STOP),
    opt("logprobs", Check::Bool),
    opt("top_logprobs", int(Some(0), Some(20))),
    opt("seed", SEED),
    opt("logit_bias", Check::Object),
    opt("user", Check::Str),
    opt("tools", Check::Array),
    opt("parallel_tool_calls", Check::Bool),
    opt("response_format", Check::Object),
    opt("store", Check::Bool),
    opt("metadata", Check::Object),
];

const COMPLETIONS: &[Field] = &[
    req("model", Check::Str),
    req("prompt", Check::With(nested::prompt)),
    opt("temperature", OPENAI_TEMPERATURE),
    opt("top_p", UNIT),
    opt("n", N),
    // 0 is allowed here: with `echo`, a prompt's log probabilities alone.
    opt("max_tokens", int(Some(0), None)),
    opt("best_of", int(Some(0), Some(20))),
    opt("logprobs", int(Some(0), Some(5))),
    opt("presence_penalty", PENALTY),
    opt("frequency_penalty", PENALTY),
    opt("stream", Check::Bool),
    opt("stream_options", Check::With(nested::stream_options)),
    opt("stop", STOP),
    opt("seed", SEED),
    opt("echo", Check::Bool),
    opt("suffix", Check::Str),
    opt("logit_bias", Check::Object),
    opt("user", Check::Str),
];

const EMBEDDINGS: &[Field] = &[
    req("model", Check::Str),
    req("input", Check::With(nested::embedding_input)),
    opt("dimensions", AT_LEAST_ONE),
    opt("encoding_format", Check::OneOf(&["float", "base64"])),
    opt("user", Check::Str),
    opt("stream", Check::Bool),
];

const RESPONSES: &[Field] = &[
    req("model", Check::Str),
    req("input", Check::With(nested::responses_input)),
    opt("instructions", Check::Str),
    opt("temperature", OPENAI_TEMPERATURE),
    opt("top_p", UNIT),
    opt("top_logprobs", int(Some(0), Some(20))),
    // OpenAI's description: `minimum: 16`.
    opt("max_output_tokens", int(Some(16), None)),
    opt("max_tool_calls", int(None, None)),
    opt("stream", Check::Bool),
    opt("stream_options", Check::With(nested::stream_options)),
    opt("store", Check::Bool),
    opt("background", Check::Bool),
    opt("parallel_tool_calls", Check::Bool),
    opt("previous_response_id", Check::Str),
    opt("tools", Check::Array),
    opt("metadata", Check::Object),
    opt("user", Check::Str),
    opt("truncation", Check::OneOf(&["auto", "disabled"])),
];

const MESSAGES: &[Field] = &[
    req("model", Check::Str),
    req("messages", Check::With(nested::anthropic_messages)),
    req("max_tokens", AT_LEAST_ONE),
    opt("system", Check::With(nested::anthropic_system)),
    opt("temperature", UNIT),
    opt("top_p", UNIT),
    opt("top_k", int(Some(0), None)),
    opt("stream", Check::Bool),
    opt("stop_sequences", Check::Strs),
    opt("metadata", Check::Object),
    opt("tools", Check::Array),
    opt("tool_choice", Check::Object),
    opt("thinking", Check::Object),
];

const COUNT_TOKENS: &[Field] = &[
    req("model", Check::Str),
    req("messages", Check::With(nested::anthropic_messages)),
    opt("system", Check::With(nested::anthropic_system)),
    opt("tools", Check::Array),
    opt("tool_choice", Check::Object),
    opt("thinking", Check::Object),
];

pub(super) fn table(api: Api) -> &'static [Field] {
    match api {
        Api::Chat => CHAT,
        Api::Completions => COMPLETIONS,
        Api::Embeddings => EMBEDDINGS,
        Api::Responses => RESPONSES,
        Api::Messages => MESSAGES,
        Api::CountTokens => COUNT_TOKENS,
    }
}

/// The rules between fields, once each field is valid on its own.
pub(super) fn across(api: Api, req: &Map<String, Value>) -> Result<Checked, Invalid> {
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let root = Loc::root();
    if stream && api == Api::Embeddings {
        return Err(Invalid::new(
            root.key("stream"),
            Fault::Rule("embeddings do not stream: 'stream' must be false"),
        ));
    }
    if !stream && req.get("stream_options").is_some_and(|o| !o.is_null()) {
        return Err(Invalid::new(
            root.key("stream_options"),
            Fault::Rule("The 'stream_options' parameter is only allowed when 'stream' is enabled."),
        ));
    }
    Ok(Checked { stream })
}
