//! Settlement, the end of every delivery, shared by the worker's `settle` stage and the webhook
//! processor: events go to `wa.events` with the job's trace context, several of a kind to a
//! message ([`EventBatches`]); a dead letter goes to
//! `wa.dead` with its headers, followed by its `job.dead_lettered` event; and a delivery is
//! acked only once everything it published was confirmed, or else returned to its queue.

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::{
    self, Broker, BrokerError, Delivery, Envelope, EventBatches, H_ATTEMPTS, H_DEAD_AT, H_DETAIL,
    H_ERROR_CODE, H_REASON, H_TRACEPARENT, Headers, Target,
};
use crate::event::{Event, EventError};
use crate::telemetry;
use crate::vocab::{DeadReason, ErrorSource};

/// The longest `x-wa-detail` header, in characters (the event carries the whole detail).
const DETAIL_LIMIT: usize = 1000;

/// Where an event's trace context comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trace<'a> {
    /// The current span: the worker's job span.
    Current,
    /// A job's recorded `traceparent`, so a webhook's events join the job's trace (`None`: the
    /// job is not known, the event starts no trace).
    Recorded(Option<&'a str>),
}

impl Trace<'_> {
    /// Headers carrying it.
    pub(crate) fn headers(self) -> Headers {
        let mut headers = Headers::default();
        match self {
            Trace::Current => telemetry::inject_current(&mut headers),
            Trace::Recorded(Some(trace)) => {
                headers.set_str(H_TRACEPARENT, trace);
            }
            Trace::Recorded(None) => {}
        }
        headers
    }

    /// Its W3C `traceparent`, if there is one.
    pub(crate) fn traceparent(self) -> Option<String> {
        match self {
            Trace::Current => telemetry::current_traceparent(),
            Trace::Recorded(trace) => trace.map(str::to_owned),
        }
    }
}

/// Publishes an event to `wa.events`, routed by its kind, with its trace context; returns once
/// the message holding it was confirmed.
pub(crate) async fn publish_event(
    events: &Arc<EventBatches>,
    event: &Event,
    trace: Trace<'_>,
) -> Result<(), BrokerError> {
    let json = broker::event_json(event, trace.traceparent());
    events.publish(&event.event, json).await
}

/// A dead letter as its headers and its event tell it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadLetter<'a> {
    /// Why (also the routing key on `wa.dead`).
    pub(crate) reason: DeadReason,
    /// Meta's code, when Meta said so.
    pub(crate) code: Option<i64>,
    /// The specific detail.
    pub(crate) detail: &'a str,
    /// Where it was found.
    pub(crate) source: ErrorSource,
    /// Sends tried, for a job the worker settles; `None` for a failure a webhook reported (no
    /// `x-wa-attempts` header then).
    pub(crate) attempts: Option<u32>,
}

impl DeadLetter<'_> {
    /// `headers` plus the dead letter's own: `x-wa-reason`, `x-wa-attempts`, `x-wa-detail`
    /// (cut to 1000 characters), `x-wa-error-code` and `x-wa-dead-at` (now: nothing else
    /// records when a message reached the dead queue).
    pub(crate) fn headers(&self, mut headers: Headers) -> Headers {
        headers
            .set_str(H_REASON, self.reason.as_str())
            .set_str(
                H_DETAIL,
                self.detail.chars().take(DETAIL_LIMIT).collect::<String>(),
            )
            .set_str(
                H_DEAD_AT,
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
        if let Some(attempts) = self.attempts {
            headers.set_int(H_ATTEMPTS, i64::from(attempts));
        }
        if let Some(code) = self.code {
            headers.set_int(H_ERROR_CODE, code);
        }
        headers
    }

    /// `about` (the job's fields, its time) as the `job.dead_lettered` event: the reason, the
    /// attempts, and the error titled by the reason.
    pub(crate) fn event(&self, about: Event) -> Event {
        Event {
            event: "job.dead_lettered".into(),
            reason: Some(self.reason),
            attempts: self.attempts.or(about.attempts),
            error: Some(EventError {
                code: self.code,
                title: self.reason.as_str().into(),
                details: self.detail.to_owned(),
                source: self.source,
            }),
            ..about
        }
    }

    /// Publishes `body` to `wa.dead`, routed by the reason, with the dead letter's headers added
    /// to `headers`. Its event is published by the caller, once what goes with it is recorded.
    pub(crate) async fn publish(
        &self,
        broker: &dyn Broker,
        body: Bytes,
        headers: Headers,
    ) -> Result<(), BrokerError> {
        let envelope = Envelope {
            body,
            headers: self.headers(headers),
        };
        broker.publish(Target::Dead(self.reason), envelope).await
    }
}

