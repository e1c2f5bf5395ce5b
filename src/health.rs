//! Liveness and readiness of a long-running process, for its orchestrator: `/healthz` answers
//! while the process runs, `/readyz` says whether it can do its work now. The worker serves
//! them on `worker.health_listen`; the webhook process, the admin API and the simulator on
//! their own port.
//!
//! What readiness depends on is recorded in a [`Health`] handle that the code owning each part
//! keeps up to date: the consumer loop says whether it is consuming from RabbitMQ, the drain
//! says when it has begun. Redis alone is asked live, at request time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::store::Store;

/// How long `/readyz` waits for Redis to answer a `PING` before calling it down: well under
/// the one second a Kubernetes probe waits by default.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// What a process's readiness depends on; cheap to clone, shared by whoever updates a part and
/// the server answering `/readyz`.
#[derive(Clone)]
pub struct Health(Arc<Parts>);

struct Parts {
    /// `None`: the process does not consume from RabbitMQ. Otherwise whether it is consuming:
    /// set by the consumer loop, the one place that knows (a lost connection ends its session,
    /// and only consuming again proves the broker is back).
    consuming: Option<AtomicBool>,
    /// `None`: the process does not use Redis. Otherwise its store once connected, pinged on
    /// each `/readyz`. Asked live rather than kept as a flag because no single loop talks to
    /// Redis all the time: a flag would only say what the last command happened to meet.
    redis: Option<OnceLock<Arc<dyn Store>>>,
    /// Shutdown has begun: the process finishes its work and takes no more.
    draining: AtomicBool,
}

/// A part readiness depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Usable.
    Up,
    /// Not usable now.
    Down,
    /// Not connected yet: the process connects to RabbitMQ first, then to Redis, so Redis is
    /// not said to be down while the broker is awaited.
    Connecting,
}

impl Part {
    fn of(up: bool) -> Part {
        if up { Part::Up } else { Part::Down }
    }
}

/// The body of `/readyz`: `{"ready":true,"broker":"up","redis":"up","draining":false}`, without
/// the parts the process does not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Every part is up and the process is not draining.
    pub ready: bool,
    /// Consuming from RabbitMQ (absent when the process does not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<Part>,
    /// Redis answers (absent when the process does not use it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<Part>,
    /// Shutdown has begun.
    pub draining: bool,
}

impl Health {
    fn new(consumes: bool, uses_redis: bool) -> Health {
        Health(Arc::new(Parts {
            consuming: consumes.then(|| AtomicBool::new(false)),
            redis: uses_redis.then(OnceLock::new),
            draining: AtomicBool::new(false),
        }))
    }

    /// Ready whenever it runs (the simulator).
    pub fn always() -> Health {
        Health::new(false, false)
    }

    /// Ready while Redis answers (the admin API).
    pub fn of_store(store: Arc<dyn Store>) -> Health {
        let health = Health::new(false, true);
        health.redis_connected(store);
        health
    }

    /// Ready while it consumes from RabbitMQ and Redis answers (the worker, the webhook
    /// process). Not ready until its loop starts consuming and it is given its store: a
    /// process still waiting for its broker or Redis is alive but not ready.
    pub fn of_consumer() -> Health {
        Health::new(true, true)
    }

    /// The process is connected to Redis through `store`; a second store is ignored.
    pub fn redis_connected(&self, store: Arc<dyn Store>) {
        if let Some(redis) = &self.0.redis {
            let _ = redis.set(store);
        }
    }

    /// The consumer loop started consuming (`true`) or lost the broker (`false`).
    pub fn set_consuming(&self, consuming: bool) {
        if let Some(flag) = &self.0.consuming {
            flag.store(consuming, Ordering::Relaxed);
        }
    }

    /// Shutdown has begun: not ready from now on, however the parts are.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }

    /// The state of each part now, Redis asked with a `PING` of at most [`REDIS_TIMEOUT`].
    pub async fn readiness(&self) -> Readiness {
        let broker = self
            .0
            .consuming
            .as_ref()
            .map(|flag| Part::of(flag.load(Ordering::Relaxed)));
        let redis = match &self.0.redis {
            None => None,
            Some(store) => Some(match store.get() {
                None => Part::Connecting,
                Some(store) => Part::of(matches!(
                    tokio::time::timeout(REDIS_TIMEOUT, store.ping()).await,
                    Ok(Ok(()))
                )),
            }),
        };
        let draining = self.0.draining.load(Ordering::Relaxed);
        Readiness {
            ready: !draining
                && [broker, redis]
                    .iter()
                    .all(|part| matches!(part, None | Some(Part::Up))),
            broker,
            redis,
            draining,
        }
    }
}

/// `GET /healthz` (200 `ok` while the process runs) and `GET /readyz` (200 when ready, else
/// 503; the JSON body says which part is down). Merge it into a process's router outside any
/// authentication: probes carry no credentials and these say nothing secret.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(health)
}

async fn ready(State(health): State<Health>) -> Response {
    let readiness = health.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn a_consumer_is_ready_only_while_consuming_connected_and_not_draining() {
        let health = Health::of_consumer();
        let state = health.readiness().await;
        assert!(!state.ready);
        assert_eq!(state.broker, Some(Part::Down));
        assert_eq!(
            state.redis,
            Some(Part::Connecting),
            "no store yet: not said down while the broker is awaited"
        );

        health.redis_connected(Arc::new(MemoryStore::new()));
        assert!(!health.readiness().await.ready, "not consuming yet");
        health.set_consuming(true);
        assert_eq!(
            health.readiness().await,
            Readiness {
                ready: true,
                broker: Some(Part::Up),
                redis: Some(Part::Up),
                draining: false
            }
        );

        health.set_consuming(false);
        assert!(!health.readiness().await.ready, "broker lost");
        health.set_consuming(true);
        health.start_draining();
        let state = health.readiness().await;
        assert!(!state.ready && state.draining);
    }

    #[tokio::test]
    async fn the_body_names_only_the_parts_the_process_uses() {
        let body = |r: Readiness| serde_json::to_value(r).unwrap();
        assert_eq!(
            body(Health::always().readiness().await),
            serde_json::json!({"ready": true, "draining": false})
        );
        let admin = Health::of_store(Arc::new(MemoryStore::new()));
        assert_eq!(
            body(admin.readiness().await),
            serde_json::json!({"ready": true, "redis": "up", "draining": false})
        );
        assert_eq!(
            body(Health::of_consumer().readiness().await),
            serde_json::json!({"ready": false, "broker": "down", "redis": "connecting", "draining": false})
        );
    }
}
