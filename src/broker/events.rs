//! Events published together: the events of one kind settled while the previous message was on
//! its way go out as one message on `wa.events`, its body a JSON array of them.
//!
//! Nothing waits on a timer, as with the acks: whoever publishes first while no message is
//! being published sends it, and the events that come meanwhile form the next messages, so a
//! lone event goes out at once and a busy worker sends as many events per message as its
//! settling rate makes. RabbitMQ's cost is mostly per message (the events benchmark: about
//! 35 µs per message into the kept quorum queue), so that is what batching saves.
//!
//! CORRECTNESS: [`EventBatches::publish`] returns `Ok` only once the broker confirmed the
//! message that holds the event: a job is still acked only after its event is stored, and a
//! failed message fails every event in it (their jobs go back to their queues). Events of one
//! kind keep their order: a message is published only once the one before it was confirmed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Broker, BrokerError, Envelope, Headers, Target};
use crate::event;

/// The most events one message holds.
pub(crate) const MAX_EVENTS: usize = 256;
/// A message is closed once its events reach this many bytes (an event with large metadata
/// can make it bigger, never empty).
pub(crate) const MAX_BYTES: usize = 256 * 1024;

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct State {
    /// Events not yet published, by kind (the routing key), each with whoever waits for it.
    pending: BTreeMap<String, Vec<(Vec<u8>, Waiter)>>,
    /// Someone is publishing.
    sending: bool,
}

/// The events one process publishes.
pub struct EventBatches {
    broker: Arc<dyn Broker>,
    state: Mutex<State>,
}

impl EventBatches {
    /// Events published through `broker`.
    pub fn new(broker: Arc<dyn Broker>) -> Arc<Self> {
        Arc::new(EventBatches {
            broker,
            state: Mutex::default(),
        })
    }

