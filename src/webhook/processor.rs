//! The webhook processor: consumes `wa.webhooks.intake`, parses each body, and turns every update
//! into store changes and events. Statuses are correlated to their job (wamid, else
//! `biz_opaque_callback_data`), applied as a monotonic state machine per wamid (duplicates and
//! regressions are recognised and produce nothing), and failures go through the same error
//! classification as synchronous errors. A body that cannot be parsed is parked, never dropped;
//! a store or broker failure leaves the body in the intake for another try.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::payload::{self, InboundMessage, MessageStatus, StatusUpdate, Update, WebhookError};
use super::status::{self, Transition};
use crate::broker::{
    Broker, BrokerError, Envelope, H_DETAIL, H_ERROR_CODE, H_REASON, Headers, Target,
};
use crate::cloud::ErrorCode;
use crate::event::{DeadReason, ErrorSource, Event, EventError};
use crate::ids::{JobId, PhoneNumberId, WaId, WabaId};
use crate::policy::admission::Mark;
use crate::policy::{self, Action};
use crate::store::{JobKey, Store, StoreError, WamidRecord};

/// What the processor needs to know besides the store and the broker.
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
    /// The configured numbers and their portfolios (the legacy format names no WABA).
    pub numbers: BTreeMap<PhoneNumberId, WabaId>,
    /// Whole inbound messages that record a marketing opt-out (compared case-insensitively).
    pub stop_keywords: Vec<String>,
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
    /// Events published.
    pub events: usize,
    /// Statuses seen before (same wamid and status).
    pub duplicates: usize,
    /// Statuses older than the one recorded (never applied backwards).
    pub stale: usize,
    /// The body (or part of it) was parked.
    pub parked: bool,
}

/// The webhook processor.
pub struct Processor {
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    settings: ProcessorSettings,
}

