//! A tenant's credit grants and how debits burn them down.
//!
//! Pure and synchronous: no I/O, no clock. Every amount is an exact
//! [`Decimal`] (USD); nothing here rounds.
//!
//! # Rules
//!
//! - **Grants.** A grant has an amount (> 0), a priority (lower burns first,
//!   1 by default), an `effective_at`, an optional `expires_at`. It is *live*
//!   at `t` when `effective_at <= t`, it has no `expires_at` or
//!   `expires_at > t`, and it has not been marked expired. Adding a grant is
//!   idempotent by id: a second grant with the same id is ignored.
//! - **Burn order.** A debit at `t` burns the grants live at `t` in the order
//!   priority ascending, then `expires_at` ascending (no expiry last), then
//!   `effective_at` ascending, then id ascending. A grant is burned only once
//!   every grant before it in that order that is live at `t` is used up.
//! - **Debt.** What no live grant covers becomes debt: the debit is still
//!   fully recorded, so an overspend is never lost. Balance can be negative.
//! - **Debt settlement.** When a grant becomes live while there is debt, the
//!   debt is burned from it first: a 2.00 top-up after an overspend of 0.01
//!   leaves 1.99. [`TenantLedger::add_grant`] settles at once for a grant that
//!   is live at its `created_at`; the service calls
//!   [`TenantLedger::settle_debt`] on a timer for grants that become
//!   effective later.
//! - **Expiry.** At `expires_at` the unburned remainder of a grant expires:
//!   [`TenantLedger::expire_due`] marks it and reports the remainder (a
//!   fully burned grant expires silently). Once marked, a grant is never
//!   burned again, even by a debit dated earlier that arrives late.
//! - **Balance** at `now` = Σ remainder of the grants live at `now` − debt.
//!
//! # Accounting identities
//!
//! These hold after every operation (the property tests check them):
//!
//! ```text
//! Σ grant amounts = Σ burned + Σ expired + Σ remaining (grants not marked expired)
//! Σ debits + unreconciled = Σ burned + debt
//! balance(now) = Σ remaining (grants live at now) − debt
//! ```
//!
//! so when every grant is effective and every due expiry is marked,
//! `balance = Σ grants − Σ debits − Σ expired`. `unreconciled` is zero unless
//! recorded expiries contradict the recorded debits (see
//! [`TenantLedger::apply_expiry`]).
//!
//! # Restart
//!
//! The durable records are grants, debits and expiries; allocations and
//! settlements are derived. [`replay_at`] rebuilds the ledger from them in
//! time order (grants at `effective_at`, debits at their time, expiries at the
//! grant's `expires_at`; ties: grant, then debit, then expiry, then by id and
//! amount), settling debt after the records of each instant (so grants
//! effective at the same instant settle in burn order, as the service's timer
//! does), so the result does not depend on the order the records are read in.
//! A recorded expiry is authoritative: if the replay burned that grant
//! differently from the live run, the recorded remainder is what expires and
//! the difference moves to or from debt.
//!
//! Replay matches the live run exactly when the live run applied its records
//! in that order. It may not have: a debit can arrive after a later one (a
//! late event), and grants effective at one instant are settled one by one as
//! they arrive. Then the two can differ in *which* grant paid. That is
//! reconciled by the grant's recorded expiry, except for a grant that expired
//! fully burned in the live run, which leaves no record: the replay then
//! expires a remainder the live run had burned (at most that grant's amount).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A credit grant, as the admin API creates it and as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub tenant_id: String,
    /// USD, > 0.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Lower burns first.
    #[serde(default = "default_priority")]
    pub priority: u32,
    pub effective_at: DateTime<Utc>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub note: String,
}

/// The priority of a grant created without one.
pub fn default_priority() -> u32 {
    1
}

/// At most this many decimal places in a grant amount: the scale of every
/// money column in ClickHouse.
const MAX_SCALE: u32 = tollgate_schemas::money::CH_SCALE;

impl Grant {
    /// What the admin API checks before accepting a grant: a non-empty id, an
    /// amount > 0 with at most 12 decimal places, an expiry (if any) after
    /// `effective_at`.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("grant id is empty".into());
        }
        if self.amount <= Decimal::ZERO {
            return Err(format!("amount {} is not > 0", self.amount));
        }
        if self.amount.normalize().scale() > MAX_SCALE {
            return Err(format!(
                "amount {} has more than {MAX_SCALE} decimal places",
                self.amount
            ));
        }
        if let Some(exp) = self.expires_at
            && exp <= self.effective_at
        {
            return Err(format!(
                "expires_at {exp} is not after effective_at {}",
                self.effective_at
            ));
        }
        Ok(())
    }

    /// Live at `t` by its dates (ignores whether it has been marked expired).
    fn dated_live_at(&self, t: DateTime<Utc>) -> bool {
        self.effective_at <= t && self.expires_at.is_none_or(|e| e > t)
    }
}

/// Where part of a debit (or of a debt settlement) went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The grant burned; `None` = covered by no grant (debt).
    pub grant_id: Option<String>,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// The unburned remainder of a grant, expired at its `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub grant_id: String,
    /// > 0.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// The grant's `expires_at`.
    pub at: DateTime<Utc>,
}

