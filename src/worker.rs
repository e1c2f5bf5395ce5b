//! The consumer loops: one per business number over its lane queues (by weighted priority),
//! one over the unrouted queue; they bound in-flight work, consume again after a lost broker and
//! drain on shutdown. They only add concurrency and cancellation around
//! [`Pipeline::process_one`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::broker::{Broker, BrokerError, Delivery, Stream, Unrouted};
use crate::health::Health;
use crate::job::Lane;
use crate::metrics;
use crate::pipeline::Pipeline;

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs in flight at once.
    pub concurrency: usize,
    /// Unacked deliveries per lane.
    pub prefetch: u16,
    /// Pick weights per lane.
    pub lane_weights: BTreeMap<Lane, u32>,
    /// Time to finish in-flight jobs after shutdown is requested.
    pub shutdown_grace: Duration,
}

/// How a worker stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained {
    /// Jobs still in flight when the grace period ended (their deliveries return to the queue).
    pub abandoned: usize,
    /// Jobs whose settlement failed while draining (a lost broker): their deliveries return to
    /// their queues and are decided again, never lost and never sent twice.
    pub unsettled: usize,
}

/// The pauses between attempts to consume again after the broker was lost: from half a second,
/// doubling, up to 30 s, with jitter so replicas do not come back in step.
pub(crate) fn reconnect_pauses() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// A smooth weighted round robin over lanes: with weights 6/3/1 the order interleaves otp,
/// transactional and bulk so that none waits long for its share.
fn pick_order(weights: &BTreeMap<Lane, u32>) -> Vec<Lane> {
    let total: i64 = weights.values().map(|w| i64::from(*w)).sum();
    let mut current: BTreeMap<Lane, i64> = weights.keys().map(|l| (*l, 0)).collect();
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (lane, w) in weights {
            *current.get_mut(lane).expect("lane present") += i64::from(*w);
        }
        let (&best, _) = current
            .iter()
            .max_by_key(|(lane, c)| (**c, std::cmp::Reverse(**lane)))
            .expect("at least one lane");
        *current.get_mut(&best).expect("lane present") -= total;
        order.push(best);
    }
    order
}

/// One lane stream of one business number.
type Lanes = BTreeMap<Lane, Stream<Delivery>>;

/// Runs until `shutdown` is cancelled; then drains.
///
/// Each configured business number is served by its own loop over its own lane queues, so one
/// number's backlog never stands in front of another number's jobs; within a number the lanes
/// are picked by weight (otp first, bulk slowed but never starved). A number's loop keeps at
/// most `concurrency` of its jobs in flight, each waiting for its send slot: the broker hands
/// out the next one only when one is settled, so a backlog waits in RabbitMQ, not in delay
/// queues. Jobs under keys no number's queue is bound to are re-routed or dead-lettered by one
/// more loop over the unrouted queue.
///
/// A lost broker (a restart, a network cut) does not stop the worker: it consumes again once
/// the broker is back (the broker reconnects and declares the topology again), pausing longer
/// after each failed attempt. The jobs in flight when it was lost cannot be acked; RabbitMQ
/// returns them to their queues, and their claims keep them from being sent twice.
///
/// `health` is told when consuming starts and when the broker is lost, and when the drain
/// begins: the worker is ready only while it consumes.
pub async fn run(
    pipeline: Arc<Pipeline>,
    broker: Arc<dyn Broker>,
    settings: WorkerSettings,
    health: Health,
    shutdown: CancellationToken,
) -> Result<Drained, BrokerError> {
    // Join the replica group and load the template registry before taking any job.
    let upkeep_stop = CancellationToken::new();
    let upkeep = pipeline.start(upkeep_stop.clone()).await;
    let waits = Arc::new(Waits::default());
    let sampling = tokio::spawn(sample(
        Arc::clone(&pipeline),
        Arc::clone(&broker),
        Arc::clone(&waits),
        upkeep_stop.clone(),
    ));
    let weights: BTreeMap<Lane, u32> = settings
        .lane_weights
        .iter()
        .filter(|(_, w)| **w > 0)
        .map(|(l, w)| (*l, *w))
        .collect();
    let serving = Serving {
        pipeline: Arc::clone(&pipeline),
        lanes: weights.keys().copied().collect(),
        order: Arc::new(pick_order(&weights)),
        settings: settings.clone(),
        tracker: TaskTracker::new(),
        unsettled: Arc::new(AtomicUsize::new(0)),
        health: health.clone(),
        waits,
    };

    let mut pauses = reconnect_pauses();
    let held = loop {
        let session = serving.serve(broker.as_ref(), &shutdown).await;
        let Some(e) = session.failure else {
            break session.held;
        };
        health.set_consuming(false);
        if shutdown.is_cancelled() {
            break session.held;
        }
        if session.consumed {
            pauses = reconnect_pauses();
        }
        let pause = pauses.next().unwrap_or(Duration::from_secs(30));
        warn!(
            error = %e,
            retry_in_ms = pause.as_millis() as u64,
            in_flight = serving.tracker.len(),
            "lost RabbitMQ; consuming again once it is back (jobs in flight that cannot be acked return to their queues)"
        );
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Vec::new(),
            _ = tokio::time::sleep(pause) => {}
        }
    };

    // Drain: no new deliveries; in-flight jobs finish and settle within the grace period. The
    // streams (and so their channels) stay open until then, or their acks would fail.
    health.start_draining();
    if let Err(e) = broker.stop_consuming().await {
        warn!(error = %e, "could not cancel the consumers");
    }
    let tracker = &serving.tracker;
    tracker.close();
    let in_flight = tracker.len();
    let failed_before = serving.unsettled.load(Ordering::Relaxed);
    info!(
        in_flight,
        grace_s = settings.shutdown_grace.as_secs(),
        "draining"
    );
    let drained = tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_ok();
    let abandoned = if drained { 0 } else { tracker.len() };
    let unsettled = serving.unsettled.load(Ordering::Relaxed) - failed_before;
    match (drained, unsettled) {
        (true, 0) => info!("drained: every in-flight job was settled"),
        (true, _) => warn!(
            unsettled,
            "drained, but some jobs could not be settled (broker lost); they return to their queues"
        ),
        (false, _) => warn!(
            abandoned,
            unsettled,
            "grace period over; unsettled jobs return to their queues when the connection closes"
        ),
    }
    drop(held);
    upkeep_stop.cancel();
    let _ = upkeep.await;
    let _ = sampling.await;
    pipeline.leave().await;
    Ok(Drained {
        abandoned,
        unsettled,
    })
}

