//! Invoice lines and totals: where money is rounded, once.
//!
//! Pure and synchronous. Usage events carry exact, unrounded costs; an
//! invoice turns a period's usage into lines and totals in USD cents.
//!
//! # The rounding rule
//!
//! - **Lines.** One line per model, token kind, price version (and unit
//!   price). `unit_price` is the per-million price ÷ 1,000,000, exact and
//!   normalized (USD per token). The line amount is `quantity × unit_price`
//!   rounded **once** to 0.01 USD, half away from zero
//!   ([`RoundingStrategy::MidpointAwayFromZero`]: 0.005 → 0.01, 0.00499995 →
//!   0.00), by [`round_money`], in Rust (never in SQL: ClickHouse 18.16's
//!   `round()` on a Decimal does not round). Each line is off its exact
//!   amount by at most 0.005.
//! - **Subtotal** = Σ line amounts. They are already rounded, so the sum is
//!   exact at 2 decimal places: nothing is rounded twice.
//! - **Credits applied** = min(subtotal, available credit truncated *down* to
//!   the cent by [`floor_cents`]), never negative: a tenant is never credited
//!   a fraction of a cent it does not have.
//! - **Total** = subtotal − credits applied, ≥ 0 (prices are never negative:
//!   `ModelPrice::validate` refuses them).
//!
//! Every amount here has scale exactly 2 (`"1.50"`, `"0.00"`), so the JSON and
//! ClickHouse forms of an invoice are byte-identical however often it is
//! recomputed. Lines do not depend on the order of the usage rows or on how a
//! model's usage is split into rows: rebuilding from a replayed stream gives
//! the same invoice.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use tollgate_schemas::events::TokenCounts;
use tollgate_schemas::records::ModelPrice;

/// Usage of one model at one price version, summed over a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedUsage {
    pub model: String,
    pub price_version: u64,
    pub price: ModelPrice,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

/// One invoice line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// 1.. in line order.
    pub line_no: u32,
    pub model: String,
    /// `input`, `output`, `cache_read` or `cache_write`.
    pub token_kind: String,
    pub quantity: u64,
    /// USD per token (per-million price ÷ 1,000,000), normalized.
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    /// `round_money(quantity × unit_price)`.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub price_version: u64,
}

/// An invoice's totals; every field has scale 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub credits_applied: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
}

/// Token kinds in line order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Input,
    Output,
    CacheRead,
    CacheWrite,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Input, Kind::Output, Kind::CacheRead, Kind::CacheWrite];

    fn as_str(self) -> &'static str {
        match self {
            Kind::Input => "input",
            Kind::Output => "output",
            Kind::CacheRead => "cache_read",
            Kind::CacheWrite => "cache_write",
        }
    }

    /// Cache reads and writes default to the input price, as in
    /// `ModelPrice::cost`.
    fn per_million(self, p: &ModelPrice) -> Decimal {
        match self {
            Kind::Input => p.input_per_million,
            Kind::Output => p.output_per_million,
            Kind::CacheRead => p.cache_read_per_million.unwrap_or(p.input_per_million),
            Kind::CacheWrite => p.cache_write_per_million.unwrap_or(p.input_per_million),
        }
    }

    fn quantity(self, u: &PricedUsage) -> u64 {
        match self {
            Kind::Input => u.input_tokens,
            Kind::Output => u.output_tokens,
            Kind::CacheRead => u.cache_read_tokens,
            Kind::CacheWrite => u.cache_write_tokens,
        }
    }
}

/// `d` at scale exactly 2, without a negative zero.
fn cents(mut d: Decimal) -> Decimal {
    d.rescale(2);
    if d.is_zero() {
        d.set_sign_positive(true);
    }
    d
}

/// The one rounding: to 0.01, half away from zero. The result has scale
/// exactly 2 (`1.5` → `"1.50"`, `0.004` → `"0.00"`, `0.005` → `"0.01"`,
/// `-0.005` → `"-0.01"`).
pub fn round_money(d: Decimal) -> Decimal {
    cents(d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero))
}

/// Truncates a positive amount down to the cent (`5.999` → `"5.99"`); zero
/// or negative → `"0.00"`. Scale exactly 2.
pub fn floor_cents(d: Decimal) -> Decimal {
    if d <= Decimal::ZERO {
        return cents(Decimal::ZERO);
    }
    cents(d.round_dp_with_strategy(2, RoundingStrategy::ToZero))
}

