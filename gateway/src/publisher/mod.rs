//! The gateway's event publisher: a usage event the gateway has produced
//! reaches the bus even if NATS is down for a while (ARCHITECTURE.md,
//! Guarantee 1 "Nothing lost").
//!
//! ```text
//! request tasks ── publish() ──▶ channel ──▶ worker ── publish_many ──▶ EventBus
//!        │ (channel full)                     │  ▲
//!        └──────────▶ spool (disk) ◀──────────┘  └── replay, oldest first
//! ```
//!
//! [`Publisher::publish`] never waits for the broker: it puts the message on a
//! bounded channel, or, when the channel is full, appends it to the on-disk
//! spool itself. One worker task owns the rest:
//!
//! - **Direct mode** (spool empty): take up to `batch_max` messages from the
//!   channel, `publish_many`, repeat. What the bus acknowledged is done. What
//!   failed with a retryable error ([`BusErrorKind::Unavailable`]) is appended
//!   to the spool. What failed for good (`Rejected`, `Config`) is logged with its
//!   event id, counted in `tollgate_gateway_publish_rejected_total` and parked
//!   in `<spool_dir>/rejected/rejected.jsonl` with the error, never dropped.
//! - **Replay mode** (spool non-empty): every new message goes to the spool's
//!   tail, so nothing overtakes what is already spooled. The worker probes the
//!   bus (`ready()`, backoff from 100 ms doubling to `retry_backoff_max`), then
//!   replays the spool from its head in batches, advancing the on-disk cursor
//!   past each acknowledged prefix and deleting drained segments. When the
//!   spool is empty it returns to direct mode.
//!
//! # Order
//!
//! Events reach the bus in the order `publish` was called, with two bounded
//! exceptions: (1) a message that finds the channel full (or closed, during
//! shutdown) is spooled at once, ahead of the up to `channel_capacity` older
//! messages still in the channel and the in-flight batch; (2) within one
//! pipelined batch, a message after a failed one can be acknowledged before it. Spooled messages are replayed
//! strictly in spool order. Consumers never rely on order for correctness
//! (events carry `occurred_at`; the meter deduplicates by id).
//!
//! # Why nothing is lost
//!
//! A message is always in at least one of: the channel, the worker's in-flight
//! batch, the stash (memory, only while the disk refuses writes), the spool
//! file, the rejected file, or the bus (acknowledged). Every
//! transition out of memory happens only after the destination has it: the
//! spool cursor moves only past events the bus acknowledged (or parked), and a
//! segment is deleted only after the cursor has moved past it. Failures in the
//! middle of a batch keep the unacknowledged suffix in the spool. Re-sending
//! is the only failure mode, and it is harmless: JetStream drops a repeated
//! `Nats-Msg-Id` within its duplicate window and the meter deduplicates by
//! event id after that.
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
//! `kill -9` (or OOM, or a panic) loses nothing that was written to the spool:
//! appends are whole lines in one `write(2)`, in the kernel when it returns, and
//! a torn last line is skipped on restart. At risk are the messages that are
//! only in memory: the channel and the in-flight batch. With the bus healthy
//! that is what arrived during one `publish_many` round trip plus the batch's
//! `linger` (together about two milliseconds). The worst case is the moment the bus becomes unreachable:
//! everything produced while the failing attempt waits for its acks, up to
//! `publish_timeout` (default 5 s), is still in memory. Once the worker has seen the failure, new messages reach the
//! spool within a batch.
//!
//! A kernel crash or power loss can additionally lose spool appends not yet
//! fsynced. The spool fsyncs when a segment is sealed (rotation), after a
//! worker append or at a backoff tick once [`SYNC_INTERVAL`] has passed since
//! the last fsync (so unsynced data is at most about
//! `max(SYNC_INTERVAL, retry_backoff_max)` old), and on shutdown.
//!
//! # Bounded, with a small overshoot
//!
//! When the spool holds `spool_max_bytes` or more, [`Publisher::spool_full`] is
//! true and the gateway refuses new work. Publishing still accepts (and spools)
//! every event, so a billing fact is never dropped: the overshoot is the
//! events of requests already admitted plus whatever is in the channel, at most
//! `channel_capacity` events. The `rejected/` files are not counted and not
//! bounded; they only grow on bus-side refusals, which are errors to act on.
//!
//! # Acknowledgements
//!
//! [`Publisher::start_with_ack`] takes an [`AckHook`], called by the worker
//! with every message the bus has acknowledged (published directly, replayed
//! from the spool or flushed at shutdown) and its position in the stream. A
//! duplicate's receipt carries the original's position, so the hook sees the
//! position the event really has. Parked (rejected) messages are never
//! acknowledged. The local quota debit (`crate::quota`) uses it to learn which
//! stream position each of its usage events got.
//!
//! # Shutdown
//!
//! [`PublisherHandle::shutdown`] closes the channel (later `publish` calls go
//! straight to the spool, fsynced), publishes what is in memory if the spool is
//! empty and the bus answers before the deadline, spools the rest, fsyncs and
//! stops, all within the given timeout. Dropping the handle without calling it
//! stops the worker like a crash.

