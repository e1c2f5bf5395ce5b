//! The worker's pipeline for one delivery: `decode → admit → pace → send → settle`.
//!
//! [`Pipeline::process_one`] takes a delivery and settles it exactly once; everything before
//! [`Pipeline::settle`] only *decides* (an [`Outcome`]), so every path ends in one place.

mod stats;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tracing::{Instrument, debug, error, warn};

pub use stats::{Stats, StatsSnapshot};

use crate::broker::{
    Broker, BrokerError, Delivery, Envelope, H_ATTEMPTS, H_DETAIL, H_DUE, H_ERROR_CODE, H_REASON,
    Headers, Target,
};
use crate::cloud::{CloudApi, OutboundMessage, SendError, SendRequest};
use crate::config::Number;
use crate::event::{DeadReason, ErrorSource, Event, EventError};
use crate::ids::{PhoneNumberId, WabaId};
use crate::job::{self, DeliveryMode, Lane, SendJob};
use crate::policy::{self, Action, DelayTiers, RetryPolicy, Scope};
use crate::store::{Claim, JobKey, Store, StoreError, WamidRecord};
use crate::telemetry;

/// How long a throttled job waits before it is tried again.
const THROTTLE_WAIT: Duration = Duration::from_secs(1);
/// How long a job claimed by another live worker waits.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// How often an at-most-once job with an unknown outcome looks for its webhook.
const AMBIGUOUS_RECHECK: Duration = Duration::from_secs(30);
/// How long a job for a paused template waits before it looks again.
const PARKED_TEMPLATE_WAIT: Duration = Duration::from_secs(600);

/// The decision for one delivery.
#[derive(Debug)]
pub enum Outcome {
    /// Meta accepted it: publish `message.accepted`, ack.
    Accepted(Box<Event>),
    /// Nothing to do: it was sent (re-announce its `message.accepted`) or dead-lettered before.
    AlreadyDone(Option<Box<Event>>),
    /// Not now: publish to a delay queue, ack.
    Later(Later),
    /// Never: publish to `wa.dead` and `job.dead_lettered`, ack.
    Dead(Box<Dead>),
}

/// A deferral or retry.
#[derive(Debug)]
pub struct Later {
    /// When it is due.
    pub due: DateTime<Utc>,
    /// Attempts after this delivery.
    pub attempts: u32,
    /// Short cause, for logs and the `job.deferred` event.
    pub why: String,
    /// The error that caused it, if any.
    pub error: Option<EventError>,
    /// The job (absent only if it could not be decoded, which never defers).
    pub job: Option<Box<SendJob>>,
}

