//! The queue edge: jobs per business number and lane, delay queues, events, dead letters and the
//! webhook intake behind the [`Broker`] trait, with RabbitMQ
//! ([`rabbit`]) for production and an in-process broker ([`memory`]) for the embedded demo.
//! Nothing of lapin leaks out of this module.

mod acks;
mod events;
pub mod memory;
pub mod rabbit;

pub use events::EventBatches;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::event::{DeadReason, Event};
use crate::ids::PhoneNumberId;
use crate::job::Lane;

/// Header: attempts made so far (sends tried).
pub const H_ATTEMPTS: &str = "x-wa-attempts";
/// Header: dead-letter reason.
pub const H_REASON: &str = "x-wa-reason";
/// Header: Meta's error code behind a dead letter.
pub const H_ERROR_CODE: &str = "x-wa-error-code";
/// Header: specific detail of a dead letter.
pub const H_DETAIL: &str = "x-wa-detail";
/// Header: earliest time (RFC 3339) a deferred job is due; it is deferred again if it comes early.
pub const H_DUE: &str = "x-wa-due";
/// Header: when (RFC 3339) an earlier attempt of an at-least-once job timed out after its
/// request left, so the message may exist: if the job then runs out of attempts, it is
/// dead-lettered `ambiguous_send`, not `max_attempts`.
pub const H_MAYBE_SENT: &str = "x-wa-maybe-sent";
/// Header: which delay queue a deferred job waits in (the delay exchange routes on it, so the
/// routing key stays the job's own and brings it back to its number's lane when it expires).
///
/// CORRECTNESS: no `x-` prefix. A headers exchange ignores binding arguments that start with
/// `x-`, so a binding on `x-wa-delay` matched every message: each deferral was copied into
/// every delay queue, and the copies came back and multiplied.
pub const H_DELAY: &str = "wa-delay";
/// The header the delay bindings used before (see [`H_DELAY`]); unbound at start-up.
pub const H_DELAY_LEGACY: &str = "x-wa-delay";
/// Header: set when the worker re-routed a job that came in under a legacy lane-only key.
pub const H_REROUTED: &str = "x-wa-rerouted";
/// Header: when the job was dead-lettered (RFC 3339): publishes set no AMQP timestamp, and an
/// operator listing dead letters needs to know how old each is.
pub const H_DEAD_AT: &str = "x-wa-dead-at";
/// Header: the lane a dead-lettered job came from, so a replay can send it back there (a dead
/// letter's routing key is its reason, not its lane).
pub const H_LANE: &str = "x-wa-lane";
/// Header: how many times an operator replayed the job from the dead letters.
pub const H_REPLAYED: &str = "x-wa-replayed";
/// Header: when the job was last replayed (RFC 3339).
pub const H_REPLAYED_AT: &str = "x-wa-replayed-at";
/// Header, set by RabbitMQ on quorum queues: how many times the message was returned to its
/// queue unsettled (0 on its first delivery). Past the queue's delivery limit the broker
/// dead-letters it.
pub const H_DELIVERY_COUNT: &str = "x-delivery-count";
/// Header, set by RabbitMQ on a message it dead-lettered itself: why (`delivery_limit`).
pub const H_FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// Header, set by RabbitMQ on a message it dead-lettered itself: the queue it left.
pub const H_FIRST_DEATH_QUEUE: &str = "x-first-death-queue";
/// Header: W3C trace context.
pub const H_TRACEPARENT: &str = "traceparent";
/// Header: W3C trace state.
pub const H_TRACESTATE: &str = "tracestate";

/// A header value: AMQP headers carry strings and integers here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// Message headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub BTreeMap<String, HeaderValue>);

impl Headers {
    /// Sets a string header.
    pub fn set_str(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.0
            .insert(key.to_owned(), HeaderValue::Str(value.into()));
        self
    }

    /// Sets an integer header.
    pub fn set_int(&mut self, key: &str, value: i64) -> &mut Self {
        self.0.insert(key.to_owned(), HeaderValue::Int(value));
        self
    }

