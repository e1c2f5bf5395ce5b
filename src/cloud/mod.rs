//! The Cloud API edge: wire types of `POST /{version}/{phone_number_id}/messages` and the HTTP
//! client. Nothing of reqwest leaks out; the pipeline sees [`CloudApi`], [`Accepted`] and
//! [`SendError`].

mod error;

use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

pub use crate::vocab::ErrorCode;
pub use error::{ApiError, ErrorBody, ErrorData};

use crate::ids::{PhoneNumberId, WabaId, Wamid};
use crate::job::Message;
use crate::vocab::TemplateDefinition;

/// The body of a send request, exactly as Meta expects it.
#[derive(Debug, Serialize)]
pub struct OutboundMessage<'a> {
    /// Always `whatsapp`.
    pub messaging_product: &'static str,
    /// Always `individual` here.
    pub recipient_type: &'static str,
    /// Recipient digits.
    pub to: &'a str,
    /// `type` + its object (+ `context`).
    #[serde(flatten)]
    pub message: &'a Message,
    /// The job id, echoed in status webhooks so they find their job even if this answer is lost.
    pub biz_opaque_callback_data: &'a str,
}

impl<'a> OutboundMessage<'a> {
    /// A request for `message` to `to`, tagged with `job_id`.
    pub fn new(to: &'a str, message: &'a Message, job_id: &'a str) -> Self {
        OutboundMessage {
            messaging_product: "whatsapp",
            recipient_type: "individual",
            to,
            message,
            biz_opaque_callback_data: job_id,
        }
    }
}

/// One send: which number, with which token, what body (already serialised).
#[derive(Debug)]
pub struct SendRequest {
    /// The sending number.
    pub phone_number_id: PhoneNumberId,
    /// Its access token.
    pub token: SecretString,
    /// JSON body.
    pub body: Vec<u8>,
}

/// Meta's 200 answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendResponse {
    /// `whatsapp`.
    pub messaging_product: String,
    /// `[{input, wa_id}]`.
    #[serde(default)]
    pub contacts: Vec<ContactRef>,
    /// `[{id, message_status}]`.
    pub messages: Vec<MessageRef>,
    /// Whether an `error` object sits beside the answer (it wins: see [`interpret`]).
    #[serde(default, skip_serializing)]
    pub error: Option<serde::de::IgnoredAny>,
}

/// `contacts[]` of a send answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactRef {
    /// The `to` as sent.
    pub input: String,
    /// The WhatsApp id (may differ from the input).
    pub wa_id: String,
}

/// `messages[]` of a send answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRef {
    /// The wamid.
    pub id: String,
    /// `accepted`, `held_for_quality_assessment` or `paused` (templates only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_status: Option<String>,
}

/// A send Meta accepted (not delivered: that comes later by webhook).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Meta's message id.
    pub wamid: Wamid,
    /// The WhatsApp id Meta resolved the recipient to.
    pub wa_id: Option<String>,
    /// `message_status` when Meta gave one.
    pub message_status: Option<String>,
}

/// Why a send did not return an accepted message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// Meta answered with its error body: definitive, the message was not sent.
    #[error("cloud api error {}: {}", .0.code, .0.details())]
    Api(Box<ApiError>),
    /// The request never left (connect refused, DNS): safe to retry.
    #[error("request not sent: {0}")]
    NotSent(String),
    /// The request may have been received (timeout, reset, 5xx without Meta's body, a 200 we
    /// cannot read): the message may or may not exist.
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
}

impl SendError {
    /// Its kind, as spans name it: `api`, `not_sent` or `ambiguous`.
    pub fn kind(&self) -> &'static str {
        match self {
            SendError::Api(_) => "api",
            SendError::NotSent(_) => "not_sent",
            SendError::Ambiguous(_) => "ambiguous",
        }
    }
}

/// One page of `GET /{waba_id}/message_templates`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplatePage {
    /// The templates on this page.
    pub templates: Vec<TemplateDefinition>,
    /// The cursor of the next page, if there is one.
    pub after: Option<String>,
}

/// Why a management call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManagementError {
    /// Meta answered with its error body.
    #[error("cloud api error {}: {}", .0.code, .0.details())]
    Api(Box<ApiError>),
    /// Transport failure or an answer that is not Meta's shape.
    #[error("{0}")]
    Transport(String),
}

