//! Serving HTTP: a router bound to its address, run until shutdown. The admin API and the webhook
//! receiver are served through it (`app` re-exports it for the wiring).

/// An HTTP service bound to its address (the admin API, the webhook receiver).
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    router: axum::Router,
}

impl HttpServer {
    /// Binds `listen` (`127.0.0.1:0` for a free port).
    pub async fn bind(listen: &str, router: axum::Router) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        Ok(HttpServer { listener, router })
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then finishes the requests in flight.
    pub async fn run_until_stopped(
        self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}
