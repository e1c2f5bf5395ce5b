//! What the stages decide for one delivery, before the `settle` stage applies it: an
//! [`Outcome`], built with its constructors so every path says the same things the same way.

use chrono::{DateTime, Utc};

use crate::event::{DeadReason, ErrorSource, Event, EventError};
use crate::ids::Wamid;
use crate::job::{JobError, SendJob};
use crate::vocab::DeferCause;

/// The decision for one delivery.
#[derive(Debug)]
pub enum Outcome {
    /// Meta accepted it: publish `message.accepted`, ack.
    Accepted(Box<Event>),
    /// Nothing to do: it was sent (re-announce its `message.accepted`) or dead-lettered before.
    AlreadyDone(Option<Box<Event>>),
    /// Not now: publish to a delay queue, ack.
    Later(Box<Later>),
    /// Never: publish to `wa.dead` and `job.dead_lettered`, ack.
    Dead(Box<Dead>),
}

impl Outcome {
    /// The decision and its cause, as the `settle` span names them: (`sent`, none),
    /// (`deferred`, cause) or (`dead_lettered`, reason), each a token.
    pub fn describe(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Outcome::Accepted(_) => ("sent", None),
            Outcome::AlreadyDone(_) => ("already_done", None),
            Outcome::Later(later) => ("deferred", Some(later.cause.as_str())),
            Outcome::Dead(dead) => ("dead_lettered", Some(dead.reason.as_str())),
        }
    }

    /// Meta accepted `job` as `wamid` on attempt `attempts`.
    pub fn accepted(job: &SendJob, wamid: &Wamid, attempts: u32) -> Self {
        let mut event = Event::for_job("message.accepted", job);
        event.wamid = Some(wamid.to_string());
        event.attempts = Some(attempts);
        Outcome::Accepted(Box::new(event))
    }

    /// `job` was sent before as `wamid`: its `message.accepted` is announced again.
    pub fn already_sent(job: &SendJob, wamid: &Wamid) -> Self {
        let mut event = Event::for_job("message.accepted", job);
        event.wamid = Some(wamid.to_string());
        Outcome::AlreadyDone(Some(Box::new(event)))
    }

    /// `job` was dead-lettered before: nothing more to say.
    pub fn already_dead() -> Self {
        Outcome::AlreadyDone(None)
    }

    /// Tried again at `due`, announced with `job.deferred`.
    pub fn later(
        due: DateTime<Utc>,
        attempts: u32,
        cause: DeferCause,
        error: Option<EventError>,
        job: SendJob,
    ) -> Self {
        Outcome::Later(Box::new(Later::new(due, attempts, cause, error, job)))
    }

    /// Tried again at `due` without a `job.deferred`: one more hop of a wait already announced.
    pub fn later_silent(
        due: DateTime<Utc>,
        attempts: u32,
        cause: DeferCause,
        job: SendJob,
    ) -> Self {
        Outcome::Later(Box::new(Later {
            announce: false,
            ..Later::new(due, attempts, cause, None, job)
        }))
    }

    /// Dead-lettered by policy (no Cloud API error behind it), with the specific detail.
    pub fn dead(
        reason: DeadReason,
        detail: impl Into<String>,
        attempts: u32,
        job: SendJob,
    ) -> Self {
        Outcome::dead_letter(
            reason,
            None,
            ErrorSource::Policy,
            detail.into(),
            attempts,
            job,
        )
    }

    /// Dead-lettered because of `error` (Meta's answer), with the specific detail.
    pub fn dead_after(
        reason: DeadReason,
        error: &EventError,
        detail: impl Into<String>,
        attempts: u32,
        job: SendJob,
    ) -> Self {
        let (code, source) = (error.code, error.source);
        Outcome::dead_letter(reason, code, source, detail.into(), attempts, job)
    }

    /// The dead letter of a body that is not a valid job, with the decoder's specific reason and
    /// the `job_id` salvaged from the body, if any.
    pub fn undecodable(error: &JobError, attempts: u32, salvaged_job_id: Option<String>) -> Self {
        Outcome::Dead(Box::new(Dead {
            reason: error.reason(),
            code: None,
            detail: error.to_string(),
            source: ErrorSource::Policy,
            attempts,
            job: None,
            salvaged_job_id,
        }))
    }

    fn dead_letter(
        reason: DeadReason,
        code: Option<i64>,
        source: ErrorSource,
        detail: String,
        attempts: u32,
        job: SendJob,
    ) -> Self {
        Outcome::Dead(Box::new(Dead {
            reason,
            code,
            detail,
            source,
            attempts,
            job: Some(Box::new(job)),
            salvaged_job_id: None,
        }))
    }
}

/// A deferral or retry.
#[derive(Debug)]
pub struct Later {
    /// Whether to publish `job.deferred` (not for the silent hops of a long wait).
    pub announce: bool,
    /// When it is due.
    pub due: DateTime<Utc>,
    /// Attempts after this delivery.
    pub attempts: u32,
    /// Why: the counters' token, and the `job.deferred` title when no error caused it.
    pub cause: DeferCause,
    /// The error that caused it, if any.
    pub error: Option<EventError>,
    /// The job (absent only if it could not be decoded, which never defers).
    pub job: Option<Box<SendJob>>,
    /// When an earlier attempt may have reached Meta (its request left, no answer came).
    pub maybe_sent: Option<DateTime<Utc>>,
}

