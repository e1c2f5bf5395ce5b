//! Configuration: `config/default.toml` → `config/<environment>.toml` → `WA_SENDER__SECTION__KEY`
//! environment variables. Typed, unknown keys rejected, validated and converted once into a
//! [`Runtime`] (durations, id newtypes, lanes, delay tiers) that every process is built from;
//! secrets come from the environment or `*_file` paths and are wrapped so `Debug` never prints
//! them.
//! The field docs below are the operator's manual (the README's configuration reference).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

use crate::broker::rabbit::{QueueType, RabbitSettings};
use crate::cloud::HttpSettings;
use crate::ids::{PhoneNumberId, WabaId};
use crate::job::Lane;
use crate::pipeline::{AdmissionSettings, PacingSettings, PipelineSettings};
use crate::policy::admission::{OptInPolicy, PairRate};
use crate::policy::{DelayTiers, RetryPolicy};
use crate::webhook::processor::ProcessorSettings;
use crate::webhook::receiver::ReceiverSettings;

/// Everything wa-sender can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// RabbitMQ.
    pub amqp: AmqpSettings,
    /// Redis.
    pub redis: RedisSettings,
    /// The Cloud API (or a simulator).
    pub cloud: CloudSettings,
    /// The send worker.
    pub worker: WorkerSettings,
    /// Retry backoff and attempts.
    pub retry: RetrySettings,
    /// Business numbers this deployment may send from, keyed by `phone_number_id`.
    #[serde(default)]
    pub numbers: BTreeMap<String, NumberSettings>,
    /// Admission rules: consent, the pair rate, messaging tiers, the template registry.
    pub policy: PolicySettings,
    /// `wa-sender simulate`.
    pub simulator: SimulatorSettings,
    /// `wa-sender demo`.
    pub demo: DemoSettings,
    /// `wa-sender admin`: the HTTP API for campaigns, consent and care windows.
    pub admin: AdminSettings,
    /// `wa-sender webhook`: the receiver of Meta's webhooks.
    pub webhook: WebhookSettings,
    /// The rate card for cost estimates.
    pub pricing: crate::pricing::RateCard,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
}

/// RabbitMQ connection and topology.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost` (`%2f` is the default vhost): the broker, when
    /// `urls` is empty.
    pub url: String,
    /// The nodes of a RabbitMQ cluster, each an `amqp(s)://…` address as `url`; when set,
    /// `url` is not used. A process connects to one of them, taken in a random order so
    /// replicas spread over the nodes, and moves to another when it loses it. From the
    /// environment: `WA_SENDER__AMQP__URLS='["amqp://…@rabbit-1:5672/%2f", "amqp://…@rabbit-2:5672/%2f"]'`.
    #[serde(default)]
    pub urls: Vec<String>,
    /// How many nodes hold a new quorum queue (`x-quorum-initial-group-size`): unset, every
    /// node of the cluster (RabbitMQ's default). Only used when a queue is created.
    #[serde(default)]
    pub quorum_group_size: Option<u32>,
    /// Prefix of every exchange and queue name: `wa` gives `wa.send`, `wa.send.otp`, `wa.dead`, …
    pub prefix: String,
    /// `quorum` (production: replicated) or `classic` (tests: fast to create).
    pub queue_type: QueueType,
    /// Delay-queue tiers, e.g. `["1s", "5s", "30s", "2m", "10m", "1h", "6h"]`; a wait goes to the
    /// shortest tier at least as long.
    pub delay_tiers: Vec<String>,
    /// `x-delivery-limit` of quorum queues: a job returned to its queue this often without being
    /// settled (a worker died or lost its channel each time it held it) is dead-lettered
    /// `delivery_limit`; a safety net behind `retry.max_attempts`.
    pub delivery_limit: u32,
    /// When above 0 (10,000,000 by default), every process declares `<prefix>.events.kept`,
    /// bound to `<prefix>.events`, which keeps at most this many events unread (past it the
    /// oldest go first), and publishes events `mandatory`. 0: no such queue; an event reaches
    /// the queues consumers bound, or nobody. Used when the queue is first declared.
    #[serde(default = "default_events_kept")]
    pub events_kept: u64,
}

fn default_events_kept() -> u64 {
    10_000_000
}

/// Redis connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`: the Redis, when `cluster_urls` is empty.
    pub url: String,
    /// Some nodes of a Redis Cluster, `redis://host:port` each: when set, the store is that
    /// cluster (the client learns the other nodes and follows failovers) and `url` is not used.
    /// Every key a script touches carries its portfolio's hash tag, so no request crosses
    /// slots. From the environment: `WA_SENDER__REDIS__CLUSTER_URLS='["redis://r1:6379", "redis://r2:6379"]'`.
    #[serde(default)]
    pub cluster_urls: Vec<String>,
    /// Prefix of every key (`wa` gives `wa:{<waba>}:job:<job_id>`).
    pub key_prefix: String,
    /// Run against a Redis that keeps nothing on disk (no AOF, no RDB save points). Off by
    /// default: a restart of such a Redis loses the idempotency records (a redelivered job
    /// that was sent can be sent again), care windows, consent and pair-rate state, so the
    /// worker and the webhook process refuse to start on it unless this accepts the risk
    /// (tests, local development, the demo).
    #[serde(default)]
    pub allow_volatile: bool,
}

