//! The publisher's background task: direct publishing, spooling, replay and
//! the shutdown drain. See the parent module for the ordering and no-loss
//! argument; this file keeps to it mechanically:
//!
//! - while the spool is non-empty, messages from the channel only ever go to
//!   the spool's tail (`append_to_spool`), never to the bus;
//! - the spool cursor only moves past a prefix of a replayed batch that the bus
//!   acknowledged or that was parked as rejected;
//! - messages the disk refused are put back at the front of the stash, which
//!   goes before anything newer the next time the spool is written.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tollgate_schemas::bus::{BusError, BusErrorKind, EventBus, Outgoing, PublishReceipt};
use tracing::{debug, error, info, warn};

use super::spool::Spool;
use super::{AckHook, PublisherConfig, State, lock};

const BACKOFF_MIN: Duration = Duration::from_millis(100);

type Results = Vec<Result<PublishReceipt, BusError>>;

pub(super) struct Worker {
    bus: Arc<dyn EventBus>,
    spool: Arc<Mutex<Spool>>,
    state: Arc<State>,
    rx: mpsc::Receiver<Outgoing>,
    stop: watch::Receiver<Option<Instant>>,
    batch_max: usize,
    publish_timeout: Duration,
    linger: Duration,
    /// The direct-mode batch, kept between batches for its capacity.
    batch: Vec<Outgoing>,
    backoff: Backoff,
    /// Set once shutdown was asked for: bus attempts end at this instant.
    deadline: Option<Instant>,
    /// Every `Publisher` is gone and the channel is empty.
    channel_closed: bool,
    on_ack: Option<AckHook>,
}

impl Worker {
    pub(super) fn new(
        bus: Arc<dyn EventBus>,
        spool: Arc<Mutex<Spool>>,
        state: Arc<State>,
        rx: mpsc::Receiver<Outgoing>,
        stop: watch::Receiver<Option<Instant>>,
        config: &PublisherConfig,
        on_ack: Option<AckHook>,
    ) -> Self {
        Self {
            bus,
            spool,
            state,
            rx,
            stop,
            batch_max: config.batch_max.max(1),
            publish_timeout: config.publish_timeout,
            linger: config.linger,
            batch: Vec::new(),
            backoff: Backoff::new(
                BACKOFF_MIN.min(config.retry_backoff_max),
                config.retry_backoff_max,
            ),
            deadline: None,
            channel_closed: false,
            on_ack,
        }
    }

    pub(super) async fn run(mut self) {
        while !self.stopping() && !self.channel_closed {
            if self.state.stashed() > 0 && !self.flush_stash().await {
                self.pause().await;
            } else if self.spool_empty() {
                self.direct().await;
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

    /// Spool empty: publish what arrives, straight from the channel.
    async fn direct(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        tokio::select! {
            biased;
            d = stop_requested(&mut self.stop) => {
                self.deadline = Some(d);
                self.batch = batch;
                return;
            }
            n = self.rx.recv_many(&mut batch, self.batch_max) => if n == 0 {
                self.channel_closed = true;
                self.batch = batch;
                return;
            }
        }
        if !self.linger.is_zero() && batch.len() < self.batch_max {
            let until = Instant::now() + self.linger;
            while batch.len() < self.batch_max {
                let room = self.batch_max - batch.len();
                match tokio::time::timeout_at(until, self.rx.recv_many(&mut batch, room)).await {
                    Ok(0) => {
                        // Closed: publish what we have; `run` drains after.
                        self.channel_closed = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        self.publish_direct(&mut batch).await;
        self.batch = batch;
    }

    /// Publishes (and empties) `batch`.
    async fn publish_direct(&mut self, batch: &mut Vec<Outgoing>) {
        let results = self.attempt(batch).await;
        let (mut ok, mut retry, mut rejected, mut cause) = (0u64, Vec::new(), Vec::new(), None);
        for (msg, result) in batch.drain(..).zip(results) {
            match result {
                Ok(receipt) => {
                    ok += 1;
                    self.acked(&msg, receipt.position);
                }
                Err(e) if e.is_retryable() => {
                    cause = Some(e);
                    retry.push(msg);
                }
                Err(e) => rejected.push((msg, e.to_string())),
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

    /// Spool non-empty: new messages join its tail; replay one batch from its head.
    async fn replay(&mut self) {
        self.channel_to_spool().await;
        if !self.state.bus_healthy() && !self.probe().await {
            self.pause().await;
            return;
        }
        let batch_max = self.batch_max;
        let entries = match self.blocking(move |s| s.peek(batch_max)).await {
            Some(Ok(entries)) => entries,
            Some(Err(e)) => {
                error!(error = %e, "reading the event spool failed; will retry");
                self.pause().await;
                return;
            }
            None => {
                self.pause().await;
                return;
            }
        };
        if entries.is_empty() {
            if !self.spool_empty() {
                self.pause().await;
            }
            return;
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
                Err(e) if e.is_retryable() => {
                    cause = Some(e);
                    break;
                }
                Err(e) => rejected.push((acked, msg, e.to_string())),
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
        } else {
            self.backoff.reset();
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
                let result = s.append(&all).and_then(|()| s.sync_if_due());
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

    /// Whatever is waiting in the channel goes to the spool's tail.
    async fn channel_to_spool(&mut self) {
        let mut msgs = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(msg) => msgs.push(msg),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.channel_closed = true;
                    break;
                }
            }
        }
        if !msgs.is_empty() {
            self.append_to_spool(msgs).await;
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
            Some((Ok(()), _)) => Ok(()),
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

    /// Backoff wait. Meanwhile new messages go to the spool (so the channel
    /// never fills while the bus is away) and a shutdown ends the wait.
    async fn pause(&mut self) {
        let until = Instant::now() + self.backoff.next();
        let due = self.blocking(Spool::sync_if_due).await;
        if let Some(Err(e)) = due {
            warn!(error = %e, "fsync of the event spool failed");
        }
        loop {
            let mut batch = Vec::new();
            tokio::select! {
                biased;
                d = stop_requested(&mut self.stop) => {
                    self.deadline = Some(d);
                    return;
                }
                () = tokio::time::sleep_until(until) => return,
                n = self.rx.recv_many(&mut batch, self.batch_max), if !self.channel_closed => {
                    if n == 0 {
                        self.channel_closed = true;
                        return;
                    }
                    self.append_to_spool(batch).await;
                }
            }
        }
    }

    /// Shutdown: nothing in memory is left behind.
    async fn drain(&mut self) {
        self.rx.close();
        let mut rest = Vec::new();
        while let Ok(msg) = self.rx.try_recv() {
            rest.push(msg);
        }
        let n = rest.len();
        let mut rest = rest.into_iter();
        loop {
            let mut batch: Vec<Outgoing> = rest.by_ref().take(self.batch_max).collect();
            if batch.is_empty() {
                break;
            }
            let in_time = self.deadline.is_none_or(|d| Instant::now() < d);
            if in_time
                && self.spool_empty()
                && self.state.stashed() == 0
                && self.state.bus_healthy()
            {
                self.publish_direct(&mut batch).await;
            } else {
                self.append_to_spool(batch).await;
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
        if let Some(Err(e)) = self.blocking(Spool::sync).await {
            error!(error = %e, "fsync of the event spool at shutdown failed");
        }
        info!(
            drained = n,
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