impl Later {
    /// A deferral of `job` until `due`, announced with `job.deferred`.
    pub fn new(
        due: DateTime<Utc>,
        attempts: u32,
        cause: DeferCause,
        error: Option<EventError>,
        job: SendJob,
    ) -> Self {
        Later {
            announce: true,
            due,
            attempts,
            cause,
            error,
            job: Some(Box::new(job)),
            maybe_sent: None,
        }
    }
}

/// A dead letter.
#[derive(Debug)]
pub struct Dead {
    /// The reason (a closed set).
    pub reason: DeadReason,
    /// Meta's code, when Meta said so.
    pub code: Option<i64>,
    /// Specific detail.
    pub detail: String,
    /// Where it was found.
    pub source: ErrorSource,
    /// Attempts made.
    pub attempts: u32,
    /// The job, if it decoded.
    pub job: Option<Box<SendJob>>,
    /// Its `job_id` if it could be salvaged from an undecodable body.
    pub salvaged_job_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> SendJob {
        crate::job::decode(
            br#"{"schema": "wa.send.v1", "job_id": "j-1", "phone_number_id": "106540352242922",
                 "to": "15551234567", "message": {"type": "text", "text": {"body": "hi"}},
                 "metadata": {"order": 7}}"#,
        )
        .expect("a valid job")
    }

    fn wamid() -> Wamid {
        Wamid::parse("wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI".to_owned()).expect("a wamid")
    }

    #[test]
    fn an_accepted_send_announces_its_wamid_and_attempts_with_the_jobs_fields() {
        let Outcome::Accepted(event) = Outcome::accepted(&job(), &wamid(), 2) else {
            panic!("accepted");
        };
        assert_eq!(event.event, "message.accepted");
        assert_eq!(event.job_id.as_deref(), Some("j-1"));
        assert_eq!(
            event.wamid.as_deref(),
            Some("wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBI")
        );
        assert_eq!(event.attempts, Some(2));
        assert_eq!(event.metadata["order"], 7);
    }

    #[test]
    fn a_job_sent_before_is_announced_again_without_attempts_and_a_dead_one_is_not() {
        let Outcome::AlreadyDone(Some(event)) = Outcome::already_sent(&job(), &wamid()) else {
            panic!("already sent");
        };
        assert_eq!(event.event, "message.accepted");
        assert_eq!(event.attempts, None);
        assert!(matches!(
            Outcome::already_dead(),
            Outcome::AlreadyDone(None)
        ));
    }

    #[test]
    fn a_deferral_is_announced_unless_it_is_a_silent_hop() {
        let due = Utc::now();
        let Outcome::Later(later) = Outcome::later(due, 1, DeferCause::Retry, None, job()) else {
            panic!("later");
        };
        assert!(later.announce);
        assert_eq!(
            (later.due, later.attempts, later.cause),
            (due, 1, DeferCause::Retry)
        );
        let Outcome::Later(hop) = Outcome::later_silent(due, 1, DeferCause::NotYetDue, job())
        else {
            panic!("later");
        };
        assert!(!hop.announce);
        assert!(hop.job.is_some());
    }

    #[test]
    fn dead_letters_say_where_the_error_was_found() {
        let Outcome::Dead(dead) = Outcome::dead(DeadReason::NoOptIn, "no opt-in", 0, job()) else {
            panic!("dead");
        };
        assert_eq!((dead.code, dead.source), (None, ErrorSource::Policy));
        let meta = EventError {
            code: Some(131026),
            title: "Message undeliverable".into(),
            details: "unable to deliver".into(),
            source: ErrorSource::Api,
        };
        let after = Outcome::dead_after(DeadReason::RecipientUndeliverable, &meta, "x", 1, job());
        let Outcome::Dead(dead) = after else {
            panic!("dead");
        };
        assert_eq!((dead.code, dead.source), (Some(131026), ErrorSource::Api));
        assert_eq!(dead.detail, "x");
        assert!(dead.job.is_some());
    }

    #[test]
    fn an_undecodable_body_is_dead_lettered_with_the_decoders_reason_and_no_job() {
        let error = crate::job::decode(br#"{"schema": "wa.send.v9", "job_id": "j-2"}"#)
            .expect_err("unsupported");
        let Outcome::Dead(dead) = Outcome::undecodable(&error, 3, Some("j-2".into())) else {
            panic!("dead");
        };
        assert_eq!(dead.reason, DeadReason::UnsupportedSchema);
        assert_eq!(dead.detail, error.to_string());
        assert_eq!(dead.attempts, 3);
        assert!(dead.job.is_none());
        assert_eq!(dead.salvaged_job_id.as_deref(), Some("j-2"));
    }
}
