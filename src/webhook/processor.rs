//! The webhook processor: consumes `wa.webhooks.intake`, parses each body, and turns every update
//! into store changes and events. Statuses are correlated to their job (wamid, else
//! `biz_opaque_callback_data`), applied as a monotonic state machine per wamid (duplicates and
//! regressions are recognised and produce nothing), and failures go through the same error
//! classification as synchronous errors. Meta's account webhooks (the portfolio's messaging
//! limit, a template's category, a number's throughput, restrictions of the WABA) are applied to
//! the store, where every replica reads them. A body that cannot be parsed is parked whole, and
//! each unreadable part of one (see [`super::payload`]) is parked on its own with its reason,
//! never acked in silence; a store or broker failure leaves the body in the intake for another
//! try.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::account::{self, Effect};
use super::payload::{
    self, AccountUpdate, CategoryChange, DisplayNumber, InboundMessage, MessageStatus,
    MessagingLimit, StatusUpdate, Update, WebhookError,
};
use super::status::{self, Transition};
use crate::broker::{
    Broker, BrokerError, Delivery, Envelope, EventBatches, H_DUE, H_REASON, Headers, Intake, Route,
    Target,
};
use crate::event::{Event, EventError};
use crate::health::Health;
use crate::ids::{CampaignId, JobId, PhoneNumberId, WaId, WabaId};
use crate::metrics;
use crate::policy::admission::Mark;
use crate::policy::{self, Action, DelayTiers};
use crate::pricing::{Estimate, RateCard};
use crate::settlement::{self, DeadLetter, Trace, Unsettled};
use crate::store::{
    Cost, Halt, HaltScope, JobKey, Message, Store, StoreError, Tally, UNTIL_LIFTED, WamidRecord,
};
use crate::telemetry;
use crate::vocab::{DeadReason, ErrorCode, ErrorSource};

/// What the processor needs to know besides the store and the broker.
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
    /// The configured numbers and their portfolios (the legacy format names no WABA).
    pub numbers: BTreeMap<PhoneNumberId, WabaId>,
    /// Whole inbound messages that record a marketing opt-out (compared case-insensitively).
    pub stop_keywords: Vec<String>,
    /// Prices billable messages.
    pub rate_card: RateCard,
    /// Where a job waits before it is sent again (131049).
    pub delay_tiers: DelayTiers,
}

/// Why a body could not be processed now (it stays in the intake).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Publishing an event, dead letter or parked body failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one body produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handled {
    /// Message statuses in the body.
    pub statuses: usize,
    /// Events published.
    pub events: usize,
    /// Statuses seen before (same wamid and status).
    pub duplicates: usize,
    /// Statuses older than the one recorded (never applied backwards).
    pub stale: usize,
    /// The body (or part of it) was parked.
    pub parked: bool,
    /// Each status's value (as a metric label) and when Meta says it happened, in order.
    pub seen: Vec<(&'static str, DateTime<Utc>)>,
    /// Estimated cost of the messages first priced in this body: millionths of the rate card's
    /// currency, by pricing category (categories the card has a rate for only).
    pub cost_micros: BTreeMap<String, i64>,
}

/// The webhook processor.
pub struct Processor {
    broker: Arc<dyn Broker>,
    /// The events, published several of a kind to a message.
    events: Arc<EventBatches>,
    store: Arc<dyn Store>,
    settings: ProcessorSettings,
    /// Statuses of one wamid are applied one at a time in this process (bodies are processed
    /// concurrently), so two copies of a status never both publish an event here.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Display numbers this process has recorded with their number's id: each pairing is
    /// written to the store once per process, not once per status body.
    displays: std::sync::Mutex<HashSet<DisplayNumber>>,
    stats: ProcessorStats,
    /// The webhook process's readiness: consuming the intake and Redis answering. The intake
    /// consumer stands for the receiver too: both use one connection, so while the consumer
    /// runs the receiver's publishes reach RabbitMQ, and when it is lost they fail alike.
    health: Health,
}

/// What a processor has done since it started (for logs, dashboards and the benchmark).
#[derive(Debug, Default)]
pub struct ProcessorStats {
    /// Bodies handled (acked).
    pub bodies: AtomicU64,
    /// Message statuses handled (applied, duplicate or stale).
    pub statuses: AtomicU64,
    /// Events published.
    pub events: AtomicU64,
    /// Statuses seen before.
    pub duplicates: AtomicU64,
    /// Statuses older than the one recorded.
    pub stale: AtomicU64,
    /// Bodies (or parts) parked.
    pub parked: AtomicU64,
    /// Bodies returned to the intake after a store or broker failure.
    pub requeued: AtomicU64,
}

const STRIPES: usize = 256;

