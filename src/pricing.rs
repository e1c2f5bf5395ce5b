//! Estimated cost of a delivered message under Meta's per-message pricing (since 2025-07-01):
//! a rate per template category and recipient market, the market found from the recipient's
//! country calling code. The status webhook says whether a message is billable and in which
//! category; the rate card (configuration) says how much.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::vocab::Pricing;

/// The market of a number no calling code in the card matches.
pub const OTHER_MARKET: &str = "other";

/// The `[pricing]` section: one currency, markets by calling code, rates per market.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCard {
    /// The card's currency (e.g. `USD`), shown with every cost.
    pub currency: String,
    /// Country calling code → market name; the longest matching code wins, no match is
    /// [`OTHER_MARKET`].
    #[serde(default)]
    pub markets: BTreeMap<String, String>,
    /// Market → category (`marketing`, `utility`, `authentication`, …) → price per message.
    #[serde(default)]
    pub rates: BTreeMap<String, BTreeMap<String, f64>>,
}

/// What one billable message is estimated to cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// Meta's pricing category.
    pub category: String,
    /// The recipient's market.
    pub market: String,
    /// Millionths of the card's currency (`None`: the card has no rate for it).
    pub micros: Option<i64>,
}

impl RateCard {
    /// A problem with the card, naming the key.
    pub fn problem(&self) -> Option<String> {
        if let Some(code) = self
            .markets
            .keys()
            .find(|c| c.is_empty() || c.len() > 4 || !c.bytes().all(|b| b.is_ascii_digit()))
        {
            return Some(format!(
                "pricing.markets: {code:?} is not a country calling code (1-4 digits)"
            ));
        }
        for (market, rates) in &self.rates {
            if let Some((category, rate)) = rates.iter().find(|(_, r)| !r.is_finite() || **r < 0.0)
            {
                return Some(format!(
                    "pricing.rates.{market}.{category}: {rate} is not a price"
                ));
            }
        }
        None
    }

    /// The market of a recipient (E.164 digits).
    pub fn market(&self, wa_id: &str) -> &str {
        (1..=wa_id.len().min(4))
            .rev()
            .find_map(|n| wa_id.get(..n).and_then(|code| self.markets.get(code)))
            .map_or(OTHER_MARKET, String::as_str)
    }

    /// The estimate for a status's pricing, if Meta bills the message.
    pub fn estimate(&self, pricing: &Pricing, wa_id: &str) -> Option<Estimate> {
        let billable = match pricing.kind.as_deref() {
            Some(kind) => kind == "regular",
            None => pricing.billable == Some(true),
        };
        if !billable {
            return None;
        }
        let category = pricing.category.clone().unwrap_or_else(|| "unknown".into());
        let market = self.market(wa_id).to_owned();
        let micros = self
            .rates
            .get(&market)
            .and_then(|rates| rates.get(&category))
            .map(|rate| (rate * 1_000_000.0).round() as i64);
        Some(Estimate {
            category,
            market,
            micros,
        })
    }
}

/// An amount in millionths as a decimal (`1234500` → `1.2345`).
pub fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let micros = micros.unsigned_abs();
    let fraction = format!("{:06}", micros % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    let fraction = if fraction.len() < 2 {
        format!("{fraction:0<2}")
    } else {
        fraction.to_owned()
    };
    format!("{sign}{}.{fraction}", micros / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> RateCard {
        RateCard {
            currency: "USD".into(),
            markets: [("1", "north_america"), ("49", "de"), ("1242", "bahamas")]
                .map(|(c, m)| (c.to_owned(), m.to_owned()))
                .into(),
            rates: [
                ("de", vec![("marketing", 0.1502), ("utility", 0.0605)]),
                ("other", vec![("marketing", 0.0604)]),
            ]
            .into_iter()
            .map(|(m, r)| {
                (
                    m.to_owned(),
                    r.into_iter().map(|(c, p)| (c.to_owned(), p)).collect(),
                )
            })
            .collect(),
        }
    }

    fn pricing(kind: Option<&str>, billable: Option<bool>, category: &str) -> Pricing {
        Pricing {
            billable,
            pricing_model: Some("PMP".into()),
            kind: kind.map(Into::into),
            category: Some(category.into()),
        }
    }

    #[test]
    fn the_longest_calling_code_decides_the_market() {
        let card = card();
        assert_eq!(card.market("4915112345678"), "de");
        assert_eq!(card.market("12125550100"), "north_america");
        assert_eq!(card.market("12425550100"), "bahamas");
        assert_eq!(card.market("5511987654321"), OTHER_MARKET);
    }

    #[test]
    fn only_regular_messages_are_billed() {
        let card = card();
        let billed = card
            .estimate(
                &pricing(Some("regular"), Some(true), "marketing"),
                "4915112345678",
            )
            .unwrap();
        assert_eq!(
            billed,
            Estimate {
                category: "marketing".into(),
                market: "de".into(),
                micros: Some(150_200)
            }
        );
        for free in ["free_customer_service", "free_entry_point"] {
            assert_eq!(
                card.estimate(&pricing(Some(free), Some(false), "utility"), "49151"),
                None
            );
        }
        // Before `type` existed, `billable` said it.
        assert!(
            card.estimate(&pricing(None, Some(true), "utility"), "49151")
                .is_some()
        );
        assert_eq!(
            card.estimate(&pricing(None, Some(false), "utility"), "49151"),
            None
        );
    }

    #[test]
    fn a_category_without_a_rate_is_billable_at_an_unknown_price() {
        let estimate = card()
            .estimate(
                &pricing(Some("regular"), None, "authentication"),
                "4915112345678",
            )
            .unwrap();
        assert_eq!(estimate.micros, None);
    }

    #[test]
    fn bad_cards_are_named() {
        let mut bad = card();
        bad.markets.insert("+49".into(), "de".into());
        assert!(bad.problem().unwrap().contains("\"+49\""));
        let mut bad = card();
        bad.rates
            .get_mut("de")
            .unwrap()
            .insert("utility".into(), -1.0);
        assert!(bad.problem().unwrap().contains("pricing.rates.de.utility"));
        assert_eq!(card().problem(), None);
    }

    #[test]
    fn amounts_print_as_decimals() {
        assert_eq!(format_micros(150_200), "0.1502");
        assert_eq!(format_micros(3_000_000), "3.00");
        assert_eq!(format_micros(1_234_567), "1.234567");
        assert_eq!(format_micros(0), "0.00");
    }
}
