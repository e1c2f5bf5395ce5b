//! `spawn_app()`: one isolated wa-sender per test (unique queue prefix, unique Redis key
//! prefix, its own simulator on port 0) against the real RabbitMQ and Redis.
#![allow(dead_code, unreachable_pub)]

pub mod node;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wa_sender::app::WorkerApp;
use wa_sender::broker::rabbit::RabbitBroker;
use wa_sender::broker::{Broker, BrokerError, Stream, Tap, Tapped, tapped_events};
use wa_sender::config::{Number, Runtime, Settings};
use wa_sender::event::Event;
use wa_sender::health::Health;
use wa_sender::ids::{PhoneNumberId, WaId, WabaId};
use wa_sender::job::Lane;
use wa_sender::policy::admission::Mark;
use wa_sender::simulator::{Scenario, Simulator};
use wa_sender::store::Store;
use wa_sender::store::redis::RedisStore;
use wa_sender::worker::Drained;

pub const NUMBER: &str = "106540352242922";
pub const WABA: &str = "102290129340398";
pub const TOKEN: &str = "test-token";

/// Settings for a test: config/default.toml + config/test.toml + a unique prefix.
pub fn settings(prefix: &str, simulator_url: &str) -> Settings {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let figment = Figment::new()
        .merge(Toml::file(format!("{dir}/default.toml")))
        .merge(Toml::file(format!("{dir}/test.toml")))
        .merge(Serialized::default("amqp.prefix", prefix))
        .merge(Serialized::default("redis.key_prefix", prefix))
        .merge(Serialized::default("cloud.base_url", simulator_url))
        .merge(Serialized::default("cloud.access_token", TOKEN))
        .merge(Serialized::default(
            &format!("numbers.{NUMBER}.waba_id"),
            WABA,
        ))
        .merge(Serialized::default(
            &format!("numbers.{NUMBER}.throughput_mps"),
            1000,
        ))
        // Tests about other things must not run into a new portfolio's 250 users a day.
        .merge(Serialized::default(
            "policy.messaging_limits",
            json!({"default": "unlimited"}),
        ));
    Settings::from_figment(figment).expect("test settings are valid")
}

/// Limits the test number to `mps` on both sides: the worker's configuration and Meta's.
pub fn limit_number(settings: &mut Settings, scenario: &mut Scenario, mps: u32) {
    settings
        .numbers
        .get_mut(NUMBER)
        .expect("the test number")
        .throughput_mps = mps;
    scenario.numbers[0].throughput_mps = Some(mps);
}

