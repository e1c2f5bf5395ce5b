//! Meta's error body. Its numeric code is read as an [`ErrorCode`] (the shared vocabulary); what
//! to *do* with each is decided once, in `policy::classify`.

use serde::{Deserialize, Serialize};

use crate::vocab::ErrorCode;

/// Meta's synchronous error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

/// The `error` object of a Graph API answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Human-readable message (never branch on it).
    #[serde(default)]
    pub message: String,
    /// `OAuthException`, `GraphMethodException`, …
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The numeric code: the only thing behaviour depends on.
    pub code: i64,
    /// Finer-grained code, not always present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_subcode: Option<i64>,
    /// `details` is the specific cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_data: Option<ErrorData>,
    /// Meta's trace id: always log it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fbtrace_id: Option<String>,
}

impl ApiError {
    /// The typed code.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::from(self.code)
    }

    /// `error_data.details`, or the message when there are none.
    pub fn details(&self) -> &str {
        self.error_data
            .as_ref()
            .map(|d| d.details.as_str())
            .filter(|d| !d.is_empty())
            .unwrap_or(&self.message)
    }
}

/// `error.error_data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    /// Always `whatsapp` on Cloud API errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging_product: Option<String>,
    /// The specific cause.
    #[serde(default)]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metas_sample_error_body() {
        let body = r#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,
            "error_data":{"messaging_product":"whatsapp","details":"Cloud API message throughput has been reached."},
            "error_subcode":2494055,"fbtrace_id":"Az8or2yhqkZfEZ-_4Qn_Bam"}}"#;
        let e: ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(e.error.code(), ErrorCode::ThroughputLimit);
        assert_eq!(
            e.error.details(),
            "Cloud API message throughput has been reached."
        );
        assert_eq!(
            e.error.fbtrace_id.as_deref(),
            Some("Az8or2yhqkZfEZ-_4Qn_Bam")
        );
    }
}
