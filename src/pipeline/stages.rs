//! The stages that decide, `decode → pace → admit → send`, before `settle` applies the decision.
//! Each takes what the one before produced and returns `Result<Next, Outcome>`: an `Err` is a
//! decision taken early (dead-letter it, try later, already done), so
//! [`Pipeline::decide`](super::Pipeline::decide) is the four joined by `?`. Every input a
//! decision needs is in the type between two stages; the rules that need no I/O are plain
//! functions, tested below.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::{debug, error, warn};

use super::{Dead, DeferCause, Later, Outcome, Pipeline, PipelineSettings};
use crate::broker::{Envelope, H_DUE, H_MAYBE_SENT, H_TRACEPARENT, Headers};
use crate::cloud::{ApiError, OutboundMessage, SendError, SendRequest};
use crate::config::Number;
use crate::event::{DeadReason, ErrorSource, EventError};
use crate::ids::Wamid;
use crate::job::{self, Body, Category, DeliveryMode, Lane, Message, SendJob, Template};
use crate::policy::admission::{self, DeadWhy, JobState, TemplateUse, Verdict};
use crate::policy::template::{self, TemplateDefinition};
use crate::policy::{self, Action, RetryPolicy, Scope};
use crate::store::{
    Booked, Halt, HaltScope, JobKey, Resend, SlotAsk, StoreError, Subject, WamidRecord,
};

/// How long a throttled job waits before it is tried again.
const THROTTLE_WAIT: Duration = Duration::from_secs(1);
/// How long a job waits when the store cannot be reached.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// How often an at-most-once job with an unknown outcome looks for its webhook.
const AMBIGUOUS_RECHECK: Duration = Duration::from_secs(30);
/// How many times a job late for its slot books again before it goes anyway: once. A replica
/// late for one slot is short of CPU and likely late for the next too; booking again and
/// again only adds to its load.
const LATE_REBOOKS: u32 = 1;
/// A slot at most this far away is booked and admitted in one request to the store: the claim is
/// then held this long at most before the send, and admission's view is this old at most. A
/// number below its limit (the usual case) finds its slot free and pays one request, not two.
const ADMIT_WITH_SLOT: Duration = Duration::from_millis(10);
/// How long a job for a paused template waits before it looks again.
const PARKED_TEMPLATE_WAIT: Duration = Duration::from_secs(600);

/// A valid job for a configured number, due now: what `decode` hands to `pace`.
pub(super) struct Decoded<'a> {
    /// The delivery's body and headers (its trace context, the body kept for a resend).
    pub(super) envelope: &'a Envelope,
    /// The lane it came from.
    pub(super) lane: Lane,
    /// The job.
    pub(super) job: SendJob,
    /// Its number's configuration.
    pub(super) number: &'a Number,
    /// Sends tried before this delivery.
    pub(super) attempts: u32,
    /// Its earliest send time (its `not_before`, or the due time of the deferral it comes from).
    pub(super) not_before: Option<DateTime<Utc>>,
    /// When an earlier attempt may have reached Meta (an at-least-once job retried after a
    /// timeout).
    pub(super) maybe_sent: Option<DateTime<Utc>>,
}

/// How a job's wait for its send slot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// In its slot (or late within the tolerance), with its claim if it had one.
    Kept,
    /// Woken too late, it gave its claim back and waited for a new slot.
    ClaimReleased,
}

/// A job whose send slot has come: what `pace` hands to `admit`.
pub(super) struct Paced<'a> {
    /// What decoding found.
    pub(super) decoded: Decoded<'a>,
    /// The decision time, after the wait, in milliseconds (the store's precision).
    pub(super) now: DateTime<Utc>,
    /// Admission's answer, when it came with the slot (a slot close enough, see
    /// [`ADMIT_WITH_SLOT`]); `admit` asks the store only when this is `None`.
    pub(super) early: Option<Early>,
}

/// Admission decided in the same request as the slot booking.
pub(super) struct Early {
    verdict: Verdict,
    key: JobKey,
    definition: Option<Arc<TemplateDefinition>>,
}

/// A job admitted and claimed, to be sent at once: what `admit` hands to `send`.
pub(super) struct Admitted<'a> {
    /// What decoding found.
    pub(super) decoded: Decoded<'a>,
    /// The decision time.
    pub(super) now: DateTime<Utc>,
    /// Its claim's key.
    pub(super) key: JobKey,
    /// Send the fallback template instead of the free-form message (care window closed).
    pub(super) fallback: bool,
    /// The registry's definition of the template it sends, if it sends one and it is known.
    pub(super) definition: Option<Arc<TemplateDefinition>>,
}

/// A send Meta accepted, recorded in the store: what `send` hands back for settlement.
#[derive(Debug)]
pub(super) struct Sent {
    /// The job.
    pub(super) job: SendJob,
    /// Meta's id of the message.
    pub(super) wamid: Wamid,
    /// Sends tried, this one included.
    pub(super) attempts: u32,
}

impl From<Sent> for Outcome {
    fn from(sent: Sent) -> Self {
        Outcome::accepted(&sent.job, &sent.wamid, sent.attempts)
    }
}

