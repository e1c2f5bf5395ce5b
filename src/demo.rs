//! `wa-sender demo`: the simulator, a worker and a producer in one process. Sends a few thousand
//! sample jobs (mixed lanes, some invalid on purpose) and prints what happened to them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use rand::seq::IndexedRandom;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::app::{WebhookApp, WorkerApp};
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, Tap, tapped_events};
use crate::config::{NumberRuntime, Runtime, Secret};
use crate::ids::{PhoneNumberId, WaId, WabaId};
use crate::job::Lane;
use crate::policy::admission::Mark;
use crate::simulator::{Latency, Marketing, Scenario, SimUser, Simulator};
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::webhook::receiver::ReceiverSettings;

const DEMO_NUMBER: &str = "106540352242922";
const DEMO_WABA: &str = "102290129340398";
/// The demo number's throughput: an upgraded tier, so the demo finishes in seconds.
const DEMO_MPS: u32 = 250;

/// What the demo saw.
#[derive(Debug, Default)]
pub struct Summary {
    /// Jobs enqueued.
    pub enqueued: usize,
    /// Jobs accepted by the (simulated) Cloud API.
    pub accepted: usize,
    /// Retries and deferrals (a job can have several).
    pub deferred: usize,
    /// Dead letters by reason.
    pub dead: BTreeMap<String, usize>,
    /// Wall time from first enqueue to last outcome.
    pub elapsed: Duration,
    /// Time between the first and the last acceptance.
    pub send_window: Duration,
    /// Enqueue → accepted latency percentiles.
    pub latency_p50_p99: Option<(Duration, Duration)>,
    /// Sends the simulator saw twice for one job.
    pub duplicates: usize,
    /// 130429 answers from the simulator.
    pub throttled_by_meta: u64,
    /// Peak sends in any 1 s window.
    pub peak_per_second: u64,
    /// Jobs whose message reached each status, from the status webhooks.
    pub statuses: BTreeMap<String, usize>,
    /// Duplicated or out-of-order statuses the processor recognised and published nothing for.
    pub statuses_dropped: u64,
    /// The report over every demo job (outcomes, rates, estimated cost).
    pub report: Option<crate::admin::report::CampaignReport>,
}

/// The real broker and store of a demo against RabbitMQ and Redis, kept to clean up after it.
type RealParts = (
    Arc<crate::broker::rabbit::RabbitBroker>,
    Arc<crate::store::redis::RedisStore>,
);

