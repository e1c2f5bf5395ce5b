//! Lanes: a number's three queues, served by priority, and the delivery mode each implies when a
//! send's outcome is unknown.

use serde::{Deserialize, Serialize};

/// A lane: its own queue, served by priority (otp before transactional before bulk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// One-time passwords: small, urgent.
    Otp,
    /// Order updates, receipts, alerts.
    Transactional,
    /// Campaigns and newsletters.
    Bulk,
}

impl Lane {
    /// All lanes, highest priority first.
    pub const ALL: [Lane; 3] = [Lane::Otp, Lane::Transactional, Lane::Bulk];

    /// Its place in [`Lane::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The routing key and queue suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Otp => "otp",
            Lane::Transactional => "transactional",
            Lane::Bulk => "bulk",
        }
    }

    /// Parses a routing key.
    pub fn parse(s: &str) -> Option<Lane> {
        Lane::ALL.into_iter().find(|l| l.as_str() == s)
    }

    /// What to do when a send's outcome is unknown, unless the job says otherwise.
    pub fn default_delivery(self) -> DeliveryMode {
        match self {
            Lane::Otp => DeliveryMode::AtLeastOnce,
            Lane::Transactional | Lane::Bulk => DeliveryMode::AtMostOnce,
        }
    }
}

/// What to do when a send's outcome is unknown (timeout after the request left).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Never risk a second copy: wait for a webhook, else dead-letter `ambiguous_send`.
    AtMostOnce,
    /// Never risk losing it: send again.
    AtLeastOnce,
}