impl Pipeline {
    /// `decode`: the body as a job (decoding is validation), for a number configured here, due
    /// now. Touches neither the store nor a send slot.
    pub(super) fn decode<'a>(
        &'a self,
        envelope: &'a Envelope,
        lane: Lane,
    ) -> Result<Decoded<'a>, Outcome> {
        let attempts = envelope.headers.attempts();
        let job = job::decode(&envelope.body).map_err(|e| undecodable(&e, envelope))?;
        tracing::Span::current().record("job_id", job.job_id.as_str());
        if self.is_last_delivery(&envelope.headers) {
            let returns = envelope.headers.returns();
            // Its last delivery: the broker dead-letters it if it comes back once more. Said
            // here, with the job's event and metric, rather than tried and lost to a crash.
            let detail = format!(
                "returned to its queue {returns} times without being settled (delivery limit {}); \
                 a worker died or lost its channel each time it held the job",
                self.settings.delivery_limit
            );
            return Err(Outcome::dead(
                DeadReason::DeliveryLimit,
                detail,
                attempts,
                job,
            ));
        }
        // The store keeps milliseconds; deciding on the same precision keeps both stores equal.
        let now = truncate_to_millis(Utc::now());
        let Some(number) = self.numbers.get(&job.phone_number_id) else {
            let detail = format!(
                "phone_number_id {} is not configured on this worker",
                job.phone_number_id
            );
            return Err(Outcome::dead(
                DeadReason::UnknownSender,
                detail,
                attempts,
                job,
            ));
        };
        let due = time_header(&envelope.headers, H_DUE);
        let not_before = not_before(&job, due);
        let job = wait_until_due(job, due, attempts, now)?;
        Ok(Decoded {
            envelope,
            lane,
            job,
            number,
            attempts,
            not_before,
            maybe_sent: time_header(&envelope.headers, H_MAYBE_SENT),
        })
    }

    /// A job on its last delivery (`decode` made it `delivery_limit`) that its record says
    /// was sent is announced sent again, not dead-lettered: a job Meta accepted is never a dead
    /// letter. It comes back this often when its earlier settlements could not publish their
    /// `message.accepted` (a broker nacking every publish). One recorded dead is done; any other
    /// record (none, a claim, an unknown outcome) leaves it a dead letter.
    pub(super) async fn last_delivery(&self, dead: Box<Dead>) -> Outcome {
        let job = dead.job.as_deref();
        let Some((job, key)) = job.and_then(|job| Some((job, self.job_key(job)?))) else {
            return Outcome::Dead(dead);
        };
        match self.store.job(&key).await {
            Ok(Some(JobState::Sent(wamid))) => Outcome::already_sent(job, &wamid),
            Ok(Some(JobState::Dead)) => Outcome::already_dead(),
            Ok(_) => Outcome::Dead(dead),
            Err(e) => {
                warn!(error = %e, "store unavailable on a job's last delivery; dead-lettering it");
                Outcome::Dead(dead)
            }
        }
    }

    /// Whether a delivery with these headers is its job's last: returned once more, the broker
    /// dead-letters it (`delivery_limit`).
    pub(super) fn is_last_delivery(&self, headers: &Headers) -> bool {
        headers.returns() >= self.settings.delivery_limit
    }

    /// The key of `job`'s record in the store: its portfolio's (`None` for a number not
    /// configured here).
    pub(super) fn job_key(&self, job: &SendJob) -> Option<JobKey> {
        let number = self.numbers.get(&job.phone_number_id)?;
        Some(JobKey {
            waba: number.waba.clone(),
            job_id: job.job_id.clone(),
        })
    }

    /// `pace`: waits for the job's slot in its number's send schedule, shared by every replica.
    /// A number halted by a Cloud API error takes no slot: its jobs wait for the cool-down.
    pub(super) async fn pace<'a>(&self, decoded: Decoded<'a>) -> Result<Paced<'a>, Outcome> {
        let (job, number) = (&decoded.job, decoded.number);
        if let Some(until) = self.halted_until(job, number) {
            return Err(Outcome::later(
                until,
                decoded.attempts,
                DeferCause::SendingHalted,
                None,
                decoded.job,
            ));
        }
        // CORRECTNESS: pace before admission. The send must follow admission at once (the pair
        // rate admitted at one time would be spent at another, and a worker that dies between
        // claim and send leaves an ambiguous claim), so a job whose slot is not close waits for
        // it with nothing claimed, and is admitted after the wait. Only a slot close enough
        // (ADMIT_WITH_SLOT) is admitted in the same request. The request decides admission
        // first: a job refused or deferred takes no slot and waits for none, so refusals never
        // slow a number's sendable jobs (a slot is lost only when admission refuses after the
        // wait, because something changed meanwhile).
        let number_id = decoded.job.phone_number_id.clone();
        let pacing = Instant::now();
        let Some(interval) = self.pacer.interval(&number_id) else {
            let now = truncate_to_millis(Utc::now());
            return Ok(Paced {
                decoded,
                now,
                early: None,
            });
        };
        let _ahead = self
            .pacer
            .book_ahead(&number_id, decoded.lane == Lane::Otp)
            .await;
        let asked = Paced {
            now: truncate_to_millis(Utc::now()),
            decoded,
            early: None,
        };
        let definition = self.definition(&asked.decoded);
        let (subject, request) = admission_request(&asked, definition.as_deref(), &self.settings);
        let Paced { decoded, .. } = asked;
        let ask = SlotAsk {
            now: Utc::now(),
            interval,
            within: ADMIT_WITH_SLOT,
        };
        // The wait counts from when the slot was asked for, not from the answer, so a slow
        // round trip does not make one send later than its slot.
        let instant = Instant::now();
        let (wait, early) = match self.store.book_and_admit(&subject, &request, &ask).await {
            Ok(Booked::Later(wait)) => (wait, None),
            Ok(Booked::Admitted { wait, verdict }) => {
                let early = Early {
                    verdict,
                    key: subject.job,
                    definition,
                };
                (wait, Some(early))
            }
            Err(e) => return Err(self.store_unavailable(e, decoded.job, decoded.attempts)),
        };
        let sends = early
            .as_ref()
            .is_none_or(|e| matches!(e.verdict, Verdict::Send { .. }));
        let mut early = early;
        if sends {
            let claim = early.as_ref().map(|e| &e.key);
            let kept = self
                .keep_slot(
                    &decoded.number.waba,
                    &number_id,
                    interval,
                    instant + wait,
                    claim,
                )
                .await;
            match kept {
                Ok(Slot::Kept) => {}
                // Admitted again after the new slot's wait, by `admit`.
                Ok(Slot::ClaimReleased) => early = None,
                Err(e) => return Err(self.store_unavailable(e, decoded.job, decoded.attempts)),
            }
        }
        crate::metrics::paced(pacing.elapsed());
        let now = truncate_to_millis(Utc::now());
        Ok(Paced {
            decoded,
            now,
            early,
        })
    }

    /// Waits for `slot`, the send slot booked in `number`'s schedule. A job woken much later
    /// books a new one (a few times at most); if it holds a `claim` and the new slot is not
    /// near, it gives the claim back before waiting, to be admitted again after the wait.
    async fn keep_slot(
        &self,
        waba: &crate::ids::WabaId,
        number: &crate::ids::PhoneNumberId,
        interval: Duration,
        mut slot: Instant,
        claim: Option<&JobKey>,
    ) -> Result<Slot, StoreError> {
        self.pacer.wait(number, slot).await;
        let mut kept = Slot::Kept;
        for _ in 0..LATE_REBOOKS {
            // CORRECTNESS: the schedule keeps every 1 s window within the limit only for sends
            // that leave their slots less than the headroom's worth late; one woken much later
            // (a stalled machine) would crowd the next second at Meta, so it books a new slot
            // instead (a few times at most, so an overloaded replica still sends).
            if slot.elapsed() <= self.pacer.late_tolerance() {
                break;
            }
            let (wall, instant) = (Utc::now(), Instant::now());
            let wait = self.store.book_slot(waba, number, wall, interval).await?;
            // CORRECTNESS: a claim is held only from admission to the request; held through a
            // long wait, a worker killed meanwhile would leave a job that was never sent looking
            // like one that may have been (ambiguous_send). A new slot as near as one admitted
            // with its booking keeps the claim (no more requests to the store), a later one
            // gives it back, to be admitted again after the wait.
            if let Some(key) = claim
                && kept == Slot::Kept
                && wait > ADMIT_WITH_SLOT
            {
                self.release(key).await;
                kept = Slot::ClaimReleased;
            }
            slot = instant + wait;
            self.pacer.wait(number, slot).await;
        }
        Ok(kept)
    }

    /// The registry's definition of the template `decoded` sends, if it sends one.
    fn definition(&self, decoded: &Decoded<'_>) -> Option<Arc<TemplateDefinition>> {
        let t = template_sent(&decoded.job)?;
        self.registry
            .get(&decoded.number.waba, &t.name, &t.language.code)
    }

    /// `admit`: one round trip to the store, atomic across replicas, decides whether the job
    /// may go now (not sent before, care window, consent, template, campaign, tier, pair rate)
    /// and, if so, claims it.
    pub(super) async fn admit<'a>(&self, mut paced: Paced<'a>) -> Result<Admitted<'a>, Outcome> {
        let early = match paced.early.take() {
            Some(early) => early,
            None => {
                let definition = self.definition(&paced.decoded);
                let (subject, request) =
                    admission_request(&paced, definition.as_deref(), &self.settings);
                match self.store.admit(&subject, &request).await {
                    Ok(verdict) => Early {
                        verdict,
                        key: subject.job,
                        definition,
                    },
                    Err(e) => {
                        let Decoded { job, attempts, .. } = paced.decoded;
                        return Err(self.store_unavailable(e, job, attempts));
                    }
                }
            }
        };
        if let Verdict::AlreadySent(_) = early.verdict {
            self.stats.count_duplicate_avoided();
        }
        admitted(
            early.verdict,
            paced,
            early.key,
            early.definition,
            self.settings.ambiguous_wait,
        )
    }

    /// `send`: the Cloud API call, then what its answer means: an accepted send is recorded;
    /// a failure is classified once (policy), and the claim released unless the message may
    /// exist.
    pub(super) async fn send(&self, admitted: Admitted<'_>) -> Result<Sent, Outcome> {
        let Admitted {
            decoded,
            now,
            key,
            fallback,
            definition,
        } = admitted;
        let Decoded {
            envelope,
            lane,
            job,
            number,
            attempts,
            maybe_sent,
            ..
        } = decoded;
        let (body, sends_template) = {
            let message = message_to_send(&job, fallback);
            let body = serde_json::to_vec(&OutboundMessage::new(
                job.to.as_str(),
                &message,
                job.job_id.as_str(),
            ))
            .expect("a validated message always serialises");
            (body, matches!(message.body, Body::Template(_)))
        };
        // CORRECTNESS: claimed by admission just before: no other worker sends this job while
        // the claim holds, and a worker that dies now leaves a claim that is treated as
        // ambiguous, never resent blindly.
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
                // The template sent is the job's or its fallback: the definition admission checked.
                let marketing = sends_template
                    && definition.is_some_and(|def| def.category() == Some(Category::Marketing));
                let record = WamidRecord {
                    job_id: job.job_id.to_string(),
                    campaign_id: job.campaign_id.as_ref().map(ToString::to_string),
                    // The job span's context, so the webhook's status spans nest under it;
                    // the producer's when spans are not recorded.
                    traceparent: crate::telemetry::current_traceparent()
                        .or_else(|| envelope.headers.get_str(H_TRACEPARENT)),
                    metadata: job.metadata.clone(),
                    resend: marketing.then(|| Resend {
                        job: String::from_utf8_lossy(&envelope.body).into_owned(),
                        lane,
                    }),
                };
                if let Err(e) = self.store.mark_sent(&key, &accepted.wamid, &record).await {
                    // The message exists; its message.accepted still reports it. A redelivery would
                    // find a stale claim and treat it as ambiguous, never resend blindly.
                    error!(error = %e, "could not record the accepted send");
                }
                Ok(Sent {
                    job,
                    wamid: accepted.wamid,
                    attempts,
                })
            }
            Err(SendError::Api(api)) => {
                let outcome = self
                    .on_api_error(*api, job, key, attempts, now, maybe_sent)
                    .await;
                Err(outcome)
            }
            Err(SendError::NotSent(detail)) => {
                crate::metrics::cloud_api_unanswered(false);
                self.release(&key).await;
                let error = send_error("request not sent", detail);
                let from = RetryFrom {
                    at: Utc::now(),
                    maybe_sent,
                };
                Err(retry(&self.settings.retry, job, attempts, error, from))
            }
            Err(SendError::Ambiguous(detail)) => {
                crate::metrics::cloud_api_unanswered(true);
                let error = send_error("send outcome unknown", detail);
                match job.delivery_mode(lane) {
                    DeliveryMode::AtLeastOnce => {
                        self.release(&key).await;
                        let from = RetryFrom {
                            at: Utc::now(),
                            maybe_sent: maybe_sent.or(Some(now)),
                        };
                        Err(retry(&self.settings.retry, job, attempts, error, from))
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
                        Err(Outcome::later(
                            now + recheck,
                            attempts,
                            DeferCause::AmbiguousSend,
                            Some(error),
                            job,
                        ))
                    }
                }
            }
        }
    }

    /// Meta's error answer: what the policy decides, with its side effects (the claim released
    /// unless the job is dead-lettered, a 130429 slowing the number's schedule for every
    /// replica, a halt), then the outcome.
    async fn on_api_error(
        &self,
        api: ApiError,
        job: SendJob,
        key: JobKey,
        attempts: u32,
        now: DateTime<Utc>,
        maybe_sent: Option<DateTime<Utc>>,
    ) -> Outcome {
        crate::metrics::cloud_api_error(api.code);
        let error = api_event_error(&api);
        let action = policy::classify(api.code());
        debug!(
            code = api.code,
            fbtrace_id = api.fbtrace_id.as_deref().unwrap_or(""),
            ?action,
            "cloud api error"
        );
        if !matches!(action, Action::DeadLetter(_)) {
            self.release(&key).await;
        }
        let retry_from = RetryFrom {
            at: Utc::now(),
            maybe_sent,
        };
        match action {
            Action::Throttle(Scope::Number) => {
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
            Action::Halt(scope) => {
                let scope = match scope {
                    Scope::Number | Scope::Pair => HaltScope::Number(job.phone_number_id.clone()),
                    Scope::Waba => HaltScope::Waba(key.waba.clone()),
                    Scope::Token => HaltScope::Token,
                    Scope::App => HaltScope::App,
                };
                self.raise_halt(scope, &api).await;
            }
            _ => {}
        }
        after_api_error(
            action,
            error,
            job,
            attempts,
            now,
            retry_from,
            &self.settings,
        )
    }

    fn store_unavailable(&self, e: StoreError, job: SendJob, attempts: u32) -> Outcome {
        // CORRECTNESS: without the claim there is no duplicate protection: do not send, try
        // again shortly.
        warn!(error = %e, "store unavailable, deferring the job");
        Outcome::later(
            Utc::now() + BUSY_WAIT,
            attempts,
            DeferCause::StoreUnavailable,
            None,
            job,
        )
    }

    async fn release(&self, key: &JobKey) {
        if let Err(e) = self.store.release(key, &self.settings.owner).await {
            warn!(error = %e, "could not release the claim; the job waits for the claim lease");
        }
    }

    /// Stops `scope` for the cool-down, here at once and for the other replicas through the
    /// store (they read it within a heartbeat).
    async fn raise_halt(&self, scope: HaltScope, api: &ApiError) {
        let cooldown = self.settings.halt_cooldown;
        error!(code = api.code, scope = %scope, cooldown_s = cooldown.as_secs(), "sending halted by a Cloud API error; jobs are parked until the cool-down ends or `wa-sender halt resume`");
        self.stats.count_halt(scope.kind());
        let now = Utc::now();
        let until = now + cooldown;
        let halt = Halt {
            scope: scope.to_string(),
            code: api.code,
            cause: api.message.clone(),
            at: now,
            until,
        };
        self.halts.lock().expect("halts lock").insert(scope, until);
        if let Err(e) = self.store.raise_halt(&halt).await {
            warn!(error = %e, "could not share the halt; the other replicas find out by themselves");
        }
    }

    /// Halts whose cool-down has not ended (expired ones are forgotten).
    pub(crate) fn halts_in_force(&self) -> usize {
        let mut halts = self.halts.lock().expect("halts lock");
        let now = Utc::now();
        halts.retain(|_, until| *until > now);
        halts.len()
    }

    fn halted_until(&self, job: &SendJob, number: &Number) -> Option<DateTime<Utc>> {
        let mut halts = self.halts.lock().expect("halts lock");
        let now = Utc::now();
        halts.retain(|_, until| *until > now);
        [
            HaltScope::Number(job.phone_number_id.clone()),
            HaltScope::Waba(number.waba.clone()),
            HaltScope::Token,
            HaltScope::App,
        ]
        .iter()
        .filter_map(|k| halts.get(k).copied())
        .max()
    }
}