/// How to call the Cloud API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSettings {
    /// `https://graph.facebook.com`, or the simulator's address.
    pub base_url: String,
    /// Pinned Graph API version, e.g. `v23.0`.
    pub api_version: String,
    /// Whole-request timeout in milliseconds. A send that times out is *ambiguous*.
    pub request_timeout_ms: u64,
    /// TCP connect timeout in milliseconds. A failed connect is safe to retry.
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// System-user access token (secret): prefer the env var `WA_SENDER__CLOUD__ACCESS_TOKEN`.
    #[serde(default)]
    pub access_token: Option<SecretString>,
    /// File holding the access token (e.g. a mounted Kubernetes secret).
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
}

/// One business number.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumberSettings {
    /// The WhatsApp Business Account (and so portfolio) that owns it.
    #[serde(deserialize_with = "string_or_number")]
    pub waba_id: String,
    /// Its throughput in messages per second (80 default, 20 coexistence, up to 1000).
    #[serde(default = "default_throughput")]
    pub throughput_mps: u32,
    /// Its own token, when it differs from `cloud.access_token` (secret).
    #[serde(default)]
    pub access_token: Option<SecretString>,
    /// File holding its own token.
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
}

/// Ids are digits: an environment variable `…__WABA_ID=1022…` arrives as a number.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::Text(s) => s,
        Id::Number(n) => n.to_string(),
    })
}

fn default_throughput() -> u32 {
    80
}

/// The worker's concurrency and priorities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs of one business number processed at once by one replica (each waits for its send
    /// slot, then for Meta's answer): enough to keep the number's rate busy over the Cloud
    /// API's latency, e.g. 1,000 msg/s × 50 ms = 50.
    pub concurrency: usize,
    /// Unacked deliveries the broker hands one replica per number and lane. The broker sends a
    /// number's jobs only as fast as they are settled, so a backlog stays in RabbitMQ.
    pub prefetch: u16,
    /// Share of picks per lane when all lanes have work, e.g. `{ otp = 6, transactional = 3, bulk = 1 }`.
    /// Every lane with a weight above 0 is served: bulk is slowed, never starved.
    pub lane_weights: BTreeMap<String, u32>,
    /// Seconds to finish in-flight jobs after SIGTERM before giving up on them (they are then
    /// returned to their queue, not lost).
    pub shutdown_grace_secs: u64,
    /// How long a claim protects a job being sent, in seconds; must exceed the request timeout.
    pub claim_lease_secs: u64,
    /// How long an at-most-once job with an unknown outcome waits for a webhook before it is
    /// dead-lettered `ambiguous_send`, in seconds.
    pub ambiguous_wait_secs: u64,
    /// How long a number, WABA or token is paused after a halting error (190, 131031, …), in seconds.
    pub halt_cooldown_secs: u64,
    /// Replicas sharing the same numbers (one deployment); each number's throughput is split
    /// evenly among the live replicas of the group.
    pub group: String,
    /// How often a replica says it is alive, in milliseconds.
    pub heartbeat_ms: u64,
    /// A replica not heard from for this long is gone and its share goes to the others, ms.
    pub replica_ttl_ms: u64,
    /// Share of a number's limit actually used, 0.5–1.0: the rest absorbs network jitter so
    /// that Meta never counts more than the limit in any second.
    pub throughput_headroom: f64,
    /// After a 130429, this replica's share of that number is a tenth lower for this long
    /// (each further 130429 another tenth, down to half), seconds.
    pub throttle_cooldown_secs: u64,
    /// Where the worker answers `/healthz` (alive) and `/readyz` (consuming, Redis answering,
    /// not draining) for its orchestrator's probes, e.g. `0.0.0.0:9464`; `127.0.0.1:0` for a
    /// free port.
    pub health_listen: String,
}

/// Admission rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Template categories that need a recorded opt-in when sent outside the care window,
    /// e.g. `{ marketing = true, utility = true, authentication = false }`.
    pub opt_in_required: OptInPolicy,
    /// Pair rate: one message per this many milliseconds to one user (Meta: 6 s).
    pub pair_period_ms: u64,
    /// Pair rate: margin for the delay between deciding a send and Meta counting it, ms. It
    /// lengthens the spacing Meta charges and shortens the burst window, both by this much.
    pub pair_margin_ms: u64,
    /// Pair rate: messages allowed in one burst (Meta: up to 45, borrowed from future quota).
    pub pair_burst: u32,
    /// Each portfolio's messaging tier, unique users outside the care window per rolling 24 h:
    /// `250`, `2000`, `10000`, `100000` or `"unlimited"`; keyed by WABA id, `default` for the rest.
    /// A tier recorded from a webhook wins.
    pub messaging_limits: BTreeMap<String, MessagingLimit>,
    /// How often one replica re-reads the template registry from the management API, seconds
    /// (Meta allows 200–5,000 management calls per hour per WABA; status webhooks keep it fresh
    /// in between).
    pub template_refresh_secs: u64,
    /// How long a job of a paused campaign waits before it looks again, seconds.
    pub campaign_recheck_secs: u64,
    /// How long a job for a paused template waits before it looks again, seconds (Meta pauses
    /// a template for 3 or 6 hours, or until it is edited).
    pub template_recheck_secs: u64,
}

