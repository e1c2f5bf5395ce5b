//! The full policy against a bare loop, and the worker's memory under a large backlog.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::common::cpu_us;
use crate::common::option;
use crate::{
    Child, StandIn, allocations, context_switches, median, memory_kib, number, number_id, settings,
};

/// Per-number in-flight jobs of both contenders (the bare loop gets the same total).
fn concurrency() -> usize {
    option("--concurrency").unwrap_or(16)
}

/// Queues `jobs` text jobs round-robin over `numbers` numbers under a fresh prefix, with every
/// recipient's care window open; returns the child arguments that point at them.
async fn prepare(jobs: usize, numbers: usize, cloud: &str) -> (Vec<String>, Cleanup) {
    let mut settings = settings("e2e");
    for n in 0..numbers {
        settings.numbers.insert(number_id(n), number(1000));
    }
    let (broker, store) = crate::queue_text_jobs(&settings, jobs, numbers).await;
    let args = vec![
        "--prefix".into(),
        settings.amqp.prefix.clone(),
        "--cloud".into(),
        cloud.into(),
        "--numbers".into(),
        numbers.to_string(),
        "--concurrency".into(),
        concurrency().to_string(),
        "--queue".into(),
        format!("{:?}", settings.amqp.queue_type).to_lowercase(),
    ];
    (args, Cleanup { broker, store })
}

/// Deletes a run's queues and keys.
struct Cleanup {
    broker: Arc<wa_sender::broker::rabbit::RabbitBroker>,
    store: Arc<wa_sender::store::redis::RedisStore>,
}

impl Cleanup {
    async fn run(self) {
        self.broker.delete_topology().await.unwrap();
        if let Err(e) = self.store.delete_all().await {
            eprintln!("could not delete the run's Redis keys ({e}); delete them by prefix");
        }
        self.broker.close().await;
    }
}

/// One measured drain: jobs per second, CPU µs per job, peak RSS MiB.
struct Drain {
    rate: f64,
    cpu_us: f64,
    /// RabbitMQ's CPU per job while the child settles jobs.
    rabbit_us: f64,
    /// RabbitMQ's CPU before the child's first settled job and after its last (connecting,
    /// declaring its queues, consuming, closing).
    rabbit_outside_ms: f64,
    redis_us: f64,
    peak_mib: f64,
    /// The child's context switches per job (its threads waiting and being woken).
    switches: f64,
    /// The child's allocations per job.
    allocations: f64,
    /// Lua script calls (`EVALSHA`) Redis ran per job, the worker's requests to the store.
    scripts: f64,
}

