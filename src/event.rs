//! Events, schema `wa.event.v1`, published to `wa.events` with routing key =
//! `event`, and the closed set of dead-letter reasons that dashboards and producers act on.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The event schema version.
pub const EVENT_SCHEMA_V1: &str = "wa.event.v1";

/// Why a job was dead-lettered. A closed set: adding one is a documented API change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// The body is not a valid `wa.send.v1` job (bad JSON, missing field, limit broken).
    InvalidJob,
    /// `schema` names a version this worker does not know.
    UnsupportedSchema,
    /// `phone_number_id` is not configured.
    UnknownSender,
    /// Free-form message, care window closed, no fallback template.
    OutsideCareWindow,
    /// Business-initiated template without an opt-in.
    NoOptIn,
    /// Marketing to a user who opted out.
    OptedOutMarketing,
    /// Template missing, not approved or disabled in that language.
    TemplateNotApproved,
    /// Template parameters do not fit the template.
    TemplateParamsInvalid,
    /// `expires_at` passed before it could be sent.
    Expired,
    /// Its campaign was cancelled.
    CampaignCancelled,
    /// Meta could not deliver to this recipient (131026).
    RecipientUndeliverable,
    /// Meta refused the request permanently.
    ApiPermanentError,
    /// The send's outcome is unknown and the job is at-most-once.
    AmbiguousSend,
    /// Retried `max_attempts` times without success.
    MaxAttempts,
}

impl DeadReason {
    /// The wire name (also the routing key suffix on `wa.dead`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::InvalidJob => "invalid_job",
            DeadReason::UnsupportedSchema => "unsupported_schema",
            DeadReason::UnknownSender => "unknown_sender",
            DeadReason::OutsideCareWindow => "outside_care_window",
            DeadReason::NoOptIn => "no_opt_in",
            DeadReason::OptedOutMarketing => "opted_out_marketing",
            DeadReason::TemplateNotApproved => "template_not_approved",
            DeadReason::TemplateParamsInvalid => "template_params_invalid",
            DeadReason::Expired => "expired",
            DeadReason::CampaignCancelled => "campaign_cancelled",
            DeadReason::RecipientUndeliverable => "recipient_undeliverable",
            DeadReason::ApiPermanentError => "api_permanent_error",
            DeadReason::AmbiguousSend => "ambiguous_send",
            DeadReason::MaxAttempts => "max_attempts",
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorSource {
    /// A synchronous Cloud API answer.
    Api,
    /// A failed-status webhook.
    Webhook,
    /// wa-sender's own rules, before any API call.
    Policy,
}

/// The error part of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventError {
    /// Meta's `error.code`, when the error came from Meta.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// Short title (Meta's, or the dead-letter reason).
    pub title: String,
    /// Specific detail: which field, which rule, Meta's `error_data.details`.
    pub details: String,
    /// Where it was found.
    pub source: ErrorSource,
}

/// An event on `wa.events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Always [`EVENT_SCHEMA_V1`].
    pub schema: String,
    /// `message.accepted`, `job.dead_lettered`, …; also the routing key.
    pub event: String,
    /// The job, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The job's campaign.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// The sending number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_number_id: Option<String>,
    /// The recipient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Meta's message id, once accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wamid: Option<String>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// For failures and dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// Dead-letter reason, for `job.dead_lettered`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<DeadReason>,
    /// Attempts made so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Pricing from status webhooks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Value>,
    /// The job's metadata, echoed.
    #[serde(skip_serializing_if = "Value::is_null", default)]
    pub metadata: Value,
    /// `false` on a status webhook for a wamid no job of this deployment is known to have sent
    /// (published all the same, flagged).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub correlated: Option<bool>,
}

impl Event {
    /// A new event of `kind` at the current time, with no job fields yet.
    pub fn new(kind: &str) -> Self {
        Event {
            schema: EVENT_SCHEMA_V1.into(),
            event: kind.into(),
            job_id: None,
            campaign_id: None,
            phone_number_id: None,
            to: None,
            wamid: None,
            at: Utc::now(),
            error: None,
            reason: None,
            attempts: None,
            pricing: None,
            metadata: Value::Null,
            correlated: None,
        }
    }

    /// Fills the job fields from a decoded job.
    pub fn for_job(kind: &str, job: &crate::job::SendJob) -> Self {
        Event {
            job_id: Some(job.job_id.to_string()),
            campaign_id: job.campaign_id.as_ref().map(ToString::to_string),
            phone_number_id: Some(job.phone_number_id.to_string()),
            to: Some(job.to.to_string()),
            metadata: job.metadata.clone(),
            ..Event::new(kind)
        }
    }
}
