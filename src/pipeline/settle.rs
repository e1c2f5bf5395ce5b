//! The `settle` stage, the last of `decode → pace → admit → send → settle`: applies an
//! [`Outcome`] to its delivery through the shared settlement (events, dead letters, ack after
//! confirm); deferrals, which only the worker makes, are built here.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tracing::{debug, error, info, warn};

use super::{Dead, Later, Outcome, Pipeline, SettleError};
use crate::broker::{
    BrokerError, Delivery, Envelope, H_ATTEMPTS, H_DUE, H_LANE, H_MAYBE_SENT, Headers, Route,
    Target,
};
use crate::event::{ErrorSource, Event, EventError};
use crate::job::Lane;
use crate::policy::DelayTiers;
use crate::settlement::{self, DeadLetter, Trace};
use crate::store::Deferral;

impl Pipeline {
    /// Applies an outcome: the one place a delivery is acked.
    pub async fn settle(&self, delivery: Delivery, outcome: Outcome) -> Result<(), SettleError> {
        let lane = delivery.lane;
        let mut published = self.publish(&delivery.envelope, lane, &outcome).await;
        // CORRECTNESS: a job on its last delivery that goes back to its queue is dead-lettered
        // by the broker (its delivery limit), whatever its outcome: a job Meta accepted would
        // become a dead letter. So its publishes are tried again first, on the new channel a
        // refused publish brings (at most one per 500 ms), for about 18 s.
        if published.is_err() && self.is_last_delivery(&delivery.envelope.headers) {
            let mut waits = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(6)
                .build();
            while let (Err(e), Some(wait)) = (&published, waits.next()) {
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "settlement publish failed on the job's last delivery; trying again before it is returned and the broker dead-letters it");
                tokio::time::sleep(wait).await;
                published = self.publish(&delivery.envelope, lane, &outcome).await;
            }
        }
        if let Err(e) = &published {
            error!(error = %e, "settlement publish failed; returning the job to its queue");
        }
        // CORRECTNESS: acked only after every publish is confirmed; if one failed, the delivery
        // goes back to its queue and is decided again (the claim prevents a second send).
        if let Err(unsettled) = settlement::ack_or_requeue(delivery, published).await {
            self.stats.count_requeued(lane);
            return Err(SettleError::Broker(unsettled.into_error()));
        }
        self.stats.count(&outcome, lane);
        Ok(())
    }

    /// Publishes what `outcome` announces or moves: its event, its deferral, its dead letter.
    async fn publish(
        &self,
        envelope: &Envelope,
        lane: Lane,
        outcome: &Outcome,
    ) -> Result<(), BrokerError> {
        match outcome {
            Outcome::Accepted(event) => {
                debug!(wamid = event.wamid.as_deref().unwrap_or(""), "accepted");
                self.publish_event(event).await
            }
            Outcome::AlreadyDone(event) => match event {
                Some(event) => self.publish_event(event).await,
                None => Ok(()),
            },
            Outcome::Later(later) => self.publish_later(envelope, lane, later).await,
            Outcome::Dead(dead) => self.publish_dead(envelope, lane, dead).await,
        }
    }

    async fn publish_event(&self, event: &Event) -> Result<(), BrokerError> {
        settlement::publish_event(&self.events, event, Trace::Current).await
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
        debug!(cause = %later.cause, why = later.cause.title(), delay_queue = %DelayTiers::name(tier), due = %later.due, "deferred");
        // The decoded job names its number; only an undecodable body (never deferred) is probed.
        let route = match &later.job {
            Some(job) => Route::new(lane, job.phone_number_id.as_str()),
            None => Route::of(lane, &original.body),
        };
        self.broker
            .publish(
                Target::Delay { tier, route },
                Envelope {
                    body: original.body.clone(),
                    headers: deferral_headers(original.headers.clone(), later),
                },
            )
            .await?;
        let Some(event) = deferred_event(later) else {
            return Ok(());
        };
        self.publish_event(&event).await?;
        self.note_deferral(later).await;
        Ok(())
    }

    /// Notes an announced deferral with the job's record, for `wa-sender job`; a failure only
    /// costs that view, so it is logged, not returned.
    async fn note_deferral(&self, later: &Later) {
        let Some(key) = later.job.as_ref().and_then(|job| self.job_key(job)) else {
            return;
        };
        let deferral = Deferral {
            at: Utc::now(),
            until: later.due,
            cause: later.cause.as_str().to_owned(),
        };
        if let Err(e) = self.store.note_deferral(&key, &deferral).await {
            warn!(error = %e, "could not note the deferral");
        }
    }

    /// The dead letter and its event, then the job recorded dead (its campaign's count, and
    /// a redelivery finds it settled) before the ack.
    async fn publish_dead(
        &self,
        original: &Envelope,
        lane: Lane,
        dead: &Dead,
    ) -> Result<(), BrokerError> {
        // A job's outcome, not a fault of the worker: the dead letter and its event carry it,
        // so the log has it at info, where a campaign's thousands of refusals do not bury the
        // warnings that need a person.
        info!(reason = %dead.reason, code = dead.code, detail = %dead.detail, "dead-lettered");
        let letter = dead_letter(dead);
        // Its lane goes with it, so that a replay sends it back where it came from.
        let mut headers = original.headers.clone();
        headers.set_str(H_LANE, lane.as_str());
        letter
            .publish(self.broker.as_ref(), original.body.clone(), headers)
            .await?;
        let about = match &dead.job {
            Some(job) => Event::for_job("job.dead_lettered", job),
            None => Event {
                job_id: dead.salvaged_job_id.clone(),
                ..Event::new("job.dead_lettered")
            },
        };
        self.publish_event(&letter.event(about)).await?;
        if let Some(job) = &dead.job
            && let Some(key) = self.job_key(job)
            && let Err(e) = (self.store)
                .mark_dead(&key, dead.reason, job.campaign_id.as_ref())
                .await
        {
            warn!(error = %e, "could not record the dead letter");
        }
        Ok(())
    }
}

