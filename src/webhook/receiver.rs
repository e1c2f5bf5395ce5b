//! The webhook receiver: Meta's verification handshake (`GET`), and `POST`s verified with
//! `X-Hub-Signature-256` over the raw body in constant time, then published, confirmed, to
//! `wa.webhooks.intake` *before* the 200. If the broker cannot take it, the answer is 503 and
//! Meta retries (for up to 7 days): a webhook is never acknowledged and then lost.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use crate::broker::{Broker, Envelope, Headers, Target};

/// Meta's upper bound for one webhook POST.
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// The header carrying `sha256=<hex HMAC of the raw body with the app secret>`.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Set on intake messages: when the receiver took the body (RFC 3339).
pub const H_RECEIVED_AT: &str = "x-wa-received-at";

/// What the receiver needs to know.
#[derive(Clone)]
pub struct ReceiverSettings {
    /// The token configured in the App Dashboard for the verification handshake.
    pub verify_token: SecretString,
    /// The app secret that signs every POST.
    pub app_secret: SecretString,
}

struct Receiver {
    broker: Arc<dyn Broker>,
    settings: ReceiverSettings,
}

/// The receiver's routes: `GET|POST /webhook`. The webhook process serves `/healthz` and
/// `/readyz` beside them ([`crate::health::router`] of the processor's health).
pub fn router(broker: Arc<dyn Broker>, settings: ReceiverSettings) -> Router {
    let state = Arc::new(Receiver { broker, settings });
    Router::new()
        .route("/webhook", get(handshake).post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// `hub.mode`, `hub.verify_token`, `hub.challenge`.
#[derive(Deserialize)]
struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

async fn handshake(
    State(receiver): State<Arc<Receiver>>,
    Query(query): Query<Handshake>,
) -> Response {
    let expected = receiver.settings.verify_token.expose_secret().as_bytes();
    let token_ok = query
        .verify_token
        .as_deref()
        .is_some_and(|t| bool::from(t.as_bytes().ct_eq(expected)));
    match (query.mode.as_deref(), token_ok, query.challenge) {
        (Some("subscribe"), true, Some(challenge)) => (StatusCode::OK, challenge).into_response(),
        _ => {
            warn!("webhook verification refused: wrong mode, token or missing challenge");
            error(
                StatusCode::FORBIDDEN,
                "verification failed: hub.mode must be subscribe, hub.verify_token must match and hub.challenge must be given",
            )
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": {"message": message}})),
    )
        .into_response()
}

/// Checks `sha256=<hex>` against the HMAC-SHA256 of `body` in constant time.
pub fn signature_valid(app_secret: &[u8], body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_digest) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(digest) = hex::decode(hex_digest.trim()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        );
    }
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let secret = receiver.settings.app_secret.expose_secret().as_bytes();
    // CORRECTNESS: verify the raw bytes before anything parses them; Meta signs the body as
    // sent (escaped unicode and all), so re-serialised JSON would not match.
    if !signature_valid(secret, &body, signature) {
        warn!(
            has_signature = signature.is_some(),
            bytes = body.len(),
            "webhook refused: bad or missing X-Hub-Signature-256"
        );
        return error(
            StatusCode::UNAUTHORIZED,
            "X-Hub-Signature-256 is missing or does not match the body",
        );
    }
    let mut envelope_headers = Headers::default();
    envelope_headers.set_str(H_RECEIVED_AT, chrono::Utc::now().to_rfc3339());
    let envelope = Envelope {
        body,
        headers: envelope_headers,
    };
    // CORRECTNESS: 200 only once the broker confirmed the body; otherwise 503 and Meta retries.
    match receiver.broker.publish(Target::Intake, envelope).await {
        Ok(()) => {
            debug!("webhook taken into the intake queue");
            StatusCode::OK.into_response()
        }
        Err(e) => {
            warn!(error = %e, "webhook not taken: the intake queue is unavailable, answering 503 so Meta retries");
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the intake queue is unavailable; retry later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_over_the_raw_bytes() {
        // python3 -c "import hmac,hashlib;print(hmac.new(b'secret',b'body',hashlib.sha256).hexdigest())"
        let good = "sha256=dc46983557fea127b43af721467eb9b3fde2338fe3e14f51952aa8478c13d355";
        assert!(signature_valid(b"secret", b"body", Some(good)));
        assert!(!signature_valid(b"secret", b"body ", Some(good)));
        assert!(!signature_valid(b"other", b"body", Some(good)));
        assert!(!signature_valid(b"secret", b"body", None));
        assert!(!signature_valid(b"secret", b"body", Some("sha1=abc")));
        assert!(!signature_valid(b"secret", b"body", Some("sha256=zz")));
    }
}
