//! OpenAI's Responses API (`POST /v1/responses`) served over chat
//! completions: the request becomes a chat request, and the chat answer
//! (plain or streamed) becomes a Responses `response` object or event stream.
//!
//! Only what chat completions can express is accepted: text and image
//! input, function tools, function calls and their outputs. Server-side
//! state (`previous_response_id`, `conversation`, `background`), built-in
//! tools (web search, file search, computer use, ...) and structured output
//! through `text.format` are refused with [`TranslateError::Invalid`](crate::translate::TranslateError::Invalid).
//!
//! Usage: the Responses `input_tokens` includes cached tokens (like chat's
//! `prompt_tokens`), `input_tokens_details.cached_tokens` is the cache read
//! and `cache_write_tokens` the cache write (0 from chat upstreams);
//! [`StreamTranslator::usage`](crate::translate::StreamTranslator::usage) reports Tollgate's token kinds (input
//! excluding cache reads).
//!
//! The stream follows OpenAI's event grammar: `response.created`,
//! `response.in_progress`, then per output item `response.output_item.added`,
//! (for a message) `response.content_part.added`,
//! `response.output_text.delta`s, `response.output_text.done`,
//! `response.content_part.done`, (for a function call)
//! `response.function_call_arguments.delta`s and `.done`, then
//! `response.output_item.done`; finally `response.completed` with the whole
//! response and its usage. Every event carries `type` and a
//! `sequence_number` counting from 0, and no `[DONE]` is written. A
//! truncated answer (`finish_reason: length`) still ends with
//! `response.completed` (the SDK's `get_final_response()` needs it), whose
//! response has `status: "incomplete"` and
//! `incomplete_details.reason: "max_output_tokens"`.

mod request;
mod response;
mod stream;

pub use self::request::responses_request_to_chat;
pub use self::response::{chat_response_to_responses, echo_request_fields};
pub use self::stream::ChatToResponsesStream;

#[cfg(test)]
mod tests;
