//! Server-sent event bodies. A reply stream is a script of events: a few
//! head events, one event per output token, a few tail events. Head and tail
//! events are rendered once per request; token events are a pre-rendered
//! prefix and suffix around the word. Without a chunk delay, events are
//! written in batches of about 16 KiB.

use std::io;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;

use super::wire::push_word;

/// Target size of one body chunk when events are not delayed.
const BATCH: usize = 16 * 1024;

/// Up to four pre-rendered events in one buffer.
#[derive(Default)]
pub(super) struct Events {
    buf: Vec<u8>,
    ends: [usize; 4],
    len: usize,
}

impl Events {
    /// The buffer to append the next event to; call [`Events::end`] after it.
    pub(super) fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Marks the end of the event just written.
    pub(super) fn end(&mut self) {
        if let Some(slot) = self.ends.get_mut(self.len) {
            *slot = self.buf.len();
            self.len += 1;
        }
    }

    fn count(&self) -> u64 {
        self.len as u64
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }
}

/// A whole reply stream.
#[derive(Default)]
pub(super) struct Script {
    pub head: Events,
    /// Everything of a token event before the word.
    pub word_pre: Vec<u8>,
    /// Everything of a token event after the word and its trailing space.
    pub word_post: Vec<u8>,
    pub words: u64,
    pub tail: Events,
}

impl Script {
    fn total(&self) -> u64 {
        self.head.count() + self.words + self.tail.count()
    }

    fn write_event(&self, i: u64, out: &mut Vec<u8>) {
        let head = self.head.count();
        if i < head {
            out.extend_from_slice(self.head.get(i as usize));
        } else if i - head < self.words {
            out.extend_from_slice(&self.word_pre);
            push_word(out, i - head);
            out.push(b' ');
            out.extend_from_slice(&self.word_post);
        } else {
            out.extend_from_slice(self.tail.get((i - head - self.words) as usize));
        }
    }

    fn event_size_hint(&self) -> usize {
        self.word_pre.len() + self.word_post.len() + 16
    }

    /// The response body: every event, or with `cut_after` the head and that
    /// many token events followed by an abrupt end of the connection.
    pub(super) fn into_body(self, cut_after: Option<u64>, chunk_delay_ms: u64) -> Body {
        let end = match cut_after {
            Some(n) => self.head.count() + n.min(self.words),
            None => self.total(),
        };
        let state = Playback {
            script: self,
            next: 0,
            end,
            cut: cut_after.is_some(),
            delay: (chunk_delay_ms > 0).then(|| Duration::from_millis(chunk_delay_ms)),
            done: false,
        };
        Body::from_stream(futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        }))
    }
}

struct Playback {
    script: Script,
    next: u64,
    end: u64,
    cut: bool,
    delay: Option<Duration>,
    done: bool,
}

impl Playback {
    async fn next(&mut self) -> Option<Result<Bytes, io::Error>> {
        if self.done {
            return None;
        }
        if self.next >= self.end {
            self.done = true;
            if !self.cut {
                return None;
            }
            // Let the server flush what was sent, then fail the body: hyper
            // closes the connection without the terminating chunk.
            tokio::task::yield_now().await;
            return Some(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "mock upstream: x-mock-cut-after",
            )));
        }
        if let Some(delay) = self.delay {
            if self.next > 0 {
                tokio::time::sleep(delay).await;
            }
            let mut out = Vec::with_capacity(self.script.event_size_hint() + 256);
            self.script.write_event(self.next, &mut out);
            self.next += 1;
            return Some(Ok(Bytes::from(out)));
        }
        let remaining = usize::try_from(self.end - self.next).unwrap_or(usize::MAX);
        let estimate = remaining
            .saturating_mul(self.script.event_size_hint())
            .saturating_add(1024);
        let mut out = Vec::with_capacity(estimate.min(BATCH + 1024));
        while self.next < self.end && out.len() < BATCH {
            self.script.write_event(self.next, &mut out);
            self.next += 1;
        }
        Some(Ok(Bytes::from(out)))
    }
}
