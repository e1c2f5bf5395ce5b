//! The dead letters as an operator sees them: list and show what is in `<prefix>.dead.all`,
//! replay some back to their lanes, and tell one job's state. Reading the dead queue holds its
//! messages unacked for the moment of the read ([`RabbitBroker::hold_dead`]) and gives back every
//! one not replayed, so a listing loses nothing, but a second reader at that moment sees fewer.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

use super::{Admin, AdminError, invalid, now, parse_campaign, parse_time};
use crate::broker::rabbit::{HeldDead, HeldLetter, RabbitBroker};
use crate::broker::{
    Broker, BrokerError, Envelope, H_ATTEMPTS, H_DEAD_AT, H_DELIVERY_COUNT, H_DETAIL, H_ERROR_CODE,
    H_FIRST_DEATH_QUEUE, H_FIRST_DEATH_REASON, H_LANE, H_REASON, H_REPLAYED, H_REPLAYED_AT,
    HeaderValue, Route, Target,
};
use crate::ids::{JobId, PhoneNumberId, WabaId, Wamid};
use crate::job::Lane;
use crate::policy::admission::JobState;
use crate::store::{Deferral, JobKey};
use crate::vocab::DeadReason;

/// The most dead letters one read holds: a bound on the admin's memory and on how long the
/// queue is held. Letters beyond it are neither listed nor replayed by that read.
pub const HOLD_MAX: usize = 10_000;
/// How many summaries a listing answers when no limit is given.
pub const DEFAULT_LIMIT: usize = 100;

/// Which dead letters an operation is about; every given field must match.
#[derive(Debug, Clone, Default)]
pub struct DeadQuery<'a> {
    /// The job's `job_id`.
    pub job_id: Option<&'a str>,
    /// The reason (`outside_care_window`, …).
    pub reason: Option<&'a str>,
    /// The job's `campaign_id`.
    pub campaign: Option<&'a str>,
    /// Dead-lettered at or after this time (RFC 3339).
    pub since: Option<&'a str>,
}

/// A query checked: what a letter must match.
struct Filter {
    job_id: Option<JobId>,
    reason: Option<DeadReason>,
    campaign: Option<String>,
    since: Option<DateTime<Utc>>,
}

/// A field given and not blank.
fn given(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

impl Filter {
    fn parse(query: &DeadQuery<'_>) -> Result<Self, AdminError> {
        let job_id = given(query.job_id)
            .map(|id| JobId::parse(id).map_err(|e| invalid("job_id", e.to_string())))
            .transpose()?;
        let reason = given(query.reason)
            .map(|r| {
                serde_json::from_value::<DeadReason>(Value::String(r.to_owned())).map_err(|_| {
                    invalid(
                        "reason",
                        format!(
                            "reason {r:?} is not a dead-letter reason (see README \"The send job\")"
                        ),
                    )
                })
            })
            .transpose()?;
        let campaign = given(query.campaign)
            .map(|c| parse_campaign(c).map(|c| c.as_str().to_owned()))
            .transpose()?;
        let since = given(query.since)
            .map(|t| parse_time("since", t, now()).map_err(|e| invalid("since", e)))
            .transpose()?;
        Ok(Filter {
            job_id,
            reason,
            campaign,
            since,
        })
    }

    fn matches(&self, letter: &DeadSummary) -> bool {
        let same = |want: Option<&str>, have: Option<&str>| want.is_none() || want == have;
        same(
            self.job_id.as_ref().map(JobId::as_str),
            letter.job_id.as_deref(),
        ) && same(self.reason.map(DeadReason::as_str), Some(&letter.reason))
            && same(self.campaign.as_deref(), letter.campaign_id.as_deref())
            && self
                .since
                .is_none_or(|since| letter.dead_at.is_some_and(|at| at >= since))
    }
}

/// One dead letter in brief.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadSummary {
    /// The job's id, if its body names one.
    pub job_id: Option<String>,
    /// Its campaign, if any.
    pub campaign_id: Option<String>,
    /// The lane it came from (not recorded on a webhook's failure report).
    pub lane: Option<String>,
    /// Its routing key on `wa.send`, `<lane>.<phone_number_id>`, when the lane is known.
    pub route: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The specific detail.
    pub detail: Option<String>,
    /// Meta's error code, when Meta said so.
    pub error_code: Option<i64>,
    /// Sends tried.
    pub attempts: Option<i64>,
    /// When it was dead-lettered (dead letters made before this was recorded have none).
    pub dead_at: Option<DateTime<Utc>>,
    /// How many times it was replayed before.
    pub replayed: Option<i64>,
}