/// A grant with how much of it is burned, expired and left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantView {
    #[serde(flatten)]
    pub grant: Grant,
    /// Burned by debits and debt settlements.
    #[serde(with = "rust_decimal::serde::str")]
    pub burned: Decimal,
    /// The remainder that expired; `None` while not expired.
    #[serde(with = "rust_decimal::serde::str_option")]
    pub expired: Option<Decimal>,
    /// `amount − burned − expired`: zero once expired; for a grant not yet
    /// effective, what it will bring.
    #[serde(with = "rust_decimal::serde::str")]
    pub remaining: Decimal,
}

#[derive(Debug, Clone)]
struct Slot {
    grant: Grant,
    burned: Decimal,
    expired: Option<Decimal>,
}

impl Slot {
    fn remaining(&self) -> Decimal {
        self.grant.amount - self.burned - self.expired.unwrap_or(Decimal::ZERO)
    }

    fn live_at(&self, t: DateTime<Utc>) -> bool {
        self.expired.is_none() && self.grant.dated_live_at(t)
    }
}

/// Burn order: priority, then expiry (none last), then effective_at, then id.
type BurnKey<'a> = (u32, bool, Option<DateTime<Utc>>, DateTime<Utc>, &'a str);

fn burn_key(g: &Grant) -> BurnKey<'_> {
    (
        g.priority,
        g.expires_at.is_none(),
        g.expires_at,
        g.effective_at,
        g.id.as_str(),
    )
}

/// One tenant's grants, debt and totals. See the module doc for the rules.
#[derive(Debug, Clone, Default)]
pub struct TenantLedger {
    /// Kept sorted in burn order.
    slots: Vec<Slot>,
    debt: Decimal,
    total_debited: Decimal,
    unreconciled: Decimal,
}

