//! The consume → batch → insert → commit pipeline, shared by `run`,
//! `replay` and `bench`.
//!
//! Two tasks joined by two channels:
//!
//! ```text
//!            fetch + decode                 RowBinary INSERT (retry forever)
//! JetStream ───────────────▶ [consumer task] ──batches (bounded: 2)──▶ [inserter task] ──▶ ClickHouse
//!     ▲                           │    ▲                                     │
//!     └──────── commit (ack) ─────┘    └────────── inserted (unbounded) ─────┘
//! ```
//!
//! - The consumer task owns the `EventConsumer` (fetching and committing both
//!   need it). It fills a batch until `max_events` or until `max_wait` after
//!   the batch's first event, ships it, and keeps fetching the next one while
//!   earlier ones are being inserted. It commits each batch as soon as the
//!   inserter reports it (between fetches, which are short while inserts are
//!   outstanding, and while waiting for room), and never holds more than
//!   `max_in_flight` uncommitted messages, so the server never stalls it.
//! - The inserter task inserts up to [`INSERT_CONCURRENCY`] batches at once
//!   and only then hands their commit tokens back. On failure it keeps the
//!   batch and retries with backoff, never dropping and never acknowledging
//!   it, so a ClickHouse outage pauses the pipeline (the bounded channel stops
//!   the fetching) and it resumes by itself when ClickHouse is back.
//! - Poison messages are published to the dead-letter subject, and their
//!   commit tokens ride along with the batch they arrived in.
//!
//! - `ack_wait` is short (seconds: it is how long what a killed meter held
//!   stays invisible), so every batch held longer than
//!   [`ConsumerSpec::progress_every`] says so (`in_progress`, JetStream's
//!   `+WPI`): the one filling in the consumer task, the ones queued for and
//!   running in the inserter (which takes every shipped batch at once so that
//!   it can), however long a ClickHouse outage lasts.
//!
//! Shutdown, in order: stop fetching → ship the partial batch → the inserter
//! inserts everything queued (retrying for at most [`SHUTDOWN_GRACE`]) →
//! commit what was inserted, release (nak) what was not, and what the client
//! had taken from the server but not handed out yet → return. So the next
//! meter gets it at once rather than after `ack_wait`; a redelivery is
//! harmless (see the crate docs).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clickhouse::{Client, RowOwned, RowWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::bus::{
    BusError, CommitToken, ConsumerSpec, Delivery, EventBus, EventConsumer, Outgoing, in_progress,
    lane_of,
};
use tollgate_schemas::events::EventKind;
use tracing::{Instrument, Span};

use crate::decode::{Decoded, Poison, decode};
use crate::metrics as m;
use crate::rows::{RequestRow, Table, TokenCountRow, UsageRow};

/// Longest pause between two looks at the commit queue and the shutdown flag.
pub const POLL: Duration = Duration::from_millis(100);
/// The same while inserts are outstanding (their commits should not wait).
pub const BUSY_POLL: Duration = Duration::from_millis(5);
/// Most messages taken from the bus in one fetch.
pub const FETCH_CHUNK: usize = 2_000;
/// Batches inserted into ClickHouse at the same time.
pub const INSERT_CONCURRENCY: usize = 2;
/// How long a shutting-down inserter keeps retrying ClickHouse.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Header naming why a message was dead-lettered.
pub const DEADLETTER_REASON_HEADER: &str = "tollgate-deadletter-reason";
/// Headers naming where a dead-lettered message came from.
pub const DEADLETTER_SUBJECT_HEADER: &str = "tollgate-origin-subject";
pub const DEADLETTER_SEQ_HEADER: &str = "tollgate-origin-seq";

/// Counters a caller can watch (replay's progress bar, the benchmark).
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages committed (stored events and dead letters).
    pub committed: AtomicU64,
    /// Rows inserted into ClickHouse (re-inserts after a retry count once).
    pub inserted: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Highest stream position committed.
    pub position: AtomicU64,
}

/// What the pipeline is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The live meter: runs until shutdown, dead-letters poison messages.
    Live,
    /// A replay: stops once every lane has reached its position in
    /// `stop_at` (indexed by lane; one lane on JetStream, one per partition
    /// on Kafka) or at the end of the stream, and counts poison messages
    /// without dead-lettering them again.
    Replay { stop_at: Vec<u64> },
}