/// A worker's dead letter: the job's attempts always go with it.
fn dead_letter(dead: &Dead) -> DeadLetter<'_> {
    DeadLetter {
        reason: dead.reason,
        code: dead.code,
        detail: &dead.detail,
        source: dead.source,
        attempts: Some(dead.attempts),
    }
}

/// A deferred job's headers: the ones it came with, its attempts, when it is due (it waits
/// again if a delay queue brings it back early) and whether an attempt may have been sent.
fn deferral_headers(mut headers: Headers, later: &Later) -> Headers {
    headers
        .set_int(H_ATTEMPTS, i64::from(later.attempts))
        .set_str(H_DUE, later.due.to_rfc3339());
    if let Some(at) = later.maybe_sent {
        headers.set_str(H_MAYBE_SENT, at.to_rfc3339());
    }
    headers
}

/// The `job.deferred` event of a deferral, unless it is a silent hop: its error, or the cause's
/// title and the due time as a policy error.
fn deferred_event(later: &Later) -> Option<Event> {
    let job = later.job.as_ref().filter(|_| later.announce)?;
    let mut event = Event::for_job("job.deferred", job);
    event.attempts = Some(later.attempts);
    event.error = later.error.clone().or_else(|| {
        Some(EventError {
            code: None,
            title: later.cause.title().to_owned(),
            details: format!("due {}", later.due),
            source: ErrorSource::Policy,
        })
    });
    Some(event)
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone};

    use super::*;
    use crate::broker::{H_DETAIL, H_ERROR_CODE, H_REASON, H_TRACEPARENT};
    use crate::event::DeadReason;
    use crate::job::SendJob;
    use crate::vocab::DeferCause;

    fn job() -> SendJob {
        crate::job::decode(
            br#"{"schema": "wa.send.v1", "job_id": "j-1", "phone_number_id": "106540352242922",
                 "to": "15551234567", "message": {"type": "text", "text": {"body": "hi"}}}"#,
        )
        .expect("a valid job")
    }

    fn due() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 7, 1, 12, 0, 0).unwrap()
    }

    #[test]
    fn a_deferred_job_keeps_its_headers_and_carries_its_attempts_and_due_time() {
        let mut original = Headers::default();
        original
            .set_str(H_TRACEPARENT, "00-abc-def-01")
            .set_int(H_ATTEMPTS, 1);
        let Outcome::Later(mut later) = Outcome::later(due(), 2, DeferCause::Retry, None, job())
        else {
            panic!("later");
        };
        let headers = deferral_headers(original.clone(), &later);
        assert_eq!(headers.get_int(H_ATTEMPTS), Some(2));
        assert_eq!(headers.get_str(H_MAYBE_SENT), None);
        later.maybe_sent = Some(due());
        let again = deferral_headers(original, &later);
        assert_eq!(
            again.get_str(H_MAYBE_SENT).as_deref(),
            Some("2025-07-01T12:00:00+00:00")
        );
        assert_eq!(
            headers.get_str(H_DUE).as_deref(),
            Some("2025-07-01T12:00:00+00:00")
        );
        assert_eq!(
            headers.get_str(H_TRACEPARENT).as_deref(),
            Some("00-abc-def-01")
        );
    }

    #[test]
    fn a_deferral_without_an_error_is_announced_with_its_cause_as_a_policy_error() {
        let Outcome::Later(later) =
            Outcome::later(due(), 1, DeferCause::CampaignPaused, None, job())
        else {
            panic!("later");
        };
        let event = deferred_event(&later).expect("announced");
        assert_eq!(event.event, "job.deferred");
        assert_eq!(event.job_id.as_deref(), Some("j-1"));
        assert_eq!(event.attempts, Some(1));
        let error = event.error.unwrap();
        assert_eq!(error.title, "campaign paused");
        assert_eq!(error.details, "due 2025-07-01 12:00:00 UTC");
        assert_eq!(error.source, ErrorSource::Policy);
    }

    #[test]
    fn a_deferral_after_an_error_carries_that_error_and_a_silent_hop_nothing() {
        let meta = EventError {
            code: Some(130429),
            title: "Rate limit hit".into(),
            details: "throughput reached".into(),
            source: ErrorSource::Api,
        };
        let Outcome::Later(later) =
            Outcome::later(due(), 0, DeferCause::Throttled, Some(meta.clone()), job())
        else {
            panic!("later");
        };
        assert_eq!(deferred_event(&later).unwrap().error, Some(meta));
        let Outcome::Later(hop) = Outcome::later_silent(due(), 0, DeferCause::NotYetDue, job())
        else {
            panic!("later");
        };
        assert_eq!(deferred_event(&hop), None);
    }

    #[test]
    fn a_workers_dead_letter_always_says_its_attempts() {
        let Outcome::Dead(dead) = Outcome::dead(DeadReason::Expired, "expired at noon", 0, job())
        else {
            panic!("dead");
        };
        let headers = dead_letter(&dead).headers(Headers::default());
        assert_eq!(headers.get_int(H_ATTEMPTS), Some(0));
        assert_eq!(headers.get_str(H_REASON).as_deref(), Some("expired"));
        assert_eq!(
            headers.get_str(H_DETAIL).as_deref(),
            Some("expired at noon")
        );
        assert_eq!(headers.get_int(H_ERROR_CODE), None);
        let event = dead_letter(&dead).event(Event::for_job("job.dead_lettered", &job()));
        assert_eq!(event.attempts, Some(0));
        assert_eq!(event.error.unwrap().source, ErrorSource::Policy);
    }
}