impl TenantLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a grant (idempotent by id: a second add of the same id is a
    /// no-op, returns false; a grant whose amount is not > 0 is refused the
    /// same way). A grant live at its `created_at` settles debt at once.
    pub fn add_grant(&mut self, g: Grant) -> bool {
        let created_at = g.created_at;
        let live_at_once = g.dated_live_at(created_at);
        if !self.insert(g) {
            return false;
        }
        if live_at_once {
            self.settle_debt(created_at);
        }
        true
    }

    fn insert(&mut self, g: Grant) -> bool {
        if g.amount <= Decimal::ZERO || self.slots.iter().any(|s| s.grant.id == g.id) {
            return false;
        }
        let at = self
            .slots
            .partition_point(|s| burn_key(&s.grant) < burn_key(&g));
        self.slots.insert(
            at,
            Slot {
                grant: g,
                burned: Decimal::ZERO,
                expired: None,
            },
        );
        true
    }

    /// Burns `amount` (> 0) at time `at` from the grants live at `at`, in
    /// burn order; what no grant covers becomes debt. Returns the allocation,
    /// which sums exactly to `amount` (an amount ≤ 0 is ignored: empty).
    pub fn debit(&mut self, amount: Decimal, at: DateTime<Utc>) -> Vec<Allocation> {
        if amount <= Decimal::ZERO {
            return Vec::new();
        }
        self.total_debited += amount;
        let (mut out, left) = self.burn(amount, at);
        if left > Decimal::ZERO {
            self.debt += left;
            out.push(Allocation {
                grant_id: None,
                amount: left.normalize(),
            });
        }
        out
    }

    /// Burns up to `amount` from grants live at `at`; returns the allocations
    /// and what is left uncovered.
    fn burn(&mut self, amount: Decimal, at: DateTime<Utc>) -> (Vec<Allocation>, Decimal) {
        let mut left = amount;
        let mut out = Vec::new();
        for s in &mut self.slots {
            if left <= Decimal::ZERO {
                break;
            }
            if !s.live_at(at) {
                continue;
            }
            let take = s.remaining().min(left);
            if take <= Decimal::ZERO {
                continue;
            }
            s.burned += take;
            left -= take;
            out.push(Allocation {
                grant_id: Some(s.grant.id.clone()),
                amount: take.normalize(),
            });
        }
        (out, left)
    }

    /// Marks every grant with `expires_at <= now` that is not marked yet as
    /// expired, with its remainder. Returns the expiries with a remainder > 0
    /// (a fully burned grant expires silently), ordered by time then grant id.
    /// Idempotent.
    pub fn expire_due(&mut self, now: DateTime<Utc>) -> Vec<Expiry> {
        let mut out = Vec::new();
        for s in &mut self.slots {
            let Some(at) = s.grant.expires_at else {
                continue;
            };
            if s.expired.is_some() || at > now {
                continue;
            }
            let rem = s.remaining();
            s.expired = Some(rem);
            if rem > Decimal::ZERO {
                out.push(Expiry {
                    grant_id: s.grant.id.clone(),
                    amount: rem.normalize(),
                    at,
                });
            }
        }
        out.sort_by(|a, b| (a.at, &a.grant_id).cmp(&(b.at, &b.grant_id)));
        out
    }

    /// Replays a recorded expiry (on restart): the grant is marked expired
    /// with exactly `amount` (clamped to `0..=grant amount`) expired, and
    /// `amount − burned` of it taken as burned. The recorded amount wins over
    /// the simulated remainder; the difference is reconciled so that every
    /// debit stays accounted for:
    ///
    /// - the record says less was burned than simulated: the surplus burn
    ///   goes back to debt (settled from other grants by the next
    ///   [`settle_debt`](Self::settle_debt));
    /// - the record says more was burned: that much of the debits was
    ///   covered by this grant, so it comes off the debt first, then is
    ///   given back to other unexpired grants (last in burn order first);
    ///   anything still left means the records contradict each other and is
    ///   counted in [`unreconciled`](Self::unreconciled).
    ///
    /// Unknown grant ids are ignored. Replaying the same expiry twice is a
    /// no-op.
    pub fn apply_expiry(&mut self, grant_id: &str, amount: Decimal) {
        let Some(idx) = self.slots.iter().position(|s| s.grant.id == grant_id) else {
            return;
        };
        let slot = &mut self.slots[idx];
        let expired = amount.max(Decimal::ZERO).min(slot.grant.amount);
        let burned = slot.grant.amount - expired;
        let delta = burned - slot.burned;
        slot.burned = burned;
        slot.expired = Some(expired);
        if delta < Decimal::ZERO {
            self.debt -= delta;
        } else if delta > Decimal::ZERO {
            let from_debt = self.debt.min(delta);
            self.debt -= from_debt;
            let mut excess = delta - from_debt;
            for (i, s) in self.slots.iter_mut().enumerate().rev() {
                if excess <= Decimal::ZERO {
                    break;
                }
                if i == idx || s.expired.is_some() {
                    continue;
                }
                let back = s.burned.min(excess);
                s.burned -= back;
                excess -= back;
            }
            self.unreconciled += excess;
        }
    }

    /// Settles debt from the grants live at `now`, in burn order. Returns the
    /// allocations made (all with `grant_id` set; they sum to the debt
    /// settled).
    pub fn settle_debt(&mut self, now: DateTime<Utc>) -> Vec<Allocation> {
        if self.debt <= Decimal::ZERO {
            return Vec::new();
        }
        let (out, left) = self.burn(self.debt, now);
        self.debt = left;
        out
    }

    /// Σ remainder of the grants live at `now` − debt. Negative after an
    /// overspend.
    pub fn balance(&self, now: DateTime<Utc>) -> Decimal {
        self.slots
            .iter()
            .filter(|s| s.live_at(now))
            .map(Slot::remaining)
            .sum::<Decimal>()
            - self.debt
    }

    /// Σ amount of the grants live at `now`: what warning thresholds are
    /// fractions of.
    pub fn live_granted(&self, now: DateTime<Utc>) -> Decimal {
        self.slots
            .iter()
            .filter(|s| s.live_at(now))
            .map(|s| s.grant.amount)
            .sum()
    }

    /// Debits not covered by any grant yet.
    pub fn debt(&self) -> Decimal {
        self.debt
    }

    /// Σ of every debit amount.
    pub fn total_debited(&self) -> Decimal {
        self.total_debited
    }

    /// Burn that recorded expiries claim and no debit explains: zero unless
    /// the durable records contradict each other.
    pub fn unreconciled(&self) -> Decimal {
        self.unreconciled
    }

    /// Every grant, in burn order, with what is burned, expired and left.
    pub fn grants(&self) -> Vec<GrantView> {
        self.slots
            .iter()
            .map(|s| GrantView {
                grant: s.grant.clone(),
                burned: s.burned.normalize(),
                expired: s.expired.map(|e| e.normalize()),
                remaining: s.remaining().normalize(),
            })
            .collect()
    }
}

/// Rebuilds a ledger from durable records, settling debt after every record
/// as of that record's time. Use it when every grant is already effective;
/// on a restart, when a grant may still be in the future, use [`replay_at`]
/// (this function would settle debt from such a grant ahead of time).
pub fn replay(
    grants: Vec<Grant>,
    debits: Vec<(DateTime<Utc>, Decimal)>,
    expiries: Vec<(String, Decimal)>,
) -> TenantLedger {
    replay_inner(grants, debits, expiries, None)
}

/// Rebuilds a ledger from durable records as of `now` (module doc,
/// "Restart"): debt is settled after each record dated at or before `now`,
/// so a grant not yet effective at `now` settles nothing until the service's
/// [`TenantLedger::settle_debt`] timer reaches it. Deterministic: the result
/// does not depend on the order of the inputs. Call
/// [`TenantLedger::expire_due`] afterwards to expire (and record) what fell
/// due while the service was down.
pub fn replay_at(
    grants: Vec<Grant>,
    debits: Vec<(DateTime<Utc>, Decimal)>,
    expiries: Vec<(String, Decimal)>,
    now: DateTime<Utc>,
) -> TenantLedger {
    replay_inner(grants, debits, expiries, Some(now))
}

enum Record {
    Grant(Grant),
    Debit(Decimal),
    Expiry(String, Decimal),
}