/// One dead letter in full.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterView {
    /// Its summary.
    #[serde(flatten)]
    pub summary: DeadSummary,
    /// The body: JSON when it parses, else the text as it is.
    pub body: Value,
    /// Every header.
    pub headers: BTreeMap<String, Value>,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Nothing was published or removed.
    pub dry_run: bool,
    /// Jobs sent back to their lane (with `dry_run`: that would be), by `job_id` (`null` for a
    /// body that names none).
    pub replayed: Vec<Option<String>>,
    /// Matching dead letters left in the dead queue, with why.
    pub skipped: Vec<Skipped>,
}

/// A matching dead letter that was not replayed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    /// The job, if its body names one.
    pub job_id: Option<String>,
    /// Why it stays.
    pub why: String,
}

/// One job's state, as the store and the dead queue tell it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStatus {
    /// The job.
    pub job_id: JobId,
    /// Its portfolio.
    pub waba_id: WabaId,
    /// `sent`, `dead`, `ambiguous` (the Cloud API may have sent it; not retried), `claimed`
    /// (a worker is sending it now), `deferred` (in a delay queue until `deferred.until`),
    /// `queued` (deferred before and due again: back in its lane queue), or `not_seen`: no
    /// worker has taken it yet, so it waits in its lane queue behind others, or it was never
    /// published, or its record (kept 8 days) has expired.
    pub state: &'static str,
    /// Meta's id for the message, once sent.
    pub wamid: Option<Wamid>,
    /// The last delivery status a webhook reported for it.
    pub status: Option<String>,
    /// Its latest deferral (when, until when, why), if it was ever put off.
    pub deferred: Option<Deferral>,
    /// Its dead letter, while one is in the dead queue.
    pub dead_letter: Option<DeadSummary>,
}

/// The fields of a job body a dead letter is filed under, read without decoding the rest (a
/// dead letter may be an invalid job).
#[derive(Debug, Default, Deserialize)]
struct Probe {
    job_id: Option<Value>,
    campaign_id: Option<Value>,
    phone_number_id: Option<Value>,
}

fn text(v: Option<Value>) -> Option<String> {
    v.and_then(|v| v.as_str().map(str::to_owned))
}

fn summary(letter: &HeldLetter) -> DeadSummary {
    summarise(&letter.reason, &letter.envelope)
}

/// A dead letter in brief, from its routing key on `wa.dead` and its body and headers.
fn summarise(routing_key: &str, envelope: &Envelope) -> DeadSummary {
    let h = &envelope.headers;
    let probe: Probe = serde_json::from_slice(&envelope.body).unwrap_or_default();
    // A letter RabbitMQ made itself (a job past its queue's delivery limit) names the queue it
    // left, whose name ends in the lane, instead of the worker's headers.
    let left = h.get_str(H_FIRST_DEATH_QUEUE);
    let lane = h
        .get_str(H_LANE)
        .or_else(|| Some(left.as_deref()?.rsplit('.').next()?.to_owned()))
        .and_then(|l| Lane::parse(&l));
    let broker_detail = || {
        let why = h.get_str(H_FIRST_DEATH_REASON)?;
        Some(format!(
            "dead-lettered by RabbitMQ ({why}) from {}",
            left.as_deref().unwrap_or("its queue")
        ))
    };
    DeadSummary {
        job_id: text(probe.job_id),
        campaign_id: text(probe.campaign_id),
        lane: lane.map(|l| l.as_str().to_owned()),
        route: lane.map(|l| Route::of(l, &envelope.body).routing_key()),
        reason: h
            .get_str(H_REASON)
            .unwrap_or_else(|| routing_key.to_owned()),
        detail: h.get_str(H_DETAIL).or_else(broker_detail),
        error_code: h.get_int(H_ERROR_CODE),
        attempts: h.get_int(H_ATTEMPTS),
        dead_at: h
            .get_str(H_DEAD_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)),
        replayed: h.get_int(H_REPLAYED),
    }
}

