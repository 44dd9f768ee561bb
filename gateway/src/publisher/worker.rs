//! The publisher's background task: reading the spool, publishing, moving
//! the cursor, group-commit fsync, and the shutdown drain. See the parent
//! module for the ordering and no-loss argument; this file keeps to it
//! mechanically:
//!
//! - every event is in the spool before the worker sees it; the worker only
//!   reads the spool from its cursor;
//! - the spool cursor only moves past a prefix of a read batch that the bus
//!   acknowledged or that was parked as rejected;
//! - messages the disk refused (the stash) are put back at the front of the
//!   stash, which goes before anything newer the next time the spool is
//!   written.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tollgate_schemas::bus::{BusError, BusErrorKind, EventBus, Outgoing, PublishReceipt};
use tracing::{debug, error, info, warn};

use super::spool::Spool;
use super::{AckHook, PublisherConfig, REPLAY_SCAN, State, lock, rejected};

const BACKOFF_MIN: Duration = Duration::from_millis(100);

type Results = Vec<Result<PublishReceipt, BusError>>;

/// Only an event the bus refuses for what it is goes to `rejected/`; every
/// bus-side condition (unreachable, timed out, stream missing while NATS
/// restarts, misconfiguration) is retried from the spool.
fn refused_for_content(e: &BusError) -> bool {
    e.kind == BusErrorKind::Rejected
}

pub(super) struct Worker {
    bus: Arc<dyn EventBus>,
    spool: Arc<Mutex<Spool>>,
    spool_dir: PathBuf,
    state: Arc<State>,
    stop: watch::Receiver<Option<Instant>>,
    batch_max: usize,
    publish_timeout: Duration,
    linger: Duration,
    sync_interval: Duration,
    backoff: Backoff,
    /// Set once shutdown was asked for: bus attempts end at this instant.
    deadline: Option<Instant>,
    on_ack: Option<AckHook>,
    next_sync: Instant,
    next_scan: Instant,
}

impl Worker {
    pub(super) fn new(
        bus: Arc<dyn EventBus>,
        spool: Arc<Mutex<Spool>>,
        state: Arc<State>,
        stop: watch::Receiver<Option<Instant>>,
        config: &PublisherConfig,
        on_ack: Option<AckHook>,
    ) -> Self {
        let now = Instant::now();
        Self {
            bus,
            spool,
            spool_dir: config.spool_dir.clone(),
            state,
            stop,
            batch_max: config.batch_max.max(1),
            publish_timeout: config.publish_timeout,
            linger: config.linger,
            sync_interval: config.sync_interval.max(Duration::from_millis(1)),
            backoff: Backoff::new(
                BACKOFF_MIN.min(config.retry_backoff_max),
                config.retry_backoff_max,
            ),
            deadline: None,
            on_ack,
            next_sync: now + config.sync_interval,
            // Replay files queued while no gateway ran are taken at once.
            next_scan: now,
        }
    }

    pub(super) async fn run(mut self) {
        while !self.stopping() {
            self.housekeeping().await;
            if self.state.stashed() > 0 && !self.flush_stash().await {
                self.pause().await;
            } else if self.spool_empty() {
                self.idle().await;
            } else {
                self.replay().await;
            }
        }
        self.drain().await;
    }

    fn stopping(&mut self) -> bool {
        if self.deadline.is_none() {
            self.deadline = match self.stop.has_changed() {
                Ok(_) => *self.stop.borrow_and_update(),
                // The handle is gone (it aborts us); stop now all the same.
                Err(_) => Some(Instant::now()),
            };
        }
        self.deadline.is_some()
    }

    fn spool_empty(&self) -> bool {
        self.state.spool.bytes() == 0
    }

    /// Nothing to send: wait for an append (then linger, so one batch carries
    /// the events of several requests), a housekeeping tick, or shutdown.
    async fn idle(&mut self) {
        let tick = self.next_sync.min(self.next_scan);
        tokio::select! {
            biased;
            d = stop_requested(&mut self.stop) => self.deadline = Some(d),
            () = self.state.appended.notified() => {
                if !self.linger.is_zero() {
                    tokio::select! {
                        biased;
                        d = stop_requested(&mut self.stop) => self.deadline = Some(d),
                        () = tokio::time::sleep(self.linger) => {}
                    }
                }
            }
            () = tokio::time::sleep_until(tick) => {}
        }
    }