/// USD per token for a per-million price, exact and normalized.
fn unit_price(per_million: Decimal) -> Decimal {
    (per_million / Decimal::from(1_000_000u32)).normalize()
}

/// Lines for a period. Entries for the same (model, price_version) are summed
/// first, and the input may come in any order: the output is identical for
/// any permutation and any split of a usage into several entries.
/// Zero-quantity lines are omitted. Order: model ascending, then token kind
/// (input, output, cache_read, cache_write), then price_version ascending
/// (then unit price, should one version carry two prices for a model);
/// `line_no` = 1.. in that order.
///
/// A quantity summed past `u64::MAX` tokens saturates (unreachable: that is
/// 18 quintillion tokens).
pub fn lines(usage: &[PricedUsage]) -> Vec<Line> {
    let mut quantities: BTreeMap<(&str, Kind, u64, Decimal), u64> = BTreeMap::new();
    for u in usage {
        for kind in Kind::ALL {
            let q = kind.quantity(u);
            if q == 0 {
                continue;
            }
            let key = (
                u.model.as_str(),
                kind,
                u.price_version,
                unit_price(kind.per_million(&u.price)),
            );
            let sum = quantities.entry(key).or_insert(0);
            *sum = sum.saturating_add(q);
        }
    }
    quantities
        .into_iter()
        .zip(1u32..)
        .map(
            |(((model, kind, price_version, unit_price), quantity), line_no)| Line {
                line_no,
                model: model.to_string(),
                token_kind: kind.as_str().to_string(),
                quantity,
                unit_price,
                amount: round_money(Decimal::from(quantity).saturating_mul(unit_price)),
                price_version,
            },
        )
        .collect()
}

/// Totals of `lines` with up to `available_credit` applied (module doc, "The
/// rounding rule"). `subtotal` is Σ amounts; for lines made by [`lines`] it is
/// exact and [`round_money`] on it changes nothing (it only guards hand-made
/// lines with more than 2 places).
pub fn totals(lines: &[Line], available_credit: Decimal) -> Totals {
    let subtotal = round_money(
        lines
            .iter()
            .fold(Decimal::ZERO, |acc, l| acc.saturating_add(l.amount)),
    );
    let credits_applied = cents(
        subtotal
            .min(floor_cents(available_credit))
            .max(Decimal::ZERO),
    );
    Totals {
        subtotal,
        credits_applied,
        total: cents(subtotal - credits_applied),
    }
}

