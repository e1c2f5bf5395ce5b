//! Identifier newtypes, parsed at the edge: decoding a job or a webhook *is* validating its ids,
//! and a `WaId` can never be passed where a `PhoneNumberId` is meant.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The value was empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which identifier.
        kind: &'static str,
    },
    /// The value was longer than the identifier allows.
    #[error("{kind} is {len} characters long, the limit is {max}")]
    TooLong {
        /// Which identifier.
        kind: &'static str,
        /// Its length in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value had characters the identifier does not allow.
    #[error("{kind} {value:?} is not valid: {rule}")]
    Malformed {
        /// Which identifier.
        kind: &'static str,
        /// The offending value (never a secret; masked for a phone number).
        value: String,
        /// The rule it broke.
        rule: &'static str,
    },
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates the identifier.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value: String = value.into();
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(&value)?;
                Ok(Self(value))
            }

            /// The identifier as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

fn bounded(kind: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    let len = value.chars().count();
    if len == 0 {
        return Err(IdError::Empty { kind });
    }
    if len > max {
        return Err(IdError::TooLong { kind, len, max });
    }
    Ok(())
}

fn numeric(kind: &'static str, value: &str) -> Result<(), IdError> {
    bounded(kind, value, 32)?;
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IdError::Malformed {
            kind,
            value: value.to_owned(),
            rule: "Graph API ids are decimal digits",
        });
    }
    Ok(())
}

string_id!(
    /// The producer's idempotency key for a send job (≤ 128 characters, no control characters).
    JobId,
    "job_id",
    |v| {
        bounded("job_id", v, 128)?;
        if v.chars().any(char::is_control) {
            return Err(IdError::Malformed {
                kind: "job_id",
                value: v.escape_debug().to_string(),
                rule: "control characters are not allowed",
            });
        }
        Ok(())
    }
);

string_id!(
    /// A campaign, for pause/cancel/report (≤ 128 characters).
    CampaignId,
    "campaign_id",
    |v| bounded("campaign_id", v, 128)
);

string_id!(
    /// A business phone number's Cloud API id (`phone_number_id`), decimal digits.
    PhoneNumberId,
    "phone_number_id",
    |v| numeric("phone_number_id", v)
);

string_id!(
    /// A WhatsApp Business Account id, decimal digits.
    WabaId,
    "waba_id",
    |v| numeric("waba_id", v)
);

string_id!(
    /// The id Meta gives an accepted message (`wamid.…`); key of every later status webhook.
    Wamid,
    "wamid",
    |v| bounded("wamid", v, 256)
);

/// A WhatsApp user: E.164 digits without the `+` (Meta's `wa_id`).
///
/// Parsing accepts an optional leading `+`; the stored form never has it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WaId(String);

impl WaId {
    /// Parses an E.164 number: optional `+`, then 8–15 digits, not starting with 0.
    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value: String = value.into();
        let digits = value.strip_prefix('+').unwrap_or(&value);
        // The refusal is logged and dead-lettered: the number in it is masked.
        let malformed = |rule| IdError::Malformed {
            kind: "to",
            value: mask(&value),
            rule,
        };
        if digits.is_empty() {
            return Err(IdError::Empty { kind: "to" });
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed(
                "an E.164 number has only digits after an optional '+'",
            ));
        }
        if digits.starts_with('0') {
            return Err(malformed(
                "an E.164 number starts with a country code, never 0",
            ));
        }
        if !(8..=15).contains(&digits.len()) {
            return Err(malformed("an E.164 number has 8 to 15 digits"));
        }
        Ok(Self(digits.to_owned()))
    }

    /// The digits, without `+`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number with all but the country prefix and last two digits hidden, for logs.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// `value` as a phone number is shown in logs: an optional `+`, the first two and the last two
/// characters, a `*` for each one between; a value of five characters or fewer is all `*`.
/// Also for numbers that are not valid, so that a refusal does not print one whole.
pub fn mask(value: &str) -> String {
    let (plus, rest) = match value.strip_prefix('+') {
        Some(rest) => ("+", rest),
        None => ("", value),
    };
    let chars: Vec<char> = rest.chars().collect();
    let n = chars.len();
    if n <= 5 {
        return format!("{plus}{}", "*".repeat(n));
    }
    let head: String = chars[..2].iter().collect();
    let tail: String = chars[n - 2..].iter().collect();
    format!("{plus}{head}{}{tail}", "*".repeat(n - 4))
}

impl TryFrom<String> for WaId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        Self::parse(value)
    }
}

impl From<WaId> for String {
    fn from(id: WaId) -> String {
        id.0
    }
}

impl fmt::Display for WaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WaId({})", self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wa_id_accepts_e164_with_or_without_plus() {
        assert_eq!(WaId::parse("+16505551234").unwrap().as_str(), "16505551234");
        assert_eq!(
            WaId::parse("4915112345678").unwrap().as_str(),
            "4915112345678"
        );
    }

    #[test]
    fn wa_id_rejects_what_is_not_e164() {
        for bad in [
            "",
            "+",
            "0165055512",
            "1650555",
            "1234567890123456",
            "+1 650 555 1234",
            "abc12345678",
        ] {
            assert!(WaId::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn wa_id_debug_is_masked() {
        let id = WaId::parse("16505551234").unwrap();
        assert_eq!(format!("{id:?}"), "WaId(16*******34)");
    }

    #[test]
    fn numeric_ids_reject_letters_and_job_ids_reject_control_chars() {
        assert!(PhoneNumberId::parse("1065a").is_err());
        assert!(PhoneNumberId::parse("106540352242922").is_ok());
        assert!(JobId::parse("a\nb").is_err());
        assert!(JobId::parse("x".repeat(129)).is_err());
        assert!(JobId::parse("order-42/shipped").is_ok());
    }
}
