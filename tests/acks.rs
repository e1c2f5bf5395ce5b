//! Batched acks against the real broker, in the condition that once lost jobs: one channel
//! consuming three lanes, each with a prefetch, and a worker that takes fewer deliveries at once
//! than the broker sends, preferring one lane, settling them out of order and returning some.
//! RabbitMQ closes a channel whose ack names a tag it no longer holds (406), and a `multiple`
//! ack that reaches past a delivery still buffered in the client removes it unprocessed: either
//! shows here as an ack error, a job never seen, or a queue not empty at the end.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wa_sender::broker::{Broker, Delivery};
use wa_sender::ids::PhoneNumberId;
use wa_sender::job::Lane;

const PER_LANE: usize = 300;
const PREFETCH: u16 = 32;
const CONCURRENCY: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_a_channel_with_three_lanes_never_reach_an_unsettled_delivery() {
    let app = common::spawn_app("acks", |_, _| {}).await;
    for lane in Lane::ALL {
        for i in 0..PER_LANE {
            let job = common::text_job(&format!("{}-{i}", lane.as_str()));
            app.enqueue_json(lane, &job).await;
        }
    }
    let number = PhoneNumberId::parse(common::NUMBER).unwrap();
    let mut streams: Vec<_> = app
        .broker
        .consume(&number, &Lane::ALL, PREFETCH)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, s)| s)
        .collect();

    let mut rng = StdRng::seed_from_u64(7);
    let mut in_flight: Vec<(Delivery, u32)> = Vec::new();
    let mut acked: BTreeMap<String, u32> = BTreeMap::new();
    let mut requeued = 0;
    let mut errors = Vec::new();
    let total = PER_LANE * Lane::ALL.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked.len() < total && tokio::time::Instant::now() < deadline {
        // Take deliveries up to the concurrency, lane 0 four times out of five, so the other
        // lanes' deliveries wait in the client's buffers while later tags are settled.
        while in_flight.len() < CONCURRENCY {
            let lane = if rng.random_bool(0.8) {
                0
            } else {
                rng.random_range(0..3)
            };
            let next = streams[lane].next().now_or_never();
            let Some(Some(delivery)) = next else { break };
            in_flight.push((delivery.expect("a delivery"), rng.random_range(0..3)));
        }
        if in_flight.is_empty() {
            // Nothing buffered in the preferred lanes: wait for whichever lane delivers.
            let any = futures::future::select_all(streams.iter_mut().map(|s| s.next()));
            match tokio::time::timeout(Duration::from_secs(2), any).await {
                Ok((Some(delivery), _, _)) => in_flight.push((delivery.expect("a delivery"), 0)),
                Ok((None, _, _)) => panic!("a consumer ended (its channel closed)"),
                Err(_) => continue,
            }
        }
        // Settle one in flight, not the oldest: some wait a few rounds.
        let pick = rng.random_range(0..in_flight.len());
        if in_flight[pick].1 > 0 {
            in_flight[pick].1 -= 1;
            continue;
        }
        let (delivery, _) = in_flight.swap_remove(pick);
        let id = wa_sender::job::salvage_job_id(&delivery.envelope.body).unwrap();
        let settled = if !delivery.redelivered && rng.random_bool(0.05) {
            requeued += 1;
            delivery.requeue().await
        } else {
            let acking = delivery.ack();
            let result = acking.await;
            if result.is_ok() {
                *acked.entry(id).or_default() += 1;
            }
            result
        };
        if let Err(e) = settled {
            // The channel is gone (RabbitMQ closes it on an unknown tag): nothing more to see.
            errors.push(e.to_string());
            break;
        }
    }
    assert!(
        errors.is_empty(),
        "{} settlements failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert_eq!(acked.len(), total, "every job acked (requeued {requeued})");
    assert!(acked.values().all(|n| *n == 1), "each job acked once");
    drop(streams);
    let (_conn, channel) = common::amqp_channel(&app.settings.amqp.url).await;
    for lane in Lane::ALL {
        let queue = format!("{}.send.{}.{}", app.prefix, common::NUMBER, lane.as_str());
        let left = common::ready_messages(&channel, &queue).await;
        assert_eq!(left, 0, "{queue} holds jobs after all were acked");
    }
    app.cleanup().await;
}
