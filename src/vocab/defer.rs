//! Why a job was put off: the closed set the pipeline defers with, and that the deferral
//! counters (`wa_deferrals_total`, the worker's `Stats`) and a job's noted deferral carry.

/// Why a job was deferred to a delay queue. A closed set: a stage cannot defer without naming
/// one, so every count and label is one of these, never a phrase that drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeferCause {
    /// A transient failure: tried again after a backoff.
    Retry,
    /// A Meta rate limit (130429, 131056, 4, 80007): waits without spending an attempt.
    Throttled,
    /// A halt of its number, portfolio, token or app: waits for the cool-down.
    SendingHalted,
    /// Its template is paused (by admission, or by Meta's 132015).
    TemplatePaused,
    /// Meta asked for a pause before this user is written to again (131049).
    RecipientCooldown,
    /// Its send got no answer; the at-most-once job waits for a status webhook.
    AmbiguousSend,
    /// Still waiting for the status webhook of an earlier ambiguous send.
    AwaitingWebhook,
    /// Redis did not answer: nothing claimed, nothing sent.
    StoreUnavailable,
    /// Its `not_before` lies ahead (the first deferral of a scheduled job).
    NotBefore,
    /// One more hop through a shorter delay queue of a wait already announced.
    NotYetDue,
    /// Another live worker holds its claim.
    ClaimedElsewhere,
    /// Its campaign is paused.
    CampaignPaused,
    /// The template registry has not been synced yet.
    RegistryNotSynced,
    /// The portfolio's messaging tier is used up.
    TierExhausted,
    /// The pair rate to this recipient is used up.
    PairRate,
}

impl DeferCause {
    /// Every cause, in the order of the enum.
    pub const ALL: [DeferCause; 15] = [
        DeferCause::Retry,
        DeferCause::Throttled,
        DeferCause::SendingHalted,
        DeferCause::TemplatePaused,
        DeferCause::RecipientCooldown,
        DeferCause::AmbiguousSend,
        DeferCause::AwaitingWebhook,
        DeferCause::StoreUnavailable,
        DeferCause::NotBefore,
        DeferCause::NotYetDue,
        DeferCause::ClaimedElsewhere,
        DeferCause::CampaignPaused,
        DeferCause::RegistryNotSynced,
        DeferCause::TierExhausted,
        DeferCause::PairRate,
    ];

    /// The snake_case token: the metric label, the key of the worker's counts and what a job's
    /// noted deferral holds.
    pub fn as_str(self) -> &'static str {
        match self {
            DeferCause::Retry => "retry",
            DeferCause::Throttled => "throttled",
            DeferCause::SendingHalted => "sending_halted",
            DeferCause::TemplatePaused => "template_paused",
            DeferCause::RecipientCooldown => "recipient_cooldown",
            DeferCause::AmbiguousSend => "ambiguous_send",
            DeferCause::AwaitingWebhook => "awaiting_webhook",
            DeferCause::StoreUnavailable => "store_unavailable",
            DeferCause::NotBefore => "not_before",
            DeferCause::NotYetDue => "not_yet_due",
            DeferCause::ClaimedElsewhere => "claimed_elsewhere",
            DeferCause::CampaignPaused => "campaign_paused",
            DeferCause::RegistryNotSynced => "registry_not_synced",
            DeferCause::TierExhausted => "tier_exhausted",
            DeferCause::PairRate => "pair_rate",
        }
    }

    /// The cause as the log says it, and the `error.title` of a `job.deferred` that no error
    /// caused. Consumers match on these titles (the README and `schemas/examples` show
    /// `sending halted` and `not_before`), so each stays as first published, the field's name
    /// included.
    pub fn title(self) -> &'static str {
        match self {
            DeferCause::Retry => "retry",
            DeferCause::Throttled => "throttled",
            DeferCause::SendingHalted => "sending halted",
            DeferCause::TemplatePaused => "template paused",
            DeferCause::RecipientCooldown => "recipient cool-down",
            DeferCause::AmbiguousSend => "ambiguous send",
            DeferCause::AwaitingWebhook => "waiting for a webhook after an ambiguous send",
            DeferCause::StoreUnavailable => "store unavailable",
            DeferCause::NotBefore => "not_before",
            DeferCause::NotYetDue => "not yet due",
            DeferCause::ClaimedElsewhere => "claimed by another worker",
            DeferCause::CampaignPaused => "campaign paused",
            DeferCause::RegistryNotSynced => "template registry not synced yet",
            DeferCause::TierExhausted => "messaging tier used up",
            DeferCause::PairRate => "pair rate to this recipient",
        }
    }
}

impl std::fmt::Display for DeferCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cause_is_listed_once_with_a_snake_case_token_and_a_title() {
        let tokens: std::collections::BTreeSet<&str> =
            DeferCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(tokens.len(), DeferCause::ALL.len());
        for token in tokens {
            let snake = token.starts_with(|c: char| c.is_ascii_lowercase())
                && token.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            assert!(snake, "{token:?} is not a snake_case token");
        }
        assert!(DeferCause::ALL.iter().all(|c| !c.title().is_empty()));
    }
}
