//! The fault suite: every fault the worker and the webhook process must live through, run against
//! a RabbitMQ node and a Redis of the suite's own (own ports, own data, Redis keeping an
//! append-only file: the shared services and the tests running beside it are never touched),
//! with the real `wa-sender` binaries and real signals, one scenario after another.
//!
//! Every job scenario runs in the conditions that once lost jobs without any fault: two business
//! numbers, jobs spread over the three lanes at random, a worker that takes fewer jobs at once
//! than the broker sends it (`concurrency` 8 below `prefetch` 64 × 3 lanes), quorum queues, and
//! the webhook process beside the worker taking the simulator's status webhooks. Each scenario
//! ends with a count per job id, from outside the worker: sent once (the simulator accepted it),
//! ambiguous (dead-lettered `ambiguous_send`; split by whether its request reached the
//! simulator at all), dead-lettered for a reason, sent twice, lost (none of these, and no
//! longer queued), and settled without its outcome's event (`message.accepted` or
//! `job.dead_lettered`) in the kept events' queue. It also counts the channels RabbitMQ closed
//! on the worker (406 `PRECONDITION_FAILED`) in the worker's log. Every scenario must end with
//! 0 sent twice, 0 lost and 0 without an event; the no-fault runs with 0 channel closes, and neither a broker's scenario nor worker
//! stopped by SIGTERM with an ambiguous job that never reached the Cloud API. The suite prints
//! the table.
//!
//! `cargo test` runs the short form (`FAULT_JOBS`, default 1,000 jobs per scenario, the no-fault
//! run once per shape); the full one:
//! `FAULT_JOBS=20000 FAULT_REPEAT=5 cargo test --release --test faults -- --nocapture`
//! (`FAULT_ONLY=broker,redis` runs some scenarios only; `FAULT_EVENTS_KEPT=0` runs them without
//! the kept events' queue, `amqp.events_kept`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::{RabbitCluster, RabbitNode, RedisCluster, RedisNode, free_port};
use common::webhook_envelope as envelope;
use common::{NUMBER, Taken, TestApp, WABA, spawn_app, text_job};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use wa_sender::broker::rabbit::QueueType;
use wa_sender::config::{NumberSettings, Settings};
use wa_sender::event::Event;
use wa_sender::ids::{PhoneNumberId, WaId, WabaId};
use wa_sender::job::Lane;
use wa_sender::producer::Producer;
use wa_sender::simulator::{Latency, Scenario, SimNumber, Simulator};
use wa_sender::store::Store;

const APP_SECRET: &str = "fault-suite-app-secret";
/// The second business number of every job scenario.
const OTHER: &str = "106540352242923";

fn jobs_per_scenario() -> usize {
    env_number("FAULT_JOBS", 1000)
}

