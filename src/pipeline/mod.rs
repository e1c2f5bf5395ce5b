//! The worker's pipeline for one delivery: `decode → pace → admit → send → settle`.
//!
//! Each stage is a function with a type between it and the next (`Decoded`, `Paced`,
//! `Admitted`, `Sent`: `stages.rs`), returning `Result<Next, Outcome>`. Pace comes before admit,
//! so the pair rate admission charges is spent at the moment it was admitted for, and the claim
//! admission takes is followed by the send at once. [`Pipeline::process_one`] takes a delivery
//! and settles it exactly once; everything before [`Pipeline::settle`] (`settle.rs`) only
//! *decides* (an [`Outcome`], `outcome.rs`), so every path ends in one place.

mod outcome;
mod pacer;
mod settle;
mod stages;
mod stats;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug_span, info, warn};

pub use crate::vocab::DeferCause;
pub use outcome::{Dead, Later, Outcome};
pub use pacer::Pacer;
pub use stats::{Stats, StatsSnapshot};

use crate::broker::{
    Broker, BrokerError, Delivery, Envelope, EventBatches, H_REROUTED, Route, Target, Unrouted,
};
use crate::cloud::CloudApi;
use crate::config::Number;
use crate::event::DeadReason;
use crate::ids::{PhoneNumberId, WabaId};
use crate::job::{self, Lane};
use crate::policy::admission::{OptInPolicy, PairRate};
use crate::policy::{DelayTiers, RetryPolicy};
use crate::registry::Registry;
use crate::settlement;
use crate::store::{HaltScope, Heartbeat, Store};
use crate::telemetry;

/// Timing knobs of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Identifies this replica in claims.
    pub owner: String,
    /// The lane queues' delivery limit: a job returned this often is dead-lettered
    /// `delivery_limit` on its last delivery.
    pub delivery_limit: u32,
    /// Claim lease (longer than a send can take).
    pub claim_lease: Duration,
    /// How long an at-most-once ambiguous job waits for a webhook.
    pub ambiguous_wait: Duration,
    /// Pause after a halting error.
    pub halt_cooldown: Duration,
    /// Retry backoff.
    pub retry: RetryPolicy,
    /// Delay queues.
    pub tiers: DelayTiers,
    /// Admission rules.
    pub admission: AdmissionSettings,
    /// Throughput sharing among replicas.
    pub pacing: PacingSettings,
}

/// The rules admission applies (besides what the store holds).
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Categories that need an opt-in outside the care window.
    pub opt_in: OptInPolicy,
    /// The pair rate.
    pub pair: PairRate,
    /// Messaging tier per portfolio (`None`: unlimited).
    pub tiers: BTreeMap<WabaId, Option<u32>>,
    /// Tier of a portfolio not listed.
    pub default_tier: Option<u32>,
    /// How often the template registry is re-read from the management API.
    pub template_refresh: Duration,
    /// How long a job of a paused campaign waits before it looks again.
    pub campaign_recheck: Duration,
    /// How long a job for a paused template waits before it looks again.
    pub template_recheck: Duration,
}

/// How replicas pace each number's throughput.
#[derive(Debug, Clone)]
pub struct PacingSettings {
    /// The replicas' group.
    pub group: String,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// A replica silent this long is gone.
    pub replica_ttl: Duration,
    /// Share of the limit used.
    pub headroom: f64,
    /// How long a 130429 slows the number's schedule.
    pub throttle_cooldown: Duration,
}

/// The pipeline and everything it talks to.
pub struct Pipeline {
    cloud: Arc<dyn CloudApi>,
    broker: Arc<dyn Broker>,
    /// The events, published several of a kind to a message.
    events: Arc<EventBatches>,
    store: Arc<dyn Store>,
    numbers: BTreeMap<PhoneNumberId, Number>,
    pacer: Pacer,
    registry: Registry,
    /// The halts in force, as this replica last read them from the store (or raised them).
    halts: Mutex<BTreeMap<HaltScope, DateTime<Utc>>>,
    settings: PipelineSettings,
    stats: Arc<Stats>,
}

