//! Why a job was dead-lettered: the closed set that dashboards and producers act on, also the
//! routing key of each dead letter on `wa.dead`.

use serde::{Deserialize, Serialize};

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
    /// Returned to its queue more often than the queue's delivery limit without being settled
    /// (a worker died, or lost its channel, each time it held the job): dead-lettered by the
    /// worker on its last delivery, or by RabbitMQ after it.
    DeliveryLimit,
}

impl DeadReason {
    /// Every reason, in the order of the enum.
    pub const ALL: [DeadReason; 15] = [
        DeadReason::InvalidJob,
        DeadReason::UnsupportedSchema,
        DeadReason::UnknownSender,
        DeadReason::OutsideCareWindow,
        DeadReason::NoOptIn,
        DeadReason::OptedOutMarketing,
        DeadReason::TemplateNotApproved,
        DeadReason::TemplateParamsInvalid,
        DeadReason::Expired,
        DeadReason::CampaignCancelled,
        DeadReason::RecipientUndeliverable,
        DeadReason::ApiPermanentError,
        DeadReason::AmbiguousSend,
        DeadReason::MaxAttempts,
        DeadReason::DeliveryLimit,
    ];

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
            DeadReason::DeliveryLimit => "delivery_limit",
        }
    }
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_once_and_its_wire_name_is_its_serde_name() {
        let names: std::collections::BTreeSet<&str> =
            DeadReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DeadReason::ALL.len());
        for reason in DeadReason::ALL {
            let serde = serde_json::to_value(reason).unwrap();
            assert_eq!(serde, reason.as_str());
        }
    }
}