/// The dead letter of a body that is not a valid job, with the decoder's specific reason.
pub(super) fn undecodable(e: &job::JobError, envelope: &Envelope) -> Outcome {
    Outcome::undecodable(
        e,
        envelope.headers.attempts(),
        job::salvage_job_id(&envelope.body),
    )
}

/// `t` without its sub-millisecond part.
fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// A time a deferred job carries back from its delay queue (its due time, when an attempt may
/// have been sent); a bad one is ignored.
fn time_header(headers: &Headers, name: &str) -> Option<DateTime<Utc>> {
    headers
        .get_str(name)
        .and_then(|d| DateTime::parse_from_rfc3339(&d).ok())
        .map(|d| d.with_timezone(&Utc))
}

/// A job's earliest send time: its `not_before` or its deferral's due time, the later one.
fn not_before(job: &SendJob, due: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    job.not_before.into_iter().chain(due).max()
}

/// The job back if it is due at `now`. A scheduled job, or a deferred one that came back from a
/// delay queue before its due time (tiers are chosen so it never comes back late), waits again
/// without touching the store or a send slot (admission would say the same); an expired one
/// goes on, to be dead-lettered by admission. Only the first deferral of a scheduled job is
/// announced; the hops through shorter tiers are silent.
fn wait_until_due(
    job: SendJob,
    due: Option<DateTime<Utc>>,
    attempts: u32,
    now: DateTime<Utc>,
) -> Result<SendJob, Outcome> {
    match not_before(&job, due) {
        Some(not_before) if not_before > now && job.expires_at.is_none_or(|e| e > now) => {
            Err(match due.filter(|d| *d > now) {
                Some(_) => Outcome::later_silent(not_before, attempts, DeferCause::NotYetDue, job),
                None => Outcome::later(not_before, attempts, DeferCause::NotBefore, None, job),
            })
        }
        _ => Ok(job),
    }
}

