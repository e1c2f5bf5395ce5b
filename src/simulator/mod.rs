//! A Cloud API simulator that behaves like Meta's: it validates requests as Meta does and answers
//! with Meta's error body, enforces per-number throughput and the pair rate, serves the template
//! and phone-number management endpoints, plays simulated users (care window, marketing stops,
//! unreachable numbers, per-user marketing caps), and reports outcomes through signed, batched,
//! sometimes duplicated and reordered status webhooks. An audit (peak rate per 1 s window, errors
//! by code, duplicate sends) lets tests and benchmarks assert "zero 130429, zero duplicates".
//! Runs as `wa-sender simulate` or in-process ([`Simulator::start`]).

mod audit;
mod http;
mod limits;
mod scenario;
mod statuses;
mod webhooks;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use audit::{AcceptedSend, Audit, NumberAudit, WebhookAudit};
pub use scenario::{
    Action, DelayRange, Faults, Latency, Marketing, PairRate, ParameterFormat, Scenario,
    ScenarioError, SimButton, SimNumber, SimTemplate, SimUser, TimedAction, UnknownUsers,
    WebhookSettings, placeholders,
};
pub use webhooks::sign;

/// A fault to inject on matching requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with Meta's error body for `code` and this HTTP status.
    Error {
        /// `error.code`.
        code: i64,
        /// HTTP status.
        status: u16,
    },
    /// Answer a bare HTTP status without Meta's body (a proxy or load balancer).
    BareStatus(u16),
    /// Hold the request this long before answering normally (longer than the client's timeout
    /// makes an ambiguous send: the message *is* accepted, the answer is lost).
    Delay(Duration),
    /// Drop the connection without an answer; the message is not sent.
    Reset,
}

/// A fault applied to the next `times` requests that match.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// Only requests whose `biz_opaque_callback_data` is this (any request when `None`).
    pub job_id: Option<String>,
    /// The fault.
    pub fault: Fault,
    /// How many requests it applies to.
    pub times: u32,
}

/// What the simulator knows about one user.
#[derive(Debug, Clone)]
pub(crate) struct UserState {
    pub(crate) name: String,
    pub(crate) reachable: bool,
    pub(crate) reads: bool,
    pub(crate) marketing_cap_per_day: Option<u32>,
    /// WABAs this user stopped marketing from.
    pub(crate) stopped_marketing: Vec<String>,
    /// Last inbound message per business number.
    pub(crate) last_inbound: HashMap<String, DateTime<Utc>>,
    /// An unknown user under `unknown_users.window_open`: free-form is always allowed.
    pub(crate) window_always_open: bool,
    /// Delivered marketing templates (rolling 24 h).
    pub(crate) marketing_received: VecDeque<DateTime<Utc>>,
}

/// The mutable world: scenario plus everything learnt while running.
pub(crate) struct World {
    pub(crate) scenario: Scenario,
    pub(crate) users: HashMap<String, UserState>,
    pub(crate) throughput: limits::Throughput,
    pub(crate) pairs: limits::PairLimiter,
    /// Numbers in an upgrade's maintenance window (131057) until this instant.
    pub(crate) maintenance: HashMap<String, Instant>,
    /// Accepted sends so far (to sweep idle pair-rate state now and then).
    pub(crate) sends: u64,
}

impl World {
    fn new(mut scenario: Scenario) -> Self {
        scenario.normalise();
        let now = Utc::now();
        let number_ids: Vec<String> = scenario
            .numbers
            .iter()
            .map(|n| n.phone_number_id.clone())
            .collect();
        let users = scenario
            .users
            .iter()
            .map(|u| {
                let last_inbound = u
                    .last_inbound_minutes_ago
                    .map(|m| {
                        let at = now - chrono::Duration::minutes(m as i64);
                        number_ids.iter().map(|n| (n.clone(), at)).collect()
                    })
                    .unwrap_or_default();
                let stopped_marketing = match u.marketing {
                    Marketing::Stopped => {
                        scenario.numbers.iter().map(|n| n.waba_id.clone()).collect()
                    }
                    Marketing::Subscribed => Vec::new(),
                };
                let state = UserState {
                    name: u.name.clone(),
                    reachable: u.reachable,
                    reads: u.reads,
                    marketing_cap_per_day: u.marketing_cap_per_day,
                    stopped_marketing,
                    last_inbound,
                    window_always_open: false,
                    marketing_received: VecDeque::new(),
                };
                (u.wa_id.clone(), state)
            })
            .collect();
        let pairs = limits::PairLimiter::new(scenario.pair_rate.clone());
        World {
            scenario,
            users,
            throughput: limits::Throughput::default(),
            pairs,
            maintenance: HashMap::new(),
            sends: 0,
        }
    }

