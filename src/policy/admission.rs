//! Admission, the `admit` stage of `decode → pace → admit → send → settle`, as one pure
//! function: may this job be sent now, and what does sending it change? The Redis store runs
//! the same rules as one Lua script (one round trip, atomic across replicas); the in-memory
//! store calls [`admit`] under a lock. The conformance suite (`tests/store_conformance.rs`)
//! holds the two to the same answers.
//!
//! Decoding, the unknown sender and halts are decided before admission, and so is throughput:
//! the `pace` stage (`policy::pace`) waits for the job's send slot first, so what admission
//! charges (the pair rate, the tier) is spent at the moment it was admitted for. See `pipeline`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::Wamid;
use crate::vocab::{Category, DeadReason, DeferCause};

/// The care window: 24 h from the user's last inbound message.
pub const CARE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The messaging tier counts unique users over a rolling 24 h.
pub const TIER_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How long a job waits for the first template registry sync.
pub const REGISTRY_RECHECK: Duration = Duration::from_secs(5);
/// How long a job claimed by another live worker waits.
pub const BUSY_RECHECK: Duration = Duration::from_secs(5);

/// Everything about the job and the rules in force, known before the store is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// This replica, as the claim's owner.
    pub owner: String,
    /// The decision time (millisecond precision: the store keeps milliseconds).
    pub now: DateTime<Utc>,
    /// A claim younger than this belongs to a live worker.
    pub lease: Duration,
    /// At-least-once jobs take over a stale or ambiguous claim; at-most-once jobs wait.
    pub retake_ambiguous: bool,
    /// The job's `expires_at`.
    pub expires_at: Option<DateTime<Utc>>,
    /// The later of `not_before` and the delay queue's due time.
    pub not_before: Option<DateTime<Utc>>,
    /// The message is not a template (text, media, interactive, …).
    pub free_form: bool,
    /// The template that would be sent: the message's own, or for a free-form message its
    /// `fallback_template` (used only when the window is closed).
    pub template: Option<TemplateUse>,
    /// Which template categories need an opt-in when sent outside the care window.
    pub opt_in: OptInPolicy,
    /// The portfolio's messaging tier (unique users outside the window per 24 h); `None` is
    /// unlimited. A limit recorded in the store (from a webhook) wins.
    pub tier_limit: Option<u32>,
    /// The pair rate.
    pub pair: PairRate,
    /// How long a job of a paused campaign waits before it looks again.
    pub campaign_recheck: Duration,
    /// How long a job for a paused template waits before it looks again.
    pub template_recheck: Duration,
}

/// The template a job would send, as far as admission cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateUse {
    /// Is it the job's `fallback_template`?
    pub fallback: bool,
    /// What is wrong with its parameters against the registry's definition, if anything (found
    /// by `policy::template::check`; `None` also when the definition is not known yet).
    pub params: Option<String>,
}

/// Which categories of business-initiated templates need a recorded opt-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptInPolicy {
    /// Marketing templates.
    pub marketing: bool,
    /// Utility templates.
    pub utility: bool,
    /// Authentication templates.
    pub authentication: bool,
}

impl OptInPolicy {
    /// Does a template of `category` need an opt-in?
    pub fn requires(self, category: Category) -> bool {
        match category {
            Category::Marketing => self.marketing,
            Category::Utility => self.utility,
            Category::Authentication => self.authentication,
            Category::Service => false,
        }
    }
}

/// Meta's pair rate: one message per `period` to one user; a burst of up to `burst` within one
/// period is allowed but borrows: after a burst of n, the next burst waits n periods from its start.
///
/// `margin` covers the difference between when the worker decides and when Meta counts (network
/// and scheduling delay), and it must cut both ways: the spacing Meta demands is made *longer*
/// (`period + margin` per message borrowed) and the burst window *shorter* (`period − margin`).
/// A longer period alone (the old 6.1 s) also widened the burst window, so a message sent at
/// 6.05 s after a burst's start counted as in the burst here and as borrowed at Meta: 131056.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairRate {
    /// One message per this long (Meta: 6 s).
    pub period: Duration,
    /// Messages allowed in one burst.
    pub burst: u32,
    /// Safety margin against the delay between deciding and Meta counting.
    pub margin: Duration,
}

impl PairRate {
    /// How far apart Meta's quota is charged, with the margin.
    fn spacing(&self) -> Duration {
        self.period + self.margin
    }