    /// Publishes one event of kind `key`, already serialised as a JSON object; returns when the
    /// message holding it was confirmed. The messages are published by a task of their own, so
    /// a settling job that is cancelled midway never strands the events of the others.
    pub async fn publish(self: &Arc<Self>, key: &str, event: Vec<u8>) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut state = self.lock();
            match state.pending.get_mut(key) {
                Some(events) => events.push((event, tx)),
                None => {
                    state.pending.insert(key.to_owned(), vec![(event, tx)]);
                }
            }
            !std::mem::replace(&mut state.sending, true)
        };
        if lead {
            let batches = Arc::clone(self);
            tokio::spawn(async move { batches.send_messages().await });
        }
        match rx.await {
            Ok(result) => result.map_err(|detail| BrokerError::op("event publish", detail)),
            Err(_) => Err(BrokerError::op(
                "event publish",
                "the event's message was abandoned",
            )),
        }
    }

    /// Publishes messages until no event is left: every kind's pending events at once, each
    /// kind's split into messages of at most [`MAX_EVENTS`] events and about [`MAX_BYTES`].
    async fn send_messages(&self) {
        loop {
            let pending = {
                let mut state = self.lock();
                if state.pending.is_empty() {
                    state.sending = false;
                    return;
                }
                std::mem::take(&mut state.pending)
            };
            let kinds = pending
                .into_iter()
                .map(|(key, events)| self.send_kind(key, events));
            futures::future::join_all(kinds).await;
        }
    }

    /// One kind's events, message after message, in order.
    async fn send_kind(&self, key: String, mut events: Vec<(Vec<u8>, Waiter)>) {
        while !events.is_empty() {
            let rest = events.split_off(message_len(&events));
            let body = event::write_message(events.iter().map(|(e, _)| e.as_slice()));
            let envelope = Envelope {
                body: body.into(),
                headers: Headers::default(),
            };
            let published = self
                .broker
                .publish(Target::Event(key.clone()), envelope)
                .await
                .map_err(|e| e.to_string());
            for (_, waiter) in events {
                let _ = waiter.send(published.clone());
            }
            events = rest;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many of `events` (at least one) go into the next message.
fn message_len(events: &[(Vec<u8>, Waiter)]) -> usize {
    let mut bytes = 0;
    let fits = events.iter().take(MAX_EVENTS).position(|(e, _)| {
        bytes += e.len() + 1;
        bytes > MAX_BYTES
    });
    fits.unwrap_or(events.len().min(MAX_EVENTS)).max(1)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::broker::{Delivery, Intake, Stream, Tap, Tapped, Unrouted};
    use crate::event::Event;
    use crate::ids::PhoneNumberId;
    use crate::job::Lane;

    /// A broker that confirms each message after a pause, refuses any message holding an event
    /// of a job named `fail-…`, and records what it was given.
    #[derive(Default)]
    struct Recording {
        messages: Mutex<Vec<(String, Vec<Event>)>>,
        /// Messages being published, by kind: never more than one.
        in_flight: Mutex<BTreeMap<String, usize>>,
        most_in_flight: AtomicUsize,
        /// When set, each publish waits for a permit first.
        gate: Option<Semaphore>,
    }

    #[async_trait]
    impl Broker for Recording {
        async fn publish(&self, target: Target, envelope: Envelope) -> Result<(), BrokerError> {
            let Target::Event(key) = target else {
                unreachable!("only events are published here")
            };
            let events = event::read_message(&envelope.body).expect("a message is an array");
            let now = {
                let mut in_flight = self.in_flight.lock().unwrap();
                let n = in_flight.entry(key.clone()).or_default();
                *n += 1;
                *n
            };
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            match &self.gate {
                Some(gate) => gate.acquire().await.unwrap().forget(),
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
            *self.in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
            let refused = events
                .iter()
                .any(|e| e.job_id.as_deref().is_some_and(|j| j.starts_with("fail")));
            self.messages.lock().unwrap().push((key.clone(), events));
            if refused {
                return Err(BrokerError::Nacked(key));
            }
            Ok(())
        }
        async fn consume(
            &self,
            _: &PhoneNumberId,
            _: &[Lane],
            _: u16,
        ) -> Result<Vec<(Lane, Stream<Delivery>)>, BrokerError> {
            unreachable!()
        }
        async fn consume_unrouted(
            &self,
            _: u16,
        ) -> Result<Stream<Delivery<Unrouted>>, BrokerError> {
            unreachable!()
        }
        async fn consume_intake(&self, _: u16) -> Result<Stream<Delivery<Intake>>, BrokerError> {
            unreachable!()
        }
        async fn tap(&self, _: Tap) -> Result<Stream<Tapped>, BrokerError> {
            unreachable!()
        }
        async fn depth(&self, _: Lane) -> Result<u32, BrokerError> {
            unreachable!()
        }
        async fn stop_consuming(&self) -> Result<(), BrokerError> {
            unreachable!()
        }
    }

    fn event(kind: &str, job_id: &str) -> Vec<u8> {
        let event = Event {
            job_id: Some(job_id.into()),
            ..Event::new(kind)
        };
        serde_json::to_vec(&event).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_event_is_confirmed_with_the_one_message_that_holds_it() {
        let broker = Arc::new(Recording::default());
        let batches = EventBatches::new(broker.clone());
        let kinds = ["message.accepted", "job.deferred", "job.dead_lettered"];
        let mut rng = StdRng::seed_from_u64(25);
        let mut tasks = Vec::new();
        for i in 0..3_000 {
            let kind = kinds[rng.random_range(0..kinds.len())];
            let job = if rng.random_range(0..50) == 0 {
                format!("fail-{i}")
            } else {
                format!("j-{i}")
            };
            let pause = Duration::from_micros(rng.random_range(0..3_000));
            let batches = Arc::clone(&batches);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                let result = batches.publish(kind, event(kind, &job)).await;
                (kind, job, result.is_ok())
            }));
        }
        let mut answers = BTreeMap::new();
        for task in tasks {
            let (kind, job, ok) = task.await.unwrap();
            answers.insert(job, (kind, ok));
        }

        let messages = broker.messages.lock().unwrap();
        let mut seen = BTreeSet::new();
        for (key, events) in messages.iter() {
            assert!(!events.is_empty() && events.len() <= MAX_EVENTS);
            let refused = events
                .iter()
                .any(|e| e.job_id.as_ref().unwrap().starts_with("fail"));
            for e in events {
                let job = e.job_id.clone().unwrap();
                let (kind, ok) = answers[&job];
                // One kind per message, its routing key; the answer is its message's confirm.
                assert_eq!((e.event.as_str(), key.as_str()), (kind, kind));
                assert_eq!(
                    ok, !refused,
                    "{job}: answered {ok}, its message refused: {refused}"
                );
                assert!(seen.insert(job.clone()), "{job} published twice");
            }
        }
        assert_eq!(seen.len(), answers.len(), "every event was published");
        // A kind's next message waits for the one before it: events of a kind keep their order.
        assert_eq!(broker.most_in_flight.load(Ordering::SeqCst), 1);
        // Events that came while a message was on its way shared the next one.
        assert!(
            messages.len() < answers.len() / 2,
            "{} messages",
            messages.len()
        );
    }

    #[tokio::test]
    async fn a_publisher_that_gives_up_strands_nobody_else() {
        let broker = Arc::new(Recording {
            gate: Some(Semaphore::new(0)),
            ..Recording::default()
        });
        let batches = EventBatches::new(broker.clone());
        let first = {
            let batches = Arc::clone(&batches);
            tokio::spawn(async move { batches.publish("k", event("k", "a")).await })
        };
        while broker.in_flight.lock().unwrap().get("k") != Some(&1) {
            tokio::task::yield_now().await;
        }
        // The job that published it is cancelled while its message is on the way.
        first.abort();
        let second = {
            let batches = Arc::clone(&batches);
            tokio::spawn(async move { batches.publish("k", event("k", "b")).await })
        };
        broker.gate.as_ref().unwrap().add_permits(2);
        second.await.unwrap().expect("the next event is published");
        let messages = broker.messages.lock().unwrap();
        let jobs: Vec<_> = messages
            .iter()
            .flat_map(|(_, events)| events.iter().map(|e| e.job_id.clone().unwrap()))
            .collect();
        assert_eq!(jobs, ["a", "b"]);
    }

    #[test]
    fn a_message_closes_at_its_count_or_its_size_and_never_empty() {
        let waiter = || oneshot::channel().0;
        let small: Vec<_> = (0..600).map(|_| (vec![b'x'; 100], waiter())).collect();
        assert_eq!(message_len(&small), MAX_EVENTS);
        assert_eq!(message_len(&small[..10]), 10);
        let large: Vec<_> = (0..10).map(|_| (vec![b'x'; 100_000], waiter())).collect();
        assert_eq!(message_len(&large), 2);
        let huge = vec![(vec![b'x'; MAX_BYTES * 2], waiter())];
        assert_eq!(message_len(&huge), 1);
    }
}