/// The template a job would send: its own, or the fallback of a free-form message.
fn template_sent(job: &SendJob) -> Option<&Template> {
    match &job.message.body {
        Body::Template(t) => Some(t),
        _ => job.fallback_template.as_ref(),
    }
}

/// What admission is asked about a paced job: the job's store keys and everything known about
/// it and the rules in force before the store is read.
fn admission_request(
    paced: &Paced<'_>,
    definition: Option<&TemplateDefinition>,
    settings: &PipelineSettings,
) -> (Subject, admission::Request) {
    let Decoded {
        job,
        number,
        lane,
        not_before,
        ..
    } = &paced.decoded;
    let free_form = !matches!(job.message.body, Body::Template(_));
    let template = template_sent(job);
    let subject = Subject {
        job: JobKey {
            waba: number.waba.clone(),
            job_id: job.job_id.clone(),
        },
        number: job.phone_number_id.clone(),
        to: job.to.clone(),
        campaign: job.campaign_id.clone(),
        template: template.map(|t| (t.name.clone(), t.language.code.clone())),
    };
    let rules = &settings.admission;
    let request = admission::Request {
        owner: settings.owner.clone(),
        now: paced.now,
        lease: settings.claim_lease,
        retake_ambiguous: job.delivery_mode(*lane) == DeliveryMode::AtLeastOnce,
        expires_at: job.expires_at,
        not_before: *not_before,
        free_form,
        template: template.map(|t| TemplateUse {
            fallback: free_form,
            params: definition.and_then(|def| template::check(def, t)),
        }),
        opt_in: rules.opt_in,
        tier_limit: rules
            .tiers
            .get(&number.waba)
            .copied()
            .unwrap_or(rules.default_tier),
        pair: rules.pair,
        campaign_recheck: rules.campaign_recheck,
        template_recheck: rules.template_recheck,
    };
    (subject, request)
}