    /// A string header (integers are rendered).
    pub fn get_str(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            HeaderValue::Str(s) => Some(s.clone()),
            HeaderValue::Int(i) => Some(i.to_string()),
        }
    }

    /// Takes a string header out (integers are rendered), without copying it.
    pub fn take_str(&mut self, key: &str) -> Option<String> {
        match self.0.remove(key)? {
            HeaderValue::Str(s) => Some(s),
            HeaderValue::Int(i) => Some(i.to_string()),
        }
    }

    /// An integer header (numeric strings are parsed).
    pub fn get_int(&self, key: &str) -> Option<i64> {
        match self.0.get(key)? {
            HeaderValue::Int(i) => Some(*i),
            HeaderValue::Str(s) => s.parse().ok(),
        }
    }

    /// How many times the broker returned this message to its queue unsettled (0 when it never
    /// did, or when the queue does not count: classic queues).
    pub fn returns(&self) -> u32 {
        self.get_int(H_DELIVERY_COUNT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }

    /// Attempts so far (0 for a fresh job).
    pub fn attempts(&self) -> u32 {
        self.get_int(H_ATTEMPTS)
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0)
    }
}

/// A message body with its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The body (a job, an event, a webhook).
    pub body: Bytes,
    /// The headers.
    pub headers: Headers,
}

/// Where a job goes: one business number's lane. Its routing key on `wa.send` is
/// `<lane>.<phone_number_id>` (e.g. `bulk.106540352242922`): each configured number has a queue
/// per lane bound with that key, and anything else (an unknown number, a legacy key naming only
/// the lane) reaches the unrouted queue through `wa.send`'s alternate exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The lane.
    pub lane: Lane,
    /// The sending number as the job names it (empty when the body names none).
    pub number: String,
}

impl Route {
    /// A number's lane.
    pub fn new(lane: Lane, number: impl Into<String>) -> Self {
        Route {
            lane,
            number: number.into(),
        }
    }

    /// The route of a job body: its `phone_number_id` as written, read without decoding the
    /// rest. A body that names none still has a route (the unrouted queue), where the worker
    /// dead-letters it with the decoder's specific reason: nothing is refused at publish time.
    pub fn of(lane: Lane, body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Probe {
            phone_number_id: Option<serde_json::Value>,
        }
        let number = serde_json::from_slice::<Probe>(body)
            .ok()
            .and_then(|p| p.phone_number_id)
            .and_then(|v| v.as_str().map(str::to_owned))
            .filter(|n| !n.is_empty() && !n.contains(['.', '#', '*']))
            .unwrap_or_default();
        Route { lane, number }
    }

    /// `<lane>.<phone_number_id>`, or `<lane>` when the job names no number.
    pub fn routing_key(&self) -> String {
        if self.number.is_empty() {
            self.lane.as_str().to_owned()
        } else {
            format!("{}.{}", self.lane.as_str(), self.number)
        }
    }

    /// Reads a routing key back (`otp`, `bulk.106540352242922`); `None` if it names no lane.
    pub fn parse(key: &str) -> Option<Route> {
        let (lane, number) = key.split_once('.').unwrap_or((key, ""));
        Some(Route::new(Lane::parse(lane)?, number))
    }
}

/// Where a publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A number's lane queue, through `wa.send`.
    Job(Route),
    /// A delay queue of this tier, back to the route's queue when it expires.
    Delay {
        /// The delay queue's TTL.
        tier: Duration,
        /// Where it returns to.
        route: Route,
    },
    /// `wa.events` with this routing key.
    Event(String),
    /// `wa.dead` with this reason as routing key.
    Dead(DeadReason),
    /// `wa.webhooks.intake`: a signature-verified webhook body, raw.
    Intake,
    /// `wa.webhooks.parked`: a webhook body that could not be parsed, kept for inspection.
    Parked,
}

/// A stream of something the broker hands out.
pub type Stream<T> = BoxStream<'static, Result<T, BrokerError>>;

/// A publish that went out and whose confirm has not come yet: it resolves `Ok` once the broker
/// has stored the message, and to the reason otherwise (nacked, unroutable, connection lost).
pub type Confirm = BoxFuture<'static, Result<(), BrokerError>>;

/// A read-only copy of what is published to `wa.events` or `wa.dead`, for tests, the demo
/// and operators tailing a feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// Every event.
    Events,
    /// Every dead letter.
    Dead,
}

/// A message seen through a [`Tap`].
#[derive(Debug, Clone)]
pub struct Tapped {
    /// Its routing key (event name or dead-letter reason).
    pub routing_key: String,
    /// Body and headers.
    pub envelope: Envelope,
}

