//! The gateway's event publisher: a usage event the gateway has produced
//! reaches the bus even if NATS is down for a while, and survives the
//! gateway being killed (ARCHITECTURE.md, Guarantee 1 "Nothing lost").
//!
//! ```text
//! request tasks ── publish() ──▶ spool (disk, one write(2)) ──▶ worker ── publish_many ──▶ EventBus
//!                                   ▲ fsync every sync_interval      │
//!                                   └──── cursor moves past acks ◀───┘
//! ```
//!
//! [`Publisher::publish`] never waits for the broker: it appends the message
//! to the on-disk spool (one `write(2)` of one line, no fsync) and wakes the
//! worker. The spool is the write-ahead log of every event: once `publish`
//! returns, the event is in the kernel and survives the process being killed,
//! so the request that produced it can release its last byte. The worker
//! reads the spool from its cursor, publishes in batches (`publish_many`) and
//! moves the cursor past each acknowledged prefix, deleting drained segments:
//!
//! - What the bus acknowledged is done.
//! - What failed for any bus-side reason (unreachable, timed out, stream not
//!   found during a NATS restart, misconfiguration) stays in the spool and is
//!   retried with backoff (100 ms doubling to `retry_backoff_max`), after a
//!   `ready()` probe.
//! - Only an event the bus refuses *for its content*
//!   ([`BusErrorKind::Rejected`]: too large for the server) is parked in
//!   `<spool_dir>/rejected/rejected.jsonl` with the error, logged with its id,
//!   counted in `tollgate_gateway_publish_rejected_total` and reported by
//!   [`Publisher::rejected_events`] (the gateway's `/readyz` body). It is
//!   never dropped: `tollgate-gateway spool replay-rejected` moves the file to
//!   `rejected/replay-<time>.jsonl`, and the worker feeds such files back into
//!   the spool (at start and within [`REPLAY_SCAN`] while running).
//!
//! # Order
//!
//! Events reach the bus in the order `publish` was called (appends are
//! serialised by the spool's lock), with two bounded exceptions: (1) within
//! one pipelined batch, a message after a failed one can be acknowledged
//! before it (and is re-sent with it: a duplicate); (2) messages the disk
//! refused wait in memory (the stash) and join the spool's tail, or go to the
//! bus directly when the spool is empty. Consumers never rely on order for
//! correctness (events carry `occurred_at`; the meter deduplicates by id).
//!
//! # Why nothing is lost
//!
//! A message is always in at least one of: the spool file, the stash (memory,
//! only while the disk refuses writes), the rejected file, or the bus
//! (acknowledged). The spool cursor moves only past events the bus
//! acknowledged (or parked), and a segment is deleted only after the cursor
//! has moved past it. Re-sending is the only failure mode, and it is
//! harmless: JetStream drops a repeated `Nats-Msg-Id` within its duplicate
//! window and the meter (and billing) deduplicate by event id after that.
//!
//! If the spool cannot be written (disk full, I/O error) the messages stay in
//! memory, [`Publisher::spool_full`] reports true so the gateway stops
//! admitting work (503), and the worker retries the disk, or the bus when the
//! spool is empty, with backoff. The only way to lose an event while the
//! process lives is a spool write failing *after* shutdown; that is logged as
//! an error and counted in `tollgate_gateway_events_lost_total`.
//!
//! # What a crash can lose
//!
//! `kill -9` (or OOM, or a panic) loses nothing `publish` returned from:
//! appends are whole lines in one `write(2)`, in the kernel when it returns,
//! and a torn last line is skipped on restart. (The stash is the exception:
//! it exists only while the disk refuses writes, and then the gateway refuses
//! new work.) The cursor itself is persisted at most every `sync_interval`
//! (and whenever a segment is deleted, and at shutdown), so a restart after
//! a crash re-sends up to that much already acknowledged traffic:
//! duplicates, which the bus and the meter drop.
//!
//! A kernel crash or power loss can additionally lose spool appends not yet
//! fsynced: the worker fsyncs the spool's open segment (group commit, off the
//! publishers' lock) every `sync_interval` (default [`DEFAULT_SYNC_INTERVAL`])
//! while anything is unsynced, when a segment is sealed, and on shutdown. That
//! interval is the only loss window.
//!
//! # Bounded, with a small overshoot
//!
//! When the spool holds `spool_max_bytes` or more unacknowledged bytes,
//! [`Publisher::spool_full`] is true and the gateway refuses new work.
//! Publishing still accepts (and spools) every event, so a billing fact is
//! never dropped: the overshoot is the events of requests already admitted.
//! The `rejected/` files are not counted and not bounded; they only grow on
//! content refusals, which are errors to act on.
//!
//! # Acknowledgements
//!
//! [`Publisher::start_with_ack`] takes an [`AckHook`], called by the worker
//! with every message the bus has acknowledged and its position in the
//! stream. A duplicate's receipt carries the original's position, so the hook
//! sees the position the event really has. Parked (rejected) messages are
//! never acknowledged. The local quota debit (`crate::quota`) uses it to
//! learn which stream position each of its usage events got.
//!
//! # Shutdown
//!
//! [`PublisherHandle::shutdown`] stops the worker's loop, publishes what the
//! spool holds while the bus answers and the deadline allows, persists the
//! cursor, fsyncs and stops, all within the given timeout. Later `publish`
//! calls still append (and fsync) by themselves. Dropping the handle without
//! calling it stops the worker like a crash (the spool keeps everything).

