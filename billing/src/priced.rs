//! The "priced up to" marker, the `priced_seq` a gateway trusts.
//!
//! A gateway drops its local debit for every one of its events at a position
//! ≤ the `priced_seq` of a quota snapshot (ARCHITECTURE.md, "Local debit"), so
//! that number must never pass an event billing has not priced: if it did,
//! the event would be counted by neither side. Batches do not complete in
//! stream order: one fails while ClickHouse is down and is retried, one held
//! by a billing that crashed comes back only after `ack_wait`, while later
//! ones succeed. So the marker is not "the highest position priced" but the
//! end of the **contiguous** prefix of handled positions, per lane (one lane
//! on JetStream, one per partition on Kafka; positions of different lanes
//! never compare, see `tollgate_schemas::bus`).
//!
//! A position is *handled* when billing is done with it: a usage event
//! priced (or found already debited), or any message billing skips (request
//! and token-count events, undecodable ones). Billing consumes every event
//! kind for this reason: the positions it sees are then every position of
//! the lane, and a hole can only be a message delivered elsewhere and not yet
//! handled. Holes billing will never see again (messages a previous process
//! handled and committed, messages removed from the stream) are closed by
//! [`Priced::raise`] with the bus's committed floor, which never passes an
//! uncommitted message, and billing commits only what it has handled.
//!
//! Handled positions above a hole are kept as runs (start..=end), so a hole
//! costs memory per run, not per message.

use std::collections::BTreeMap;

use tollgate_schemas::bus::{lane_of, position, seq_of};

/// One lane's handled sequences.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lane {
    /// Every sequence ≤ `floor` is handled.
    floor: u64,
    /// Handled runs above `floor + 1`: start → end (inclusive), disjoint and
    /// never adjacent to each other.
    runs: BTreeMap<u64, u64>,
}

impl Lane {
    fn handle(&mut self, seq: u64) {
        if seq <= self.floor {
            return;
        }
        let (mut start, mut end) = (seq, seq);
        if let Some((&s, &e)) = self.runs.range(..=seq).next_back() {
            if e >= seq {
                return;
            }
            if e + 1 == seq {
                start = s;
            }
        }
        if let Some(e) = self.runs.remove(&(seq + 1)) {
            end = e;
        }
        self.runs.insert(start, end);
        self.absorb();
    }

    fn raise(&mut self, seq: u64) {
        if seq <= self.floor {
            return;
        }
        self.floor = seq;
        self.absorb();
    }

    /// Moves the floor over the runs it reaches and drops those below it.
    fn absorb(&mut self) {
        while let Some((&s, &e)) = self.runs.first_key_value() {
            if s > self.floor + 1 {
                break;
            }
            self.runs.pop_first();
            self.floor = self.floor.max(e);
        }
    }

    fn highest(&self) -> u64 {
        self.runs
            .last_key_value()
            .map_or(self.floor, |(_, &e)| e.max(self.floor))
    }
}

/// Per lane, the contiguous prefix of handled positions (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Priced {
    lanes: BTreeMap<u32, Lane>,
}

impl Priced {
    /// Billing is done with the message at `position`.
    pub fn handled(&mut self, position: u64) {
        let seq = seq_of(position);
        if seq == 0 {
            return;
        }
        self.lanes.entry(lane_of(position)).or_default().handle(seq);
    }

    /// Everything at or below each position of `floors` (indexed by lane, as
    /// `EventBus::committed` gives them) is handled.
    pub fn raise(&mut self, floors: &[u64]) {
        for &p in floors {
            if seq_of(p) > 0 {
                self.lanes.entry(lane_of(p)).or_default().raise(seq_of(p));
            }
        }
    }

    /// The marker of `lane`: every position of it up to here is handled.
    pub fn floor(&self, lane: u32) -> u64 {
        position(lane, self.lanes.get(&lane).map_or(0, |l| l.floor))
    }

    /// Whether some lane has handled positions above a hole.
    pub fn has_hole(&self) -> bool {
        self.lanes.values().any(|l| !l.runs.is_empty())
    }

    /// Positions not yet handled below the highest handled one, all lanes.
    pub fn unhandled_below_highest(&self) -> u64 {
        self.lanes
            .values()
            .map(|l| {
                let handled: u64 = l.runs.iter().map(|(s, e)| e - s + 1).sum();
                l.highest() - l.floor - handled
            })
            .sum()
    }

    /// The highest marker of any lane (for display and the gauge).
    pub fn max_floor(&self) -> u64 {
        self.lanes
            .iter()
            .map(|(&lane, l)| position(lane, l.floor))
            .max()
            .unwrap_or(0)
    }