/// One job handed to a worker. It must be settled with [`Delivery::ack`] (or requeued).
pub struct Delivery<Q = Lane> {
    /// Where it came from: a lane, or [`Intake`] for webhook bodies.
    pub lane: Q,
    /// Body and headers.
    pub envelope: Envelope,
    /// Whether the broker delivered it before (a worker died holding it).
    pub redelivered: bool,
    /// When it was published, to a delay queue for a deferred job (RabbitMQ keeps it to the
    /// second), if the broker knows.
    pub published_at: Option<DateTime<Utc>>,
    acker: Box<dyn Acker>,
}

/// The webhook intake queue, as a delivery's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intake;

/// The unrouted queue, as a delivery's origin: a job published under a key no number's queue
/// is bound to (an unknown number, or a legacy key naming only the lane).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrouted {
    /// The key it was published with.
    pub routing_key: String,
}

impl<Q: std::fmt::Debug> std::fmt::Debug for Delivery<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("lane", &self.lane)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

impl<Q> Delivery<Q> {
    /// A delivery from a broker implementation.
    pub fn new(lane: Q, envelope: Envelope, redelivered: bool, acker: Box<dyn Acker>) -> Self {
        Delivery {
            lane,
            envelope,
            redelivered,
            published_at: None,
            acker,
        }
    }

    /// The same delivery, published at `at`.
    pub fn published_at(mut self, at: Option<DateTime<Utc>>) -> Self {
        self.published_at = at;
        self
    }

    /// When it became ready in the queue it came from: its publication, or for a deferred job
    /// the time it was due (it waited in a delay queue until then), whichever is later.
    pub fn ready_since(&self) -> Option<DateTime<Utc>> {
        let due = self
            .envelope
            .headers
            .get_str(H_DUE)
            .and_then(|d| DateTime::parse_from_rfc3339(&d).ok())
            .map(|d| d.with_timezone(&Utc));
        self.published_at.max(due)
    }

    /// The same delivery, seen as coming from `origin`.
    pub fn with_origin<R>(self, origin: R) -> Delivery<R> {
        Delivery {
            lane: origin,
            envelope: self.envelope,
            redelivered: self.redelivered,
            published_at: self.published_at,
            acker: self.acker,
        }
    }

    /// Removes it from its queue for good.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    /// Gives it back to its queue unprocessed (shutdown only, never in a loop).
    pub async fn requeue(self) -> Result<(), BrokerError> {
        self.acker.requeue().await
    }
}

/// Acknowledges one delivery; implemented by each broker.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Ack.
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Reject with requeue.
    async fn requeue(&self) -> Result<(), BrokerError>;
}

/// Broker failures. All are reported with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached at start-up.
    #[error(
        "cannot reach RabbitMQ at {url}: {detail}. Is it running? Start it with: rabbitmq-server -detached"
    )]
    Unreachable {
        /// The address (without credentials).
        url: String,
        /// What each node answered.
        detail: String,
    },
    /// The broker answered but refused the user, its password or the virtual host.
    #[error(
        "RabbitMQ at {url} refused the connection: {detail}. Check the user, password and virtual host in amqp.url (or amqp.urls)"
    )]
    Refused {
        /// The address (without credentials).
        url: String,
        /// The broker's words.
        detail: String,
    },
    /// An operation failed after connecting.
    #[error("broker {operation} failed: {detail}")]
    Operation {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        detail: String,
    },
    /// No queue is bound for a publish (it was mandatory, so the broker returned it).
    #[error("broker returned the publish to {0}: no queue is bound for it")]
    Unroutable(String),
    /// The broker refused a publish (nack): it was not stored.
    #[error("broker did not confirm the publish to {0}")]
    Nacked(String),
}

impl BrokerError {
    pub(crate) fn op(operation: &'static str, e: impl std::fmt::Display) -> Self {
        BrokerError::Operation {
            operation,
            detail: e.to_string(),
        }
    }
}