/// `EVALSHA` calls Redis has run so far (from `INFO commandstats`; nothing else calls scripts
/// while a bench runs), summed over the nodes a Redis Cluster's settings list: the bench's own
/// cluster lists them all, and its replicas run none (scripts reach them as their effects).
async fn script_calls() -> u64 {
    let redis = settings("e2e").redis;
    let urls = if redis.cluster_urls.is_empty() {
        vec![redis.url]
    } else {
        redis.cluster_urls
    };
    let mut calls = 0;
    for url in urls {
        let client = redis::Client::open(url.as_str()).expect("a Redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        calls += info
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    calls
}

async fn drain(mode: &str, jobs: usize, args: &[String]) -> Drain {
    let mut argv = vec![mode.to_owned(), "--expect".into(), jobs.to_string()];
    argv.extend_from_slice(args);
    let spawned = crate::common::services_cpu_us();
    let mut child = Child::spawn(&argv);
    // The services are counted over the child's own span, from its first settled job to its
    // last: what connecting and declaring the queues cost is a start-up cost, not a job's.
    let settling = child.report().await;
    let first = settling["settling"]
        .as_u64()
        .expect("the first settled job");
    let services = crate::common::services_cpu_us();
    let scripts = script_calls().await;
    let report = child.report().await;
    let after = crate::common::services_cpu_us();
    let scripts = script_calls().await - scripts;
    let (rabbit, redis) = (after.0 - services.0, after.1 - services.1);
    let _ = child.process.wait().await;
    let exited = crate::common::services_cpu_us();
    let counted = (jobs as u64).saturating_sub(first).max(1) as f64;
    Drain {
        rabbit_us: rabbit as f64 / counted,
        rabbit_outside_ms: (exited.0 - spawned.0 - rabbit) as f64 / 1000.0,
        redis_us: redis as f64 / counted,
        scripts: scripts as f64 / counted,
        rate: report["rate"].as_f64().unwrap(),
        cpu_us: report["cpu_us_per_job"].as_f64().unwrap(),
        peak_mib: report["peak_kib"].as_f64().unwrap() / 1024.0,
        switches: report["switches_per_job"].as_f64().unwrap(),
        allocations: report["allocations_per_job"].as_f64().unwrap(),
    }
}

/// Interleaved pairs: the worker with the full policy, then a bare loop (the order alternates),
/// each draining its own freshly pre-loaded queues.
pub async fn pairs() {
    let jobs: usize = option("--jobs").unwrap_or(20_000);
    let pairs: usize = option("--pairs").unwrap_or(3);
    // Enough numbers that their limits (1,000 msg/s each) do not cap the worker.
    let numbers: usize = option("--numbers").unwrap_or(40);
    let stand_in = StandIn::start().await;
    println!(
        "e2e: {jobs} text jobs over {numbers} numbers, {} in flight per number, {pairs} interleaved pairs",
        concurrency()
    );
    let (mut ratios, mut policy_cpu, mut bare_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let (mut policy_rabbit, mut bare_rabbit) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let order = if pair % 2 == 0 {
            ["worker", "bare"]
        } else {
            ["bare", "worker"]
        };
        let mut rates = [0.0; 2];
        for mode in order {
            let (args, cleanup) = prepare(jobs, numbers, &stand_in.url).await;
            let d = drain(mode, jobs, &args).await;
            cleanup.run().await;
            println!(
                "  pair {}: {mode:<6} {:>7.0} jobs/s, {:>5.1} µs CPU per job (RabbitMQ {:>5.1} and {:>4.0} ms outside the drain, Redis {:>4.1}; {:.1} Redis script calls), {:>4.1} context switches and {:>4.0} allocations per job, peak RSS {:.0} MiB",
                pair + 1,
                d.rate,
                d.cpu_us,
                d.rabbit_us,
                d.rabbit_outside_ms,
                d.redis_us,
                d.scripts,
                d.switches,
                d.allocations,
                d.peak_mib
            );
            if mode == "worker" {
                rates[0] = d.rate;
                policy_cpu.push(d.cpu_us);
                policy_rabbit.push(d.rabbit_us);
            } else {
                rates[1] = d.rate;
                bare_cpu.push(d.cpu_us);
                bare_rabbit.push(d.rabbit_us);
            }
        }
        ratios.push(rates[0] / rates[1]);
    }
    println!(
        "e2e: full policy / bare loop = {:.2} (median of {pairs} pairs: {}); CPU per job {:.1} µs vs {:.1} µs (medians)",
        median(&mut ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(&mut policy_cpu),
        median(&mut bare_cpu),
    );
    let (policy, bare) = (median(&mut policy_rabbit), median(&mut bare_rabbit));
    println!(
        "e2e: RabbitMQ CPU per job {policy:.1} µs vs {bare:.1} µs ({:.2}× the bare loop's; medians)",
        policy / bare
    );
}

/// What spans cost the worker: no subscriber at all, spans recorded (trace context for events,
/// nothing exported: the default) and spans exported over OTLP to a collector that keeps
/// nothing, each draining its own freshly pre-loaded queues, the order rotating.
pub async fn spans() {
    let jobs: usize = option("--jobs").unwrap_or(20_000);
    let rounds: usize = option("--pairs").unwrap_or(2);
    let numbers: usize = option("--numbers").unwrap_or(40);
    let stand_in = StandIn::start().await;
    println!("spans: {jobs} text jobs over {numbers} numbers, {rounds} rounds");
    let modes = ["none", "recorded", "exported"];
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let (mut args, cleanup) = prepare(jobs, numbers, &stand_in.url).await;
            args.extend(["--spans", modes[m], "--collector", &stand_in.url].map(String::from));
            let d = drain("worker", jobs, &args).await;
            cleanup.run().await;
            println!(
                "  round {}: spans {:<8} {:>7.0} jobs/s, {:>5.1} µs CPU per job, peak RSS {:.0} MiB",
                round + 1,
                modes[m],
                d.rate,
                d.cpu_us,
                d.peak_mib
            );
            rates[m].push(d.rate);
            cpu[m].push(d.cpu_us);
        }
    }
    let rate: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    let cpu: Vec<f64> = cpu.iter_mut().map(|c| median(c)).collect();
    println!(
        "spans: medians none {:.0} jobs/s {:.1} µs, recorded {:.0} jobs/s {:.1} µs ({:.2}×), exported {:.0} jobs/s {:.1} µs ({:.2}×)",
        rate[0],
        cpu[0],
        rate[1],
        cpu[1],
        rate[1] / rate[0],
        rate[2],
        cpu[2],
        rate[2] / rate[0]
    );
}

/// The worker's resident memory, sampled each second while a large backlog drains.
pub async fn rss() {
    let jobs: usize = option("--jobs").unwrap_or(1_000_000);
    let numbers: usize = option("--numbers").unwrap_or(10);
    let stand_in = StandIn::start().await;
    let started = Instant::now();
    let (args, cleanup) = prepare(jobs, numbers, &stand_in.url).await;
    println!(
        "rss: {jobs} jobs queued over {numbers} numbers in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut argv = vec![
        "worker".to_owned(),
        "--expect".into(),
        jobs.to_string(),
        "--samples".into(),
    ];
    argv.extend(args);
    let mut child = Child::spawn(&argv);
    let mut samples = Vec::new();
    let report = loop {
        let line = child.report().await;
        if line.get("settling").is_some() {
            continue;
        }
        if line.get("rss_kib").is_some() {
            samples.push((
                line["done"].as_u64().unwrap(),
                line["rss_kib"].as_u64().unwrap(),
            ));
        } else {
            break line;
        }
    };
    let _ = child.process.wait().await;
    let mib = |k: u64| k as f64 / 1024.0;
    let shown: Vec<String> = samples
        .iter()
        .step_by((samples.len() / 8).max(1))
        .map(|(done, rss)| format!("{}k done: {:.0}", done / 1000, mib(*rss)))
        .collect();
    let steady = &samples[samples.len().min(5)..];
    let (low, high) = steady
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), (_, r)| (lo.min(*r), hi.max(*r)));
    println!("rss: worker RSS MiB over the drain: {}", shown.join(", "));
    println!(
        "rss: after the first 5 s RSS stayed within {:.0}–{:.0} MiB; peak {:.0} MiB; {:.0} jobs/s",
        mib(low),
        mib(high),
        report["peak_kib"].as_f64().unwrap() / 1024.0,
        report["rate"].as_f64().unwrap()
    );
    cleanup.run().await;
}