mod rejected;
mod spool;
mod worker;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate_schemas::bus::{EventBus, Outgoing};
use tracing::{error, info, warn};

#[cfg(doc)]
use tollgate_schemas::bus::BusErrorKind;

pub use rejected::{REPLAY_SCAN, queue_rejected_for_replay};
pub use spool::REJECTED_DIR;
use spool::{Spool, SpoolStats};

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_BATCH_MAX: usize = 256;
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 16 << 20;
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);
/// Group commit: unsynced spool appends are fsynced this often. A power loss
/// can take at most this much of the newest events; a process kill, none.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// How the publisher runs. [`PublisherConfig::new`] fills in the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Where the spool lives; created if missing. One publisher per directory
    /// (it is locked while in use).
    pub spool_dir: PathBuf,
    /// [`Publisher::spool_full`] is true at this many unacknowledged bytes.
    pub spool_max_bytes: u64,
    /// Most messages per `publish_many`.
    pub batch_max: usize,
    /// Ceiling of the backoff between bus probes while the bus is away.
    pub retry_backoff_max: Duration,
    /// A spool segment is sealed (and fsynced) past this size.
    pub segment_max_bytes: u64,
    /// Upper bound on one `publish_many` before its messages count as
    /// unavailable (they stay in the spool). The JetStream client times out
    /// each ack on its own, one after the other, so without this bound a
    /// batch against a dead server would take `batch_max` × 5 s.
    pub publish_timeout: Duration,
    /// How long the idle worker waits, once woken by a new event, before it
    /// reads the spool: one bus round trip, and one wake-up of the worker and
    /// of the bus connection, then carries the events of several requests
    /// instead of one or two. It delays the events, never a response. Zero:
    /// no wait.
    pub linger: Duration,
    /// Group-commit fsync interval of the spool (see the module docs).
    pub sync_interval: Duration,
}

impl PublisherConfig {
    pub fn new(spool_dir: impl Into<PathBuf>) -> Self {
        Self {
            spool_dir: spool_dir.into(),
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            batch_max: DEFAULT_BATCH_MAX,
            retry_backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
            segment_max_bytes: DEFAULT_SEGMENT_MAX_BYTES,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            linger: DEFAULT_LINGER,
            sync_interval: DEFAULT_SYNC_INTERVAL,
        }
    }
}

impl Default for PublisherConfig {
    /// Defaults with `spool_dir` = `./spool`; set a real path.
    fn default() -> Self {
        Self::new("spool")
    }
}

/// Called by the worker with each message the bus acknowledged and its
/// position in the stream. It runs on the worker task: keep it short, and
/// never block.
pub type AckHook = Arc<dyn Fn(&Outgoing, u64) + Send + Sync>;

/// Hands events to the spool and the worker. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    spool: Arc<Mutex<Spool>>,
    state: Arc<State>,
    spool_max_bytes: u64,
}