/// The queue system as the worker sees it.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Publishes and waits for the broker's confirm: when this returns `Ok` the message is stored.
    async fn publish(&self, target: Target, envelope: Envelope) -> Result<(), BrokerError>;
    /// Publishes a producer's job to its number's lane without waiting for the confirm, which
    /// the returned [`Confirm`] brings: a producer keeps many in flight. `job_id`, when known,
    /// becomes the message id. By default (a broker without pipelined confirms) it publishes
    /// and waits, and the confirm is already there.
    async fn send_job(
        &self,
        route: Route,
        job_id: Option<&str>,
        envelope: Envelope,
    ) -> Result<Confirm, BrokerError> {
        let _ = job_id;
        self.publish(Target::Job(route), envelope).await?;
        Ok(Box::pin(futures::future::ready(Ok(()))))
    }
    /// Starts consuming `number`'s queue of each of `lanes`, each with at most `prefetch`
    /// unacked deliveries: the number's jobs come only as fast as they are settled, and no other
    /// number's backlog stands in front of them.
    async fn consume(
        &self,
        number: &PhoneNumberId,
        lanes: &[Lane],
        prefetch: u16,
    ) -> Result<Vec<(Lane, Stream<Delivery>)>, BrokerError>;
    /// Starts consuming the unrouted queue (jobs for unknown numbers, legacy lane-only keys).
    async fn consume_unrouted(
        &self,
        prefetch: u16,
    ) -> Result<Stream<Delivery<Unrouted>>, BrokerError>;
    /// Starts consuming `wa.webhooks.intake` (competing consumers: each body goes to one).
    async fn consume_intake(&self, prefetch: u16) -> Result<Stream<Delivery<Intake>>, BrokerError>;
    /// Subscribes to a copy of events or dead letters from now on.
    async fn tap(&self, tap: Tap) -> Result<Stream<Tapped>, BrokerError>;
    /// Jobs waiting in a lane, all configured numbers together (ready, not unacked), for the
    /// demo and queue-depth scaling.
    async fn depth(&self, lane: Lane) -> Result<u32, BrokerError>;
    /// Events kept unread, and the most that are kept before the oldest are dropped (`None`:
    /// this broker keeps no events for later readers).
    async fn events_unread(&self) -> Result<Option<(u32, u64)>, BrokerError> {
        Ok(None)
    }
    /// Stops consuming: no new deliveries; unacked ones can still be settled.
    async fn stop_consuming(&self) -> Result<(), BrokerError>;
}

/// `event` serialised as a message holds it, with `traceparent` (its job's trace context)
/// unless it carries one of its own.
pub fn event_json(event: &Event, traceparent: Option<String>) -> Vec<u8> {
    let mut json = serde_json::to_vec(event).expect("events always serialise");
    if let Some(trace) = traceparent.filter(|_| event.traceparent.is_none()) {
        // An object ends with its closing brace: the field goes just before it.
        json.pop();
        json.extend_from_slice(b",\"traceparent\":");
        serde_json::to_writer(&mut json, &trace).expect("a string always serialises");
        json.push(b'}');
    }
    json
}

/// The events of a [`Tap::Events`] stream one by one, in order (a message holds several).
pub fn tapped_events(tapped: Stream<Tapped>) -> Stream<Event> {
    use futures::StreamExt;
    tapped
        .flat_map(|tapped| {
            let events = tapped.and_then(|t| {
                crate::event::read_message(&t.envelope.body)
                    .map_err(|e| BrokerError::op("event read", format!("{}: {e}", t.routing_key)))
            });
            let events: Vec<Result<Event, BrokerError>> = match events {
                Ok(events) => events.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(events)
        })
        .boxed()
}

/// Publishes one event alone in its message (a process's events go through [`EventBatches`]).
pub async fn publish_event(broker: &dyn Broker, event: &Event) -> Result<(), BrokerError> {
    let body = crate::event::write_message([event_json(event, None).as_slice()]);
    let envelope = Envelope {
        body: body.into(),
        headers: Headers::default(),
    };
    broker
        .publish(Target::Event(event.event.clone()), envelope)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_routes_by_its_lane_and_number_and_a_key_reads_back() {
        let job = br#"{"job_id": "k", "phone_number_id": "106540352242922", "to": "+1"}"#;
        assert_eq!(
            Route::of(Lane::Otp, job).routing_key(),
            "otp.106540352242922"
        );
        // Not a job, or no usable number: the lane alone, which reaches the unrouted queue.
        assert_eq!(Route::of(Lane::Bulk, b"not json").routing_key(), "bulk");
        let odd = br#"{"phone_number_id": "1.2"}"#;
        assert_eq!(Route::of(Lane::Bulk, odd).routing_key(), "bulk");
        assert_eq!(
            Route::parse("transactional.106540352242922"),
            Some(Route::new(Lane::Transactional, "106540352242922"))
        );
        assert_eq!(Route::parse("bulk"), Some(Route::new(Lane::Bulk, "")));
        assert_eq!(Route::parse("nonsense"), None);
    }
}