/// How long a body whose processing failed waits before it goes back to the intake.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Processor {
    /// A processor over these parts.
    pub fn new(
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        settings: ProcessorSettings,
    ) -> Self {
        let health = Health::of_consumer();
        health.redis_connected(Arc::clone(&store));
        Processor {
            events: EventBatches::new(Arc::clone(&broker)),
            broker,
            store,
            settings,
            health,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            displays: std::sync::Mutex::new(HashSet::new()),
            stats: ProcessorStats::default(),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> &ProcessorStats {
        &self.stats
    }

    /// Whether the webhook process is ready: it consumes the intake and Redis answers. Serve
    /// it with [`crate::health::router`] beside the receiver.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Consumes the intake until `shutdown`, up to `prefetch` bodies at a time; each body is
    /// acked only once handled, and the ones in hand are finished before it returns. A lost
    /// connection (broker restart) is consumed again once it is back; the bodies that were in
    /// hand return to the intake and come again (their statuses are recognised as seen).
    pub async fn run(&self, prefetch: u16, shutdown: CancellationToken) -> Result<(), BrokerError> {
        loop {
            let lost = match self.consume(prefetch, &shutdown).await {
                Ok(()) if shutdown.is_cancelled() => return Ok(()),
                Ok(()) => "the intake consumer was closed".to_owned(),
                Err(e) => e.to_string(),
            };
            self.health.set_consuming(false);
            warn!(%lost, "consuming the intake again in a moment");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
        }
    }

    async fn consume(
        &self,
        prefetch: u16,
        shutdown: &CancellationToken,
    ) -> Result<(), BrokerError> {
        let intake = self.broker.consume_intake(prefetch).await?;
        self.health.set_consuming(true);
        intake
            .take_until(shutdown.clone().cancelled_owned())
            .map(|delivery| async move { self.settle(delivery?).await })
            .buffer_unordered(usize::from(prefetch.max(1)))
            .try_for_each(|()| async { Ok(()) })
            .await
    }

    async fn settle(&self, delivery: Delivery<Intake>) -> Result<(), BrokerError> {
        let handled = self.handle(&delivery.envelope.body).await;
        match &handled {
            Ok(handled) => {
                debug!(?handled, "webhook processed");
                let count = |counter: &AtomicU64, n: usize| {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                };
                count(&self.stats.bodies, 1);
                count(&self.stats.statuses, handled.statuses);
                count(&self.stats.events, handled.events);
                count(&self.stats.duplicates, handled.duplicates);
                count(&self.stats.stale, handled.stale);
                count(&self.stats.parked, usize::from(handled.parked));
                self.record(handled);
            }
            Err(e) => {
                self.stats.requeued.fetch_add(1, Ordering::Relaxed);
                metrics::webhook_requeued();
                warn!(error = %e, "webhook could not be processed now; it goes back to the intake");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        // CORRECTNESS: acked only once everything the body produced is published and recorded;
        // otherwise not acked, so not lost: it returns to the intake.
        match settlement::ack_or_requeue(delivery, handled).await {
            Ok(_) => Ok(()),
            Err(Unsettled::Requeued(_, requeued)) => requeued,
            Err(Unsettled::NotAcked(e)) => Err(e),
        }
    }

    /// Forwards what a body produced to the metrics, where `stats` counted it: counted once
    /// per body acked, so a body that comes again after a failure is not counted twice.
    fn record(&self, handled: &Handled) {
        metrics::webhook_body(handled.duplicates, handled.stale, handled.parked);
        let now = Utc::now();
        for (status, at) in &handled.seen {
            let lag = now.signed_duration_since(*at).to_std().unwrap_or_default();
            metrics::webhook_status(status, lag);
        }
        let currency = &self.settings.rate_card.currency;
        for (category, micros) in &handled.cost_micros {
            metrics::estimated_cost(category, currency, *micros);
        }
    }

    /// Processes one verified webhook body.
    pub async fn handle(&self, body: &[u8]) -> Result<Handled, ProcessError> {
        let mut handled = Handled::default();
        let parsed = match payload::parse(body) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.park(body, &e.to_string()).await?;
                handled.parked = true;
                return Ok(handled);
            }
        };
        for ignored in &parsed.ignored {
            debug!(ignored, "webhook part ignored on purpose");
        }
        // Each unreadable part is parked on its own, with its place and reason; the rest of the
        // body is processed.
        for part in &parsed.unreadable {
            let raw = serde_json::to_vec(&part.part).expect("a JSON value serializes");
            self.park(&raw, &part.to_string()).await?;
            handled.parked = true;
        }
        for seen in parsed.numbers {
            self.learn_display(seen).await?;
        }
        for update in parsed.updates {
            match update {
                Update::Status(s) => {
                    handled.statuses += 1;
                    handled.seen.push((s.status.label(), s.at));
                    self.status(s, &mut handled).await?;
                }
                Update::Inbound(m) => self.inbound(m, &mut handled).await?,
                Update::UserPreference {
                    waba_id,
                    wa_id,
                    stop,
                    at,
                } => {
                    let Some(waba) = self.waba(waba_id, None) else {
                        warn!("user_preferences for an unknown portfolio; ignored");
                        continue;
                    };
                    let mark = stop.then(|| Mark {
                        at,
                        source: "user_preferences".into(),
                    });
                    self.store.record_opt_out(&waba, &wa_id, mark).await?;
                    let kind = if stop {
                        "optout.recorded"
                    } else {
                        "optout.withdrawn"
                    };
                    let mut event = Event::new(kind);
                    event.to = Some(wa_id.to_string());
                    event.metadata =
                        json!({"source": "user_preferences", "waba_id": waba.as_str()});
                    self.publish(&event, None, &mut handled).await?;
                }
                Update::TemplateStatus {
                    waba_id,
                    name,
                    language,
                    event,
                    reason,
                } => {
                    if let Some(waba) = self.waba(waba_id, None)
                        && let Some(status) = registry_status(&event)
                    {
                        self.store
                            .set_template_status(&waba, &name, &language, status)
                            .await?;
                    }
                    let mut e = Event::new("template.status_changed");
                    e.metadata = json!({"template": name, "language": language, "status": event, "reason": reason});
                    self.publish(&e, None, &mut handled).await?;
                }
                Update::NumberQuality {
                    waba_id,
                    display_phone_number,
                    event,
                    limit,
                } => {
                    let number = self
                        .number_quality(
                            waba_id,
                            display_phone_number.as_deref(),
                            &event,
                            limit.as_deref(),
                        )
                        .await?;
                    let mut e = Event::new("number.throughput_changed");
                    e.phone_number_id = number.map(|n| n.to_string());
                    e.metadata = json!({"event": event, "limit": limit, "display_phone_number": display_phone_number});
                    self.publish(&e, None, &mut handled).await?;
                }
                Update::BusinessCapability {
                    waba_id,
                    limit,
                    max_phone_numbers_per_waba,
                    max_phone_numbers_per_business,
                } => {
                    let waba = self.waba(waba_id, None);
                    self.messaging_limit(waba.as_ref(), limit).await?;
                    let limit = match limit {
                        Some(MessagingLimit::Users(n)) => json!(n),
                        Some(MessagingLimit::Unlimited) => json!("unlimited"),
                        Some(MessagingLimit::NotSet) | None => Value::Null,
                    };
                    let mut e = Event::new("portfolio.limit_changed");
                    e.metadata = json!({"waba_id": waba.map(|w| w.to_string()), "messaging_limit": limit,
                                        "max_phone_numbers_per_waba": max_phone_numbers_per_waba,
                                        "max_phone_numbers_per_business": max_phone_numbers_per_business});
                    self.publish(&e, None, &mut handled).await?;
                }
                Update::TemplateCategory(change) => {
                    self.template_category(change, &mut handled).await?;
                }
                Update::Account(update) => self.account(update, &mut handled).await?,
                Update::Error {
                    phone_number_id,
                    error,
                    ..
                } => {
                    let mut e = Event::new("webhook.error");
                    e.phone_number_id = phone_number_id.map(|p| p.to_string());
                    e.error = Some(event_error(&error));
                    self.publish(&e, None, &mut handled).await?;
                }
            }
        }
        Ok(handled)
    }

    /// The portfolio an update concerns: its own, the number's, or the only configured one.
    fn waba(&self, waba: Option<WabaId>, number: Option<&PhoneNumberId>) -> Option<WabaId> {
        waba.or_else(|| number.and_then(|n| self.settings.numbers.get(n).cloned()))
            .or_else(|| {
                let wabas: BTreeSet<&WabaId> = self.settings.numbers.values().collect();
                let mut only = wabas.into_iter();
                match (only.next(), only.next()) {
                    (Some(waba), None) => Some(waba.clone()),
                    _ => None,
                }
            })
    }

    /// One status: looked up, checked against the message's last status, published, then
    /// recorded. The event goes out before the status is recorded, so a crash in between
    /// publishes it again on redelivery (at least once) instead of never.
    async fn status(&self, s: StatusUpdate, handled: &mut Handled) -> Result<(), ProcessError> {
        let Some(waba) = self.waba(s.waba_id.clone(), s.phone_number_id.as_ref()) else {
            // Nowhere to look the wamid up: published as it came, flagged.
            warn!(wamid = %s.wamid, "status for a number of no configured portfolio");
            let event = self.status_event(&s, None, None);
            return self.publish(&event, None, handled).await;
        };
        let _one_at_a_time = self.stripes[stripe(&s.wamid)].lock().await;
        let mut message = self.store.message(&waba, &s.wamid).await?;
        if message.record.is_none() {
            message.record = self.reconcile(&waba, &s).await?;
        }
        // One span per status, in the job's trace when the job is known.
        let span = info_span!(
            "webhook.status",
            otel.kind = "consumer",
            wamid = %s.wamid,
            status = s.status.as_str(),
            job_id = message.record.as_ref().map(|r| r.job_id.as_str()),
        );
        if let Some(parent) = message
            .record
            .as_ref()
            .and_then(|r| r.traceparent.as_deref())
        {
            telemetry::adopt_traceparent(&span, parent);
        }
        self.apply(&waba, s, message, handled)
            .instrument(span)
            .await
    }

    /// Publishes a status's event and records it, unless it is a duplicate or stale: the part
    /// of [`Processor::status`] done once its message is looked up.
    async fn apply(
        &self,
        waba: &WabaId,
        s: StatusUpdate,
        mut message: Message,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let mut published = false;
        loop {
            let previous = message.status.as_deref().map(MessageStatus::from);
            match status::transition(previous.as_ref(), &s.status) {
                Transition::Apply => {}
                // A competing processor applied it (or a later one) after this one published:
                // the event is out, nothing else to do.
                _ if published => return Ok(()),
                Transition::Duplicate => {
                    handled.duplicates += 1;
                    return Ok(());
                }
                Transition::Stale => {
                    handled.stale += 1;
                    return Ok(());
                }
            }
            let estimate = s.pricing.as_ref().and_then(|p| {
                self.settings
                    .rate_card
                    .estimate(p, s.recipient_id.as_deref().unwrap_or_default())
            });
            if !published {
                let price = estimate.as_ref().filter(|_| !message.priced);
                if let Some(Estimate {
                    category,
                    micros: Some(micros),
                    ..
                }) = price
                {
                    *handled.cost_micros.entry(category.clone()).or_default() += micros;
                }
                let event = self.status_event(&s, message.record.as_ref(), price);
                let trace = message
                    .record
                    .as_ref()
                    .and_then(|r| r.traceparent.as_deref());
                self.publish(&event, trace, handled).await?;
                if s.status == MessageStatus::Failed {
                    self.failed(waba, &s, event, message.record.as_ref(), handled)
                        .await?;
                }
                published = true;
            }
            let record = message.record.as_ref();
            let tally = Tally {
                report: record.is_some(),
                campaign: record
                    .and_then(|r| r.campaign_id.clone())
                    .and_then(|c| CampaignId::parse(c).ok()),
                reached: status::reached(previous.as_ref(), &s.status),
                cost: estimate.map(|e| Cost {
                    category: e.category,
                    micros: e.micros.unwrap_or(0),
                }),
            };
            let expected = message.status.as_deref();
            if self
                .store
                .apply_status(waba, &s.wamid, expected, s.status.as_str(), &tally)
                .await?
            {
                return Ok(());
            }
            message = self.store.message(waba, &s.wamid).await?;
        }
    }

    /// The event for a status; `price` adds the estimated cost (given for the first billable
    /// status of a message only, as Meta may price it twice).
    fn status_event(
        &self,
        s: &StatusUpdate,
        record: Option<&WamidRecord>,
        price: Option<&Estimate>,
    ) -> Event {
        let job_id = record
            .map(|r| r.job_id.clone())
            .or_else(|| s.biz_opaque_callback_data.clone());
        let mut event = Event::new(&format!(
            "message.{}",
            s.status.as_str().to_ascii_lowercase()
        ));
        event.campaign_id = record.and_then(|r| r.campaign_id.clone());
        event.metadata = record.map_or(Value::Null, |r| r.metadata.clone());
        event.phone_number_id = s.phone_number_id.as_ref().map(ToString::to_string);
        event.to = s
            .recipient_id
            .clone()
            .filter(|r| WaId::parse(r.clone()).is_ok());
        event.wamid = Some(s.wamid.to_string());
        event.at = s.at;
        event.pricing = s.pricing.as_ref().map(|p| {
            let mut pricing = json!({"billable": p.billable, "pricing_model": p.pricing_model,
                                     "type": p.kind, "category": p.category});
            if let Some(estimate) = price {
                pricing["market"] = json!(estimate.market);
                pricing["currency"] = json!(self.settings.rate_card.currency);
                pricing["estimated_cost"] =
                    json!(estimate.micros.map(crate::pricing::format_micros));
            }
            pricing
        });
        event.error = s.errors.first().map(event_error);
        if job_id.is_none() {
            event.correlated = Some(false);
        }
        event.job_id = job_id;
        event
    }

    /// A status for a wamid the worker never recorded, carrying a job id: the send's answer was
    /// lost (a timeout after the request left, or a worker killed mid-send). Recording the job as
    /// sent settles it: the at-most-once job waiting for this webhook finds it sent and is acked,
    /// never resent.
    async fn reconcile(
        &self,
        waba: &WabaId,
        s: &StatusUpdate,
    ) -> Result<Option<WamidRecord>, ProcessError> {
        let Some(job_id) = s
            .biz_opaque_callback_data
            .as_ref()
            .and_then(|j| JobId::parse(j.clone()).ok())
        else {
            return Ok(None);
        };
        let record = WamidRecord {
            job_id: job_id.to_string(),
            campaign_id: None,
            traceparent: None,
            metadata: Value::Null,
            resend: None,
        };
        let key = JobKey {
            waba: waba.clone(),
            job_id,
        };
        self.store.mark_sent(&key, &s.wamid, &record).await?;
        info!(wamid = %s.wamid, "a send whose answer was lost is settled by its status webhook");
        Ok(Some(record))
    }

    /// A failed status: classified like a synchronous error.
    async fn failed(
        &self,
        waba: &WabaId,
        s: &StatusUpdate,
        event: Event,
        record: Option<&WamidRecord>,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let Some(error) = s.errors.first() else {
            return Ok(());
        };
        let code = ErrorCode::from(error.code);
        if code == ErrorCode::MarketingOptOut
            && let Some(to) = s.recipient_id.as_ref()
            && let Ok(to) = WaId::parse(to.clone())
        {
            let mark = Mark {
                at: s.at,
                source: "131050".into(),
            };
            self.store.record_opt_out(waba, &to, Some(mark)).await?;
            let mut optout = Event::new("optout.recorded");
            optout.to = Some(to.to_string());
            optout.metadata = json!({"source": "131050", "waba_id": waba.as_str()});
            self.publish(&optout, None, handled).await?;
        }
        match policy::classify(code) {
            Action::DeadLetter(reason) => {
                self.dead(reason, error, event, waba, record, handled).await
            }
            Action::Cooldown(wait) => self.cool_down(waba, s, wait, event, record, handled).await,
            other => {
                // Retries and throttles concern the send itself, which Meta accepted: reported
                // as message.failed for the producer to act on.
                info!(code = error.code, action = ?other, "failed status reported; not dead-lettered");
                Ok(())
            }
        }
    }

    /// A job Meta accepted and then failed with a cool-down (131049, the per-user marketing
    /// cap): sent again once `wait` is over, as a synchronous 131049 would be. The job goes to
    /// a delay queue first, then its record is reopened, so a crash in between sends a second
    /// copy that admission recognises, never none.
    async fn cool_down(
        &self,
        waba: &WabaId,
        s: &StatusUpdate,
        wait: Duration,
        failed: Event,
        record: Option<&WamidRecord>,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let Some((record, resend)) = record.and_then(|r| Some((r, r.resend.as_ref()?))) else {
            info!(wamid = %s.wamid, "cool-down for a message whose job was not kept; reported as message.failed");
            return Ok(());
        };
        let Ok(job_id) = JobId::parse(record.job_id.clone()) else {
            return Ok(());
        };
        let due = chrono::Utc::now() + wait;
        let mut headers = Trace::Recorded(record.traceparent.as_deref()).headers();
        headers.set_str(H_DUE, due.to_rfc3339());
        let target = Target::Delay {
            tier: self.settings.delay_tiers.tier_for(wait),
            route: Route::of(resend.lane, resend.job.as_bytes()),
        };
        let envelope = Envelope {
            body: resend.job.clone().into_bytes().into(),
            headers,
        };
        self.broker.publish(target, envelope).await?;
        let key = JobKey {
            waba: waba.clone(),
            job_id,
        };
        self.store.reopen(&key, &s.wamid).await?;
        let mut event = Event {
            event: "job.deferred".into(),
            ..failed
        };
        if let Some(e) = event.error.as_mut() {
            e.details = format!("{}; sent again after {due}", e.details);
        }
        self.publish(&event, record.traceparent.as_deref(), handled)
            .await
    }

    async fn dead(
        &self,
        reason: DeadReason,
        error: &WebhookError,
        failed: Event,
        waba: &WabaId,
        record: Option<&WamidRecord>,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let trace = record.and_then(|r| r.traceparent.as_deref());
        let letter = DeadLetter {
            reason,
            code: Some(error.code),
            detail: &error.details,
            source: ErrorSource::Webhook,
            attempts: None,
        };
        let body = json!({"job_id": failed.job_id, "wamid": failed.wamid, "status": "failed",
                          "error": {"code": error.code, "title": error.title, "details": error.details}});
        let body = serde_json::to_vec(&body).expect("json").into();
        letter
            .publish(self.broker.as_ref(), body, Trace::Recorded(trace).headers())
            .await?;
        if let Some(job_id) = failed.job_id.as_ref()
            && let Ok(job_id) = JobId::parse(job_id.clone())
        {
            let key = JobKey {
                waba: waba.clone(),
                job_id,
            };
            let campaign = record
                .and_then(|r| r.campaign_id.clone())
                .and_then(|c| CampaignId::parse(c).ok());
            self.store
                .mark_dead(&key, reason, campaign.as_ref())
                .await?;
        }
        self.publish(&letter.event(failed), trace, handled).await
    }

    async fn inbound(&self, m: InboundMessage, handled: &mut Handled) -> Result<(), ProcessError> {
        let waba = self.waba(m.waba_id.clone(), m.phone_number_id.as_ref());
        match (&waba, &m.phone_number_id) {
            (Some(waba), Some(number)) => {
                self.store
                    .record_inbound(waba, number, &m.from, m.at)
                    .await?;
            }
            _ => warn!("inbound message without a known number; the care window is not recorded"),
        }
        let stop = m
            .text
            .as_deref()
            .is_some_and(|t| payload::is_stop_keyword(t, &self.settings.stop_keywords));
        if stop && let Some(waba) = &waba {
            let keyword = m.text.as_deref().unwrap_or_default().trim().to_uppercase();
            let mark = Mark {
                at: m.at,
                source: format!("keyword:{keyword}"),
            };
            self.store.record_opt_out(waba, &m.from, Some(mark)).await?;
            let mut optout = Event::new("optout.recorded");
            optout.to = Some(m.from.to_string());
            optout.metadata =
                json!({"source": format!("keyword:{keyword}"), "waba_id": waba.as_str()});
            self.publish(&optout, None, handled).await?;
        }
        let mut event = Event::new("inbound.message");
        event.phone_number_id = m.phone_number_id.as_ref().map(ToString::to_string);
        event.to = Some(m.from.to_string());
        event.wamid = Some(m.wamid.to_string());
        event.at = m.at;
        event.metadata = json!({"type": m.kind, "text": m.text, "profile_name": m.profile_name});
        self.publish(&event, None, handled).await
    }

    /// Records the pairing of a number's id and display number that a `messages` value showed,
    /// once per process: the webhooks that name a number by display number only find it there.
    async fn learn_display(&self, seen: DisplayNumber) -> Result<(), ProcessError> {
        if self.displays.lock().expect("displays lock").contains(&seen) {
            return Ok(());
        }
        let Some(waba) = self.waba(seen.waba_id.clone(), Some(&seen.phone_number_id)) else {
            return Ok(());
        };
        self.store
            .record_display_number(&waba, &seen.display, &seen.phone_number_id)
            .await?;
        let shown = crate::ids::mask(&seen.display);
        debug!(number = %seen.phone_number_id, display = %shown, "display number recorded");
        self.displays.lock().expect("displays lock").insert(seen);
        Ok(())
    }

    /// A portfolio's messaging limit from a webhook: recorded where admission reads it, for
    /// every replica.
    async fn messaging_limit(
        &self,
        waba: Option<&WabaId>,
        limit: Option<MessagingLimit>,
    ) -> Result<(), ProcessError> {
        let limit = match limit {
            Some(MessagingLimit::Users(n)) => Some(n),
            Some(MessagingLimit::Unlimited) => None,
            Some(MessagingLimit::NotSet) | None => return Ok(()),
        };
        let Some(waba) = waba else {
            warn!("messaging limit for an unknown portfolio; not recorded");
            return Ok(());
        };
        self.store.set_tier_limit(waba, limit).await?;
        info!(%waba, limit = limit.map_or("unlimited".to_owned(), |l| l.to_string()), "messaging limit recorded");
        Ok(())
    }

    /// `phone_number_quality_update`: the portfolio's limit, and after a `THROUGHPUT_UPGRADE`
    /// the number's throughput (1,000 msg/s), for the number the display number names; the
    /// number it was applied to, if any.
    async fn number_quality(
        &self,
        waba: Option<WabaId>,
        display: Option<&str>,
        event: &str,
        limit: Option<&str>,
    ) -> Result<Option<PhoneNumberId>, ProcessError> {
        let Some(waba) = self.waba(waba, None) else {
            warn!(
                event,
                "phone_number_quality_update for an unknown portfolio; not applied"
            );
            return Ok(None);
        };
        if let Some(tier) = limit {
            match MessagingLimit::from_tier(tier) {
                Some(limit) => self.messaging_limit(Some(&waba), Some(limit)).await?,
                None => warn!(
                    tier,
                    "messaging limit this build does not know; not recorded"
                ),
            }
        }
        if event != "THROUGHPUT_UPGRADE" {
            return Ok(None);
        }
        let shown = display.map(payload::digits).unwrap_or_default();
        let recorded = self.store.display_numbers(&waba).await?;
        let configured: Vec<&PhoneNumberId> = self
            .settings
            .numbers
            .iter()
            .filter(|(_, w)| **w == waba)
            .map(|(n, _)| n)
            .collect();
        match number_for_display(&shown, &recorded, &configured) {
            Ok(number) => {
                self.store.set_throughput(&number, 1000).await?;
                info!(%number, "throughput upgrade recorded: 1,000 msg/s");
                Ok(Some(number))
            }
            Err(why) => {
                warn!(%waba, display = %crate::ids::mask(&shown), why, "throughput upgrade not applied; set it per number");
                Ok(None)
            }
        }
    }

    /// `template_category_update`: the template's category now, in the registry admission and
    /// every replica read; `template.category_changed`.
    async fn template_category(
        &self,
        change: CategoryChange,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let waba = self.waba(change.waba_id.clone(), None);
        let recorded = match &waba {
            Some(waba) => {
                self.store
                    .set_template_category(waba, &change.name, &change.language, change.category)
                    .await?
            }
            None => false,
        };
        if !recorded {
            info!(template = %change.name, language = %change.language, "category update for a template not in the registry; the next sync brings its category");
        }
        let category = change.category.as_str().to_ascii_uppercase();
        let mut e = Event::new("template.category_changed");
        e.metadata = json!({"template": change.name, "language": change.language,
                            "category": category, "previous_category": change.previous,
                            "correct_category": change.upcoming,
                            "category_update_at": change.due.map(|t| t.to_rfc3339()),
                            "waba_id": waba.map(|w| w.to_string())});
        self.publish(&e, None, handled).await
    }

    /// `account_update`: the halts it raises or lifts on the WABA, through the store for every
    /// replica ([`account::effects`]); `account.updated` as before, saying what it did.
    async fn account(
        &self,
        update: AccountUpdate,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let waba = self.waba(update.waba_id.clone(), None);
        let mut raised = Vec::new();
        let mut lifted = Vec::new();
        for effect in account::effects(&update) {
            let (condition, raise) = match effect {
                Effect::Unapplied(why) => {
                    warn!(event = %update.event, why, "account update not applied");
                    continue;
                }
                Effect::Raise {
                    condition,
                    until,
                    cause,
                } => (condition, Some((until, cause))),
                Effect::Lift { condition } => (condition, None),
            };
            let Some(waba) = &waba else {
                warn!(event = %update.event, condition, "account update for an unknown portfolio; no halt changed");
                continue;
            };
            let scope = HaltScope::Waba(waba.clone());
            match raise {
                Some((until, cause)) => {
                    let halt = Halt {
                        scope: scope.to_string(),
                        code: 0,
                        cause,
                        at: Utc::now(),
                        until: until.unwrap_or(UNTIL_LIFTED),
                    };
                    self.store.raise_account_halt(condition, &halt).await?;
                    error!(%scope, condition, cause = %halt.cause, "sending halted by Meta's account_update");
                    raised.push(condition);
                }
                None => {
                    if self.store.lift_account_halt(condition, &scope).await? {
                        info!(%scope, condition, "account halt lifted by Meta's account_update");
                        lifted.push(condition);
                    }
                }
            }
        }
        let restrictions: Vec<Value> = update
            .restrictions
            .iter()
            .map(|r| json!({"restriction_type": r.kind, "expiration": r.until.map(|t| t.to_rfc3339())}))
            .collect();
        let mut e = Event::new("account.updated");
        e.metadata = json!({"event": update.event, "waba_id": waba.map(|w| w.to_string()),
                            "restrictions": restrictions, "ban_state": update.ban_state,
                            "ban_date": update.ban_date,
                            "halts_raised": raised, "halts_lifted": lifted});
        self.publish(&e, None, handled).await
    }

    /// Keeps `body` (a whole body, or one unreadable part of one) in `wa.webhooks.parked` with
    /// `reason` in its `x-wa-reason` header, and says so in the log.
    async fn park(&self, body: &[u8], reason: &str) -> Result<(), ProcessError> {
        // The header keeps the reason whole; the log may be read more widely, and a serde error
        // can quote a value, so long digit runs (phone numbers, and alike ids) are masked there.
        warn!(reason = %mask_digit_runs(reason), bytes = body.len(), "webhook parked");
        let mut headers = Headers::default();
        headers.set_str(H_REASON, reason.chars().take(1000).collect::<String>());
        self.broker
            .publish(
                Target::Parked,
                Envelope {
                    body: body.to_vec().into(),
                    headers,
                },
            )
            .await?;
        Ok(())
    }

    /// Publishes an event, carrying the job's trace context (`trace`, its `traceparent`) so
    /// the webhook's events join the job's trace.
    async fn publish(
        &self,
        event: &Event,
        trace: Option<&str>,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        settlement::publish_event(&self.events, event, Trace::Recorded(trace)).await?;
        handled.events += 1;
        Ok(())
    }
}

/// The stripe a wamid's statuses are serialised on.
fn stripe(wamid: &crate::ids::Wamid) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(wamid.as_str()) as usize % STRIPES
}

