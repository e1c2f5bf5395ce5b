//! Wiring: turns [`Settings`] into connected parts. `main`, the tests, the benches and the demo
//! all build through here, so they run the same code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, warn};

use crate::admin::Admin;
use crate::broker::rabbit::{RabbitBroker, RabbitSettings};
use crate::broker::{Broker, Envelope, H_TRACEPARENT, Headers, Route, Target};
use crate::cloud::{HttpCloud, HttpSettings};
use crate::config::{ConfigError, Number, Settings};
use crate::ids::{PhoneNumberId, WabaId};
use crate::job::Lane;
use crate::pipeline::{AdmissionSettings, PacingSettings, Pipeline, PipelineSettings};
use crate::policy::admission::PairRate;
use crate::store::StoreError;
use crate::store::redis::RedisStore;
use crate::worker::WorkerSettings;

pub use crate::server::HttpServer;

/// RabbitMQ settings from the configuration.
pub fn rabbit_settings(settings: &Settings) -> Result<RabbitSettings, ConfigError> {
    Ok(RabbitSettings {
        url: settings.amqp.url.clone(),
        prefix: settings.amqp.prefix.clone(),
        queue_type: settings.amqp.queue_type,
        delay_tiers: settings.delay_tiers()?,
        delivery_limit: settings.amqp.delivery_limit,
        numbers: settings.number_wabas()?.into_keys().collect(),
    })
}

/// Connects to RabbitMQ and Redis (declaring the topology). Errors say how to start them.
pub async fn connect(settings: &Settings) -> anyhow::Result<(Arc<RabbitBroker>, Arc<RedisStore>)> {
    let broker = RabbitBroker::connect(rabbit_settings(settings)?).await?;
    let store = RedisStore::connect(&settings.redis.url, &settings.redis.key_prefix).await?;
    check_persistence(&store, settings).await?;
    Ok((Arc::new(broker), Arc::new(store)))
}

/// Refuses a Redis that keeps nothing on disk unless `redis.allow_volatile` accepts the risk.
pub async fn check_persistence(store: &RedisStore, settings: &Settings) -> anyhow::Result<()> {
    let risk = "a Redis restart loses the idempotency records (a redelivered job that was sent \
                can be sent again), care windows, consent and pair-rate state";
    match store.persists().await {
        Ok(Some(true)) => Ok(()),
        Ok(Some(false)) if settings.redis.allow_volatile => {
            warn!(
                "Redis keeps nothing on disk (no AOF, no RDB save points), allowed by redis.allow_volatile: {risk}"
            );
            Ok(())
        }
        Ok(Some(false)) => anyhow::bail!(
            "Redis at {} keeps nothing on disk (no AOF, no RDB save points): {risk}. Turn on \
             persistence (appendonly yes), or accept the risk with redis.allow_volatile = true \
             (WA_SENDER__REDIS__ALLOW_VOLATILE=true)",
            crate::broker::rabbit::redact(&settings.redis.url)
        ),
        Ok(None) => {
            warn!(
                "cannot tell whether Redis persists (CONFIG GET is not allowed here); make sure it does: {risk}"
            );
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "cannot tell whether Redis persists; make sure it does: {risk}");
            Ok(())
        }
    }
}

/// Connects like [`connect`], but waits for RabbitMQ and Redis while they are not up yet (a
/// worker started before its broker), saying so in the log before each pause; gives up only
/// when `shutdown` is cancelled.
pub async fn connect_waiting(
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<RabbitBroker>, Arc<RedisStore>)> {
    let rabbit = rabbit_settings(settings)?;
    let broker = wait_for("RabbitMQ", shutdown, || {
        RabbitBroker::connect(rabbit.clone())
    })
    .await?;
    let store = wait_for("Redis", shutdown, || {
        RedisStore::connect(&settings.redis.url, &settings.redis.key_prefix)
    })
    .await?;
    check_persistence(&store, settings).await?;
    Ok((Arc::new(broker), Arc::new(store)))
}