fn replay_inner(
    mut grants: Vec<Grant>,
    debits: Vec<(DateTime<Utc>, Decimal)>,
    expiries: Vec<(String, Decimal)>,
    now: Option<DateTime<Utc>>,
) -> TenantLedger {
    // A total order on grants, so duplicates of an id resolve the same way
    // whatever order they were read in: the first one wins.
    grants.sort_by(|a, b| grant_order(a).cmp(&grant_order(b)));
    let mut expires_at: BTreeMap<&str, Option<DateTime<Utc>>> = BTreeMap::new();
    for g in grants.iter().filter(|g| g.amount > Decimal::ZERO) {
        expires_at.entry(g.id.as_str()).or_insert(g.expires_at);
    }
    // (time, kind: grant 0 < debit 1 < expiry 2, id, amount, record)
    let mut records: Vec<(DateTime<Utc>, u8, String, Decimal, Record)> = Vec::new();
    for (id, amount) in expiries {
        let Some(at) = expires_at.get(id.as_str()) else {
            continue; // no such grant
        };
        // An expiry of a grant without an expiry date: inconsistent, so last.
        let at = at.unwrap_or(DateTime::<Utc>::MAX_UTC);
        records.push((at, 2, id.clone(), amount, Record::Expiry(id, amount)));
    }
    records.extend(
        debits
            .into_iter()
            .map(|(at, amount)| (at, 1, String::new(), amount, Record::Debit(amount))),
    );
    // Grants are already in their final relative order; a stable sort keeps it.
    records.extend(
        grants
            .into_iter()
            .map(|g| (g.effective_at, 0, g.id.clone(), g.amount, Record::Grant(g))),
    );
    records.sort_by(|a, b| (a.0, a.1, &a.2, a.3).cmp(&(b.0, b.1, &b.2, b.3)));

    let mut ledger = TenantLedger::new();
    let mut records = records.into_iter().peekable();
    while let Some((at, kind, _, _, record)) = records.next() {
        match record {
            Record::Grant(g) => {
                ledger.insert(g);
            }
            Record::Debit(amount) => {
                ledger.debit(amount, at);
            }
            Record::Expiry(id, amount) => ledger.apply_expiry(&id, amount),
        }
        // Settle once the records of this time and kind are all in, so that
        // grants effective at the same instant settle in burn order.
        let group_done = records
            .peek()
            .is_none_or(|next| (next.0, next.1) != (at, kind));
        if group_done && now.is_none_or(|now| at <= now) {
            ledger.settle_debt(at);
        }
    }
    ledger
}

type GrantOrder<'a> = (
    DateTime<Utc>,
    &'a str,
    Decimal,
    u32,
    bool,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    &'a str,
    &'a str,
);