/// A settlement that did not complete.
#[derive(Debug)]
pub(crate) enum Unsettled<E> {
    /// Publishing failed with `E`; the delivery was returned to its queue (the requeue's own
    /// result alongside).
    Requeued(E, Result<(), BrokerError>),
    /// Everything was published but the ack failed; the broker delivers it again.
    NotAcked(BrokerError),
}

impl<E: From<BrokerError>> Unsettled<E> {
    /// What went wrong: the failed publish, or the failed ack.
    pub(crate) fn into_error(self) -> E {
        match self {
            Unsettled::Requeued(e, _) => e,
            Unsettled::NotAcked(e) => e.into(),
        }
    }
}

/// Acks `delivery` if everything its settlement published was confirmed (`published` is `Ok`),
/// else returns it to its queue.
///
/// CORRECTNESS: ack only after every publish is confirmed. A delivery whose publish failed goes
/// back to its queue and is decided again: a job's claim prevents a second send, a webhook's
/// statuses are recognised as seen. Acked first, a failed publish would lose its event, its
/// dead letter or its deferral for good.
pub(crate) async fn ack_or_requeue<Q, T, E>(
    delivery: Delivery<Q>,
    published: Result<T, E>,
) -> Result<T, Unsettled<E>> {
    match published {
        Ok(done) => {
            delivery.ack().await.map_err(Unsettled::NotAcked)?;
            Ok(done)
        }
        Err(e) => Err(Unsettled::Requeued(e, delivery.requeue().await)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::broker::{Acker, HeaderValue};

    fn letter(attempts: Option<u32>, code: Option<i64>) -> DeadLetter<'static> {
        DeadLetter {
            reason: DeadReason::RecipientUndeliverable,
            code,
            detail: "unable to deliver",
            source: ErrorSource::Api,
            attempts,
        }
    }

    #[test]
    fn a_dead_letter_adds_its_headers_to_the_ones_it_came_with() {
        let mut original = Headers::default();
        original
            .set_str(H_TRACEPARENT, "00-abc-def-01")
            .set_int(H_ATTEMPTS, 1);
        let headers = letter(Some(2), Some(131026)).headers(original);
        assert_eq!(
            headers.get_str(H_REASON).as_deref(),
            Some("recipient_undeliverable")
        );
        assert_eq!(headers.get_int(H_ATTEMPTS), Some(2));
        assert_eq!(headers.get_int(H_ERROR_CODE), Some(131026));
        assert_eq!(
            headers.get_str(H_DETAIL).as_deref(),
            Some("unable to deliver")
        );
        assert_eq!(
            headers.get_str(H_TRACEPARENT).as_deref(),
            Some("00-abc-def-01")
        );
    }

    #[test]
    fn a_dead_letter_records_when_it_was_made() {
        let before = chrono::Utc::now() - chrono::TimeDelta::milliseconds(1);
        let headers = letter(None, None).headers(Headers::default());
        let at = headers.get_str(H_DEAD_AT).expect("x-wa-dead-at is set");
        let at = chrono::DateTime::parse_from_rfc3339(&at).expect("RFC 3339");
        assert!(at >= before && at <= chrono::Utc::now(), "{at} is not now");
    }

    #[test]
    fn a_webhooks_dead_letter_has_no_attempts_header_and_a_policy_one_no_code() {
        let webhook = letter(None, Some(131026)).headers(Headers::default());
        assert_eq!(webhook.get_int(H_ATTEMPTS), None);
        let policy = letter(Some(0), None).headers(Headers::default());
        assert_eq!(policy.get_int(H_ERROR_CODE), None);
        assert!(matches!(
            policy.0.get(H_ATTEMPTS),
            Some(HeaderValue::Int(0))
        ));
    }

    #[test]
    fn the_detail_header_is_cut_but_the_event_keeps_it_whole() {
        let long = "é".repeat(1500);
        let dead = DeadLetter {
            detail: &long,
            ..letter(Some(1), None)
        };
        let header = dead.headers(Headers::default()).get_str(H_DETAIL).unwrap();
        assert_eq!(header.chars().count(), 1000);
        let event = dead.event(Event::new("message.failed"));
        assert_eq!(event.error.unwrap().details, long);
    }

    #[test]
    fn the_event_is_job_dead_lettered_titled_by_the_reason_and_keeps_its_job_fields() {
        let mut failed = Event::new("message.failed");
        failed.job_id = Some("j-1".into());
        failed.wamid = Some("wamid.X".into());
        let at = failed.at;
        let event = letter(None, Some(131026)).event(failed);
        assert_eq!(event.event, "job.dead_lettered");
        assert_eq!(event.reason, Some(DeadReason::RecipientUndeliverable));
        assert_eq!(event.attempts, None);
        assert_eq!(
            (event.job_id.as_deref(), event.wamid.as_deref(), event.at),
            (Some("j-1"), Some("wamid.X"), at)
        );
        let error = event.error.unwrap();
        assert_eq!(error.title, "recipient_undeliverable");
        assert_eq!(error.code, Some(131026));
        assert_eq!(error.source, ErrorSource::Api);
        assert_eq!(
            letter(Some(3), None).event(Event::new("x")).attempts,
            Some(3)
        );
    }

    #[test]
    fn a_recorded_trace_travels_as_traceparent() {
        let headers = Trace::Recorded(Some("00-abc-def-01")).headers();
        assert_eq!(
            headers.get_str(H_TRACEPARENT).as_deref(),
            Some("00-abc-def-01")
        );
        assert!(Trace::Recorded(None).headers().0.is_empty());
        // An event carries it in its body, where every event of a message keeps its own.
        let json = broker::event_json(
            &Event::new("message.sent"),
            Trace::Recorded(Some("00-abc-def-01")).traceparent(),
        );
        let event: Event = serde_json::from_slice(&json).unwrap();
        assert_eq!(event.traceparent.as_deref(), Some("00-abc-def-01"));
        assert_eq!(Trace::Recorded(None).traceparent(), None);
        // One the event already carries is kept; a quote in a recorded value stays a string.
        let own = Event {
            traceparent: Some("00-own-01".into()),
            ..Event::new("message.sent")
        };
        let json = broker::event_json(&own, Some("00-\"x\"-01".into()));
        let read: Event = serde_json::from_slice(&json).unwrap();
        assert_eq!(read.traceparent.as_deref(), Some("00-own-01"));
        let json = broker::event_json(&Event::new("x"), Some("00-\"x\"-01".into()));
        let read: Event = serde_json::from_slice(&json).unwrap();
        assert_eq!(read.traceparent.as_deref(), Some("00-\"x\"-01"));
    }

    /// Records what was done with a delivery: 1 acked, 2 requeued.
    struct Recorder(Arc<AtomicU8>);

    #[async_trait]
    impl Acker for Recorder {
        async fn ack(&self) -> Result<(), BrokerError> {
            self.0.store(1, Ordering::SeqCst);
            Ok(())
        }
        async fn requeue(&self) -> Result<(), BrokerError> {
            self.0.store(2, Ordering::SeqCst);
            Ok(())
        }
    }

    fn delivery() -> (Delivery<()>, Arc<AtomicU8>) {
        let done = Arc::new(AtomicU8::new(0));
        let envelope = Envelope {
            body: Bytes::new(),
            headers: Headers::default(),
        };
        let acker = Box::new(Recorder(Arc::clone(&done)));
        (Delivery::new((), envelope, false, acker), done)
    }

    #[tokio::test]
    async fn a_confirmed_settlement_is_acked_and_a_failed_one_requeued() {
        let (confirmed, done) = delivery();
        let settled = ack_or_requeue(confirmed, Ok::<_, BrokerError>(7)).await;
        assert_eq!(settled.unwrap(), 7);
        assert_eq!(done.load(Ordering::SeqCst), 1);

        let (failed, done) = delivery();
        let nack = BrokerError::Nacked("wa.dead".into());
        let settled = ack_or_requeue(failed, Err::<(), _>(nack)).await;
        assert!(matches!(
            settled,
            Err(Unsettled::Requeued(BrokerError::Nacked(_), Ok(())))
        ));
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }
}