/// Tries `attempt` until it succeeds, pausing longer after each failure (the worker's
/// reconnection pauses).
async fn wait_for<T, E, F>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> F,
) -> anyhow::Result<T>
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut pauses = crate::worker::reconnect_pauses();
    loop {
        let e = match attempt().await {
            Ok(connected) => return Ok(connected),
            Err(e) => e,
        };
        let pause = pauses.next().unwrap_or(Duration::from_secs(30));
        warn!(
            error = %e,
            retry_in_ms = pause.as_millis() as u64,
            "{what} is not reachable; waiting for it"
        );
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => anyhow::bail!("stopped while waiting for {what}: {e}"),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Connects to Redis only: what the admin commands need but those about dead letters.
pub async fn connect_store(settings: &Settings) -> Result<Arc<RedisStore>, StoreError> {
    let store = RedisStore::connect(&settings.redis.url, &settings.redis.key_prefix).await?;
    Ok(Arc::new(store))
}

/// The admin operations over the store and the configured numbers.
pub async fn admin(settings: &Settings) -> anyhow::Result<Admin> {
    let numbers = settings.number_wabas()?;
    let store = connect_store(settings).await?;
    Ok(Admin::new(store, numbers)?)
}

/// The admin operations with the queues too: the dead-letter commands and the admin API.
pub async fn admin_with_queues(settings: &Settings) -> anyhow::Result<Admin> {
    let broker = RabbitBroker::connect(rabbit_settings(settings)?).await?;
    Ok(admin(settings).await?.with_broker(Arc::new(broker)))
}

/// The HTTP Cloud API client.
pub fn http_cloud(settings: &Settings) -> anyhow::Result<HttpCloud> {
    Ok(HttpCloud::new(&HttpSettings {
        base_url: settings.cloud.base_url.clone(),
        api_version: settings.cloud.api_version.clone(),
        request_timeout: Duration::from_millis(settings.cloud.request_timeout_ms),
        connect_timeout: Duration::from_millis(settings.cloud.connect_timeout_ms),
        pool_max_idle_per_host: settings.cloud.pool_max_idle_per_host,
    })?)
}

/// Pipeline timing from the configuration; `owner` names this replica in claims.
pub fn pipeline_settings(
    settings: &Settings,
    owner: String,
) -> Result<PipelineSettings, ConfigError> {
    Ok(PipelineSettings {
        owner,
        claim_lease: Duration::from_secs(settings.worker.claim_lease_secs),
        ambiguous_wait: Duration::from_secs(settings.worker.ambiguous_wait_secs),
        halt_cooldown: Duration::from_secs(settings.worker.halt_cooldown_secs),
        retry: settings.retry_policy(),
        tiers: settings.delay_tiers()?,
        admission: admission_settings(settings)?,
        pacing: PacingSettings {
            group: settings.worker.group.clone(),
            heartbeat: Duration::from_millis(settings.worker.heartbeat_ms),
            replica_ttl: Duration::from_millis(settings.worker.replica_ttl_ms),
            headroom: settings.worker.throughput_headroom,
            throttle_cooldown: Duration::from_secs(settings.worker.throttle_cooldown_secs),
        },
    })
}

/// Admission rules from the configuration.
pub fn admission_settings(settings: &Settings) -> Result<AdmissionSettings, ConfigError> {
    let policy = &settings.policy;
    let mut tiers = BTreeMap::new();
    let mut default_tier = Some(250);
    for (key, limit) in &policy.messaging_limits {
        if key == "default" {
            default_tier = limit.users();
        } else {
            let waba = WabaId::parse(key.clone())
                .map_err(|e| ConfigError(format!("policy.messaging_limits.{key}: {e}")))?;
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

/// Worker loop settings from the configuration.
pub fn worker_settings(settings: &Settings) -> WorkerSettings {
    WorkerSettings {
        concurrency: settings.worker.concurrency,
        prefetch: settings.worker.prefetch,
        lane_weights: settings
            .worker
            .lane_weights
            .iter()
            .filter_map(|(k, v)| Some((Lane::parse(k)?, *v)))
            .collect(),
        shutdown_grace: Duration::from_secs(settings.worker.shutdown_grace_secs),
    }
}

/// A unique name for this replica: host, process id and a random suffix.
pub fn replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Builds a pipeline over the given parts.
pub fn pipeline(
    settings: &Settings,
    cloud: Arc<dyn crate::cloud::CloudApi>,
    broker: Arc<dyn Broker>,
    store: Arc<dyn crate::store::Store>,
    numbers: BTreeMap<PhoneNumberId, Number>,
) -> Result<Pipeline, ConfigError> {
    Ok(Pipeline::new(
        cloud,
        broker,
        store,
        numbers,
        pipeline_settings(settings, replica_id())?,
    ))
}

/// Publishes one job body to its number's lane (routing key `<lane>.<phone_number_id>`, read
/// from the body) under a producer span, whose trace context the job carries: what a producer
/// does.
pub async fn enqueue(
    broker: &dyn Broker,
    lane: Lane,
    body: Vec<u8>,
) -> Result<(), crate::broker::BrokerError> {
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        lane = lane.as_str()
    );
    async move {
        let mut headers = Headers::default();
        crate::telemetry::inject_current(&mut headers);
        if !headers.0.contains_key(H_TRACEPARENT) {
            // No tracing subscriber: start a trace per job so the job is still one trace.
            let trace_id = uuid::Uuid::new_v4().simple().to_string();
            let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
            headers.set_str(H_TRACEPARENT, format!("00-{trace_id}-{span_id}-01"));
        }
        let route = Route::of(lane, &body);
        broker
            .publish(
                Target::Job(route),
                Envelope {
                    body: body.into(),
                    headers,
                },
            )
            .await
    }
    .instrument(span)
    .await
}