/// What admission's verdict means: admitted (the claim under `key` is taken; the fallback
/// template goes instead of the free-form message if the verdict says so), or the outcome of a
/// refusal. An at-most-once job whose earlier send has an unknown outcome waits for its webhook
/// up to `ambiguous_wait`, then is dead-lettered.
fn admitted<'a>(
    verdict: Verdict,
    paced: Paced<'a>,
    key: JobKey,
    definition: Option<Arc<TemplateDefinition>>,
    ambiguous_wait: Duration,
) -> Result<Admitted<'a>, Outcome> {
    let now = paced.now;
    let Decoded { job, attempts, .. } = &paced.decoded;
    let attempts = *attempts;
    let fallback = match verdict {
        Verdict::Send { fallback } => fallback,
        Verdict::AlreadySent(wamid) => return Err(Outcome::already_sent(job, &wamid)),
        Verdict::AlreadyDead => return Err(Outcome::already_dead()),
        Verdict::Defer { until, why } => {
            let cause = why.cause();
            let error = EventError {
                code: None,
                title: cause.as_str().into(),
                details: why.to_string(),
                source: ErrorSource::Policy,
            };
            let job = paced.decoded.job;
            return Err(Outcome::later(until, attempts, cause, Some(error), job));
        }
        Verdict::Dead(why) => {
            let detail = match (&why, template_sent(job)) {
                (DeadWhy::TemplateUnknown | DeadWhy::TemplateNotApproved { .. }, Some(t)) => {
                    format!("template {} ({}): {why}", t.name, t.language.code)
                }
                _ => why.to_string(),
            };
            let job = paced.decoded.job;
            return Err(Outcome::dead(why.reason(), detail, attempts, job));
        }
        Verdict::Ambiguous(since) => {
            let job = paced.decoded.job;
            let waited = now
                .signed_duration_since(since)
                .to_std()
                .unwrap_or_default();
            if waited >= ambiguous_wait {
                let detail = format!(
                    "send outcome unknown since {since} and no status webhook arrived within {}s",
                    ambiguous_wait.as_secs()
                );
                return Err(Outcome::dead(
                    DeadReason::AmbiguousSend,
                    detail,
                    attempts,
                    job,
                ));
            }
            let recheck = (ambiguous_wait - waited).min(AMBIGUOUS_RECHECK);
            let cause = DeferCause::AwaitingWebhook;
            return Err(Outcome::later(now + recheck, attempts, cause, None, job));
        }
    };
    Ok(Admitted {
        decoded: paced.decoded,
        now,
        key,
        fallback,
        definition,
    })
}

/// The message that goes out: the job's, or its fallback template when admission says so.
fn message_to_send(job: &SendJob, fallback: bool) -> Cow<'_, Message> {
    match (&job.fallback_template, fallback) {
        (Some(t), true) => Cow::Owned(Message {
            body: Body::Template(t.clone()),
            context: None,
        }),
        _ => Cow::Borrowed(&job.message),
    }
}

/// A send that failed before Meta answered, as an event's error.
fn send_error(title: &str, details: String) -> EventError {
    EventError {
        code: None,
        title: title.into(),
        details,
        source: ErrorSource::Api,
    }
}

/// Meta's error answer as an event's error.
fn api_event_error(api: &ApiError) -> EventError {
    EventError {
        code: Some(api.code),
        title: api.message.clone(),
        details: api.details().to_owned(),
        source: ErrorSource::Api,
    }
}

/// The outcome of Meta's error answer, given the policy's `action` for its code: a dead letter,
/// a retry (counted from `retry_from`, once the claim is released), or a wait counted from
/// `now` that uses up no attempt (a throttle or a halt is not the job's fault).
fn after_api_error(
    action: Action,
    error: EventError,
    job: SendJob,
    attempts: u32,
    now: DateTime<Utc>,
    retry_from: RetryFrom,
    settings: &PipelineSettings,
) -> Outcome {
    let wait = |d: Duration, cause: DeferCause| {
        Outcome::later(
            now + d,
            attempts - 1,
            cause,
            Some(error.clone()),
            job.clone(),
        )
    };
    match action {
        Action::DeadLetter(reason) => {
            let detail = error.details.clone();
            Outcome::dead_after(reason, &error, detail, attempts, job)
        }
        Action::Retry => retry(&settings.retry, job, attempts, error, retry_from),
        Action::Throttle(_) => wait(THROTTLE_WAIT, DeferCause::Throttled),
        Action::Halt(_) => wait(settings.halt_cooldown, DeferCause::SendingHalted),
        Action::ParkTemplate => wait(PARKED_TEMPLATE_WAIT, DeferCause::TemplatePaused),
        Action::Cooldown(d) => wait(d, DeferCause::RecipientCooldown),
    }
}

