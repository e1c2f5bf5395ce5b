//! The worker's pipeline for one delivery: `decode → pace → admit → send → settle`.
//!
//! [`Pipeline::process_one`] takes a delivery and settles it exactly once; everything before
//! [`Pipeline::settle`] only *decides* (an [`Outcome`]), so every path ends in one place.

mod outcome;
mod pacer;
mod settle;
mod stats;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

pub use outcome::{Dead, Later, Outcome};
pub use pacer::Pacer;
pub use stats::{Stats, StatsSnapshot};

use crate::broker::{
    Broker, BrokerError, Delivery, Envelope, H_DUE, H_REROUTED, Route, Target, Unrouted,
};
use crate::cloud::{CloudApi, OutboundMessage, SendError, SendRequest};
use crate::config::Number;
use crate::event::{DeadReason, ErrorSource, EventError};
use crate::ids::{PhoneNumberId, WabaId};
use crate::job::{self, Body, Category, DeliveryMode, Lane, Message, SendJob};
use crate::policy::admission::{self, DeadWhy, OptInPolicy, PairRate, TemplateUse, Verdict};
use crate::policy::{self, Action, DelayTiers, RetryPolicy, Scope, template};
use crate::registry::Registry;
use crate::settlement;
use crate::store::{Heartbeat, JobKey, Resend, Store, StoreError, Subject, WamidRecord};
use crate::telemetry;

/// How long a throttled job waits before it is tried again.
const THROTTLE_WAIT: Duration = Duration::from_secs(1);
/// How long a job waits when the store cannot be reached.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// How often an at-most-once job with an unknown outcome looks for its webhook.
const AMBIGUOUS_RECHECK: Duration = Duration::from_secs(30);
/// A job woken later than this after its send slot books another one.
const LATE_SLOT: Duration = Duration::from_millis(10);
/// How many times a job late for its slot books again before it goes anyway.
const LATE_REBOOKS: u32 = 3;
/// How long a job for a paused template waits before it looks again.
const PARKED_TEMPLATE_WAIT: Duration = Duration::from_secs(600);

/// Timing knobs of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Identifies this replica in claims.
    pub owner: String,
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

/// A send-time error that stops a whole number, account or token for a while.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HaltKey {
    Number(PhoneNumberId),
    Waba(WabaId),
    Token,
    App,
}

/// The pipeline and everything it talks to.
pub struct Pipeline {
    cloud: Arc<dyn CloudApi>,
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    numbers: BTreeMap<PhoneNumberId, Number>,
    pacer: Pacer,
    registry: Registry,
    halts: Mutex<HashMap<HaltKey, Instant>>,
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
            broker,
            store,
            numbers,
            pacer,
            registry: Registry::new(),
            halts: Mutex::new(HashMap::new()),
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
        self.refresh_templates().await;
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(this.settings.pacing.heartbeat);
            let tick = this
                .settings
                .admission
                .template_refresh
                .min(Duration::from_secs(30));
            let mut templates = tokio::time::interval(tick);
            beat.tick().await;
            templates.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = beat.tick() => { this.heartbeat().await; }
                    _ = templates.tick() => this.refresh_templates().await,
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

