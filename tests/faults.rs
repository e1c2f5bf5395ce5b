//! The fault suite: every fault the worker and the webhook process must live through, run against
//! a RabbitMQ node and a Redis of the suite's own (own ports, own data: the shared services and
//! the tests running beside it are never touched), with the real `wa-sender` binary and real
//! signals, one scenario after another. Each scenario ends with a count per job: sent once,
//! ambiguous (a send whose outcome the worker could not know, dead-lettered `ambiguous_send`
//! rather than risking a second copy), dead-lettered for a reason, sent twice (simulator audit),
//! lost. Every scenario must end with 0 sent twice and 0 lost; the suite prints the table.
//!
//! `cargo test` runs the short form (`FAULT_JOBS`, default 1,000 jobs per scenario); the full
//! one: `FAULT_JOBS=20000 cargo test --release --test faults -- --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::{RabbitNode, RedisNode, free_port};
use common::webhook_envelope as envelope;
use common::{Taken, TestApp, spawn_app, text_job};
use futures::StreamExt;
use serde_json::{Value, json};
use wa_sender::broker::rabbit::QueueType;
use wa_sender::config::Settings;
use wa_sender::event::Event;
use wa_sender::job::Lane;
use wa_sender::simulator::{Latency, Scenario};

const APP_SECRET: &str = "fault-suite-app-secret";

