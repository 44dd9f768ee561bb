//! The stream relay: the upstream's SSE events framed, translated when the
//! formats differ, and the usage recorded exactly once however it ends.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use futures::stream::BoxStream;

use super::finish::Finish;
use super::surface::Surface;
use crate::config::ProviderKind;
use crate::error::ApiStyle;
use crate::sse::{OpenAiRelay, SseEvent, SseFramer};
use crate::translate::{self, StreamTranslator};

fn translator(done: &Finish, client_wants_usage: bool) -> Box<dyn StreamTranslator> {
    if done.surface == Surface::Responses {
        let to_responses = || {
            Box::new(translate::ChatToResponsesStream::new(&done.model).with_request(&done.request))
        };
        return match done.deployment.provider {
            ProviderKind::Openai if !done.translated() => {
                Box::new(crate::responses_relay::ResponsesPassthrough::default())
            }
            ProviderKind::Openai => to_responses(),
            ProviderKind::Anthropic => Box::new(crate::responses_relay::Chain::new(
                Box::new(translate::AnthropicToOpenAiStream::new(&done.model, true)),
                to_responses(),
            )),
        };
    }
    match (done.surface.native(), done.deployment.provider) {
        (ProviderKind::Openai, ProviderKind::Openai) => {
            Box::new(OpenAiRelay::new(client_wants_usage))
        }
        (ProviderKind::Anthropic, ProviderKind::Anthropic) => {
            Box::new(translate::AnthropicPassthrough::new())
        }
        (ProviderKind::Anthropic, ProviderKind::Openai) => {
            Box::new(translate::OpenAiToAnthropicStream::new(&done.model))
        }
        (ProviderKind::Openai, ProviderKind::Anthropic) => Box::new(
            translate::AnthropicToOpenAiStream::new(&done.model, client_wants_usage),
        ),
    }
}

pub(super) fn stream_response(
    done: Finish,
    resp: reqwest::Response,
    client_wants_usage: bool,
    limit_headers: HeaderMap,
) -> Response {
    let mut headers = limit_headers;
    done.common_headers(&mut headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let relay = StreamRelay {
        upstream: Box::pin(resp.bytes_stream()),
        framer: SseFramer::default(),
        translator: translator(&done, client_wants_usage),
        events: Vec::new(),
        first_token: None,
        finish: Some(done),
        ended: false,
    };
    (StatusCode::OK, headers, Body::from_stream(relay)).into_response()
}

/// Relays an upstream SSE stream event by event. Whatever ends it (the
/// upstream finishing, the upstream cutting off, or the client going away,
/// which drops this value) records the usage exactly once: the upstream's
/// figures if it sent them, else the tokenizer's estimate, marked estimated.
struct StreamRelay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    framer: SseFramer,
    translator: Box<dyn StreamTranslator>,
    events: Vec<SseEvent>,
    first_token: Option<Duration>,
    finish: Option<Finish>,
    ended: bool,
}

impl StreamRelay {
    fn finish(&mut self) {
        let Some(done) = self.finish.take() else {
            return;
        };
        let (tokens, estimated) = match self.translator.usage() {
            Some(t) => (t, false),
            None => (done.estimate(self.translator.text()), true),
        };
        if estimated {
            metrics::counter!("tollgate_gateway_estimated_usage_total", "route" => done.surface.route()).increment(1);
        }
        let served = self.translator.served_model().map(str::to_owned);
        done.record(tokens, estimated, 200, true, served, self.first_token);
    }
}

impl Stream for StreamRelay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    this.framer.push(&chunk, &mut this.events);
                    let terminal = this.events.iter().any(is_terminal);
                    let mut out = BytesMut::new();
                    for ev in this.events.drain(..) {
                        this.translator.on_event(&ev, &mut out);
                    }
                    if this.first_token.is_none() && this.translator.saw_content() {
                        this.first_token = this.finish.as_ref().map(|f| f.started.elapsed());
                    }
                    if terminal {
                        // The upstream's last event is in hand (its usage came
                        // before it): record now, so the usage is on disk and
                        // the limiter slots are free before the client can
                        // see the end, not only once the upstream closes.
                        this.finish();
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out.freeze())));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    // Tell the client in its own format, so an SDK raises
                    // instead of taking a truncated answer for a whole one.
                    tracing::warn!(error = %e, "upstream stream cut off");
                    this.ended = true;
                    let style = this.finish.as_ref().map(|f| f.surface.style());
                    this.finish();
                    return Poll::Ready(Some(Ok(stream_error(style))));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    let mut out = BytesMut::new();
                    this.translator.finish(&mut out);
                    this.finish();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out.freeze())));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The upstream's own end of stream: OpenAI's `data: [DONE]`, Anthropic's
/// `message_stop`, the Responses API's `response.completed`.
fn is_terminal(ev: &SseEvent) -> bool {
    ev.data == "[DONE]"
        || matches!(
            ev.event.as_deref(),
            Some("message_stop" | "response.completed")
        )
}

/// The error event a client gets when the upstream cuts a stream off.
fn stream_error(style: Option<ApiStyle>) -> Bytes {
    const MESSAGE: &str =
        "the upstream connection was cut off mid-stream; the response is incomplete";
    match style {
        Some(ApiStyle::Anthropic) => {
            let v = serde_json::json!({"type": "error", "error": {"type": "api_error", "message": MESSAGE}});
            Bytes::from(format!("event: error\ndata: {v}\n\n"))
        }
        _ => {
            let v = serde_json::json!({"error": {"message": MESSAGE, "type": "api_error", "param": null, "code": "upstream_stream_cut"}});
            Bytes::from(format!("data: {v}\n\n"))
        }
    }
}

impl Drop for StreamRelay {
    fn drop(&mut self) {
        // The client went away mid-stream: its usage still counts.
        self.finish();
    }
}