/// How often the gauges nothing else updates (queue depth, halts in force) are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The longest a job taken from each lane had waited there, since the last sample.
#[derive(Debug, Default)]
struct Waits([AtomicU64; Lane::ALL.len()]);

impl Waits {
    /// Notes how long `delivery` was ready in its queue before it was taken.
    fn note(&self, delivery: &Delivery) {
        if let Some(since) = delivery.ready_since() {
            let waited = (Utc::now() - since).num_milliseconds().max(0) as u64;
            self.0[delivery.lane.index()].fetch_max(waited, Ordering::Relaxed);
        }
    }

    /// The longest wait noted for `lane` since the last take, in milliseconds (0: none taken).
    fn take(&self, lane: Lane) -> u64 {
        self.0[lane.index()].swap(0, Ordering::Relaxed)
    }
}

/// Samples each lane's queue depth, how long its oldest job has waited, the events kept unread
/// and the halts in force until `stop`. Depth is asked of the broker (one passive declare per
/// queue), cheap at this pace; a failed ask keeps the last value, since a lost broker is already
/// in the logs and in `/readyz`.
///
/// The oldest job's wait is the longest wait of the jobs this replica took from the lane since
/// the last sample: a queue is taken from its head, so that is its oldest job. When none was
/// taken and the lane is not empty, its head has waited one more period.
async fn sample(
    pipeline: Arc<Pipeline>,
    broker: Arc<dyn Broker>,
    waits: Arc<Waits>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    let mut oldest = [Duration::ZERO; Lane::ALL.len()];
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        metrics::halts_in_force(pipeline.halts_in_force());
        let depths = async {
            if let Ok(Some((unread, limit))) = broker.events_unread().await {
                metrics::events_unread(unread, limit);
            }
            for lane in Lane::ALL {
                let Ok(depth) = broker.depth(lane).await else {
                    continue;
                };
                metrics::queue_depth(lane, depth);
                let waited = Duration::from_millis(waits.take(lane));
                let head = &mut oldest[lane.index()];
                *head = head_wait(*head, waited, depth);
                metrics::oldest_wait(lane, *head);
            }
        };
        // A broker being reconnected may hold the ask up: the drain does not wait for it.
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            () = depths => {}
        }
    }
}

