//! End-to-end benchmarks against the local RabbitMQ and Redis, each run under its own prefix.
//!
//! - `cargo bench --bench e2e` (or `-- throughput [--jobs 20000 --pairs 3 --queue quorum]`): the
//!   worker with the full policy against a bare consume → POST → ack loop written with the same
//!   crates, interleaved, both draining the same pre-loaded queue into a fast local Cloud API
//!   stand-in; rates, their ratio, CPU µs per message and peak RSS of each.
//! - `-- rss [--jobs 1000000]`: the worker's resident memory while a large backlog drains.
//! - `-- accuracy [--numbers 10 --mps 80 --replicas 3 --jobs 20000 --bursts 1 --runs 1]`:
//!   replicas sharing numbers against the simulator (which answers 130429 past a number's
//!   limit), started together; then one replica is killed and another started mid-run. With
//!   `--bursts N` the jobs come in N bursts of twice what the numbers send in a second, each
//!   after the numbers went idle.
//! - `-- fairness [--backlog 6000 --others 80 --mps 80]`: a backlog on one number, a few jobs on
//!   another; how soon the few are sent.
//! - `-- refusals [--refused 2000 --sendable 2000 --mps 80]`: refused and sendable jobs of one
//!   number interleaved; how soon each kind is done.
//! - `-- topology [--numbers 500 --replicas 5 --queue quorum]`: what per-number queues cost the
//!   broker.
//! - `-- spans [--jobs 20000 --pairs 2]`: the worker with no tracing subscriber, with spans
//!   recorded but not exported (the default), and with spans exported over OTLP, interleaved.
//! - `-- events [--events 50000 --rounds 3]`: what the broker spends per event published to
//!   `wa.events` with nothing bound, a classic queue, a quorum queue or a stream bound, and per
//!   event read back.
//!
//! `--nodes 1` or `--nodes 3` (any of the above): instead of the shared local services, nodes
//! of the bench's own (RabbitMQ nodes joined into one cluster; one Redis, or a Redis Cluster of
//! that many masters with a replica each; every Redis with an append-only file), and only their
//! processes counted.
//!
//! Workers and bare loops run as child processes (this binary, `child …`), so their CPU time and
//! memory are their own.

mod accuracy;
#[path = "../common/mod.rs"]
mod common;
mod events;
#[allow(dead_code)]
#[path = "../../tests/common/node.rs"]
mod node;
mod scheduling;
mod throughput;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{flag, option};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use wa_sender::broker::rabbit::QueueType;
use wa_sender::config::{NumberSettings, Settings};

/// The allocator `wa-sender` runs with, for the worker and the bare loop alike, counting the
/// allocations it makes (one relaxed atomic add each, the same for both).
#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations (and reallocations) this process made.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// mimalloc, counting.
struct Counting;

// SAFETY: every call is passed on unchanged to mimalloc, itself a `GlobalAlloc`.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is mimalloc's.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is mimalloc's.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is mimalloc's.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract is mimalloc's.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

/// Allocations this process made so far.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Context switches of this process's threads so far, voluntary (a thread waited: a wakeup
/// follows) and not, from `/proc/self/task/*/status` (threads that ended are not counted).
pub fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

pub const WABA: &str = "102290129340398";
pub const TOKEN: &str = "bench-token";

/// The `n`-th bench number's `phone_number_id`.
pub fn number_id(n: usize) -> String {
    format!("1065403522{n:05}")
}