/// The Cloud API as wa-sender sees it.
#[async_trait]
pub trait CloudApi: Send + Sync {
    /// Sends one message.
    async fn send(&self, request: SendRequest) -> Result<Accepted, SendError>;
    /// One page of a WABA's message templates (`after`: the cursor of the page before).
    async fn templates(
        &self,
        waba: &WabaId,
        token: &SecretString,
        after: Option<&str>,
    ) -> Result<TemplatePage, ManagementError>;
}

/// The fields the template registry needs.
pub const TEMPLATE_FIELDS: &str = "name,language,status,category,parameter_format,components";

/// Settings for [`HttpCloud`].
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `https://graph.facebook.com` or a simulator's address.
    pub base_url: String,
    /// Graph version, e.g. `v23.0`.
    pub api_version: String,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
}

/// The Cloud API over HTTP, with one pooled client.
#[derive(Debug, Clone)]
pub struct HttpCloud {
    client: reqwest::Client,
    messages_url_prefix: String,
}

impl HttpCloud {
    /// Builds the pooled client.
    pub fn new(settings: &HttpSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("wa-sender/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let base = settings.base_url.trim_end_matches('/');
        Ok(HttpCloud {
            client,
            messages_url_prefix: format!("{base}/{}", settings.api_version),
        })
    }

    /// `POST /{phone_number_id}/messages`, noting the HTTP status and Meta's trace id (the
    /// `x-fb-trace-id` header) on `span`.
    async fn post_message(
        &self,
        request: SendRequest,
        span: &tracing::Span,
    ) -> Result<Accepted, SendError> {
        let url = format!(
            "{}/{}/messages",
            self.messages_url_prefix, request.phone_number_id
        );
        let response = self
            .client
            .post(url)
            .bearer_auth(request.token.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(request.body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        if let Some(id) = response
            .headers()
            .get("x-fb-trace-id")
            .and_then(|v| v.to_str().ok())
        {
            span.record("fbtrace_id", id);
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| SendError::Ambiguous(format!("reading the answer failed: {e}")))?;
        interpret(status.as_u16(), &body)
    }
}

#[async_trait]
impl CloudApi for HttpCloud {
    async fn send(&self, request: SendRequest) -> Result<Accepted, SendError> {
        // The client span of the job's trace: what Meta answered and the id its support asks
        // for. No trace context is sent to Meta.
        let span = tracing::debug_span!(
            "cloud.send",
            otel.kind = "client",
            url.template = "/{phone_number_id}/messages",
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            error.code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            fbtrace_id = tracing::field::Empty,
        );
        let result = self
            .post_message(request, &span)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(_) => {}
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", e.kind());
                if let SendError::Api(api) = e {
                    span.record("error.code", api.code);
                    if let Some(id) = &api.fbtrace_id {
                        span.record("fbtrace_id", id.as_str());
                    }
                }
            }
        }
        result
    }

    async fn templates(
        &self,
        waba: &WabaId,
        token: &SecretString,
        after: Option<&str>,
    ) -> Result<TemplatePage, ManagementError> {
        #[derive(serde::Deserialize)]
        struct Page {
            data: Vec<TemplateDefinition>,
            #[serde(default)]
            paging: Option<Paging>,
        }
        #[derive(serde::Deserialize)]
        struct Paging {
            #[serde(default)]
            cursors: Option<Cursors>,
            #[serde(default)]
            next: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Cursors {
            #[serde(default)]
            after: Option<String>,
        }
        let url = format!("{}/{waba}/message_templates", self.messages_url_prefix);
        let mut query = vec![("fields", TEMPLATE_FIELDS), ("limit", "100")];
        if let Some(after) = after {
            query.push(("after", after));
        }
        let transport = |e: reqwest::Error| ManagementError::Transport(e.to_string());
        let response = self
            .client
            .get(url)
            .bearer_auth(token.expose_secret())
            .query(&query)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(&body) {
            return Err(ManagementError::Api(Box::new(error)));
        }
        let page: Page = serde_json::from_slice(&body).map_err(|e| {
            ManagementError::Transport(format!("HTTP {status}: not a template list: {e}"))
        })?;
        // Meta gives `next` only when there is a next page; the cursor alone is always there.
        let after = page
            .paging
            .filter(|p| p.next.is_some())
            .and_then(|p| p.cursors)
            .and_then(|c| c.after);
        Ok(TemplatePage {
            templates: page.data,
            after,
        })
    }
}

/// Turns an HTTP answer into the send outcome. Meta's error body wins over the HTTP status.
pub fn interpret(status: u16, body: &[u8]) -> Result<Accepted, SendError> {
    let success = (200..300).contains(&status);
    // The usual answer, a send accepted with no error beside it, is read once; before, every
    // answer was first read as an error body, and a success paid for that failed read.
    if success
        && let Ok(answer) = serde_json::from_slice::<SendResponse>(body)
        && answer.error.is_none()
    {
        return accepted(status, answer);
    }
    if let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) {
        return Err(SendError::Api(Box::new(error)));
    }
    if success {
        let answer: SendResponse = serde_json::from_slice(body).map_err(|e| {
            SendError::Ambiguous(format!("HTTP {status} with an unreadable body: {e}"))
        })?;
        return accepted(status, answer);
    }
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    if status >= 500 {
        Err(SendError::Ambiguous(format!(
            "HTTP {status} without a Graph error body: {snippet}"
        )))
    } else {
        Err(SendError::NotSent(format!(
            "HTTP {status} without a Graph error body: {snippet}"
        )))
    }
}

/// A 2xx send answer: the message's wamid, or why the send's outcome is unknown.
fn accepted(status: u16, answer: SendResponse) -> Result<Accepted, SendError> {
    let first = answer
        .messages
        .into_iter()
        .next()
        .ok_or_else(|| SendError::Ambiguous(format!("HTTP {status} without messages[]")))?;
    let wamid = Wamid::parse(first.id)
        .map_err(|e| SendError::Ambiguous(format!("HTTP {status} with a bad wamid: {e}")))?;
    Ok(Accepted {
        wamid,
        wa_id: answer.contacts.into_iter().next().map(|c| c.wa_id),
        message_status: first.message_status,
    })
}

fn transport_error(e: reqwest::Error) -> SendError {
    // CORRECTNESS: only a failed connect proves the request never left; a timeout or a reset
    // after connecting may have reached Meta, so it is ambiguous (no idempotency key exists).
    if e.is_connect() {
        SendError::NotSent(format!("connect failed: {e}"))
    } else if e.is_timeout() {
        SendError::Ambiguous(format!("timed out: {e}"))
    } else if e.is_builder() {
        SendError::NotSent(format!("request could not be built: {e}"))
    } else {
        SendError::Ambiguous(format!("transport error: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_error_body_wins_over_http_status() {
        let body =
            br#"{"error":{"message":"x","type":"OAuthException","code":131000,"fbtrace_id":"t"}}"#;
        assert!(matches!(interpret(500, body), Err(SendError::Api(e)) if e.code == 131000));
        assert!(matches!(interpret(400, body), Err(SendError::Api(_))));
        // Even beside a 2xx answer that names a message.
        let beside = br#"{"messaging_product":"whatsapp","messages":[{"id":"wamid.HBgL"}],
            "error":{"message":"x","type":"OAuthException","code":131000,"fbtrace_id":"t"}}"#;
        assert!(matches!(interpret(200, beside), Err(SendError::Api(e)) if e.code == 131000));
    }

    #[test]
    fn bare_5xx_is_ambiguous_and_bare_4xx_is_not_sent() {
        assert!(matches!(
            interpret(502, b"bad gateway"),
            Err(SendError::Ambiguous(_))
        ));
        assert!(matches!(
            interpret(404, b"nope"),
            Err(SendError::NotSent(_))
        ));
    }

    #[test]
    fn a_200_carries_the_wamid() {
        let body = br#"{"messaging_product":"whatsapp","contacts":[{"input":"+16505551234","wa_id":"16505551234"}],
            "messages":[{"id":"wamid.HBgL","message_status":"accepted"}]}"#;
        let a = interpret(200, body).unwrap();
        assert_eq!(a.wamid.as_str(), "wamid.HBgL");
        assert_eq!(a.wa_id.as_deref(), Some("16505551234"));
        assert!(matches!(
            interpret(200, b"{}"),
            Err(SendError::Ambiguous(_))
        ));
    }
}
