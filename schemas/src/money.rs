//! Exact money.
//!
//! Costs are `rust_decimal::Decimal` everywhere in Rust and `Decimal(38, 12)`
//! in ClickHouse. Prices are quoted per million tokens with at most 6 decimal
//! places, so a per-token price has at most 12, and `tokens × price / 10^6` is
//! exact at scale 12: the event's `cost` is never rounded. Rounding happens
//! once, at the invoice line, in billing (never in SQL: ClickHouse 18.16's
//! `round()` on a Decimal does not round).

use rust_decimal::Decimal;

/// The scale of every money column in ClickHouse.
pub const CH_SCALE: u32 = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("amount {0} has more than {CH_SCALE} decimal places")]
    TooPrecise(Decimal),
    #[error("amount {0} does not fit Decimal(38, {CH_SCALE})")]
    Overflow(Decimal),
}

/// The `Decimal(38, 12)` wire value (an `i128` scaled by 10^12) of `d`.
/// Refuses to round: a value that needs more than 12 places is an error.
pub fn to_ch_decimal(d: Decimal) -> Result<i128, MoneyError> {
    let normalized = d.normalize();
    if normalized.scale() > CH_SCALE {
        return Err(MoneyError::TooPrecise(d));
    }
    let mut scaled = normalized;
    scaled.rescale(CH_SCALE);
    if scaled.scale() != CH_SCALE {
        return Err(MoneyError::Overflow(d));
    }
    Ok(scaled.mantissa())
}

/// Inverse of [`to_ch_decimal`].
pub fn from_ch_decimal(v: i128) -> Result<Decimal, MoneyError> {
    Decimal::try_from_i128_with_scale(v, CH_SCALE)
        .map(|d| d.normalize())
        .map_err(|_| MoneyError::Overflow(Decimal::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn round_trips_at_scale_12() {
        for s in ["0", "1.5", "0.000000000001", "123456.789012345678", "-3.25"] {
            let d = Decimal::from_str(s).unwrap();
            assert_eq!(
                from_ch_decimal(to_ch_decimal(d).unwrap()).unwrap(),
                d.normalize()
            );
        }
    }

    #[test]
    fn refuses_to_round() {
        let d = Decimal::from_str("0.0000000000001").unwrap();
        assert_eq!(to_ch_decimal(d), Err(MoneyError::TooPrecise(d)));
    }
}