pub fn unique_prefix(test: &str) -> String {
    format!(
        "t-{test}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A message taken off a queue: its headers (strings as they are, others debug-printed) and body.
#[derive(Debug, Clone)]
pub struct Taken {
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

pub struct TestApp {
    pub prefix: String,
    pub settings: Settings,
    pub broker: Arc<RabbitBroker>,
    pub store: Arc<RedisStore>,
    pub simulator: Simulator,
    /// Every event published, one by one (a message holds several).
    pub events: Stream<Event>,
    pub dead: Stream<Tapped>,
    pub seen: Vec<Event>,
    workers: Vec<(CancellationToken, JoinHandle<Result<Drained, BrokerError>>)>,
    /// Each running worker's readiness, in start order.
    pub health: Vec<Health>,
}

/// Connects to the real RabbitMQ and Redis with a unique prefix, starts a simulator, and taps
/// events and dead letters. Panics with the start command if a service is down.
pub async fn spawn_app(test: &str, tweak: impl FnOnce(&mut Settings, &mut Scenario)) -> TestApp {
    let mut sim_config = Scenario::single(NUMBER, WABA, TOKEN);
    sim_config.numbers[0].throughput_mps = Some(1000);
    // Free-form test jobs go to users who have just written, as they would in production.
    sim_config.unknown_users.window_open = true;
    let prefix = unique_prefix(test);
    let mut settings = settings(&prefix, "http://placeholder");
    tweak(&mut settings, &mut sim_config);
    let simulator = Simulator::start(sim_config, "127.0.0.1:0")
        .await
        .expect("simulator starts");
    settings.cloud.base_url = simulator.base_url();
    let runtime = settings.runtime().expect("test settings are valid");
    let (broker, store) = match wa_sender::app::connect(&runtime).await {
        Ok(parts) => parts,
        Err(e) => panic!("integration tests need RabbitMQ and Redis on 127.0.0.1: {e:#}"),
    };
    let events = tapped_events(broker.tap(Tap::Events).await.unwrap());
    let dead = broker.tap(Tap::Dead).await.unwrap();
    TestApp {
        prefix,
        settings,
        broker,
        store,
        simulator,
        events,
        dead,
        seen: Vec::new(),
        workers: Vec::new(),
        health: Vec::new(),
    }
}

pub fn numbers() -> BTreeMap<PhoneNumberId, Number> {
    BTreeMap::from([(
        PhoneNumberId::parse(NUMBER).unwrap(),
        Number {
            waba: WabaId::parse(WABA).unwrap(),
            throughput_mps: 1000,
            token: SecretString::from(TOKEN),
        },
    )])
}

/// The recipient of a test job: one per job id, so Meta's pair rate (one message per 6 s to the
/// same user) does not pace tests that are about something else.
pub fn recipient(job_id: &str) -> String {
    let n = job_id
        .bytes()
        .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!("+1650{:07}", n % 10_000_000)
}

/// A signed-webhook body as Meta posts it for the test number: `value`'s fields inside the
/// `messages` change's value, beside `messaging_product` and `metadata`.
pub fn webhook_envelope(value: Value) -> Vec<u8> {
    let mut inner = json!({"messaging_product": "whatsapp",
                           "metadata": {"display_phone_number": "15550783881", "phone_number_id": NUMBER}});
    for (k, v) in value.as_object().expect("an object") {
        inner[k] = v.clone();
    }
    serde_json::to_vec(&json!({"object": "whatsapp_business_account",
                               "entry": [{"id": WABA, "changes": [{"field": "messages", "value": inner}]}]}))
    .unwrap()
}

pub fn job(job_id: &str, message: Value) -> Value {
    json!({"schema": "wa.send.v1", "job_id": job_id, "phone_number_id": NUMBER, "to": recipient(job_id), "message": message,
           "campaign_id": "c-1", "metadata": {"order": 42, "job": job_id}})
}

pub fn text_job(job_id: &str) -> Value {
    job(
        job_id,
        json!({"type": "text", "text": {"body": "Your order has shipped"}}),
    )
}

fn job_to(job: &Value) -> WaId {
    WaId::parse(job["to"].as_str().expect("job has a recipient")).unwrap()
}

/// Records an inbound message from the job's recipient, as the webhook processor would.
pub async fn user_wrote(store: &dyn Store, job: &Value) {
    store
        .record_inbound(
            &WabaId::parse(WABA).unwrap(),
            &PhoneNumberId::parse(NUMBER).unwrap(),
            &job_to(job),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
}

/// Records an opt-in for the job's recipient.
pub async fn opted_in(store: &dyn Store, job: &Value) {
    let mark = Mark {
        at: chrono::Utc::now(),
        source: "test".into(),
    };
    store
        .record_opt_ins(&WabaId::parse(WABA).unwrap(), &[(job_to(job), mark)])
        .await
        .unwrap();
}

impl TestApp {
    /// This app's settings as its processes are built from them (after the test's changes).
    pub fn runtime(&self) -> Runtime {
        self.settings.runtime().expect("test settings are valid")
    }

    /// The `wa-sender` binary (or `$WA_SENDER_BIN`) running `subcommand` with this app's
    /// configuration in its environment (prefix, broker, Redis, simulator, the test number), as an operator would
    /// configure it; killed when dropped.
    pub fn command(&self, subcommand: &str) -> tokio::process::Command {
        let queue_type = serde_json::to_value(self.settings.amqp.queue_type).unwrap();
        // WA_SENDER_BIN runs the tests against another build (an older one, to see a test fail
        // on the code it was written against).
        let binary = std::env::var("WA_SENDER_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wa-sender").to_owned());
        let mut command = tokio::process::Command::new(binary);
        command
            .arg(subcommand)
            .env(
                "WA_SENDER_CONFIG_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
            )
            .env("WA_SENDER_ENV", "test")
            .env("WA_SENDER__AMQP__URL", &self.settings.amqp.url)
            .env("WA_SENDER__AMQP__QUEUE_TYPE", queue_type.as_str().unwrap())
            .env("WA_SENDER__AMQP__PREFIX", &self.prefix)
            .env(
                "WA_SENDER__AMQP__DELIVERY_LIMIT",
                self.settings.amqp.delivery_limit.to_string(),
            )
            .env(
                "WA_SENDER__AMQP__EVENTS_KEPT",
                self.settings.amqp.events_kept.to_string(),
            )
            .env("WA_SENDER__REDIS__URL", &self.settings.redis.url)
            .env("WA_SENDER__REDIS__KEY_PREFIX", &self.prefix)
            .env("WA_SENDER__CLOUD__BASE_URL", self.simulator.base_url())
            .env("WA_SENDER__CLOUD__ACCESS_TOKEN", TOKEN)
            .env(
                "WA_SENDER__WORKER__CONCURRENCY",
                self.settings.worker.concurrency.to_string(),
            )
            .env(
                "WA_SENDER__WORKER__PREFETCH",
                self.settings.worker.prefetch.to_string(),
            )
            .env("WA_SENDER__POLICY__MESSAGING_LIMITS__DEFAULT", "unlimited")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        // A cluster's nodes, as an operator would list them.
        let list = |urls: &[String]| serde_json::to_string(urls).unwrap();
        if !self.settings.amqp.urls.is_empty() {
            command.env("WA_SENDER__AMQP__URLS", list(&self.settings.amqp.urls));
        }
        if !self.settings.redis.cluster_urls.is_empty() {
            command.env(
                "WA_SENDER__REDIS__CLUSTER_URLS",
                list(&self.settings.redis.cluster_urls),
            );
        }
        for (id, number) in &self.settings.numbers {
            command
                .env(
                    format!("WA_SENDER__NUMBERS__{id}__WABA_ID"),
                    &number.waba_id,
                )
                .env(
                    format!("WA_SENDER__NUMBERS__{id}__THROUGHPUT_MPS"),
                    number.throughput_mps.to_string(),
                );
        }
        command
    }

    /// Runs `wa-sender <args>` with this app's configuration; its stdout, parsed as JSON.
    pub async fn run_json(&self, args: &[&str]) -> Value {
        let output = self
            .command(args[0])
            .args(&args[1..])
            .stdout(std::process::Stdio::piped())
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "wa-sender {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON on stdout")
    }

    /// Everything in the queue `name` (under this app's prefix), taken off it.
    pub async fn take_all(&self, name: &str) -> Vec<Taken> {
        take_all(&self.settings.amqp.url, &format!("{}.{name}", self.prefix)).await
    }

    pub fn start_worker(&mut self) {
        let (broker, store) = (self.broker.clone(), self.store.clone());
        self.run_worker(broker, store);
    }

    /// Starts one more replica with its own RabbitMQ and Redis connections, as a separate
    /// process would have.
    pub async fn start_replica(&mut self) {
        let (broker, store) = wa_sender::app::connect(&self.runtime()).await.unwrap();
        self.run_worker(broker, store);
    }

    fn run_worker(&mut self, broker: Arc<RabbitBroker>, store: Arc<RedisStore>) {
        let worker = WorkerApp::with_parts(&self.runtime(), broker, store).unwrap();
        let health = worker.health();
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(worker.run_until_stopped(shutdown.clone()));
        self.workers.push((shutdown, worker));
        self.health.push(health);
    }

    /// Stops every worker; returns how the first one drained.
    pub async fn stop_worker(&mut self) -> Drained {
        for (shutdown, _) in &self.workers {
            shutdown.cancel();
        }
        let mut first = None;
        self.health.clear();
        for (_, worker) in self.workers.drain(..) {
            let drained = worker.await.unwrap().expect("worker drains");
            first.get_or_insert(drained);
        }
        first.expect("a worker was running")
    }

    pub async fn enqueue(&self, lane: Lane, body: impl Into<Vec<u8>>) {
        wa_sender::app::enqueue(self.broker.as_ref(), lane, body.into())
            .await
            .unwrap();
    }

    pub async fn enqueue_json(&self, lane: Lane, job: &Value) {
        self.enqueue(lane, serde_json::to_vec(job).unwrap()).await;
    }

    /// The job's recipient has just written to the number: its care window is open.
    pub async fn user_wrote(&self, job: &Value) {
        user_wrote(self.store.as_ref(), job).await;
    }

    /// The job's recipient opted in (so business-initiated templates may go).
    pub async fn opted_in(&self, job: &Value) {
        opted_in(self.store.as_ref(), job).await;
    }

    /// Enqueues a reply: a free-form job to a user who has just written.
    pub async fn enqueue_reply(&self, lane: Lane, job: &Value) {
        self.user_wrote(job).await;
        self.enqueue_json(lane, job).await;
    }

    /// Waits until the simulator has accepted every job of `ids`, each exactly once (it fails
    /// at the first duplicate, or when `timeout` passes with jobs missing: lost).
    pub async fn wait_sent_once(
        &self,
        ids: &std::collections::BTreeSet<String>,
        timeout: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let audit = self.simulator.audit();
            assert!(
                audit.duplicates.is_empty(),
                "sent twice: {:?}",
                audit.duplicates
            );
            let sent: std::collections::BTreeSet<String> = audit
                .accepted
                .iter()
                .filter_map(|s| s.job_id.clone())
                .collect();
            if sent == *ids {
                assert_eq!(audit.accepted.len(), ids.len(), "each job sent once");
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {} jobs never sent (lost): sent {}",
                ids.difference(&sent).count(),
                ids.len(),
                sent.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until none of this app's jobs is in a send or delay queue of the shared broker,
    /// ready or held by a worker: every delivery is settled, nothing is in flight.
    pub async fn wait_jobs_settled(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let (send, delay) = (
            format!("{}.send.", self.prefix),
            format!("{}.delay.", self.prefix),
        );
        loop {
            let output = tokio::process::Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "--quiet",
                    "--no-table-headers",
                    "name",
                    "messages",
                ])
                .output()
                .await
                .expect("rabbitmqctl runs");
            let left: u64 = String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| line.split_once('\t'))
                .filter(|(name, _)| name.starts_with(&send) || name.starts_with(&delay))
                .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
                .sum();
            if output.status.success() && left == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{left} jobs still queued or in flight after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits for the first event (seen before or arriving within `timeout`) matching `pred`.
    pub async fn wait_event(&mut self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        if let Some(e) = self.seen.iter().find(|e| pred(e)) {
            return e.clone();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.events.next()).await;
            let event = match next {
                Ok(Some(event)) => event.expect("events are wa.event.v1"),
                _ => panic!(
                    "no matching event within {timeout:?}; events seen: {:#?}",
                    self.seen
                        .iter()
                        .map(|e| (&e.event, &e.job_id))
                        .collect::<Vec<_>>()
                ),
            };
            self.seen.push(event.clone());
            if pred(&event) {
                return event;
            }
        }
    }

    pub async fn wait_job_event(&mut self, job_id: &str, kind: &str) -> Event {
        self.wait_event(Duration::from_secs(20), |e| {
            e.job_id.as_deref() == Some(job_id) && e.event == kind
        })
        .await
    }

    /// Waits for the next dead letter.
    pub async fn next_dead(&mut self) -> Tapped {
        tokio::time::timeout(Duration::from_secs(20), self.dead.next())
            .await
            .expect("a dead letter within 20 s")
            .unwrap()
            .unwrap()
    }

    /// Deletes the test's queues, exchanges and keys. A queue RabbitMQ fails to delete is left
    /// with a warning: what the test checked held (RabbitMQ 3.10's quorum log writer has been
    /// seen to crash on a queue deleted right after a purge).
    pub async fn cleanup(self) {
        self.simulator.stop();
        if let Err(e) = self.broker.delete_topology().await {
            eprintln!("warning: {} left behind: {e}", self.prefix);
        }
        self.store.delete_all().await.unwrap();
        self.broker.close().await;
    }
}

/// Serves `health`'s `/healthz` and `/readyz` on a free port until `stop`; its base URL.
pub async fn serve_health(health: Health, stop: CancellationToken) -> String {
    let router = wa_sender::health::router(health);
    let server = wa_sender::app::HttpServer::bind("127.0.0.1:0", router)
        .await
        .unwrap();
    let base = format!("http://{}", server.addr().unwrap());
    tokio::spawn(server.run_until_stopped(stop));
    base
}

/// `GET <base>/readyz`: its status and JSON body; `None` while nothing answers.
pub async fn readyz(base: &str) -> Option<(u16, Value)> {
    let answer = reqwest::get(format!("{base}/readyz")).await.ok()?;
    let status = answer.status().as_u16();
    Some((status, answer.json().await.expect("/readyz answers JSON")))
}

/// Asks `/readyz` until its answer satisfies `until`; panics with the last answer after
/// `timeout`.
pub async fn wait_readyz(
    base: &str,
    timeout: Duration,
    until: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = readyz(base).await;
        if let Some((status, body)) = &answer
            && until(*status, body)
        {
            return body.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered as expected within {timeout:?}; last: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `/readyz` body of a process that consumes and uses Redis, everything up.
pub fn all_up() -> Value {
    json!({"ready": true, "broker": "up", "redis": "up", "draining": false})
}

/// A channel of its own on the broker at `amqp_url`, to look at queues as a test; the
/// connection lives as long as it is kept.
pub async fn amqp_channel(amqp_url: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Declares `queue` at a length of 0 that refuses what it cannot take (`reject-publish`) and
/// binds it to `exchange` for every key: the broker then nacks every publish to `exchange`
/// until the queue is deleted.
pub async fn bind_refusing_queue(channel: &lapin::Channel, queue: &str, exchange: &str) {
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(queue.into(), Default::default(), args)
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
}

/// Sends `signal` (`TERM`, `KILL`, …) to `child`, as an orchestrator or an operator would.
pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// How many messages `queue` holds ready, asked passively (nothing is declared).
pub async fn ready_messages(channel: &lapin::Channel, queue: &str) -> u32 {
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, Default::default())
        .await
        .unwrap_or_else(|e| panic!("{queue}: {e}"))
        .message_count()
}

/// Everything in `queue` of the broker at `amqp_url`, taken off it.
pub async fn take_all(amqp_url: &str, queue: &str) -> Vec<Taken> {
    let (conn, channel) = amqp_channel(amqp_url).await;
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = message.delivery.properties.headers().clone();
        let headers = headers
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            lapin::types::AMQPValue::LongString(s) => s.to_string(),
                            other => format!("{other:?}"),
                        };
                        (k.to_string(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        taken.push(Taken {
            headers,
            body: message.delivery.data.clone(),
        });
    }
    let _ = conn.close(200, "bye".into()).await;
    taken
}
