//! Meta's pricing object on a status webhook: what the payload parser reads and the rate card
//! prices.

use serde::Deserialize;

/// A status's `pricing` object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Pricing {
    /// Deprecated by Meta in favour of `kind` + `category`.
    #[serde(default)]
    pub billable: Option<bool>,
    /// `PMP` (per message), or `CBP` on webhooks sent before July 2025.
    #[serde(default)]
    pub pricing_model: Option<String>,
    /// `type`: `regular`, `free_customer_service`, `free_entry_point`, …
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// `marketing`, `utility`, `authentication`, `service`, …
    #[serde(default)]
    pub category: Option<String>,
}