fn jobs_per_scenario() -> usize {
    std::env::var("FAULT_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_suite_loses_nothing_and_sends_nothing_twice() {
    let rig = Rig::start();
    let tallies = vec![
        kills(&rig).await,
        cloud_faults(&rig).await,
        broker_restart(&rig).await,
        redis_restart(&rig).await,
        malformed_jobs(&rig).await,
        webhooks(&rig).await,
    ];
    println!("\n{}", table(&tallies));
    for t in &tallies {
        assert_eq!(
            (t.twice, t.lost, t.contradictory),
            (0, 0, 0),
            "{}: sent twice, lost, contradictory (logs in {})",
            t.scenario,
            rig.logs.display()
        );
    }
}

/// What became of each job (or request) of one scenario.
#[derive(Debug, Default)]
struct Tally {
    scenario: &'static str,
    jobs: usize,
    once: usize,
    ambiguous: usize,
    /// Dead-lettered (or, for webhooks, refused or parked), by reason.
    dead: BTreeMap<String, usize>,
    twice: usize,
    lost: usize,
    /// Sent, and also dead-lettered for a reason other than ambiguity.
    contradictory: usize,
}

fn table(tallies: &[Tally]) -> String {
    let mut out = format!(
        "{:<34} {:>7} {:>7} {:>9} {:>7} {:>7} {:>5}  dead letters (or refusals) by reason\n",
        "scenario", "jobs", "once", "ambiguous", "dead", "twice", "lost"
    );
    for t in tallies {
        let reasons: Vec<String> = t.dead.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let row = format!(
            "{:<34} {:>7} {:>7} {:>9} {:>7} {:>7} {:>5}  {}",
            t.scenario,
            t.jobs,
            t.once,
            t.ambiguous,
            t.dead.values().sum::<usize>(),
            t.twice,
            t.lost,
            reasons.join(", ")
        );
        out += row.trim_end();
        out.push('\n');
    }
    out
}

/// The suite's own RabbitMQ node and Redis, and where the processes it starts write their logs.
struct Rig {
    rabbit: Arc<RabbitNode>,
    redis: Arc<RedisNode>,
    logs: PathBuf,
}

impl Rig {
    fn start() -> Rig {
        let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults");
        std::fs::create_dir_all(&logs).unwrap();
        Rig {
            rabbit: Arc::new(RabbitNode::start("faults")),
            redis: Arc::new(RedisNode::start("faults")),
            logs,
        }
    }

    /// A test app on the suite's broker (quorum queues, as in production) and Redis.
    async fn app(&self, name: &str, tweak: impl FnOnce(&mut Settings, &mut Scenario)) -> TestApp {
        let (amqp, redis) = (self.rabbit.url(), self.redis.url());
        spawn_app(name, move |settings, sim| {
            settings.amqp.url = amqp;
            settings.amqp.queue_type = QueueType::Quorum;
            settings.redis.url = redis;
            tweak(settings, sim);
        })
        .await
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
            .open(self.logs.join(format!("{}.log", app.prefix)))
            .unwrap();
        let mut command = app.command(subcommand);
        command.args(args).stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        command.spawn().expect("the wa-sender binary starts")
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

    /// Once every job of `ids` has an end (sent, or a dead letter) and none is left in a send
    /// or delay queue, ready or held, twice a second apart (or after five minutes, whatever
    /// is left counted as lost): what became of each.
    async fn settle(&self, app: &TestApp, scenario: &'static str, ids: &BTreeSet<String>) -> Tally {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut quiet = 0;
        while quiet < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sent: BTreeSet<String> = app
                .simulator
                .audit()
                .accepted
                .into_iter()
                .filter_map(|s| s.job_id)
                .collect();
            let queued = self.queued(app, &["send.", "delay."]).await;
            let dead = self.queued(app, &["dead.all"]).await;
            let ended = sent.intersection(ids).count() as u64 + dead >= ids.len() as u64;
            quiet = if ended && queued == 0 { quiet + 1 } else { 0 };
        }
        let dead = app.take_all("dead.all").await;
        tally(scenario, ids, app, &dead)
    }
}

/// Counts each job of `ids` by what the simulator accepted and what was dead-lettered.
fn tally(scenario: &'static str, ids: &BTreeSet<String>, app: &TestApp, dead: &[Taken]) -> Tally {
    let mut sent: BTreeMap<String, usize> = BTreeMap::new();
    for send in app.simulator.audit().accepted {
        if let Some(id) = send.job_id {
            *sent.entry(id).or_default() += 1;
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
            Some(r) if r.iter().any(|r| r == "ambiguous_send") => t.ambiguous += 1,
            Some(_) if times == 1 => t.contradictory += 1,
            Some(r) => *t.dead.entry(r[0].clone()).or_default() += 1,
            None if times == 1 => t.once += 1,
            None => t.lost += 1,
        }
    }
    t
}

fn reason(letter: &Taken) -> String {
    letter
        .headers
        .get("x-wa-reason")
        .cloned()
        .unwrap_or_else(|| panic!("a dead letter without a reason: {letter:?}"))
}

/// Enqueues `count` replies (free-form jobs to users who have just written) named `<name>-<i>`.
async fn enqueue_jobs(app: &TestApp, name: &str, count: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..count {
        let id = format!("{name}-{i}");
        app.enqueue_reply(Lane::Bulk, &text_job(&id)).await;
        ids.insert(id);
    }
    ids
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

/// A rate that keeps a scenario's jobs flowing for about ten seconds, so a fault lands mid-run.
fn ten_second_rate() -> u32 {
    (jobs_per_scenario() / 10).clamp(50, 1000) as u32
}

/// Ten SIGKILLs of a worker mid-run, each followed by a new one: no drain, no acks, claims
/// left behind, sends cut off in flight.
async fn kills(rig: &Rig) -> Tally {
    let n = jobs_per_scenario();
    let app = rig
        .app("kills", |settings, sim| {
            common::limit_number(settings, sim, ten_second_rate());
            sim.faults.latency = Latency {
                median_ms: 20.0,
                p99_ms: 80.0,
            };
        })
        .await;
    let ids = enqueue_jobs(&app, "kill", n).await;
    let mut worker = rig.process(&app, "worker", &[]);
    for kill in 1..=10 {
        // Each worker gets going before it is killed: some sends of its own, and further along.
        let sent = app.simulator.audit().accepted.len();
        wait_sent(&app, (sent + n / 100).max(kill * n / 12)).await;
        worker.kill().await.unwrap();
        worker = rig.process(&app, "worker", &[]);
    }
    let tally = rig.settle(&app, "10 SIGKILLs of a worker", &ids).await;
    worker.kill().await.unwrap();
    app.simulator.stop();
    tally
}

/// 20 % of sends answered 500 (Meta's transient 131016) and 5 % sent but answered only after
/// the worker's request timeout.
async fn cloud_faults(rig: &Rig) -> Tally {
    let app = rig
        .app("cloud-faults", |_, sim| {
            sim.faults.transient_share = 0.20;
            sim.faults.timeout_share = 0.05;
            sim.faults.timeout_ms = 2_000;
        })
        .await;
    let ids = enqueue_jobs(&app, "cloud", jobs_per_scenario()).await;
    let mut worker = rig.process(&app, "worker", &[]);
    let tally = rig.settle(&app, "20% 5xx + 5% timeouts", &ids).await;
    worker.kill().await.unwrap();
    app.simulator.stop();
    tally
}

/// RabbitMQ restarted (`stop_app`, `start_app`) under a running worker that nobody restarts; its
/// readiness says the broker is down until it consumes again.
async fn broker_restart(rig: &Rig) -> Tally {
    let rabbit = Arc::clone(&rig.rabbit);
    restart_under_worker(rig, "RabbitMQ restart", "broker", move || rabbit.restart()).await
}

/// Redis (with its append-only file) restarted, two seconds away, under a running worker, whose
/// readiness names Redis as down meanwhile.
async fn redis_restart(rig: &Rig) -> Tally {
    let redis = Arc::clone(&rig.redis);
    restart_under_worker(rig, "Redis restart", "redis", move || {
        redis.restart(Duration::from_secs(2))
    })
    .await
}

/// Runs `restart` a tenth of the way into a run of one worker process, which must live through
/// it by itself, its `/readyz` naming `part` down meanwhile and up again after.
async fn restart_under_worker(
    rig: &Rig,
    scenario: &'static str,
    part: &str,
    restart: impl FnOnce() + Send + 'static,
) -> Tally {
    let n = jobs_per_scenario();
    let app = rig
        .app(&format!("{part}-restart"), |settings, sim| {
            common::limit_number(settings, sim, ten_second_rate())
        })
        .await;
    let ids = enqueue_jobs(&app, part, n).await;
    let (mut worker, ready) = rig.worker_with_health(&app);
    wait_sent(&app, n / 10).await;
    assert_eq!(ready.get().await, (200, None), "ready while it runs");
    let restarting = tokio::task::spawn_blocking(restart);
    ready.wait_for(503, part, "down").await;
    restarting.await.unwrap();
    ready.wait_for(200, part, "up").await;
    let tally = rig.settle(&app, scenario, &ids).await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "{scenario}: the worker lived through it by itself"
    );
    worker.kill().await.unwrap();
    app.simulator.stop();
    tally
}

/// 225 malformed jobs among good ones: each malformed one is dead-lettered once with a specific
/// detail, nothing of them is sent, and the worker goes on sending the good ones.
async fn malformed_jobs(rig: &Rig) -> Tally {
    let app = rig.app("malformed", |_, _| {}).await;
    let bodies = malformed_bodies();
    for body in &bodies {
        let refused = wa_sender::job::decode(body).is_err();
        assert!(refused, "{}", String::from_utf8_lossy(body));
        app.enqueue(Lane::Bulk, body.clone()).await;
    }
    let good = enqueue_jobs(&app, "good", 50).await;
    let mut worker = rig.process(&app, "worker", &[]);
    rig.wait_quiet(&app, &["send.", "delay."], "malformed")
        .await;
    let dead = app.take_all("dead.all").await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker is still running"
    );
    worker.kill().await.unwrap();

    let good_tally = tally("malformed", &good, &app, &[]);
    assert_eq!(good_tally.once, good.len(), "every good job sent once");
    let mut t = Tally {
        scenario: "malformed jobs",
        jobs: bodies.len(),
        twice: app.simulator.audit().accepted.len() - good.len(),
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
    let listen = format!("127.0.0.1:{port}");
    let mut process = rig.process_with(
        &app,
        "webhook",
        &["--listen", &listen],
        &[
            ("WA_SENDER__WEBHOOK__APP_SECRET", APP_SECRET),
            ("WA_SENDER__WEBHOOK__VERIFY_TOKEN", "fault-suite-verify"),
        ],
    );
    wait_port(port).await;
    let url = format!("http://{listen}/webhook");
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
    let pid = process.id().expect("running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
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
    while let Ok(Some(tapped)) =
        tokio::time::timeout(Duration::from_secs(2), app.events.next()).await
    {
        let tapped = tapped.unwrap();
        events.push(serde_json::from_slice(&tapped.envelope.body).unwrap());
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
