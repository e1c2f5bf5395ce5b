//! Events, schema `wa.event.v1`, published to `wa.events` with routing key = `event`, several
//! of one kind to a message: its body is a JSON array of them ([`read_message`]). The
//! dead-letter reasons they carry are the vocabulary's [`DeadReason`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::SendJob;
pub use crate::vocab::{DeadReason, ErrorSource};

/// The event schema version.
pub const EVENT_SCHEMA_V1: &str = "wa.event.v1";

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
    /// The W3C trace context of the job's trace, when it has one: a message holds the events
    /// of many jobs, so each event carries its own.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub traceparent: Option<String>,
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
            traceparent: None,
        }
    }

    /// Fills the job fields from a decoded job.
    pub fn for_job(kind: &str, job: &SendJob) -> Self {
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

/// The events of one message on `wa.events`: its body is a JSON array of `wa.event.v1` events,
/// all of the kind its routing key names.
pub fn read_message(body: &[u8]) -> Result<Vec<Event>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// A message's body from events already serialised, each a JSON object: `[e1,e2,…]`.
pub fn write_message<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = vec![b'['];
    for event in events {
        if body.len() > 1 {
            body.push(b',');
        }
        body.extend_from_slice(event);
    }
    body.push(b']');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_the_events_written_into_it() {
        let events: Vec<Event> = ["a", "b", "c"]
            .iter()
            .map(|id| Event {
                job_id: Some((*id).into()),
                traceparent: Some(format!("00-{:0>32}-{:0>16}-01", id, id)),
                ..Event::new("message.accepted")
            })
            .collect();
        let written: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap())
            .collect();
        let body = write_message(written.iter().map(Vec::as_slice));
        assert_eq!(read_message(&body).unwrap(), events);
        assert_eq!(read_message(&write_message([])).unwrap(), vec![]);
        // One event is still an array: a consumer reads every message the same way.
        assert!(write_message([written[0].as_slice()]).starts_with(b"[{"));
    }
}