/// How long a lane's oldest job has waited, from the last sample's answer (`previous`), the
/// longest wait of the jobs taken since (`waited`, zero if none) and the lane's depth.
fn head_wait(previous: Duration, waited: Duration, depth: u32) -> Duration {
    match (waited.is_zero(), depth) {
        (false, _) => waited,
        (true, 0) => Duration::ZERO,
        (true, _) => previous + SAMPLE_EVERY,
    }
}

/// What every serving session shares: the pipeline, the lane order, and the jobs in flight
/// (which outlive the session that took them).
struct Serving {
    pipeline: Arc<Pipeline>,
    lanes: Vec<Lane>,
    order: Arc<Vec<Lane>>,
    settings: WorkerSettings,
    tracker: TaskTracker,
    /// Jobs whose settlement failed, since the start.
    unsettled: Arc<AtomicUsize>,
    /// Told when consuming starts; `run` tells it when a session fails.
    health: Health,
    /// How long the jobs taken had waited.
    waits: Arc<Waits>,
}

/// How one serving session ended.
struct Session {
    /// Whether its consumers were started (the broker was reachable).
    consumed: bool,
    /// Why it ended other than by shutdown.
    failure: Option<BrokerError>,
    /// Its streams, kept open until the drain ends.
    held: Vec<Held>,
}

impl Serving {
    /// Consumes every number's lanes and the unrouted queue until `shutdown` or the first
    /// consumer that fails.
    async fn serve(&self, broker: &dyn Broker, shutdown: &CancellationToken) -> Session {
        let consumed =
            consume_all(&self.pipeline, broker, &self.lanes, self.settings.prefetch).await;
        let (numbers, unrouted) = match consumed {
            Ok(c) => c,
            Err(e) => {
                return Session {
                    consumed: false,
                    failure: Some(e),
                    held: Vec::new(),
                };
            }
        };
        self.health.set_consuming(true);
        info!(
            numbers = numbers.len(),
            concurrency_per_number = self.settings.concurrency,
            prefetch = self.settings.prefetch,
            lanes = ?self.lanes,
            "worker consuming"
        );

        // `stop` ends every loop: shutdown, or the first consumer that fails.
        let stop = shutdown.child_token();
        let mut loops = tokio::task::JoinSet::new();
        for streams in numbers {
            let (pipeline, order, stop, tracker, unsettled) = (
                Arc::clone(&self.pipeline),
                Arc::clone(&self.order),
                stop.clone(),
                self.tracker.clone(),
                Arc::clone(&self.unsettled),
            );
            let waits = Arc::clone(&self.waits);
            let permits = Arc::new(Semaphore::new(self.settings.concurrency));
            loops.spawn(async move {
                let mut streams = streams;
                let mut turn = 0usize;
                let failure = loop {
                    let permit = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break None,
                        p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
                    };
                    let delivery = match next_delivery(&mut streams, &order, &mut turn, &stop).await
                    {
                        None => break None,
                        Some(Err(e)) => break Some(e),
                        Some(Ok(d)) => d,
                    };
                    waits.note(&delivery);
                    let (pipeline, unsettled) = (Arc::clone(&pipeline), Arc::clone(&unsettled));
                    tracker.spawn(async move {
                        let _in_flight = metrics::InFlight::start();
                        if let Err(e) = pipeline.process_one(delivery).await {
                            unsettled.fetch_add(1, Ordering::Relaxed);
                            error!(error = %e, "job could not be settled; it was returned to its queue");
                        }
                        drop(permit);
                    });
                };
                (Box::new(streams) as Held, failure)
            });
        }
        {
            let (pipeline, stop, tracker, unsettled) = (
                Arc::clone(&self.pipeline),
                stop.clone(),
                self.tracker.clone(),
                Arc::clone(&self.unsettled),
            );
            let permits = Arc::new(Semaphore::new(self.settings.concurrency));
            loops.spawn(async move {
                let mut unrouted = unrouted;
                let failure = loop {
                    let permit = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break None,
                        p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
                    };
                    let delivery = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break None,
                        d = unrouted.next() => d,
                    };
                    let delivery = match delivery {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => break Some(e),
                        None => break Some(cancelled("unrouted")),
                    };
                    let (pipeline, unsettled) = (Arc::clone(&pipeline), Arc::clone(&unsettled));
                    tracker.spawn(async move {
                        let _in_flight = metrics::InFlight::start();
                        if let Err(e) = pipeline.process_unrouted(delivery).await {
                            unsettled.fetch_add(1, Ordering::Relaxed);
                            error!(error = %e, "unrouted job could not be settled; it was returned to its queue");
                        }
                        drop(permit);
                    });
                };
                (Box::new(unrouted) as Held, failure)
            });
        }

        // Wait for the loops: they end together when `stop` is cancelled.
        let mut held = Vec::new();
        let mut failure = None;
        while let Some(joined) = loops.join_next().await {
            let (streams, failed) = joined.expect("a serving loop never panics");
            if let Some(e) = failed {
                failure.get_or_insert(e);
                stop.cancel();
            }
            held.push(streams);
        }
        Session {
            consumed: true,
            failure,
            held,
        }
    }
}