/// Where a retry counts from, and whether an attempt so far may have reached Meta.
#[derive(Debug, Clone, Copy)]
struct RetryFrom {
    /// The backoff counts from here (once the claim is released).
    at: DateTime<Utc>,
    /// When an attempt's request left without an answer, if one did.
    maybe_sent: Option<DateTime<Utc>>,
}

/// Tried again after the policy's backoff, or dead-lettered when `attempts` used up the
/// budget: `max_attempts`, or `ambiguous_send` when an attempt may have reached Meta (the job
/// may exist; saying it was never sent would be wrong).
fn retry(
    policy: &RetryPolicy,
    job: SendJob,
    attempts: u32,
    error: EventError,
    from: RetryFrom,
) -> Outcome {
    let Some(delay) = policy.delay_after(attempts) else {
        let gave_up = format!(
            "gave up after {attempts} attempts; last error: {}",
            error.details
        );
        return match from.maybe_sent {
            None => Outcome::dead_after(DeadReason::MaxAttempts, &error, gave_up, attempts, job),
            Some(at) => {
                let detail = format!(
                    "{gave_up}; the attempt at {at} got no answer after its request left, so \
                     the message may exist (a status webhook would tell)"
                );
                Outcome::dead_after(DeadReason::AmbiguousSend, &error, detail, attempts, job)
            }
        };
    };
    let due = from.at + delay;
    let mut later = Later::new(due, attempts, DeferCause::Retry, Some(error), job);
    later.maybe_sent = from.maybe_sent;
    Outcome::Later(Box::new(later))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use chrono::TimeZone;
    use serde_json::{Value, json};

    use super::*;
    use crate::ids::WabaId;
    use crate::pipeline::{AdmissionSettings, PacingSettings};
    use crate::policy::DelayTiers;
    use crate::policy::admission::{DeferReason, OptInPolicy, PairRate};

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap() + chrono::TimeDelta::seconds(secs)
    }

    fn job(overrides: Value) -> SendJob {
        let mut body = json!({
            "schema": "wa.send.v1", "job_id": "j-1", "phone_number_id": "106540352242922",
            "to": "16505551234", "message": {"type": "text", "text": {"body": "hello"}},
        });
        for (k, v) in overrides.as_object().unwrap() {
            body[k] = v.clone();
        }
        job::decode(&serde_json::to_vec(&body).unwrap()).expect("a valid job")
    }

    fn template_message(name: &str) -> Value {
        json!({"type": "template", "template": {"name": name, "language": {"code": "en_US"},
               "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ann"}]}]}})
    }

    fn waba() -> WabaId {
        WabaId::parse("102290129340398".to_owned()).unwrap()
    }

    fn number() -> Number {
        Number {
            waba: waba(),
            throughput_mps: 80,
            token: "token".to_owned().into(),
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            body: Bytes::new(),
            headers: Headers::default(),
        }
    }

    fn settings() -> PipelineSettings {
        PipelineSettings {
            owner: "replica-1".into(),
            delivery_limit: 20,
            claim_lease: Duration::from_secs(60),
            ambiguous_wait: Duration::from_secs(600),
            halt_cooldown: Duration::from_secs(300),
            retry: RetryPolicy {
                min_delay: Duration::from_secs(2),
                max_delay: Duration::from_secs(60),
                factor: 2.0,
                max_attempts: 3,
            },
            tiers: DelayTiers::default(),
            admission: AdmissionSettings {
                opt_in: OptInPolicy {
                    marketing: true,
                    utility: false,
                    authentication: false,
                },
                pair: PairRate {
                    period: Duration::from_secs(6),
                    burst: 45,
                    margin: Duration::from_millis(500),
                },
                tiers: BTreeMap::from([(waba(), Some(1000))]),
                default_tier: Some(250),
                template_refresh: Duration::from_secs(300),
                campaign_recheck: Duration::from_secs(30),
                template_recheck: Duration::from_secs(600),
            },
            pacing: PacingSettings {
                group: "g".into(),
                heartbeat: Duration::from_secs(1),
                replica_ttl: Duration::from_secs(3),
                headroom: 0.97,
                throttle_cooldown: Duration::from_secs(60),
            },
        }
    }

    fn paced<'a>(
        envelope: &'a Envelope,
        number: &'a Number,
        lane: Lane,
        job: SendJob,
    ) -> Paced<'a> {
        Paced {
            decoded: Decoded {
                envelope,
                lane,
                job,
                number,
                attempts: 1,
                not_before: Some(at(-10)),
                maybe_sent: None,
            },
            now: at(0),
            early: None,
        }
    }

    fn later(outcome: Outcome) -> super::super::Later {
        match outcome {
            Outcome::Later(later) => *later,
            other => panic!("expected a deferral, got {other:?}"),
        }
    }

    fn dead(outcome: Outcome) -> super::super::Dead {
        match outcome {
            Outcome::Dead(dead) => *dead,
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn the_due_time_of_a_deferral_is_read_back_and_a_bad_one_ignored() {
        let mut headers = Headers::default();
        headers.set_str(H_DUE, "2030-01-01T12:00:30+00:00");
        assert_eq!(time_header(&headers, H_DUE), Some(at(30)));
        headers.set_str(H_DUE, "soon");
        assert_eq!(time_header(&headers, H_DUE), None);
        assert_eq!(time_header(&Headers::default(), H_DUE), None);
    }

    #[test]
    fn a_job_waits_until_it_is_due_and_only_a_first_deferral_is_announced() {
        let scheduled = || job(json!({"not_before": "2030-01-01T12:01:00Z"}));
        // Its not_before ahead: announced.
        let wait = later(wait_until_due(scheduled(), None, 0, at(0)).unwrap_err());
        assert_eq!(
            (wait.due, wait.cause, wait.announce),
            (at(60), DeferCause::NotBefore, true)
        );
        // Back from a delay queue before its due time: a silent hop, to the later of the two.
        let wait = later(wait_until_due(scheduled(), Some(at(90)), 2, at(0)).unwrap_err());
        assert_eq!(
            (wait.due, wait.cause, wait.announce),
            (at(90), DeferCause::NotYetDue, false)
        );
        assert_eq!(wait.attempts, 2);
        // A due time passed but not_before ahead: announced again.
        let wait = later(wait_until_due(scheduled(), Some(at(-5)), 0, at(0)).unwrap_err());
        assert!(wait.announce);
        // Due, or never scheduled: on to the next stage.
        assert!(wait_until_due(scheduled(), None, 0, at(60)).is_ok());
        assert!(wait_until_due(job(json!({})), None, 0, at(0)).is_ok());
        // Expired while it waits: goes on, for admission to dead-letter it.
        let expired = job(json!({"not_before": "2030-01-01T12:01:00Z",
                                 "expires_at": "2030-01-01T12:02:00Z"}));
        assert!(wait_until_due(expired, None, 0, at(180)).is_ok());
    }

    #[test]
    fn admission_is_asked_about_the_template_that_would_be_sent() {
        let (envelope, number) = (envelope(), number());
        let free_form = job(json!({"fallback_template":
            {"name": "care_reopen", "language": {"code": "en_US"}}}));
        let paced = paced(&envelope, &number, Lane::Bulk, free_form);
        let (subject, request) = admission_request(&paced, None, &settings());
        assert_eq!(subject.job.waba, waba());
        assert_eq!(subject.job.job_id.as_str(), "j-1");
        assert_eq!(
            subject.template,
            Some(("care_reopen".into(), "en_US".into()))
        );
        assert!(request.free_form);
        assert_eq!(
            request.template,
            Some(TemplateUse {
                fallback: true,
                params: None
            })
        );
        assert_eq!((request.now, request.not_before), (at(0), Some(at(-10))));
        assert_eq!(request.owner, "replica-1");
        assert_eq!(request.lease, Duration::from_secs(60));
        // The portfolio's own tier, else the default.
        assert_eq!(request.tier_limit, Some(1000));
        let mut elsewhere = settings();
        elsewhere.admission.tiers.clear();
        assert_eq!(
            admission_request(&paced, None, &elsewhere).1.tier_limit,
            Some(250)
        );
    }

    #[test]
    fn admission_is_told_what_is_wrong_with_a_templates_parameters_and_who_may_retake_a_claim() {
        let (envelope, number) = (envelope(), number());
        let definition: TemplateDefinition = serde_json::from_value(json!({
            "name": "order_update", "language": "en_US", "status": "APPROVED", "category": "UTILITY",
            "components": [{"type": "BODY", "text": "Hi {{1}}, order {{2}} shipped."}]
        }))
        .unwrap();
        let sent = job(json!({"message": template_message("order_update")}));
        let otp = paced(&envelope, &number, Lane::Otp, sent.clone());
        let (subject, request) = admission_request(&otp, Some(&definition), &settings());
        assert!(!request.free_form);
        let template = request.template.expect("a template");
        assert!(!template.fallback);
        assert!(template.params.is_some(), "one parameter of two is sent");
        assert_eq!(
            subject.template,
            Some(("order_update".into(), "en_US".into()))
        );
        // At-least-once (otp) takes over an ambiguous claim; at-most-once (bulk) waits.
        assert!(request.retake_ambiguous);
        let bulk = paced(&envelope, &number, Lane::Bulk, sent);
        assert!(
            !admission_request(&bulk, None, &settings())
                .1
                .retake_ambiguous
        );
    }

    fn key() -> JobKey {
        JobKey {
            waba: waba(),
            job_id: crate::ids::JobId::parse("j-1".to_owned()).unwrap(),
        }
    }

    #[test]
    fn a_send_verdict_admits_the_job_with_its_claim_and_the_message_to_send() {
        let (envelope, number) = (envelope(), number());
        let paced = paced(&envelope, &number, Lane::Bulk, job(json!({})));
        let verdict = Verdict::Send { fallback: true };
        let wait = settings().ambiguous_wait;
        let Ok(admitted) = admitted(verdict, paced, key(), None, wait) else {
            panic!("admitted");
        };
        assert!(admitted.fallback);
        assert_eq!(admitted.key, key());
        assert_eq!(admitted.now, at(0));
        assert_eq!(admitted.decoded.attempts, 1);
    }

    #[test]
    fn each_refusal_has_its_outcome() {
        let (envelope, number) = (envelope(), number());
        let wait = Duration::from_secs(600);
        let refuse = |verdict, job| {
            let paced = paced(&envelope, &number, Lane::Bulk, job);
            match admitted(verdict, paced, key(), None, wait) {
                Ok(_) => panic!("admitted"),
                Err(outcome) => outcome,
            }
        };
        let plain = || job(json!({}));

        let wamid = Wamid::parse("wamid.HBgLMTY1MDU1NTEyMzQVAgARGBI".to_owned()).unwrap();
        let Outcome::AlreadyDone(Some(event)) = refuse(Verdict::AlreadySent(wamid), plain()) else {
            panic!("already sent");
        };
        assert_eq!(
            event.wamid.as_deref(),
            Some("wamid.HBgLMTY1MDU1NTEyMzQVAgARGBI")
        );
        assert!(matches!(
            refuse(Verdict::AlreadyDead, plain()),
            Outcome::AlreadyDone(None)
        ));

        let defer = Verdict::Defer {
            until: at(6),
            why: DeferReason::PairRate,
        };
        let deferred = later(refuse(defer, plain()));
        assert_eq!(
            (deferred.due, deferred.cause),
            (at(6), DeferCause::PairRate)
        );
        assert_eq!(deferred.attempts, 1);
        let error = deferred.error.expect("the cause as an error");
        assert_eq!(error.title, "pair_rate");
        assert_eq!(error.details, "pair rate to this recipient");
        assert_eq!(error.source, ErrorSource::Policy);

        let unknown = dead(refuse(
            Verdict::Dead(DeadWhy::TemplateUnknown),
            job(json!({"message": template_message("order_update")})),
        ));
        assert_eq!(unknown.reason, DeadReason::TemplateNotApproved);
        assert!(
            unknown
                .detail
                .starts_with("template order_update (en_US): "),
            "{}",
            unknown.detail
        );
        let cancelled = dead(refuse(Verdict::Dead(DeadWhy::CampaignCancelled), plain()));
        assert_eq!(cancelled.detail, "its campaign was cancelled");
    }

    #[test]
    fn an_ambiguous_send_waits_for_its_webhook_then_is_dead_lettered() {
        let (envelope, number) = (envelope(), number());
        let wait = Duration::from_secs(600);
        let decide = |since| {
            let paced = paced(&envelope, &number, Lane::Bulk, job(json!({})));
            admitted(Verdict::Ambiguous(since), paced, key(), None, wait)
                .err()
                .expect("refused")
        };
        // 10 s of 600 waited: looks again in 30 s; 590 s waited: in the 10 s left.
        assert_eq!(later(decide(at(-10))).due, at(30));
        let almost = later(decide(at(-590)));
        assert_eq!(almost.due, at(10));
        assert!(almost.announce);
        let given_up = dead(decide(at(-600)));
        assert_eq!(given_up.reason, DeadReason::AmbiguousSend);
        assert!(
            given_up.detail.contains("within 600s"),
            "{}",
            given_up.detail
        );
    }

    #[test]
    fn the_fallback_template_goes_out_only_when_admission_says_so() {
        let with_fallback = job(json!({"fallback_template":
            {"name": "care_reopen", "language": {"code": "en_US"}}}));
        let Body::Template(t) = &message_to_send(&with_fallback, true).body else {
            panic!("the fallback template");
        };
        assert_eq!(t.name, "care_reopen");
        assert_eq!(
            *message_to_send(&with_fallback, false),
            with_fallback.message
        );
        let without = job(json!({}));
        assert_eq!(*message_to_send(&without, true), without.message);
    }

    fn meta_error(code: i64) -> EventError {
        api_event_error(&ApiError {
            message: "(#x) something".into(),
            kind: "OAuthException".into(),
            code,
            error_subcode: None,
            error_data: Some(crate::cloud::ErrorData {
                messaging_product: Some("whatsapp".into()),
                details: "the details".into(),
            }),
            fbtrace_id: None,
        })
    }

    #[test]
    fn metas_error_becomes_the_outcome_its_action_says() {
        let settings = settings();
        let decide = |action, attempts| {
            after_api_error(
                action,
                meta_error(131026),
                job(json!({})),
                attempts,
                at(0),
                RetryFrom {
                    at: at(5),
                    maybe_sent: None,
                },
                &settings,
            )
        };
        let undeliverable = dead(decide(
            Action::DeadLetter(DeadReason::RecipientUndeliverable),
            1,
        ));
        assert_eq!(undeliverable.reason, DeadReason::RecipientUndeliverable);
        assert_eq!(
            (undeliverable.code, undeliverable.source),
            (Some(131026), ErrorSource::Api)
        );
        assert_eq!(
            (undeliverable.detail.as_str(), undeliverable.attempts),
            ("the details", 1)
        );

        // Waits count from the decision and use up no attempt.
        let cases = [
            (
                Action::Throttle(Scope::Number),
                at(1),
                DeferCause::Throttled,
            ),
            (Action::Throttle(Scope::Pair), at(1), DeferCause::Throttled),
            (
                Action::Halt(Scope::Token),
                at(300),
                DeferCause::SendingHalted,
            ),
            (Action::ParkTemplate, at(600), DeferCause::TemplatePaused),
            (
                Action::Cooldown(Duration::from_secs(86_400)),
                at(86_400),
                DeferCause::RecipientCooldown,
            ),
        ];
        for (action, due, cause) in cases {
            let wait = later(decide(action, 2));
            assert_eq!((wait.due, wait.cause), (due, cause), "{action:?}");
            assert_eq!(wait.attempts, 1, "{action:?}");
            assert_eq!(wait.error.expect("Meta's error").code, Some(131026));
        }

        // A retry counts from when the claim was released, and uses up an attempt.
        let retried = later(decide(Action::Retry, 1));
        assert_eq!((retried.cause, retried.attempts), (DeferCause::Retry, 1));
        assert!(
            retried.due >= at(5) + Duration::from_secs(2),
            "{}",
            retried.due
        );
        assert!(
            retried.due <= at(5) + Duration::from_secs(60),
            "{}",
            retried.due
        );
    }

    #[test]
    fn a_retry_past_the_budget_is_dead_lettered_with_the_last_error() {
        let policy = settings().retry;
        let error = send_error("request not sent", "connection refused".into());
        let from = RetryFrom {
            at: at(0),
            maybe_sent: None,
        };
        let outcome = retry(&policy, job(json!({})), 3, error.clone(), from);
        let gave_up = dead(outcome);
        assert_eq!(gave_up.reason, DeadReason::MaxAttempts);
        assert_eq!(
            gave_up.detail,
            "gave up after 3 attempts; last error: connection refused"
        );
        assert_eq!((gave_up.code, gave_up.source), (None, ErrorSource::Api));

        // An attempt that may have reached Meta goes with every retry, and decides the end.
        let maybe = RetryFrom {
            at: at(0),
            maybe_sent: Some(at(-30)),
        };
        let retried = later(retry(&policy, job(json!({})), 1, error.clone(), maybe));
        assert_eq!(retried.maybe_sent, Some(at(-30)));
        let unknown = dead(retry(&policy, job(json!({})), 3, error, maybe));
        assert_eq!(unknown.reason, DeadReason::AmbiguousSend);
        assert!(
            unknown.detail.starts_with(
                "gave up after 3 attempts; last error: connection refused; the attempt at 2030-01-01 11:59:30 UTC"
            ),
            "{}",
            unknown.detail
        );
    }
}