    /// Syncs the template registry (one replica per refresh period) and loads it.
    pub async fn refresh_templates(&self) {
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
            .await;
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
            self.settle(delivery, outcome).await
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
                let outcome = undecodable(e, &delivery.envelope);
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

    /// Decides what to do with a job; no side effect but the claim and the send.
    pub async fn decide(&self, envelope: &Envelope, lane: Lane) -> Outcome {
        let attempts = envelope.headers.attempts();
        let job = match job::decode(&envelope.body) {
            Ok(job) => job,
            Err(e) => return undecodable(e, envelope),
        };
        tracing::Span::current().record("job_id", job.job_id.as_str());
        // The store keeps milliseconds; deciding on the same precision keeps both stores equal.
        let now = truncate_to_millis(Utc::now());
        let dead = |reason, detail: String, job| Outcome::dead(reason, detail, attempts, job);
        let later = |due, why: &str, job: SendJob| Outcome::later(due, attempts, why, None, job);

        let Some(number) = self.numbers.get(&job.phone_number_id) else {
            let detail = format!(
                "phone_number_id {} is not configured on this worker",
                job.phone_number_id
            );
            return dead(DeadReason::UnknownSender, detail, job);
        };
        let due = envelope
            .headers
            .get_str(H_DUE)
            .and_then(|d| DateTime::parse_from_rfc3339(&d).ok())
            .map(|d| d.with_timezone(&Utc));
        let not_before = job.not_before.into_iter().chain(due).max();
        // A scheduled job, or a deferred one that came back from a delay queue before its due
        // time (tiers are chosen so it never comes back late), waits again without touching the
        // store or a send slot (admission would say the same). Only the first deferral of a
        // scheduled job is announced; the hops through shorter tiers are silent.
        if let Some(not_before) = not_before
            && not_before > now
            && job.expires_at.is_none_or(|e| e > now)
        {
            return match due.filter(|d| *d > now) {
                Some(_) => Outcome::later_silent(not_before, attempts, "not yet due", job),
                None => later(not_before, "not_before", job),
            };
        }
        if let Some(until) = self.halted_until(&job, number) {
            return later(until, "sending halted", job);
        }

        // 10. pace first: book this job's slot in the number's schedule, shared by every
        // replica, and wait for it. The send must follow admission at once (the pair rate
        // admitted at one time would be spent at another, and a worker that dies between
        // claim and send leaves an ambiguous claim), so admission comes after the wait. A slot
        // taken by a job admission then refuses is lost; that only slows a number whose jobs
        // are being refused.
        if let Some(interval) = self.pacer.interval(&job.phone_number_id) {
            let _ahead = self
                .pacer
                .book_ahead(&job.phone_number_id, lane == Lane::Otp)
                .await;
            for rebook in 0..=LATE_REBOOKS {
                let (wall, instant) = (Utc::now(), Instant::now());
                let booked = self
                    .store
                    .book_slot(&number.waba, &job.phone_number_id, wall, interval)
                    .await;
                // The wait counts from when the slot was asked for, not from the answer, so a
                // slow round trip does not make one send later than its slot.
                let slot = match booked {
                    Ok(wait) => instant + wait,
                    Err(e) => return self.store_unavailable(e, job, attempts),
                };
                self.pacer.wait(&job.phone_number_id, slot).await;
                // CORRECTNESS: the schedule keeps every 1 s window within the limit only for
                // sends that leave their slots less than the headroom's worth late; one woken
                // much later (a stalled machine) would crowd the next second at Meta, so it
                // books a new slot instead (a few times at most, so an overloaded replica
                // still sends).
                if slot.elapsed() <= LATE_SLOT || rebook == LATE_REBOOKS {
                    break;
                }
            }
        }
        let now = truncate_to_millis(Utc::now());

        // 2-9. admission: one round trip, atomic across replicas.
        let key = JobKey {
            waba: number.waba.clone(),
            job_id: job.job_id.clone(),
        };
        let mode = job.delivery_mode(lane);
        let (template, free_form) = match &job.message.body {
            Body::Template(t) => (Some(t), false),
            _ => (job.fallback_template.as_ref(), true),
        };
        let definition =
            template.and_then(|t| self.registry.get(&number.waba, &t.name, &t.language.code));
        let subject = Subject {
            job: key.clone(),
            number: job.phone_number_id.clone(),
            to: job.to.clone(),
            campaign: job.campaign_id.clone(),
            template: template.map(|t| (t.name.clone(), t.language.code.clone())),
        };
        let request = admission::Request {
            owner: self.settings.owner.clone(),
            now,
            lease: self.settings.claim_lease,
            retake_ambiguous: mode == DeliveryMode::AtLeastOnce,
            expires_at: job.expires_at,
            not_before,
            free_form,
            template: template.map(|t| TemplateUse {
                fallback: free_form,
                params: definition.as_ref().and_then(|def| template::check(def, t)),
            }),
            opt_in: self.settings.admission.opt_in,
            tier_limit: self
                .settings
                .admission
                .tiers
                .get(&number.waba)
                .copied()
                .unwrap_or(self.settings.admission.default_tier),
            pair: self.settings.admission.pair,
            campaign_recheck: self.settings.admission.campaign_recheck,
            template_recheck: self.settings.admission.template_recheck,
        };
        let send_fallback = match self.store.admit(&subject, &request).await {
            Ok(Verdict::Send { fallback }) => fallback,
            Ok(Verdict::AlreadySent(wamid)) => {
                self.stats.count_duplicate_avoided();
                return Outcome::already_sent(&job, &wamid);
            }
            Ok(Verdict::AlreadyDead) => return Outcome::already_dead(),
            Ok(Verdict::Defer { until, why }) => {
                return Outcome::later(
                    until,
                    attempts,
                    why.label(),
                    Some(EventError {
                        code: None,
                        title: why.label().into(),
                        details: why.to_string(),
                        source: ErrorSource::Policy,
                    }),
                    job,
                );
            }
            Ok(Verdict::Dead(why)) => {
                let detail = match (&why, template) {
                    (DeadWhy::TemplateUnknown | DeadWhy::TemplateNotApproved { .. }, Some(t)) => {
                        format!("template {} ({}): {why}", t.name, t.language.code)
                    }
                    _ => why.to_string(),
                };
                return dead(why.reason(), detail, job);
            }
            Ok(Verdict::Ambiguous(since)) => {
                let waited = now
                    .signed_duration_since(since)
                    .to_std()
                    .unwrap_or_default();
                if waited >= self.settings.ambiguous_wait {
                    let detail = format!(
                        "send outcome unknown since {since} and no status webhook arrived within {}s",
                        self.settings.ambiguous_wait.as_secs()
                    );
                    return dead(DeadReason::AmbiguousSend, detail, job);
                }
                let recheck = (self.settings.ambiguous_wait - waited).min(AMBIGUOUS_RECHECK);
                return later(
                    now + recheck,
                    "waiting for a webhook after an ambiguous send",
                    job,
                );
            }
            Err(e) => return self.store_unavailable(e, job, attempts),
        };

        // send
        let fallback_message;
        let message = match (&job.fallback_template, send_fallback) {
            (Some(t), true) => {
                fallback_message = Message {
                    body: Body::Template(t.clone()),
                    context: None,
                };
                &fallback_message
            }
            _ => &job.message,
        };
        let body = serde_json::to_vec(&OutboundMessage::new(
            job.to.as_str(),
            message,
            job.job_id.as_str(),
        ))
        .expect("a validated message always serialises");
        let started = Instant::now();
        let result = self
            .cloud
            .send(SendRequest {
                phone_number_id: job.phone_number_id.clone(),
                token: number.token.clone(),
                body,
            })
            .await;
        self.stats.record_send_latency(started.elapsed());
        let attempts = attempts + 1;
        match result {
            Ok(accepted) => {
                tracing::Span::current().record("wamid", accepted.wamid.as_str());
                // The template sent is the job's or its fallback: the definition checked above.
                let marketing = matches!(message.body, Body::Template(_))
                    && definition.is_some_and(|def| def.category() == Some(Category::Marketing));
                let record = WamidRecord {
                    job_id: job.job_id.to_string(),
                    campaign_id: job.campaign_id.as_ref().map(ToString::to_string),
                    traceparent: envelope.headers.get_str(crate::broker::H_TRACEPARENT),
                    metadata: job.metadata.clone(),
                    resend: marketing.then(|| Resend {
                        job: String::from_utf8_lossy(&envelope.body).into_owned(),
                        lane,
                    }),
                };
                if let Err(e) = self.store.mark_sent(&key, &accepted.wamid, &record).await {
                    // The message exists; the event below still reports it. A redelivery would
                    // find a stale claim and treat it as ambiguous, never resend blindly.
                    error!(error = %e, "could not record the accepted send");
                }
                Outcome::accepted(&job, &accepted.wamid, attempts)
            }
            Err(SendError::Api(api)) => self.on_api_error(api, job, key, attempts, now).await,
            Err(SendError::NotSent(detail)) => {
                self.release(&key).await;
                self.retry(
                    job,
                    attempts,
                    EventError {
                        code: None,
                        title: "request not sent".into(),
                        details: detail,
                        source: ErrorSource::Api,
                    },
                )
            }
            Err(SendError::Ambiguous(detail)) => {
                let error = EventError {
                    code: None,
                    title: "send outcome unknown".into(),
                    details: detail,
                    source: ErrorSource::Api,
                };
                match mode {
                    DeliveryMode::AtLeastOnce => {
                        self.release(&key).await;
                        self.retry(job, attempts, error)
                    }
                    DeliveryMode::AtMostOnce => {
                        // CORRECTNESS: the message may exist; mark it so no worker resends it,
                        // and wait for a status webhook carrying this job_id to settle it.
                        if let Err(e) = self
                            .store
                            .mark_ambiguous(&key, &self.settings.owner, now)
                            .await
                        {
                            warn!(error = %e, "could not mark the send ambiguous; the stale claim will be treated as ambiguous");
                        }
                        let recheck = self.settings.ambiguous_wait.min(AMBIGUOUS_RECHECK);
                        Outcome::later(now + recheck, attempts, "ambiguous send", Some(error), job)
                    }
                }
            }
        }
    }

    async fn on_api_error(
        &self,
        api: crate::cloud::ApiError,
        job: SendJob,
        key: JobKey,
        attempts: u32,
        now: DateTime<Utc>,
    ) -> Outcome {
        let error = EventError {
            code: Some(api.code),
            title: api.message.clone(),
            details: api.details().to_owned(),
            source: ErrorSource::Api,
        };
        let action = policy::classify(api.code());
        debug!(
            code = api.code,
            fbtrace_id = api.fbtrace_id.as_deref().unwrap_or(""),
            ?action,
            "cloud api error"
        );
        if let Action::DeadLetter(reason) = action {
            return Outcome::dead_after(reason, &error, error.details.clone(), attempts, job);
        }
        self.release(&key).await;
        let wait = |d: Duration, why: &str, attempts| {
            Outcome::later(now + d, attempts, why, Some(error.clone()), job.clone())
        };
        match action {
            Action::Retry => self.retry(job, attempts, error),
            // A throttle is not the job's fault: it does not use up an attempt.
            Action::Throttle(scope) => {
                if scope == Scope::Number {
                    let cooldown = self.settings.pacing.throttle_cooldown;
                    warn!(
                        cooldown_s = cooldown.as_secs(),
                        "130429 from Meta: the number's send schedule slows by a tenth for a while"
                    );
                    if let Err(e) = self
                        .store
                        .throttled(&key.waba, &job.phone_number_id, now, cooldown)
                        .await
                    {
                        warn!(error = %e, "could not slow the number's send schedule");
                    }
                }
                wait(THROTTLE_WAIT, "throttled", attempts - 1)
            }
            Action::Halt(scope) => {
                let halt_key = match scope {
                    Scope::Number | Scope::Pair => HaltKey::Number(job.phone_number_id.clone()),
                    Scope::Waba => HaltKey::Waba(key.waba.clone()),
                    Scope::Token => HaltKey::Token,
                    Scope::App => HaltKey::App,
                };
                error!(code = api.code, scope = ?scope, cooldown_s = self.settings.halt_cooldown.as_secs(), "sending halted by a Cloud API error; jobs are parked until the cool-down ends");
                self.stats.count_halt();
                self.halts
                    .lock()
                    .expect("halts lock")
                    .insert(halt_key, Instant::now() + self.settings.halt_cooldown);
                wait(self.settings.halt_cooldown, "sending halted", attempts - 1)
            }
            Action::ParkTemplate => wait(PARKED_TEMPLATE_WAIT, "template paused", attempts - 1),
            Action::Cooldown(d) => wait(d, "recipient cool-down", attempts - 1),
            Action::DeadLetter(_) => unreachable!("handled above"),
        }
    }

    fn retry(&self, job: SendJob, attempts: u32, error: EventError) -> Outcome {
        match self.settings.retry.delay_after(attempts) {
            Some(delay) => Outcome::later(Utc::now() + delay, attempts, "retry", Some(error), job),
            None => {
                let detail = format!(
                    "gave up after {attempts} attempts; last error: {}",
                    error.details
                );
                Outcome::dead_after(DeadReason::MaxAttempts, &error, detail, attempts, job)
            }
        }
    }

    fn store_unavailable(&self, e: StoreError, job: SendJob, attempts: u32) -> Outcome {
        // Without the claim there is no duplicate protection: do not send, try again shortly.
        warn!(error = %e, "store unavailable, deferring the job");
        Outcome::later(
            Utc::now() + BUSY_WAIT,
            attempts,
            "store unavailable",
            None,
            job,
        )
    }

    async fn release(&self, key: &JobKey) {
        if let Err(e) = self.store.release(key, &self.settings.owner).await {
            warn!(error = %e, "could not release the claim; the job waits for the claim lease");
        }
    }

    fn halted_until(&self, job: &SendJob, number: &Number) -> Option<DateTime<Utc>> {
        let mut halts = self.halts.lock().expect("halts lock");
        let now = Instant::now();
        halts.retain(|_, until| *until > now);
        [
            HaltKey::Number(job.phone_number_id.clone()),
            HaltKey::Waba(number.waba.clone()),
            HaltKey::Token,
            HaltKey::App,
        ]
        .iter()
        .filter_map(|k| halts.get(k))
        .max()
        .map(|until| Utc::now() + (*until - now))
    }
}

/// The dead letter of a body that is not a valid job, with the decoder's specific reason.
fn undecodable(e: job::JobError, envelope: &Envelope) -> Outcome {
    Outcome::undecodable(
        &e,
        envelope.headers.attempts(),
        job::salvage_job_id(&envelope.body),
    )
}

/// `t` without its sub-millisecond part.
fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Settlement failed; the delivery was returned to its queue.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The broker failed to confirm a publish or an ack.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}