/// The streams a serving loop held, kept open until the drain ends.
type Held = Box<dyn std::any::Any + Send>;

/// Starts consuming every configured number's lanes and the unrouted queue.
async fn consume_all(
    pipeline: &Pipeline,
    broker: &dyn Broker,
    lanes: &[Lane],
    prefetch: u16,
) -> Result<(Vec<Lanes>, Stream<Delivery<Unrouted>>), BrokerError> {
    let mut numbers = Vec::new();
    for number in pipeline.numbers() {
        let streams = broker.consume(number, lanes, prefetch).await?;
        numbers.push(streams.into_iter().collect());
    }
    let unrouted = broker.consume_unrouted(prefetch).await?;
    Ok((numbers, unrouted))
}

fn cancelled(what: &str) -> BrokerError {
    BrokerError::op(
        "consume",
        format!("the {what} consumer was cancelled by the broker"),
    )
}

/// The next delivery of one number: this turn's lane if it has one ready, else the others by
/// priority, else whichever lane delivers first. `None` when `stop` is cancelled.
async fn next_delivery(
    streams: &mut Lanes,
    order: &[Lane],
    turn: &mut usize,
    stop: &CancellationToken,
) -> Option<Result<Delivery, BrokerError>> {
    let preferred = order[*turn % order.len()];
    *turn += 1;
    let mut ready = None;
    // The other lanes in the streams' own order (a lane not consumed has no stream).
    let others = Lane::ALL.into_iter().filter(|l| *l != preferred);
    for lane in std::iter::once(preferred).chain(others) {
        if let Some(item) = streams.get_mut(&lane).and_then(|s| s.next().now_or_never()) {
            ready = Some((lane, item));
            break;
        }
    }
    let (lane, item) = match ready {
        Some(r) => r,
        None => {
            // Nothing ready: wait for the first lane that has something, highest priority first.
            let next = futures::future::select_all(streams.iter_mut().map(|(lane, s)| {
                let lane = *lane;
                s.next().map(move |item| (lane, item)).boxed()
            }));
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                ((lane, item), _, _) = next => (lane, item),
            }
        }
    };
    Some(match item {
        Some(item) => item,
        None => Err(cancelled(lane.as_str())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lanes_oldest_wait_is_the_longest_taken_or_grows_while_nothing_is_taken() {
        let s = Duration::from_secs;
        // Jobs were taken: the longest of their waits, whatever came before.
        assert_eq!(head_wait(s(40), s(3), 100), s(3));
        // None taken from a lane that holds jobs: its head waited one more period.
        assert_eq!(head_wait(s(40), Duration::ZERO, 100), s(40) + SAMPLE_EVERY);
        // None taken, none there: nothing waits.
        assert_eq!(head_wait(s(40), Duration::ZERO, 0), Duration::ZERO);
        // Every lane has its own slot.
        assert!(Lane::ALL.iter().enumerate().all(|(i, l)| l.index() == i));
    }

    #[test]
    fn weighted_order_interleaves_and_serves_every_lane() {
        let weights = BTreeMap::from([(Lane::Otp, 6), (Lane::Transactional, 3), (Lane::Bulk, 1)]);
        let order = pick_order(&weights);
        assert_eq!(order.len(), 10);
        assert_eq!(order.iter().filter(|l| **l == Lane::Otp).count(), 6);
        assert_eq!(
            order.iter().filter(|l| **l == Lane::Transactional).count(),
            3
        );
        assert_eq!(order.iter().filter(|l| **l == Lane::Bulk).count(), 1);
        assert_eq!(order[0], Lane::Otp);
        assert!(
            !order.windows(4).any(|w| w.iter().all(|l| *l == Lane::Otp)),
            "otp never takes 4 turns in a row: {order:?}"
        );
    }
}
