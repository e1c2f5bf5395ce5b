//! Load benchmarks of the webhook path against the real RabbitMQ and Redis of this machine.
//!
//! `cargo bench --bench webhook -- receiver [--connections 64 --seconds 10 --queue quorum]`:
//! signed status webhooks of typical size (one `delivered` status with pricing, ~700 bytes)
//! POSTed back to back over keep-alive connections; each is verified and published, confirmed,
//! to the intake before its 200, exactly as in production.
//!
//! `cargo bench --bench webhook -- processor [--messages 20000 --prefetch 256 --queue quorum]`:
//! the intake is filled with `sent`, `delivered` and `read` bodies for messages the worker
//! recorded, then one processor drains it: every status is looked up, checked, published as an
//! event (confirmed), recorded and counted into its campaign's report.
//!
//! Each run uses its own queue and key prefix and deletes them afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Tally, flag, option};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wa_sender::broker::rabbit::QueueType;
use wa_sender::broker::{Broker, Envelope, Headers, Tap, Target, tapped_events};
use wa_sender::config::Settings;
use wa_sender::ids::{JobId, WabaId, Wamid};
use wa_sender::simulator::sign;
use wa_sender::store::{JobKey, Store, WamidRecord};
use wa_sender::webhook::processor::{Processor, ProcessorSettings};
use wa_sender::webhook::receiver::{ReceiverSettings, router};

const NUMBER: &str = "106540352242922";
const WABA: &str = "102290129340398";
const SECRET: &str = "bench-app-secret";

fn settings() -> Settings {
    let mut settings = Settings::load(std::path::Path::new("config"), "local").expect("config");
    let prefix = format!("bench-wh-{}", uuid::Uuid::new_v4().simple());
    settings.amqp.prefix = prefix.clone();
    settings.redis.key_prefix = prefix;
    settings.amqp.queue_type = match option::<String>("--queue").as_deref() {
        Some("classic") => QueueType::Classic,
        _ => QueueType::Quorum,
    };
    settings
}

/// A status webhook as Meta sends it.
fn status_body(wamid: &str, status: &str, job: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp",
                  "metadata": {"display_phone_number": "15550783881", "phone_number_id": NUMBER},
                  "statuses": [{"id": wamid, "status": status, "timestamp": "1750030080",
                                "recipient_id": format!("4915{:09}", job), "biz_opaque_callback_data": format!("job-{job}"),
                                "conversation": {"id": "CONVERSATION_ID", "origin": {"type": "utility"}},
                                "pricing": {"billable": true, "pricing_model": "PMP", "type": "regular", "category": "utility"}}]}}]}]}))
    .expect("json")
}

fn wamid(i: u64) -> String {
    format!("wamid.HBgLMTY0NjcwNDM1OTUVAgARGBI{i:012}")
}

async fn receiver(settings: Settings) {
    let connections: usize = option("--connections").unwrap_or(64);
    let seconds: u64 = option("--seconds").unwrap_or(10);
    let runtime = settings.runtime().expect("valid settings");
    let (broker, _) = wa_sender::app::connect(&runtime)
        .await
        .expect("RabbitMQ and Redis");
    let app = router(
        broker.clone(),
        ReceiverSettings {
            verify_token: SecretString::from("bench"),
            app_secret: SecretString::from(SECRET),
        },
    );
    let server = wa_sender::app::HttpServer::bind("127.0.0.1:0", app)
        .await
        .expect("bind");
    let addr = server.addr().expect("addr");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.run_until_stopped(stop.clone()));

    // Signed ahead of time: the load generator should not compete with the server for CPU.
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..4096)
            .map(|i| {
                let body = status_body(&wamid(i), "delivered", i);
                let mut request = format!(
                    "POST /webhook HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\nx-hub-signature-256: {}\r\ncontent-length: {}\r\n\r\n",
                    sign(SECRET, &body),
                    body.len()
                )
                .into_bytes();
                request.extend_from_slice(&body);
                request
            })
            .collect(),
    );
    let size = requests[0].len();
    let warm_until = Instant::now() + Duration::from_secs(1);
    let until = warm_until + Duration::from_secs(seconds);
    let n = connections as u64;
    let tasks: Vec<_> = (0..n)
        .map(|c| {
            let requests = requests.clone();
            let request = move |i: u64| requests[(i % 4096) as usize].clone();
            tokio::spawn(common::connection(addr, c, n, request, warm_until, until))
        })
        .collect();
    let mut tally = Tally::new();
    for t in tasks {
        tally.add(&t.await.expect("connection task"));
    }
    stop.cancel();
    let _ = serving.await;
    println!(
        "receiver: {} signed POSTs ({size} bytes each with headers) over {connections} connections in {seconds} s (after 1 s warm-up), {:?} intake",
        tally.ok + tally.other,
        settings.amqp.queue_type,
    );
    println!("  {}", tally.summary(seconds as f64));
    broker.delete_topology().await.expect("delete queues");
}