impl Pipeline {
    /// Builds a pipeline for the configured numbers.
    pub fn new(
        cloud: Arc<dyn CloudApi>,
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        numbers: BTreeMap<PhoneNumberId, Number>,
        settings: PipelineSettings,
    ) -> Self {
        let pacer = Pacer::new(&numbers, settings.pacing.headroom);
        Pipeline {
            cloud,
            events: EventBatches::new(Arc::clone(&broker)),
            broker,
            store,
            numbers,
            pacer,
            registry: Registry::new(),
            halts: Mutex::new(BTreeMap::new()),
            settings,
            stats: Arc::new(Stats::default()),
        }
    }

    /// Counters and latencies of this replica.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// This replica's side of each number's pacing.
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// Joins the replica group (which tells each number's recorded limit) and loads the
    /// template registry; then keeps both fresh until `stop`. Call before consuming.
    pub async fn start(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        self.heartbeat().await;
        self.refresh_halts().await;
        let mut synced = self.refresh_templates().await;
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(this.settings.pacing.heartbeat);
            let tick = this
                .settings
                .admission
                .template_refresh
                .min(Duration::from_secs(30));
            // A failed sync (the Cloud API not up yet, say) is tried again within seconds,
            // then less and less often: template jobs wait for a first sync.
            let retries = || {
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_secs(1))
                    .with_max_delay(tick)
                    .without_max_times()
                    .build()
            };
            let mut retry = retries();
            let next = |synced: bool, retry: &mut dyn Iterator<Item = Duration>| {
                tokio::time::Instant::now()
                    + if synced {
                        tick
                    } else {
                        retry.next().unwrap_or(tick)
                    }
            };
            let templates = tokio::time::sleep_until(next(synced, &mut retry));
            tokio::pin!(templates);
            beat.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = beat.tick() => {
                        this.heartbeat().await;
                        this.refresh_halts().await;
                    }
                    _ = &mut templates => {
                        synced = this.refresh_templates().await;
                        if synced {
                            retry = retries();
                        }
                        templates.as_mut().reset(next(synced, &mut retry));
                    }
                }
            }
        })
    }

    /// Leaves the replica group (after draining).
    pub async fn leave(&self) {
        let group = &self.settings.pacing.group;
        if let Err(e) = self.store.leave(group, &self.settings.owner).await {
            warn!(error = %e, "could not leave the replica group; the others notice when its heartbeat expires");
        }
    }

    /// Says this replica is alive and applies what it learns; returns the live replicas.
    async fn heartbeat(&self) -> u32 {
        let numbers: Vec<PhoneNumberId> = self.numbers.keys().cloned().collect();
        let beat = Heartbeat {
            group: &self.settings.pacing.group,
            replica: &self.settings.owner,
            now: Utc::now(),
            ttl: self.settings.pacing.replica_ttl,
            numbers: &numbers,
        };
        match self.store.heartbeat(&beat).await {
            Ok(live) => {
                let before = self.pacer.replicas();
                self.pacer.update(&live);
                if live.replicas != before {
                    info!(replicas = live.replicas, "live replicas changed");
                }
                live.replicas
            }
            Err(e) => {
                warn!(error = %e, "heartbeat failed; keeping the last known limits");
                self.pacer.replicas()
            }
        }
    }

    /// Takes the halts in force from the store, where every replica raises them and operators
    /// lift them: a halt one replica met stops the others within a heartbeat. If the store
    /// cannot be read, the halts known are kept.
    async fn refresh_halts(&self) {
        match self.store.halts(Utc::now()).await {
            Ok(halts) => {
                let known = halts
                    .into_iter()
                    .filter_map(|h| HaltScope::parse(&h.scope).map(|scope| (scope, h.until)))
                    .collect();
                *self.halts.lock().expect("halts lock") = known;
            }
            Err(e) => warn!(error = %e, "could not read the shared halts; keeping the known ones"),
        }
    }

    /// Syncs the template registry (one replica per refresh period) and loads it; `false` when
    /// this replica's sync failed.
    pub async fn refresh_templates(&self) -> bool {
        let mut wabas: BTreeMap<WabaId, SecretString> = BTreeMap::new();
        for n in self.numbers.values() {
            wabas
                .entry(n.waba.clone())
                .or_insert_with(|| n.token.clone());
        }
        self.registry
            .refresh(
                self.cloud.as_ref(),
                self.store.as_ref(),
                &wabas,
                &self.settings.owner,
                self.settings.admission.template_refresh,
            )
            .await
    }

    /// Decides and settles one delivery. Never panics on bad input; the only error is a broker
    /// or store failure during settlement, after which the delivery was returned to its queue.
    pub async fn process_one(&self, delivery: Delivery) -> Result<(), SettleError> {
        let span = tracing::info_span!(
            "job",
            job_id = tracing::field::Empty,
            lane = delivery.lane.as_str(),
            attempt = delivery.envelope.headers.attempts() + 1,
            wamid = tracing::field::Empty
        );
        telemetry::adopt_parent(&span, &delivery.envelope.headers);
        async move {
            let outcome = self.decide(&delivery.envelope, delivery.lane).await;
            let (decided, cause) = outcome.describe();
            let settling = debug_span!("settle", outcome = decided, cause);
            self.settle(delivery, outcome).instrument(settling).await
        }
        .instrument(span)
        .await
    }

    /// Settles a job from the unrouted queue. One for a configured number that came under a
    /// legacy key (the lane alone, e.g. `bulk`) is published again under its number's key, once;
    /// anything else is dead-lettered with its reason: `invalid_job`/`unsupported_schema` when
    /// the body does not decode or the key names no lane, `unknown_sender` when the number is
    /// not configured here. Nothing is dropped.
    pub async fn process_unrouted(&self, delivery: Delivery<Unrouted>) -> Result<(), SettleError> {
        let key = delivery.lane.routing_key.clone();
        let route = Route::parse(&key);
        let delivery = delivery.with_origin(route.as_ref().map_or(Lane::Bulk, |r| r.lane));
        let attempts = delivery.envelope.headers.attempts();
        let job = match job::decode(&delivery.envelope.body) {
            Ok(job) => job,
            Err(e) => {
                let outcome = stages::undecodable(&e, &delivery.envelope);
                return self.settle(delivery, outcome).await;
            }
        };
        let dead = |reason, detail: String| Outcome::dead(reason, detail, attempts, job.clone());
        let outcome = match route {
            None => dead(
                DeadReason::InvalidJob,
                format!(
                    "routing key {key:?} names no lane (use <lane>.<phone_number_id>, lane otp, transactional or bulk)"
                ),
            ),
            Some(_) if !self.numbers.contains_key(&job.phone_number_id) => dead(
                DeadReason::UnknownSender,
                format!(
                    "phone_number_id {} is not configured on this worker",
                    job.phone_number_id
                ),
            ),
            Some(_) if delivery.envelope.headers.get_str(H_REROUTED).is_some() => dead(
                DeadReason::UnknownSender,
                format!(
                    "phone_number_id {} is configured but its queues are missing: declare them by starting a worker with this configuration",
                    job.phone_number_id
                ),
            ),
            Some(route) => {
                // CORRECTNESS: published (confirmed) under the number's key before the ack; a
                // crash in between leaves a copy in both queues, and the claim sends it once.
                let route = Route::new(route.lane, job.phone_number_id.as_str());
                let mut headers = delivery.envelope.headers.clone();
                headers.set_str(H_REROUTED, key.as_str());
                let envelope = Envelope {
                    body: delivery.envelope.body.clone(),
                    headers,
                };
                let published = self.broker.publish(Target::Job(route), envelope).await;
                return settlement::ack_or_requeue(delivery, published)
                    .await
                    .map_err(|unsettled| SettleError::Broker(unsettled.into_error()));
            }
        };
        self.settle(delivery, outcome).await
    }

    /// The configured numbers: each has its own queues, served by its own loop.
    pub fn numbers(&self) -> impl Iterator<Item = &PhoneNumberId> {
        self.numbers.keys()
    }

    /// Decides what to do with a job, `decode → pace → admit → send`; no side effect but the
    /// slot, the claim, the send and what its answer means for the store.
    pub async fn decide(&self, envelope: &Envelope, lane: Lane) -> Outcome {
        let stages = async {
            let decoded = match self.decode(envelope, lane) {
                Err(Outcome::Dead(dead)) if dead.reason == DeadReason::DeliveryLimit => {
                    return Err(self.last_delivery(dead).await);
                }
                decoded => decoded?,
            };
            let paced = self.pace(decoded).instrument(debug_span!("pace")).await?;
            let admitted = self.admit(paced).instrument(debug_span!("admit")).await?;
            self.send(admitted).await
        };
        match stages.await {
            Ok(sent) => sent.into(),
            Err(decided) => decided,
        }
    }
}

/// Settlement failed; the delivery was returned to its queue.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The broker failed to confirm a publish or an ack.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}