/// Σ exact, unrounded cost of `usage` (`ModelPrice::cost`), the figure the
/// usage events carry. Each line's unrounded amount sums to it, and the
/// subtotal is within 0.005 × the number of lines of it.
pub fn exact_cost(usage: &[PricedUsage]) -> Decimal {
    usage
        .iter()
        .map(|u| {
            u.price.cost(&TokenCounts {
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                cache_read_tokens: u.cache_read_tokens,
                cache_write_tokens: u.cache_write_tokens,
                reasoning_tokens: 0,
            })
        })
        .sum::<Decimal>()
        .normalize()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn price(input: &str, output: &str) -> ModelPrice {
        ModelPrice {
            input_per_million: d(input),
            output_per_million: d(output),
            cache_read_per_million: None,
            cache_write_per_million: None,
        }
    }

    fn usage(model: &str, version: u64, p: ModelPrice, counts: [u64; 4]) -> PricedUsage {
        PricedUsage {
            model: model.into(),
            price_version: version,
            price: p,
            input_tokens: counts[0],
            output_tokens: counts[1],
            cache_read_tokens: counts[2],
            cache_write_tokens: counts[3],
        }
    }

    /// The amount of a single input line of `tokens` at `per_million`.
    fn input_amount(tokens: u64, per_million: &str) -> String {
        let l = lines(&[usage("m", 1, price(per_million, "0"), [tokens, 0, 0, 0])]);
        l[0].amount.to_string()
    }

    #[test]
    fn hand_computed_line_amounts() {
        assert_eq!(input_amount(1_000_000, "0.15"), "0.15");
        assert_eq!(input_amount(3, "0.15"), "0.00"); // 0.00000045
        assert_eq!(input_amount(33_333, "0.15"), "0.00"); // 0.00499995
        assert_eq!(input_amount(33_334, "0.15"), "0.01"); // 0.0050001
        assert_eq!(input_amount(100_000, "0.05"), "0.01"); // 0.005: midpoint, up
        assert_eq!(input_amount(250_000, "0.10"), "0.03"); // 0.025: up (banker's gives 0.02)
        assert_eq!(input_amount(1_234_567, "10"), "12.35"); // 12.34567
        assert_eq!(input_amount(10_000_000, "2.5"), "25.00");
        assert_eq!(input_amount(1, "75"), "0.00"); // 0.000075
        assert_eq!(input_amount(66_667, "75"), "5.00"); // 5.000025
    }

    #[test]
    fn lines_are_ordered_and_numbered_and_skip_zeros() {
        let mut b = price("3", "15");
        b.cache_read_per_million = Some(d("0.3"));
        let u = vec![
            usage("mock-gpt", 2, price("0.15", "0.60"), [10, 0, 5, 0]),
            usage("mock-claude", 1, b, [1_000, 2_000, 3_000, 4_000]),
            usage(
                "mock-gpt",
                1,
                price("0.10", "0.40"),
                [1_000_000, 500_000, 0, 0],
            ),
        ];
        let got: Vec<(u32, &str, &str, u64, u64, String, String)> = lines(&u)
            .iter()
            .map(|l| {
                (
                    l.line_no,
                    if l.model == "mock-gpt" {
                        "gpt"
                    } else {
                        "claude"
                    },
                    match l.token_kind.as_str() {
                        "input" => "in",
                        "output" => "out",
                        "cache_read" => "cr",
                        _ => "cw",
                    },
                    l.price_version,
                    l.quantity,
                    l.unit_price.to_string(),
                    l.amount.to_string(),
                )
            })
            .collect();
        let row = |n, m, k, v, q, up: &str, a: &str| (n, m, k, v, q, up.to_string(), a.to_string());
        assert_eq!(
            got,
            vec![
                row(1, "claude", "in", 1, 1_000, "0.000003", "0.00"),
                row(2, "claude", "out", 1, 2_000, "0.000015", "0.03"),
                row(3, "claude", "cr", 1, 3_000, "0.0000003", "0.00"),
                // cache writes default to the input price
                row(4, "claude", "cw", 1, 4_000, "0.000003", "0.01"),
                row(5, "gpt", "in", 1, 1_000_000, "0.0000001", "0.10"),
                row(6, "gpt", "in", 2, 10, "0.00000015", "0.00"),
                row(7, "gpt", "out", 1, 500_000, "0.0000004", "0.20"),
                row(8, "gpt", "cr", 2, 5, "0.00000015", "0.00"),
            ]
        );
        assert!(lines(&[usage("m", 1, price("1", "1"), [0, 0, 0, 0])]).is_empty());
    }

    #[test]
    fn same_model_and_version_is_summed_before_rounding() {
        // Three rows of 33,333 tokens at 0.15/M would each round to 0.00;
        // summed first they are 99,999 tokens = 0.01499985 → 0.01.
        let p = price("0.15", "0");
        let u = vec![
            usage("m", 1, p.clone(), [33_333, 0, 0, 0]),
            usage("m", 1, p.clone(), [33_333, 0, 0, 0]),
            usage("m", 1, p, [33_333, 0, 0, 0]),
        ];
        let l = lines(&u);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].quantity, 99_999);
        assert_eq!(l[0].amount, d("0.01"));
        assert_eq!(exact_cost(&u), d("0.01499985"));
    }

    #[test]
    fn rounding_helpers() {
        assert_eq!(round_money(d("1.5")).to_string(), "1.50");
        assert_eq!(round_money(d("0")).to_string(), "0.00");
        assert_eq!(round_money(d("0.004999")).to_string(), "0.00");
        assert_eq!(round_money(d("0.005")).to_string(), "0.01");
        assert_eq!(round_money(d("2.675")).to_string(), "2.68");
        assert_eq!(round_money(d("-0.005")).to_string(), "-0.01");
        assert_eq!(round_money(d("-0.004")).to_string(), "0.00");
        assert_eq!(round_money(d("12.345000")).to_string(), "12.35");
        assert_eq!(floor_cents(d("5.999")).to_string(), "5.99");
        assert_eq!(floor_cents(d("0.009")).to_string(), "0.00");
        assert_eq!(floor_cents(d("7")).to_string(), "7.00");
        assert_eq!(floor_cents(d("-3.5")).to_string(), "0.00");
        assert_eq!(floor_cents(Decimal::ZERO).to_string(), "0.00");
    }

    #[test]
    fn hand_computed_totals() {
        let u = vec![
            usage("a", 1, price("10", "0"), [1_234_567, 0, 0, 0]), // 12.35
            usage("b", 1, price("0.05", "0"), [100_000, 0, 0, 0]), // 0.01
        ];
        let l = lines(&u);
        let t = |avail: &str| {
            let t = totals(&l, d(avail));
            (
                t.subtotal.to_string(),
                t.credits_applied.to_string(),
                t.total.to_string(),
            )
        };
        let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(t("5.999"), s("12.36", "5.99", "6.37"));
        assert_eq!(t("100"), s("12.36", "12.36", "0.00"));
        assert_eq!(t("12.36"), s("12.36", "12.36", "0.00"));
        assert_eq!(t("0"), s("12.36", "0.00", "12.36"));
        assert_eq!(t("-3"), s("12.36", "0.00", "12.36"));
        assert_eq!(t("0.009"), s("12.36", "0.00", "12.36"));
        assert_eq!(
            totals(&[], d("5")),
            Totals {
                subtotal: d("0"),
                credits_applied: d("0"),
                total: d("0")
            }
        );
        assert_eq!(totals(&[], d("5")).total.to_string(), "0.00");
        assert_eq!(exact_cost(&u), d("12.35067"));
    }

    #[test]
    fn serde_shapes() {
        let l = lines(&[usage("m", 3, price("0.15", "0"), [1_000_000, 0, 0, 0])]);
        let v = serde_json::to_value(&l[0]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "line_no": 1, "model": "m", "token_kind": "input", "quantity": 1_000_000,
                "unit_price": "0.00000015", "amount": "0.15", "price_version": 3
            })
        );
        let back: Line = serde_json::from_value(v).unwrap();
        assert_eq!(back, l[0]);
        let t = serde_json::to_value(totals(&l, d("1"))).unwrap();
        assert_eq!(
            t,
            serde_json::json!({"subtotal": "0.15", "credits_applied": "0.15", "total": "0.00"})
        );
    }

    // ---- property tests ----

    const MODELS: [&str; 3] = ["alpha", "beta", "gamma"];

    fn per_million() -> impl Strategy<Value = Decimal> {
        // Up to 100 USD per million with up to 6 places, as validate allows.
        prop_oneof![
            (0i64..=100_000_000).prop_map(|m| Decimal::new(m, 6)),
            (0i64..=10_000).prop_map(|c| Decimal::new(c, 2)),
        ]
    }

    fn model_price() -> impl Strategy<Value = ModelPrice> {
        (
            per_million(),
            per_million(),
            proptest::option::of(per_million()),
            proptest::option::of(per_million()),
        )
            .prop_map(|(i, o, cr, cw)| ModelPrice {
                input_per_million: i,
                output_per_million: o,
                cache_read_per_million: cr,
                cache_write_per_million: cw,
            })
    }

    fn tokens() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0u64..1_000,
            0u64..200_000,
            0u64..50_000_000,
            0u64..1_000_000_000_000,
        ]
    }

    /// Usage rows whose (model, version) always has the same price, as the
    /// price book guarantees.
    fn usage_rows() -> impl Strategy<Value = Vec<PricedUsage>> {
        (
            proptest::collection::vec(model_price(), 9),
            proptest::collection::vec(
                (
                    0usize..3,
                    1u64..=3,
                    [tokens(), tokens(), tokens(), tokens()],
                ),
                0..12,
            ),
        )
            .prop_map(|(prices, rows)| {
                rows.into_iter()
                    .map(|(m, v, c)| {
                        let p = prices[m * 3 + (v as usize - 1)].clone();
                        usage(MODELS[m], v, p, c)
                    })
                    .collect()
            })
    }

    /// The same usage split into two rows per row (by `fracs`), shuffled.
    fn split(rows: &[PricedUsage], fracs: &[u64]) -> Vec<PricedUsage> {
        let part = |c: u64, f: u64| ((c as u128 * f as u128) / 100) as u64;
        let mut out = Vec::new();
        for (r, f) in rows.iter().zip(fracs.iter().cycle()) {
            let mut a = r.clone();
            let mut b = r.clone();
            a.input_tokens = part(r.input_tokens, *f);
            b.input_tokens = r.input_tokens - a.input_tokens;
            a.output_tokens = part(r.output_tokens, 100 - f);
            b.output_tokens = r.output_tokens - a.output_tokens;
            a.cache_read_tokens = part(r.cache_read_tokens, *f);
            b.cache_read_tokens = r.cache_read_tokens - a.cache_read_tokens;
            a.cache_write_tokens = part(r.cache_write_tokens, (f * 7) % 101);
            b.cache_write_tokens = r.cache_write_tokens - a.cache_write_tokens;
            out.push(a);
            out.push(b);
        }
        out
    }

    fn rows_and_variants()
    -> impl Strategy<Value = (Vec<PricedUsage>, Vec<PricedUsage>, Vec<PricedUsage>)> {
        (usage_rows(), proptest::collection::vec(0u64..=100, 1..8)).prop_flat_map(
            |(rows, fracs)| {
                let split = split(&rows, &fracs);
                (
                    Just(rows.clone()),
                    Just(rows).prop_shuffle(),
                    Just(split).prop_shuffle(),
                )
            },
        )
    }

    fn available() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            (-100_000i64..=10_000_000).prop_map(|m| Decimal::new(m, 3)),
            (0i64..=1_000_000_000_000).prop_map(|m| Decimal::new(m, 6)),
            Just(Decimal::ZERO),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_lines_independent_of_order_and_split((rows, shuffled, split) in rows_and_variants()) {
            let l = lines(&rows);
            prop_assert_eq!(&lines(&shuffled), &l);
            prop_assert_eq!(&lines(&split), &l);
            prop_assert_eq!(exact_cost(&split), exact_cost(&rows));
            for (i, line) in l.iter().enumerate() {
                prop_assert_eq!(line.line_no as usize, i + 1);
                prop_assert!(line.quantity > 0);
            }
            let keys: Vec<_> = l.iter().map(|x| {
                let kind = ["input", "output", "cache_read", "cache_write"]
                    .iter().position(|k| *k == x.token_kind).unwrap();
                (x.model.clone(), kind, x.price_version)
            }).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted, keys);
        }

        #[test]
        fn prop_one_rounding_per_line(rows in usage_rows()) {
            let l = lines(&rows);
            let mut unrounded = Decimal::ZERO;
            for line in &l {
                let exact = Decimal::from(line.quantity) * line.unit_price;
                unrounded += exact;
                prop_assert_eq!(line.amount, round_money(exact));
                prop_assert_eq!(line.amount.scale(), 2);
                prop_assert!((line.amount - exact).abs() <= Decimal::new(5, 3));
            }
            let exact = exact_cost(&rows);
            prop_assert_eq!(unrounded, exact);
            let t = totals(&l, Decimal::ZERO);
            prop_assert!(
                (t.subtotal - exact).abs() <= Decimal::new(5, 3) * Decimal::from(l.len())
            );
        }

        #[test]
        fn prop_totals_are_exact_and_bounded(rows in usage_rows(), avail in available()) {
            let l = lines(&rows);
            let t = totals(&l, avail);
            prop_assert_eq!(t.subtotal, l.iter().map(|x| x.amount).sum::<Decimal>());
            prop_assert!(t.total >= Decimal::ZERO);
            prop_assert!(t.credits_applied >= Decimal::ZERO);
            prop_assert_eq!(t.total + t.credits_applied, t.subtotal);
            if avail >= Decimal::ZERO {
                prop_assert!(t.credits_applied <= avail);
            }
            prop_assert_eq!(t.credits_applied, t.subtotal.min(floor_cents(avail)).max(Decimal::ZERO));
            for x in [t.subtotal, t.credits_applied, t.total] {
                prop_assert_eq!(x.scale(), 2);
                prop_assert!(!x.is_sign_negative());
            }
        }
    }
}
