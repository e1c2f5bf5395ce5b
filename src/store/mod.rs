//! Shared state behind the [`Store`] trait: Redis ([`redis`]) for production, in-process
//! ([`memory`]) for the embedded demo; both pass the same conformance tests
//! (`tests/store_conformance.rs`). Today it holds the idempotency record of DESIGN.md §6.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::DeadReason;
use crate::ids::{JobId, WabaId, Wamid};

/// How long an idempotency record outlives its job (Meta retries webhooks for 7 days).
pub const JOB_RECORD_TTL: Duration = Duration::from_secs(8 * 24 * 3600);
/// How long a wamid stays correlated with its job.
pub const WAMID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Identifies a job's record: its portfolio (the Redis Cluster hash tag) and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    /// The WABA owning the sending number.
    pub waba: WabaId,
    /// The job.
    pub job_id: JobId,
}

/// The answer to "may I send this job now?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Claimed for this worker: go ahead.
    Fresh,
    /// Already accepted by Meta: never send again.
    Sent(Wamid),
    /// Already dead-lettered.
    Dead,
    /// Another worker holds a fresh claim: defer.
    Busy,
    /// An earlier send's outcome is unknown since this time (timeout, or a worker died
    /// mid-send); an at-most-once job waits for a webhook to tell.
    Ambiguous(DateTime<Utc>),
}

/// What the webhook processor needs to find a job from a wamid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WamidRecord {
    /// The job.
    pub job_id: String,
    /// Its campaign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// Its trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached at start-up.
    #[error(
        "cannot reach Redis at {url}: {detail}. Is it running? Start it with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no"
    )]
    Unreachable {
        /// The address (without credentials).
        url: String,
        /// The cause.
        detail: String,
    },
    /// A command failed.
    #[error("redis {operation} failed: {detail}")]
    Command {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        detail: String,
    },
}

/// Shared state as the pipeline sees it.
#[async_trait]
pub trait Store: Send + Sync {
    /// Claims a job before sending it (one round trip, atomic across replicas). A claim older
    /// than `lease` counts as ambiguous (its owner died mid-send). With `retake_ambiguous`
    /// (at-least-once jobs) an ambiguous job is claimed afresh instead.
    async fn claim(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        retake_ambiguous: bool,
    ) -> Result<Claim, StoreError>;
    /// Records that Meta accepted the job, and indexes the wamid for webhook correlation.
    async fn mark_sent(
        &self,
        key: &JobKey,
        wamid: &Wamid,
        record: &WamidRecord,
    ) -> Result<(), StoreError>;
    /// Records that the send's outcome is unknown since `now`.
    async fn mark_ambiguous(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Drops this worker's claim after a definitive failure, so a retry may claim it again.
    async fn release(&self, key: &JobKey, owner: &str) -> Result<(), StoreError>;
    /// Records that the job was dead-lettered.
    async fn mark_dead(&self, key: &JobKey, reason: DeadReason) -> Result<(), StoreError>;
    /// Finds the job behind a wamid.
    async fn wamid(&self, wamid: &Wamid) -> Result<Option<WamidRecord>, StoreError>;
}
