//! Quota levels and the webhook events their changes raise.
//!
//! A budget (a tenant's live credit, a postpaid monthly limit, a key's budget)
//! is `exhausted` when nothing is left (`remaining ≤ 0`), `warning` once the
//! used fraction `(limit − remaining) / limit` reaches a threshold (default
//! 80 % and 95 %), else `ok`. An unlimited budget is always `ok`.
//!
//! Webhooks fire once per crossing: `quota.warning` when a higher threshold is
//! reached than the last snapshot had, `quota.exhausted` on entering
//! `exhausted`, `quota.restored` on leaving it. The previous level and threshold
//! come from the last snapshot billing wrote to the quota bucket, which
//! survives restarts, so a restart raises nothing twice.

use rust_decimal::Decimal;
use tollgate_schemas::records::QuotaLevel;

/// Level and highest threshold reached for `remaining` of `limit`.
pub fn level(
    remaining: Option<Decimal>,
    limit: Option<Decimal>,
    thresholds: &[Decimal],
) -> (QuotaLevel, Option<Decimal>) {
    let Some(remaining) = remaining else {
        return (QuotaLevel::Ok, None);
    };
    let reached = match limit {
        Some(limit) if limit > Decimal::ZERO => {
            let used = (limit - remaining) / limit;
            thresholds.iter().copied().filter(|t| used >= *t).max()
        }
        _ => None,
    };
    if remaining <= Decimal::ZERO {
        return (QuotaLevel::Exhausted, reached);
    }
    match reached {
        Some(t) => (QuotaLevel::Warning, Some(t)),
        None => (QuotaLevel::Ok, None),
    }
}

/// The webhook event types a change from `prev` to `next` raises, in order.
pub fn crossings(
    prev: Option<(QuotaLevel, Option<Decimal>)>,
    next: (QuotaLevel, Option<Decimal>),
) -> Vec<&'static str> {
    let (prev_level, prev_threshold) = prev.unwrap_or((QuotaLevel::Ok, None));
    let mut out = Vec::new();
    match (prev_level, next.0) {
        (QuotaLevel::Exhausted, QuotaLevel::Exhausted) => {}
        (_, QuotaLevel::Exhausted) => out.push("quota.exhausted"),
        (QuotaLevel::Exhausted, _) => {
            out.push("quota.restored");
            if next.0 == QuotaLevel::Warning {
                out.push("quota.warning");
            }
        }
        (_, QuotaLevel::Warning) => {
            if next.1 > prev_threshold || prev_level == QuotaLevel::Ok {
                out.push("quota.warning");
            }
        }
        (_, QuotaLevel::Ok) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn t() -> Vec<Decimal> {
        vec![d("0.8"), d("0.95")]
    }

    #[test]
    fn levels() {
        assert_eq!(level(None, None, &t()), (QuotaLevel::Ok, None));
        assert_eq!(
            level(Some(d("5")), Some(d("10")), &t()),
            (QuotaLevel::Ok, None)
        );
        assert_eq!(
            level(Some(d("2")), Some(d("10")), &t()),
            (QuotaLevel::Warning, Some(d("0.8")))
        );
        assert_eq!(
            level(Some(d("0.5")), Some(d("10")), &t()),
            (QuotaLevel::Warning, Some(d("0.95")))
        );
        assert_eq!(
            level(Some(d("0")), Some(d("10")), &t()).0,
            QuotaLevel::Exhausted
        );
        assert_eq!(
            level(Some(d("-0.01")), Some(d("0")), &t()).0,
            QuotaLevel::Exhausted
        );
    }

    #[test]
    fn each_crossing_fires_once() {
        let ok = (QuotaLevel::Ok, None);
        let w80 = (QuotaLevel::Warning, Some(d("0.8")));
        let w95 = (QuotaLevel::Warning, Some(d("0.95")));
        let ex = (QuotaLevel::Exhausted, Some(d("0.95")));
        assert_eq!(crossings(Some(ok), w80), vec!["quota.warning"]);
        assert!(crossings(Some(w80), w80).is_empty());
        assert_eq!(crossings(Some(w80), w95), vec!["quota.warning"]);
        assert_eq!(crossings(Some(w95), ex), vec!["quota.exhausted"]);
        assert!(crossings(Some(ex), ex).is_empty());
        assert_eq!(crossings(Some(ex), ok), vec!["quota.restored"]);
        assert_eq!(
            crossings(Some(ex), w80),
            vec!["quota.restored", "quota.warning"]
        );
        assert!(crossings(Some(w95), ok).is_empty());
        assert_eq!(crossings(None, ex), vec!["quota.exhausted"]);
        assert!(crossings(None, ok).is_empty());
    }
}
