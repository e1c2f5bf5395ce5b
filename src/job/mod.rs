//! The send job, schema `wa.send.v1`: what producers put on `wa.send`.
//! [`decode`] is the first stage of the pipeline; decoding is validation, so everything after it
//! works on a [`SendJob`] that Meta's request validation would accept.

mod message;
mod strict;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use message::{
    Body, Component, Context, Language, Media, Message, Parameter, Template, Text, Violation,
    ViolationKind,
};

use crate::ids::{CampaignId, JobId, PhoneNumberId, WaId};
use crate::vocab::DeadReason;
pub use crate::vocab::{Category, DeliveryMode, Lane};

/// The only job schema this worker understands.
pub const SCHEMA_V1: &str = "wa.send.v1";

/// Largest job body accepted (bytes); a bigger one is dead-lettered `invalid_job` unparsed.
pub const MAX_JOB_BYTES: usize = 256 * 1024;

/// A decoded, validated send job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SendJob {
    /// Always [`SCHEMA_V1`].
    pub schema: String,
    /// Idempotency key: the same `job_id` is never sent twice.
    pub job_id: JobId,
    /// The sending business number.
    pub phone_number_id: PhoneNumberId,
    /// The recipient.
    pub to: WaId,
    /// What to send.
    pub message: Message,
    /// Category hint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<Category>,
    /// Campaign, for pause/cancel/report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<CampaignId>,
    /// Not to be sent before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// Not to be sent after this time: dead-lettered `expired` instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Sent instead of a free-form message when the care window is closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_template: Option<Template>,
    /// Ambiguous-outcome policy; `None` means the lane's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryMode>,
    /// Opaque, echoed in every event about this job.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
}

impl SendJob {
    /// The delivery mode in force for this job on `lane`.
    pub fn delivery_mode(&self, lane: Lane) -> DeliveryMode {
        self.delivery.unwrap_or_else(|| lane.default_delivery())
    }
}

/// Why a job body was refused. Each maps to one dead-letter reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The body is not JSON, or not a JSON object, or too large.
    #[error("malformed job: {0}")]
    Malformed(String),
    /// `schema` names a version this worker does not know.
    #[error("unsupported schema {0:?}, expected \"wa.send.v1\"")]
    UnsupportedSchema(String),
    /// A field is missing, unknown, named twice or breaks a rule.
    #[error("invalid job: {0}")]
    Invalid(Violation),
}

impl JobError {
    /// The dead-letter reason for this error.
    pub fn reason(&self) -> DeadReason {
        match self {
            JobError::Malformed(_) | JobError::Invalid(_) => DeadReason::InvalidJob,
            JobError::UnsupportedSchema(_) => DeadReason::UnsupportedSchema,
        }
    }
}

/// The wire form, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    schema: Option<Value>,
    job_id: Option<Value>,
    phone_number_id: Option<Value>,
    to: Option<Value>,
    message: Option<Value>,
    category: Option<Value>,
    campaign_id: Option<Value>,
    not_before: Option<Value>,
    expires_at: Option<Value>,
    fallback_template: Option<Value>,
    delivery: Option<Value>,
    #[serde(default)]
    metadata: Value,
}

fn required(field: &'static str, value: Option<Value>) -> Result<Value, JobError> {
    match value {
        Some(Value::Null) | None => {
            Err(JobError::Invalid(Violation::missing(field, "is required")))
        }
        Some(v) => Ok(v),
    }
}

fn field<T: serde::de::DeserializeOwned>(name: &'static str, value: Value) -> Result<T, JobError> {
    serde_json::from_value(value).map_err(|e| JobError::Invalid(Violation::from_serde(name, &e)))
}

fn optional<T: serde::de::DeserializeOwned>(
    name: &'static str,
    value: Option<Value>,
) -> Result<Option<T>, JobError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => field(name, v).map(Some),
    }
}

/// Decodes and validates a job body. Every error names the field and the rule.
pub fn decode(body: &[u8]) -> Result<SendJob, JobError> {
    if body.len() > MAX_JOB_BYTES {
        return Err(JobError::Malformed(format!(
            "body is {} bytes, the limit is {MAX_JOB_BYTES}",
            body.len()
        )));
    }
    // One pass that also refuses a key named twice: serde_json alone would keep the last one.
    let value = strict::parse(body).map_err(|e| match e {
        strict::StrictError::Json(e) => JobError::Malformed(format!("not JSON: {e}")),
        strict::StrictError::Duplicate(d) => JobError::Invalid(Violation::not_allowed(
            d.path,
            format!("duplicate key {:?}", d.key),
        )),
    })?;
    if !value.is_object() {
        return Err(JobError::Malformed("the body must be a JSON object".into()));
    }
    // The schema is checked first so that a v2 job is `unsupported_schema`, not a field error.
    match value.get("schema") {
        Some(Value::String(s)) if s == SCHEMA_V1 => {}
        Some(Value::String(s)) => return Err(JobError::UnsupportedSchema(s.clone())),
        Some(other) => return Err(JobError::UnsupportedSchema(other.to_string())),
        None => {
            return Err(JobError::Invalid(Violation::missing(
                "schema",
                "is required (\"wa.send.v1\")",
            )));
        }
    }
    let raw: RawJob = serde_json::from_value(value)
        .map_err(|e| JobError::Invalid(Violation::from_serde("job", &e)))?;
    let message = Message::from_value(required("message", raw.message)?, "message")
        .map_err(JobError::Invalid)?;
    let fallback_template: Option<Template> = optional("fallback_template", raw.fallback_template)?;
    if let Some(t) = &fallback_template {
        Message {
            body: Body::Template(t.clone()),
            context: None,
        }
        .validate("fallback_template")
        .map_err(|mut v| {
            v.field = v
                .field
                .replace("fallback_template.template", "fallback_template");
            JobError::Invalid(v)
        })?;
    }
    let job = SendJob {
        schema: field("schema", required("schema", raw.schema)?)?,
        job_id: field("job_id", required("job_id", raw.job_id)?)?,
        phone_number_id: field(
            "phone_number_id",
            required("phone_number_id", raw.phone_number_id)?,
        )?,
        to: field("to", required("to", raw.to)?)?,
        message,
        category: optional("category", raw.category)?,
        campaign_id: optional("campaign_id", raw.campaign_id)?,
        not_before: optional("not_before", raw.not_before)?,
        expires_at: optional("expires_at", raw.expires_at)?,
        fallback_template,
        delivery: optional("delivery", raw.delivery)?,
        metadata: raw.metadata,
    };
    if let (Some(nb), Some(exp)) = (job.not_before, job.expires_at)
        && exp <= nb
    {
        return Err(JobError::Invalid(Violation::invalid(
            "expires_at",
            "must be after not_before",
        )));
    }
    if !(job.metadata.is_null() || job.metadata.is_object()) {
        return Err(JobError::Invalid(Violation::invalid(
            "metadata",
            "must be a JSON object",
        )));
    }
    Ok(job)
}