/// A dead letter.
#[derive(Debug)]
pub struct Dead {
    /// The reason (a closed set).
    pub reason: DeadReason,
    /// Meta's code, when Meta said so.
    pub code: Option<i64>,
    /// Specific detail.
    pub detail: String,
    /// Where it was found.
    pub source: ErrorSource,
    /// Attempts made.
    pub attempts: u32,
    /// The job, if it decoded.
    pub job: Option<Box<SendJob>>,
    /// Its `job_id` if it could be salvaged from an undecodable body.
    pub salvaged_job_id: Option<String>,
}

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
    limiters: HashMap<PhoneNumberId, DefaultDirectRateLimiter>,
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
        let limiters = numbers
            .iter()
            .map(|(id, n)| {
                // CORRECTNESS: Meta counts sends in any 1 s window. A bucket of `burst` refilled
                // at `rate`/s admits at most burst + rate in one second, so rate = limit - burst.
                let burst = (n.throughput_mps / 10).max(1);
                let rate = n.throughput_mps.saturating_sub(burst).max(1);
                let quota = Quota::with_period(Duration::from_secs(1) / rate)
                    .expect("period above zero")
                    .allow_burst(NonZeroU32::new(burst).expect("burst at least 1"));
                (id.clone(), RateLimiter::direct(quota))
            })
            .collect();
        Pipeline {
            cloud,
            broker,
            store,
            numbers,
            limiters,
            halts: Mutex::new(HashMap::new()),
            settings,
            stats: Arc::new(Stats::default()),
        }
    }

    /// Counters and latencies of this replica.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
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

    /// Decides what to do with a job; no side effect but the claim and the send.
    pub async fn decide(&self, envelope: &Envelope, lane: Lane) -> Outcome {
        let attempts = envelope.headers.attempts();
        let job = match job::decode(&envelope.body) {
            Ok(job) => job,
            Err(e) => {
                return Outcome::Dead(Box::new(Dead {
                    reason: e.reason(),
                    code: None,
                    detail: e.to_string(),
                    source: ErrorSource::Policy,
                    attempts,
                    job: None,
                    salvaged_job_id: job::salvage_job_id(&envelope.body),
                }));
            }
        };
        tracing::Span::current().record("job_id", job.job_id.as_str());
        let now = Utc::now();
        let dead = |reason, detail: String, job: SendJob| {
            Outcome::Dead(Box::new(Dead {
                reason,
                code: None,
                detail,
                source: ErrorSource::Policy,
                attempts,
                job: Some(Box::new(job)),
                salvaged_job_id: None,
            }))
        };
        let later = |due, why: &str, job: SendJob| {
            Outcome::Later(Later {
                due,
                attempts,
                why: why.into(),
                error: None,
                job: Some(Box::new(job)),
            })
        };

        let Some(number) = self.numbers.get(&job.phone_number_id) else {
            let detail = format!(
                "phone_number_id {} is not configured on this worker",
                job.phone_number_id
            );
            return dead(DeadReason::UnknownSender, detail, job);
        };
        if let Some(expires_at) = job.expires_at
            && expires_at <= now
        {
            return dead(
                DeadReason::Expired,
                format!("expires_at {expires_at} passed before it could be sent"),
                job,
            );
        }
        let due = envelope
            .headers
            .get_str(H_DUE)
            .and_then(|d| DateTime::parse_from_rfc3339(&d).ok())
            .map(|d| d.with_timezone(&Utc));
        if let Some(not_before) = job.not_before.into_iter().chain(due).max()
            && not_before > now
        {
            return later(not_before, "not_before", job);
        }
        if let Some(until) = self.halted_until(&job, number) {
            return later(until, "sending halted", job);
        }

        let key = JobKey {
            waba: number.waba.clone(),
            job_id: job.job_id.clone(),
        };
        let mode = job.delivery_mode(lane);
        let claim = self
            .store
            .claim(
                &key,
                &self.settings.owner,
                now,
                self.settings.claim_lease,
                mode == DeliveryMode::AtLeastOnce,
            )
            .await;
        match claim {
            Ok(Claim::Fresh) => {}
            Ok(Claim::Sent(wamid)) => {
                self.stats.count_duplicate_avoided();
                let mut event = Event::for_job("message.accepted", &job);
                event.wamid = Some(wamid.to_string());
                return Outcome::AlreadyDone(Some(Box::new(event)));
            }
            Ok(Claim::Dead) => return Outcome::AlreadyDone(None),
            Ok(Claim::Busy) => return later(now + BUSY_WAIT, "claimed by another worker", job),
            Ok(Claim::Ambiguous(since)) => {
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
        }

        // pace: this replica's share of the number's throughput.
        if let Some(limiter) = self.limiters.get(&job.phone_number_id) {
            limiter.until_ready().await;
        }

        // send
        let body = serde_json::to_vec(&OutboundMessage::new(
            job.to.as_str(),
            &job.message,
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
                let record = WamidRecord {
                    job_id: job.job_id.to_string(),
                    campaign_id: job.campaign_id.as_ref().map(ToString::to_string),
                    traceparent: envelope.headers.get_str(crate::broker::H_TRACEPARENT),
                };
                if let Err(e) = self.store.mark_sent(&key, &accepted.wamid, &record).await {
                    // The message exists; the event below still reports it. A redelivery would
                    // find a stale claim and treat it as ambiguous, never resend blindly.
                    error!(error = %e, "could not record the accepted send");
                }
                let mut event = Event::for_job("message.accepted", &job);
                event.wamid = Some(accepted.wamid.to_string());
                event.attempts = Some(attempts);
                Outcome::Accepted(Box::new(event))
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
                        Outcome::Later(Later {
                            due: now + recheck,
                            attempts,
                            why: "ambiguous send".into(),
                            error: Some(error),
                            job: Some(Box::new(job)),
                        })
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
            return Outcome::Dead(Box::new(Dead {
                reason,
                code: Some(api.code),
                detail: error.details,
                source: ErrorSource::Api,
                attempts,
                job: Some(Box::new(job)),
                salvaged_job_id: None,
            }));
        }
        self.release(&key).await;
        let wait = |d: Duration, why: &str, attempts| {
            Outcome::Later(Later {
                due: now + d,
                attempts,
                why: why.into(),
                error: Some(error.clone()),
                job: Some(Box::new(job.clone())),
            })
        };
        match action {
            Action::Retry => self.retry(job, attempts, error),
            // A throttle is not the job's fault: it does not use up an attempt.
            Action::Throttle(_) => wait(THROTTLE_WAIT, "throttled", attempts - 1),
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
            Some(delay) => Outcome::Later(Later {
                due: Utc::now() + delay,
                attempts,
                why: "retry".into(),
                error: Some(error),
                job: Some(Box::new(job)),
            }),
            None => Outcome::Dead(Box::new(Dead {
                reason: DeadReason::MaxAttempts,
                code: error.code,
                detail: format!(
                    "gave up after {attempts} attempts; last error: {}",
                    error.details
                ),
                source: error.source,
                attempts,
                job: Some(Box::new(job)),
                salvaged_job_id: None,
            })),
        }
    }

    fn store_unavailable(&self, e: StoreError, job: SendJob, attempts: u32) -> Outcome {
        // Without the claim there is no duplicate protection: do not send, try again shortly.
        warn!(error = %e, "store unavailable, deferring the job");
        Outcome::Later(Later {
            due: Utc::now() + BUSY_WAIT,
            attempts,
            why: "store unavailable".into(),
            error: None,
            job: Some(Box::new(job)),
        })
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

    /// Applies an outcome: the one place a delivery is acked.
    pub async fn settle(&self, delivery: Delivery, outcome: Outcome) -> Result<(), SettleError> {
        let lane = delivery.lane;
        let published = match &outcome {
            Outcome::Accepted(event) => {
                debug!(wamid = event.wamid.as_deref().unwrap_or(""), "accepted");
                self.publish_event(event).await
            }
            Outcome::AlreadyDone(event) => match event {
                Some(event) => self.publish_event(event).await,
                None => Ok(()),
            },
            Outcome::Later(later) => self.publish_later(&delivery.envelope, lane, later).await,
            Outcome::Dead(dead) => self.publish_dead(&delivery.envelope, dead).await,
        };
        // CORRECTNESS: ack only after every publish is confirmed; if one failed, the delivery
        // goes back to its queue and is decided again (the claim prevents a second send).
        if let Err(e) = published {
            error!(error = %e, "settlement publish failed; returning the job to its queue");
            let _ = delivery.requeue().await;
            return Err(SettleError::Broker(e));
        }
        if let Outcome::Dead(dead) = &outcome
            && let Some(job) = &dead.job
            && let Some(number) = self.numbers.get(&job.phone_number_id)
        {
            let key = JobKey {
                waba: number.waba.clone(),
                job_id: job.job_id.clone(),
            };
            if let Err(e) = self.store.mark_dead(&key, dead.reason).await {
                warn!(error = %e, "could not record the dead letter");
            }
        }
        delivery.ack().await.map_err(SettleError::Broker)?;
        self.stats.count(&outcome, lane);
        Ok(())
    }

    async fn publish_event(&self, event: &Event) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(event).expect("events always serialise");
        let mut headers = Headers::default();
        telemetry::inject_current(&mut headers);
        self.broker
            .publish(
                Target::Event(event.event.clone()),
                Envelope {
                    body: body.into(),
                    headers,
                },
            )
            .await
    }

    async fn publish_later(
        &self,
        original: &Envelope,
        lane: Lane,
        later: &Later,
    ) -> Result<(), BrokerError> {
        let wait = later
            .due
            .signed_duration_since(Utc::now())
            .to_std()
            .unwrap_or_default();
        let tier = self.settings.tiers.tier_for(wait);
        let mut headers = original.headers.clone();
        headers
            .set_int(H_ATTEMPTS, i64::from(later.attempts))
            .set_str(H_DUE, later.due.to_rfc3339());
        debug!(why = %later.why, delay_queue = %DelayTiers::name(tier), due = %later.due, "deferred");
        self.broker
            .publish(
                Target::Delay { tier, lane },
                Envelope {
                    body: original.body.clone(),
                    headers,
                },
            )
            .await?;
        if let Some(job) = &later.job {
            let mut event = Event::for_job("job.deferred", job);
            event.attempts = Some(later.attempts);
            event.error = later.error.clone().or_else(|| {
                Some(EventError {
                    code: None,
                    title: later.why.clone(),
                    details: format!("due {}", later.due),
                    source: ErrorSource::Policy,
                })
            });
            self.publish_event(&event).await?;
        }
        Ok(())
    }

    async fn publish_dead(&self, original: &Envelope, dead: &Dead) -> Result<(), BrokerError> {
        warn!(reason = %dead.reason, code = dead.code, detail = %dead.detail, "dead-lettered");
        let mut headers = original.headers.clone();
        headers
            .set_str(H_REASON, dead.reason.as_str())
            .set_int(H_ATTEMPTS, i64::from(dead.attempts))
            .set_str(H_DETAIL, dead.detail.chars().take(1000).collect::<String>());
        if let Some(code) = dead.code {
            headers.set_int(H_ERROR_CODE, code);
        }
        self.broker
            .publish(
                Target::Dead(dead.reason),
                Envelope {
                    body: original.body.clone(),
                    headers,
                },
            )
            .await?;
        let mut event = match &dead.job {
            Some(job) => Event::for_job("job.dead_lettered", job),
            None => Event {
                job_id: dead.salvaged_job_id.clone(),
                ..Event::new("job.dead_lettered")
            },
        };
        event.reason = Some(dead.reason);
        event.attempts = Some(dead.attempts);
        event.error = Some(EventError {
            code: dead.code,
            title: dead.reason.as_str().into(),
            details: dead.detail.clone(),
            source: dead.source,
        });
        self.publish_event(&event).await
    }
}

/// Settlement failed; the delivery was returned to its queue.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The broker failed to confirm a publish or an ack.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}
