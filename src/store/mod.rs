//! Shared state behind the [`Store`] trait: Redis ([`redis`]) for production, in-process
//! ([`memory`]) for the embedded demo; both pass the same conformance tests
//! (`tests/store_conformance.rs`). It holds idempotency records, care windows, consent, the
//! template registry, campaigns, tier and pair-rate state, each number's send schedule, and the
//! live replicas. The key schema is in [`redis`].

pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::DeadReason;
use crate::ids::{CampaignId, JobId, PhoneNumberId, WaId, WabaId, Wamid};
use crate::policy::admission::{CampaignState, Consent, JobState, Mark, Request, Verdict};
use crate::policy::template::TemplateDefinition;
use crate::vocab::Category;

/// How long an idempotency record outlives its job (Meta retries webhooks for 7 days).
pub const JOB_RECORD_TTL: Duration = Duration::from_secs(8 * 24 * 3600);
/// How long a wamid stays correlated with its job.
pub const WAMID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Identifies a job's record: its portfolio (the Redis Cluster hash tag) and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    /// The WABA owning the sending number.
    pub waba: WabaId,
    /// The job.
    pub job_id: JobId,
}

/// A job put off: when, until when, and why (the `job.deferred` event's cause).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deferral {
    /// When it was put off.
    pub at: DateTime<Utc>,
    /// When it is due again.
    pub until: DateTime<Utc>,
    /// Why: the worker notes a [`DeferCause`](crate::vocab::DeferCause) token (`pair_rate`).
    /// Kept as text and read back as written, so a record an older worker noted with a phrase
    /// (`sending halted`) still shows in `wa-sender job` for its [`JOB_RECORD_TTL`].
    pub cause: String,
}

/// What the webhook processor needs to find a job from a wamid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WamidRecord {
    /// The job.
    pub job_id: String,
    /// Its campaign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// Its trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The job's metadata, echoed in every event about it.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metadata: serde_json::Value,
    /// The job itself (its JSON body) and its lane, kept for marketing templates: Meta may fail
    /// one later with 131049 (per-user marketing cap), and the job is then sent again in 24 h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resend: Option<Resend>,
}

/// What sending a job again needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resend {
    /// The job's body, as it was consumed.
    pub job: String,
    /// Its lane.
    pub lane: crate::job::Lane,
}

/// What the webhook processor knows about one message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The job behind it (`None`: no worker of this deployment recorded the wamid).
    pub record: Option<WamidRecord>,
    /// The last status applied.
    pub status: Option<String>,
    /// Its cost was counted (Meta prices a message on one status only, but may repeat it).
    pub priced: bool,
}

/// What applying one status adds to the reports (nothing for a message no job is known for).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Count in the portfolio's report and this campaign's (`None`: the portfolio's only).
    pub report: bool,
    /// The job's campaign.
    pub campaign: Option<CampaignId>,
    /// Statuses reached by this one, skipped ones included (`read` after `sent` reaches
    /// `delivered` too), so rates stay right when Meta skips a status.
    pub reached: Vec<&'static str>,
    /// The message's estimated cost, counted once per message.
    pub cost: Option<Cost>,
}

/// A billable message's estimated cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// Meta's pricing category (`marketing`, `utility`, …).
    pub category: String,
    /// Millionths of the rate card's currency (0 when the card has no rate for it).
    pub micros: i64,
}

/// Counters of a campaign or a portfolio.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Jobs Meta accepted.
    pub accepted: u64,
    /// Messages that reached each status (`sent`, `delivered`, `read`, `failed`).
    pub statuses: BTreeMap<String, u64>,
    /// Jobs dead-lettered, per reason.
    pub dead: BTreeMap<String, u64>,
    /// Billable messages per pricing category.
    pub billable: BTreeMap<String, u64>,
    /// Estimated cost per pricing category, in millionths of the rate card's currency.
    pub cost_micros: BTreeMap<String, i64>,
}

impl Report {
    /// Adds one counter by its stored name (`accepted`, `status:<s>`, `dead:<reason>`,
    /// `billable:<category>`, `cost:<category>`); unknown names are ignored.
    pub fn add(&mut self, field: &str, value: i64) {
        let count = u64::try_from(value).unwrap_or(0);
        match field.split_once(':') {
            None if field == "accepted" => self.accepted += count,
            Some(("status", s)) => *self.statuses.entry(s.into()).or_default() += count,
            Some(("dead", r)) => *self.dead.entry(r.into()).or_default() += count,
            Some(("billable", c)) => *self.billable.entry(c.into()).or_default() += count,
            Some(("cost", c)) => *self.cost_micros.entry(c.into()).or_default() += value,
            _ => {}
        }
    }