impl Mode {
    /// Whether `position` is beyond the replay range.
    fn beyond(&self, position: u64) -> bool {
        match self {
            Mode::Live => false,
            Mode::Replay { stop_at } => stop_at
                .get(lane_of(position) as usize)
                .is_none_or(|stop| position > *stop),
        }
    }
}

pub struct Pipeline {
    pub bus: Arc<dyn EventBus>,
    /// A client whose default database is the meter's.
    pub ch: Client,
    pub spec: ConsumerSpec,
    pub max_events: usize,
    pub max_wait: Duration,
    pub mode: Mode,
    /// Test-only pause between insert and commit (see `config::FAULT_ACK_DELAY_ENV`).
    pub ack_delay: Option<Duration>,
    pub stats: Arc<Stats>,
}

/// A batch on its way to ClickHouse.
#[derive(Default)]
struct Batch {
    usage: Vec<UsageRow>,
    requests: Vec<RequestRow>,
    token_counts: Vec<TokenCountRow>,
    tokens: Vec<CommitToken>,
    max_position: u64,
    /// One span per event, only when traces are exported; they end when
    /// the batch is committed.
    spans: Vec<Span>,
}

impl Batch {
    fn messages(&self) -> usize {
        self.tokens.len()
    }
    fn rows(&self) -> usize {
        self.usage.len() + self.requests.len() + self.token_counts.len()
    }
}

/// A batch that is in ClickHouse: commit it.
struct Inserted {
    tokens: Vec<CommitToken>,
    max_position: u64,
    spans: Vec<Span>,
}

/// What the inserter hands back.
enum Done {
    Inserted(Inserted),
    /// Given up on under shutdown (ClickHouse unavailable): release it.
    Abandoned(Vec<CommitToken>),
}

impl Pipeline {
    /// Runs until `cancel` (live) or the end of the replay range, then drains.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), BusError> {
        let Some(consumer) = self.open(&cancel).await? else {
            return Ok(());
        };
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(2);
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
        let inserter = tokio::spawn(insert_loop(
            self.ch.clone(),
            batch_rx,
            done_tx,
            cancel.clone(),
            self.ack_delay,
            self.stats.clone(),
            self.spec.progress_every(),
        ));
        let mut consume = Consume {
            p: &self,
            consumer,
            batch: Batch::default(),
            deadline: None,
            batch_tx: Some(batch_tx),
            done_rx,
            outstanding: 0,
            uncommitted: 0,
            max_seen: Vec::new(),
            empty_at_end: 0,
            next_beat: None,
        };
        consume.run(&cancel).await;
        if let Err(e) = inserter.await {
            tracing::error!(error = %e, "inserter task failed");
        }
        Ok(())
    }

    /// Opens the consumer. The live meter retries until it can (NATS may be
    /// starting); a replay fails fast.
    async fn open(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<Box<dyn EventConsumer>>, BusError> {
        let mut attempt = 0u32;
        loop {
            match self.bus.consumer(self.spec.clone()).await {
                Ok(c) => return Ok(Some(c)),
                Err(e) if matches!(self.mode, Mode::Replay { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot open the consumer yet; retrying");
                    if !sleep_unless_cancelled(backoff(attempt), cancel).await {
                        return Ok(None);
                    }
                    attempt += 1;
                }
            }
        }
    }
}

struct Consume<'a> {
    p: &'a Pipeline,
    consumer: Box<dyn EventConsumer>,
    batch: Batch,
    /// When the current batch must be shipped (its first message + max_wait).
    deadline: Option<Instant>,
    batch_tx: Option<mpsc::Sender<Batch>>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Batches handed to the inserter and not yet back.
    outstanding: usize,
    /// Messages handed to the inserter and not yet committed.
    uncommitted: usize,
    /// Highest position fetched per lane (replay's stop condition).
    max_seen: Vec<u64>,
    /// Consecutive empty fetches with nothing pending (replay's end of stream).
    empty_at_end: u32,
    /// When the filling batch is next due an in-progress heartbeat.
    next_beat: Option<Instant>,
}