/// Best-effort `job_id` of a body that failed to decode, so its dead letter can still be traced.
pub fn salvage_job_id(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value
        .get("job_id")?
        .as_str()
        .map(|s| s.chars().take(128).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(overrides: Value) -> Vec<u8> {
        let mut base = json!({
            "schema": "wa.send.v1", "job_id": "j-1", "phone_number_id": "106540352242922",
            "to": "+16505551234", "message": {"type": "text", "text": {"body": "hello"}},
        });
        for (k, v) in overrides.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::to_vec(&base).unwrap()
    }

    #[test]
    fn decodes_a_minimal_job_and_normalises_the_recipient() {
        let j = decode(&job(json!({}))).unwrap();
        assert_eq!(j.to.as_str(), "16505551234");
        assert_eq!(j.delivery_mode(Lane::Otp), DeliveryMode::AtLeastOnce);
        assert_eq!(j.delivery_mode(Lane::Bulk), DeliveryMode::AtMostOnce);
    }

    #[test]
    fn each_bad_input_gets_its_own_error() {
        let cases: [(Vec<u8>, &str); 10] = [
            (b"{not json".to_vec(), "malformed job: not JSON"),
            (
                b"[1,2]".to_vec(),
                "malformed job: the body must be a JSON object",
            ),
            (
                job(json!({"schema": "wa.send.v2"})),
                "unsupported schema \"wa.send.v2\"",
            ),
            (
                job(json!({"to": "12"})),
                "invalid job: to: to \"**\" is not valid",
            ),
            (
                job(json!({"to": "+49 1512 3456789"})),
                "invalid job: to: to \"+49***********89\" is not valid",
            ),
            (
                job(json!({"job_id": null})),
                "invalid job: job_id: is required",
            ),
            (
                job(json!({"phone_number_id": "abc"})),
                "invalid job: phone_number_id: phone_number_id \"abc\" is not valid",
            ),
            (
                job(json!({"colour": "red"})),
                "invalid job: job: unknown field `colour`",
            ),
            (
                job(json!({"delivery": "maybe"})),
                "invalid job: delivery: unknown variant `maybe`",
            ),
            (
                job(
                    json!({"not_before": "2030-01-02T00:00:00Z", "expires_at": "2030-01-01T00:00:00Z"}),
                ),
                "invalid job: expires_at: must be after not_before",
            ),
        ];
        for (body, expected) in cases {
            let err = decode(&body).expect_err(expected).to_string();
            assert!(err.starts_with(expected), "got {err:?}, want {expected:?}");
        }
    }

    #[test]
    fn fallback_template_is_validated_with_its_own_path() {
        let body =
            job(json!({"fallback_template": {"name": "Bad Name", "language": {"code": "en"}}}));
        let err = decode(&body).unwrap_err().to_string();
        assert!(err.contains("fallback_template.name"), "{err}");
    }

    #[test]
    fn a_key_named_twice_is_an_invalid_job_naming_key_and_place() {
        let cases = [
            (
                r#"{"schema":"wa.send.v1","job_id":"j-1","job_id":"j-2","phone_number_id":"106540352242922",
                   "to":"+16505551234","message":{"type":"text","text":{"body":"hello"}}}"#,
                r#"invalid job: job: duplicate key "job_id""#,
            ),
            (
                r#"{"schema":"wa.send.v1","job_id":"j-1","phone_number_id":"106540352242922","to":"+16505551234",
                   "message":{"type":"text","text":{"body":"hello"}},"message":{"type":"text","text":{"body":"bye"}}}"#,
                r#"invalid job: job: duplicate key "message""#,
            ),
            (
                r#"{"schema":"wa.send.v1","job_id":"j-1","phone_number_id":"106540352242922","to":"+16505551234",
                   "message":{"type":"text","text":{"body":"hello","body":"bye"}}}"#,
                r#"invalid job: message.text: duplicate key "body""#,
            ),
        ];
        for (body, expected) in cases {
            let err = decode(body.as_bytes()).expect_err(expected);
            assert_eq!(err.reason(), DeadReason::InvalidJob);
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn an_invalid_recipient_is_never_printed_whole() {
        let err = decode(&job(json!({"to": "+49 1512 3456789"}))).unwrap_err();
        assert!(!err.to_string().contains("1512 3456789"), "{err}");
        assert!(!err.to_string().contains("3456"), "{err}");
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let body = vec![b' '; MAX_JOB_BYTES + 1];
        assert!(matches!(decode(&body), Err(JobError::Malformed(_))));
    }
}
