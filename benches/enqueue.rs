//! What publishing jobs costs, against the local RabbitMQ.
//!
//! `cargo bench --bench enqueue [-- --jobs 200000 --rounds 3 --queue quorum]`: the same JSONL
//! file of text jobs, one business number, published round after round by
//! - `raw`: a bare lapin publisher with batched confirms (4,096 in flight), the ceiling;
//! - `producer`: the library's [`Producer`] (a `publish` span, trace context and message id per
//!   job, the same window);
//! - `enqueue`: the `wa-sender enqueue` binary on the file (read, every row validated, rejects,
//!   checkpoint, progress), timed from its start to its exit.
//!
//! Each round empties the queue after checking every job arrived. Prints each rate, the medians
//! and their ratio to `raw`. The prefix (`bench-enqueue-…`) is deleted at the end.

mod common;

use std::time::Instant;

use common::option;
use lapin::options::QueuePurgeOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use wa_sender::broker::Broker;
use wa_sender::broker::rabbit::QueueType;
use wa_sender::config::Settings;
use wa_sender::job::Lane;
use wa_sender::producer::{Producer, WINDOW};

const NUMBER: &str = "106540352242922";

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    wa_sender::telemetry::init_logs("warn", "text");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let jobs: usize = option("--jobs").unwrap_or(200_000);
    let rounds: usize = option("--rounds").unwrap_or(3);
    let queue_type = match option::<String>("--queue").as_deref() {
        Some("classic") => QueueType::Classic,
        _ => QueueType::Quorum,
    };
    let mut settings = Settings::load(std::path::Path::new("config"), "local").expect("config");
    let prefix = format!(
        "bench-enqueue-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    settings.amqp.prefix = prefix.clone();
    settings.amqp.queue_type = queue_type;
    let runtime = settings.runtime().expect("valid settings");
    let broker = wa_sender::app::connect_broker(&runtime)
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");

    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jobs.jsonl");
    let bodies: Vec<Vec<u8>> = (0..jobs)
        .map(|i| {
            serde_json::to_vec(
                &json!({"schema": "wa.send.v1", "job_id": format!("bench-{i}"),
                "phone_number_id": NUMBER, "to": format!("+4915{i:09}"), "campaign_id": "bench",
                "message": {"type": "text", "text": {"body": "Your parcel is on its way"}}}),
            )
            .unwrap()
        })
        .collect();
    let mut text = bodies.join(&b'\n');
    text.push(b'\n');
    std::fs::write(&file, text).unwrap();
    println!(
        "{jobs} jobs ({} bytes each), {queue_type:?} queue, window {WINDOW}, {rounds} rounds",
        bodies[0].len()
    );

    let queue = format!("{prefix}.send.{NUMBER}.bulk");
    let (mut raw, mut producer, mut command, mut publishing) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (r, ()) = timed(jobs, publish_raw(&settings, &bodies)).await;
        empty(&settings, &queue, jobs).await;
        let (p, ()) = timed(jobs, publish_producer(broker.as_ref(), &bodies)).await;
        empty(&settings, &queue, jobs).await;
        let (c, own) = timed(jobs, enqueue_command(&settings, &file)).await;
        empty(&settings, &queue, jobs).await;
        println!(
            "round {round}: raw {r:>7.0}/s  producer {p:>7.0}/s  \
             wa-sender enqueue {c:>7.0}/s start to exit, {own:>7.0}/s publishing"
        );
        raw.push(r);
        producer.push(p);
        command.push(c);
        publishing.push(own);
    }
    let (r, p) = (median(&mut raw), median(&mut producer));
    let (c, own) = (median(&mut command), median(&mut publishing));
    println!(
        "median: raw {r:.0}/s; producer {p:.0}/s ({:.2}× raw); wa-sender enqueue {c:.0}/s start \
         to exit ({:.2}× raw), {own:.0}/s publishing ({:.2}× raw)",
        p / r,
        c / r,
        own / r
    );
    broker.delete_topology().await.expect("clean up");
    broker.close().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Jobs per second of `publish`, and what it returned.
async fn timed<T>(jobs: usize, publish: impl Future<Output = T>) -> (f64, T) {
    let started = Instant::now();
    let out = publish.await;
    (jobs as f64 / started.elapsed().as_secs_f64(), out)
}

/// A bare batched-confirm publisher: what the broker and lapin allow.
async fn publish_raw(settings: &Settings, bodies: &[Vec<u8>]) {
    let exchange = format!("{}.send", settings.amqp.prefix);
    let key = format!("bulk.{NUMBER}");
    let items = bodies.iter().map(|b| (key.clone(), b));
    common::publish_raw(&settings.amqp.url, &exchange, items, WINDOW).await;
}

/// The library's producer over the same bodies.
async fn publish_producer(broker: &dyn Broker, bodies: &[Vec<u8>]) {
    let mut producer = Producer::new(broker, WINDOW);
    for (i, body) in bodies.iter().enumerate() {
        let job_id = format!("bench-{i}");
        producer
            .publish(Lane::Bulk, Some(&job_id), body.clone().into(), i as u64)
            .await
            .expect("publish");
    }
    producer.flush().await.expect("confirms");
}

/// `wa-sender enqueue <file>`, from the start of the process to its exit; returns the rate it
/// reports itself (first publish to last confirm, without start-up and connection).
async fn enqueue_command(settings: &Settings, file: &std::path::Path) -> f64 {
    let queue_type = serde_json::to_value(settings.amqp.queue_type).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wa-sender"))
        .args(["enqueue", "--restart", "--lane", "bulk"])
        .arg(file)
        .env("WA_SENDER_CONFIG_DIR", "config")
        .env("WA_SENDER_ENV", "local")
        .env("WA_SENDER__AMQP__PREFIX", &settings.amqp.prefix)
        .env("WA_SENDER__AMQP__QUEUE_TYPE", queue_type.as_str().unwrap())
        .env("WA_SENDER__TELEMETRY__LOG_FILTER", "warn")
        .output()
        .await
        .expect("wa-sender runs");
    assert!(
        output.status.success(),
        "wa-sender enqueue failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    summary
        .rsplit_once('(')
        .and_then(|(_, rate)| rate.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("a rate in the summary: {summary}"))
}

/// Checks that `queue` holds `jobs` messages, then empties it.
async fn empty(settings: &Settings, queue: &str, jobs: usize) {
    let connection = Connection::connect(&settings.amqp.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    // Every publish was confirmed, so every job is in the queue already.
    let purged = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert_eq!(purged as usize, jobs, "every job reached {queue}");
    let _ = connection.close(200, "done".into()).await;
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