/// State shared by the publisher, the worker and the handle.
pub(crate) struct State {
    spool: Arc<SpoolStats>,
    bus_healthy: AtomicBool,
    /// Messages the disk refused, oldest first, waiting for the disk (or the
    /// bus) to take them. Non-empty means `spool_full`.
    stash: Mutex<Stash>,
    stashed: AtomicU64,
    /// Events in `rejected/rejected.jsonl` (counted at start, then as parked).
    rejected: AtomicU64,
    /// Wakes the worker when something was appended.
    appended: Notify,
}

#[derive(Default)]
struct Stash {
    msgs: VecDeque<Outgoing>,
    /// The worker has stopped: appends fsync by themselves.
    closed: bool,
}

impl State {
    fn bus_healthy(&self) -> bool {
        self.bus_healthy.load(Ordering::Relaxed)
    }

    fn stashed(&self) -> u64 {
        self.stashed.load(Ordering::Relaxed)
    }

    fn set_stashed(&self, stash: &Stash) {
        self.stashed
            .store(stash.msgs.len() as u64, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Publisher {
    /// Opens the spool in `config.spool_dir` (what a previous run or a crash
    /// left there is replayed first, in order) and starts the worker.
    pub async fn start(
        bus: Arc<dyn EventBus>,
        config: PublisherConfig,
    ) -> io::Result<(Publisher, PublisherHandle)> {
        Self::start_with_ack(bus, config, None).await
    }

    /// [`Publisher::start`], calling `on_ack` with every message the bus
    /// acknowledges (see the module docs, "Acknowledgements").
    pub async fn start_with_ack(
        bus: Arc<dyn EventBus>,
        config: PublisherConfig,
        on_ack: Option<AckHook>,
    ) -> io::Result<(Publisher, PublisherHandle)> {
        let stats = Arc::new(SpoolStats::default());
        let (dir, segment_max, for_open) = (
            config.spool_dir.clone(),
            config.segment_max_bytes,
            Arc::clone(&stats),
        );
        let (spool, rejected) = tokio::task::spawn_blocking(move || {
            let spool = Spool::open(&dir, segment_max, for_open)?;
            let rejected = rejected::count(&dir);
            Ok::<_, io::Error>((spool, rejected))
        })
        .await
        .map_err(io::Error::other)??;
        if !spool.is_empty() {
            info!(
                spool_dir = %config.spool_dir.display(),
                events = spool.events(),
                bytes = spool.bytes(),
                "reopened a non-empty event spool; replaying it before anything new"
            );
        }
        if rejected > 0 {
            warn!(
                spool_dir = %config.spool_dir.display(),
                events = rejected,
                "the spool holds events the bus refused; fix the cause, then run `tollgate-gateway spool replay-rejected`"
            );
        }
        metrics::gauge!("tollgate_gateway_rejected_events").set(rejected as f64);
        let spool = Arc::new(Mutex::new(spool));
        let state = Arc::new(State {
            spool: stats,
            bus_healthy: AtomicBool::new(true),
            stash: Mutex::new(Stash::default()),
            stashed: AtomicU64::new(0),
            rejected: AtomicU64::new(rejected),
            appended: Notify::new(),
        });
        metrics::gauge!("tollgate_gateway_bus_healthy").set(1.0);
        let (stop_tx, stop_rx) = watch::channel(None);
        let worker = worker::Worker::new(
            bus,
            Arc::clone(&spool),
            Arc::clone(&state),
            stop_rx,
            &config,
            on_ack,
        );
        let task = tokio::spawn(worker.run());
        let publisher = Publisher {
            inner: Arc::new(Inner {
                spool: Arc::clone(&spool),
                state: Arc::clone(&state),
                spool_max_bytes: config.spool_max_bytes,
            }),
        };
        Ok((
            publisher,
            PublisherHandle {
                task: Some(task),
                stop: stop_tx,
                spool,
            },
        ))
    }

    /// Appends `msg` to the spool (one `write(2)`, no fsync) and wakes the
    /// worker; never waits for the broker. When this returns the event
    /// survives the process being killed. If the disk refuses the write the
    /// message is held in memory and [`Publisher::spool_full`] turns true.
    pub fn publish(&self, msg: Outgoing) {
        self.inner.append(msg);
        self.inner.state.appended.notify_one();
    }

    /// Events in the spool not yet acknowledged by the bus (in flight, or
    /// waiting for it).
    pub fn spool_depth(&self) -> u64 {
        self.inner.state.spool.events()
    }

    /// Unacknowledged bytes in the spool.
    pub fn spool_bytes(&self) -> u64 {
        self.inner.state.spool.bytes()
    }

    /// The spool is at `spool_max_bytes` (or the disk is refusing writes): the
    /// gateway must refuse new work rather than produce events it may lose.
    pub fn spool_full(&self) -> bool {
        self.spool_bytes() >= self.inner.spool_max_bytes || self.inner.state.stashed() > 0
    }

    /// The last publish attempt reached the bus.
    pub fn bus_healthy(&self) -> bool {
        self.inner.state.bus_healthy()
    }

    /// Calls `f` with every event in the spool not yet acknowledged (what a
    /// previous run left, at start-up): the gateway re-debits the usage it
    /// holds, which billing has not seen. Reads the disk; not for hot paths.
    pub async fn for_each_unacknowledged(
        &self,
        f: impl FnMut(Outgoing) + Send + 'static,
    ) -> io::Result<()> {
        let spool = Arc::clone(&self.inner.spool);
        tokio::task::spawn_blocking(move || lock(&spool).scan(f))
            .await
            .map_err(io::Error::other)?
    }

    /// Events parked in `rejected/rejected.jsonl`, waiting for an operator.
    pub fn rejected_events(&self) -> u64 {
        self.inner.state.rejected.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("spool_depth", &self.spool_depth())
            .field("spool_bytes", &self.spool_bytes())
            .field("bus_healthy", &self.bus_healthy())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The write-ahead append of one event.
    fn append(&self, msg: Outgoing) {
        let closed = {
            let mut stash = lock(&self.state.stash);
            if !stash.closed && !stash.msgs.is_empty() {
                // Older messages are waiting for the disk: queue behind them.
                stash.msgs.push_back(msg);
                self.state.set_stashed(&stash);
                return;
            }
            stash.closed
        };
        let mut spool = lock(&self.spool);
        let result = spool.append(std::slice::from_ref(&msg)).and_then(|()| {
            // After shutdown nobody else will fsync this.
            if closed { spool.sync() } else { Ok(()) }
        });
        drop(spool);
        if result.is_ok() && !self.state.bus_healthy() {
            // Every event passes through the spool; this counts the ones that
            // will wait in it for the bus.
            metrics::counter!("tollgate_gateway_events_spooled_total").increment(1);
        }
        if let Err(e) = result {
            let mut stash = lock(&self.state.stash);
            if stash.closed {
                error!(event_id = %msg.id, subject = %msg.subject, error = %e, "spool write failed after the publisher stopped: event lost");
                metrics::counter!("tollgate_gateway_events_lost_total").increment(1);
            } else {
                error!(event_id = %msg.id, error = %e, "spool write failed; holding the event in memory and reporting spool_full until the disk recovers");
                stash.msgs.push_back(msg);
                self.state.set_stashed(&stash);
            }
        }
    }
}

/// Owns the worker task. Call [`PublisherHandle::shutdown`]; dropping the
/// handle without it stops the worker like a crash (the spool keeps every
/// event; only the stash, if any, is lost).
pub struct PublisherHandle {
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<Option<Instant>>,
    spool: Arc<Mutex<Spool>>,
}

impl PublisherHandle {
    /// Drains: publishes what the spool holds while the bus answers, persists
    /// the cursor, fsyncs the spool, and stops, within `timeout`. A quarter of
    /// the budget (at most 2 s) is kept for the disk.
    pub async fn shutdown(mut self, timeout: Duration) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        let reserve = (timeout / 4).min(Duration::from_secs(2));
        self.stop
            .send_replace(Some(Instant::now() + timeout.saturating_sub(reserve)));
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "event publisher task failed"),
            Err(_) => {
                task.abort();
                error!(
                    ?timeout,
                    "event publisher did not drain in time; the spool keeps what was not sent"
                );
                let spool = Arc::clone(&self.spool);
                let synced = tokio::task::spawn_blocking(move || lock(&spool).close()).await;
                if !matches!(synced, Ok(Ok(()))) {
                    warn!("fsync of the event spool after an aborted drain failed");
                }
            }
        }
    }
}

impl Drop for PublisherHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            if !task.is_finished() {
                warn!(
                    "PublisherHandle dropped without shutdown(): stopping the event publisher like a crash"
                );
            }
            task.abort();
        }
    }
}