/// `child worker|bare --prefix P --cloud URL --numbers N --concurrency C [--expect J] [--samples]`.
pub async fn child() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args
        .iter()
        .skip_while(|a| *a != "child")
        .nth(1)
        .cloned()
        .unwrap_or_default();
    let prefix: String = option("--prefix").expect("--prefix");
    let cloud: String = option("--cloud").expect("--cloud");
    let numbers: usize = option("--numbers").expect("--numbers");
    let concurrency = concurrency();
    let mut settings = settings("child");
    settings.amqp.prefix = prefix.clone();
    settings.redis.key_prefix = prefix;
    settings.cloud.base_url = cloud;
    settings.worker.concurrency = concurrency;
    settings.worker.prefetch = concurrency as u16;
    let mps: u32 = option("--mps").unwrap_or(1000);
    for n in 0..numbers {
        settings.numbers.insert(number_id(n), number(mps));
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let task = match mode.as_str() {
        "worker" => tokio::spawn(worker(settings, Arc::clone(&done), stop.clone())),
        "bare" => tokio::spawn({
            let (done, stop) = (Arc::clone(&done), stop.clone());
            async move {
                bare(settings, done, stop).await;
                serde_json::Value::Null
            }
        }),
        other => panic!("unknown child mode {other:?}"),
    };
    let expect = option::<u64>("--expect");
    match expect {
        Some(expect) => measure(&done, expect).await,
        None => {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            term.recv().await;
        }
    }
    stop.cancel();
    let summary = task.await.unwrap_or_default();
    if expect.is_none() {
        println!("{summary}");
    }
}

