//! What the simulator saw: accepted sends in order, errors by code, duplicates, the peak
//! number of sends per number in any 1 s window, and what its webhooks did.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// One accepted send.
#[derive(Debug, Clone, Serialize)]
pub struct AcceptedSend {
    /// Sending number.
    pub phone_number_id: String,
    /// Recipient.
    pub to: String,
    /// Message type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `biz_opaque_callback_data` (the job id).
    pub job_id: Option<String>,
    /// The wamid given.
    pub wamid: String,
    /// The WABA of the sending number (its portfolio's messaging tier).
    pub waba_id: String,
    /// The user's care window was closed: the send counts against the messaging tier.
    pub outside_window: bool,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
    /// When it was accepted.
    #[serde(skip)]
    pub at: Option<Instant>,
}

/// Per-number figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NumberAudit {
    /// Accepted sends.
    pub accepted: u64,
    /// Highest count of accepted sends in any 1 s window.
    pub peak_per_second: u64,
}

/// What the webhook dispatcher did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WebhookAudit {
    /// Updates scheduled, by kind (`sent`, `delivered`, `read`, `failed:131047`, `inbound`, …).
    pub scheduled: BTreeMap<String, u64>,
    /// Updates posted a second time on purpose (Meta duplicates).
    pub duplicated: u64,
    /// POSTs answered 200.
    pub delivered_posts: u64,
    /// Attempts that failed (non-200 or no answer) and were retried or given up.
    pub failed_attempts: u64,
    /// POSTs given up after the last attempt.
    pub given_up: u64,
    /// Updates inside POSTs answered 200.
    pub delivered_updates: u64,
}

/// The simulator's audit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    /// Accepted sends in order of acceptance.
    pub accepted: Vec<AcceptedSend>,
    /// `biz_opaque_callback_data` of every send request that reached the simulator, whatever
    /// became of it (answered, refused, or cut off by a client that went away): a job not
    /// here never reached the Cloud API.
    #[serde(skip)]
    pub arrived: HashSet<String>,
    /// Error answers by `error.code` (bare HTTP faults under 0).
    pub errors: BTreeMap<i64, u64>,
    /// Sends accepted more than once for the same `biz_opaque_callback_data`, with the count.
    pub duplicates: BTreeMap<String, u64>,
    /// Webhook delivery figures.
    pub webhooks: WebhookAudit,
    /// Request bodies, when recording is on ([`super::Simulator::record_requests`]).
    #[serde(skip)]
    pub requests: Vec<serde_json::Value>,
    #[serde(skip)]
    pub(crate) seen: HashMap<String, u64>,
    #[serde(skip)]
    pub(crate) started: Option<Instant>,
}

impl Audit {
    pub(crate) fn record_accepted(&mut self, mut send: AcceptedSend, now: Instant) {
        let started = *self.started.get_or_insert(now);
        send.at_ms = now.duration_since(started).as_millis() as u64;
        send.at = Some(now);
        if let Some(job) = &send.job_id {
            let n = self.seen.entry(job.clone()).or_default();
            *n += 1;
            if *n > 1 {
                self.duplicates.insert(job.clone(), *n);
            }
        }
        self.accepted.push(send);
    }

    pub(crate) fn record_arrival(&mut self, job_id: String) {
        self.arrived.insert(job_id);
    }

    pub(crate) fn record_error(&mut self, code: i64) {
        *self.errors.entry(code).or_default() += 1;
    }

    /// Count of error answers with this code.
    pub fn error_count(&self, code: i64) -> u64 {
        self.errors.get(&code).copied().unwrap_or(0)
    }

    /// Figures per number, with the peak in any sliding 1 s window.
    pub fn numbers(&self) -> BTreeMap<String, NumberAudit> {
        let mut by_number: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        for s in &self.accepted {
            by_number
                .entry(s.phone_number_id.clone())
                .or_default()
                .extend(s.at);
        }
        by_number
            .into_iter()
            .map(|(number, times)| {
                let mut peak = 0;
                let mut start = 0;
                for end in 0..times.len() {
                    while times[end].duration_since(times[start]) >= Duration::from_secs(1) {
                        start += 1;
                    }
                    peak = peak.max(end - start + 1);
                }
                (
                    number,
                    NumberAudit {
                        accepted: times.len() as u64,
                        peak_per_second: peak as u64,
                    },
                )
            })
            .collect()
    }

    /// Unique users a WABA's numbers sent to outside their care window (Meta's messaging tier
    /// counts these per rolling 24 h; a simulator run is shorter than that).
    pub fn unique_outside_window(&self, waba_id: &str) -> usize {
        self.accepted
            .iter()
            .filter(|s| s.outside_window && s.waba_id == waba_id)
            .map(|s| s.to.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Position (0-based) of a job among accepted sends.
    pub fn position(&self, job_id: &str) -> Option<usize> {
        self.accepted
            .iter()
            .position(|s| s.job_id.as_deref() == Some(job_id))
    }

    /// How often a job was accepted.
    pub fn times_sent(&self, job_id: &str) -> u64 {
        self.seen.get(job_id).copied().unwrap_or(0)
    }
}