fn grant_order(g: &Grant) -> GrantOrder<'_> {
    (
        g.effective_at,
        g.id.as_str(),
        g.amount,
        g.priority,
        g.expires_at.is_none(),
        g.expires_at,
        g.created_at,
        g.tenant_id.as_str(),
        g.note.as_str(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use chrono::Duration;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn t(minutes: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_767_225_600, 0).unwrap() + Duration::minutes(minutes)
    }

    fn grant(id: &str, amount: &str, priority: u32, eff: i64, exp: Option<i64>) -> Grant {
        Grant {
            id: id.into(),
            tenant_id: "acme".into(),
            amount: d(amount),
            priority,
            effective_at: t(eff),
            expires_at: exp.map(t),
            created_at: t(eff),
            note: String::new(),
        }
    }

    fn alloc(id: Option<&str>, amount: &str) -> Allocation {
        Allocation {
            grant_id: id.map(str::to_string),
            amount: d(amount),
        }
    }

    fn view(l: &TenantLedger, id: &str) -> GrantView {
        l.grants().into_iter().find(|v| v.grant.id == id).unwrap()
    }

    #[test]
    fn top_up_after_overspend_settles_the_debt_first() {
        let mut l = TenantLedger::new();
        assert!(l.add_grant(grant("g1", "1.00", 1, 0, None)));
        assert_eq!(
            l.debit(d("1.01"), t(1)),
            vec![alloc(Some("g1"), "1"), alloc(None, "0.01")]
        );
        assert_eq!(l.balance(t(1)), d("-0.01"));
        assert_eq!(l.debt(), d("0.01"));
        assert!(l.add_grant(grant("g2", "2.00", 1, 2, None)));
        assert_eq!(l.debt(), Decimal::ZERO);
        assert_eq!(l.balance(t(2)), d("1.99"));
        assert_eq!(view(&l, "g2").remaining, d("1.99"));
        assert_eq!(view(&l, "g2").burned, d("0.01"));
        assert_eq!(l.total_debited(), d("1.01"));
    }

    #[test]
    fn burn_order_is_priority_then_expiry_then_effective_then_id() {
        let mut l = TenantLedger::new();
        l.add_grant(grant("z-no-expiry", "1", 1, 0, None));
        l.add_grant(grant("y-late-expiry", "1", 1, 0, Some(100)));
        l.add_grant(grant("x-early-expiry", "1", 1, 0, Some(50)));
        l.add_grant(grant("w-prio-2", "1", 2, 0, Some(10)));
        l.add_grant(grant("b-later", "1", 1, 1, None));
        l.add_grant(grant("a-later", "1", 1, 1, None));
        let order: Vec<String> = l.grants().into_iter().map(|v| v.grant.id).collect();
        assert_eq!(
            order,
            [
                "x-early-expiry",
                "y-late-expiry",
                "z-no-expiry",
                "a-later",
                "b-later",
                "w-prio-2"
            ]
        );
        let a = l.debit(d("5.5"), t(2));
        assert_eq!(
            a,
            vec![
                alloc(Some("x-early-expiry"), "1"),
                alloc(Some("y-late-expiry"), "1"),
                alloc(Some("z-no-expiry"), "1"),
                alloc(Some("a-later"), "1"),
                alloc(Some("b-later"), "1"),
                alloc(Some("w-prio-2"), "0.5"),
            ]
        );
        assert_eq!(l.balance(t(2)), d("0.5"));
    }

    #[test]
    fn only_live_grants_burn() {
        let mut l = TenantLedger::new();
        l.add_grant(grant("future", "5", 0, 10, None));
        l.add_grant(grant("expiring", "5", 0, 0, Some(5)));
        l.add_grant(grant("plain", "5", 1, 0, None));
        // At 5 "expiring" is no longer live (expires_at <= at), even unmarked.
        assert_eq!(l.debit(d("1"), t(5)), vec![alloc(Some("plain"), "1")]);
        assert_eq!(l.balance(t(5)), d("4"));
        assert_eq!(l.live_granted(t(5)), d("5"));
        // Before 5 it is, and it comes first.
        assert_eq!(l.debit(d("1"), t(4)), vec![alloc(Some("expiring"), "1")]);
        assert_eq!(l.live_granted(t(4)), d("10"));
        assert_eq!(
            l.expire_due(t(6)),
            vec![Expiry {
                grant_id: "expiring".into(),
                amount: d("4"),
                at: t(5)
            }]
        );
        // A late debit dated before the expiry no longer burns the marked grant.
        assert_eq!(l.debit(d("1"), t(4)), vec![alloc(Some("plain"), "1")]);
        // The future grant burns once effective.
        assert_eq!(l.debit(d("1"), t(10)), vec![alloc(Some("future"), "1")]);
        assert_eq!(l.balance(t(10)), d("7"));
        assert_eq!(l.live_granted(t(10)), d("10"));
    }

    #[test]
    fn expiry_reports_remainders_once_and_full_burns_silently() {
        let mut l = TenantLedger::new();
        l.add_grant(grant("a", "2", 0, 0, Some(10)));
        l.add_grant(grant("b", "1", 0, 0, Some(5)));
        l.debit(d("1.5"), t(1)); // b 1, a 0.5
        assert_eq!(l.expire_due(t(4)), vec![]);
        assert_eq!(l.expire_due(t(10)).len(), 1); // b was fully burned: silent
        assert_eq!(view(&l, "b").expired, Some(Decimal::ZERO));
        assert_eq!(view(&l, "a").expired, Some(d("1.5")));
        assert_eq!(view(&l, "a").remaining, Decimal::ZERO);
        assert_eq!(l.expire_due(t(20)), vec![]);
        assert_eq!(l.balance(t(20)), Decimal::ZERO);
    }

    #[test]
    fn a_future_grant_settles_debt_on_the_timer_not_before() {
        let mut l = TenantLedger::new();
        l.debit(d("3"), t(0));
        let mut g = grant("next-month", "10", 1, 10, None);
        g.created_at = t(1);
        assert!(l.add_grant(g));
        assert_eq!(l.debt(), d("3"));
        assert_eq!(l.balance(t(5)), d("-3"));
        assert_eq!(l.settle_debt(t(5)), vec![]);
        assert_eq!(l.settle_debt(t(10)), vec![alloc(Some("next-month"), "3")]);
        assert_eq!(l.balance(t(10)), d("7"));
        assert_eq!(l.settle_debt(t(11)), vec![]);
    }

    #[test]
    fn add_grant_is_idempotent_by_id_and_refuses_non_positive_amounts() {
        let mut l = TenantLedger::new();
        assert!(l.add_grant(grant("g", "1", 1, 0, None)));
        assert!(!l.add_grant(grant("g", "100", 0, 0, None)));
        assert!(!l.add_grant(grant("zero", "0", 1, 0, None)));
        assert!(!l.add_grant(grant("neg", "-1", 1, 0, None)));
        assert_eq!(l.grants().len(), 1);
        assert_eq!(l.balance(t(0)), d("1"));
        assert!(l.debit(Decimal::ZERO, t(0)).is_empty());
        assert!(l.debit(d("-1"), t(0)).is_empty());
        assert_eq!(l.total_debited(), Decimal::ZERO);
    }

    #[test]
    fn grant_validation() {
        assert!(grant("g", "1.5", 1, 0, Some(1)).validate().is_ok());
        assert!(grant("", "1", 1, 0, None).validate().is_err());
        assert!(grant("g", "0", 1, 0, None).validate().is_err());
        assert!(
            grant("g", "0.0000000000001", 1, 0, None)
                .validate()
                .is_err()
        );
        assert!(grant("g", "1", 1, 5, Some(5)).validate().is_err());
    }

    #[test]
    fn recorded_expiry_wins_and_the_difference_moves_to_or_from_debt() {
        // Simulation burned more than the record says: the surplus is debt
        // again, and settles from the other grant.
        let mut l = TenantLedger::new();
        l.add_grant(grant("a", "2", 0, 0, Some(10)));
        l.add_grant(grant("b", "5", 1, 0, None));
        l.debit(d("1.5"), t(1));
        l.apply_expiry("a", d("1"));
        assert_eq!(view(&l, "a").burned, d("1"));
        assert_eq!(view(&l, "a").expired, Some(d("1")));
        assert_eq!(l.debt(), d("0.5"));
        assert_eq!(l.settle_debt(t(10)), vec![alloc(Some("b"), "0.5")]);
        assert_eq!(l.balance(t(10)), d("4.5"));
        // Idempotent.
        l.apply_expiry("a", d("1"));
        assert_eq!(l.debt(), Decimal::ZERO);
        assert_eq!(l.balance(t(10)), d("4.5"));

        // Simulation burned less than the record says: debt first, then the
        // other grant's burn is given back.
        let mut l = TenantLedger::new();
        l.add_grant(grant("a", "2", 1, 0, Some(10)));
        l.add_grant(grant("b", "5", 0, 0, None));
        l.debit(d("6"), t(1)); // b 5, a 1
        l.debit(d("1.5"), t(2)); // a 1, debt 0.5
        assert_eq!(l.debt(), d("0.5"));
        // (the live run burned a for 2 - 0 = 2, simulated 2: no change)
        l.apply_expiry("a", Decimal::ZERO);
        assert_eq!(l.debt(), d("0.5"));
        let mut l2 = TenantLedger::new();
        l2.add_grant(grant("a", "2", 1, 0, Some(10)));
        l2.add_grant(grant("b", "5", 0, 0, None));
        l2.debit(d("3"), t(1)); // b 3
        l2.apply_expiry("a", d("0.5")); // record: a burned 1.5
        assert_eq!(view(&l2, "b").burned, d("1.5"));
        assert_eq!(l2.balance(t(10)), d("3.5"));
        assert_eq!(l2.unreconciled(), Decimal::ZERO);
        // A record that no debit can explain is counted, not hidden.
        let mut l3 = TenantLedger::new();
        l3.add_grant(grant("a", "2", 1, 0, Some(10)));
        l3.apply_expiry("a", d("0.5"));
        assert_eq!(l3.unreconciled(), d("1.5"));
        l3.apply_expiry("nope", d("1"));
        assert_eq!(l3.grants().len(), 1);
    }

    #[test]
    fn replay_rebuilds_from_records() {
        let grants = vec![
            grant("a", "1.00", 1, 0, Some(10)),
            grant("b", "2.00", 1, 20, None),
        ];
        let debits = vec![(t(5), d("0.25")), (t(15), d("0.5")), (t(1), d("0.25"))];
        let expiries = vec![("a".to_string(), d("0.5"))];
        let l = replay(grants.clone(), debits.clone(), expiries.clone());
        assert_eq!(view(&l, "a").expired, Some(d("0.5")));
        assert_eq!(view(&l, "b").burned, d("0.5"));
        assert_eq!(l.balance(t(20)), d("1.5"));
        // As of 16, b is not effective yet: the debt stays.
        let at16 = replay_at(grants, debits, expiries, t(16));
        assert_eq!(at16.debt(), d("0.5"));
        assert_eq!(at16.balance(t(16)), d("-0.5"));
    }

    #[test]
    fn serde_shapes() {
        let g: Grant = serde_json::from_str(
            r#"{"id":"g","tenant_id":"acme","amount":"2.50","effective_at":"2026-01-01T00:00:00Z","created_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(g.priority, 1);
        assert_eq!(g.expires_at, None);
        assert_eq!(g.amount, d("2.5"));
        let mut l = TenantLedger::new();
        l.add_grant(g);
        l.debit(d("0.5"), t(1));
        let v = serde_json::to_value(&l.grants()[0]).unwrap();
        assert_eq!(v["id"], "g");
        assert_eq!(v["amount"], "2.50");
        assert_eq!(v["burned"], "0.5");
        assert_eq!(v["remaining"], "2");
        assert_eq!(v["expired"], serde_json::Value::Null);
        let a = serde_json::to_value(alloc(Some("g"), "0.5")).unwrap();
        assert_eq!(a["amount"], "0.5");
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    enum Op {
        Advance(i64),
        Grant {
            milli: i64,
            priority: u32,
            delay: i64,
            life: Option<i64>,
        },
        Debit {
            milli: i64,
            late: i64,
        },
        Expire,
        Settle,
        ApplyExpiry {
            pick: usize,
            milli: i64,
        },
    }

    fn op(future: bool, late: bool, apply: bool) -> impl Strategy<Value = Op> {
        let max_delay: i64 = if future { 3 } else { 0 };
        let max_late: i64 = if late { 3 } else { 0 };
        prop_oneof![
            2 => (1i64..=3).prop_map(Op::Advance),
            3 => (1i64..=5000, 0u32..=2, 0..=max_delay, proptest::option::of(1i64..=8))
                .prop_map(|(milli, priority, delay, life)| Op::Grant { milli, priority, delay, life }),
            4 => (1i64..=3000, 0..=max_late).prop_map(|(milli, late)| Op::Debit { milli, late }),
            1 => Just(Op::Expire),
            1 => Just(Op::Settle),
            (if apply { 1 } else { 0 }) => (0usize..16, 0i64..=6000)
                .prop_map(|(pick, milli)| Op::ApplyExpiry { pick, milli }),
        ]
    }

    fn ops(future: bool, late: bool, apply: bool) -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(op(future, late, apply), 0..60)
    }

    /// The durable records of a live run, and where it ended.
    #[derive(Default)]
    struct Run {
        now: i64,
        grants: Vec<Grant>,
        debits: Vec<(DateTime<Utc>, Decimal)>,
        expiries: Vec<(String, Decimal)>,
    }

    /// Applies `ops` as the service would, checking `check` after each op.
    fn run(
        ops: &[Op],
        mut check: impl FnMut(&TenantLedger, &Op, DateTime<Utc>),
    ) -> (TenantLedger, Run) {
        let mut l = TenantLedger::new();
        let mut r = Run::default();
        for (i, op) in ops.iter().enumerate() {
            let now = t(r.now);
            match *op {
                Op::Advance(m) => {
                    // The service's timer: debt settles from a grant as soon
                    // as it becomes effective (grants here start on a minute).
                    for _ in 0..m {
                        r.now += 1;
                        l.settle_debt(t(r.now));
                    }
                }
                Op::Grant {
                    milli,
                    priority,
                    delay,
                    life,
                } => {
                    let g = Grant {
                        id: format!("g{i:02}"),
                        tenant_id: "acme".into(),
                        amount: Decimal::new(milli, 3),
                        priority,
                        effective_at: t(r.now + delay),
                        expires_at: life.map(|life| t(r.now + delay + life)),
                        created_at: now,
                        note: String::new(),
                    };
                    assert!(l.add_grant(g.clone()));
                    r.grants.push(g);
                }
                Op::Debit { milli, late } => {
                    let amount = Decimal::new(milli, 3);
                    let at = t(r.now - late);
                    let before = l.clone();
                    let allocs = l.debit(amount, at);
                    assert_eq!(allocs.iter().map(|a| a.amount).sum::<Decimal>(), amount);
                    check_burn_order(&before, &l, &allocs, at);
                    r.debits.push((at, amount));
                }
                Op::Expire => {
                    for e in l.expire_due(now) {
                        assert!(e.amount > Decimal::ZERO);
                        assert!(e.at <= now);
                        r.expiries.push((e.grant_id, e.amount));
                    }
                    assert!(l.expire_due(now).is_empty());
                }
                Op::Settle => {
                    let debt = l.debt();
                    let allocs = l.settle_debt(now);
                    assert!(allocs.iter().all(|a| a.grant_id.is_some()));
                    assert_eq!(
                        allocs.iter().map(|a| a.amount).sum::<Decimal>(),
                        debt - l.debt()
                    );
                }
                Op::ApplyExpiry { pick, milli } => {
                    if let Some(g) = r.grants.get(pick) {
                        l.apply_expiry(&g.id.clone(), Decimal::new(milli, 3));
                    }
                }
            }
            check(&l, op, t(r.now));
        }
        (l, r)
    }

    /// No debit burns a grant while a grant earlier in burn order, live at
    /// the debit's time, still has a remainder; debt only when none has.
    fn check_burn_order(
        before: &TenantLedger,
        after: &TenantLedger,
        allocs: &[Allocation],
        at: DateTime<Utc>,
    ) {
        let live: Vec<bool> = before.slots.iter().map(|s| s.live_at(at)).collect();
        let views = after.grants();
        let mut last = None;
        for a in allocs {
            let pos = match &a.grant_id {
                Some(id) => views.iter().position(|v| &v.grant.id == id).unwrap(),
                None => views.len(),
            };
            assert!(pos < views.len() || a.amount > Decimal::ZERO);
            if pos < views.len() {
                assert!(live[pos], "burned a grant not live at the debit's time");
            }
            assert!(last < Some(pos), "allocations out of burn order");
            last = Some(pos);
            for (i, v) in views.iter().enumerate().take(pos) {
                if live[i] {
                    assert_eq!(v.remaining, Decimal::ZERO, "skipped {}", v.grant.id);
                }
            }
        }
    }

    fn check_identities(l: &TenantLedger, now: DateTime<Utc>) {
        let views = l.grants();
        let granted: Decimal = views.iter().map(|v| v.grant.amount).sum();
        let burned: Decimal = views.iter().map(|v| v.burned).sum();
        let expired: Decimal = views.iter().filter_map(|v| v.expired).sum();
        let remaining: Decimal = views
            .iter()
            .filter(|v| v.expired.is_none())
            .map(|v| v.remaining)
            .sum();
        assert_eq!(granted, burned + expired + remaining);
        assert_eq!(l.total_debited() + l.unreconciled(), burned + l.debt());
        let live_remaining: Decimal = l
            .slots
            .iter()
            .filter(|s| s.live_at(now))
            .map(Slot::remaining)
            .sum();
        assert_eq!(l.balance(now), live_remaining - l.debt());
        for v in &views {
            assert!(v.burned >= Decimal::ZERO);
            assert!(v.remaining >= Decimal::ZERO);
            assert!(v.expired.is_none_or(|e| e >= Decimal::ZERO));
        }
        assert!(l.debt() >= Decimal::ZERO);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_burn_down_order_and_exact_allocations(ops in ops(true, true, false)) {
            // The burn-order and sum checks run inside `run` for every debit.
            run(&ops, |_, _, _| {});
        }

        #[test]
        fn prop_accounting_identity_holds_after_every_op(ops in ops(true, true, true)) {
            run(&ops, |l, _, now| check_identities(l, now));
        }

        #[test]
        fn prop_balance_is_grants_minus_debits_minus_expiries(ops in ops(false, true, false)) {
            let (mut l, r) = run(&ops, |_, _, _| {});
            let now = t(r.now);
            l.expire_due(now);
            let granted: Decimal = r.grants.iter().map(|g| g.amount).sum();
            let debited: Decimal = r.debits.iter().map(|d| d.1).sum();
            let expired: Decimal = l.grants().iter().filter_map(|v| v.expired).sum();
            prop_assert_eq!(l.balance(now), granted - debited - expired);
            prop_assert_eq!(l.total_debited(), debited);
        }

        #[test]
        fn prop_add_grant_is_idempotent(
            ops in ops(true, true, false),
            pick in 0usize..16,
            milli in 1i64..5000,
            priority in 0u32..3,
        ) {
            let (mut l, r) = run(&ops, |_, _, _| {});
            if let Some(g) = r.grants.get(pick % r.grants.len().max(1)) {
                let now = t(r.now);
                let (views, balance, debt) = (l.grants(), l.balance(now), l.debt());
                prop_assert!(!l.add_grant(g.clone()));
                let mut changed = g.clone();
                changed.amount = Decimal::new(milli, 3);
                changed.priority = priority;
                prop_assert!(!l.add_grant(changed));
                prop_assert_eq!(l.grants(), views);
                prop_assert_eq!(l.balance(now), balance);
                prop_assert_eq!(l.debt(), debt);
            }
        }

        #[test]
        fn prop_replay_yields_the_same_balance(ops in ops(true, false, false), seed in any::<u64>()) {
            let (mut live, r) = run(&in_record_order(&ops), |_, _, _| {});
            let now = t(r.now);
            let mut replayed = replay_at(r.grants.clone(), r.debits.clone(), r.expiries.clone(), now);
            prop_assert_eq!(replayed.balance(now), live.balance(now));
            prop_assert_eq!(replayed.total_debited(), live.total_debited());
            prop_assert_eq!(replayed.unreconciled(), Decimal::ZERO);
            check_identities(&replayed, now);

            // Any order of the records gives the same ledger.
            let (mut g, mut dd, mut e) = (r.grants.clone(), r.debits.clone(), r.expiries.clone());
            shuffle(&mut g, seed);
            shuffle(&mut dd, seed ^ 1);
            shuffle(&mut e, seed ^ 2);
            let shuffled = replay_at(g, dd, e, now);
            prop_assert_eq!(shuffled.grants(), replayed.grants());
            prop_assert_eq!(shuffled.debt(), replayed.debt());

            // And it stays equal once due expiries are marked and debt settled.
            live.expire_due(now);
            replayed.expire_due(now);
            live.settle_debt(now);
            replayed.settle_debt(now);
            prop_assert_eq!(replayed.balance(now), live.balance(now));
        }
    }

    /// `ops` as a live run that applied its records in the order replay
    /// does (module doc, "Restart"): debits in time order (the replay test
    /// generates no late ones), at each instant grants, then debits, then the
    /// expiry sweep, and at most one grant becoming effective per instant.
    fn in_record_order(ops: &[Op]) -> Vec<Op> {
        let rank = |op: &Op| match op {
            Op::Grant { .. } => 0,
            Op::Debit { .. } => 1,
            Op::Expire => 2,
            Op::Settle | Op::ApplyExpiry { .. } => 3,
            Op::Advance(_) => 4,
        };
        let mut out = Vec::new();
        let mut effective = std::collections::BTreeSet::new();
        let mut now = 0;
        for segment in ops.split_inclusive(|op| matches!(op, Op::Advance(_))) {
            let mut segment: Vec<Op> = segment
                .iter()
                .filter(|op| match op {
                    Op::Grant { delay, .. } => effective.insert(now + delay),
                    _ => true,
                })
                .cloned()
                .collect();
            segment.sort_by_key(rank);
            if let Some(Op::Advance(m)) = segment.last() {
                now += m;
            }
            out.extend(segment);
        }
        out
    }

    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let j = (seed >> 33) as usize % (i + 1);
            v.swap(i, j);
        }
    }
}