    /// How long after a burst's first message the burst may go on, with the margin.
    fn burst_window(&self) -> Duration {
        self.period.saturating_sub(self.margin)
    }
}

/// The idempotency record of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// A worker is sending it (or died doing so).
    Claimed {
        /// The worker.
        owner: String,
        /// Since when.
        at: DateTime<Utc>,
    },
    /// An earlier send's outcome is unknown since `at`.
    Ambiguous {
        /// Since when.
        at: DateTime<Utc>,
    },
    /// Meta accepted it.
    Sent(Wamid),
    /// It was dead-lettered.
    Dead,
}

/// A campaign's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Sending.
    Active,
    /// Jobs wait until it is resumed.
    Paused,
    /// Jobs are dead-lettered `campaign_cancelled`.
    Cancelled,
}

impl CampaignState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Active => "active",
            CampaignState::Paused => "paused",
            CampaignState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(CampaignState::Active),
            "paused" => Some(CampaignState::Paused),
            "cancelled" => Some(CampaignState::Cancelled),
            _ => None,
        }
    }
}

/// A recorded consent fact: when, and who said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// When.
    pub at: DateTime<Utc>,
    /// Where it came from (`csv:<file>`, `admin`, `131050`, `user_preferences`, `keyword:STOP`, …).
    pub source: String,
}

/// What is known about a user's consent towards one business.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// The opt-in, if recorded.
    pub opt_in: Option<Mark>,
    /// The marketing opt-out, if recorded.
    pub opt_out: Option<Mark>,
}

/// A template as the shared registry knows it (status changes arrive by webhook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateState {
    /// `APPROVED`, `PAUSED`, `PENDING`, `REJECTED`, `DISABLED`, …
    pub status: String,
    /// Its category (the registry's, not the job's hint).
    pub category: Category,
}

/// The pair-rate state of one (number, recipient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairState {
    /// When the next burst may start.
    pub next: DateTime<Utc>,
    /// When the current burst started.
    pub start: DateTime<Utc>,
    /// Messages in the current burst.
    pub count: u32,
}

/// The portfolio's tier usage, with entries older than 24 h already left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierState {
    /// This recipient already counts in the last 24 h.
    pub counted: bool,
    /// Unique recipients in the last 24 h.
    pub used: u32,
    /// The oldest counted send (when a slot frees up).
    pub oldest: Option<DateTime<Utc>>,
    /// A limit recorded in the store (`Some(None)` = unlimited), winning over the request's.
    pub limit: Option<Option<u32>>,
}

/// What the store holds about this job, as admission reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The idempotency record.
    pub job: Option<JobState>,
    /// The user's last inbound message to this number.
    pub last_inbound: Option<DateTime<Utc>>,
    /// Consent towards the business.
    pub consent: Consent,
    /// The job's campaign (`None`: no campaign, or never paused or cancelled).
    pub campaign: Option<CampaignState>,
    /// The template in use, from the registry.
    pub template: Option<TemplateState>,
    /// The registry has been synced at least once for this portfolio.
    pub registry_synced: bool,
    /// Tier usage.
    pub tier: TierState,
    /// Pair-rate state.
    pub pair: Option<PairState>,
}

/// Why a job waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeferReason {
    /// `not_before` lies ahead.
    NotBefore,
    /// Another live worker is sending it.
    ClaimedElsewhere,
    /// Its campaign is paused.
    CampaignPaused,
    /// Its template is paused (quality); it waits to be approved again.
    TemplatePaused,
    /// The template registry has not been synced yet.
    RegistryNotSynced,
    /// The portfolio's messaging tier is used up for the last 24 h.
    TierExhausted {
        /// Unique users counted.
        used: u32,
        /// The tier.
        limit: u32,
    },
    /// The pair rate to this recipient is used up.
    PairRate,
}

impl DeferReason {
    /// The pipeline's cause of this deferral; its token is also the `job.deferred` title.
    pub fn cause(&self) -> DeferCause {
        match self {
            DeferReason::NotBefore => DeferCause::NotBefore,
            DeferReason::ClaimedElsewhere => DeferCause::ClaimedElsewhere,
            DeferReason::CampaignPaused => DeferCause::CampaignPaused,
            DeferReason::TemplatePaused => DeferCause::TemplatePaused,
            DeferReason::RegistryNotSynced => DeferCause::RegistryNotSynced,
            DeferReason::TierExhausted { .. } => DeferCause::TierExhausted,
            DeferReason::PairRate => DeferCause::PairRate,
        }
    }
}