    /// Whether every lane is handled up to `heads` (indexed by lane).
    pub fn covers(&self, heads: &[u64]) -> bool {
        heads.iter().enumerate().all(|(lane, head)| {
            let lane = u32::try_from(lane).unwrap_or(u32::MAX);
            seq_of(*head) == 0 || self.floor(lane) >= *head
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_the_end_of_the_contiguous_prefix() {
        let mut p = Priced::default();
        assert_eq!(p.floor(0), 0);
        for s in 1..=3 {
            p.handled(s);
        }
        assert_eq!(p.floor(0), 3);
        // A batch 4..=6 fails (ClickHouse down) while 7..=9 succeeds: the
        // marker must stay at 3, below the first unpriced position.
        for s in 7..=9 {
            p.handled(s);
        }
        assert_eq!(p.floor(0), 3);
        assert!(p.has_hole());
        assert_eq!(p.unhandled_below_highest(), 3);
        // The failed batch is retried and completes out of order.
        p.handled(6);
        p.handled(4);
        assert_eq!(p.floor(0), 4);
        p.handled(5);
        assert_eq!(p.floor(0), 9);
        assert!(!p.has_hole());
        // Redelivered duplicates change nothing.
        p.handled(5);
        p.handled(9);
        assert_eq!(p.floor(0), 9);
    }

    #[test]
    fn skipped_kinds_count_as_handled() {
        // Stream: 1 request, 2 usage, 3 token_count, 4 request, 5 usage.
        // Billing handles every kind; the usage at 2 is held by a crashed
        // process and comes back later.
        let mut p = Priced::default();
        p.handled(1);
        for s in [3, 4, 5] {
            p.handled(s);
        }
        assert_eq!(p.floor(0), 1, "usage at 2 not priced yet");
        p.handled(2);
        assert_eq!(p.floor(0), 5);
    }

    #[test]
    fn the_bus_floor_closes_holes_billing_will_never_see() {
        let mut p = Priced::default();
        // A restart: a previous process committed 1..=100; this one sees
        // 120.. first and 101..=119 after ack_wait.
        for s in 120..=130 {
            p.handled(s);
        }
        assert_eq!(p.floor(0), 0);
        p.raise(&[100]);
        assert_eq!(p.floor(0), 100);
        for s in 101..=119 {
            p.handled(s);
        }
        assert_eq!(p.floor(0), 130);
        // A floor below the marker never lowers it.
        p.raise(&[50]);
        assert_eq!(p.floor(0), 130);
        // A floor that passes runs swallows them.
        p.handled(140);
        p.raise(&[145]);
        assert_eq!(p.floor(0), 145);
        assert!(!p.has_hole());
    }

    #[test]
    fn lanes_are_independent() {
        // Kafka: a hole in partition 1 holds back partition 1 only.
        let mut p = Priced::default();
        for s in 1..=5 {
            p.handled(position(0, s));
            p.handled(position(2, s));
        }
        p.handled(position(1, 1));
        p.handled(position(1, 3));
        assert_eq!(p.floor(0), position(0, 5));
        assert_eq!(p.floor(1), position(1, 1));
        assert_eq!(p.floor(2), position(2, 5));
        assert_eq!(p.floor(7), position(7, 0), "an unseen lane has nothing");
        assert!(!p.covers(&[position(0, 5), position(1, 3), position(2, 5)]));
        p.handled(position(1, 2));
        assert!(p.covers(&[position(0, 5), position(1, 3), position(2, 5)]));
        // An empty lane needs nothing.
        assert!(p.covers(&[
            position(0, 5),
            position(1, 3),
            position(2, 5),
            position(3, 0)
        ]));
        p.raise(&[position(0, 2), position(1, 9)]);
        assert_eq!(p.floor(0), position(0, 5));
        assert_eq!(p.floor(1), position(1, 9));
        assert_eq!(p.max_floor(), position(2, 5));
    }

    #[test]
    fn runs_merge_in_any_order() {
        let mut p = Priced::default();
        for s in [10, 8, 12, 9, 11, 3] {
            p.handled(s);
        }
        assert_eq!(p.lanes[&0].runs.len(), 2, "{:?}", p.lanes[&0].runs);
        assert_eq!(p.unhandled_below_highest(), 12 - 6);
        for s in [1, 2, 4, 5, 6, 7] {
            p.handled(s);
        }
        assert_eq!(p.floor(0), 12);
        assert!(p.lanes[&0].runs.is_empty());
    }
}