fn view(letter: &HeldLetter) -> DeadLetterView {
    let body = &letter.envelope.body;
    let headers = letter
        .envelope
        .headers
        .0
        .iter()
        .map(|(k, v)| {
            let v = match v {
                HeaderValue::Str(s) => Value::from(s.as_str()),
                HeaderValue::Int(i) => Value::from(*i),
            };
            (k.clone(), v)
        })
        .collect();
    DeadLetterView {
        summary: summary(letter),
        body: serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(body).into_owned())),
        headers,
    }
}

/// The job's headers to publish again: the ones it came with (attempts, trace context, …)
/// without the dead letter's own, and its replay counted.
fn replay_headers(envelope: &Envelope) -> crate::broker::Headers {
    let mut headers = envelope.headers.clone();
    let own = [H_REASON, H_DETAIL, H_ERROR_CODE, H_DEAD_AT, H_LANE];
    let brokers = [
        H_FIRST_DEATH_REASON,
        H_FIRST_DEATH_QUEUE,
        "x-first-death-exchange",
        H_DELIVERY_COUNT,
    ];
    for gone in own.iter().chain(&brokers) {
        headers.0.remove(*gone);
    }
    let replayed = headers.get_int(H_REPLAYED).unwrap_or(0) + 1;
    headers
        .set_int(H_REPLAYED, replayed)
        .set_str(H_REPLAYED_AT, now().to_rfc3339());
    headers
}

impl Admin {
    fn broker(&self) -> Result<&RabbitBroker, AdminError> {
        self.broker.as_deref().ok_or_else(|| {
            AdminError::Broker(BrokerError::op(
                "dead letters",
                "this admin has no broker connection",
            ))
        })
    }

    async fn hold(&self) -> Result<HeldDead, AdminError> {
        Ok(self.broker()?.hold_dead(HOLD_MAX).await?)
    }

    /// Summaries of the dead letters matching `query`, oldest first, at most `limit` (default
    /// [`DEFAULT_LIMIT`]). Every letter stays in the dead queue.
    pub async fn dead_letters(
        &self,
        query: &DeadQuery<'_>,
        limit: Option<usize>,
    ) -> Result<Vec<DeadSummary>, AdminError> {
        let filter = Filter::parse(query)?;
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > HOLD_MAX {
            return Err(invalid(
                "limit",
                format!("limit {limit} is not between 1 and {HOLD_MAX}"),
            ));
        }
        let held = self.hold().await?;
        let found = held
            .letters
            .iter()
            .map(summary)
            .filter(|s| filter.matches(s))
            .take(limit)
            .collect();
        held.release().await;
        Ok(found)
    }

    /// The most recent dead letter of `job_id` in full, `None` if the dead queue has none. It
    /// stays in the dead queue.
    pub async fn dead_letter(&self, job_id: &str) -> Result<Option<DeadLetterView>, AdminError> {
        let filter = Filter::parse(&DeadQuery {
            job_id: Some(job_id),
            ..DeadQuery::default()
        })?;
        let held = self.hold().await?;
        let found = held
            .letters
            .iter()
            .rfind(|l| filter.matches(&summary(l)))
            .map(view);
        held.release().await;
        Ok(found)
    }

    /// Publishes each dead letter matching `query` back to its lane and removes it from the
    /// dead queue; with `dry_run`, only says which would go. A job the store records as sent
    /// stays (it is never sent twice); so does one a worker holds. A letter with no lane
    /// recorded (dead-lettered before lanes were recorded, or a webhook's failure report) goes
    /// to `lane` if one is given and its body is a job, else stays.
    pub async fn replay(
        &self,
        query: &DeadQuery<'_>,
        dry_run: bool,
        lane: Option<Lane>,
    ) -> Result<ReplayReport, AdminError> {
        if [query.job_id, query.reason, query.campaign]
            .into_iter()
            .all(|f| given(f).is_none())
        {
            return Err(invalid(
                "job_id",
                "name what to replay: a job_id, a reason or a campaign",
            ));
        }
        let filter = Filter::parse(query)?;
        let broker = self.broker()?;
        let held = broker.hold_dead(HOLD_MAX).await?;
        let mut report = ReplayReport {
            dry_run,
            replayed: Vec::new(),
            skipped: Vec::new(),
        };
        for letter in &held.letters {
            let about = summary(letter);
            if !filter.matches(&about) {
                continue;
            }
            match self.replay_one(broker, letter, &about, dry_run, lane).await {
                Ok(None) => report.replayed.push(about.job_id.clone()),
                Ok(Some(why)) => report.skipped.push(Skipped {
                    job_id: about.job_id.clone(),
                    why,
                }),
                Err(e) => {
                    held.release().await;
                    return Err(e);
                }
            }
        }
        held.release().await;
        info!(
            replayed = report.replayed.len(),
            skipped = report.skipped.len(),
            dry_run,
            "dead letters replayed by an operator"
        );
        Ok(report)
    }