/// A messaging tier: a number of unique users, or unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MessagingLimit {
    /// At most this many.
    Users(u32),
    /// `"unlimited"`.
    Named(Unlimited),
}

/// The word `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlimited {
    /// No tier limit.
    Unlimited,
}

impl MessagingLimit {
    /// `None` when unlimited.
    pub fn users(self) -> Option<u32> {
        match self {
            MessagingLimit::Users(n) => Some(n),
            MessagingLimit::Named(Unlimited::Unlimited) => None,
        }
    }
}

/// Retry backoff (capped exponential with jitter, computed by `backon`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// First retry delay, milliseconds.
    pub min_delay_ms: u64,
    /// Cap on any retry delay, milliseconds.
    pub max_delay_ms: u64,
    /// Growth factor per attempt.
    pub factor: f32,
    /// Sends tried before the job is dead-lettered `max_attempts`.
    pub max_attempts: u32,
}

/// The Cloud API simulator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Listen address of `wa-sender simulate`.
    pub listen: String,
}

/// The demo.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    /// Jobs the demo producer enqueues.
    pub jobs: usize,
    /// Share of jobs made invalid on purpose, 0.0–1.0.
    pub invalid_share: f64,
    /// Share of sends the simulator fails with a transient error, 0.0–1.0.
    pub transient_failure_share: f64,
}

/// The admin HTTP API (`wa-sender admin`). It changes what is sent (pauses campaigns, records
/// consent), so it only starts with a token and should listen on a private address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Listen address, e.g. `127.0.0.1:8090`.
    pub listen: String,
    /// Bearer token callers present as `Authorization: Bearer <token>` (secret): set the env var
    /// `WA_SENDER__ADMIN__TOKEN`. Without a token the admin API refuses to start.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// File holding the token (e.g. a mounted Kubernetes secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// The webhook receiver.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Listen address, e.g. `0.0.0.0:8091` behind a TLS-terminating load balancer.
    pub listen: String,
    /// The verify token entered in the App Dashboard (secret): `WA_SENDER__WEBHOOK__VERIFY_TOKEN`.
    #[serde(default)]
    pub verify_token: Option<SecretString>,
    /// File holding the verify token.
    #[serde(default)]
    pub verify_token_file: Option<PathBuf>,
    /// The app secret that signs every POST (secret): `WA_SENDER__WEBHOOK__APP_SECRET`.
    #[serde(default)]
    pub app_secret: Option<SecretString>,
    /// File holding the app secret.
    #[serde(default)]
    pub app_secret_file: Option<PathBuf>,
    /// Inbound messages that, as the whole message (any case), record a marketing opt-out.
    pub stop_keywords: Vec<String>,
    /// Intake bodies the processor holds and works on at once.
    pub prefetch: u16,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `tracing` filter, e.g. `info,wa_sender=debug` (overridden by `RUST_LOG`).
    pub log_filter: String,
    /// `text` or `json`. JSON lines inside a job carry its trace as
    /// `openTelemetry.traceId`/`spanId`.
    pub log_format: String,
    /// Where spans go: an OTLP/HTTP collector's base URL (`http://localhost:4318`; spans are
    /// posted as protobuf to `<url>/v1/traces`). Empty: no export, unless the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    /// `OTEL_SDK_DISABLED=true` turns export off whatever is set.
    pub otlp_endpoint: String,
    /// Share of traces exported, 0.0 to 1.0, decided where the trace starts (a job follows its
    /// producer's decision). `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` override it.
    pub sample_ratio: f64,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

fn invalid(key: &str, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {problem}"))
}

/// One business number, resolved.
#[derive(Debug, Clone)]
pub struct Number {
    /// Its WABA.
    pub waba: WabaId,
    /// Its throughput.
    pub throughput_mps: u32,
    /// Its token.
    pub token: SecretString,
}

impl Settings {
    /// Loads `<dir>/default.toml`, then `<dir>/<environment>.toml` if present, then the
    /// environment, and validates the result.
    pub fn load(dir: &Path, environment: &str) -> Result<Settings, ConfigError> {
        Self::from_figment(Self::layers(dir, environment)?)
    }

    /// The layers [`Settings::load`] reads, in order.
    fn layers(dir: &Path, environment: &str) -> Result<Figment, ConfigError> {
        let default = dir.join("default.toml");
        if !default.exists() {
            return Err(ConfigError(format!(
                "{} not found (run from the project root or set WA_SENDER_CONFIG_DIR)",
                default.display()
            )));
        }
        Ok(Figment::new()
            .merge(Toml::file(default))
            .merge(Toml::file(dir.join(format!("{environment}.toml"))))
            .merge(Env::prefixed("WA_SENDER__").split("__")))
    }