/// What woke a wait in the consumer task.
enum Wake {
    Inserted(Option<Done>),
    Slot(Result<mpsc::OwnedPermit<Batch>, mpsc::error::SendError<()>>),
    Timeout,
    Cancelled,
}

impl Consume<'_> {
    async fn run(&mut self, cancel: &CancellationToken) {
        let mut errors = 0u32;
        let mut next_lag = Instant::now();
        let limit = self.p.spec.max_in_flight.max(self.p.max_events);
        while !cancel.is_cancelled() && !self.finished() {
            self.commit_ready().await;
            let now = Instant::now();
            if self.next_beat.is_some_and(|b| now >= b) {
                if let Err(e) = in_progress(&self.batch.tokens).await {
                    tracing::warn!(error = %e, "in-progress heartbeat failed; the batch may be redelivered");
                }
                self.next_beat = Some(now + self.p.spec.progress_every());
            }
            if now >= next_lag {
                self.report_lag().await;
                next_lag = now + Duration::from_secs(1);
            }
            let full = self.batch.messages() >= self.p.max_events;
            if full || self.deadline.is_some_and(|d| now >= d) {
                if !self.ship(cancel).await {
                    break;
                }
                continue;
            }
            // Never ask the server for more than the consumer may hold
            // uncommitted: wait for an insert to finish instead, so fetching
            // never stalls against `max_ack_pending`.
            let held = self.uncommitted + self.batch.messages();
            if held >= limit {
                self.wait_for_inserted(cancel).await;
                continue;
            }
            // While inserts are outstanding, come back often to commit them.
            let cap = if self.outstanding > 0 {
                BUSY_POLL
            } else {
                POLL
            };
            let wait = self
                .deadline
                .map_or(self.p.max_wait, |d| d.saturating_duration_since(now))
                .min(cap);
            let room = (self.p.max_events - self.batch.messages())
                .min(limit - held)
                .min(FETCH_CHUNK);
            match self.consumer.fetch(room, wait).await {
                Ok(deliveries) => {
                    errors = 0;
                    let got = deliveries.len();
                    let now = now_secs();
                    for d in deliveries {
                        self.accept(d, now).await;
                    }
                    if got == 0 {
                        self.check_end_of_replay().await;
                    }
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(error = %e, errors, "fetch failed; retrying");
                    metrics::counter!(m::FETCH_ERRORS_TOTAL).increment(1);
                    if errors >= 5 {
                        self.reopen().await;
                    }
                    sleep_unless_cancelled(backoff(errors), cancel).await;
                }
            }
        }
        self.drain().await;
    }

    fn finished(&self) -> bool {
        match &self.p.mode {
            Mode::Live => false,
            Mode::Replay { stop_at } => {
                let reached = stop_at.iter().enumerate().all(|(lane, stop)| {
                    // An empty lane's head is its base position: nothing to wait for.
                    *stop == tollgate_schemas::bus::position(lane as u32, 0)
                        || self.max_seen.get(lane).is_some_and(|seen| seen >= stop)
                });
                reached || self.empty_at_end >= 2
            }
        }
    }

    async fn check_end_of_replay(&mut self) {
        if let Mode::Replay { .. } = self.p.mode {
            match tokio::time::timeout(Duration::from_secs(5), self.consumer.lag()).await {
                Ok(Ok(0)) => self.empty_at_end += 1,
                _ => self.empty_at_end = 0,
            }
        }
    }

    /// Decodes one delivery into the batch, or dead-letters it.
    async fn accept(&mut self, d: Delivery, now: u32) {
        let lane = lane_of(d.position) as usize;
        if self.max_seen.len() <= lane {
            self.max_seen.resize(lane + 1, 0);
        }
        self.max_seen[lane] = self.max_seen[lane].max(d.position);
        if self.p.mode.beyond(d.position) {
            return; // beyond the replay range: the live meter's business
        }
        if d.attempt > 1 {
            metrics::counter!(m::REDELIVERIES_TOTAL).increment(1);
        }
        let names = self.p.bus.names();
        let kind = names.kind_of_subject(&d.subject);
        match decode(kind, &d.payload, d.position, now) {
            Ok(row) => {
                if tollgate_telemetry::enabled() {
                    let span = event_span(&d, &row);
                    self.batch.spans.push(span);
                }
                self.push(row, d.commit, d.position);
            }
            Err(poison) => self.poison(d, poison).await,
        }
    }

    fn push(&mut self, row: Decoded, token: CommitToken, position: u64) {
        match row {
            Decoded::Usage(r) => self.batch.usage.push(r),
            Decoded::Request(r) => self.batch.requests.push(r),
            Decoded::TokenCount(r) => self.batch.token_counts.push(r),
        }
        self.push_token(token, position);
    }

    fn push_token(&mut self, token: CommitToken, position: u64) {
        if self.batch.tokens.is_empty() {
            self.deadline = Some(Instant::now() + self.p.max_wait);
            self.next_beat = Some(Instant::now() + self.p.spec.progress_every());
            self.batch.usage.reserve(self.p.max_events.min(FETCH_CHUNK));
        }
        self.batch.tokens.push(token);
        self.batch.max_position = self.batch.max_position.max(position);
    }

    /// Parks a poison message on the dead-letter subject, then lets it be
    /// committed with its batch. If parking fails (NATS trouble), the message
    /// is left uncommitted and comes back after `ack_wait`.
    async fn poison(&mut self, d: Delivery, poison: Poison) {
        let _span = tollgate_telemetry::enabled().then(|| {
            let span = tracing::info_span!(
                parent: None,
                "meter.dead_letter",
                otel.kind = "consumer",
                otel.status_code = "ERROR",
                messaging.destination.name = d.subject.as_str(),
                tollgate.stream_position = d.position,
                tollgate.reason = %poison,
            );
            if let Some(tp) = d.header("traceparent") {
                tollgate_telemetry::set_parent(&span, tp);
            }
            span
        });
        tracing::warn!(subject = %d.subject, stream_seq = d.position, reason = %poison, "poison message");
        metrics::counter!(m::DEAD_LETTERS_TOTAL, "reason" => poison.label()).increment(1);
        if let Mode::Live = self.p.mode {
            let names = self.p.bus.names();
            let reason: String = poison
                .to_string()
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(1024)
                .collect();
            let mut headers = vec![
                (DEADLETTER_REASON_HEADER.to_owned(), reason),
                (DEADLETTER_SUBJECT_HEADER.to_owned(), d.subject.clone()),
                (DEADLETTER_SEQ_HEADER.to_owned(), d.position.to_string()),
            ];
            if let Some(tp) = d.header("traceparent") {
                headers.push(("traceparent".to_owned(), tp.to_owned()));
            }
            let msg = Outgoing {
                subject: names.deadletter_subject(&d.subject),
                // Idempotent per stream position: a redelivered poison message
                // is parked once (within the dead-letter stream's window).
                id: format!("{}:{}", names.events_stream, d.position),
                payload: d.payload.clone(),
                headers,
            };
            if let Err(e) = self.p.bus.publish(msg).await {
                tracing::warn!(error = %e, "dead-letter publish failed; the message will be redelivered");
                metrics::counter!(m::DEAD_LETTER_FAILURES_TOTAL).increment(1);
                return;
            }
        }
        self.p.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.push_token(d.commit, d.position);
    }

    /// Hands the current batch to the inserter, committing whatever the
    /// inserter finishes while it waits for room (backpressure). False if
    /// cancelled first (the batch is kept for the drain) or the inserter is
    /// gone.
    async fn ship(&mut self, cancel: &CancellationToken) -> bool {
        if self.batch.tokens.is_empty() {
            self.deadline = None;
            return true;
        }
        loop {
            let Some(tx) = self.batch_tx.clone() else {
                return false;
            };
            let wake = tokio::select! {
                biased;
                done = self.done_rx.recv() => Wake::Inserted(done),
                slot = tx.reserve_owned() => Wake::Slot(slot),
                () = cancel.cancelled() => Wake::Cancelled,
            };
            match wake {
                Wake::Inserted(Some(done)) => self.commit(done).await,
                Wake::Slot(Ok(permit)) => {
                    let batch = std::mem::take(&mut self.batch);
                    self.deadline = None;
                    self.next_beat = None;
                    self.outstanding += 1;
                    self.uncommitted += batch.messages();
                    record_batch(&batch);
                    permit.send(batch);
                    return true;
                }
                Wake::Inserted(None) | Wake::Slot(Err(_)) => {
                    tracing::error!("the inserter stopped; batch left uncommitted");
                    return false;
                }
                Wake::Cancelled | Wake::Timeout => return false,
            }
        }
    }

    /// Waits (at most [`POLL`]) for an insert to finish, and commits it.
    async fn wait_for_inserted(&mut self, cancel: &CancellationToken) {
        let wake = tokio::select! {
            done = self.done_rx.recv() => Wake::Inserted(done),
            () = tokio::time::sleep(POLL) => Wake::Timeout,
            () = cancel.cancelled() => Wake::Cancelled,
        };
        if let Wake::Inserted(Some(done)) = wake {
            self.commit(done).await;
        }
    }

    /// Commits every batch the inserter has finished, without waiting.
    async fn commit_ready(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.commit(done).await;
        }
    }

    async fn commit(&mut self, done: Done) {
        let done = match done {
            Done::Inserted(i) => i,
            Done::Abandoned(tokens) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                self.uncommitted = self.uncommitted.saturating_sub(tokens.len());
                self.release(tokens).await;
                return;
            }
        };
        let n = done.tokens.len();
        self.outstanding = self.outstanding.saturating_sub(1);
        self.uncommitted = self.uncommitted.saturating_sub(n);
        let spans = done.spans;
        match self.consumer.commit(done.tokens).await {
            Ok(()) => {
                for span in &spans {
                    span.record("tollgate.outcome", "committed");
                }
                if self.p.ack_delay.is_some() {
                    tracing::info!(messages = n, "fault injection: committed");
                }
                self.p
                    .stats
                    .committed
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.p
                    .stats
                    .position
                    .fetch_max(done.max_position, Ordering::Relaxed);
            }
            // Inserted but not acknowledged: redelivered, re-inserted,
            // collapsed by the FINAL views. Nothing lost, nothing doubled.
            Err(e) => {
                for span in &spans {
                    span.record("tollgate.outcome", "commit_failed");
                    span.record("otel.status_code", "ERROR");
                }
                tracing::warn!(error = %e, messages = n, "commit failed; they will be redelivered");
                metrics::counter!(m::COMMIT_FAILURES_TOTAL).increment(1);
            }
        }
    }

    /// Gives `tokens` back for prompt redelivery (shutdown).
    async fn release(&mut self, tokens: Vec<CommitToken>) {
        let n = tokens.len();
        if n == 0 {
            return;
        }
        match self.consumer.release(tokens).await {
            Ok(()) => tracing::info!(
                messages = n,
                "released uncommitted messages for prompt redelivery"
            ),
            Err(e) => {
                tracing::warn!(error = %e, messages = n, "release failed; they come back after ack_wait")
            }
        }
    }

    async fn report_lag(&mut self) {
        if let Ok(Ok(lag)) = tokio::time::timeout(Duration::from_secs(1), self.consumer.lag()).await
        {
            metrics::gauge!(m::CONSUMER_LAG).set(lag as f64);
        }
    }

    /// Reopens the consumer after repeated fetch errors. Commit tokens of the
    /// old one stay valid (they address the message, not the subscription).
    async fn reopen(&mut self) {
        match self.p.bus.consumer(self.p.spec.clone()).await {
            Ok(c) => {
                tracing::info!("consumer reopened");
                self.consumer = c;
            }
            Err(e) => tracing::warn!(error = %e, "cannot reopen the consumer yet"),
        }
    }

    /// Ships what is left, lets the inserter finish, commits its work.
    async fn drain(&mut self) {
        if !self.batch.tokens.is_empty()
            && let Some(tx) = &self.batch_tx
        {
            let batch = std::mem::take(&mut self.batch);
            record_batch(&batch);
            // The inserter is alive until we drop the sender; under shutdown
            // it gives up on ClickHouse after SHUTDOWN_GRACE, so this ends.
            if tx.send(batch).await.is_err() {
                tracing::error!("the inserter stopped; final batch left uncommitted");
            }
        }
        self.batch_tx = None;
        while let Some(done) = self.done_rx.recv().await {
            self.commit(done).await;
        }
        // A batch kept back (the inserter stopped), and what the client had
        // already taken from the server: give it back now.
        let kept = std::mem::take(&mut self.batch.tokens);
        self.release(kept).await;
        if let Mode::Live = self.p.mode {
            for _ in 0..4 {
                match self
                    .consumer
                    .fetch(self.p.spec.max_in_flight, Duration::from_millis(20))
                    .await
                {
                    Ok(b) if !b.is_empty() => {
                        let tokens = b.into_iter().map(|d| d.commit).collect();
                        self.release(tokens).await;
                    }
                    _ => break,
                }
            }
        }
    }
}