    /// Adds another report's counters (a campaign's over several portfolios).
    pub fn merge(&mut self, other: &Report) {
        self.accepted += other.accepted;
        for (mine, theirs) in [
            (&mut self.statuses, &other.statuses),
            (&mut self.dead, &other.dead),
            (&mut self.billable, &other.billable),
        ] {
            for (key, n) in theirs {
                *mine.entry(key.clone()).or_default() += n;
            }
        }
        for (category, micros) in &other.cost_micros {
            *self.cost_micros.entry(category.clone()).or_default() += micros;
        }
    }

    /// Messages that reached `status`.
    pub fn reached(&self, status: &str) -> u64 {
        self.statuses.get(status).copied().unwrap_or(0)
    }
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis could not be reached at start-up.
    #[error(
        "cannot reach Redis at {url}: {detail}. Is it running? Start it with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no"
    )]
    Unreachable {
        /// The address (without credentials).
        url: String,
        /// The cause.
        detail: String,
    },
    /// A command failed.
    #[error("redis {operation} failed: {detail}")]
    Command {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        detail: String,
    },
}

/// What admission reads and writes besides the job record: the keys of one job's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The job (and its portfolio, the hash tag of every key below).
    pub job: JobKey,
    /// The sending number.
    pub number: PhoneNumberId,
    /// The recipient.
    pub to: WaId,
    /// The job's campaign.
    pub campaign: Option<CampaignId>,
    /// The template that would be sent (name, language), if any.
    pub template: Option<(String, String)>,
}

/// A job's request for its send slot, made together with its admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAsk {
    /// When the slot is asked for (microseconds count).
    pub now: DateTime<Utc>,
    /// The number's interval between sends at full speed.
    pub interval: Duration,
    /// Admit only when the slot booked comes within this long; a later slot is waited for
    /// first, with nothing claimed.
    pub within: Duration,
}

/// The answer to [`Store::book_and_admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Booked {
    /// The slot comes in `wait`, close enough: admission decided in the same round trip.
    Admitted {
        /// How long after [`SlotAsk::now`] the slot comes.
        wait: Duration,
        /// Admission's verdict (a `Send` holds the claim).
        verdict: Verdict,
    },
    /// The slot comes in this long: wait for it, then ask admission alone.
    Later(Duration),
}

/// One replica's heartbeat, and what it learns back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat<'a> {
    /// Replicas sharing the same numbers (e.g. the deployment name).
    pub group: &'a str,
    /// This replica.
    pub replica: &'a str,
    /// Now.
    pub now: DateTime<Utc>,
    /// A replica not heard from for this long is gone.
    pub ttl: Duration,
    /// The numbers whose recorded throughput the replica wants to know.
    pub numbers: &'a [PhoneNumberId],
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Live replicas in the group, this one included.
    pub replicas: u32,
    /// Throughput recorded for a number (by a throughput-upgrade webhook or an admin), which
    /// wins over configuration.
    pub throughput: BTreeMap<PhoneNumberId, u32>,
}

/// What a halt stops: one business number, every number of a WABA, everything sent with the
/// access token, or the whole app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HaltScope {
    /// One number (131048 spam rate limit, an unregistered or unapproved number).
    Number(PhoneNumberId),
    /// A WABA's numbers (131031 account locked, 368 policy block, 131042 payment).
    Waba(WabaId),
    /// Every request with the access token (190 expired or revoked).
    Token,
    /// The app (Meta's app-level limits).
    App,
}

impl HaltScope {
    /// Parses `number:<id>`, `waba:<id>`, `token` or `app`.
    pub fn parse(s: &str) -> Option<HaltScope> {
        match s.split_once(':') {
            Some(("number", id)) => PhoneNumberId::parse(id).ok().map(HaltScope::Number),
            Some(("waba", id)) => WabaId::parse(id).ok().map(HaltScope::Waba),
            None if s == "token" => Some(HaltScope::Token),
            None if s == "app" => Some(HaltScope::App),
            _ => None,
        }
    }

    /// `number`, `waba`, `token` or `app`: the kind of scope, without its id (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            HaltScope::Number(_) => "number",
            HaltScope::Waba(_) => "waba",
            HaltScope::Token => "token",
            HaltScope::App => "app",
        }
    }
}

