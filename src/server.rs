//! Serving HTTP: a router bound to its address, run until shutdown. The admin API and the webhook
//! receiver are served through it (`app` re-exports it for the wiring). Its own accept loop
//! bounds what clients can hold: a deadline for a request's headers and one for the whole
//! request (a client that sends half a body gets 408), a cap on open connections, and a grace
//! period after shutdown after which the connections still open are closed.

use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// What one client may hold of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time from a request's headers to its answer, reading the body included; 408 after it.
    pub request_timeout: Duration,
    /// Connections open at once; the next ones wait to be accepted.
    pub max_connections: usize,
    /// Time the requests in flight get to finish after shutdown; the connections still open
    /// then are closed.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// An HTTP service bound to its address (the admin API, the webhook receiver).
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: ServerLimits,
}

impl HttpServer {
    /// Binds `listen` (`127.0.0.1:0` for a free port), with the default [`ServerLimits`].
    pub async fn bind(listen: &str, router: axum::Router) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        Ok(HttpServer::on(listener, router))
    }

    /// Serves on a listener already bound (its address was needed before the router could be
    /// built), with the default [`ServerLimits`].
    pub fn on(listener: tokio::net::TcpListener, router: axum::Router) -> HttpServer {
        HttpServer {
            listener,
            router,
            limits: ServerLimits::default(),
        }
    }

    /// The same server with other limits.
    pub fn with_limits(self, limits: ServerLimits) -> HttpServer {
        HttpServer { limits, ..self }
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then lets the requests in flight finish within the
    /// grace period and closes what is still open: it returns within the grace period whatever
    /// clients do.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let limits = self.limits;
        let router = self.router.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => (
                        axum::http::StatusCode::REQUEST_TIMEOUT,
                        "the request took too long to arrive",
                    )
                        .into_response(),
                }
            },
        ));
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let graceful = GracefulShutdown::new();
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                p = Arc::clone(&permits).acquire_owned() => p.expect("never closed"),
            };
            let stream = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        warn!(error = %e, "could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(router.clone()),
                );
            let connection = graceful.watch(connection);
            connections.spawn(async move {
                let _ = connection.await;
                drop(permit);
            });
        }
        drop(self.listener);
        let open = connections.len();
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(limits.shutdown_grace) => {
                warn!(open, "closing the connections still open after the grace period");
            }
        }
        connections.abort_all();
        Ok(())
    }
}
