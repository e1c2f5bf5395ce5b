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
//! Each round runs the three in turn, starting with a different one each round, and empties the
//! queue after checking every job arrived. Prints each rate with the CPU time the publisher
//! (the `wa-sender` process included) and RabbitMQ spent per job, the medians and their ratio
//! to `raw`. The prefix (`bench-enqueue-…`) is deleted at the end.

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
    let mut figures: [Vec<Figure>; 3] = Default::default();
    for round in 1..=rounds {
        // Each round starts with another publisher, so none always follows the same one.
        let mut line = format!("round {round}:");
        for k in 0..3 {
            let which = (round - 1 + k) % 3;
            let figure = match which {
                0 => measure(jobs, publish_raw(&settings, &bodies)).await,
                1 => measure(jobs, publish_producer(broker.as_ref(), &bodies)).await,
                _ => measure(jobs, enqueue_command(&settings, &file)).await,
            };
            empty(&settings, &queue, jobs).await;
            line += &format!("  {} {figure}", NAMES[which]);
            figures[which].push(figure);
        }
        println!("{line}");
    }
    let [raw, producer, command] = figures.map(|f| Figure::median(&f));
    println!("median of {rounds} rounds (jobs/s; CPU µs per job of the publisher, of RabbitMQ):");
    for (name, figure) in NAMES.iter().zip([raw, producer, command]) {
        println!("  {name:<18} {figure}  {:.2}× raw", figure.rate / raw.rate);
    }
    if let Err(e) = broker.delete_topology().await {
        // The figures stand; RabbitMQ 3.10's quorum log writer has been seen to crash on a
        // queue deleted right after a purge.
        eprintln!("warning: {prefix} left behind: {e}");
    }
    broker.close().await;
    std::fs::remove_dir_all(dir).unwrap();
}

const NAMES: [&str; 3] = ["raw", "producer", "wa-sender enqueue"];

/// One publisher's round: its rate, and the CPU it and RabbitMQ spent per job.
#[derive(Debug, Clone, Copy, Default)]
struct Figure {
    rate: f64,
    own_us: f64,
    broker_us: f64,
}

impl Figure {
    /// Each figure's median on its own.
    fn median(figures: &[Figure]) -> Figure {
        let of = |f: fn(&Figure) -> f64| median(&mut figures.iter().map(f).collect::<Vec<_>>());
        Figure {
            rate: of(|f| f.rate),
            own_us: of(|f| f.own_us),
            broker_us: of(|f| f.broker_us),
        }
    }
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>6.0}/s ({:>4.1} µs, {:>4.1} µs)",
            self.rate, self.own_us, self.broker_us
        )
    }
}

/// Runs `publish`: jobs per second from start to end, and CPU per job of this process and its
/// children (the `wa-sender enqueue` child, once waited for) and of RabbitMQ.
async fn measure(jobs: usize, publish: impl Future<Output = ()>) -> Figure {
    let own = || common::cpu_us() + common::children_cpu_us();
    let (own0, broker0) = (own(), common::services_cpu_us().0);
    let started = Instant::now();
    publish.await;
    let elapsed = started.elapsed().as_secs_f64();
    let per_job = |us: u64| us as f64 / jobs as f64;
    Figure {
        rate: jobs as f64 / elapsed,
        own_us: per_job(own() - own0),
        broker_us: per_job(common::services_cpu_us().0 - broker0),
    }
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

/// `wa-sender enqueue <file>`, from the start of the process to its exit.
async fn enqueue_command(settings: &Settings, file: &std::path::Path) {
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