impl fmt::Display for DeferReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeferReason::NotBefore => f.write_str("not_before lies ahead"),
            DeferReason::ClaimedElsewhere => f.write_str("claimed by another worker"),
            DeferReason::CampaignPaused => f.write_str("campaign paused"),
            DeferReason::TemplatePaused => f.write_str("template paused"),
            DeferReason::RegistryNotSynced => f.write_str("template registry not synced yet"),
            DeferReason::TierExhausted { used, limit } => write!(
                f,
                "messaging tier used up: {used} of {limit} unique users outside the care window in 24 h"
            ),
            DeferReason::PairRate => f.write_str("pair rate to this recipient"),
        }
    }
}

/// Why a job can never be sent, with the facts that say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadWhy {
    /// `expires_at` passed.
    Expired(DateTime<Utc>),
    /// The campaign was cancelled.
    CampaignCancelled,
    /// Free-form, window closed, no fallback template.
    OutsideCareWindow {
        /// The last inbound message, if there ever was one.
        last_inbound: Option<DateTime<Utc>>,
    },
    /// The registry has no such template in that language.
    TemplateUnknown,
    /// The template exists but is not approved.
    TemplateNotApproved {
        /// Its status.
        status: String,
    },
    /// The parameters do not fit the template.
    TemplateParams(String),
    /// A business-initiated template of a category that needs an opt-in, and none is recorded.
    NoOptIn(Category),
    /// Marketing to a user who opted out.
    OptedOut(Mark),
}

impl DeadWhy {
    /// The dead-letter reason.
    pub fn reason(&self) -> DeadReason {
        match self {
            DeadWhy::Expired(_) => DeadReason::Expired,
            DeadWhy::CampaignCancelled => DeadReason::CampaignCancelled,
            DeadWhy::OutsideCareWindow { .. } => DeadReason::OutsideCareWindow,
            DeadWhy::TemplateUnknown | DeadWhy::TemplateNotApproved { .. } => {
                DeadReason::TemplateNotApproved
            }
            DeadWhy::TemplateParams(_) => DeadReason::TemplateParamsInvalid,
            DeadWhy::NoOptIn(_) => DeadReason::NoOptIn,
            DeadWhy::OptedOut(_) => DeadReason::OptedOutMarketing,
        }
    }
}

impl fmt::Display for DeadWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadWhy::Expired(at) => write!(f, "expires_at {at} passed before it could be sent"),
            DeadWhy::CampaignCancelled => f.write_str("its campaign was cancelled"),
            DeadWhy::OutsideCareWindow { last_inbound: None } => f.write_str(
                "free-form message, and the user has never written to this number (no care window); give a fallback_template",
            ),
            DeadWhy::OutsideCareWindow {
                last_inbound: Some(at),
            } => write!(
                f,
                "free-form message, and the care window closed (last inbound message {at}); give a fallback_template"
            ),
            DeadWhy::TemplateUnknown => f.write_str(
                "the template does not exist in this language in the portfolio's registry",
            ),
            DeadWhy::TemplateNotApproved { status } => {
                write!(f, "the template is {status}, not APPROVED")
            }
            DeadWhy::TemplateParams(problem) => f.write_str(problem),
            DeadWhy::NoOptIn(category) => write!(
                f,
                "business-initiated {} template and no opt-in is recorded for this user",
                category.as_str()
            ),
            DeadWhy::OptedOut(mark) => write!(
                f,
                "the user opted out of marketing at {} (source {})",
                mark.at, mark.source
            ),
        }
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it now (the claim is taken).
    Send {
        /// Send the job's `fallback_template` instead of its free-form message.
        fallback: bool,
    },
    /// Meta accepted it before: never send again.
    AlreadySent(Wamid),
    /// It was dead-lettered before.
    AlreadyDead,
    /// An earlier send's outcome is unknown since then; an at-most-once job waits for a webhook.
    Ambiguous(DateTime<Utc>),
    /// Not now.
    Defer {
        /// Until when.
        until: DateTime<Utc>,
        /// Why.
        why: DeferReason,
    },
    /// Never.
    Dead(DeadWhy),
}

