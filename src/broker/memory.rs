//! An in-process broker with RabbitMQ's semantics where the worker depends on them: a queue per
//! number and lane with an unrouted queue for the rest, prefetch, at-least-once (an unsettled
//! delivery goes back to its queue), delay tiers, topic taps and a dead-letter queue. For the
//! embedded demo and for tests that must not need a server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::{
    Acker, Broker, BrokerError, Delivery, Envelope, Intake, Route, Stream, Tap, Tapped, Target,
    Unrouted,
};
use crate::ids::PhoneNumberId;
use crate::job::Lane;

/// A message in a queue with the routing key it was published with.
#[derive(Clone)]
struct Item {
    envelope: Envelope,
    routing_key: String,
    redelivered: bool,
    /// When it became ready here.
    ready_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Default)]
struct LaneQueue {
    ready: Mutex<VecDeque<Item>>,
    notify: Notify,
}

impl LaneQueue {
    fn push_back(&self, envelope: Envelope, routing_key: String) {
        self.ready.lock().expect("lane lock").push_back(Item {
            envelope,
            routing_key,
            redelivered: false,
            ready_at: chrono::Utc::now(),
        });
        self.notify.notify_one();
    }
    fn push_front(&self, mut item: Item) {
        item.redelivered = true;
        self.ready.lock().expect("lane lock").push_front(item);
        self.notify.notify_one();
    }
}

/// The in-process broker. Cheap to clone; clones share the queues.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Each declared number's lanes, by routing key `<lane>.<phone_number_id>`.
    lanes: HashMap<String, Arc<LaneQueue>>,
    unrouted: Arc<LaneQueue>,
    taps: Mutex<Vec<(Tap, mpsc::UnboundedSender<Tapped>)>>,
    dead: Mutex<Vec<Tapped>>,
    intake: Arc<LaneQueue>,
    parked: Mutex<Vec<Envelope>>,
    stop: CancellationToken,
}

impl MemoryBroker {
    /// An empty broker with a queue per lane of each of `numbers` (what the worker declares
    /// on RabbitMQ for its configured numbers).
    pub fn new<'a>(numbers: impl IntoIterator<Item = &'a PhoneNumberId>) -> Self {
        let lanes = numbers
            .into_iter()
            .flat_map(|n| Lane::ALL.map(|lane| Route::new(lane, n.as_str()).routing_key()))
            .map(|key| (key, Arc::new(LaneQueue::default())))
            .collect();
        MemoryBroker {
            inner: Arc::new(Inner {
                lanes,
                ..Default::default()
            }),
        }
    }

    /// The queue a routing key reaches: a number's lane, else the unrouted queue.
    fn queue_for(&self, key: &str) -> Arc<LaneQueue> {
        Arc::clone(self.inner.lanes.get(key).unwrap_or(&self.inner.unrouted))
    }

    /// Everything dead-lettered so far (the `wa.dead.all` queue).
    pub fn dead_letters(&self) -> Vec<Tapped> {
        self.inner.dead.lock().expect("dead lock").clone()
    }

    /// Consumes `queue` with `prefetch`; a delivery's origin is made from its routing key.
    fn consume_queue<Q: Send + 'static>(
        &self,
        queue: Arc<LaneQueue>,
        origin: impl Fn(&str) -> Q + Send + Sync + 'static,
        prefetch: u16,
    ) -> Stream<Delivery<Q>> {
        let origin = Arc::new(origin);
        let permits = Arc::new(Semaphore::new(usize::from(prefetch.max(1))));
        let stop = self.inner.stop.clone();
        let stopped = Arc::new(AtomicBool::new(false));
        let stream = futures::stream::unfold(
            (queue, permits, stop, stopped),
            move |(queue, permits, stop, stopped)| {
                let origin = Arc::clone(&origin);
                async move {
                    if stopped.load(Ordering::Relaxed) {
                        return None;
                    }
                    let permit = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return None,
                        p = Arc::clone(&permits).acquire_owned() => p.ok()?,
                    };
                    let next = loop {
                        let notified = queue.notify.notified();
                        if let Some(next) = queue.ready.lock().expect("lane lock").pop_front() {
                            break next;
                        }
                        tokio::select! {
                            biased;
                            _ = stop.cancelled() => {
                                stopped.store(true, Ordering::Relaxed);
                                return None;
                            }
                            _ = notified => {}
                        }
                    };
                    let acker = MemoryAcker {
                        queue: Arc::clone(&queue),
                        item: Mutex::new(Some(next.clone())),
                        _permit: permit,
                    };
                    let delivery = Delivery::new(
                        origin(&next.routing_key),
                        next.envelope,
                        next.redelivered,
                        Box::new(acker),
                    )
                    .published_at(Some(next.ready_at));
                    Some((Ok(delivery), (queue, permits, stop, stopped)))
                }
            },
        );
        stream.boxed()
    }

    fn fan_out(&self, tap: Tap, tapped: Tapped) {
        let mut taps = self.inner.taps.lock().expect("taps lock");
        taps.retain(|(kind, tx)| *kind != tap || tx.send(tapped.clone()).is_ok());
    }
}

