//! Scheduling per business number: fairness between numbers, and what per-number queues cost
//! the broker.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use wa_sender::broker::rabbit::RabbitBroker;
use wa_sender::broker::{Broker, Tap, tapped_events};
use wa_sender::ids::{PhoneNumberId, WaId, WabaId};
use wa_sender::job::Lane;
use wa_sender::simulator::{Scenario, SimNumber, Simulator};
use wa_sender::store::Store;

use crate::common::option;
use crate::{TOKEN, WABA, number, settings, text_job};

const A: &str = "106540352242922";
const B: &str = "106540352242923";

/// A run's simulator and connections: `numbers` at `mps` each, under a fresh prefix.
struct Rig {
    runtime: wa_sender::config::Runtime,
    simulator: Simulator,
    broker: std::sync::Arc<RabbitBroker>,
    store: std::sync::Arc<wa_sender::store::redis::RedisStore>,
}

impl Rig {
    async fn start(tag: &str, numbers: &[&str], mps: u32) -> Rig {
        let mut settings = settings(tag);
        let mut scenario = Scenario::single(numbers[0], WABA, TOKEN);
        scenario.numbers.clear();
        for id in numbers {
            settings.numbers.insert((*id).into(), number(mps));
            let mut sim = SimNumber::new(id, WABA);
            sim.throughput_mps = Some(mps);
            scenario.numbers.push(sim);
        }
        let simulator = Simulator::start(scenario, "127.0.0.1:0")
            .await
            .expect("simulator");
        settings.cloud.base_url = simulator.base_url();
        let runtime = settings.runtime().expect("valid settings");
        let (broker, store) = wa_sender::app::connect(&runtime)
            .await
            .expect("RabbitMQ and Redis");
        Rig {
            runtime,
            simulator,
            broker,
            store,
        }
    }

    /// Stops the simulator and deletes the run's queues and keys.
    async fn finish(self) {
        self.simulator.stop();
        self.broker.delete_topology().await.unwrap();
        self.store.delete_all().await.unwrap();
        self.broker.close().await;
    }
}