async fn processor(settings: Settings) {
    let messages: u64 = option("--messages").unwrap_or(20_000);
    let prefetch: u16 = option("--prefetch").unwrap_or(settings.webhook.prefetch);
    let runtime = settings.runtime().expect("valid settings");
    let (broker, store) = wa_sender::app::connect(&runtime)
        .await
        .expect("RabbitMQ and Redis");
    let waba = WabaId::parse(WABA).expect("waba");

    // What the worker recorded when Meta accepted each message.
    futures::stream::iter(0..messages)
        .for_each_concurrent(256, |i| {
            let (store, waba) = (store.clone(), waba.clone());
            async move {
                let key = JobKey {
                    waba,
                    job_id: JobId::parse(format!("job-{i}")).expect("job id"),
                };
                let record = WamidRecord {
                    job_id: format!("job-{i}"),
                    campaign_id: Some("bench".into()),
                    traceparent: Some(format!("00-{:032x}-{:016x}-01", i + 1, i + 1)),
                    metadata: json!({"order": i}),
                    resend: None,
                };
                store
                    .mark_sent(&key, &Wamid::parse(wamid(i)).expect("wamid"), &record)
                    .await
                    .expect("mark_sent");
            }
        })
        .await;
    // Every message's statuses, in Meta's order, one body each.
    let bodies: Vec<Vec<u8>> = ["sent", "delivered", "read"]
        .iter()
        .flat_map(|status| (0..messages).map(move |i| status_body(&wamid(i), status, i)))
        .collect();
    let total = bodies.len() as u64;
    futures::stream::iter(bodies)
        .for_each_concurrent(256, |body| {
            let broker = broker.clone();
            async move {
                broker
                    .publish(
                        Target::Intake,
                        Envelope {
                            body: body.into(),
                            headers: Headers::default(),
                        },
                    )
                    .await
                    .expect("publish to the intake");
            }
        })
        .await;

    let processor = Arc::new(Processor::new(
        broker.clone() as Arc<dyn Broker>,
        store.clone() as Arc<dyn Store>,
        ProcessorSettings {
            stop_keywords: vec![],
            ..runtime.processor()
        },
    ));
    // A subscriber, as producers have: events go to a queue and are consumed, not discarded.
    let mut events = tapped_events(broker.tap(Tap::Events).await.expect("tap"));
    let received = Arc::new(AtomicU64::new(0));
    let subscriber = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(_)) = events.next().await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = {
        let (processor, stop) = (processor.clone(), stop.clone());
        tokio::spawn(async move { processor.run(prefetch, stop).await })
    };
    let stats = processor.stats();
    while stats.statuses.load(Ordering::Relaxed) < total {
        if running.is_finished() {
            panic!("the processor stopped: {:?}", running.await);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    while received.load(Ordering::Relaxed) < stats.events.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = started.elapsed().as_secs_f64();
    subscriber.abort();
    stop.cancel();
    let _ = running.await;
    let events = stats.events.load(Ordering::Relaxed);
    println!(
        "processor: {total} status webhooks ({messages} messages x sent, delivered, read) from a {:?} intake, prefetch {prefetch}",
        settings.amqp.queue_type
    );
    println!(
        "  {:.0} statuses/s, {:.0} events/s ({events} events, {} duplicates, {} stale, {} requeued) in {elapsed:.2} s",
        total as f64 / elapsed,
        events as f64 / elapsed,
        stats.duplicates.load(Ordering::Relaxed),
        stats.stale.load(Ordering::Relaxed),
        stats.requeued.load(Ordering::Relaxed),
    );
    println!("  every event consumed by a subscriber after {delivered:.2} s");
    let report = store
        .report(
            &waba,
            Some(&wa_sender::ids::CampaignId::parse("bench").expect("id")),
        )
        .await
        .expect("report");
    println!(
        "  campaign report: accepted {}, sent {}, delivered {}, read {}, billable {:?}",
        report.accepted,
        report.reached("sent"),
        report.reached("delivered"),
        report.reached("read"),
        report.billable
    );
    broker.delete_topology().await.expect("delete queues");
    store.delete_all().await.expect("delete keys");
}

fn main() {
    wa_sender::telemetry::init_logs("warn", "text");
    let settings = settings();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if flag("processor") {
        runtime.block_on(processor(settings));
    } else if flag("receiver") {
        runtime.block_on(receiver(settings));
    } else {
        eprintln!("usage: cargo bench --bench webhook -- receiver|processor [options]");
        std::process::exit(64);
    }
}