fn event_error(e: &WebhookError) -> EventError {
    EventError {
        code: Some(e.code),
        title: e.title.clone(),
        details: e.details.clone(),
        source: ErrorSource::Webhook,
    }
}

/// The registry status a template event means (`None`: no change, e.g. FLAGGED is a warning).
fn registry_status(event: &str) -> Option<&str> {
    match event {
        "REINSTATED" => Some("APPROVED"),
        "FLAGGED" => None,
        other => Some(other),
    }
}

/// The number a webhook naming it by `display` number only (digits; empty when it gave none)
/// means: the one `messages` webhooks paired with that display number (`recorded`); failing
/// that, as before pairings were recorded, the portfolio's only `configured` number, unless it
/// is known to show as another. `Err` says why none: never a guess between several numbers.
fn number_for_display(
    display: &str,
    recorded: &BTreeMap<String, PhoneNumberId>,
    configured: &[&PhoneNumberId],
) -> Result<PhoneNumberId, String> {
    if let Some(number) = recorded.get(display).filter(|_| !display.is_empty()) {
        return Ok(number.clone());
    }
    match configured {
        [only] => match recorded.iter().find(|(_, n)| n == only) {
            Some((shown, _)) => Err(format!(
                "no messages webhook has paired this display number with a number, and the \
                 portfolio's only configured number shows as {}: the upgrade is another number's",
                crate::ids::mask(shown)
            )),
            None => Ok((*only).clone()),
        },
        several => Err(format!(
            "no messages webhook has paired this display number with a number yet, and the \
             portfolio has {} configured numbers",
            several.len()
        )),
    }
}