    /// Extracts and validates settings from any figment (tests layer their own values, and may
    /// change them before they build from them). Validating is converting: see
    /// [`Settings::runtime`].
    pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
        let settings = Self::extract(figment)?;
        settings.runtime()?;
        Ok(settings)
    }

    fn extract(figment: Figment) -> Result<Settings, ConfigError> {
        figment.extract().map_err(|e| {
            let mut message = e.to_string();
            if !e.path.is_empty() {
                message = format!("{}: {message}", e.path.join("."));
            }
            ConfigError(message)
        })
    }

    /// Validates these settings and converts them into the types the processes are built from.
    /// This is the only place the text of the configuration is parsed; every error names its
    /// key.
    pub fn runtime(&self) -> Result<Runtime, ConfigError> {
        if let Some(problem) = self.pricing.problem() {
            return Err(ConfigError(problem));
        }
        let numbers = self.numbers()?;
        if !(0.0..=1.0).contains(&self.demo.invalid_share) {
            return Err(invalid("demo.invalid_share", "must be between 0.0 and 1.0"));
        }
        if !(0.0..=1.0).contains(&self.demo.transient_failure_share) {
            return Err(invalid(
                "demo.transient_failure_share",
                "must be between 0.0 and 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!("{} is not between 0.0 and 1.0", self.telemetry.sample_ratio),
            ));
        }
        let endpoint = &self.telemetry.otlp_endpoint;
        if !endpoint.is_empty()
            && !endpoint.starts_with("http://")
            && !endpoint.starts_with("https://")
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return Err(invalid(
                "telemetry.log_format",
                "must be \"text\" or \"json\"",
            ));
        }
        if self.webhook.prefetch == 0 {
            return Err(invalid("webhook.prefetch", "must be at least 1"));
        }
        let cloud = &self.cloud;
        Ok(Runtime {
            amqp: AmqpRuntime {
                urls: self.amqp_urls()?,
                quorum_group_size: self.amqp.quorum_group_size,
                prefix: self.amqp.prefix.clone(),
                queue_type: self.amqp.queue_type,
                delay_tiers: self.delay_tiers()?,
                delivery_limit: self.amqp.delivery_limit,
                events_kept: self.amqp.events_kept,
            },
            redis: self.redis.clone(),
            cloud: HttpSettings {
                base_url: cloud.base_url.clone(),
                api_version: cloud.api_version.clone(),
                request_timeout: Duration::from_millis(cloud.request_timeout_ms),
                connect_timeout: Duration::from_millis(cloud.connect_timeout_ms),
                pool_max_idle_per_host: cloud.pool_max_idle_per_host,
            },
            cloud_token: Secret::new(
                "cloud.access_token",
                &cloud.access_token,
                &cloud.access_token_file,
            ),
            worker: self.worker_runtime()?,
            webhook: WebhookRuntime {
                listen: self.webhook.listen.clone(),
                prefetch: self.webhook.prefetch,
                stop_keywords: self.webhook.stop_keywords.clone(),
                verify_token: Secret::new(
                    "webhook.verify_token",
                    &self.webhook.verify_token,
                    &self.webhook.verify_token_file,
                ),
                app_secret: Secret::new(
                    "webhook.app_secret",
                    &self.webhook.app_secret,
                    &self.webhook.app_secret_file,
                ),
            },
            admin: AdminRuntime {
                listen: self.admin.listen.clone(),
                token: Secret::new("admin.token", &self.admin.token, &self.admin.token_file),
            },
            numbers,
            simulator: self.simulator.clone(),
            demo: self.demo.clone(),
            pricing: self.pricing.clone(),
            telemetry: self.telemetry.clone(),
        })
    }

    /// The worker's part: its loop, its pipeline's timing and the admission rules.
    fn worker_runtime(&self) -> Result<WorkerRuntime, ConfigError> {
        let w = &self.worker;
        if w.concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be at least 1"));
        }
        if w.prefetch == 0 {
            return Err(invalid("worker.prefetch", "must be at least 1"));
        }
        let lane_weights = w
            .lane_weights
            .iter()
            .map(|(lane, weight)| match Lane::parse(lane) {
                Some(parsed) => Ok((parsed, *weight)),
                None => Err(invalid(
                    &format!("worker.lane_weights.{lane}"),
                    "is not a lane (otp, transactional, bulk)",
                )),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        if lane_weights.values().all(|w| *w == 0) {
            return Err(invalid(
                "worker.lane_weights",
                "at least one lane needs a weight above 0",
            ));
        }
        if w.claim_lease_secs * 1000 <= self.cloud.request_timeout_ms {
            return Err(invalid(
                "worker.claim_lease_secs",
                "must be longer than cloud.request_timeout_ms, or a slow send could be sent twice",
            ));
        }
        if !(0.5..=1.0).contains(&w.throughput_headroom) {
            return Err(invalid(
                "worker.throughput_headroom",
                "must be between 0.5 and 1.0",
            ));
        }
        if w.heartbeat_ms == 0 || w.replica_ttl_ms < 2 * w.heartbeat_ms {
            return Err(invalid(
                "worker.replica_ttl_ms",
                "must be at least twice worker.heartbeat_ms (above 0), or live replicas look dead",
            ));
        }
        Ok(WorkerRuntime {
            run: crate::worker::WorkerSettings {
                concurrency: w.concurrency,
                prefetch: w.prefetch,
                lane_weights,
                shutdown_grace: Duration::from_secs(w.shutdown_grace_secs),
            },
            health_listen: w.health_listen.clone(),
            claim_lease: Duration::from_secs(w.claim_lease_secs),
            ambiguous_wait: Duration::from_secs(w.ambiguous_wait_secs),
            halt_cooldown: Duration::from_secs(w.halt_cooldown_secs),
            retry: self.retry_policy()?,
            admission: self.admission()?,
            pacing: PacingSettings {
                group: w.group.clone(),
                heartbeat: Duration::from_millis(w.heartbeat_ms),
                replica_ttl: Duration::from_millis(w.replica_ttl_ms),
                headroom: w.throughput_headroom,
                throttle_cooldown: Duration::from_secs(w.throttle_cooldown_secs),
            },
        })
    }

    /// The broker's addresses: `amqp.urls`, or `amqp.url` alone; each an AMQP URL.
    fn amqp_urls(&self) -> Result<Vec<String>, ConfigError> {
        let (key, urls) = if self.amqp.urls.is_empty() {
            ("amqp.url", vec![self.amqp.url.clone()])
        } else {
            ("amqp.urls", self.amqp.urls.clone())
        };
        for url in &urls {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                let shown = crate::broker::rabbit::redact(url);
                return Err(invalid(
                    key,
                    format!("{shown:?} is not an amqp:// or amqps:// address"),
                ));
            }
        }
        if self.amqp.quorum_group_size == Some(0) {
            return Err(invalid("amqp.quorum_group_size", "must be at least 1"));
        }
        Ok(urls)
    }

    /// The delay tiers, parsed.
    fn delay_tiers(&self) -> Result<DelayTiers, ConfigError> {
        let tiers = self
            .amqp
            .delay_tiers
            .iter()
            .map(|t| {
                parse_duration(t).ok_or_else(|| {
                    invalid(
                        "amqp.delay_tiers",
                        format!("{t:?} is not a duration like 500ms, 5s, 2m, 1h"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        DelayTiers::new(tiers)
            .ok_or_else(|| invalid("amqp.delay_tiers", "needs at least one tier above 0"))
    }

    /// The retry policy.
    fn retry_policy(&self) -> Result<RetryPolicy, ConfigError> {
        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if r.factor < 1.0 {
            return Err(invalid("retry.factor", "must be at least 1.0"));
        }
        if r.min_delay_ms == 0 || r.max_delay_ms < r.min_delay_ms {
            return Err(invalid(
                "retry.max_delay_ms",
                "must be at least retry.min_delay_ms, which must be above 0",
            ));
        }
        Ok(RetryPolicy {
            min_delay: Duration::from_millis(r.min_delay_ms),
            max_delay: Duration::from_millis(r.max_delay_ms),
            factor: r.factor,
            max_attempts: r.max_attempts,
        })
    }

    /// The admission rules: the pair rate and each portfolio's messaging tier.
    fn admission(&self) -> Result<AdmissionSettings, ConfigError> {
        let policy = &self.policy;
        if policy.pair_period_ms == 0 || policy.pair_burst == 0 {
            return Err(invalid(
                "policy.pair_period_ms",
                "the pair period and burst must be above 0",
            ));
        }
        let mut tiers = BTreeMap::new();
        let mut default_tier = Some(250);
        for (key, limit) in &policy.messaging_limits {
            if key == "default" {
                default_tier = limit.users();
            } else {
                let waba = WabaId::parse(key.clone())
                    .map_err(|e| invalid(&format!("policy.messaging_limits.{key}"), e))?;
                tiers.insert(waba, limit.users());
            }
        }
        Ok(AdmissionSettings {
            opt_in: policy.opt_in_required,
            pair: PairRate {
                margin: Duration::from_millis(policy.pair_margin_ms),
                period: Duration::from_millis(policy.pair_period_ms),
                burst: policy.pair_burst,
            },
            tiers,
            default_tier,
            template_refresh: Duration::from_secs(policy.template_refresh_secs),
            campaign_recheck: Duration::from_secs(policy.campaign_recheck_secs),
            template_recheck: Duration::from_secs(policy.template_recheck_secs),
        })
    }

    /// The configured numbers, their ids parsed; their tokens are read only by the worker.
    fn numbers(&self) -> Result<BTreeMap<PhoneNumberId, NumberRuntime>, ConfigError> {
        self.numbers
            .iter()
            .map(|(id, n)| {
                let number = PhoneNumberId::parse(id.clone())
                    .map_err(|e| invalid(&format!("numbers.{id}"), e))?;
                let waba = WabaId::parse(n.waba_id.clone())
                    .map_err(|e| invalid(&format!("numbers.{id}.waba_id"), e))?;
                if !(1..=1000).contains(&n.throughput_mps) {
                    return Err(invalid(
                        &format!("numbers.{id}.throughput_mps"),
                        "must be between 1 and 1000 (Meta's maximum)",
                    ));
                }
                let token = Secret::new(
                    &format!("numbers.{id}.access_token"),
                    &n.access_token,
                    &n.access_token_file,
                );
                Ok((
                    number,
                    NumberRuntime {
                        waba,
                        throughput_mps: n.throughput_mps,
                        token,
                    },
                ))
            })
            .collect()
    }
}

/// The settings as the processes use them, converted once from [`Settings`] by
/// [`Settings::runtime`]: durations are [`Duration`]s, ids are newtypes, lanes are [`Lane`]s.
/// Building a process from it parses nothing again. Secrets stay where the operator put them
/// until the process that needs them reads them ([`Secret::read`]), so a command never fails
/// for a secret file only another process mounts.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// RabbitMQ.
    pub amqp: AmqpRuntime,
    /// Redis (nothing in it needs converting).
    pub redis: RedisSettings,
    /// How to call the Cloud API.
    pub cloud: HttpSettings,
    /// The token of every number without its own.
    pub cloud_token: Secret,
    /// The configured business numbers (possibly none: the simulator needs none).
    pub numbers: BTreeMap<PhoneNumberId, NumberRuntime>,
    /// The send worker.
    pub worker: WorkerRuntime,
    /// The webhook process.
    pub webhook: WebhookRuntime,
    /// The admin API.
    pub admin: AdminRuntime,
    /// `wa-sender simulate`.
    pub simulator: SimulatorSettings,
    /// `wa-sender demo`.
    pub demo: DemoSettings,
    /// The rate card for cost estimates.
    pub pricing: crate::pricing::RateCard,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
}

/// One configured business number, its token not read yet.
#[derive(Debug, Clone)]
pub struct NumberRuntime {
    /// Its WABA.
    pub waba: WabaId,
    /// Its throughput in messages per second.
    pub throughput_mps: u32,
    /// Its own token, if it has one.
    pub token: Secret,
}

/// The worker: its consumer loop, its pipeline's timing and the admission rules.
#[derive(Debug, Clone)]
pub struct WorkerRuntime {
    /// Concurrency, prefetch, lane weights and the drain's grace period.
    pub run: crate::worker::WorkerSettings,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub health_listen: String,
    /// How long a claim protects a job being sent.
    pub claim_lease: Duration,
    /// How long an at-most-once job with an unknown outcome waits for a webhook.
    pub ambiguous_wait: Duration,
    /// Pause after a halting error.
    pub halt_cooldown: Duration,
    /// Retry backoff and attempts.
    pub retry: RetryPolicy,
    /// Admission rules.
    pub admission: AdmissionSettings,
    /// Throughput sharing among replicas.
    pub pacing: PacingSettings,
}

/// RabbitMQ: where it is and how the topology is named and declared.
#[derive(Debug, Clone)]
pub struct AmqpRuntime {
    /// The broker's nodes, `amqp://user:password@host:port/vhost` each (at least one).
    pub urls: Vec<String>,
    /// How many nodes hold a new quorum queue (unset: every node).
    pub quorum_group_size: Option<u32>,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Quorum or classic queues.
    pub queue_type: QueueType,
    /// The delay queues a retry or deferral waits in.
    pub delay_tiers: DelayTiers,
    /// `x-delivery-limit` of quorum queues.
    pub delivery_limit: u32,
    /// The most events kept unread (0: none kept).
    pub events_kept: u64,
}

/// The webhook process: the receiver's address and secrets, the processor's stop words.
#[derive(Debug, Clone)]
pub struct WebhookRuntime {
    /// Where the receiver (and `/healthz`, `/readyz`, `/metrics`) listens.
    pub listen: String,
    /// Intake bodies the processor works on at once.
    pub prefetch: u16,
    /// Whole inbound messages that record a marketing opt-out.
    pub stop_keywords: Vec<String>,
    /// The verify token of the handshake.
    pub verify_token: Secret,
    /// The app secret that signs every POST.
    pub app_secret: Secret,
}

/// The admin API.
#[derive(Debug, Clone)]
pub struct AdminRuntime {
    /// Where it listens.
    pub listen: String,
    /// Its bearer token.
    pub token: Secret,
}

/// A secret as configured: its value, or the file holding it, under its key.
#[derive(Debug, Clone)]
pub struct Secret {
    key: String,
    value: Option<SecretString>,
    file: Option<PathBuf>,
}

impl Secret {
    /// A secret given as it is (the demo's own token), under `key`.
    pub fn given(key: &str, value: SecretString) -> Secret {
        Secret::new(key, &Some(value), &None)
    }

    fn new(key: &str, value: &Option<SecretString>, file: &Option<PathBuf>) -> Secret {
        Secret {
            key: key.to_owned(),
            value: value.clone(),
            file: file.clone(),
        }
    }

    /// Reads it: `None` when neither the value nor the file is set; an error when both are, or
    /// when the file cannot be read or is empty.
    pub fn read(&self) -> Result<Option<SecretString>, ConfigError> {
        secret(&self.key, &self.value, &self.file)
    }
}

/// `value`, unless it is missing or blank: then an error naming the secret's environment
/// variables.
fn required(
    secret: &Secret,
    value: Option<SecretString>,
    missing: &str,
) -> Result<SecretString, ConfigError> {
    value
        .filter(|v| !secrecy::ExposeSecret::expose_secret(v).trim().is_empty())
        .ok_or_else(|| {
            let env = secret.key.to_ascii_uppercase().replace('.', "__");
            invalid(
                &secret.key,
                format!("{missing}: set WA_SENDER__{env} or WA_SENDER__{env}_FILE"),
            )
        })
}

impl Runtime {
    /// Loads the settings like [`Settings::load`] and converts them, once.
    pub fn load(dir: &Path, environment: &str) -> Result<Runtime, ConfigError> {
        Settings::extract(Settings::layers(dir, environment)?)?.runtime()
    }

    /// Extracts settings from any figment and converts them.
    pub fn from_figment(figment: Figment) -> Result<Runtime, ConfigError> {
        Settings::extract(figment)?.runtime()
    }

    /// The configured numbers and the WABA of each; an error when there are none (every
    /// process but the simulator needs one).
    pub fn number_wabas(&self) -> Result<BTreeMap<PhoneNumberId, WabaId>, ConfigError> {
        if self.numbers.is_empty() {
            return Err(invalid(
                "numbers",
                "no business number is configured; add [numbers.<phone_number_id>] with waba_id",
            ));
        }
        Ok(self.wabas())
    }

    /// Each configured number's WABA (none when no number is configured).
    fn wabas(&self) -> BTreeMap<PhoneNumberId, WabaId> {
        self.numbers
            .iter()
            .map(|(id, n)| (id.clone(), n.waba.clone()))
            .collect()
    }

    /// The broker's settings: the connection, and a lane queue per configured number.
    pub fn rabbit(&self) -> RabbitSettings {
        let amqp = &self.amqp;
        RabbitSettings {
            urls: amqp.urls.clone(),
            quorum_group_size: amqp.quorum_group_size,
            prefix: amqp.prefix.clone(),
            queue_type: amqp.queue_type,
            delay_tiers: amqp.delay_tiers.clone(),
            delivery_limit: amqp.delivery_limit,
            numbers: self.numbers.keys().cloned().collect(),
            events_kept: amqp.events_kept,
        }
    }

    /// The pipeline's settings for the replica named `owner` (each replica has its own name,
    /// so two replicas in one process never take each other's claims).
    pub fn pipeline(&self, owner: String) -> PipelineSettings {
        let w = &self.worker;
        PipelineSettings {
            owner,
            delivery_limit: self.amqp.delivery_limit,
            claim_lease: w.claim_lease,
            ambiguous_wait: w.ambiguous_wait,
            halt_cooldown: w.halt_cooldown,
            retry: w.retry.clone(),
            tiers: self.amqp.delay_tiers.clone(),
            admission: w.admission.clone(),
            pacing: w.pacing.clone(),
        }
    }

    /// What the webhook processor needs besides the store and the broker.
    pub fn processor(&self) -> ProcessorSettings {
        ProcessorSettings {
            numbers: self.wabas(),
            stop_keywords: self.webhook.stop_keywords.clone(),
            rate_card: self.pricing.clone(),
            delay_tiers: self.amqp.delay_tiers.clone(),
        }
    }

    /// The configured numbers with their tokens read (the worker's secrets).
    pub fn resolve_numbers(&self) -> Result<BTreeMap<PhoneNumberId, Number>, ConfigError> {
        self.number_wabas()?;
        let default_token = self.cloud_token.read()?;
        self.numbers
            .iter()
            .map(|(id, n)| {
                let token = match n.token.read()? {
                    Some(t) => t,
                    None => default_token.clone().ok_or_else(|| {
                        invalid("cloud.access_token", "is not set: set WA_SENDER__CLOUD__ACCESS_TOKEN or WA_SENDER__CLOUD__ACCESS_TOKEN_FILE")
                    })?,
                };
                let number = Number {
                    waba: n.waba.clone(),
                    throughput_mps: n.throughput_mps,
                    token,
                };
                Ok((id.clone(), number))
            })
            .collect()
    }

    /// The webhook receiver's verify token and app secret; an error when either is missing,
    /// because an unsigned webhook must never be accepted.
    pub fn webhook_secrets(&self) -> Result<ReceiverSettings, ConfigError> {
        let missing = "is not set, and the receiver does not start without it";
        let (verify, app) = (&self.webhook.verify_token, &self.webhook.app_secret);
        let (verify_token, app_secret) = (verify.read()?, app.read()?);
        Ok(ReceiverSettings {
            verify_token: required(verify, verify_token, missing)?,
            app_secret: required(app, app_secret, missing)?,
        })
    }

    /// The admin API's bearer token; an error when none is set, because an admin API open to
    /// anyone could pause every campaign or forge consent.
    pub fn admin_token(&self) -> Result<SecretString, ConfigError> {
        let token = self.admin.token.read()?.ok_or_else(|| {
            invalid(
                "admin.token",
                "is not set, and the admin API does not start without one: set WA_SENDER__ADMIN__TOKEN or WA_SENDER__ADMIN__TOKEN_FILE",
            )
        })?;
        if secrecy::ExposeSecret::expose_secret(&token)
            .trim()
            .is_empty()
        {
            return Err(invalid("admin.token", "is empty"));
        }
        Ok(token)
    }
}

/// A secret from its value or its `_file`; both set is an error.
fn secret(
    key: &str,
    value: &Option<SecretString>,
    file: &Option<PathBuf>,
) -> Result<Option<SecretString>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            format!("set either {key} or {key}_file, not both"),
        )),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, Some(path)) => {
            let raw = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    &format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                return Err(invalid(
                    &format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some(SecretString::from(trimmed.to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// Parses `500ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn figment() -> Figment {
        Figment::new().merge(Toml::file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/default.toml"
        )))
    }

    #[test]
    fn shipped_defaults_are_valid() {
        let runtime = Runtime::from_figment(figment()).unwrap();
        assert_eq!(runtime.rabbit().delay_tiers.all().len(), 7);
    }

    #[test]
    fn errors_name_the_key() {
        let err =
            Settings::from_figment(figment().merge(Serialized::default("worker.concurrency", 0)))
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("worker.concurrency: must be at least 1"),
            "{err}"
        );
        let err =
            Settings::from_figment(figment().merge(Serialized::default("worker.colour", "red")))
                .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err =
            Settings::from_figment(figment().merge(Serialized::default("worker.prefetch", "many")))
                .unwrap_err();
        assert!(err.to_string().contains("worker.prefetch"), "{err}");
        let err = Settings::from_figment(
            figment().merge(Serialized::default("amqp.delay_tiers", ["5x"])),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("amqp.delay_tiers: \"5x\""),
            "{err}"
        );
    }

    #[test]
    fn a_cluster_is_several_broker_addresses_and_one_address_still_works() {
        let runtime = |f: Figment| Settings::from_figment(f).and_then(|s| s.runtime());
        let one = runtime(figment()).unwrap();
        assert_eq!(one.amqp.urls, ["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        let nodes = [
            "amqp://u:p@rabbit-1:5672/%2f",
            "amqps://u:p@rabbit-2:5671/%2f",
        ];
        let cluster = runtime(figment().merge(Serialized::default("amqp.urls", nodes))).unwrap();
        assert_eq!(cluster.amqp.urls, nodes, "urls wins over url");
        assert_eq!(cluster.amqp.quorum_group_size, None);
        let err = runtime(figment().merge(Serialized::default("amqp.urls", ["rabbit-1:5672"])))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("amqp.urls: \"rabbit-1:5672\" is not an amqp:// or amqps:// address"),
            "{err}"
        );
        let err =
            runtime(figment().merge(Serialized::default("amqp.quorum_group_size", 0))).unwrap_err();
        assert!(err.to_string().contains("amqp.quorum_group_size"), "{err}");
        // The password never shows in the error.
        let err = runtime(figment().merge(Serialized::default("amqp.url", "http://u:secret@h")))
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Settings::from_figment(figment().merge(Serialized::default(
            "cloud.access_token",
            "EAAG-very-secret",
        )))
        .unwrap();
        assert!(!format!("{s:?}").contains("very-secret"));
    }

    #[test]
    fn token_from_file_and_both_set_is_an_error() {
        let dir = std::env::temp_dir().join(format!("wa-sender-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "EAAG-from-file\n").unwrap();
        // A number, as an environment variable gives it.
        let numbers = figment().merge(Serialized::default(
            "numbers.106540352242922.waba_id",
            102290129340398u64,
        ));
        let s = Settings::from_figment(
            numbers
                .clone()
                .merge(Serialized::default("cloud.access_token_file", &file)),
        )
        .unwrap();
        let resolved = s.runtime().unwrap().resolve_numbers().unwrap();
        let n = resolved.values().next().unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&n.token),
            "EAAG-from-file"
        );
        let both = numbers
            .merge(Serialized::default("cloud.access_token_file", &file))
            .merge(Serialized::default("cloud.access_token", "x"));
        let err = Runtime::from_figment(both)
            .unwrap()
            .resolve_numbers()
            .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[test]
    fn the_admin_api_needs_a_token() {
        let s = Settings::from_figment(figment()).unwrap();
        assert_eq!(s.admin.listen, "127.0.0.1:8090");
        let err = s.runtime().unwrap().admin_token().unwrap_err();
        assert!(err.to_string().contains("WA_SENDER__ADMIN__TOKEN"), "{err}");
        let s = Settings::from_figment(
            figment().merge(Serialized::default("admin.token", "admin-secret")),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("admin-secret"));
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&s.runtime().unwrap().admin_token().unwrap()),
            "admin-secret"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("h"), None);
    }

    #[test]
    fn trace_export_settings_are_checked() {
        let s = Settings::from_figment(figment()).unwrap();
        assert_eq!(s.telemetry.otlp_endpoint, "", "no export by default");
        for (key, value, problem) in [
            (
                "telemetry.sample_ratio",
                "1.5",
                "telemetry.sample_ratio: 1.5 is not between",
            ),
            (
                "telemetry.otlp_endpoint",
                "localhost:4318",
                "telemetry.otlp_endpoint: \"localhost:4318\" is not an http",
            ),
        ] {
            let value: toml::Value = value.parse::<f64>().map_or(value.into(), Into::into);
            let err = Settings::from_figment(figment().merge(Serialized::default(key, value)))
                .unwrap_err();
            assert!(err.to_string().contains(problem), "{err}");
        }
    }
}