pub async fn fairness() {
    let backlog: usize = option("--backlog").unwrap_or(6000);
    let others: usize = option("--others").unwrap_or(80);
    let mps: u32 = option("--mps").unwrap_or(80);
    let rig = Rig::start("fair", &[A, B], mps).await;
    let (runtime, broker, store) = (&rig.runtime, &rig.broker, &rig.store);
    let waba = WabaId::parse(WABA).unwrap();
    let mut jobs = Vec::new();
    for i in 0..backlog {
        jobs.push((A, text_job(&format!("a-{i}"), A, i), i));
    }
    for i in 0..others {
        jobs.push((B, text_job(&format!("b-{i}"), B, backlog + i), backlog + i));
    }
    let enqueue_started = Instant::now();
    for (number, job, _) in &jobs {
        let to = WaId::parse(job["to"].as_str().unwrap()).unwrap();
        let pnid = PhoneNumberId::parse(*number).unwrap();
        store
            .record_inbound(&waba, &pnid, &to, chrono::Utc::now())
            .await
            .unwrap();
        wa_sender::app::enqueue(
            broker.as_ref(),
            Lane::Bulk,
            serde_json::to_vec(job).unwrap(),
        )
        .await
        .unwrap();
    }
    eprintln!(
        "queued {backlog} jobs for A then {others} for B in {:.1} s",
        enqueue_started.elapsed().as_secs_f64()
    );

    let mut events = tapped_events(broker.tap(Tap::Events).await.unwrap());
    let worker =
        wa_sender::app::WorkerApp::with_parts(runtime, broker.clone(), store.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(worker.run_until_stopped(shutdown.clone()));
    let (mut b_done, mut a_done, mut deferred) = (0, 0, 0);
    let mut b_last = Duration::ZERO;
    while b_done < others {
        let event = tokio::time::timeout(Duration::from_secs(600), events.next())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        match (event.event.as_str(), event.phone_number_id.as_deref()) {
            ("message.accepted", Some(B)) => {
                b_done += 1;
                b_last = started.elapsed();
            }
            ("message.accepted", Some(A)) => a_done += 1,
            ("job.deferred", _) => deferred += 1,
            _ => {}
        }
    }
    println!(
        "fairness: {backlog} jobs for A ({mps} msg/s) queued before {others} for B: all of B's accepted {:.2} s after the worker started, while {a_done} of A's went; {deferred} deferrals",
        b_last.as_secs_f64()
    );
    shutdown.cancel();
    let _ = worker.await;
    rig.finish().await;
}

/// Refused and sendable jobs of one number, interleaved in its queue: how soon the sendable ones
/// are all accepted (at `--mps`, 2,000 take 25 s if refusals cost no send slot, 50 s if each
/// refusal waits for one), and how soon the refused ones are all dead-lettered.
pub async fn refusals() {
    let refused: usize = option("--refused").unwrap_or(2000);
    let sendable: usize = option("--sendable").unwrap_or(2000);
    let mps: u32 = option("--mps").unwrap_or(80);
    let rig = Rig::start("refusals", &[A], mps).await;
    let (runtime, broker, store) = (&rig.runtime, &rig.broker, &rig.store);
    let waba = WabaId::parse(WABA).unwrap();
    let pnid = PhoneNumberId::parse(A).unwrap();
    // Every other job a free-form text to a user whose care window is closed: dead-lettered
    // outside_care_window by admission, before any call to Meta.
    let total = refused + sendable;
    let (mut refused_left, mut sendable_left) = (refused, sendable);
    for i in 0..total {
        let job = text_job(&format!("r-{i}"), A, i);
        let refuse = refused_left > 0 && (sendable_left == 0 || i % 2 == 1);
        if refuse {
            refused_left -= 1;
        } else {
            sendable_left -= 1;
            let to = WaId::parse(job["to"].as_str().unwrap()).unwrap();
            store
                .record_inbound(&waba, &pnid, &to, chrono::Utc::now())
                .await
                .unwrap();
        }
        wa_sender::app::enqueue(
            broker.as_ref(),
            Lane::Bulk,
            serde_json::to_vec(&job).unwrap(),
        )
        .await
        .unwrap();
    }
    let mut events = tapped_events(broker.tap(Tap::Events).await.unwrap());
    let worker =
        wa_sender::app::WorkerApp::with_parts(runtime, broker.clone(), store.clone()).unwrap();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(worker.run_until_stopped(shutdown.clone()));
    let (mut accepted, mut dead) = (0, 0);
    let (mut accepted_at, mut dead_at) = (Duration::ZERO, Duration::ZERO);
    while accepted + dead < total {
        let event = tokio::time::timeout(Duration::from_secs(600), events.next())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        match event.event.as_str() {
            "message.accepted" => {
                accepted += 1;
                accepted_at = started.elapsed();
            }
            "job.dead_lettered" => {
                dead += 1;
                dead_at = started.elapsed();
            }
            _ => {}
        }
    }
    println!(
        "refusals: {dead} refused and {accepted} sendable jobs of one number at {mps} msg/s, interleaved: the sendable ones all accepted {:.1} s after the worker started ({:.1} s at the number's pace), the refused ones all dead-lettered after {:.1} s",
        accepted_at.as_secs_f64(),
        accepted as f64 / f64::from(mps),
        dead_at.as_secs_f64()
    );
    shutdown.cancel();
    let _ = worker.await;
    rig.finish().await;
}

pub async fn topology() {
    let numbers: usize = option("--numbers").unwrap_or(500);
    let replicas: usize = option("--replicas").unwrap_or(5);
    let mut settings = settings("topo");
    for i in 0..numbers {
        settings
            .numbers
            .insert(format!("1065403522{i:05}"), number(80));
    }
    let rabbit = settings.runtime().expect("valid settings").rabbit();
    let before = crate::common::broker_memory();
    let mut brokers = Vec::new();
    let mut streams = Vec::new();
    for r in 0..replicas {
        let started = Instant::now();
        let broker = RabbitBroker::connect(rabbit.clone())
            .await
            .expect("RabbitMQ");
        let declared = started.elapsed();
        let started = Instant::now();
        for number in &rabbit.numbers {
            streams.push(broker.consume(number, &Lane::ALL, 64).await.unwrap());
        }
        println!(
            "replica {}: declared {} queues in {:.2} s, {} consumers in {:.2} s",
            r + 1,
            numbers * 3,
            declared.as_secs_f64(),
            numbers * 3,
            started.elapsed().as_secs_f64()
        );
        brokers.push(broker);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = crate::common::broker_memory();
    let mib = |b: Option<u64>| b.map_or("?".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0));
    println!(
        "topology: {numbers} numbers x 3 lanes = {} queues ({:?}), {replicas} replicas x {} = {} consumers on {} channels; broker RSS {} before, {} after",
        numbers * 3,
        settings.amqp.queue_type,
        numbers * 3,
        replicas * numbers * 3,
        replicas * numbers,
        mib(before),
        mib(after)
    );
    drop(streams);
    brokers[0].delete_topology().await.unwrap();
    for b in &brokers {
        b.close().await;
    }
}