    /// Group-commit fsync and cursor write when due; replay files queued by
    /// an operator, and the rejected count, every [`REPLAY_SCAN`].
    async fn housekeeping(&mut self) {
        let now = Instant::now();
        if now >= self.next_sync {
            self.next_sync = now + self.sync_interval;
            let spool = Arc::clone(&self.spool);
            let synced = tokio::task::spawn_blocking(move || {
                let unsynced = {
                    let mut s = lock(&spool);
                    s.flush_cursor();
                    s.take_unsynced()
                };
                // The fsync itself runs without the lock: publishers go on.
                unsynced.map(|f| f.sync_data())
            })
            .await;
            if let Ok(Some(Err(e))) = synced {
                warn!(error = %e, "fsync of the event spool failed");
            }
        }
        if now >= self.next_scan {
            self.next_scan = now + REPLAY_SCAN;
            let dir = self.spool_dir.clone();
            let requeued = self
                .blocking(move |s| {
                    let requeued = rejected::requeue(s, &dir);
                    (requeued, rejected::count(&dir))
                })
                .await;
            if let Some((requeued, count)) = requeued {
                match requeued {
                    Ok(0) => {}
                    Ok(n) => info!(
                        events = n,
                        "replaying events an operator queued from rejected/"
                    ),
                    Err(e) => {
                        warn!(error = %e, "could not requeue rejected events for replay; will retry")
                    }
                }
                self.state.rejected.store(count, Ordering::Relaxed);
                metrics::gauge!("tollgate_gateway_rejected_events").set(count as f64);
            }
        }
    }

    /// Publishes (and empties) `batch`: the stash, when the spool is empty.
    async fn publish_direct(&mut self, batch: &mut Vec<Outgoing>) {
        let results = self.attempt(batch).await;
        let (mut ok, mut retry, mut rejected, mut cause) = (0u64, Vec::new(), Vec::new(), None);
        for (msg, result) in batch.drain(..).zip(results) {
            match result {
                Ok(receipt) => {
                    ok += 1;
                    self.acked(&msg, receipt.position);
                }
                Err(e) if refused_for_content(&e) => rejected.push((msg, e.to_string())),
                Err(e) => {
                    cause = Some(e);
                    retry.push(msg);
                }
            }
        }
        metrics::counter!("tollgate_gateway_events_published_total").increment(ok);
        self.set_healthy(cause.is_none());
        if !rejected.is_empty()
            && let Err(unparked) = self.park(rejected).await
        {
            // Keep them: through the spool they come back to `park` later.
            retry.splice(0..0, unparked);
        }
        if !retry.is_empty() {
            if let Some(e) = cause {
                warn!(error = %e, events = retry.len(), "event bus unavailable; spooling events to disk, to replay in order when it is back");
            }
            self.append_to_spool(retry).await;
        }
    }

    /// Spool non-empty: publish one batch from its head. True when the whole
    /// batch is done (acknowledged or parked).
    async fn replay(&mut self) -> bool {
        if !self.state.bus_healthy() && !self.probe().await {
            self.pause().await;
            return false;
        }
        let batch_max = self.batch_max;
        let entries = match self.blocking(move |s| s.peek(batch_max)).await {
            Some(Ok(entries)) => entries,
            Some(Err(e)) => {
                error!(error = %e, "reading the event spool failed; will retry");
                self.pause().await;
                return false;
            }
            None => {
                self.pause().await;
                return false;
            }
        };
        if entries.is_empty() {
            if !self.spool_empty() {
                self.pause().await;
            }
            return false;
        }
        let msgs: Vec<Outgoing> = entries.iter().map(|e| e.msg.clone()).collect();
        let results = self.attempt(&msgs).await;
        let (mut acked, mut ok, mut rejected, mut cause) = (0usize, 0u64, Vec::new(), None);
        for (msg, result) in msgs.into_iter().zip(results) {
            match result {
                Ok(receipt) => {
                    ok += 1;
                    self.acked(&msg, receipt.position);
                }
                Err(e) if refused_for_content(&e) => rejected.push((acked, msg, e.to_string())),
                Err(e) => {
                    cause = Some(e);
                    break;
                }
            }
            acked += 1;
        }
        metrics::counter!("tollgate_gateway_events_published_total").increment(ok);
        let mut retry_later = cause.is_some();
        if let Some(&(first, _, _)) = rejected.first() {
            let items = rejected.into_iter().map(|(_, m, e)| (m, e)).collect();
            if self.park(items).await.is_err() {
                // Not parked: leave them (and what follows) in the spool.
                acked = first;
                retry_later = true;
            }
        }
        if let Some(end) = acked
            .checked_sub(1)
            .and_then(|i| entries.get(i))
            .map(|e| e.end)
        {
            let events = acked as u64;
            self.blocking(move |s| s.commit(end, events)).await;
            debug!(events, "replayed events from the spool");
            if self.spool_empty() {
                info!("event spool drained; publishing directly again");
            }
        }
        self.set_healthy(cause.is_none());
        if let Some(e) = cause {
            warn!(error = %e, "event bus unavailable during spool replay; will retry");
        }
        if retry_later {
            self.pause().await;
            false
        } else {
            self.backoff.reset();
            true
        }
    }