/// How many times each no-fault shape runs.
fn repeats() -> usize {
    env_number("FAULT_REPEAT", 1)
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether to run the scenarios named `name` (`FAULT_ONLY`, a comma-separated list of
/// `no-fault`, `kills` (SIGKILL and SIGTERM), `cloud`, `broker`, `redis`, `malformed`,
/// `webhooks`, `cluster`; all by default).
fn wanted(name: &str) -> bool {
    std::env::var("FAULT_ONLY").map_or(true, |only| only.split(',').any(|n| n.trim() == name))
}

/// How a scenario's worker takes jobs, and the queues it takes them from.
#[derive(Debug, Clone, Copy)]
struct Shape {
    concurrency: usize,
    prefetch: u16,
    queues: QueueType,
}

impl Shape {
    const fn new(concurrency: usize, prefetch: u16, queues: QueueType) -> Shape {
        Shape {
            concurrency,
            prefetch,
            queues,
        }
    }

    fn label(&self) -> String {
        let queues = match self.queues {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        format!("{}/{} {queues}", self.concurrency, self.prefetch)
    }
}

/// Fewer jobs in flight than the broker hands out: deliveries wait in the client's buffers.
const MIXED: Shape = Shape::new(8, 64, QueueType::Quorum);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_suite_loses_nothing_and_sends_nothing_twice() {
    let rig = Rig::start();
    let mut tallies = Vec::new();
    // Each row is printed as it comes (a full run takes a while), the table at the end.
    let mut done = |t: Tally| {
        eprintln!("{}", row(&t));
        tallies.push(t);
    };
    if wanted("no-fault") {
        for shape in [
            MIXED,
            Shape::new(8, 64, QueueType::Classic),
            Shape::new(16, 16, QueueType::Quorum),
            Shape::new(64, 64, QueueType::Quorum),
        ] {
            for _ in 0..repeats() {
                done(no_fault(&rig, shape).await);
            }
        }
    }
    if wanted("kills") {
        done(kills(&rig).await);
        done(terms(&rig).await);
    }
    if wanted("cloud") {
        done(cloud_faults(&rig).await);
    }
    if wanted("broker") {
        done(broker_restart(&rig).await);
        done(broker_kill(&rig).await);
    }
    if wanted("redis") {
        done(redis_restart(&rig).await);
    }
    if wanted("malformed") {
        done(malformed_jobs(&rig).await);
    }
    if wanted("webhooks") {
        done(webhooks(&rig).await);
    }
    if wanted("cluster") {
        let clusters = Rig::start_clusters();
        done(rabbit_node_lost(&clusters, Lost::Connected).await);
        done(rabbit_node_lost(&clusters, Lost::Leader).await);
        done(redis_master_lost(&clusters).await);
    }
    println!("\n{}", table(&tallies));
    for t in &tallies {
        assert_eq!(
            (t.twice, t.lost, t.contradictory, t.unannounced),
            (0, 0, 0, 0),
            "{} ({}): sent twice, lost, contradictory, without their event (logs in {})",
            t.scenario,
            t.shape,
            rig.logs.display()
        );
        if t.scenario == NO_FAULT {
            assert_eq!(t.closes, 0, "{}: channels closed by RabbitMQ", t.shape);
        }
        if t.scenario.starts_with("RabbitMQ") || t.scenario.contains("SIGTERM") {
            assert_eq!(
                t.unsent_ambiguous, 0,
                "{}: ambiguous jobs that never reached the Cloud API",
                t.scenario
            );
        }
    }
}

/// What became of each job (or request) of one scenario.
#[derive(Debug, Default)]
struct Tally {
    scenario: &'static str,
    /// The worker's concurrency/prefetch and queue type.
    shape: String,
    jobs: usize,
    once: usize,
    /// Dead-lettered `ambiguous_send` (all of them, whether the request reached Meta or not).
    ambiguous: usize,
    /// Of those, the ones whose request never reached the simulator.
    unsent_ambiguous: usize,
    /// Dead-lettered (or, for webhooks, refused or parked), by reason.
    dead: BTreeMap<String, usize>,
    twice: usize,
    lost: usize,
    /// Sent, and also dead-lettered for a reason other than ambiguity.
    contradictory: usize,
    /// Settled without its outcome's event kept ([`unannounced`]).
    unannounced: usize,
    /// Channels RabbitMQ closed on the worker (406), from its log.
    closes: usize,
    /// For a fault under a running worker: deliveries it found already sent (copies of a job
    /// the broker held twice, or redeliveries of jobs sent before the fault), from its metrics.
    copies: Option<u64>,
    /// For a fault under a running worker: how long after the fault ended the last job was
    /// sent (how long the broker took to give back what it held).
    tail: Option<Duration>,
    /// For a node lost in a cluster: the longest pause in sends from the loss on.
    pause: Option<Duration>,
}

const NO_FAULT: &str = "no fault";

fn table(tallies: &[Tally]) -> String {
    let mut out = format!(
        "{:<26} {:<16} {:>6} {:>6} {:>9} {:>6} {:>5} {:>4} {:>8} {:>6}  dead letters (or refusals) by reason\n",
        "scenario",
        "shape",
        "jobs",
        "once",
        "ambiguous",
        "dead",
        "twice",
        "lost",
        "no event",
        "closes"
    );
    for t in tallies {
        out += &row(t);
        out.push('\n');
    }
    out + "ambiguous (n): n of them never reached the Cloud API\n"
}

fn row(t: &Tally) -> String {
    let mut reasons: Vec<String> = t.dead.iter().map(|(r, n)| format!("{r} {n}")).collect();
    if let Some(copies) = t.copies {
        reasons.push(format!("[{copies} found already sent]"));
    }
    if let Some(pause) = t.pause {
        reasons.push(format!(
            "[longest pause in sends {:.1} s]",
            pause.as_secs_f64()
        ));
    }
    if let Some(tail) = t.tail {
        reasons.push(format!(
            "[last send {:.1} s after the fault]",
            tail.as_secs_f64()
        ));
    }
    let ambiguous = format!("{} ({})", t.ambiguous, t.unsent_ambiguous);
    let row = format!(
        "{:<26} {:<16} {:>6} {:>6} {:>9} {:>6} {:>5} {:>4} {:>8} {:>6}  {}",
        t.scenario,
        t.shape,
        t.jobs,
        t.once,
        ambiguous,
        t.dead.values().sum::<usize>(),
        t.twice,
        t.lost,
        t.unannounced,
        t.closes,
        reasons.join(", ")
    );
    row.trim_end().to_owned()
}

/// The suite's own RabbitMQ node and Redis, or a cluster of each, and where the processes it
/// starts write their logs.
struct Rig {
    rabbit: Arc<Brokers>,
    redis: Arc<Stores>,
    logs: PathBuf,
}

/// The suite's RabbitMQ: one node, or a cluster.
enum Brokers {
    One(RabbitNode),
    Cluster(RabbitCluster),
}

impl Brokers {
    fn urls(&self) -> Vec<String> {
        match self {
            Brokers::One(node) => vec![node.url()],
            Brokers::Cluster(cluster) => cluster.urls(),
        }
    }

    fn queue_messages(&self, prefix: &str) -> Vec<(String, u64)> {
        match self {
            Brokers::One(node) => node.queue_messages(prefix),
            Brokers::Cluster(cluster) => cluster.queue_messages(prefix),
        }
    }

    /// The single node (the scenarios that restart it run on one node).
    fn node(&self) -> &RabbitNode {
        match self {
            Brokers::One(node) => node,
            Brokers::Cluster(_) => panic!("a scenario for one node ran on a cluster"),
        }
    }

    fn cluster(&self) -> &RabbitCluster {
        match self {
            Brokers::Cluster(cluster) => cluster,
            Brokers::One(_) => panic!("a cluster scenario ran on one node"),
        }
    }
}

/// The suite's Redis: one server (with its append-only file), or a Redis Cluster.
enum Stores {
    One(RedisNode),
    Cluster(RedisCluster),
}

/// One scenario's app, its worker's shape and the webhook process beside the worker.
struct Run {
    app: TestApp,
    shape: Shape,
    webhook: tokio::process::Child,
}

impl Rig {
    fn start() -> Rig {
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults");
        std::fs::create_dir_all(&logs).unwrap();
        let rabbit = RabbitNode::start("faults").keep_log(logs.join("rabbitmq.log"));
        Rig {
            rabbit: Arc::new(Brokers::One(rabbit)),
            redis: Arc::new(Stores::One(RedisNode::start("faults"))),
            logs,
        }
    }

    /// A RabbitMQ cluster of three nodes and a Redis Cluster of three masters with a replica
    /// each.
    fn start_clusters() -> Rig {
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults");
        std::fs::create_dir_all(&logs).unwrap();
        Rig {
            rabbit: Arc::new(Brokers::Cluster(RabbitCluster::start("failover", 3, &logs))),
            redis: Arc::new(Stores::Cluster(RedisCluster::start("failover", 3))),
            logs,
        }
    }

    /// A test app on the suite's broker and Redis.
    async fn app(&self, name: &str, tweak: impl FnOnce(&mut Settings, &mut Scenario)) -> TestApp {
        let amqp = self.rabbit.urls();
        let redis = Arc::clone(&self.redis);
        spawn_app(name, move |settings, sim| {
            settings.amqp.url = amqp[0].clone();
            if amqp.len() > 1 {
                settings.amqp.urls = amqp;
            }
            settings.amqp.queue_type = QueueType::Quorum;
            if let Ok(kept) = std::env::var("FAULT_EVENTS_KEPT") {
                settings.amqp.events_kept = kept.parse().expect("FAULT_EVENTS_KEPT is a number");
            }
            match redis.as_ref() {
                Stores::One(node) => settings.redis.url = node.url(),
                Stores::Cluster(cluster) => settings.redis.cluster_urls = cluster.urls(),
            }
            tweak(settings, sim);
        })
        .await
    }

    /// A job scenario's app: two numbers at `mps` each, the worker in `shape`, the simulator
    /// posting its status webhooks to a webhook process started here.
    async fn run(
        &self,
        name: &str,
        shape: Shape,
        mps: u32,
        tweak: impl FnOnce(&mut Settings, &mut Scenario),
    ) -> Run {
        let port = free_port();
        let app = self
            .app(name, |settings, sim| {
                settings.amqp.queue_type = shape.queues;
                settings.worker.concurrency = shape.concurrency;
                settings.worker.prefetch = shape.prefetch;
                common::limit_number(settings, sim, mps);
                settings.numbers.insert(
                    OTHER.into(),
                    NumberSettings {
                        waba_id: WABA.into(),
                        throughput_mps: mps,
                        access_token: None,
                        access_token_file: None,
                    },
                );
                let mut other = SimNumber::new(OTHER, WABA);
                other.throughput_mps = Some(mps);
                sim.numbers.push(other);
                sim.webhooks.url = Some(format!("http://127.0.0.1:{port}/webhook"));
                sim.webhooks.app_secret = APP_SECRET.into();
                tweak(settings, sim);
            })
            .await;
        let webhook = self.webhook_process(&app, port).await;
        Run {
            app,
            shape,
            webhook,
        }
    }

    /// `wa-sender webhook` for `app` on `port`, with the suite's secrets, once it listens.
    async fn webhook_process(&self, app: &TestApp, port: u16) -> tokio::process::Child {
        let listen = format!("127.0.0.1:{port}");
        let process = self.process_with(
            app,
            "webhook",
            &["--listen", &listen],
            &[
                ("WA_SENDER__WEBHOOK__APP_SECRET", APP_SECRET),
                ("WA_SENDER__WEBHOOK__VERIFY_TOKEN", "fault-suite-verify"),
            ],
        );
        wait_port(port).await;
        process
    }

    /// Starts `wa-sender <subcommand> <args>` configured for `app`, logging to the suite's logs.
    fn process(&self, app: &TestApp, subcommand: &str, args: &[&str]) -> tokio::process::Child {
        self.process_with(app, subcommand, args, &[])
    }

    /// [`Rig::process`] with more environment.
    fn process_with(
        &self,
        app: &TestApp,
        subcommand: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> tokio::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(app, subcommand))
            .unwrap();
        let mut command = app.command(subcommand);
        command.args(args).stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        command.spawn().expect("the wa-sender binary starts")
    }

    fn log(&self, app: &TestApp, subcommand: &str) -> PathBuf {
        self.logs.join(format!("{}.{subcommand}.log", app.prefix))
    }

    /// Messages (ready or held by a consumer) in `app`'s queues whose names start with one of
    /// `kinds` (`send.`, `delay.`, `webhooks.intake`).
    async fn queued(&self, app: &TestApp, kinds: &[&str]) -> u64 {
        let rabbit = Arc::clone(&self.rabbit);
        let queues = tokio::task::spawn_blocking({
            let prefix = app.prefix.clone();
            move || rabbit.queue_messages(&prefix)
        })
        .await
        .unwrap();
        queues
            .iter()
            .filter(|(name, _)| {
                let name = &name[app.prefix.len() + 1..];
                kinds.iter().any(|k| name.starts_with(k))
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Waits until none of `app`'s messages is left in the `kinds` queues, ready or held,
    /// twice a second apart.
    async fn wait_quiet(&self, app: &TestApp, kinds: &[&str], scenario: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut quiet = 0;
        while quiet < 2 {
            let left = self.queued(app, kinds).await;
            quiet = if left == 0 { quiet + 1 } else { 0 };
            assert!(
                Instant::now() < deadline,
                "{scenario}: {left} messages still queued after 5 minutes (logs in {})",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Once no job is left in a send or delay queue, ready, held or deferred (or after five
    /// minutes): what became of each job of `ids`. Stops the run's processes.
    async fn settle(
        &self,
        run: Run,
        worker: tokio::process::Child,
        scenario: &'static str,
        ids: &BTreeSet<String>,
    ) -> Tally {
        self.settle_with(run, vec![worker], scenario, ids, async { None })
            .await
    }

    /// [`Rig::settle`] for any number of `workers`, with a count of jobs found already sent,
    /// read (by `copies`) once everything has ended and before the workers are stopped.
    async fn settle_with(
        &self,
        mut run: Run,
        workers: Vec<tokio::process::Child>,
        scenario: &'static str,
        ids: &BTreeSet<String>,
        copies: impl std::future::Future<Output = Option<u64>>,
    ) -> Tally {
        let app = &run.app;
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut quiet = 0;
        // Nothing queued, ready, held or deferred, three times a second apart, and every job
        // has an end (sent, or as many dead letters as jobs left); or nothing queued for ten
        // seconds while jobs have none: they are gone. (One reading of all queues is not a
        // snapshot: a job moving from a lane to a delay queue can be missed by one reading.)
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let queued = self.queued(app, &["send.", "delay."]).await;
            quiet = if queued == 0 { quiet + 1 } else { 0 };
            let sent: BTreeSet<String> = app
                .simulator
                .audit()
                .accepted
                .into_iter()
                .filter_map(|s| s.job_id)
                .collect();
            let dead = self.queued(app, &["dead.all"]).await;
            let ended = sent.intersection(ids).count() as u64 + dead >= ids.len() as u64;
            if (quiet >= 3 && ended) || quiet >= 10 {
                break;
            }
        }
        let copies = copies.await;
        for mut worker in workers {
            worker.kill().await.unwrap();
        }
        run.webhook.kill().await.unwrap();
        let dead = app.take_all("dead.all").await;
        let mut t = tally(scenario, ids, app, &dead);
        if app.settings.amqp.events_kept > 0 {
            let kept = app.take_all("events.kept").await;
            t.unannounced = unannounced(ids, app, &dead, &kept);
        }
        t.shape = run.shape.label();
        t.copies = copies;
        t.closes = channel_closes(&self.log(app, "worker"));
        app.simulator.stop();
        t
    }
}

/// How many times RabbitMQ closed a channel of the worker's because of what it sent (406).
fn channel_closes(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("PRECONDITION_FAILED"))
        .count()
}

/// Counts each job of `ids` by what the simulator accepted and what was dead-lettered.
fn tally(scenario: &'static str, ids: &BTreeSet<String>, app: &TestApp, dead: &[Taken]) -> Tally {
    let audit = app.simulator.audit();
    let mut sent: BTreeMap<String, usize> = BTreeMap::new();
    for send in &audit.accepted {
        if let Some(id) = &send.job_id {
            *sent.entry(id.clone()).or_default() += 1;
        }
    }
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for letter in dead {
        let id = wa_sender::job::salvage_job_id(&letter.body).unwrap_or_default();
        reasons.entry(id).or_default().push(reason(letter));
    }
    let mut t = Tally {
        scenario,
        jobs: ids.len(),
        ..Tally::default()
    };
    for id in ids {
        let times = sent.get(id).copied().unwrap_or(0);
        let why = reasons.get(id);
        match why {
            _ if times >= 2 => t.twice += 1,
            Some(r) if r.iter().any(|r| r == "ambiguous_send") => {
                t.ambiguous += 1;
                if !audit.arrived.contains(id) {
                    t.unsent_ambiguous += 1;
                }
            }
            Some(_) if times == 1 => t.contradictory += 1,
            Some(r) => *t.dead.entry(r[0].clone()).or_default() += 1,
            None if times == 1 => t.once += 1,
            None => t.lost += 1,
        }
    }
    t
}

/// Jobs of `ids` settled without their outcome's event in the kept events' queue: a job the
/// Cloud API accepted needs its `message.accepted`, a job the worker dead-lettered only its
/// `job.dead_lettered` (one the broker dead-lettered at its delivery limit has none). A job is
/// acked only once its event is confirmed, so none may be missing, whatever the fault.
fn unannounced(ids: &BTreeSet<String>, app: &TestApp, dead: &[Taken], kept: &[Taken]) -> usize {
    let mut announced: BTreeSet<(String, String)> = BTreeSet::new();
    for message in kept {
        let events = wa_sender::event::read_message(&message.body)
            .unwrap_or_else(|e| panic!("a kept message is an array of events: {e}"));
        for event in events {
            if let Some(id) = event.job_id {
                announced.insert((id, event.event));
            }
        }
    }
    let worker_dead: BTreeSet<String> = dead
        .iter()
        .filter(|l| l.headers.contains_key("x-wa-reason"))
        .map(|l| wa_sender::job::salvage_job_id(&l.body).unwrap_or_default())
        .collect();
    // A job accepted and then dead-lettered (`ambiguous_send`: its answer was lost) announces
    // only its dead letter.
    let accepted = app.simulator.audit().accepted.into_iter();
    let needed: BTreeSet<(String, &str)> = accepted
        .filter_map(|send| send.job_id)
        .filter(|id| !worker_dead.contains(id))
        .map(|id| (id, "message.accepted"))
        .chain(
            worker_dead
                .iter()
                .map(|id| (id.clone(), "job.dead_lettered")),
        )
        .collect();
    needed
        .into_iter()
        .filter(|(id, kind)| {
            ids.contains(id) && !announced.contains(&(id.clone(), kind.to_string()))
        })
        .inspect(|(id, kind)| eprintln!("no {kind} event kept for {id}"))
        .count()
}

/// A dead letter's reason: the worker's header, or the broker's own when the broker
/// dead-lettered it.
fn reason(letter: &Taken) -> String {
    letter
        .headers
        .get("x-wa-reason")
        .or_else(|| letter.headers.get("x-first-death-reason"))
        .cloned()
        .unwrap_or_else(|| panic!("a dead letter without a reason: {letter:?}"))
}

/// Enqueues `count` replies (free-form jobs to users who have just written) named
/// `<name>-<i>`, each on a lane and one of the two numbers picked at random, a tenth of them
/// scheduled a few seconds ahead.
async fn enqueue_jobs(app: &TestApp, name: &str, count: usize) -> BTreeSet<String> {
    let mut rng = StdRng::seed_from_u64(count as u64);
    let waba = &WabaId::parse(WABA).unwrap();
    let mut jobs = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{name}-{i}");
        let mut job = text_job(&id);
        let number = if rng.random_bool(0.5) { NUMBER } else { OTHER };
        job["phone_number_id"] = json!(number);
        // A tenth are scheduled a few seconds ahead: they wait in the delay queues meanwhile,
        // where a fault finds them.
        if rng.random_bool(0.1) {
            let ahead = chrono::TimeDelta::milliseconds(rng.random_range(3_000..15_000));
            job["not_before"] = json!((chrono::Utc::now() + ahead).to_rfc3339());
        }
        jobs.push((Lane::ALL[rng.random_range(0..3)], id, job));
    }
    // The users have just written to the number their job comes from: care windows open.
    let store: &dyn Store = app.store.as_ref();
    futures::stream::iter(&jobs)
        .for_each_concurrent(64, |(_, _, job)| async move {
            let number = PhoneNumberId::parse(job["phone_number_id"].as_str().unwrap()).unwrap();
            let to = WaId::parse(job["to"].as_str().unwrap()).unwrap();
            store
                .record_inbound(waba, &number, &to, chrono::Utc::now())
                .await
                .unwrap();
        })
        .await;
    let mut producer = Producer::new(app.broker.as_ref(), 1024);
    for (position, (lane, id, job)) in jobs.iter().enumerate() {
        let body = serde_json::to_vec(job).unwrap();
        producer
            .publish(*lane, Some(id), body.into(), position as u64)
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    jobs.into_iter().map(|(_, id, _)| id).collect()
}

/// Waits until the simulator has accepted at least `count` sends.
async fn wait_sent(app: &TestApp, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while app.simulator.audit().accepted.len() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} jobs sent within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A rate per number that keeps a scenario's jobs flowing for about ten seconds, so a fault
/// lands mid-run.
fn ten_second_rate() -> u32 {
    (jobs_per_scenario() / 20).clamp(50, 1000) as u32
}

/// Nothing goes wrong: every job is sent once, whatever the worker's shape.
async fn no_fault(rig: &Rig, shape: Shape) -> Tally {
    let run = rig.run("no-fault", shape, 1000, |_, _| {}).await;
    let ids = enqueue_jobs(&run.app, "calm", jobs_per_scenario()).await;
    let worker = rig.process(&run.app, "worker", &[]);
    rig.settle(run, worker, NO_FAULT, &ids).await
}

/// Ten SIGKILLs of a worker mid-run, each followed by a new one: no drain, no acks, claims
/// left behind, sends cut off in flight.
async fn kills(rig: &Rig) -> Tally {
    stops(rig, "KILL", "10 SIGKILLs of a worker").await
}

/// Ten SIGTERMs of a worker mid-run, each followed by a new one: each drains, so nothing is
/// left ambiguous.
async fn terms(rig: &Rig) -> Tally {
    stops(rig, "TERM", "10 SIGTERMs of a worker").await
}

/// Stops a worker with `signal` ten times mid-run, starting a new one each time.
async fn stops(rig: &Rig, signal: &str, scenario: &'static str) -> Tally {
    let n = jobs_per_scenario();
    let run = rig
        .run(
            &format!("sig{}", signal.to_lowercase()),
            MIXED,
            ten_second_rate(),
            |_, sim| {
                sim.faults.latency = Latency {
                    median_ms: 20.0,
                    p99_ms: 80.0,
                };
            },
        )
        .await;
    let ids = enqueue_jobs(&run.app, "stop", n).await;
    let mut worker = rig.process(&run.app, "worker", &[]);
    for stop in 1..=10 {
        // Each worker gets going before it is stopped: some sends of its own, and further along.
        let sent = run.app.simulator.audit().accepted.len();
        wait_sent(&run.app, (sent + n / 100).max(stop * n / 12)).await;
        common::signal(&worker, signal);
        let exit = tokio::time::timeout(Duration::from_secs(60), worker.wait())
            .await
            .expect("the worker stops");
        if signal == "TERM" {
            assert!(exit.unwrap().success(), "a drained worker exits 0");
        }
        worker = rig.process(&run.app, "worker", &[]);
    }
    rig.settle(run, worker, scenario, &ids).await
}

/// 20 % of sends answered 500 (Meta's transient 131016) and 5 % sent but answered only after
/// the worker's request timeout.
async fn cloud_faults(rig: &Rig) -> Tally {
    let run = rig
        .run("cloud-faults", MIXED, 1000, |_, sim| {
            sim.faults.transient_share = 0.20;
            sim.faults.timeout_share = 0.05;
            sim.faults.timeout_ms = 2_000;
        })
        .await;
    let ids = enqueue_jobs(&run.app, "cloud", jobs_per_scenario()).await;
    let worker = rig.process(&run.app, "worker", &[]);
    rig.settle(run, worker, "20% 5xx + 5% timeouts", &ids).await
}

/// RabbitMQ restarted (`stop_app`, `start_app`) under a running worker that nobody restarts; its
/// readiness says the broker is down until it consumes again.
async fn broker_restart(rig: &Rig) -> Tally {
    let rabbit = Arc::clone(&rig.rabbit);
    restart_under_worker(rig, "RabbitMQ restart", "broker", 0, move || {
        rabbit.node().restart()
    })
    .await
}

/// RabbitMQ's VM killed with SIGKILL and started again on its data under a running worker that
/// serves 100 more numbers (300 more quorum queues): a node with many queues restarts its quorum
/// queues before it has recovered its exchanges, and delay queues whose jobs expire meanwhile
/// find `wa.send` missing (see `deploy/rabbitmq/advanced.config`).
async fn broker_kill(rig: &Rig) -> Tally {
    let rabbit = Arc::clone(&rig.rabbit);
    restart_under_worker(rig, "RabbitMQ kill -9", "broker", 100, move || {
        rabbit.node().kill_and_start(Duration::from_secs(1))
    })
    .await
}

/// Redis (with its append-only file) restarted, two seconds away, under a running worker, whose
/// readiness names Redis as down meanwhile.
async fn redis_restart(rig: &Rig) -> Tally {
    let redis = Arc::clone(&rig.redis);
    restart_under_worker(rig, "Redis restart", "redis", 0, move || {
        match redis.as_ref() {
            Stores::One(node) => node.restart(Duration::from_secs(2)),
            Stores::Cluster(_) => panic!("a scenario for one Redis ran on a cluster"),
        }
    })
    .await
}

/// Runs `restart` a tenth of the way into a run of one worker process (configured with
/// `idle_numbers` more numbers that get no jobs), which must live through it by itself, its
/// `/readyz` naming `part` down meanwhile and up again after.
async fn restart_under_worker(
    rig: &Rig,
    scenario: &'static str,
    part: &str,
    idle_numbers: u64,
    restart: impl FnOnce() + Send + 'static,
) -> Tally {
    let n = jobs_per_scenario();
    let run = rig
        .run(
            &format!("{part}-restart"),
            MIXED,
            ten_second_rate(),
            |settings, _| {
                for i in 0..idle_numbers {
                    let number = NumberSettings {
                        waba_id: WABA.into(),
                        throughput_mps: 80,
                        access_token: None,
                        access_token_file: None,
                    };
                    settings
                        .numbers
                        .insert((106_540_352_300_000 + i).to_string(), number);
                }
            },
        )
        .await;
    let ids = enqueue_jobs(&run.app, part, n).await;
    let (mut worker, ready) = rig.worker_with_health(&run.app);
    wait_sent(&run.app, n / 10).await;
    assert_eq!(ready.get().await, (200, None), "ready while it runs");
    let restarting = tokio::task::spawn_blocking(restart);
    ready.wait_for(503, part, "down").await;
    restarting.await.unwrap();
    let restarted = tokio::time::Instant::now();
    ready.wait_for(200, part, "up").await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "{scenario}: the worker lived through it by itself"
    );
    let simulator = run.app.simulator.clone();
    let already_done = ready.metric("wa_jobs_total", "already_done");
    let mut t = rig
        .settle_with(run, vec![worker], scenario, &ids, already_done)
        .await;
    let last = simulator.audit().accepted.iter().filter_map(|s| s.at).max();
    t.tail = last.map(|at| at.saturating_duration_since(restarted));
    t
}

/// Which RabbitMQ node of the cluster is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// The node a worker is connected to.
    Connected,
    /// The node leading the busiest lane queue.
    Leader,
}

/// How many jobs a cluster scenario sends: at least 5,000.
fn cluster_jobs() -> usize {
    jobs_per_scenario().max(5000)
}

/// A run on the clusters with two worker replicas, each with its health port.
async fn cluster_run(
    rig: &Rig,
    name: &str,
) -> (
    Run,
    BTreeSet<String>,
    Vec<tokio::process::Child>,
    Vec<Readiness>,
) {
    let n = cluster_jobs();
    let rate = (n / 20).clamp(50, 1000) as u32;
    let run = rig.run(name, MIXED, rate, |_, _| {}).await;
    let ids = enqueue_jobs(&run.app, name, n).await;
    let (mut workers, mut readiness) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let (worker, ready) = rig.worker_with_health(&run.app);
        workers.push(worker);
        readiness.push(ready);
    }
    (run, ids, workers, readiness)
}

/// The longest pause between two sends the simulator accepted from `since` on: how long the
/// sends stopped around a fault.
fn longest_pause(simulator: &Simulator, since: tokio::time::Instant) -> Duration {
    let mut times: Vec<tokio::time::Instant> = simulator
        .audit()
        .accepted
        .iter()
        .filter_map(|s| s.at)
        .filter(|at| *at >= since)
        .collect();
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// A RabbitMQ node killed with SIGKILL under two worker replicas, and started again a while
/// later: quorum queues keep every job on the other two nodes, the worker that used the node
/// moves to another (its `/readyz` says the broker was down, then up), nobody restarts anything.
async fn rabbit_node_lost(rig: &Rig, lost: Lost) -> Tally {
    let (scenario, name) = match lost {
        Lost::Connected => ("RabbitMQ node of a worker", "rabbit-connected"),
        Lost::Leader => ("RabbitMQ lane leader", "rabbit-leader"),
    };
    let (run, ids, workers, readiness) = cluster_run(rig, name).await;
    let cluster = rig.rabbit.cluster();
    wait_sent(&run.app, ids.len() / 5).await;
    let victim = match lost {
        Lost::Connected => {
            let node = readiness[0]
                .connected_node()
                .await
                .expect("the worker says which node it uses");
            cluster
                .nodes
                .iter()
                .position(|n| node.ends_with(&format!(":{}", n.port)))
                .expect("a node of the cluster")
        }
        Lost::Leader => {
            let prefix = format!("{}.send.", run.app.prefix);
            let leaders = cluster.nodes[0].ctl_output(&[
                "list_queues",
                "--quiet",
                "--no-table-headers",
                "name",
                "leader",
                "messages",
            ]);
            let busiest = leaders
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    (f.len() == 3 && f[0].starts_with(&prefix))
                        .then(|| (f[2].trim().parse::<u64>().unwrap_or(0), f[1].to_owned()))
                })
                .max()
                .expect("the run's lane queues");
            cluster
                .nodes
                .iter()
                .position(|n| n.name() == busiest.1)
                .expect("a node of the cluster")
        }
    };
    let killed = tokio::time::Instant::now();
    let node = &cluster.nodes[victim];
    tokio::task::block_in_place(|| node.kill());
    if lost == Lost::Connected {
        readiness[0].wait_for(503, "broker", "down").await;
        readiness[0].wait_for(200, "broker", "up").await;
    }
    wait_sent(&run.app, ids.len() * 3 / 5).await;
    tokio::task::block_in_place(|| node.restart_killed());
    let mut workers = workers;
    for worker in &mut workers {
        assert!(
            worker.try_wait().unwrap().is_none(),
            "{scenario}: a worker exited"
        );
    }
    let simulator = run.app.simulator.clone();
    let mut t = rig
        .settle_with(run, workers, scenario, &ids, async { None })
        .await;
    let pause = longest_pause(&simulator, killed);
    t.pause = Some(pause);
    t
}

/// The Redis master holding the portfolio's slot killed with SIGKILL under two worker
/// replicas: its replica takes over. Replication is asynchronous, so what the master
/// acknowledged last may be gone: the count says what that cost.
async fn redis_master_lost(rig: &Rig) -> Tally {
    let Stores::Cluster(redis) = rig.redis.as_ref() else {
        panic!("a Redis Cluster scenario ran on one Redis");
    };
    let (run, ids, workers, readiness) = cluster_run(rig, "redis-master").await;
    wait_sent(&run.app, ids.len() / 5).await;
    let master = redis.master_of(&format!("{{{WABA}}}"));
    let killed = tokio::time::Instant::now();
    tokio::task::block_in_place(|| redis.kill(master));
    // The cluster client follows the failover by itself; whether /readyz catches the moment
    // the slot had no master depends on timing, so it is only required to be ready after.
    wait_sent(&run.app, ids.len() * 3 / 5).await;
    readiness[0].wait_for(200, "redis", "up").await;
    tokio::task::block_in_place(|| {
        redis.restart(master);
        redis.await_healthy();
    });
    let mut workers = workers;
    for worker in &mut workers {
        assert!(
            worker.try_wait().unwrap().is_none(),
            "Redis failover: a worker exited"
        );
    }
    let simulator = run.app.simulator.clone();
    let mut t = rig
        .settle_with(run, workers, "Redis master lost", &ids, async { None })
        .await;
    t.pause = Some(longest_pause(&simulator, killed));
    t
}

/// 225 malformed jobs among good ones: each malformed one is dead-lettered once with a specific
/// detail, nothing of them is sent, and the worker goes on sending the good ones.
async fn malformed_jobs(rig: &Rig) -> Tally {
    let mut run = rig.run("malformed", MIXED, 1000, |_, _| {}).await;
    let app = &run.app;
    let bodies = malformed_bodies();
    for body in &bodies {
        let refused = wa_sender::job::decode(body).is_err();
        assert!(refused, "{}", String::from_utf8_lossy(body));
        app.enqueue(Lane::Bulk, body.clone()).await;
    }
    let good = enqueue_jobs(app, "good", 50).await;
    let mut worker = rig.process(app, "worker", &[]);
    wait_sent(app, good.len()).await;
    rig.wait_quiet(app, &["send.", "delay."], "malformed").await;
    let dead = app.take_all("dead.all").await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker is still running"
    );
    worker.kill().await.unwrap();
    run.webhook.kill().await.unwrap();

    let good_tally = tally("malformed", &good, app, &[]);
    assert_eq!(good_tally.once, good.len(), "every good job sent once");
    let mut t = Tally {
        scenario: "malformed jobs",
        shape: run.shape.label(),
        jobs: bodies.len(),
        twice: app.simulator.audit().accepted.len() - good.len(),
        closes: channel_closes(&rig.log(app, "worker")),
        ..Tally::default()
    };
    for body in &bodies {
        let letters: Vec<&Taken> = dead.iter().filter(|l| &l.body == body).collect();
        match letters.as_slice() {
            [] => t.lost += 1,
            [letter] => {
                let detail = letter.headers.get("x-wa-detail").cloned();
                assert!(
                    detail.is_some_and(|d| !d.is_empty()),
                    "a specific detail for {}: {letter:?}",
                    String::from_utf8_lossy(body)
                );
                *t.dead.entry(reason(letter)).or_default() += 1;
            }
            _ => t.contradictory += 1,
        }
    }
    app.simulator.stop();
    t
}

/// 25 kinds of broken job, 9 of each (each body unique).
fn malformed_bodies() -> Vec<Vec<u8>> {
    let valid = |i: usize| text_job(&format!("bad-{i}"));
    let with = |i: usize, edit: &dyn Fn(&mut Value)| {
        let mut job = valid(i);
        edit(&mut job);
        serde_json::to_vec(&job).unwrap()
    };
    let kinds: Vec<Box<dyn Fn(usize) -> Vec<u8>>> = vec![
        Box::new(|i| format!("not json {i}").into_bytes()),
        Box::new(|i| format!("{{\"schema\":\"wa.send.v1\",\"job_id\":\"cut-{i}\"").into_bytes()),
        Box::new(|i| [b"\xff\xfe\x00".as_slice(), i.to_string().as_bytes()].concat()),
        Box::new(|i| format!("[{i}]").into_bytes()),
        Box::new(|i| format!("\"job {i}\"").into_bytes()),
        Box::new(|i| format!("{i}").into_bytes()),
        Box::new(|i| format!("{{\"n\":{i}}}").into_bytes()),
        Box::new(move |i| with(i, &|j| j["schema"] = json!("wa.send.v0"))),
        Box::new(move |i| with(i, &|j| drop(j.as_object_mut().unwrap().remove("schema")))),
        Box::new(move |i| with(i, &|j| drop(j.as_object_mut().unwrap().remove("job_id")))),
        Box::new(move |i| with(i, &|j| j["job_id"] = json!(i))),
        Box::new(move |i| with(i, &|j| j["job_id"] = json!(""))),
        Box::new(move |i| {
            let body = String::from_utf8(with(i, &|_| {})).unwrap();
            body.replacen('{', &format!("{{\"job_id\":\"twice-{i}\","), 1)
                .into_bytes()
        }),
        Box::new(move |i| {
            let body = String::from_utf8(with(i, &|_| {})).unwrap();
            body.replacen(
                '{',
                "{\"message\":{\"type\":\"text\",\"text\":{\"body\":\"first\"}},",
                1,
            )
            .into_bytes()
        }),
        Box::new(move |i| with(i, &|j| j["to"] = json!(format!("+49abc{i}")))),
        Box::new(move |i| with(i, &|j| j["to"] = json!(format!("+49 1512 3456{i:03}")))),
        Box::new(move |i| with(i, &|j| drop(j.as_object_mut().unwrap().remove("to")))),
        Box::new(move |i| with(i, &|j| drop(j.as_object_mut().unwrap().remove("message")))),
        Box::new(move |i| with(i, &|j| j["message"]["type"] = json!("hologram"))),
        Box::new(move |i| with(i, &|j| j["message"]["text"] = json!({}))),
        Box::new(move |i| {
            with(
                i,
                &|j| {
                    j["message"] =
                        json!({"type": "template", "template": {"language": {"code": "en_US"}}})
                },
            )
        }),
        Box::new(move |i| with(i, &|j| j["not_before"] = json!("tomorrow"))),
        Box::new(move |i| with(i, &|j| j["phone_number_id"] = json!("not-a-number"))),
        Box::new(move |i| with(i, &|j| j["message"] = json!("hello"))),
        Box::new(|i| format!("null {i}").into_bytes()),
    ];
    (0..9)
        .flat_map(|i| kinds.iter().map(move |kind| kind(i)))
        .collect()
}

/// The webhook process under 100 forged and 100 signed-but-broken bodies beside 20 good ones,
/// then a slow-client attack and a SIGTERM: forged ones are refused, broken ones parked each
/// with its reason, good ones become events, and the process stops within its grace period.
async fn webhooks(rig: &Rig) -> Tally {
    let mut app = rig.app("webhooks", |_, _| {}).await;
    let port = free_port();
    let mut process = rig.webhook_process(&app, port).await;
    let url = format!("http://127.0.0.1:{port}/webhook");
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>, signature: Option<String>| {
        let mut request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = signature {
            request = request.header("x-hub-signature-256", s);
        }
        request.send()
    };
    let sign = |body: &[u8]| wa_sender::simulator::sign(APP_SECRET, body);

    let mut t = Tally {
        scenario: "webhooks: forged, broken, slow",
        ..Tally::default()
    };
    // Forged: another secret, no signature, a malformed one, one made for another body.
    for i in 0..100 {
        let body = inbound(i);
        let signature = match i % 4 {
            0 => Some(wa_sender::simulator::sign("not-the-secret", &body)),
            1 => None,
            2 => Some(format!("sha256=zz{i}")),
            _ => Some(sign(&inbound(i + 1000))),
        };
        let status = post(body, signature).await.unwrap().status();
        *t.dead
            .entry(format!("refused {}", status.as_u16()))
            .or_default() += 1;
        t.jobs += 1;
        if status.is_success() {
            t.contradictory += 1;
        }
    }
    // Signed, but broken: each is taken (Meta must not retry it) and parked with its reason.
    let broken = broken_webhooks();
    for body in &broken {
        let status = post(body.clone(), Some(sign(body))).await.unwrap().status();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    }
    // Good ones, among them.
    for i in 0..20 {
        let body = inbound(i);
        let status = post(body.clone(), Some(sign(&body)))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    rig.wait_quiet(&app, &["webhooks.intake"], "webhooks").await;
    // Each broken body has one unreadable part: one parked message each, with its reason.
    let parked = app.take_all("webhooks.parked").await;
    for part in &parked {
        assert!(part.headers.contains_key("x-wa-reason"), "{part:?}");
    }
    t.jobs += broken.len();
    t.dead
        .insert("parked".into(), parked.len().min(broken.len()));
    t.lost += broken.len().saturating_sub(parked.len());
    t.twice += parked.len().saturating_sub(broken.len());
    let events = drain_events(&mut app).await;
    let inbound_events = events
        .iter()
        .filter(|e| e.event == "inbound.message")
        .count();
    assert_eq!(inbound_events, 20, "one event per good body: {events:?}");
    assert_eq!(events.len(), 20, "no event from a forged or broken body");
    t.jobs += 20;
    t.once += inbound_events;

    // A slow-client attack: half a body, half the headers, on hundreds of connections.
    let mut held = Vec::new();
    for i in 0..250 {
        held.push(half_a_request(port, i % 5 == 0).await);
    }
    let body = inbound(500);
    let served = post(body.clone(), Some(sign(&body)))
        .await
        .unwrap()
        .status();
    assert_eq!(served, 200, "a good client is served during the attack");
    let stopping = Instant::now();
    common::signal(&process, "TERM");
    let exit = tokio::time::timeout(Duration::from_secs(30), process.wait())
        .await
        .expect("the webhook process stops although clients hold connections")
        .unwrap();
    let took = stopping.elapsed();
    assert!(exit.success(), "{exit:?}");
    // The receiver's grace period is 10 s; what is left then is closed.
    assert!(
        took < Duration::from_secs(15),
        "SIGTERM to exit took {took:?} under a slow-client attack"
    );
    drop(held);
    app.simulator.stop();
    t
}

impl Rig {
    /// A worker process with its health port where the test can see it.
    fn worker_with_health(&self, app: &TestApp) -> (tokio::process::Child, Readiness) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let worker = self.process_with(
            app,
            "worker",
            &[],
            &[("WA_SENDER__WORKER__HEALTH_LISTEN", &listen)],
        );
        (worker, Readiness(format!("http://{listen}/readyz")))
    }
}

/// A process's `/readyz`.
struct Readiness(String);

impl Readiness {
    /// The RabbitMQ node (`host:port`) the process says it is connected to, from its metrics.
    async fn connected_node(&self) -> Option<String> {
        let url = self.0.replace("/readyz", "/metrics");
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        text.lines()
            .filter(|l| l.starts_with("wa_broker_node{") && l.ends_with(" 1"))
            .find_map(|l| Some(l.split_once("node=\"")?.1.split_once('"')?.0.to_owned()))
    }

    /// The sum of a counter's series whose labels include `label` (as `"<label>"`), from the
    /// same process's `/metrics`; `None` if it does not answer.
    async fn metric(&self, name: &str, label: &str) -> Option<u64> {
        let url = self.0.replace("/readyz", "/metrics");
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let quoted = format!("\"{label}\"");
        Some(
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains(&quoted))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }

    /// The status and, if it answered, the JSON body.
    async fn get(&self) -> (u16, Option<Value>) {
        match reqwest::get(&self.0).await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                (status, (status != 200).then_some(body))
            }
            Err(_) => (0, None),
        }
    }

    /// Waits (30 s at most) until `/readyz` answers `status` with `part` as `state`.
    async fn wait_for(&self, status: u16, part: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = match reqwest::get(&self.0).await {
                Ok(r) => (r.status().as_u16(), r.json::<Value>().await.unwrap()),
                Err(e) => (0, json!(e.to_string())),
            };
            if code == status && body[part] == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {status} with {part} {state}: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a connection and sends half a request: its headers and half its body, or half its
/// headers.
async fn half_a_request(port: u16, half_headers: bool) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let head: &[u8] = if half_headers {
        b"POST /webhook HTTP/1.1\r\nhost:"
    } else {
        b"POST /webhook HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          x-hub-signature-256: sha256=00\r\ncontent-length: 400\r\n\r\n{\"object\":"
    };
    stream.write_all(head).await.unwrap();
    stream
}

/// Every event published until none arrives for two seconds.
async fn drain_events(app: &mut TestApp) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_secs(2), app.events.next()).await
    {
        events.push(event.unwrap());
    }
    events
}