struct MemoryAcker {
    queue: Arc<LaneQueue>,
    item: Mutex<Option<Item>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // Like a closed AMQP channel: an unsettled delivery returns to its queue.
        if let Some(item) = self.item.lock().expect("acker lock").take() {
            self.queue.push_front(item);
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.item.lock().expect("acker lock").take();
        Ok(())
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        if let Some(item) = self.item.lock().expect("acker lock").take() {
            self.queue.push_front(item);
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, target: Target, envelope: Envelope) -> Result<(), BrokerError> {
        match target {
            Target::Job(route) => {
                let key = route.routing_key();
                self.queue_for(&key).push_back(envelope, key);
            }
            Target::Delay { tier, route } => {
                let key = route.routing_key();
                let queue = self.queue_for(&key);
                tokio::spawn(async move {
                    tokio::time::sleep(tier).await;
                    queue.push_back(envelope, key);
                });
            }
            Target::Event(key) => self.fan_out(
                Tap::Events,
                Tapped {
                    routing_key: key,
                    envelope,
                },
            ),
            Target::Dead(reason) => {
                let tapped = Tapped {
                    routing_key: reason.as_str().to_owned(),
                    envelope,
                };
                self.inner
                    .dead
                    .lock()
                    .expect("dead lock")
                    .push(tapped.clone());
                self.fan_out(Tap::Dead, tapped);
            }
            Target::Intake => self.inner.intake.push_back(envelope, String::new()),
            Target::Parked => self
                .inner
                .parked
                .lock()
                .expect("parked lock")
                .push(envelope),
        }
        Ok(())
    }

    async fn consume(
        &self,
        number: &PhoneNumberId,
        lanes: &[Lane],
        prefetch: u16,
    ) -> Result<Vec<(Lane, Stream<Delivery>)>, BrokerError> {
        let mut streams = Vec::with_capacity(lanes.len());
        for &lane in lanes {
            let key = Route::new(lane, number.as_str()).routing_key();
            let Some(queue) = self.inner.lanes.get(&key) else {
                return Err(BrokerError::op(
                    "basic.consume",
                    format!("no queue for {key}: the number is not declared"),
                ));
            };
            streams.push((
                lane,
                self.consume_queue(Arc::clone(queue), move |_| lane, prefetch),
            ));
        }
        Ok(streams)
    }

    async fn consume_unrouted(
        &self,
        prefetch: u16,
    ) -> Result<Stream<Delivery<Unrouted>>, BrokerError> {
        let origin = |key: &str| Unrouted {
            routing_key: key.to_owned(),
        };
        Ok(self.consume_queue(Arc::clone(&self.inner.unrouted), origin, prefetch))
    }

    async fn consume_intake(&self, prefetch: u16) -> Result<Stream<Delivery<Intake>>, BrokerError> {
        Ok(self.consume_queue(Arc::clone(&self.inner.intake), |_| Intake, prefetch))
    }

    async fn tap(&self, tap: Tap) -> Result<Stream<Tapped>, BrokerError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.inner.taps.lock().expect("taps lock").push((tap, tx));
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|m| m.map(Ok))).boxed())
    }

    async fn depth(&self, lane: Lane) -> Result<u32, BrokerError> {
        let waiting: usize = self
            .inner
            .lanes
            .iter()
            .filter(|(key, _)| Route::parse(key).is_some_and(|r| r.lane == lane))
            .map(|(_, q)| q.ready.lock().expect("lane lock").len())
            .sum();
        Ok(u32::try_from(waiting).unwrap_or(u32::MAX))
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        self.inner.stop.cancel();
        Ok(())
    }
}