    /// Whether the bus answers, before trying a replay batch against it.
    async fn probe(&mut self) -> bool {
        let (bus, stop, deadline) = (&self.bus, &mut self.stop, self.deadline);
        tokio::select! {
            r = tokio::time::timeout(self.publish_timeout, bus.ready()) => matches!(r, Ok(Ok(()))),
            () = bus_deadline(stop, deadline) => false,
        }
    }

    /// The stash (disk refused it) goes to the spool, or to the bus when the
    /// spool is empty. True when the stash is empty afterwards.
    async fn flush_stash(&mut self) -> bool {
        if self.spool_empty() {
            let mut batch = {
                let mut stash = lock(&self.state.stash);
                let n = stash.msgs.len().min(self.batch_max);
                let batch: Vec<Outgoing> = stash.msgs.drain(..n).collect();
                self.state.set_stashed(&stash);
                batch
            };
            self.publish_direct(&mut batch).await;
        } else {
            self.append_to_spool(Vec::new()).await;
        }
        self.state.stashed() == 0
    }

    /// Appends the stash and then `msgs` to the spool; on failure they all go
    /// back to the front of the stash.
    async fn append_to_spool(&mut self, msgs: Vec<Outgoing>) {
        let mut all: Vec<Outgoing> = {
            let mut stash = lock(&self.state.stash);
            let taken = stash.msgs.drain(..).collect();
            self.state.set_stashed(&stash);
            taken
        };
        all.extend(msgs);
        if all.is_empty() {
            return;
        }
        let n = all.len() as u64;
        let written = self
            .blocking(move |s| {
                let result = s.append(&all);
                (result, all)
            })
            .await;
        match written {
            Some((Ok(()), _)) => {
                metrics::counter!("tollgate_gateway_events_spooled_total").increment(n)
            }
            Some((Err(e), all)) => {
                error!(error = %e, events = n, "event spool write failed; holding events in memory and reporting spool_full until the disk recovers");
                let mut stash = lock(&self.state.stash);
                for msg in all.into_iter().rev() {
                    stash.msgs.push_front(msg);
                }
                self.state.set_stashed(&stash);
            }
            None => {
                error!(events = n, "event spool task failed: events lost");
                metrics::counter!("tollgate_gateway_events_lost_total").increment(n);
            }
        }
    }

    /// Parks events the bus refused for good; gives them back if the disk
    /// would not take them.
    async fn park(&mut self, items: Vec<(Outgoing, String)>) -> Result<(), Vec<Outgoing>> {
        for (msg, e) in &items {
            error!(event_id = %msg.id, subject = %msg.subject, error = %e, "event bus refused an event; parked in the spool's rejected/ directory");
        }
        let n = items.len() as u64;
        metrics::counter!("tollgate_gateway_publish_rejected_total").increment(n);
        match self
            .blocking(move |s| (s.park_rejected(&items), items))
            .await
        {
            Some((Ok(()), _)) => {
                let count = self.state.rejected.fetch_add(n, Ordering::Relaxed) + n;
                metrics::gauge!("tollgate_gateway_rejected_events").set(count as f64);
                Ok(())
            }
            Some((Err(e), items)) => {
                error!(error = %e, events = n, "could not write rejected events to disk; keeping them");
                Err(items.into_iter().map(|(m, _)| m).collect())
            }
            None => Err(Vec::new()),
        }
    }