    /// Replays one letter; `Some(why)` when it stays.
    async fn replay_one(
        &self,
        broker: &RabbitBroker,
        letter: &HeldLetter,
        about: &DeadSummary,
        dry_run: bool,
        given_lane: Option<Lane>,
    ) -> Result<Option<String>, AdminError> {
        let lane = match (about.lane.as_deref().and_then(Lane::parse), given_lane) {
            (Some(recorded), _) => recorded,
            (None, Some(given)) if crate::job::decode(&letter.envelope.body).is_ok() => given,
            (None, Some(_)) => return Ok(Some("not a send job: nothing to replay".into())),
            (None, None) => {
                return Ok(Some(
                    "no lane recorded: name one with --lane (\"lane\" in the API) if it is a job"
                        .into(),
                ));
            }
        };
        let key = self.job_key(&letter.envelope.body);
        let state = match &key {
            Some(key) => self.store.job(key).await?,
            None => None,
        };
        match &state {
            Some(JobState::Sent(wamid)) => return Ok(Some(format!("already sent as {wamid}"))),
            Some(JobState::Claimed { .. }) => return Ok(Some("a worker holds it now".into())),
            Some(JobState::Ambiguous { .. }) => {
                return Ok(Some(
                    "its last send's outcome is unknown: its status webhook settles it".into(),
                ));
            }
            Some(JobState::Dead) | None => {}
        }
        if dry_run {
            return Ok(None);
        }
        // CORRECTNESS: the dead record goes first, or the worker would settle the replayed job
        // as already done; only a record still saying dead is dropped, so a job sent meanwhile
        // keeps its record and is not sent again. The letter leaves the dead queue only once
        // its publish is confirmed: a failure in between leaves it there to replay again.
        if let (Some(key), Some(JobState::Dead)) = (&key, &state) {
            self.store.reopen_dead(key).await?;
        }
        let envelope = Envelope {
            body: letter.envelope.body.clone(),
            headers: replay_headers(&letter.envelope),
        };
        let route = Route::of(lane, &envelope.body);
        broker.publish(Target::Job(route), envelope).await?;
        letter.remove().await?;
        Ok(None)
    }

    /// The store key of a job body, when it names a configured number and a valid id.
    fn job_key(&self, body: &[u8]) -> Option<JobKey> {
        let probe: Probe = serde_json::from_slice(body).ok()?;
        let number = PhoneNumberId::parse(text(probe.phone_number_id)?).ok()?;
        Some(JobKey {
            waba: self.numbers.get(&number)?.clone(),
            job_id: JobId::parse(text(probe.job_id)?).ok()?,
        })
    }