mod spool;
mod worker;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate_schemas::bus::{EventBus, Outgoing};
use tracing::{error, info, warn};

#[cfg(doc)]
use tollgate_schemas::bus::BusErrorKind;

pub use spool::{REJECTED_DIR, SYNC_INTERVAL};
use spool::{Spool, SpoolStats};

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_BATCH_MAX: usize = 256;
pub const DEFAULT_CHANNEL_CAPACITY: usize = 65_536;
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 16 << 20;
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);

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
    /// In-memory channel between `publish` and the worker.
    pub channel_capacity: usize,
    /// Ceiling of the backoff between bus probes while the spool is replayed.
    pub retry_backoff_max: Duration,
    /// A spool segment is sealed (and fsynced) past this size.
    pub segment_max_bytes: u64,
    /// Upper bound on one `publish_many` before its messages count as
    /// unavailable (and are spooled). It is also the worst-case crash window
    /// (see the module docs). The JetStream client times out each ack on its
    /// own, one after the other, so without this bound a batch against a dead
    /// server would take `batch_max` × 5 s.
    pub publish_timeout: Duration,
    /// How long the worker waits for more messages once a batch has started
    /// and is not full (direct mode). One bus round trip, and one wake-up of
    /// the worker and of the bus connection, then carries the events of
    /// several requests instead of one or two: at moderate rates that is most
    /// of the publish cost. It delays the events, never a response, and adds
    /// itself to the crash window (see the module docs). Zero: no wait.
    pub linger: Duration,
}

impl PublisherConfig {
    pub fn new(spool_dir: impl Into<PathBuf>) -> Self {
        Self {
            spool_dir: spool_dir.into(),
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            batch_max: DEFAULT_BATCH_MAX,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            retry_backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
            segment_max_bytes: DEFAULT_SEGMENT_MAX_BYTES,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            linger: DEFAULT_LINGER,
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

/// Hands events to the worker. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Outgoing>,
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
}

#[derive(Default)]
struct Stash {
    msgs: VecDeque<Outgoing>,
    /// The worker has stopped taking from the channel and stash.
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
        let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, segment_max, for_open))
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
        let spool = Arc::new(Mutex::new(spool));
        let state = Arc::new(State {
            spool: stats,
            bus_healthy: AtomicBool::new(true),
            stash: Mutex::new(Stash::default()),
            stashed: AtomicU64::new(0),
        });
        metrics::gauge!("tollgate_gateway_bus_healthy").set(1.0);
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let (stop_tx, stop_rx) = watch::channel(None);
        let worker = worker::Worker::new(
            bus,
            Arc::clone(&spool),
            Arc::clone(&state),
            rx,
            stop_rx,
            &config,
            on_ack,
        );
        let task = tokio::spawn(worker.run());
        let publisher = Publisher {
            inner: Arc::new(Inner {
                tx,
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

    /// Hands `msg` to the worker without waiting for the broker. When the
    /// channel is full (or the worker has stopped) the message is appended to
    /// the spool right here, so it is never dropped; only then can the call
    /// block, briefly, on the spool's lock and one `write(2)`.
    pub fn publish(&self, msg: Outgoing) {
        let msg = match self.inner.tx.try_send(msg) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(msg) | mpsc::error::TrySendError::Closed(msg)) => {
                msg
            }
        };
        self.inner.spill(msg);
    }

    /// Events currently in the spool.
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
    /// The caller-side path to the spool: channel full, or worker stopped.
    fn spill(&self, msg: Outgoing) {
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
        match result {
            Ok(()) => metrics::counter!("tollgate_gateway_events_spooled_total").increment(1),
            Err(e) => {
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
}

/// Owns the worker task. Call [`PublisherHandle::shutdown`]; dropping the
/// handle without it stops the worker like a crash (only what is already in
/// the spool survives).
pub struct PublisherHandle {
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<Option<Instant>>,
    spool: Arc<Mutex<Spool>>,
}

impl PublisherHandle {
    /// Drains: publishes what is in memory (or spools it if the bus is down or
    /// the spool is not empty), fsyncs the spool, and stops, within `timeout`.
    /// A quarter of the budget (at most 2 s) is kept for the disk.
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
                    "event publisher did not drain in time; events still in memory may be lost"
                );
                let spool = Arc::clone(&self.spool);
                let synced = tokio::task::spawn_blocking(move || lock(&spool).sync()).await;
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