impl std::fmt::Display for HaltScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaltScope::Number(id) => write!(f, "number:{id}"),
            HaltScope::Waba(id) => write!(f, "waba:{id}"),
            HaltScope::Token => f.write_str("token"),
            HaltScope::App => f.write_str("app"),
        }
    }
}

/// A halt raised by a Cloud API error that no retry can fix, or by one of Meta's account
/// webhooks ([`Store::raise_account_halt`]), shared by every replica: jobs of its scope wait
/// (without spending attempts) until it ends or an operator lifts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    /// What it stops, as [`HaltScope`] writes it (`number:<id>`, `waba:<id>`, `token`, `app`).
    pub scope: String,
    /// The Cloud API error code that raised it; 0 for a halt an account webhook raised (its
    /// `cause` names the webhook).
    pub code: i64,
    /// Meta's message for it.
    pub cause: String,
    /// When it was raised.
    pub at: DateTime<Utc>,
    /// When it ends by itself.
    pub until: DateTime<Utc>,
}

/// The end of an account halt Meta gave no end for (a disabled or deleted WABA): it holds until
/// a webhook or an operator lifts it.
pub const UNTIL_LIFTED: DateTime<Utc> =
    DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31T23:59:59Z is a time");

/// How far ahead [`Store::halts`] reports an account halt's end: jobs halted by one wait this
/// long at most, then look again, so a halt lifted early (a reinstated WABA) frees them within
/// it, while one that holds for days keeps them waiting hop by hop. The worker's own halts
/// wait their cool-down (10 min by default) the same way.
pub const ACCOUNT_HALT_RECHECK: Duration = Duration::from_secs(600);

/// Where a store keeps an account halt among the halts of errors (kept by scope alone):
/// `<scope>|<condition>`, so the halts of one scope are found by the prefix `<scope>|`.
fn account_halt_field(condition: &str, scope: &str) -> String {
    format!("{scope}|{condition}")
}

/// Whether `field` ([`account_halt_field`]) holds an account halt of `scope`.
fn is_account_halt_of(field: &str, scope: &str) -> bool {
    field
        .strip_prefix(scope)
        .is_some_and(|rest| rest.starts_with('|'))
}

/// The halts in force at `now` among `recorded` (each with whether an account webhook raised
/// it), one per scope, by scope: the one that ends last, an account halt ending at most
/// [`ACCOUNT_HALT_RECHECK`] after `now`. Both stores answer [`Store::halts`] with it.
fn in_force(recorded: impl IntoIterator<Item = (bool, Halt)>, now: DateTime<Utc>) -> Vec<Halt> {
    let horizon = now + ACCOUNT_HALT_RECHECK;
    let mut by_scope: BTreeMap<String, Halt> = BTreeMap::new();
    for (account, mut halt) in recorded {
        if halt.until <= now {
            continue;
        }
        if account {
            halt.until = halt.until.min(horizon);
        }
        if by_scope
            .get(&halt.scope)
            .is_none_or(|kept| kept.until < halt.until)
        {
            by_scope.insert(halt.scope.clone(), halt);
        }
    }
    by_scope.into_values().collect()
}