/// The span of one event's handling: a consumer span whose parent is the
/// publisher's (the `traceparent` header), from delivery to commit.
fn event_span(d: &Delivery, row: &Decoded) -> Span {
    let span = tracing::info_span!(
        parent: None,
        "meter.event",
        otel.name = format!("process {}", row.kind().as_str()),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.operation.type = "process",
        messaging.destination.name = d.subject.as_str(),
        messaging.message.id = row.event_id(),
        tollgate.event_id = row.event_id(),
        tollgate.event_kind = row.kind().as_str(),
        tollgate.tenant_id = row.tenant_id(),
        tollgate.stream_position = d.position,
        tollgate.delivery_attempt = d.attempt,
        tollgate.outcome = tracing::field::Empty,
    );
    if let Some(tp) = d.header("traceparent") {
        tollgate_telemetry::set_parent(&span, tp);
    }
    span
}

/// The span of one batch's insert into ClickHouse, linked to the events it
/// carries (the first [`MAX_LINKS`]).
fn insert_span(batch: &Batch) -> Span {
    if !tollgate_telemetry::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        parent: None,
        "meter.insert",
        otel.kind = "client",
        db.system.name = "clickhouse",
        db.operation.name = "INSERT",
        tollgate.messages = batch.messages(),
        tollgate.rows = batch.rows(),
    );
    for event in batch.spans.iter().take(MAX_LINKS) {
        tollgate_telemetry::link_span(&span, event);
    }
    span
}

