//! The consumer loop: serves the lanes by weighted priority, bounds in-flight work, and drains
//! on shutdown. It only adds concurrency and cancellation around [`Pipeline::process_one`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::broker::{Broker, BrokerError, Delivery, Stream};
use crate::job::Lane;
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

/// Runs until `shutdown` is cancelled or a lane's consumer fails; then drains.
pub async fn run(
    pipeline: Arc<Pipeline>,
    broker: Arc<dyn Broker>,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) -> Result<Drained, BrokerError> {
    // Join the replica group and load the template registry before taking any job.
    let upkeep_stop = CancellationToken::new();
    let upkeep = pipeline.start(upkeep_stop.clone()).await;
    let lanes: Vec<Lane> = Lane::ALL
        .into_iter()
        .filter(|l| settings.lane_weights.get(l).copied().unwrap_or(0) > 0)
        .collect();
    let mut streams: BTreeMap<Lane, Stream<Delivery>> = BTreeMap::new();
    for lane in &lanes {
        match broker.consume(*lane, settings.prefetch).await {
            Ok(stream) => {
                streams.insert(*lane, stream);
            }
            Err(e) => {
                upkeep_stop.cancel();
                pipeline.leave().await;
                return Err(e);
            }
        }
    }
    let order = pick_order(
        &settings
            .lane_weights
            .iter()
            .filter(|(_, w)| **w > 0)
            .map(|(l, w)| (*l, *w))
            .collect(),
    );
    let permits = Arc::new(Semaphore::new(settings.concurrency));
    let tracker = TaskTracker::new();
    info!(
        concurrency = settings.concurrency,
        prefetch = settings.prefetch,
        ?lanes,
        "worker started"
    );

    let mut turn = 0usize;
    let failure = loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break None,
            p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
        };
        // Prefer this turn's lane, then the others by priority; take only what is ready now.
        let preferred = order[turn % order.len()];
        turn += 1;
        let mut ready = None;
        for lane in
            std::iter::once(preferred).chain(lanes.iter().copied().filter(|l| *l != preferred))
        {
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
                    _ = shutdown.cancelled() => break None,
                    ((lane, item), _, _) = next => (lane, item),
                }
            }
        };
        let delivery = match item {
            Some(Ok(d)) => d,
            Some(Err(e)) => break Some(e),
            None => {
                break Some(BrokerError::op(
                    "consume",
                    format!("the {} consumer was cancelled by the broker", lane.as_str()),
                ));
            }
        };
        let pipeline = Arc::clone(&pipeline);
        tracker.spawn(async move {
            if let Err(e) = pipeline.process_one(delivery).await {
                error!(error = %e, "job could not be settled; it was returned to its queue");
            }
            drop(permit);
        });
    };

    // Drain: no new deliveries; in-flight jobs finish and settle within the grace period.
    if let Err(e) = broker.stop_consuming().await {
        warn!(error = %e, "could not cancel the consumers");
    }
    drop(streams);
    tracker.close();
    let in_flight = tracker.len();
    info!(
        in_flight,
        grace_s = settings.shutdown_grace.as_secs(),
        "draining"
    );
    let drained = tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_ok();
    let abandoned = if drained { 0 } else { tracker.len() };
    if drained {
        info!("drained: every in-flight job was settled");
    } else {
        warn!(
            abandoned,
            "grace period over; unsettled jobs return to their queues when the connection closes"
        );
    }
    upkeep_stop.cancel();
    let _ = upkeep.await;
    pipeline.leave().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(Drained { abandoned }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