/// `text` with every run of 8 or more digits (a phone number, or an id that looks alike) masked
/// as [`WaId::masked`] masks a number: a log line cannot tell them apart.
fn mask_digit_runs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.len() >= 8 {
            out.push_str(&crate::ids::mask(digits));
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::{BTreeMap, PhoneNumberId, mask_digit_runs, number_for_display};

    /// A display number, the recorded pairings, the configured numbers, the number meant.
    type Case<'a> = (
        &'a str,
        &'a BTreeMap<String, PhoneNumberId>,
        &'a [&'a PhoneNumberId],
        Option<&'a PhoneNumberId>,
    );

    #[test]
    fn a_display_number_names_its_recorded_number_and_never_a_guess() {
        let id = |n: &str| PhoneNumberId::parse(n).unwrap();
        let (a, b) = (id("106540352242922"), id("106540352242923"));
        let recorded = BTreeMap::from([
            ("15550783881".to_owned(), a.clone()),
            ("15550783882".to_owned(), b.clone()),
        ]);
        let nothing = BTreeMap::new();
        let cases: [Case<'_>; 8] = [
            // Recorded: the right one among several, configured here or not.
            ("15550783882", &recorded, &[&a, &b], Some(&b)),
            ("15550783881", &recorded, &[&b], Some(&a)),
            // Not recorded: the only configured number, as before pairings were recorded...
            ("15550783883", &nothing, &[&a], Some(&a)),
            ("", &nothing, &[&a], Some(&a)),
            // ...unless it is known to show as another number.
            ("15550783883", &recorded, &[&a], None),
            // Several numbers and no pairing: none.
            ("15550783883", &recorded, &[&a, &b], None),
            ("", &recorded, &[&a, &b], None),
            ("15550783881", &nothing, &[], None),
        ];
        for (display, recorded, configured, expected) in cases {
            assert_eq!(
                number_for_display(display, recorded, configured)
                    .ok()
                    .as_ref(),
                expected,
                "{display:?} among {configured:?}"
            );
        }
    }

    #[test]
    fn long_digit_runs_are_masked_in_logged_reasons() {
        assert_eq!(
            mask_digit_runs("entry[0].changes[1]: from: invalid type: integer `16505551234`"),
            "entry[0].changes[1]: from: invalid type: integer `16*******34`"
        );
        assert_eq!(
            mask_digit_runs("statuses[12]: 1234567"),
            "statuses[12]: 1234567"
        );
    }
}
