//! The worker process: its probes, its connections, its pipeline and its consumer loops, built
//! once from the [`Runtime`] settings and run until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::broker::rabbit::RabbitBroker;
use crate::broker::{Broker, BrokerError};
use crate::config::Runtime;
use crate::health::Health;
use crate::pipeline::Pipeline;
use crate::server::HttpServer;
use crate::store::Store;
use crate::worker::{Drained, WorkerSettings};

/// A worker ready to consume: `wa-sender worker`, a test's replica, a bench's worker.
pub struct WorkerApp {
    pipeline: Arc<Pipeline>,
    broker: Arc<dyn Broker>,
    settings: WorkerSettings,
    health: Health,
    /// The broker this app connected itself, closed when it stops.
    owned: Option<Arc<RabbitBroker>>,
    /// `/healthz`, `/readyz` and `/metrics`, served from the build until the drain has ended.
    probes: Option<Probes>,
}

impl WorkerApp {
    /// The worker as `wa-sender worker` runs it. The numbers' tokens are read first, so a
    /// missing one stops it before it connects to anything. Its probes are served on
    /// `worker.health_listen` before it connects: a worker waiting for its broker is alive and
    /// says it is not ready. It waits for RabbitMQ and Redis until `shutdown`.
    pub async fn build(runtime: &Runtime, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let numbers = runtime.resolve_numbers()?;
        let health = Health::of_consumer();
        let probes = Probes::serve(&runtime.worker.health_listen, health.clone()).await?;
        let (broker, store) = match super::connect_waiting(runtime, shutdown).await {
            Ok(parts) => parts,
            Err(e) => {
                probes.stop().await;
                return Err(e);
            }
        };
        let cloud = Arc::new(super::http_cloud(runtime)?);
        let pipeline = super::pipeline(runtime, cloud, broker.clone(), store.clone(), numbers);
        let mut app = Self::assemble(runtime, pipeline, broker.clone(), store, health);
        app.owned = Some(broker);
        app.probes = Some(probes);
        Ok(app)
    }

    /// A worker over a broker and a store the caller connected (and closes), calling the Cloud
    /// API over HTTP with the configured numbers' tokens. It serves no probes: [`Self::health`]
    /// is there to serve or to look at.
    pub fn with_parts(
        runtime: &Runtime,
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
    ) -> anyhow::Result<Self> {
        let numbers = runtime.resolve_numbers()?;
        let cloud = Arc::new(super::http_cloud(runtime)?);
        let pipeline = super::pipeline(runtime, cloud, broker.clone(), store.clone(), numbers);
        Ok(Self::assemble(
            runtime,
            pipeline,
            broker,
            store,
            Health::of_consumer(),
        ))
    }

    fn assemble(
        runtime: &Runtime,
        pipeline: Pipeline,
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
        health: Health,
    ) -> Self {
        health.redis_connected(store);
        WorkerApp {
            pipeline: Arc::new(pipeline),
            broker,
            settings: runtime.worker.run.clone(),
            health,
            owned: None,
            probes: None,
        }
    }

    /// Its readiness: consuming, Redis answering, not draining.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Where its probes answer, when it serves them.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.probes.as_ref().map(|p| p.addr)
    }

    /// Its pipeline (for its counters).
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Consumes until `shutdown` is cancelled, then drains (see [`crate::worker::run`]); closes
    /// the broker it connected and stops its probes only after the drain, so they say
    /// `draining` until then.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
    ) -> Result<Drained, BrokerError> {
        let drained = crate::worker::run(
            self.pipeline,
            self.broker,
            self.settings,
            self.health,
            shutdown,
        )
        .await;
        if let Some(broker) = self.owned {
            broker.close().await;
        }
        if let Some(probes) = self.probes {
            probes.stop().await;
        }
        drained
    }
}

/// The worker's probe server, running.
struct Probes {
    addr: SocketAddr,
    stop: CancellationToken,
    serving: JoinHandle<std::io::Result<()>>,
}

impl Probes {
    async fn serve(listen: &str, health: Health) -> anyhow::Result<Probes> {
        let router = crate::health::router(health).merge(crate::metrics::router());
        let server = HttpServer::bind(listen, router)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = server.addr()?;
        info!(%addr, "worker health at /healthz and /readyz, metrics at /metrics");
        let stop = CancellationToken::new();
        let serving = tokio::spawn(server.run_until_stopped(stop.clone()));
        Ok(Probes {
            addr,
            stop,
            serving,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.serving.await;
    }
}
