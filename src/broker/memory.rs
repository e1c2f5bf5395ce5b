//! An in-process broker with RabbitMQ's semantics where the worker depends on them: prefetch,
//! at-least-once (an unsettled delivery goes back to its queue), delay tiers, topic taps and a
//! dead-letter queue. For the embedded demo and for tests that must not need a server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Acker, Broker, BrokerError, Delivery, Envelope, Intake, Stream, Tap, Tapped, Target};
use crate::job::Lane;

#[derive(Default)]
struct LaneQueue {
    ready: Mutex<VecDeque<(Envelope, bool)>>,
    notify: Notify,
}

impl LaneQueue {
    fn push_back(&self, envelope: Envelope, redelivered: bool) {
        self.ready
            .lock()
            .expect("lane lock")
            .push_back((envelope, redelivered));
        self.notify.notify_one();
    }
    fn push_front(&self, envelope: Envelope) {
        self.ready
            .lock()
            .expect("lane lock")
            .push_front((envelope, true));
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
    lanes: HashMap<Lane, Arc<LaneQueue>>,
    taps: Mutex<Vec<(Tap, mpsc::UnboundedSender<Tapped>)>>,
    dead: Mutex<Vec<Tapped>>,
    intake: Arc<LaneQueue>,
    parked: Mutex<Vec<Envelope>>,
    stop: CancellationToken,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        let lanes = Lane::ALL
            .into_iter()
            .map(|l| (l, Arc::new(LaneQueue::default())))
            .collect();
        MemoryBroker {
            inner: Arc::new(Inner {
                lanes,
                ..Default::default()
            }),
        }
    }

    fn lane(&self, lane: Lane) -> Arc<LaneQueue> {
        Arc::clone(&self.inner.lanes[&lane])
    }

    /// Everything dead-lettered so far (the `wa.dead.all` queue).
    pub fn dead_letters(&self) -> Vec<Tapped> {
        self.inner.dead.lock().expect("dead lock").clone()
    }

    /// Consumes `queue` with `prefetch`; deliveries carry `origin`.
    fn consume_queue<Q: Copy + Send + 'static>(
        &self,
        queue: Arc<LaneQueue>,
        origin: Q,
        prefetch: u16,
    ) -> Stream<Delivery<Q>> {
        let permits = Arc::new(Semaphore::new(usize::from(prefetch.max(1))));
        let stop = self.inner.stop.clone();
        let stopped = Arc::new(AtomicBool::new(false));
        let stream = futures::stream::unfold(
            (queue, permits, stop, stopped),
            move |(queue, permits, stop, stopped)| async move {
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
                let (envelope, redelivered) = next;
                let acker = MemoryAcker {
                    queue: Arc::clone(&queue),
                    envelope: Mutex::new(Some(envelope.clone())),
                    _permit: permit,
                };
                let delivery = Delivery::new(origin, envelope, redelivered, Box::new(acker));
                Some((Ok(delivery), (queue, permits, stop, stopped)))
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
    envelope: Mutex<Option<Envelope>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // Like a closed AMQP channel: an unsettled delivery returns to its queue.
        if let Some(envelope) = self.envelope.lock().expect("acker lock").take() {
            self.queue.push_front(envelope);
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.envelope.lock().expect("acker lock").take();
        Ok(())
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        if let Some(envelope) = self.envelope.lock().expect("acker lock").take() {
            self.queue.push_front(envelope);
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, target: Target, envelope: Envelope) -> Result<(), BrokerError> {
        match target {
            Target::Lane(lane) => self.lane(lane).push_back(envelope, false),
            Target::Delay { tier, lane } => {
                let queue = self.lane(lane);
                tokio::spawn(async move {
                    tokio::time::sleep(tier).await;
                    queue.push_back(envelope, false);
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
            Target::Intake => self.inner.intake.push_back(envelope, false),
            Target::Parked => self
                .inner
                .parked
                .lock()
                .expect("parked lock")
                .push(envelope),
        }
        Ok(())
    }

    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Stream<Delivery>, BrokerError> {
        Ok(self.consume_queue(self.lane(lane), lane, prefetch))
    }

    async fn consume_intake(&self, prefetch: u16) -> Result<Stream<Delivery<Intake>>, BrokerError> {
        Ok(self.consume_queue(Arc::clone(&self.inner.intake), Intake, prefetch))
    }

    async fn tap(&self, tap: Tap) -> Result<Stream<Tapped>, BrokerError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.inner.taps.lock().expect("taps lock").push((tap, tx));
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|m| m.map(Ok))).boxed())
    }

    async fn depth(&self, lane: Lane) -> Result<u32, BrokerError> {
        Ok(
            u32::try_from(self.lane(lane).ready.lock().expect("lane lock").len())
                .unwrap_or(u32::MAX),
        )
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        self.inner.stop.cancel();
        Ok(())
    }
}