/// A user's text message to the test number, as Meta posts it.
fn inbound(i: usize) -> Vec<u8> {
    let from = format!("1650555{i:04}");
    let message = json!({"from": from, "id": format!("wamid.fault-{i}"), "timestamp": "1750000000",
                         "type": "text", "text": {"body": "Is my order on its way?"}});
    envelope(
        json!({"contacts": [{"profile": {"name": "Sam"}, "wa_id": from}], "messages": [message]}),
    )
}

/// 100 signed bodies the processor cannot use: 10 kinds, 10 of each, each with one unreadable
/// part.
fn broken_webhooks() -> Vec<Vec<u8>> {
    let status = |i: usize, value: &str| {
        json!({"id": format!("wamid.broken-{i}"), "status": value, "timestamp": "1750000000",
               "recipient_id": "16505551234"})
    };
    let kinds: Vec<Box<dyn Fn(usize) -> Vec<u8>>> = vec![
        Box::new(|i| format!("not json {i}").into_bytes()),
        Box::new(|i| format!("[{i}]").into_bytes()),
        Box::new(|i| {
            format!("{{\"object\":\"whatsapp_business_account\",\"n\":{i}}}").into_bytes()
        }),
        Box::new(|i| envelope(json!({"statuses": format!("x{i}")}))),
        Box::new(move |i| envelope(json!({"statuses": [status(i, "teleported")]}))),
        Box::new(move |i| envelope(json!({"statuses": [status(i, "")]}))),
        Box::new(|i| envelope(json!({"messages": format!("m{i}")}))),
        Box::new(|i| {
            serde_json::to_vec(&json!({"object": "whatsapp_business_account",
                "entry": [{"id": common::WABA, "changes": [{"field": "messages", "value": null, "n": i}]}]}))
            .unwrap()
        }),
        Box::new(|i| {
            serde_json::to_vec(&json!({"object": "whatsapp_business_account",
                "entry": [{"id": common::WABA, "changes": [{"field": "group_lifecycle_update",
                    "value": {"messaging_product": "whatsapp", "groups": [{"group_id": format!("g{i}"), "type": "group_create"}]}}]}]}))
            .unwrap()
        }),
        Box::new(|i| {
            serde_json::to_vec(
                &json!({"object": "whatsapp_business_account", "entry": format!("e{i}")}),
            )
            .unwrap()
        }),
    ];
    (0..10)
        .flat_map(|i| kinds.iter().map(move |kind| kind(i)))
        .collect()
}