/// Links per batch span (OpenTelemetry's default span limit is 128).
const MAX_LINKS: usize = 128;

fn record_batch(batch: &Batch) {
    metrics::histogram!(m::BATCH_SIZE).record(batch.messages() as f64);
    for (kind, n) in [
        (EventKind::Usage, batch.usage.len()),
        (EventKind::Request, batch.requests.len()),
        (EventKind::TokenCount, batch.token_counts.len()),
    ] {
        if n > 0 {
            metrics::counter!(m::EVENTS_TOTAL, "kind" => kind.as_str()).increment(n as u64);
        }
    }
}

/// Inserts batches (up to [`INSERT_CONCURRENCY`] at once), then reports each
/// for commit. Takes every shipped batch at once and queues it here, so that
/// queued and running batches can be kept alive (`in_progress` every
/// `beat`) whatever ClickHouse does; the consumer's `max_in_flight` bounds
/// the queue. Never drops a batch while running; under shutdown it gives up
/// after [`SHUTDOWN_GRACE`] and hands the batch back to be released.
async fn insert_loop(
    ch: Client,
    mut rx: mpsc::Receiver<Batch>,
    done: mpsc::UnboundedSender<Done>,
    cancel: CancellationToken,
    ack_delay: Option<Duration>,
    stats: Arc<Stats>,
    beat: Duration,
) {
    // Set once shutdown has been waiting on ClickHouse: shared by every
    // batch still queued, so the whole drain is bounded by SHUTDOWN_GRACE.
    let give_up_at = Arc::new(OnceLock::<Instant>::new());
    let mut running: JoinSet<Done> = JoinSet::new();
    let mut queued: VecDeque<Batch> = VecDeque::new();
    let mut ticker = tokio::time::interval_at(Instant::now() + beat, beat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open || !running.is_empty() || !queued.is_empty() {
        while running.len() < INSERT_CONCURRENCY
            && let Some(batch) = queued.pop_front()
        {
            let (ch, cancel, stats, give_up_at) = (
                ch.clone(),
                cancel.clone(),
                stats.clone(),
                give_up_at.clone(),
            );
            running.spawn(async move {
                let span = insert_span(&batch);
                let inserted = {
                    let work =
                        insert_with_retry(&ch, &batch, &cancel, &give_up_at).instrument(span);
                    tokio::pin!(work);
                    let mut ticker = tokio::time::interval_at(Instant::now() + beat, beat);
                    loop {
                        tokio::select! {
                            ok = &mut work => break ok,
                            _ = ticker.tick() => heartbeat(&batch.tokens).await,
                        }
                    }
                };
                if !inserted {
                    return Done::Abandoned(batch.tokens);
                }
                stats
                    .inserted
                    .fetch_add(batch.rows() as u64, Ordering::Relaxed);
                if let Some(delay) = ack_delay {
                    tracing::info!(
                        messages = batch.messages(),
                        "fault injection: inserted, pausing before commit"
                    );
                    tokio::time::sleep(delay).await;
                }
                Done::Inserted(Inserted {
                    tokens: batch.tokens,
                    max_position: batch.max_position,
                    spans: batch.spans,
                })
            });
        }
        tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => {
                match joined {
                    Ok(d) => {
                        let _ = done.send(d);
                    }
                    Err(e) => tracing::error!(error = %e, "insert task failed; batch left uncommitted"),
                }
            }
            next = rx.recv(), if open => match next {
                Some(batch) => queued.push_back(batch),
                None => open = false,
            },
            _ = ticker.tick(), if !queued.is_empty() => {
                for batch in &queued {
                    heartbeat(&batch.tokens).await;
                }
            }
        }
    }
}