/// The local configuration under a fresh prefix (queues and keys of its own).
pub fn settings(tag: &str) -> Settings {
    let mut settings = Settings::load(std::path::Path::new("config"), "local").expect("config");
    let prefix = format!(
        "bench-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    settings.amqp.prefix = prefix.clone();
    settings.redis.key_prefix = prefix;
    settings.amqp.queue_type = match option::<String>("--queue").as_deref() {
        Some("classic") => QueueType::Classic,
        _ => QueueType::Quorum,
    };
    settings.cloud.access_token = Some(TOKEN.to_owned().into());
    settings.numbers.clear();
    settings
}

/// A configured number of the bench WABA.
pub fn number(mps: u32) -> NumberSettings {
    NumberSettings {
        waba_id: WABA.into(),
        throughput_mps: mps,
        access_token: None,
        access_token_file: None,
    }
}

/// A text job (the recipient's care window must be open).
pub fn text_job(id: &str, number: &str, i: usize) -> serde_json::Value {
    json!({"schema": "wa.send.v1", "job_id": id, "phone_number_id": number, "to": recipient(i),
           "message": {"type": "text", "text": {"body": "Your parcel is on its way"}}})
}

/// The `i`-th recipient.
pub fn recipient(i: usize) -> String {
    format!("+4915{i:09}")
}

/// Connects under `settings` (declaring its queues), opens the care window of `jobs`
/// recipients and queues a text job to each, round-robin over the first `numbers` numbers.
pub async fn queue_text_jobs(
    settings: &Settings,
    jobs: usize,
    numbers: usize,
) -> (
    Arc<wa_sender::broker::rabbit::RabbitBroker>,
    Arc<wa_sender::store::redis::RedisStore>,
) {
    let (broker, store) = wa_sender::app::connect(&settings.runtime().expect("valid settings"))
        .await
        .expect("RabbitMQ and Redis");
    queue_more(settings, store.as_ref(), 0..jobs, numbers).await;
    (broker, store)
}

/// Opens the care window of the recipients of jobs `range` and queues a text job to each,
/// job `i` on number `i % numbers`.
pub async fn queue_more(
    settings: &Settings,
    store: &wa_sender::store::redis::RedisStore,
    range: std::ops::Range<usize>,
    numbers: usize,
) {
    use wa_sender::ids::{PhoneNumberId, WaId, WabaId};
    use wa_sender::store::Store;
    let waba = WabaId::parse(WABA).unwrap();
    let stamp = chrono::Utc::now();
    for i in range.clone() {
        let pnid = PhoneNumberId::parse(number_id(i % numbers)).unwrap();
        let to = WaId::parse(recipient(i)).unwrap();
        store
            .record_inbound(&waba, &pnid, &to, stamp)
            .await
            .unwrap();
    }
    preload(
        settings,
        range.map(|i| {
            let pnid = number_id(i % numbers);
            let job = text_job(&format!("job-{i}"), &pnid, i);
            (pnid, serde_json::to_vec(&job).unwrap())
        }),
    )
    .await;
}

/// Publishes `bodies` to the send exchange of `settings` with pipelined confirms (up to 4,096
/// unconfirmed), as a fast producer would; each under `bulk.<phone_number_id>`.
pub async fn preload(settings: &Settings, bodies: impl Iterator<Item = (String, Vec<u8>)>) {
    let exchange = format!("{}.send", settings.amqp.prefix);
    let items = bodies.map(|(number, body)| (format!("bulk.{number}"), body));
    common::publish_raw(&settings.amqp.url, &exchange, items, 4096).await;
}

/// A Cloud API stand-in that answers every send at once with a new wamid and every template
/// listing with none: what the worker costs, without a simulator's work in the way.
pub struct StandIn {
    pub url: String,
    pub sends: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
}

impl StandIn {
    pub async fn start() -> StandIn {
        use axum::routing::{get, post};
        let sends = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sends);
        let router = axum::Router::new()
            .route(
                "/{version}/{number}/messages",
                post(move |body: axum::body::Bytes| {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let job: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        axum::Json(json!({
                            "messaging_product": "whatsapp",
                            "contacts": [{"input": job["to"], "wa_id": job["to"]}],
                            "messages": [{"id": format!("wamid.bench{n:012}")}]
                        }))
                    }
                }),
            )
            .route(
                "/{version}/{waba}/message_templates",
                get(|| async { axum::Json(json!({"data": []})) }),
            )
            // An OTLP collector that keeps nothing: what exporting costs the worker.
            .route("/v1/traces", post(|| async { "" }));
        let server = wa_sender::app::HttpServer::bind("127.0.0.1:0", router)
            .await
            .expect("bind");
        let url = format!("http://{}", server.addr().expect("addr"));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(server.run_until_stopped(stop.clone()));
        StandIn { url, sends, stop }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A child process of this binary (a worker or a bare loop) and its report lines.
pub struct Child {
    pub process: tokio::process::Child,
    pub lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    /// Starts `child <args>`.
    pub fn spawn(args: &[String]) -> Child {
        let mut process = tokio::process::Command::new(std::env::current_exe().expect("exe"))
            .arg("child")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn child");
        let lines = BufReader::new(process.stdout.take().expect("stdout")).lines();
        Child { process, lines }
    }

    /// The next JSON report line.
    pub async fn report(&mut self) -> serde_json::Value {
        let line = self
            .lines
            .next_line()
            .await
            .expect("child stdout")
            .expect("the child reported before it ended");
        serde_json::from_str(&line).expect("a JSON report")
    }
}

/// A `/proc/self/status` figure in KiB (`VmRSS`, `VmHWM`).
pub fn memory_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The median of `values`.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The bench's own RabbitMQ and Redis nodes, stopped when dropped.
struct OwnNodes {
    _rabbit: node::RabbitCluster,
    _redis: OwnRedis,
}

enum OwnRedis {
    One(node::RedisNode),
    Cluster(node::RedisCluster),
}

/// Starts `n` RabbitMQ nodes in one cluster and one Redis (`n` = 1) or a Redis Cluster of `n`
/// masters with a replica each, points this process and its children at them through the
/// environment, and counts only their processes.
fn own_nodes(n: usize) -> OwnNodes {
    let logs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench");
    std::fs::create_dir_all(&logs).expect("a directory for the nodes' logs");
    let rabbit = node::RabbitCluster::start("bench", n, &logs);
    let urls = rabbit.urls();
    // SAFETY: set before the runtime and any other thread start.
    unsafe {
        std::env::set_var("WA_SENDER__AMQP__URL", &urls[0]);
        std::env::set_var(
            "WA_SENDER__AMQP__URLS",
            serde_json::to_string(&urls).unwrap(),
        );
    }
    let mut names: Vec<String> = rabbit
        .nodes
        .iter()
        // A node's home directory, on its VM's command line, holds its name without the `wa-`.
        .map(|n| n.name().trim_start_matches("wa-").replace("@localhost", ""))
        .collect();
    let redis = if n == 1 {
        let redis = node::RedisNode::start("bench");
        unsafe { std::env::set_var("WA_SENDER__REDIS__URL", redis.url()) };
        names.push(format!("127.0.0.1:{}", redis.port));
        OwnRedis::One(redis)
    } else {
        let redis = node::RedisCluster::start("bench", n);
        let urls = redis.urls();
        unsafe {
            std::env::set_var(
                "WA_SENDER__REDIS__CLUSTER_URLS",
                serde_json::to_string(&urls).unwrap(),
            )
        };
        names.extend(redis.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        OwnRedis::Cluster(redis)
    };
    eprintln!(
        "own nodes: RabbitMQ {urls:?}, Redis {}",
        match &redis {
            OwnRedis::One(r) => r.url(),
            OwnRedis::Cluster(c) => format!("{:?}", c.urls()),
        }
    );
    common::count_only(names);
    OwnNodes {
        _rabbit: rabbit,
        _redis: redis,
    }
}

fn main() {
    // Children log as a deployed worker does (the configuration's `info`); the rest only warns.
    let filter = if flag("child") { "info" } else { "warn" };
    // Children record spans as a deployed worker does, unless `--spans none` (no subscriber at
    // all) or `--spans exported` (to the OTLP collector at `--collector`).
    let _telemetry = match option::<String>("--spans").as_deref() {
        Some("none") => None,
        Some("exported") => {
            let mut settings = Settings::load(std::path::Path::new("config"), "local")
                .expect("config")
                .telemetry;
            settings.log_filter = filter.into();
            settings.otlp_endpoint = option("--collector").expect("--collector");
            let telemetry = wa_sender::telemetry::init(&settings, "wa-sender-worker", None);
            Some(telemetry.expect("telemetry"))
        }
        _ => {
            wa_sender::telemetry::init_logs(filter, "text");
            None
        }
    };
    // Children find the bench's own nodes in the environment their parent set.
    let _nodes = (!flag("child"))
        .then(|| option::<usize>("--nodes"))
        .flatten()
        .map(own_nodes);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if flag("child") {
        runtime.block_on(throughput::child());
    } else if flag("rss") {
        runtime.block_on(throughput::rss());
    } else if flag("accuracy") {
        runtime.block_on(accuracy::run());
    } else if flag("fairness") {
        runtime.block_on(scheduling::fairness());
    } else if flag("refusals") {
        runtime.block_on(scheduling::refusals());
    } else if flag("topology") {
        runtime.block_on(scheduling::topology());
    } else if flag("events") {
        runtime.block_on(events::run());
    } else if flag("spans") {
        runtime.block_on(throughput::spans());
    } else {
        runtime.block_on(throughput::pairs());
    }
}