    /// The user, created on first contact from `unknown_users`.
    pub(crate) fn user(&mut self, wa_id: &str) -> &mut UserState {
        let defaults = &self.scenario.unknown_users;
        self.users.entry(wa_id.to_owned()).or_insert_with(|| {
            let mut rng = rand::rng();
            UserState {
                name: "Simulated User".into(),
                reachable: !rng.random_bool(defaults.unreachable_share),
                reads: rng.random_bool(defaults.read_share),
                marketing_cap_per_day: None,
                stopped_marketing: Vec::new(),
                last_inbound: HashMap::new(),
                window_always_open: defaults.window_open,
                marketing_received: VecDeque::new(),
            }
        })
    }

    /// Whether the user's 24 h care window with this number is open.
    pub(crate) fn window_open(
        &mut self,
        phone_number_id: &str,
        wa_id: &str,
        now: DateTime<Utc>,
    ) -> bool {
        let user = self.user(wa_id);
        user.window_always_open
            || user
                .last_inbound
                .get(phone_number_id)
                .is_some_and(|at| now - *at < chrono::Duration::hours(24))
    }
}

pub(crate) struct SimState {
    pub(crate) world: Mutex<World>,
    pub(crate) faults: Mutex<VecDeque<FaultRule>>,
    pub(crate) audit: Arc<Mutex<Audit>>,
    pub(crate) outbox: webhooks::Outbox,
    /// Keep every request body in the audit (for shape tests).
    pub(crate) record_requests: std::sync::atomic::AtomicBool,
}

/// A running simulator.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<SimState>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Simulator {
    /// Starts serving on `listen` (`127.0.0.1:0` for a free port), posting webhooks to the
    /// scenario's `webhooks.url` and playing its timeline.
    pub async fn start(scenario: Scenario, listen: &str) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let audit = Arc::new(Mutex::new(Audit::default()));
        let outbox = webhooks::Outbox::start(&scenario.webhooks, Arc::clone(&audit), stop.clone());
        let timeline = scenario.timeline.clone();
        let state = Arc::new(SimState {
            world: Mutex::new(World::new(scenario)),
            faults: Mutex::default(),
            audit,
            outbox,
            record_requests: Default::default(),
        });
        let app = http::router(Arc::clone(&state));
        let serve_stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(serve_stop.cancelled_owned())
                .await;
        });
        let simulator = Simulator { state, addr, stop };
        if !timeline.is_empty() {
            let sim = simulator.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                for step in timeline {
                    tokio::select! {
                        biased;
                        () = sim.stop.cancelled() => return,
                        () = tokio::time::sleep_until(start + Duration::from_millis(step.after_ms)) => {}
                    }
                    if let Err(e) = sim.act(step.action) {
                        tracing::warn!(error = %e, "timeline action failed");
                    }
                }
            });
        }
        Ok(simulator)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, e.g. `http://127.0.0.1:41234`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a fault rule (applied in order, before random faults).
    pub fn inject(&self, rule: FaultRule) {
        self.state
            .faults
            .lock()
            .expect("faults lock")
            .push_back(rule);
    }

    /// Changes the scenario (e.g. a number's throughput) while running, without webhooks; use
    /// [`Simulator::act`] for changes Meta would announce.
    pub fn configure(&self, change: impl FnOnce(&mut Scenario)) {
        change(&mut self.state.world.lock().expect("world lock").scenario);
    }

    /// Something a user or Meta does, with the webhook Meta would send.
    pub fn act(&self, action: Action) -> Result<(), String> {
        http::apply(&self.state, action)
    }

    /// Keeps every send request's JSON body in the audit (`requests`), for shape checks.
    pub fn record_requests(&self, on: bool) {
        self.state
            .record_requests
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A copy of the audit so far.
    pub fn audit(&self) -> Audit {
        self.state.audit.lock().expect("audit lock").clone()
    }

    /// Stops serving and delivering webhooks.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Unix seconds as Meta writes them in webhooks: a string.
pub(crate) fn unix_string(at: DateTime<Utc>) -> Value {
    Value::String(at.timestamp().to_string())
}