/// What sending changes in the store (only when the verdict is [`Verdict::Send`], except that
/// a stale claim of an at-most-once job becomes [`JobState::Ambiguous`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// The new idempotency record.
    pub job: Option<JobState>,
    /// The new pair-rate state.
    pub pair: Option<PairState>,
    /// Count the recipient in the tier (its time becomes `now`).
    pub tier: bool,
}

fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + TimeDelta::from_std(d).expect("durations here are small")
}

/// The admission rules. The first failing rule decides.
pub fn admit(req: &Request, snap: &Snapshot) -> (Verdict, Effects) {
    let now = req.now;
    let defer = |until, why| (Verdict::Defer { until, why }, Effects::default());
    let dead = |why| (Verdict::Dead(why), Effects::default());

    // 2. idempotency: a job is sent at most once (an at-least-once job retakes a stale claim).
    match &snap.job {
        None => {}
        Some(JobState::Sent(wamid)) => {
            return (Verdict::AlreadySent(wamid.clone()), Effects::default());
        }
        Some(JobState::Dead) => return (Verdict::AlreadyDead, Effects::default()),
        Some(JobState::Claimed { at, .. }) if now < after(*at, req.lease) => {
            return defer(after(now, BUSY_RECHECK), DeferReason::ClaimedElsewhere);
        }
        Some(JobState::Claimed { at, .. } | JobState::Ambiguous { at })
            if !req.retake_ambiguous =>
        {
            let marked = Effects {
                job: Some(JobState::Ambiguous { at: *at }),
                ..Effects::default()
            };
            return (Verdict::Ambiguous(*at), marked);
        }
        Some(JobState::Claimed { .. } | JobState::Ambiguous { .. }) => {}
    }
    // 3. validity and schedule.
    if let Some(expires_at) = req.expires_at
        && expires_at <= now
    {
        return dead(DeadWhy::Expired(expires_at));
    }
    if let Some(not_before) = req.not_before
        && not_before > now
    {
        return defer(not_before, DeferReason::NotBefore);
    }
    // 4. campaign.
    match snap.campaign {
        Some(CampaignState::Paused) => {
            return defer(
                after(now, req.campaign_recheck),
                DeferReason::CampaignPaused,
            );
        }
        Some(CampaignState::Cancelled) => return dead(DeadWhy::CampaignCancelled),
        Some(CampaignState::Active) | None => {}
    }
    // 5. care window.
    let window_open = snap
        .last_inbound
        .is_some_and(|at| now < after(at, CARE_WINDOW));
    let template = match (&req.template, req.free_form, window_open) {
        (_, true, true) => None,
        (Some(t), true, false) if t.fallback => Some(t),
        (_, true, false) => {
            return dead(DeadWhy::OutsideCareWindow {
                last_inbound: snap.last_inbound,
            });
        }
        (t, false, _) => t.as_ref(),
    };
    let fallback = template.is_some_and(|t| t.fallback);
    // 6. template: approved in that language, parameters that fit.
    if let Some(used) = template {
        let Some(state) = &snap.template else {
            return if snap.registry_synced {
                dead(DeadWhy::TemplateUnknown)
            } else {
                defer(after(now, REGISTRY_RECHECK), DeferReason::RegistryNotSynced)
            };
        };
        match state.status.as_str() {
            "APPROVED" => {}
            "PAUSED" => {
                return defer(
                    after(now, req.template_recheck),
                    DeferReason::TemplatePaused,
                );
            }
            other => {
                return dead(DeadWhy::TemplateNotApproved {
                    status: other.to_owned(),
                });
            }
        }
        if let Some(problem) = &used.params {
            return dead(DeadWhy::TemplateParams(problem.clone()));
        }
        // 7. consent: marketing opt-out always; an opt-in for business-initiated templates.
        if state.category == Category::Marketing
            && let Some(mark) = &snap.consent.opt_out
        {
            return dead(DeadWhy::OptedOut(mark.clone()));
        }
        if !window_open && req.opt_in.requires(state.category) && snap.consent.opt_in.is_none() {
            return dead(DeadWhy::NoOptIn(state.category));
        }
    }
    // 8. tier: unique users outside the window per rolling 24 h, shared by the portfolio.
    let charge_tier = !window_open && !snap.tier.counted;
    if charge_tier {
        let limit = snap.tier.limit.unwrap_or(req.tier_limit);
        if let Some(limit) = limit
            && snap.tier.used >= limit
        {
            let until = snap
                .tier
                .oldest
                .map_or(after(now, TIER_WINDOW), |t| after(t, TIER_WINDOW));
            let until = until.max(after(now, Duration::from_secs(1)));
            return defer(
                until,
                DeferReason::TierExhausted {
                    used: snap.tier.used,
                    limit,
                },
            );
        }
    }
    // 9. pair rate, Meta's burst-and-borrow rule.
    let pair = match snap.pair {
        Some(p) if now < p.next => {
            if now < after(p.start, req.pair.burst_window()) && p.count < req.pair.burst {
                PairState {
                    next: after(p.next, req.pair.spacing()),
                    count: p.count + 1,
                    ..p
                }
            } else {
                return defer(p.next, DeferReason::PairRate);
            }
        }
        _ => PairState {
            next: after(now, req.pair.spacing()),
            start: now,
            count: 1,
        },
    };
    let effects = Effects {
        job: Some(JobState::Claimed {
            owner: req.owner.clone(),
            at: now,
        }),
        pair: Some(pair),
        tier: !window_open,
    };
    (Verdict::Send { fallback }, effects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn request() -> Request {
        Request {
            owner: "w1".into(),
            now: at(0),
            lease: Duration::from_secs(60),
            retake_ambiguous: false,
            expires_at: None,
            not_before: None,
            free_form: false,
            template: Some(TemplateUse {
                fallback: false,
                params: None,
            }),
            opt_in: OptInPolicy {
                marketing: true,
                utility: true,
                authentication: false,
            },
            tier_limit: Some(250),
            pair: PairRate {
                margin: Duration::ZERO,
                period: Duration::from_secs(6),
                burst: 3,
            },
            campaign_recheck: Duration::from_secs(60),
            template_recheck: Duration::from_secs(600),
        }
    }

    fn approved(category: Category) -> Snapshot {
        Snapshot {
            template: Some(TemplateState {
                status: "APPROVED".into(),
                category,
            }),
            registry_synced: true,
            consent: Consent {
                opt_in: Some(Mark {
                    at: at(-100),
                    source: "csv".into(),
                }),
                opt_out: None,
            },
            ..Snapshot::default()
        }
    }

    fn verdict(req: &Request, snap: &Snapshot) -> Verdict {
        admit(req, snap).0
    }

    fn reason(req: &Request, snap: &Snapshot) -> Option<DeadReason> {
        match verdict(req, snap) {
            Verdict::Dead(why) => Some(why.reason()),
            _ => None,
        }
    }

    #[test]
    fn a_clean_template_is_sent_and_charges_claim_pair_and_tier() {
        let (v, e) = admit(&request(), &approved(Category::Utility));
        assert_eq!(v, Verdict::Send { fallback: false });
        assert_eq!(
            e.job,
            Some(JobState::Claimed {
                owner: "w1".into(),
                at: at(0)
            })
        );
        assert_eq!(
            e.pair,
            Some(PairState {
                next: at(6),
                start: at(0),
                count: 1
            })
        );
        assert!(
            e.tier,
            "outside the window the recipient counts against the tier"
        );
    }

    #[test]
    fn idempotency_comes_first() {
        let wamid = Wamid::parse("wamid.X").unwrap();
        let mut snap = approved(Category::Utility);
        let mut req = request();
        req.expires_at = Some(at(-1));
        snap.job = Some(JobState::Sent(wamid.clone()));
        assert_eq!(verdict(&req, &snap), Verdict::AlreadySent(wamid));
        snap.job = Some(JobState::Dead);
        assert_eq!(verdict(&req, &snap), Verdict::AlreadyDead);
        snap.job = Some(JobState::Claimed {
            owner: "w2".into(),
            at: at(-10),
        });
        assert!(matches!(
            verdict(&req, &snap),
            Verdict::Defer {
                why: DeferReason::ClaimedElsewhere,
                ..
            }
        ));
        // A stale claim: an at-most-once job marks it ambiguous and waits; at-least-once retakes.
        snap.job = Some(JobState::Claimed {
            owner: "w2".into(),
            at: at(-61),
        });
        let (v, e) = admit(&req, &snap);
        assert_eq!(v, Verdict::Ambiguous(at(-61)));
        assert_eq!(e.job, Some(JobState::Ambiguous { at: at(-61) }));
        req.retake_ambiguous = true;
        req.expires_at = None;
        assert_eq!(verdict(&req, &snap), Verdict::Send { fallback: false });
    }

    #[test]
    fn table_of_dead_letters_and_deferrals() {
        use Category::*;
        type Case = (
            &'static str,
            fn(&mut Request, &mut Snapshot),
            Option<DeadReason>,
        );
        let cases: Vec<Case> = vec![
            (
                "expired",
                |r, _| r.expires_at = Some(at(0)),
                Some(DeadReason::Expired),
            ),
            (
                "cancelled",
                |_, s| s.campaign = Some(CampaignState::Cancelled),
                Some(DeadReason::CampaignCancelled),
            ),
            (
                "free-form, no window",
                |r, _| {
                    r.free_form = true;
                    r.template = None
                },
                Some(DeadReason::OutsideCareWindow),
            ),
            (
                "free-form, window closed 24 h ago",
                |r, s| {
                    r.free_form = true;
                    r.template = None;
                    s.last_inbound = Some(at(-86_400))
                },
                Some(DeadReason::OutsideCareWindow),
            ),
            (
                "unknown template",
                |_, s| s.template = None,
                Some(DeadReason::TemplateNotApproved),
            ),
            (
                "rejected template",
                |_, s| s.template.as_mut().unwrap().status = "REJECTED".into(),
                Some(DeadReason::TemplateNotApproved),
            ),
            (
                "bad params",
                |r, _| r.template.as_mut().unwrap().params = Some("body: 1 of 2".into()),
                Some(DeadReason::TemplateParamsInvalid),
            ),
            (
                "no opt-in, utility",
                |_, s| s.consent.opt_in = None,
                Some(DeadReason::NoOptIn),
            ),
            (
                "opted out, marketing",
                |_, s| {
                    s.template.as_mut().unwrap().category = Marketing;
                    s.consent.opt_out = Some(Mark {
                        at: at(-5),
                        source: "131050".into(),
                    })
                },
                Some(DeadReason::OptedOutMarketing),
            ),
            // Not failures:
            (
                "no opt-in, authentication (not required)",
                |_, s| {
                    s.consent.opt_in = None;
                    s.template.as_mut().unwrap().category = Authentication
                },
                None,
            ),
            (
                "no opt-in inside the window",
                |_, s| {
                    s.consent.opt_in = None;
                    s.last_inbound = Some(at(-60))
                },
                None,
            ),
            (
                "opted out of marketing, utility still goes",
                |_, s| {
                    s.consent.opt_out = Some(Mark {
                        at: at(-5),
                        source: "admin".into(),
                    })
                },
                None,
            ),
            (
                "free-form inside the window",
                |r, s| {
                    r.free_form = true;
                    r.template = None;
                    s.last_inbound = Some(at(-86_399))
                },
                None,
            ),
            (
                "paused campaign",
                |_, s| s.campaign = Some(CampaignState::Paused),
                None,
            ),
            (
                "paused template",
                |_, s| s.template.as_mut().unwrap().status = "PAUSED".into(),
                None,
            ),
            (
                "registry not synced",
                |_, s| {
                    s.template = None;
                    s.registry_synced = false
                },
                None,
            ),
        ];
        for (name, setup, expected) in cases {
            let mut req = request();
            let mut snap = approved(Utility);
            setup(&mut req, &mut snap);
            assert_eq!(reason(&req, &snap), expected, "{name}");
        }
    }

    #[test]
    fn deferrals_say_until_when() {
        let mut req = request();
        let snap = approved(Category::Utility);
        req.not_before = Some(at(30));
        assert_eq!(
            verdict(&req, &snap),
            Verdict::Defer {
                until: at(30),
                why: DeferReason::NotBefore
            }
        );
        let mut paused = snap.clone();
        paused.template.as_mut().unwrap().status = "PAUSED".into();
        assert_eq!(
            verdict(&request(), &paused),
            Verdict::Defer {
                until: at(600),
                why: DeferReason::TemplatePaused
            }
        );
    }

    #[test]
    fn every_deferral_has_a_cause_of_its_own_and_its_token_is_the_published_title() {
        let reasons = [
            (DeferReason::NotBefore, "not_before"),
            (DeferReason::ClaimedElsewhere, "claimed_elsewhere"),
            (DeferReason::CampaignPaused, "campaign_paused"),
            (DeferReason::TemplatePaused, "template_paused"),
            (DeferReason::RegistryNotSynced, "registry_not_synced"),
            (
                DeferReason::TierExhausted { used: 1, limit: 1 },
                "tier_exhausted",
            ),
            (DeferReason::PairRate, "pair_rate"),
        ];
        let causes: std::collections::BTreeSet<DeferCause> =
            reasons.iter().map(|(r, _)| r.cause()).collect();
        assert_eq!(causes.len(), reasons.len());
        for (reason, title) in &reasons {
            assert_eq!(reason.cause().as_str(), *title, "{reason:?}");
        }
    }

    #[test]
    fn a_closed_window_sends_the_fallback_template() {
        let mut req = request();
        req.free_form = true;
        req.template = Some(TemplateUse {
            fallback: true,
            params: None,
        });
        let mut snap = approved(Category::Utility);
        assert_eq!(verdict(&req, &snap), Verdict::Send { fallback: true });
        // With the window open the free-form message itself goes, and the tier is not charged.
        snap.last_inbound = Some(at(-10));
        let (v, e) = admit(&req, &snap);
        assert_eq!(v, Verdict::Send { fallback: false });
        assert!(!e.tier);
        // A fallback that does not fit is the fallback's problem, reported as such.
        snap.last_inbound = None;
        req.template.as_mut().unwrap().params = Some("bad".into());
        assert_eq!(reason(&req, &snap), Some(DeadReason::TemplateParamsInvalid));
    }

    #[test]
    fn the_tier_defers_new_users_but_not_counted_ones() {
        let mut snap = approved(Category::Utility);
        snap.tier = TierState {
            counted: false,
            used: 250,
            oldest: Some(at(-3600)),
            limit: None,
        };
        assert_eq!(
            verdict(&request(), &snap),
            Verdict::Defer {
                until: at(86_400 - 3600),
                why: DeferReason::TierExhausted {
                    used: 250,
                    limit: 250
                }
            }
        );
        snap.tier.counted = true;
        assert_eq!(
            verdict(&request(), &snap),
            Verdict::Send { fallback: false }
        );
        // A limit recorded in the store (a webhook raised the tier) wins over configuration.
        snap.tier.counted = false;
        snap.tier.limit = Some(Some(2000));
        assert_eq!(
            verdict(&request(), &snap),
            Verdict::Send { fallback: false }
        );
        snap.tier.limit = Some(None);
        assert_eq!(
            verdict(&request(), &snap),
            Verdict::Send { fallback: false }
        );
        // Inside the care window the tier does not apply.
        snap.tier.limit = None;
        snap.last_inbound = Some(at(-1));
        assert_eq!(
            verdict(&request(), &snap),
            Verdict::Send { fallback: false }
        );
    }

    #[test]
    fn the_pair_rate_bursts_then_borrows() {
        let mut req = request();
        let mut snap = approved(Category::Utility);
        let mut sent = Vec::new();
        for second in 0..40 {
            req.now = at(second);
            if let (Verdict::Send { .. }, e) = admit(&req, &snap) {
                snap.pair = e.pair;
                sent.push(second);
            }
        }
        // A burst of 3 in the first period, then nothing until 3 periods after its start,
        // then the next burst.
        assert_eq!(sent, [0, 1, 2, 18, 19, 20, 36, 37, 38]);
        req.now = at(3);
        assert_eq!(
            verdict(&req, &snap),
            Verdict::Defer {
                until: at(54),
                why: DeferReason::PairRate
            }
        );
    }

    #[test]
    fn the_pair_margin_shortens_the_burst_window_and_lengthens_the_spacing() {
        let mut req = request();
        req.pair.margin = Duration::from_millis(500);
        let mut snap = approved(Category::Utility);
        let ms = |m: i64| at(0) + TimeDelta::milliseconds(m);
        req.now = ms(0);
        let (_, e) = admit(&req, &snap);
        snap.pair = e.pair;
        assert_eq!(snap.pair.map(|p| p.next), Some(ms(6_500)));
        // 5.6 s after the burst's start Meta (6 s window) would still count it in the burst, but
        // a message decided then may arrive after 6 s: with the margin it waits.
        req.now = ms(5_600);
        assert_eq!(
            verdict(&req, &snap),
            Verdict::Defer {
                until: ms(6_500),
                why: DeferReason::PairRate
            }
        );
        req.now = ms(5_400);
        let (v, e) = admit(&req, &snap);
        assert_eq!(v, Verdict::Send { fallback: false });
        assert_eq!(
            e.pair.map(|p| p.next),
            Some(ms(13_000)),
            "borrowed 6.5 s more"
        );
    }
}