async fn heartbeat(tokens: &[CommitToken]) {
    if let Err(e) = in_progress(tokens).await {
        tracing::warn!(error = %e, "in-progress heartbeat failed; the batch may be redelivered");
    }
}

async fn insert_with_retry(
    ch: &Client,
    batch: &Batch,
    cancel: &CancellationToken,
    give_up_at: &OnceLock<Instant>,
) -> bool {
    let mut pending: Vec<Table> = Table::ALL
        .into_iter()
        .filter(|t| match t {
            Table::Usage => !batch.usage.is_empty(),
            Table::Request => !batch.requests.is_empty(),
            Table::TokenCount => !batch.token_counts.is_empty(),
        })
        .collect();
    let mut attempt = 0u32;
    loop {
        let mut failed = Vec::new();
        for table in pending {
            let started = Instant::now();
            let result = match table {
                Table::Usage => insert_rows(ch, table, &batch.usage).await,
                Table::Request => insert_rows(ch, table, &batch.requests).await,
                Table::TokenCount => insert_rows(ch, table, &batch.token_counts).await,
            };
            match result {
                Ok(()) => {
                    let secs = started.elapsed().as_secs_f64();
                    metrics::histogram!(m::INSERT_SECONDS, "table" => table.name()).record(secs);
                    tracing::debug!(
                        table = table.name(),
                        messages = batch.messages(),
                        secs,
                        "inserted"
                    );
                }
                Err(e) => {
                    metrics::counter!(m::INSERT_FAILURES_TOTAL, "table" => table.name())
                        .increment(1);
                    tracing::warn!(table = table.name(), error = %e, attempt, "insert failed; keeping the batch and retrying");
                    failed.push(table);
                }
            }
        }
        if failed.is_empty() {
            return true;
        }
        pending = failed;
        if cancel.is_cancelled() {
            let limit = *give_up_at.get_or_init(|| Instant::now() + SHUTDOWN_GRACE);
            if Instant::now() >= limit {
                tracing::error!(
                    messages = batch.messages(),
                    "shutting down with ClickHouse unavailable; batch left uncommitted (it will be redelivered)"
                );
                return false;
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
    }
}

async fn insert_rows<T>(ch: &Client, table: Table, rows: &[T]) -> clickhouse::error::Result<()>
where
    T: RowOwned + RowWrite,
{
    let mut insert = ch
        .insert::<T>(table.name())
        .await?
        .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// 100 ms doubling to 2 s: cheap against a down server, and a recovered one
/// is used again within 2 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1u64 << attempt.min(5))).min(Duration::from_secs(2))
}

/// Sleeps; false if cancelled first.
pub async fn sleep_unless_cancelled(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = cancel.cancelled() => false,
    }
}

fn now_secs() -> u32 {
    u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX)
}