/// Runs the demo; `embedded` uses the in-process broker and store instead of RabbitMQ/Redis.
///
/// `stop` (SIGINT, SIGTERM) ends it early: its queues and keys are deleted all the same, and it
/// fails with [`Stopped`].
pub async fn run(
    settings: &Runtime,
    embedded: bool,
    jobs: usize,
    stop: CancellationToken,
) -> anyhow::Result<Summary> {
    let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let mut scenario = Scenario::single(DEMO_NUMBER, DEMO_WABA, &token);
    scenario.numbers[0].throughput_mps = Some(DEMO_MPS);
    scenario.faults.transient_share = settings.demo.transient_failure_share;
    scenario.faults.latency = Latency {
        median_ms: 15.0,
        p99_ms: 60.0,
    };
    scenario.numbers[0].messaging_limit = "TIER_10K".into();
    let mut settings = settings.clone();
    let run_prefix = format!(
        "wa-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    settings.amqp.prefix = run_prefix.clone();
    settings.amqp.queue_type = crate::broker::rabbit::QueueType::Classic;
    settings.redis.key_prefix = run_prefix.clone();
    // The demo's keys are its own and thrown away at the end.
    settings.redis.allow_volatile = true;
    settings.worker.admission.tiers.clear();
    settings.worker.admission.default_tier = Some(10_000);
    settings.numbers = BTreeMap::from([(
        PhoneNumberId::parse(DEMO_NUMBER)?,
        NumberRuntime {
            waba: WabaId::parse(DEMO_WABA)?,
            throughput_mps: DEMO_MPS,
            token: Secret::given("demo token", SecretString::from(token)),
        },
    )]);

    let (broker, store, cleanup): (Arc<dyn Broker>, Arc<dyn Store>, Option<RealParts>) = if embedded
    {
        (
            Arc::new(MemoryBroker::new(settings.numbers.keys())),
            Arc::new(MemoryStore::new()),
            None,
        )
    } else {
        let (b, s) = crate::app::connect(&settings).await?;
        (b.clone(), s.clone(), Some((b, s)))
    };
    // Meta's status webhooks come back, signed, to the receiver, duplicated and reordered now
    // and then as Meta does, a little faster than people read.
    let app_secret = format!("demo-secret-{}", uuid::Uuid::new_v4().simple());
    let secrets = ReceiverSettings {
        verify_token: SecretString::from("demo"),
        app_secret: SecretString::from(app_secret.clone()),
    };
    let webhook = WebhookApp::with_parts(
        &settings,
        "127.0.0.1:0",
        secrets,
        broker.clone(),
        store.clone(),
    )
    .await
    .context("binding the webhook receiver")?;
    scenario.webhooks.url = Some(format!("http://{}/webhook", webhook.addr()));
    scenario.webhooks.app_secret = app_secret;
    scenario.webhooks.duplicate_share = 0.05;
    scenario.webhooks.reorder_share = 0.05;
    scenario.webhooks.read_after = crate::simulator::DelayRange {
        min_ms: 300,
        max_ms: 1_500,
    };
    // Meta's side of the demo's users: who wrote recently, who stopped marketing.
    for i in 0..jobs {
        let user = DemoUser::of(i);
        let mut sim_user = SimUser::new(user.wa_id.trim_start_matches('+'));
        sim_user.last_inbound_minutes_ago = user.wrote.then_some(30);
        if user.stopped_marketing {
            sim_user.marketing = Marketing::Stopped;
        }
        scenario.users.push(sim_user);
    }
    let simulator = Simulator::start(scenario, "127.0.0.1:0")
        .await
        .context("starting the simulator")?;

    settings.cloud.base_url = simulator.base_url();
    let backend = if embedded {
        "embedded queue and store".to_owned()
    } else {
        format!("RabbitMQ + Redis, prefix {run_prefix}")
    };
    println!(
        "wa-sender demo: {jobs} jobs through the Cloud API simulator at {} ({backend})",
        simulator.base_url()
    );

    seed_users(store.as_ref(), jobs).await?;
    let processor = webhook.processor().clone();
    let report_store = store.clone();
    let worker = WorkerApp::with_parts(&settings, broker.clone(), store)?;
    let mut events = tapped_events(broker.tap(Tap::Events).await?);

    let shutdown = CancellationToken::new();
    let receiving = tokio::spawn(webhook.run_until_stopped(shutdown.clone()));
    let worker = tokio::spawn(worker.run_until_stopped(shutdown.clone()));

    let started = Instant::now();
    // Publish as a producer does: confirms pipelined, a window of them in flight.
    let mut rng = rand::rng();
    let mut producer = crate::producer::Producer::new(broker.as_ref(), crate::producer::WINDOW);
    let mut enqueued_at: HashMap<String, Instant> = HashMap::with_capacity(jobs);
    for i in 0..jobs {
        let (lane, body, job_id) = sample_job(i, settings.demo.invalid_share, &mut rng);
        producer
            .publish(lane, job_id.as_deref(), body.into(), i as u64)
            .await?;
        if let Some(id) = job_id {
            enqueued_at.insert(id, Instant::now());
        }
    }
    producer.flush().await?;

    let mut summary = Summary {
        enqueued: jobs,
        ..Summary::default()
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("valid bounds");
    let mut finished: HashSet<String> = HashSet::new();
    let mut anonymous_dead = 0usize;
    let (mut first_accept, mut last_accept) = (None::<Instant>, None::<Instant>);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut reached: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let settled = |reached: &BTreeMap<String, HashSet<String>>| {
        ["read", "failed"]
            .iter()
            .filter_map(|s| reached.get(*s))
            .map(HashSet::len)
            .sum::<usize>()
    };
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    // Every job finished (accepted or dead-lettered), and every accepted message read or failed.
    while finished.len() + anonymous_dead < jobs || settled(&reached) < summary.accepted {
        let next = tokio::select! {
            _ = stop.cancelled() => {
                eprintln!("demo: stopped; deleting its queues and keys");
                break;
            }
            _ = progress.tick() => {
                eprintln!(
                    "demo: {} of {jobs} jobs finished (accepted or dead-lettered), {} of {} messages read or failed",
                    finished.len() + anonymous_dead,
                    settled(&reached),
                    summary.accepted
                );
                continue;
            }
            next = tokio::time::timeout_at(deadline.into(), events.next()) => next,
        };
        let Ok(Some(event)) = next else {
            eprintln!(
                "demo: gave up waiting after 180 s with {} of {jobs} jobs finished, {} of {} messages read or failed",
                finished.len() + anonymous_dead,
                settled(&reached),
                summary.accepted
            );
            break;
        };
        let event = event?;
        match event.event.as_str() {
            "message.accepted" => {
                if let Some(id) = &event.job_id
                    && finished.insert(id.clone())
                {
                    summary.accepted += 1;
                    first_accept.get_or_insert_with(Instant::now);
                    last_accept = Some(Instant::now());
                    if let Some(t) = enqueued_at.get(id) {
                        let _ = latency.record(t.elapsed().as_millis().max(1) as u64);
                    }
                }
            }
            "job.deferred" => summary.deferred += 1,
            status @ ("message.delivered" | "message.read" | "message.failed") => {
                if let Some(id) = event.job_id {
                    let status = status.trim_start_matches("message.").to_owned();
                    reached.entry(status).or_default().insert(id);
                }
            }
            "job.dead_lettered" => {
                let reason = event
                    .reason
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default();
                let counted = match &event.job_id {
                    Some(id) => finished.insert(id.clone()),
                    None => {
                        anonymous_dead += 1;
                        true
                    }
                };
                if counted {
                    *summary.dead.entry(reason).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    summary.elapsed = started.elapsed();
    if let (Some(first), Some(last)) = (first_accept, last_accept) {
        summary.send_window = last.duration_since(first);
    }
    shutdown.cancel();
    worker.await.context("worker task")??;
    receiving.await.context("webhook task")??;
    summary.statuses = reached
        .into_iter()
        .map(|(s, jobs)| (s, jobs.len()))
        .collect();
    let stats = processor.stats();
    summary.statuses_dropped = stats.duplicates.load(std::sync::atomic::Ordering::Relaxed)
        + stats.stale.load(std::sync::atomic::Ordering::Relaxed);
    let report = report_store
        .report(&WabaId::parse(DEMO_WABA)?, None)
        .await?;
    summary.report = Some(crate::admin::report::CampaignReport::new(
        None,
        &report,
        &settings.pricing.currency,
    ));
    if !latency.is_empty() {
        summary.latency_p50_p99 = Some((
            Duration::from_millis(latency.value_at_quantile(0.5)),
            Duration::from_millis(latency.value_at_quantile(0.99)),
        ));
    }
    let audit = simulator.audit();
    summary.duplicates = audit.duplicates.len();
    summary.throttled_by_meta = audit.error_count(130429);
    summary.peak_per_second = audit
        .numbers()
        .values()
        .map(|n| n.peak_per_second)
        .max()
        .unwrap_or(0);
    simulator.stop();
    if let Some((b, s)) = cleanup {
        b.delete_topology().await?;
        s.delete_all().await?;
        b.close().await;
    }
    if stop.is_cancelled() {
        return Err(Stopped.into());
    }
    Ok(summary)
}

/// How often the demo says how far it got while it waits.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The demo was stopped by a signal before it finished (its queues and keys are deleted).
#[derive(Debug, thiserror::Error)]
#[error("the demo was stopped before it finished; its queues and keys were deleted")]
pub struct Stopped;

/// What the demo's user number `i` has done: most wrote recently (replies may go), most opted
/// in (templates may go outside the window), a few stopped marketing.
struct DemoUser {
    wa_id: String,
    wrote: bool,
    opted_in: bool,
    stopped_marketing: bool,
}

impl DemoUser {
    fn of(i: usize) -> Self {
        DemoUser {
            wa_id: format!("+1650555{:04}", i % 10_000),
            wrote: i % 10 != 7,
            opted_in: i % 20 != 7,
            stopped_marketing: i % 50 == 11,
        }
    }
}

/// Records in the store what the webhook processor and the opt-in import would have: care
/// windows, opt-ins and marketing opt-outs of the demo's users.
async fn seed_users(store: &dyn Store, jobs: usize) -> anyhow::Result<()> {
    let waba = WabaId::parse(DEMO_WABA)?;
    let number = PhoneNumberId::parse(DEMO_NUMBER)?;
    let now = chrono::Utc::now();
    let mut opt_ins = Vec::new();
    for i in 0..jobs {
        let user = DemoUser::of(i);
        let wa_id = WaId::parse(user.wa_id)?;
        if user.wrote {
            let at = now - chrono::TimeDelta::minutes(30);
            store.record_inbound(&waba, &number, &wa_id, at).await?;
        }
        if user.stopped_marketing {
            let mark = Mark {
                at: now,
                source: "user_preferences".into(),
            };
            store.record_opt_out(&waba, &wa_id, Some(mark)).await?;
        }
        if user.opted_in {
            let mark = Mark {
                at: now - chrono::TimeDelta::days(30),
                source: "demo signup form".into(),
            };
            opt_ins.push((wa_id, mark));
        }
    }
    store.record_opt_ins(&waba, &opt_ins).await?;
    Ok(())
}

/// One sample job: mostly valid, across lanes and message types; some broken on purpose.
fn sample_job(i: usize, invalid_share: f64, rng: &mut impl Rng) -> (Lane, Vec<u8>, Option<String>) {
    let lane = *[
        Lane::Otp,
        Lane::Transactional,
        Lane::Transactional,
        Lane::Bulk,
        Lane::Bulk,
        Lane::Bulk,
        Lane::Bulk,
    ]
    .choose(rng)
    .expect("non-empty");
    let job_id = format!("demo-{i:05}");
    let to = DemoUser::of(i).wa_id;
    let message = match lane {
        Lane::Otp => {
            // Meta wants an authentication code twice: in the body and in the copy-code button.
            let code = format!("{:06}", rng.random_range(0..1_000_000));
            json!({"type": "template", "template": {"name": "otp_code", "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": code}]},
                           {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": code}]}]}})
        }
        Lane::Transactional => {
            json!({"type": "template", "template": {"name": "order_update", "language": {"code": "en_US"},
            "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ada"}, {"type": "text", "text": format!("#{i}")}]}]}})
        }
        Lane::Bulk => match i % 3 {
            0 => json!({"type": "text", "text": {"body": format!("Your weekly digest #{i}")}}),
            1 => {
                json!({"type": "image", "image": {"link": "https://example.com/promo.jpg", "caption": "Spring sale"}})
            }
            _ => {
                json!({"type": "template", "template": {"name": "spring_sale", "language": {"code": "en_US"},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": "20%"}]}]}})
            }
        },
    };
    let mut job = json!({"schema": "wa.send.v1", "job_id": job_id, "phone_number_id": DEMO_NUMBER, "to": to, "message": message,
        "campaign_id": format!("demo-{}", lane.as_str()), "metadata": {"demo": true, "n": i}});
    if rng.random_bool(invalid_share) {
        let broken: Value = match i % 5 {
            0 => {
                return (
                    lane,
                    b"{\"schema\": \"wa.send.v1\", \"job_id\": ".to_vec(),
                    None,
                );
            }
            1 => json!({"to": "12345"}),
            2 => json!({"message": {"type": "text", "text": {"body": "x".repeat(4097)}}}),
            3 => json!({"schema": "wa.send.v2"}),
            _ => {
                json!({"message": {"type": "template", "template": {"name": "no_such_template", "language": {"code": "en_US"}}}})
            }
        };
        for (k, v) in broken.as_object().expect("object") {
            job[k] = v.clone();
        }
    }
    (lane, serde_json::to_vec(&job).expect("json"), Some(job_id))
}

/// Renders the summary table.
pub fn render(summary: &Summary) -> String {
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(["outcome", "count"]);
    table.add_row(["enqueued".to_owned(), summary.enqueued.to_string()]);
    table.add_row([
        "accepted by the Cloud API".to_owned(),
        summary.accepted.to_string(),
    ]);
    table.add_row([
        "retried / deferred (times)".to_owned(),
        summary.deferred.to_string(),
    ]);
    for (reason, n) in &summary.dead {
        table.add_row([format!("dead-lettered: {reason}"), n.to_string()]);
    }
    let secs = summary.elapsed.as_secs_f64().max(0.001);
    let window = summary.send_window.as_secs_f64().max(0.001);
    table.add_row([
        "throughput (accepted/s, first to last)".to_owned(),
        format!("{:.0}", summary.accepted as f64 / window),
    ]);
    table.add_row([
        format!("peak sends in any 1 s (limit {DEMO_MPS})"),
        summary.peak_per_second.to_string(),
    ]);
    if let Some((p50, p99)) = summary.latency_p50_p99 {
        table.add_row([
            "enqueue → accepted p50 / p99".to_owned(),
            format!("{} ms / {} ms", p50.as_millis(), p99.as_millis()),
        ]);
    }
    table.add_row([
        "130429 from the simulator".to_owned(),
        summary.throttled_by_meta.to_string(),
    ]);
    table.add_row(["duplicate sends".to_owned(), summary.duplicates.to_string()]);
    for (status, n) in &summary.statuses {
        table.add_row([format!("status webhook: {status}"), n.to_string()]);
    }
    table.add_row([
        "duplicate / out-of-order statuses dropped".to_owned(),
        summary.statuses_dropped.to_string(),
    ]);
    table.add_row(["elapsed".to_owned(), format!("{:.1} s", secs)]);
    let mut out = table.to_string();
    if let Some(report) = &summary.report {
        out.push_str("\n\n`wa-sender campaign report --all` would now show:\n");
        out.push_str(&report.render());
    }
    out
}