    /// One `publish_many`, bounded by `publish_timeout` and the shutdown
    /// deadline; always one result per message.
    async fn attempt(&mut self, msgs: &[Outgoing]) -> Results {
        let started = Instant::now();
        let (bus, stop, deadline) = (&self.bus, &mut self.stop, self.deadline);
        let outcome = tokio::select! {
            r = tokio::time::timeout(self.publish_timeout, bus.publish_many(msgs.to_vec())) => {
                r.map_err(|_| format!("publish timed out after {:?}", self.publish_timeout))
            }
            () = bus_deadline(stop, deadline) => Err("shutdown deadline reached".to_owned()),
        };
        metrics::histogram!("tollgate_gateway_publish_seconds")
            .record(started.elapsed().as_secs_f64());
        let (mut results, why) = match outcome {
            Ok(results) => (results, "no result for this message".to_owned()),
            Err(why) => (Vec::new(), why),
        };
        results.truncate(msgs.len());
        while results.len() < msgs.len() {
            results.push(Err(BusError::new(BusErrorKind::Unavailable, &why)));
        }
        results
    }

    /// Backoff wait, keeping the group-commit fsync going; a shutdown ends
    /// the wait.
    async fn pause(&mut self) {
        let until = Instant::now() + self.backoff.next();
        loop {
            self.housekeeping().await;
            let wake = until.min(self.next_sync);
            tokio::select! {
                biased;
                d = stop_requested(&mut self.stop) => {
                    self.deadline = Some(d);
                    return;
                }
                () = tokio::time::sleep_until(wake) => if wake >= until {
                    return;
                }
            }
        }
    }

    /// Shutdown: publish what the spool holds while the bus answers and the
    /// deadline allows; the rest stays in the spool for the next start.
    async fn drain(&mut self) {
        let before = self.state.spool.events();
        while !self.spool_empty()
            && self.state.stashed() == 0
            && self.state.bus_healthy()
            && self.deadline.is_none_or(|d| Instant::now() < d)
        {
            if !self.replay().await {
                break;
            }
        }
        // From here on `publish` appends (and fsyncs) by itself; take what the
        // disk refused so far for one last try.
        lock(&self.state.stash).closed = true;
        self.append_to_spool(Vec::new()).await;
        let lost = {
            let mut stash = lock(&self.state.stash);
            let lost: Vec<Outgoing> = stash.msgs.drain(..).collect();
            self.state.set_stashed(&stash);
            lost
        };
        for msg in &lost {
            error!(event_id = %msg.id, subject = %msg.subject, "event could not be spooled at shutdown: lost");
        }
        metrics::counter!("tollgate_gateway_events_lost_total").increment(lost.len() as u64);
        if let Some(Err(e)) = self.blocking(Spool::close).await {
            error!(error = %e, "fsync of the event spool at shutdown failed");
        }
        info!(
            drained = before.saturating_sub(self.state.spool.events()),
            spool_events = self.state.spool.events(),
            "event publisher stopped"
        );
    }

    fn acked(&self, msg: &Outgoing, position: u64) {
        if let Some(hook) = &self.on_ack {
            hook(msg, position);
        }
    }

    fn set_healthy(&self, healthy: bool) {
        let was = self.state.bus_healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            metrics::gauge!("tollgate_gateway_bus_healthy").set(if healthy { 1.0 } else { 0.0 });
            if healthy {
                info!("event bus reachable again");
            }
        }
    }

    /// Runs `f` on the spool off the async threads (appends, reads, fsyncs).
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Spool) -> R + Send + 'static,
    ) -> Option<R> {
        let spool = Arc::clone(&self.spool);
        match tokio::task::spawn_blocking(move || f(&mut lock(&spool))).await {
            Ok(r) => Some(r),
            Err(e) => {
                error!(error = %e, "event spool task failed");
                None
            }
        }
    }
}

/// Resolves when shutdown is asked for, with the bus deadline.
async fn stop_requested(stop: &mut watch::Receiver<Option<Instant>>) -> Instant {
    match stop.wait_for(Option::is_some).await {
        Ok(deadline) => deadline.unwrap_or_else(Instant::now),
        Err(_) => Instant::now(),
    }
}

/// Resolves at the shutdown deadline (never, if no shutdown is asked for).
async fn bus_deadline(stop: &mut watch::Receiver<Option<Instant>>, known: Option<Instant>) {
    let deadline = match known {
        Some(d) => d,
        None => stop_requested(stop).await,
    };
    tokio::time::sleep_until(deadline).await;
}

struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}
