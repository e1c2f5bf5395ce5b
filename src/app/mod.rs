//! Wiring: turns the [`Runtime`] settings into connected parts and running processes. Each
//! long-running process has one builder ([`WorkerApp`], [`WebhookApp`]) with
//! `run_until_stopped(shutdown)`; `main`, the tests, the benches and the demo all build through
//! here, so they run the same code.

mod webhook;
mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::admin::Admin;
use crate::broker::Broker;
use crate::broker::rabbit::RabbitBroker;
use crate::cloud::HttpCloud;
use crate::config::{Number, Runtime};
use crate::ids::PhoneNumberId;
use crate::job::Lane;
use crate::pipeline::Pipeline;
use crate::producer::Producer;
use crate::store::StoreError;
use crate::store::redis::{Deployment, RedisStore};

pub use self::webhook::WebhookApp;
pub use self::worker::WorkerApp;
pub use crate::server::HttpServer;

/// Connects to RabbitMQ and Redis (declaring the topology). Errors say how to start them.
pub async fn connect(settings: &Runtime) -> anyhow::Result<(Arc<RabbitBroker>, Arc<RedisStore>)> {
    settings.number_wabas()?;
    let broker = RabbitBroker::connect(settings.rabbit()).await?;
    let store = open_store(settings).await?;
    check_persistence(&store, settings).await?;
    Ok((Arc::new(broker), Arc::new(store)))
}

/// Connects to the configured Redis, or Redis Cluster when `redis.cluster_urls` is set.
async fn open_store(settings: &Runtime) -> Result<RedisStore, StoreError> {
    let redis = &settings.redis;
    let at = if redis.cluster_urls.is_empty() {
        Deployment::Single(&redis.url)
    } else {
        Deployment::Cluster(&redis.cluster_urls)
    };
    RedisStore::connect_to(at, &redis.key_prefix).await
}

/// Where Redis is, without credentials.
fn redis_address(settings: &Runtime) -> String {
    let redis = &settings.redis;
    if redis.cluster_urls.is_empty() {
        return crate::broker::rabbit::redact(&redis.url);
    }
    let nodes: Vec<String> = redis
        .cluster_urls
        .iter()
        .map(|u| crate::broker::rabbit::redact(u))
        .collect();
    format!("the Redis Cluster of {}", nodes.join(", "))
}

/// Refuses a Redis that keeps nothing on disk unless `redis.allow_volatile` accepts the risk.
pub async fn check_persistence(store: &RedisStore, settings: &Runtime) -> anyhow::Result<()> {
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
            redis_address(settings)
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
    settings: &Runtime,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<RabbitBroker>, Arc<RedisStore>)> {
    settings.number_wabas()?;
    let rabbit = settings.rabbit();
    let broker = wait_for("RabbitMQ", shutdown, || {
        RabbitBroker::connect(rabbit.clone())
    })
    .await?;
    let store = wait_for("Redis", shutdown, || open_store(settings)).await?;
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
pub async fn connect_store(settings: &Runtime) -> Result<Arc<RedisStore>, StoreError> {
    Ok(Arc::new(open_store(settings).await?))
}

/// The admin operations over the store and the configured numbers.
pub async fn admin(settings: &Runtime) -> anyhow::Result<Admin> {
    let numbers = settings.number_wabas()?;
    let store = connect_store(settings).await?;
    Ok(Admin::new(store, numbers)?.with_currency(&settings.pricing.currency))
}

/// The admin operations with the queues too: the dead-letter commands and the admin API.
pub async fn admin_with_queues(settings: &Runtime) -> anyhow::Result<Admin> {
    settings.number_wabas()?;
    let broker = RabbitBroker::connect(settings.rabbit()).await?;
    Ok(admin(settings).await?.with_broker(Arc::new(broker)))
}

/// The admin API as `wa-sender admin` serves it, bound to `listen` (default `admin.listen`).
/// The token is read first: without one it refuses before it connects to anything.
pub async fn admin_server(settings: &Runtime, listen: Option<&str>) -> anyhow::Result<HttpServer> {
    let token = settings.admin_token()?;
    let admin = admin_with_queues(settings).await?;
    let listen = listen.unwrap_or(&settings.admin.listen);
    let server = crate::admin::http::AdminServer::bind(listen, admin, &token)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(addr = %server.addr()?, "admin API listening");
    Ok(server)
}

/// The HTTP Cloud API client.
pub fn http_cloud(settings: &Runtime) -> anyhow::Result<HttpCloud> {
    Ok(HttpCloud::new(&settings.cloud)?)
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

/// Builds a pipeline over the given parts, as a replica of its own.
pub fn pipeline(
    settings: &Runtime,
    cloud: Arc<dyn crate::cloud::CloudApi>,
    broker: Arc<dyn Broker>,
    store: Arc<dyn crate::store::Store>,
    numbers: BTreeMap<PhoneNumberId, Number>,
) -> Pipeline {
    let settings = settings.pipeline(replica_id());
    Pipeline::new(cloud, broker, store, numbers, settings)
}

/// Publishes one job body to its number's lane (routing key `<lane>.<phone_number_id>`, read
/// from the body) under a producer span, whose trace context the job carries, and waits for the
/// confirm: one [`Producer`] publish. Whatever the body is, it is published (tests use this to
/// put bad jobs before the worker); its `job_id`, when it has one, is the message id.
pub async fn enqueue(
    broker: &dyn Broker,
    lane: Lane,
    body: Vec<u8>,
) -> Result<(), crate::broker::BrokerError> {
    let job_id = crate::job::salvage_job_id(&body);
    let mut producer = Producer::new(broker, 1);
    producer
        .publish(lane, job_id.as_deref(), body.into(), 0)
        .await?;
    producer.flush().await
}

/// Connects to RabbitMQ only and declares the topology of the configured numbers: what a
/// producer (`wa-sender enqueue`) and `wa-sender setup` need, so jobs can be published before
/// any worker ever ran.
pub async fn connect_broker(settings: &Runtime) -> anyhow::Result<Arc<RabbitBroker>> {
    settings.number_wabas()?;
    Ok(Arc::new(RabbitBroker::connect(settings.rabbit()).await?))
}