/// Waits until `done` reaches `expect`; prints the rate and the CPU per job over the span from
/// the first settled job to the last, and the peak RSS.
async fn measure(done: &AtomicU64, expect: u64) {
    let samples = crate::common::flag("--samples");
    let mut first: Option<(Instant, u64, u64, u64, u64)> = None;
    let mut last_sample = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = done.load(Ordering::Relaxed);
        if n > 0 && first.is_none() {
            println!("{}", json!({ "settling": n }));
            first = Some((
                Instant::now(),
                n,
                cpu_us(),
                context_switches(),
                allocations(),
            ));
        }
        if samples && last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            println!("{}", json!({"done": n, "rss_kib": memory_kib("VmRSS")}));
        }
        if n >= expect {
            break;
        }
    }
    let (t0, n0, cpu0, switches0, allocations0) = first.expect("jobs were settled");
    let jobs = (expect - n0).max(1) as f64;
    println!(
        "{}",
        json!({
            "rate": jobs / t0.elapsed().as_secs_f64(),
            "cpu_us_per_job": (cpu_us() - cpu0) as f64 / jobs,
            "switches_per_job": (context_switches() - switches0) as f64 / jobs,
            "allocations_per_job": (allocations() - allocations0) as f64 / jobs,
            "peak_kib": memory_kib("VmHWM"),
        })
    );
}

/// The worker, as `wa-sender worker` runs it; `done` counts settled jobs. Returns its
/// deferrals by cause.
async fn worker(
    settings: wa_sender::config::Settings,
    done: Arc<AtomicU64>,
    stop: CancellationToken,
) -> serde_json::Value {
    let settings = settings.runtime().expect("valid settings");
    let (broker, store) = wa_sender::app::connect(&settings).await.expect("connect");
    let app = wa_sender::app::WorkerApp::with_parts(&settings, broker.clone(), store).unwrap();
    let stats = app.pipeline().stats();
    let counter = tokio::spawn({
        let (stop, stats) = (stop.clone(), Arc::clone(&stats));
        async move {
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let s = stats.snapshot();
                done.store(s.accepted + s.already_done, Ordering::Relaxed);
            }
        }
    });
    let _ = app.run_until_stopped(stop).await;
    counter.abort();
    broker.close().await;
    json!({"deferred": stats.snapshot().deferred})
}

/// The bare loop: consume → POST → ack with the same crates (lapin, reqwest, serde_json), the
/// same in-flight bound, no policy, no events.
async fn bare(
    settings: wa_sender::config::Settings,
    done: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let connection = Connection::connect(&settings.amqp.url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(settings.worker.prefetch, BasicQosOptions { global: false })
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let permits = Arc::new(Semaphore::new(
        settings.worker.concurrency * settings.numbers.len(),
    ));
    let mut consumers = futures::stream::SelectAll::new();
    for number in settings.numbers.keys() {
        let queue = format!("{}.send.{number}.bulk", settings.amqp.prefix);
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("bare-{number}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        consumers.push(consumer);
    }
    let base = format!("{}/{}", settings.cloud.base_url, settings.cloud.api_version);
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumers.next() => d,
        };
        let Some(Ok(delivery)) = delivery else { break };
        let permit = Arc::clone(&permits).acquire_owned().await.unwrap();
        let (client, done, base) = (client.clone(), Arc::clone(&done), base.clone());
        tokio::spawn(async move {
            let job: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
            let kind = job["message"]["type"].as_str().unwrap_or("text").to_owned();
            let body = json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": job["to"],
                "type": kind,
                kind.as_str(): job["message"][kind.as_str()],
                "biz_opaque_callback_data": job["job_id"],
            });
            let url = format!(
                "{base}/{}/messages",
                job["phone_number_id"].as_str().unwrap()
            );
            let answer: serde_json::Value = client
                .post(url)
                .bearer_auth(crate::TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .json()
                .await
                .unwrap();
            assert!(answer["messages"][0]["id"].is_string());
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            done.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    let _ = connection.close(200, "done".into()).await;
}
