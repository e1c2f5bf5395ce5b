//! A Cloud API simulator that behaves like Meta's: it validates requests as Meta does, answers
//! with Meta's error body, enforces per-number throughput, can be told to fail, and keeps an
//! audit (peak rate per 1 s window, errors by code, duplicate sends) that tests assert on.
//! Runs as `wa-sender simulate` or in-process ([`Simulator::start`]).

mod audit;
mod http;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use audit::{AcceptedSend, Audit, NumberAudit};

/// A template the simulator knows, as Meta's registry would hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTemplate {
    /// Name.
    pub name: String,
    /// Language code, e.g. `en_US`.
    pub language: String,
    /// `APPROVED`, `PAUSED`, `DISABLED`, `PENDING`, `REJECTED`.
    pub status: String,
    /// `MARKETING`, `UTILITY`, `AUTHENTICATION`.
    pub category: String,
    /// Number of body parameters.
    pub body_params: usize,
}

/// A business number the simulator serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNumber {
    /// Messages per second before 130429.
    pub throughput_mps: u32,
}

/// What the simulator is set up with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Bearer tokens accepted (anything else → 190).
    pub tokens: Vec<String>,
    /// Numbers by `phone_number_id`.
    pub numbers: HashMap<String, SimNumber>,
    /// Templates.
    pub templates: Vec<SimTemplate>,
    /// Share of sends answered with a transient 5xx (131016), 0.0–1.0.
    pub transient_failure_share: f64,
    /// Added latency per request: uniform between these bounds.
    pub latency: (Duration, Duration),
}

impl SimConfig {
    /// One number, one token, a few approved templates, no faults.
    pub fn single(phone_number_id: &str, token: &str) -> Self {
        let t = |name: &str, category: &str, body_params| SimTemplate {
            name: name.into(),
            language: "en_US".into(),
            status: "APPROVED".into(),
            category: category.into(),
            body_params,
        };
        SimConfig {
            tokens: vec![token.to_owned()],
            numbers: HashMap::from([(
                phone_number_id.to_owned(),
                SimNumber { throughput_mps: 80 },
            )]),
            templates: vec![
                t("order_update", "UTILITY", 2),
                t("otp_code", "AUTHENTICATION", 1),
                t("spring_sale", "MARKETING", 1),
            ],
            transient_failure_share: 0.0,
            latency: (Duration::ZERO, Duration::ZERO),
        }
    }
}

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

pub(crate) struct SimState {
    config: Mutex<SimConfig>,
    faults: Mutex<VecDeque<FaultRule>>,
    audit: Mutex<Audit>,
    windows: Mutex<HashMap<String, VecDeque<tokio::time::Instant>>>,
}

/// A running simulator.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<SimState>,
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Simulator {
    /// Starts serving on `listen` (`127.0.0.1:0` for a free port).
    pub async fn start(config: SimConfig, listen: &str) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SimState {
            config: Mutex::new(config),
            faults: Mutex::default(),
            audit: Mutex::default(),
            windows: Mutex::default(),
        });
        let stop = CancellationToken::new();
        let app = http::router(Arc::clone(&state));
        let serve_stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(serve_stop.cancelled_owned())
                .await;
        });
        Ok(Simulator { state, addr, stop })
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

    /// Changes the configuration (e.g. a template's status) while running.
    pub fn configure(&self, change: impl FnOnce(&mut SimConfig)) {
        change(&mut self.state.config.lock().expect("config lock"));
    }

    /// A copy of the audit so far.
    pub fn audit(&self) -> Audit {
        self.state.audit.lock().expect("audit lock").clone()
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}