    /// One job's state in portfolio `waba_id` (may be left out when one is configured): its
    /// record, its last delivery status once sent, and its dead letter while there is one.
    pub async fn job(&self, job_id: &str, waba_id: Option<&str>) -> Result<JobStatus, AdminError> {
        let waba = self.waba(waba_id)?;
        let job_id = JobId::parse(job_id.trim()).map_err(|e| invalid("job_id", e.to_string()))?;
        let key = JobKey {
            waba: waba.clone(),
            job_id: job_id.clone(),
        };
        let record = self.store.job(&key).await?;
        let deferred = self.store.deferral(&key).await?;
        let waiting = deferred
            .as_ref()
            .is_some_and(|d| d.until > chrono::Utc::now());
        let (state, wamid) = match record {
            Some(JobState::Ambiguous { .. }) => ("ambiguous", None),
            Some(JobState::Sent(wamid)) => ("sent", Some(wamid)),
            Some(JobState::Dead) => ("dead", None),
            _ if waiting => ("deferred", None),
            Some(JobState::Claimed { .. }) => ("claimed", None),
            // Due again: back in its lane queue, or being taken.
            None if deferred.is_some() => ("queued", None),
            None => ("not_seen", None),
        };
        let status = match &wamid {
            Some(wamid) => self.store.message(&waba, wamid).await?.status,
            None => None,
        };
        let dead_letter = match &self.broker {
            Some(_) => self
                .dead_letter(job_id.as_str())
                .await?
                .map(|view| view.summary),
            None => None,
        };
        Ok(JobStatus {
            job_id,
            waba_id: waba,
            state,
            wamid,
            status,
            deferred,
            dead_letter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{H_TRACEPARENT, Headers};

    #[test]
    fn a_replayed_job_keeps_its_history_but_not_its_dead_letter() {
        let mut headers = Headers::default();
        headers
            .set_str(H_TRACEPARENT, "00-abc-def-01")
            .set_int(H_ATTEMPTS, 3)
            .set_str(H_REASON, "max_attempts")
            .set_str(H_DETAIL, "gave up")
            .set_int(H_ERROR_CODE, 131000)
            .set_str(H_DEAD_AT, "2026-01-01T00:00:00Z")
            .set_str(H_LANE, "bulk")
            .set_int(H_REPLAYED, 1);
        let envelope = Envelope {
            body: bytes::Bytes::from_static(b"{}"),
            headers,
        };
        let again = replay_headers(&envelope);
        assert_eq!(
            again.get_str(H_TRACEPARENT).as_deref(),
            Some("00-abc-def-01")
        );
        assert_eq!(again.attempts(), 3);
        assert_eq!(again.get_int(H_REPLAYED), Some(2));
        assert!(again.get_str(H_REPLAYED_AT).is_some());
        for gone in [H_REASON, H_DETAIL, H_ERROR_CODE, H_DEAD_AT, H_LANE] {
            assert_eq!(again.get_str(gone), None, "{gone} is the dead letter's");
        }
    }

    #[test]
    fn a_letter_the_broker_made_tells_its_reason_queue_and_lane_and_replays_without_them() {
        let mut headers = Headers::default();
        headers
            .set_str(H_TRACEPARENT, "00-abc-def-01")
            .set_int(H_DELIVERY_COUNT, 20)
            .set_str(H_FIRST_DEATH_REASON, "delivery_limit")
            .set_str(H_FIRST_DEATH_QUEUE, "wa.send.106540352242922.otp")
            .set_str("x-first-death-exchange", "");
        let envelope = Envelope {
            body: bytes::Bytes::from_static(
                br#"{"job_id": "j-1", "phone_number_id": "106540352242922"}"#,
            ),
            headers,
        };
        let summary = summarise("delivery_limit", &envelope);
        assert_eq!(summary.reason, "delivery_limit");
        assert_eq!(summary.job_id.as_deref(), Some("j-1"));
        assert_eq!(summary.lane.as_deref(), Some("otp"));
        assert_eq!(summary.route.as_deref(), Some("otp.106540352242922"));
        assert_eq!(
            summary.detail.as_deref(),
            Some("dead-lettered by RabbitMQ (delivery_limit) from wa.send.106540352242922.otp")
        );
        let again = replay_headers(&envelope);
        for gone in [
            H_DELIVERY_COUNT,
            H_FIRST_DEATH_REASON,
            H_FIRST_DEATH_QUEUE,
            "x-first-death-exchange",
        ] {
            assert_eq!(again.get_str(gone), None, "{gone} is the broker's");
        }
        assert_eq!(
            again.get_str(H_TRACEPARENT).as_deref(),
            Some("00-abc-def-01")
        );
    }

    #[test]
    fn a_query_names_the_field_it_gets_wrong() {
        let bad = |q: DeadQuery<'_>| match Filter::parse(&q) {
            Err(AdminError::Invalid { field, .. }) => field,
            _ => "accepted",
        };
        let reason = DeadQuery {
            reason: Some("tired"),
            ..DeadQuery::default()
        };
        assert_eq!(bad(reason), "reason");
        let since = DeadQuery {
            since: Some("yesterday"),
            ..DeadQuery::default()
        };
        assert_eq!(bad(since), "since");
        let fine = DeadQuery {
            reason: Some("outside_care_window"),
            since: Some("2026-01-01T00:00:00Z"),
            ..DeadQuery::default()
        };
        assert_eq!(bad(fine), "accepted");
    }
}
