//! Replicas sharing numbers against the simulator, which refuses (130429) any send past a
//! number's limit in a sliding 1 s window: how close each number runs to its limit, and whether
//! it ever goes over, with replicas started together, one killed and another started mid-run,
//! and jobs arriving in bursts after the numbers went idle.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wa_sender::simulator::{Scenario, SimNumber, Simulator};

use crate::common::{flag, option};
use crate::{Child, TOKEN, WABA, number, number_id, settings};

pub async fn run() {
    let numbers: usize = option("--numbers").unwrap_or(10);
    let mps: u32 = option("--mps").unwrap_or(80);
    let replicas: usize = option("--replicas").unwrap_or(3);
    let jobs: usize = option("--jobs").unwrap_or(20_000);
    let bursts: usize = option("--bursts").unwrap_or(1).max(1);
    let runs: usize = option("--runs").unwrap_or(1);
    println!(
        "accuracy: {numbers} numbers x {mps} msg/s, {replicas} replicas, {jobs} jobs per run in {bursts} burst(s)"
    );
    for _ in 0..runs {
        if !flag("--kill-only") {
            scenario(numbers, mps, replicas, jobs, bursts, false).await;
        }
        if !flag("--no-kill") {
            scenario(numbers, mps, replicas, jobs, bursts, true).await;
        }
    }
}

/// How long the numbers stay idle between two bursts.
const IDLE: Duration = Duration::from_millis(1500);

async fn scenario(
    numbers: usize,
    mps: u32,
    replicas: usize,
    jobs: usize,
    bursts: usize,
    kill: bool,
) {
    let mut sim = Scenario::single(&number_id(0), WABA, TOKEN);
    sim.numbers[0].throughput_mps = Some(mps);
    for n in 1..numbers {
        let mut extra = SimNumber::new(&number_id(n), WABA);
        extra.throughput_mps = Some(mps);
        sim.numbers.push(extra);
    }
    let simulator = Simulator::start(sim, "127.0.0.1:0")
        .await
        .expect("simulator");
    let mut settings = settings("acc");
    for n in 0..numbers {
        settings.numbers.insert(number_id(n), number(mps));
    }
    let per_burst = jobs.div_ceil(bursts);
    let (broker, store) = crate::queue_text_jobs(&settings, per_burst.min(jobs), numbers).await;
    let mut published = per_burst.min(jobs);
    let mut idle_since: Option<Instant> = None;
    let args = vec![
        "worker".to_owned(),
        "--prefix".into(),
        settings.amqp.prefix.clone(),
        "--cloud".into(),
        simulator.base_url(),
        "--numbers".into(),
        numbers.to_string(),
        "--mps".into(),
        mps.to_string(),
        "--concurrency".into(),
        "64".into(),
        "--queue".into(),
        format!("{:?}", settings.amqp.queue_type).to_lowercase(),
    ];
    let started = Instant::now();
    let mut children: Vec<Child> = (0..replicas).map(|_| Child::spawn(&args)).collect();
    let mut killed_at = None;
    let mut progress = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let audit = simulator.audit();
        let sent = audit.accepted.len()
            - audit
                .duplicates
                .values()
                .map(|n| *n as usize - 1)
                .sum::<usize>();
        if kill && killed_at.is_none() && sent >= jobs / 2 {
            // SIGKILL: no drain, no leave; its unacked jobs return to the queue.
            children[0].process.start_kill().unwrap();
            children.push(Child::spawn(&args));
            killed_at = Some(started.elapsed());
        }
        if sent > progress.0 {
            progress = (sent, Instant::now());
        }
        // The next burst once every job of the last one was sent and the numbers were idle.
        if published < jobs && sent >= published {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= IDLE {
                let next = published..(published + per_burst).min(jobs);
                published = next.end;
                crate::queue_more(&settings, store.as_ref(), next, numbers).await;
                idle_since = None;
                progress.1 = Instant::now();
            }
        }
        // Done, or nothing sent for 30 s: jobs a killed replica left ambiguous wait for a
        // webhook (at-most-once), which the simulator here does not send.
        if sent >= jobs || progress.1.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let mut deferred: BTreeMap<String, u64> = BTreeMap::new();
    for child in &mut children {
        if let Some(pid) = child.process.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            if let Ok(Some(line)) = child.lines.next_line().await
                && let Ok(report) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(map) = report["deferred"].as_object()
            {
                for (why, n) in map {
                    *deferred.entry(why.clone()).or_default() += n.as_u64().unwrap_or(0);
                }
            }
        }
        let _ = child.process.wait().await;
    }
    let audit = simulator.audit();
    // Each number's sends in each burst (job `i` is in burst `i / per_burst`).
    let mut times: BTreeMap<(&str, usize), Vec<u64>> = BTreeMap::new();
    for send in &audit.accepted {
        let burst = send
            .job_id
            .as_deref()
            .and_then(|id| id.strip_prefix("job-")?.parse::<usize>().ok())
            .map_or(0, |i| i / per_burst);
        times
            .entry((send.phone_number_id.as_str(), burst))
            .or_default()
            .push(send.at_ms);
    }
    for t in times.values_mut() {
        t.sort_unstable();
    }
    // A number's rate in a burst after its first second: sends after it over the time they took.
    let rates: Vec<f64> = times
        .values()
        .filter(|t| t.last().unwrap_or(&0) - t[0] > 1500)
        .map(|t| {
            let from = t[0] + 1000;
            let after: Vec<&u64> = t.iter().filter(|at| **at >= from).collect();
            let span = (**after.last().unwrap_or(&&from) - from).max(1) as f64 / 1000.0;
            after.len() as f64 / span / f64::from(mps)
        })
        .collect();
    let peak = audit
        .numbers()
        .values()
        .map(|n| n.peak_per_second)
        .max()
        .unwrap_or(0);
    let lowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let retried_after_throttle: u64 = deferred
        .iter()
        .filter(|(why, _)| why.as_str() == "throttled")
        .map(|(_, n)| n)
        .sum();
    println!(
        "accuracy{}: {} sent in {:.1} s; 130429 answers: {}; highest sends of a number in any 1 s: {peak} (limit {mps}); every number after its first second (of each burst) at >= {:.1}% of its limit; {} retries after a 130429, deferrals by cause {:?}; {} sent twice",
        if kill {
            format!(
                " (replica killed and another started at {:.1} s)",
                killed_at.unwrap_or_default().as_secs_f64()
            )
        } else {
            String::new()
        },
        audit.accepted.len(),
        started.elapsed().as_secs_f64(),
        audit.error_count(130429),
        lowest * 100.0,
        retried_after_throttle,
        deferred,
        audit.duplicates.len(),
    );
    simulator.stop();
    broker.delete_topology().await.unwrap();
    store.delete_all().await.unwrap();
    broker.close().await;
}