/// How long a body whose processing failed waits before it goes back to the intake.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Processor {
    /// A processor over these parts.
    pub fn new(
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        settings: ProcessorSettings,
    ) -> Self {
        Processor {
            broker,
            store,
            settings,
        }
    }

    /// Consumes the intake until `shutdown`; each body is acked only once handled.
    pub async fn run(&self, prefetch: u16, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let mut intake = self.broker.consume_intake(prefetch).await?;
        loop {
            let delivery = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                next = intake.next() => match next {
                    Some(delivery) => delivery?,
                    None => break,
                },
            };
            match self.handle(&delivery.envelope.body).await {
                Ok(handled) => {
                    debug!(?handled, "webhook processed");
                    delivery.ack().await?;
                }
                Err(e) => {
                    // CORRECTNESS: not acked, so not lost: it returns to the intake.
                    warn!(error = %e, "webhook could not be processed now; it goes back to the intake");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    delivery.requeue().await?;
                }
            }
        }
        Ok(())
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
        if !parsed.skipped.is_empty() {
            // The rest is processed; the body is kept with what could not be read.
            self.park(body, &parsed.skipped.join("; ")).await?;
            handled.parked = true;
        }
        for update in parsed.updates {
            match update {
                Update::Status(s) => self.status(s, &mut handled).await?,
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
                    self.publish(&event, &mut handled).await?;
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
                    self.publish(&e, &mut handled).await?;
                }
                Update::NumberQuality {
                    waba_id,
                    display_phone_number,
                    event,
                    limit,
                } => {
                    self.number_quality(waba_id, &event, limit.as_deref())
                        .await?;
                    let mut e = Event::new("number.throughput_changed");
                    e.metadata = json!({"event": event, "limit": limit, "display_phone_number": display_phone_number});
                    self.publish(&e, &mut handled).await?;
                }
                Update::AccountUpdate { waba_id, event } => {
                    let mut e = Event::new("account.updated");
                    e.metadata = json!({"event": event, "waba_id": waba_id.map(|w| w.to_string())});
                    self.publish(&e, &mut handled).await?;
                }
                Update::Error {
                    phone_number_id,
                    error,
                    ..
                } => {
                    let mut e = Event::new("webhook.error");
                    e.phone_number_id = phone_number_id.map(|p| p.to_string());
                    e.error = Some(event_error(&error));
                    self.publish(&e, &mut handled).await?;
                }
                Update::Unrecognized { field, .. } => {
                    debug!(field, "webhook field not handled");
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

    async fn status(&self, s: StatusUpdate, handled: &mut Handled) -> Result<(), ProcessError> {
        let mut record = self.store.wamid(&s.wamid).await?;
        if record.is_none() {
            record = self.reconcile(&s).await?;
        }
        // Monotonic per wamid: compare and set, so competing processors agree.
        loop {
            let previous = self.store.message_status(&s.wamid).await?;
            let previous_status = previous.as_deref().map(MessageStatus::from);
            match status::transition(previous_status.as_ref(), &s.status) {
                Transition::Apply => {
                    if self
                        .store
                        .swap_message_status(&s.wamid, previous.as_deref(), s.status.as_str())
                        .await?
                    {
                        break;
                    }
                }
                Transition::Duplicate => {
                    handled.duplicates += 1;
                    return Ok(());
                }
                Transition::Stale => {
                    handled.stale += 1;
                    return Ok(());
                }
            }
        }
        let job_id = record
            .as_ref()
            .map(|r| r.job_id.clone())
            .or_else(|| s.biz_opaque_callback_data.clone());
        let mut event = Event::new(&format!(
            "message.{}",
            s.status.as_str().to_ascii_lowercase()
        ));
        event.job_id = job_id.clone();
        event.campaign_id = record.as_ref().and_then(|r| r.campaign_id.clone());
        event.metadata = record.as_ref().map_or(Value::Null, |r| r.metadata.clone());
        event.phone_number_id = s.phone_number_id.as_ref().map(ToString::to_string);
        event.to = s
            .recipient_id
            .clone()
            .filter(|r| WaId::parse(r.clone()).is_ok());
        event.wamid = Some(s.wamid.to_string());
        event.at = s.at;
        event.pricing = s.pricing.as_ref().map(|p| {
            json!({"billable": p.billable, "pricing_model": p.pricing_model, "type": p.kind, "category": p.category})
        });
        event.error = s.errors.first().map(event_error);
        if job_id.is_none() {
            event.correlated = Some(false);
        }
        self.publish(&event, handled).await?;
        if s.status == MessageStatus::Failed {
            self.failed(&s, event, handled).await?;
        }
        Ok(())
    }

    /// A status for a wamid the worker never recorded, carrying a job id: the send's answer was
    /// lost (a timeout after the request left, or a worker killed mid-send). Recording the job as
    /// sent settles it: the at-most-once job waiting for this webhook finds it sent and is acked,
    /// never resent.
    async fn reconcile(&self, s: &StatusUpdate) -> Result<Option<WamidRecord>, ProcessError> {
        let Some(job_id) = s
            .biz_opaque_callback_data
            .as_ref()
            .and_then(|j| JobId::parse(j.clone()).ok())
        else {
            return Ok(None);
        };
        let Some(waba) = self.waba(s.waba_id.clone(), s.phone_number_id.as_ref()) else {
            return Ok(None);
        };
        let record = WamidRecord {
            job_id: job_id.to_string(),
            campaign_id: None,
            traceparent: None,
            metadata: Value::Null,
        };
        self.store
            .mark_sent(&JobKey { waba, job_id }, &s.wamid, &record)
            .await?;
        info!(wamid = %s.wamid, "a send whose answer was lost is settled by its status webhook");
        Ok(Some(record))
    }

    /// A failed status: classified like a synchronous error.
    async fn failed(
        &self,
        s: &StatusUpdate,
        event: Event,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let Some(error) = s.errors.first() else {
            return Ok(());
        };
        let code = ErrorCode::from(error.code);
        let waba = self.waba(s.waba_id.clone(), s.phone_number_id.as_ref());
        if code == ErrorCode::MarketingOptOut
            && let (Some(waba), Some(to)) = (&waba, s.recipient_id.as_ref())
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
            self.publish(&optout, handled).await?;
        }
        match policy::classify(code) {
            Action::DeadLetter(reason) => self.dead(reason, error, event, waba, handled).await,
            other => {
                // The job body is not kept with the wamid, so a retry or a 131049 cool-down
                // cannot be re-enqueued from here; the failure is reported as message.failed.
                info!(code = error.code, action = ?other, "failed status reported; not dead-lettered");
                Ok(())
            }
        }
    }

    async fn dead(
        &self,
        reason: DeadReason,
        error: &WebhookError,
        failed: Event,
        waba: Option<WabaId>,
        handled: &mut Handled,
    ) -> Result<(), ProcessError> {
        let mut headers = Headers::default();
        headers
            .set_str(H_REASON, reason.as_str())
            .set_int(H_ERROR_CODE, error.code)
            .set_str(
                H_DETAIL,
                error.details.chars().take(1000).collect::<String>(),
            );
        let body = json!({"job_id": failed.job_id, "wamid": failed.wamid, "status": "failed",
                          "error": {"code": error.code, "title": error.title, "details": error.details}});
        self.broker
            .publish(
                Target::Dead(reason),
                Envelope {
                    body: serde_json::to_vec(&body).expect("json").into(),
                    headers,
                },
            )
            .await?;
        if let (Some(waba), Some(job_id)) = (waba, failed.job_id.as_ref())
            && let Ok(job_id) = JobId::parse(job_id.clone())
        {
            self.store
                .mark_dead(&JobKey { waba, job_id }, reason)
                .await?;
        }
        let mut event = Event {
            event: "job.dead_lettered".into(),
            reason: Some(reason),
            ..failed
        };
        if let Some(e) = event.error.as_mut() {
            e.title = reason.as_str().into();
        }
        self.publish(&event, handled).await
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
            self.publish(&optout, handled).await?;
        }
        let mut event = Event::new("inbound.message");
        event.phone_number_id = m.phone_number_id.as_ref().map(ToString::to_string);
        event.to = Some(m.from.to_string());
        event.wamid = Some(m.wamid.to_string());
        event.at = m.at;
        event.metadata = json!({"type": m.kind, "text": m.text, "profile_name": m.profile_name});
        self.publish(&event, handled).await
    }

    async fn number_quality(
        &self,
        waba: Option<WabaId>,
        event: &str,
        limit: Option<&str>,
    ) -> Result<(), ProcessError> {
        let Some(waba) = self.waba(waba, None) else {
            return Ok(());
        };
        if let Some(limit) = limit.and_then(tier_limit) {
            self.store.set_tier_limit(&waba, limit).await?;
        }
        if event == "THROUGHPUT_UPGRADE" {
            // The webhook names the number by display number only: applied when the portfolio
            // has exactly one configured number, else left to the operator.
            let numbers: Vec<&PhoneNumberId> = self
                .settings
                .numbers
                .iter()
                .filter(|(_, w)| **w == waba)
                .map(|(n, _)| n)
                .collect();
            match numbers.as_slice() {
                [number] => self.store.set_throughput(number, 1000).await?,
                _ => {
                    warn!(%waba, "throughput upgrade for a portfolio with several numbers; set it per number")
                }
            }
        }
        Ok(())
    }

    async fn park(&self, body: &[u8], reason: &str) -> Result<(), ProcessError> {
        warn!(reason, "webhook body parked");
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

    async fn publish(&self, event: &Event, handled: &mut Handled) -> Result<(), ProcessError> {
        let body = serde_json::to_vec(event).expect("events always serialise");
        self.broker
            .publish(
                Target::Event(event.event.clone()),
                Envelope {
                    body: body.into(),
                    headers: Headers::default(),
                },
            )
            .await?;
        handled.events += 1;
        Ok(())
    }
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

/// Meta's tier names: `Some(None)` is unlimited.
fn tier_limit(tier: &str) -> Option<Option<u32>> {
    match tier {
        "TIER_50" => Some(Some(50)),
        "TIER_250" => Some(Some(250)),
        "TIER_1K" => Some(Some(1000)),
        "TIER_2K" => Some(Some(2000)),
        "TIER_10K" => Some(Some(10_000)),
        "TIER_100K" => Some(Some(100_000)),
        "TIER_UNLIMITED" => Some(None),
        _ => None,
    }
}
