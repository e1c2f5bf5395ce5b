//! Pure policy: what an error code means for a job, how long to wait before the next attempt,
//! and which delay queue a wait goes to. No I/O, no clocks: table-tested plain functions.

pub mod admission;
pub mod pace;
pub mod template;

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::vocab::{DeadReason, ErrorCode};

/// What to do after an error, decided once from the numeric code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: try again after a backoff; counts as an attempt.
    Retry,
    /// A limit was hit: wait and slow down; not a failure, not an attempt.
    Throttle(Scope),
    /// Sending for this scope must stop (token, account, number): park the job, alert.
    Halt(Scope),
    /// The template is paused: hold the job until it is approved again.
    ParkTemplate,
    /// Meta asks to wait at least this long before trying this user again (131049).
    Cooldown(Duration),
    /// Permanent: dead-letter with this reason.
    DeadLetter(DeadReason),
}

/// What a throttle or halt applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole app (all tokens).
    App,
    /// The access token.
    Token,
    /// The WhatsApp Business Account.
    Waba,
    /// The sending number.
    Number,
    /// One (number, recipient) pair.
    Pair,
}

/// The one classification of Cloud API error codes (Meta's error-code reference). Exhaustive on purpose:
/// a new [`ErrorCode`] does not compile until it has a decision here.
pub fn classify(code: ErrorCode) -> Action {
    use Action::*;
    use ErrorCode as C;
    match code {
        C::ApiUnknown
        | C::ApiService
        | C::SomethingWentWrong
        | C::ServiceUnavailable
        | C::MaintenanceMode
        | C::ServerUnavailable => Retry,
        // 131053 "retry at most once" is bounded by max_attempts like every retry.
        C::MediaUploadError => Retry,
        C::ThroughputLimit => Throttle(Scope::Number),
        C::PairRateLimit => Throttle(Scope::Pair),
        C::ApiTooManyCalls => Throttle(Scope::App),
        C::WabaRateLimit => Throttle(Scope::Waba),
        C::AccessTokenExpired | C::AuthException => Halt(Scope::Token),
        C::Capability | C::PermissionDenied | C::ApiPermission(_) | C::AccessDenied => {
            Halt(Scope::Token)
        }
        C::TemporarilyBlocked | C::AccountLocked | C::BillingIssue | C::CategorisationLimit => {
            Halt(Scope::Waba)
        }
        C::SpamRateLimit
        | C::IncorrectCertificate
        | C::NotRegistered
        | C::DisplayNameNotApproved => Halt(Scope::Number),
        C::TemplatePaused => ParkTemplate,
        C::EcosystemEngagement => Cooldown(Duration::from_secs(24 * 3600)),
        C::ReEngagement => DeadLetter(DeadReason::OutsideCareWindow),
        C::MarketingOptOut => DeadLetter(DeadReason::OptedOutMarketing),
        C::Undeliverable | C::RecipientIsSender | C::RecipientNotAllowed => {
            DeadLetter(DeadReason::RecipientUndeliverable)
        }
        C::TemplateNotFound | C::TemplateDisabled | C::VonageInvalidTemplate => {
            DeadLetter(DeadReason::TemplateNotApproved)
        }
        C::TemplateParamCount
        | C::TemplateTextTooLong
        | C::TemplateFormatPolicy
        | C::TemplateParamFormat
        | C::VonageInvalidParams => DeadLetter(DeadReason::TemplateParamsInvalid),
        C::InvalidParameter
        | C::RequiredParameterMissing
        | C::ParameterValueInvalid
        | C::UnsupportedMessageType
        | C::MediaDownloadError
        | C::ExperimentHoldout
        | C::CountryRestricted
        | C::MarketingNotOnCloudApi => DeadLetter(DeadReason::ApiPermanentError),
        C::Unknown(_) => DeadLetter(DeadReason::ApiPermanentError),
    }
}

/// Retry delays: capped exponential backoff with jitter (backon), rounded up to a delay queue.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First delay.
    pub min_delay: Duration,
    /// Cap on any delay.
    pub max_delay: Duration,
    /// Growth per attempt.
    pub factor: f32,
    /// Attempts (sends tried) before `max_attempts` dead-letters the job.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The delay before attempt `attempts + 1`, or `None` when `attempts` used up the budget.
    pub fn delay_after(&self, attempts: u32) -> Option<Duration> {
        if attempts >= self.max_attempts || attempts == 0 {
            return None;
        }
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts as usize - 1)
            .map(|d| d.min(self.max_delay))
    }
}

/// The fixed-TTL delay queues (`wa.delay.<name>`), shortest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayTiers(Vec<Duration>);

impl DelayTiers {
    /// Tiers from a list of durations (sorted, deduplicated; at least one).
    pub fn new(mut tiers: Vec<Duration>) -> Option<Self> {
        tiers.sort();
        tiers.dedup();
        (!tiers.is_empty() && tiers[0] > Duration::ZERO).then_some(DelayTiers(tiers))
    }

