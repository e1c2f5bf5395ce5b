//! The webhook process: the receiver and the intake processor on one connection, with the
//! probes and `/metrics` beside the receiver, built once from the [`Runtime`] settings and run
//! until shutdown. The receiver serves from the build on: what it takes waits in the durable
//! intake until the processor runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::info;

use crate::broker::Broker;
use crate::broker::rabbit::RabbitBroker;
use crate::config::Runtime;
use crate::health::Health;
use crate::server::HttpServer;
use crate::store::Store;
use crate::webhook::processor::Processor;
use crate::webhook::receiver::{self, ReceiverSettings};

/// A webhook process ready to serve: `wa-sender webhook`, a test's, the demo's.
pub struct WebhookApp {
    addr: SocketAddr,
    serving: JoinHandle<std::io::Result<()>>,
    /// Stops the receiver when the processor stops, or when the app is dropped unrun.
    stop_serving: DropGuard,
    processor: Arc<Processor>,
    prefetch: u16,
    /// The broker this app connected itself, closed when it stops.
    owned: Option<Arc<RabbitBroker>>,
}

impl WebhookApp {
    /// The webhook process as `wa-sender webhook` runs it, listening on `listen` (default
    /// `webhook.listen`). Its secrets are read first: without them it refuses before it
    /// connects to anything.
    pub async fn build(runtime: &Runtime, listen: Option<&str>) -> anyhow::Result<Self> {
        let secrets = runtime.webhook_secrets()?;
        runtime.number_wabas()?;
        let broker = Arc::new(RabbitBroker::connect(runtime.rabbit()).await?);
        let store = super::connect_store(runtime).await?;
        super::check_persistence(&store, runtime).await?;
        let listen = listen.unwrap_or(&runtime.webhook.listen);
        let mut app = Self::with_parts(runtime, listen, secrets, broker.clone(), store)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        app.owned = Some(broker);
        info!(addr = %app.addr, "webhook receiver listening; processing the intake");
        Ok(app)
    }

    /// A webhook process over a broker and a store the caller connected (and closes), with
    /// these secrets, serving on `listen` (`127.0.0.1:0` for a free port) from now on.
    pub async fn with_parts(
        runtime: &Runtime,
        listen: &str,
        secrets: ReceiverSettings,
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        Self::on_listener(runtime, listener, secrets, broker, store)
    }

    /// The same on a listener already bound: its address can be given to whoever sends the
    /// webhooks (a simulator's scenario) before the broker and the store exist.
    pub fn on_listener(
        runtime: &Runtime,
        listener: tokio::net::TcpListener,
        secrets: ReceiverSettings,
        broker: Arc<dyn Broker>,
        store: Arc<dyn Store>,
    ) -> std::io::Result<Self> {
        let processor = Arc::new(Processor::new(broker.clone(), store, runtime.processor()));
        let router = receiver::router(broker, secrets)
            .merge(crate::health::router(processor.health()))
            .merge(crate::metrics::router());
        let server = HttpServer::on(listener, crate::metrics::count_requests(router));
        let addr = server.addr()?;
        let stop = CancellationToken::new();
        let serving = tokio::spawn(server.run_until_stopped(stop.clone()));
        Ok(WebhookApp {
            addr,
            serving,
            stop_serving: stop.drop_guard(),
            processor,
            prefetch: runtime.webhook.prefetch,
            owned: None,
        })
    }

    /// Where the receiver, the probes and `/metrics` answer.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its processor (for its counters).
    pub fn processor(&self) -> &Arc<Processor> {
        &self.processor
    }

    /// Its readiness: consuming the intake, Redis answering.
    pub fn health(&self) -> Health {
        self.processor.health()
    }

    /// Processes the intake until `shutdown` is cancelled, then stops the receiver; a processor
    /// that stops takes the receiver down with it, so there is no silent half. Logs what the
    /// processor did and closes the broker it connected.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let processed = self.processor.run(self.prefetch, shutdown).await;
        drop(self.stop_serving);
        let served = self.serving.await.context("the receiver's task")?;
        let stats = self.processor.stats();
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
        info!(
            bodies = count(&stats.bodies),
            statuses = count(&stats.statuses),
            events = count(&stats.events),
            duplicates = count(&stats.duplicates),
            stale = count(&stats.stale),
            parked = count(&stats.parked),
            requeued = count(&stats.requeued),
            "webhook processor stopped"
        );
        if let Some(broker) = self.owned {
            broker.close().await;
        }
        served.context("serving the receiver")?;
        processed.context("processing the intake")?;
        Ok(())
    }
}
