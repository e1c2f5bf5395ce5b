//! Error vocabulary: the Cloud API error codes wa-sender makes a decision about (data only; what
//! each means for a job is decided once, in `policy::classify`), and where an error was found.

use serde::{Deserialize, Serialize};

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

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal),* $(,)?) => {
        /// Every Cloud API (and Vonage-wrapper) error code wa-sender makes a decision about.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A Graph API permission error in 200–299.
            ApiPermission(i64),
            /// A code this build does not know.
            Unknown(i64),
        }

        impl From<i64> for ErrorCode {
            fn from(code: i64) -> Self {
                match code {
                    $($code => ErrorCode::$name,)*
                    200..=299 => ErrorCode::ApiPermission(code),
                    other => ErrorCode::Unknown(other),
                }
            }
        }

        impl ErrorCode {
            /// The numeric code.
            pub fn as_i64(self) -> i64 {
                match self {
                    $(ErrorCode::$name => $code,)*
                    ErrorCode::ApiPermission(c) | ErrorCode::Unknown(c) => c,
                }
            }
        }
    };
}

error_codes! {
    /// 0: AuthException.
    AuthException = 0,
    /// 1: API Unknown: invalid request or possible server error.
    ApiUnknown = 1,
    /// 2: API Service: temporary downtime or overload.
    ApiService = 2,
    /// 3: API method capability missing.
    Capability = 3,
    /// 4: app-level Graph call rate limit.
    ApiTooManyCalls = 4,
    /// 10: permission denied.
    PermissionDenied = 10,
    /// 100: invalid parameter.
    InvalidParameter = 100,
    /// 190: access token expired or invalid.
    AccessTokenExpired = 190,
    /// 368: temporarily blocked for policy violations.
    TemporarilyBlocked = 368,
    /// 1020 (Vonage): invalid parameters, e.g. the retired `fallback` language policy.
    VonageInvalidParams = 1020,
    /// 1022 (Vonage): invalid template, e.g. a template from a foreign namespace.
    VonageInvalidTemplate = 1022,
    /// 80007: the WABA reached its business-use-case rate limit.
    WabaRateLimit = 80007,
    /// 130429: per-number throughput reached.
    ThroughputLimit = 130429,
    /// 130472: user is in a marketing experiment holdout.
    ExperimentHoldout = 130472,
    /// 130497: business may not message users in that country.
    CountryRestricted = 130497,
    /// 131000: something went wrong.
    SomethingWentWrong = 131000,
    /// 131005: access denied.
    AccessDenied = 131005,
    /// 131008: required parameter missing.
    RequiredParameterMissing = 131008,
    /// 131009: parameter value not valid.
    ParameterValueInvalid = 131009,
    /// 131016: service unavailable.
    ServiceUnavailable = 131016,
    /// 131021: recipient cannot be sender.
    RecipientIsSender = 131021,
    /// 131026: message undeliverable.
    Undeliverable = 131026,
    /// 131030: recipient not in the allowed list (test numbers).
    RecipientNotAllowed = 131030,
    /// 131031: account locked.
    AccountLocked = 131031,
    /// 131037: display name not approved.
    DisplayNameNotApproved = 131037,
    /// 131042: billing / eligibility problem.
    BillingIssue = 131042,
    /// 131045: incorrect certificate (registration).
    IncorrectCertificate = 131045,
    /// 131047: free-form message outside the 24 h window.
    ReEngagement = 131047,
    /// 131048: spam rate limit: number restricted.
    SpamRateLimit = 131048,
    /// 131049: per-user marketing frequency cap.
    EcosystemEngagement = 131049,
    /// 131050: user stopped marketing messages.
    MarketingOptOut = 131050,
    /// 131051: unsupported message type.
    UnsupportedMessageType = 131051,
    /// 131052: inbound media download error.
    MediaDownloadError = 131052,
    /// 131053: media upload error.
    MediaUploadError = 131053,
    /// 131056: (business, user) pair rate limit.
    PairRateLimit = 131056,
    /// 131057: account in maintenance mode (e.g. throughput upgrade).
    MaintenanceMode = 131057,
    /// 131063: marketing templates disabled for Cloud API.
    MarketingNotOnCloudApi = 131063,
    /// 131064: messaging limited for template-categorisation violations.
    CategorisationLimit = 131064,
    /// 132000: template parameter count mismatch.
    TemplateParamCount = 132000,
    /// 132001: template missing in that language, or not approved.
    TemplateNotFound = 132001,
    /// 132005: hydrated template text too long.
    TemplateTextTooLong = 132005,
    /// 132007: template format character policy violated.
    TemplateFormatPolicy = 132007,
    /// 132012: template parameter format mismatch.
    TemplateParamFormat = 132012,
    /// 132015: template paused (or a pacing-held message dropped).
    TemplatePaused = 132015,
    /// 132016: template disabled.
    TemplateDisabled = 132016,
    /// 133004: server temporarily unavailable.
    ServerUnavailable = 133004,
    /// 133010: phone number not registered.
    NotRegistered = 133010,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_kept() {
        for code in [0, 1, 4, 100, 190, 1020, 130429, 131047, 132001, 133010] {
            assert_eq!(ErrorCode::from(code).as_i64(), code);
            assert!(
                !matches!(ErrorCode::from(code), ErrorCode::Unknown(_)),
                "{code}"
            );
        }
        assert_eq!(ErrorCode::from(250), ErrorCode::ApiPermission(250));
        assert_eq!(ErrorCode::from(999_999), ErrorCode::Unknown(999_999));
    }
}