/// Shared state as the pipeline, the admin commands and the webhook processor see it.
#[async_trait]
pub trait Store: Send + Sync {
    /// Decides whether a job may be sent now and, if so, claims it
    /// and charges its pair rate and tier: one round trip, atomic across replicas.
    async fn admit(&self, subject: &Subject, request: &Request) -> Result<Verdict, StoreError>;
    /// Decides admission first, atomically with the rest: a job refused or deferred is answered
    /// at once ([`Booked::Admitted`] with no wait) and books no send slot, so refusals never
    /// slow the jobs that can go. A job that may go books its slot ([`Store::book_slot`]) and,
    /// when the slot comes within `ask.within`, is claimed and charged as [`Store::admit`]
    /// would: for a number below its limit, the slot and the claim cost one round trip.
    /// Otherwise nothing is claimed ([`Booked::Later`]): it is admitted again after the wait,
    /// and a slot that admission then refuses is lost.
    async fn book_and_admit(
        &self,
        subject: &Subject,
        request: &Request,
        ask: &SlotAsk,
    ) -> Result<Booked, StoreError>;
    /// Records that Meta accepted the job, indexes the wamid for webhook correlation and counts
    /// it as accepted in its reports.
    async fn mark_sent(
        &self,
        key: &JobKey,
        wamid: &Wamid,
        record: &WamidRecord,
    ) -> Result<(), StoreError>;
    /// Records that the send's outcome is unknown since `now`.
    async fn mark_ambiguous(
        &self,
        key: &JobKey,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Lets a job Meta accepted and then failed (131049) be sent again: drops its record if it
    /// still says sent with `wamid`; `false` if it says anything else.
    async fn reopen(&self, key: &JobKey, wamid: &Wamid) -> Result<bool, StoreError>;
    /// Lets a dead-lettered job that an operator replays be admitted again: drops its record if
    /// it says dead (atomically: a record that says anything else, sent above all, stays);
    /// `false` if it did not say dead.
    async fn reopen_dead(&self, key: &JobKey) -> Result<bool, StoreError>;
    /// The job's record, if any (`None`: never admitted, or expired).
    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError>;
    /// Notes the job's latest deferral (why, until when), kept with its record for as long,
    /// so `wa-sender job` can tell a job waiting in a delay queue from one never seen.
    async fn note_deferral(&self, key: &JobKey, deferral: &Deferral) -> Result<(), StoreError>;
    /// The job's latest deferral, if one was noted.
    async fn deferral(&self, key: &JobKey) -> Result<Option<Deferral>, StoreError>;
    /// Drops this worker's claim after a definitive failure, so a retry may claim it again.
    async fn release(&self, key: &JobKey, owner: &str) -> Result<(), StoreError>;
    /// Records that the job was dead-lettered, and counts it in its reports (once: a job already
    /// recorded dead is not counted again).
    async fn mark_dead(
        &self,
        key: &JobKey,
        reason: DeadReason,
        campaign: Option<&CampaignId>,
    ) -> Result<(), StoreError>;
    /// What is known about a message: the job behind it, its last status, whether its cost
    /// was counted.
    async fn message(&self, waba: &WabaId, wamid: &Wamid) -> Result<Message, StoreError>;
    /// Records `status` for a message only if the recorded one is still `expected` (compare and
    /// set, atomic across processors), and counts `tally` in the same step; `false`: another
    /// processor got there first and nothing changed.
    async fn apply_status(
        &self,
        waba: &WabaId,
        wamid: &Wamid,
        expected: Option<&str>,
        status: &str,
        tally: &Tally,
    ) -> Result<bool, StoreError>;
    /// A campaign's report (`None`: every job of the portfolio).
    async fn report(
        &self,
        waba: &WabaId,
        campaign: Option<&CampaignId>,
    ) -> Result<Report, StoreError>;

    /// Records an inbound message from `to` to `number` at `at`: the care window runs 24 h from it.
    async fn record_inbound(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        to: &WaId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Records opt-ins (one round trip for the batch); a later opt-in replaces an earlier one.
    async fn record_opt_ins(
        &self,
        waba: &WabaId,
        opt_ins: &[(WaId, Mark)],
    ) -> Result<(), StoreError>;
    /// Records a marketing opt-out (`Some`) or its withdrawal (`None`: the user resumed).
    async fn record_opt_out(
        &self,
        waba: &WabaId,
        to: &WaId,
        mark: Option<Mark>,
    ) -> Result<(), StoreError>;
    /// What is recorded about `to`'s consent.
    async fn consent(&self, waba: &WabaId, to: &WaId) -> Result<Consent, StoreError>;
    /// Sets a campaign's state.
    async fn set_campaign(
        &self,
        waba: &WabaId,
        campaign: &CampaignId,
        state: CampaignState,
    ) -> Result<(), StoreError>;
    /// A campaign's state (`None`: never paused, resumed or cancelled).
    async fn campaign(
        &self,
        waba: &WabaId,
        campaign: &CampaignId,
    ) -> Result<Option<CampaignState>, StoreError>;
    /// Replaces the portfolio's template registry with a fresh sync.
    async fn put_templates(
        &self,
        waba: &WabaId,
        templates: &[TemplateDefinition],
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Records a template's new status (a status webhook); unknown templates wait for a sync.
    async fn set_template_status(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
        status: &str,
    ) -> Result<(), StoreError>;
    /// The portfolio's registry, with the statuses in force.
    async fn templates(&self, waba: &WabaId) -> Result<Vec<TemplateDefinition>, StoreError>;
    /// Records a template's new category (a `template_category_update` webhook), where
    /// admission reads it (marketing opt-outs and opt-in rules) and in its definition (the
    /// registry every replica loads); `false`: the template is not in the registry, and the
    /// next sync brings it with its category.
    async fn set_template_category(
        &self,
        waba: &WabaId,
        name: &str,
        language: &str,
        category: Category,
    ) -> Result<bool, StoreError>;
    /// Records the portfolio's messaging tier (`None`: unlimited), winning over configuration.
    async fn set_tier_limit(&self, waba: &WabaId, limit: Option<u32>) -> Result<(), StoreError>;
    /// The portfolio's recorded messaging tier, which admission uses instead of configuration:
    /// `None` when none was recorded, `Some(None)` when it is unlimited.
    async fn tier_limit(&self, waba: &WabaId) -> Result<Option<Option<u32>>, StoreError>;
    /// Records that `number` of the portfolio shows as `display` (digits only), as Meta pairs
    /// them in `messages` webhooks, so that a webhook naming a number by its display number only
    /// (`phone_number_quality_update`) is applied to it. A later pairing of the same display
    /// number replaces it.
    async fn record_display_number(
        &self,
        waba: &WabaId,
        display: &str,
        number: &PhoneNumberId,
    ) -> Result<(), StoreError>;
    /// The portfolio's recorded display numbers (digits only), each with its number's id.
    async fn display_numbers(
        &self,
        waba: &WabaId,
    ) -> Result<BTreeMap<String, PhoneNumberId>, StoreError>;
    /// Records a number's throughput (messages per second), winning over configuration.
    async fn set_throughput(&self, number: &PhoneNumberId, mps: u32) -> Result<(), StoreError>;
    /// Books `number`'s next send slot in its schedule, shared by every replica: one `interval`
    /// (longer while slowed down by a 130429) after the last slot booked, or `now`; returns how
    /// long after `now` it comes.
    async fn book_slot(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        now: DateTime<Utc>,
        interval: Duration,
    ) -> Result<Duration, StoreError>;
    /// Meta answered 130429 for `number`: its shared send schedule slows by a tenth (down to
    /// half) for `cooldown`, for every replica.
    async fn throttled(
        &self,
        waba: &WabaId,
        number: &PhoneNumberId,
        now: DateTime<Utc>,
        cooldown: Duration,
    ) -> Result<(), StoreError>;
    /// Says this replica is alive; learns how many are, and the numbers' recorded throughput.
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Live, StoreError>;
    /// Says this replica is leaving (graceful shutdown), so the others take over its share.
    async fn leave(&self, group: &str, replica: &str) -> Result<(), StoreError>;
    /// Takes a lock for `ttl` if nobody holds it (e.g. the one replica that syncs templates).
    async fn try_lock(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, StoreError>;
    /// Releases a lock this owner holds.
    async fn unlock(&self, name: &str, owner: &str) -> Result<(), StoreError>;
    /// Answers when the store is reachable now (readiness probes).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Records a halt for every replica (replacing one of the same scope).
    async fn raise_halt(&self, halt: &Halt) -> Result<(), StoreError>;
    /// Records a halt one of Meta's account webhooks raised, for every replica: `condition`
    /// says which (`disabled`, `restricted_business_initiated`, …), and `halt.until` is when
    /// Meta said it ends ([`UNTIL_LIFTED`] when it gave no end). It is kept beside the halt an
    /// error raises for the same scope and beside the other conditions: a 368 and its
    /// cool-down do not shorten a disabled WABA's halt. A later one of the same condition and
    /// scope replaces it.
    async fn raise_account_halt(&self, condition: &str, halt: &Halt) -> Result<(), StoreError>;
    /// Lifts the account halt of `condition` on `scope` (a reinstated WABA); whether there was
    /// one. The scope's other halts stay.
    async fn lift_account_halt(
        &self,
        condition: &str,
        scope: &HaltScope,
    ) -> Result<bool, StoreError>;
    /// The halts in force at `now`, one per scope (the one that ends last). An account halt
    /// ends, in this answer, at most [`ACCOUNT_HALT_RECHECK`] after `now`.
    async fn halts(&self, now: DateTime<Utc>) -> Result<Vec<Halt>, StoreError>;
    /// Lifts every halt of `scope` (an error's and the account webhooks') before its end;
    /// whether there was one.
    async fn lift_halt(&self, scope: &HaltScope) -> Result<bool, StoreError>;
}