    /// All tiers.
    pub fn all(&self) -> &[Duration] {
        &self.0
    }

    /// The longest tier that waits no longer than `wait` (the shortest one for a shorter
    /// wait). A job never comes back late by more than the shortest tier: it comes back at or
    /// before its due time and waits again for the rest, in shorter tiers (262 s: 2m, 2m, 5s × 4,
    /// 1s × 2), where rounding up to the next tier made it wait up to 10 minutes instead.
    pub fn tier_for(&self, wait: Duration) -> Duration {
        let shortest = self.0[0];
        self.0
            .iter()
            .copied()
            .rev()
            .find(|t| *t <= wait)
            .unwrap_or(shortest)
    }

    /// Queue-name suffix of a tier: `1s`, `30s`, `2m`, `1h`.
    pub fn name(tier: Duration) -> String {
        let s = tier.as_secs();
        match s {
            s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
            s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
            s if s > 0 => format!("{s}s"),
            _ => format!("{}ms", tier.as_millis()),
        }
    }
}

impl Default for DelayTiers {
    fn default() -> Self {
        DelayTiers(
            [1, 5, 30, 120, 600, 3600, 21600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        use Action::*;
        let table = [
            (130429, Throttle(Scope::Number)),
            (131056, Throttle(Scope::Pair)),
            (4, Throttle(Scope::App)),
            (80007, Throttle(Scope::Waba)),
            (131000, Retry),
            (131016, Retry),
            (133004, Retry),
            (2, Retry),
            (190, Halt(Scope::Token)),
            (131031, Halt(Scope::Waba)),
            (368, Halt(Scope::Waba)),
            (131042, Halt(Scope::Waba)),
            (131048, Halt(Scope::Number)),
            (132015, ParkTemplate),
            (131049, Cooldown(Duration::from_secs(86400))),
            (131047, DeadLetter(DeadReason::OutsideCareWindow)),
            (131050, DeadLetter(DeadReason::OptedOutMarketing)),
            (131026, DeadLetter(DeadReason::RecipientUndeliverable)),
            (132001, DeadLetter(DeadReason::TemplateNotApproved)),
            (132016, DeadLetter(DeadReason::TemplateNotApproved)),
            (1022, DeadLetter(DeadReason::TemplateNotApproved)),
            (132000, DeadLetter(DeadReason::TemplateParamsInvalid)),
            (1020, DeadLetter(DeadReason::TemplateParamsInvalid)),
            (100, DeadLetter(DeadReason::ApiPermanentError)),
            (777_777, DeadLetter(DeadReason::ApiPermanentError)),
        ];
        for (code, action) in table {
            assert_eq!(classify(ErrorCode::from(code)), action, "code {code}");
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
            factor: 2.0,
            max_attempts: 6,
        }
    }

    #[test]
    fn backoff_grows_within_jitter_bounds_and_is_capped() {
        let p = policy();
        for _ in 0..200 {
            for attempts in 1..6u32 {
                let base = Duration::from_secs(1 << (attempts - 1));
                let d = p.delay_after(attempts).unwrap();
                assert!(
                    d >= base && d <= (base * 2).min(p.max_delay),
                    "attempt {attempts}: {d:?}"
                );
            }
        }
        let capped = RetryPolicy {
            max_attempts: 50,
            ..policy()
        };
        assert!(capped.delay_after(40).unwrap() <= Duration::from_secs(600));
    }

    #[test]
    fn attempts_budget_ends_retries() {
        assert_eq!(policy().delay_after(6), None);
        assert_eq!(policy().delay_after(0), None);
    }

    #[test]
    fn waits_round_down_so_a_job_is_never_late_by_more_than_the_shortest_tier() {
        let tiers = DelayTiers::default();
        assert_eq!(
            tiers.tier_for(Duration::from_millis(300)),
            Duration::from_secs(1)
        );
        assert_eq!(
            tiers.tier_for(Duration::from_secs(6)),
            Duration::from_secs(5)
        );
        // A wait is a chain of hops, each at most what is left: it ends within 1 s of its due.
        for wait_ms in [300u64, 1_000, 6_000, 262_000, 743_000, 86_400_000] {
            let mut left = Duration::from_millis(wait_ms);
            let mut waited = Duration::ZERO;
            let mut hops = 0;
            while !left.is_zero() {
                let hop = tiers.tier_for(left);
                waited += hop;
                left = left.saturating_sub(hop);
                hops += 1;
            }
            let late = waited - Duration::from_millis(wait_ms);
            assert!(late < Duration::from_secs(1), "{wait_ms} ms: {late:?} late");
            assert!(hops <= 12, "{wait_ms} ms: {hops} hops");
        }
        assert_eq!(
            tiers.tier_for(Duration::from_secs(999_999)),
            Duration::from_secs(21600)
        );
        let names: Vec<_> = tiers.all().iter().map(|t| DelayTiers::name(*t)).collect();
        assert_eq!(names, ["1s", "5s", "30s", "2m", "10m", "1h", "6h"]);
    }
}
