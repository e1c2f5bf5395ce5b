//! Parsing a verified webhook body into typed updates: the first step after the receiver, before
//! the status machine ([`super::status`]) and the event publishers.
//!
//! Two formats come in: Meta's Cloud API envelope (`object`/`entry[]`/`changes[]`) and the flat
//! On-Premises format that BSPs such as Vonage still forward (top-level `statuses[]`,
//! `messages[]`, `contacts[]`, `errors[]`). Every part of a body ends in one of three places:
//! - **understood**: a typed [`Update`];
//! - **ignored on purpose**: a change field listed in [`IGNORED_FIELDS`], with the documented
//!   reason, in [`Parsed::ignored`];
//! - **unreadable**: anything else (an unmodelled field such as `group_participants_update`, a
//!   status value outside Meta's set, a list that is not a list, a `null` value, a bad wamid),
//!   kept raw with its place and reason in [`Parsed::unreadable`] for the processor to park.
//!
//! Unknown *keys* inside an understood object are tolerated (Meta adds them without notice);
//! an unknown *value* that decides what happens is not. Only a body that is not a webhook at all
//! is an error.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::ids::{PhoneNumberId, WaId, WabaId, Wamid};
use crate::vocab::Category;
pub use crate::vocab::Pricing;

/// Why a body is not a webhook at all.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The body is not valid JSON.
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The body is JSON, but an array, string, number, boolean or null.
    #[error("not a JSON object but {0}")]
    NotAnObject(&'static str),
    /// An envelope whose `object` is another Graph product (`page`, `instagram`, …).
    #[error("object is {0}, not \"whatsapp_business_account\"")]
    NotWhatsApp(String),
    /// The body has an `entry` that is not an array.
    #[error("entry is {0}, not an array")]
    EntryNotArray(&'static str),
    /// The body is an object with neither `entry` nor any of the flat format's lists.
    #[error(
        "neither a Cloud API envelope (object/entry) nor a flat On-Premises payload \
         (statuses/messages/errors)"
    )]
    UnknownFormat,
}

/// Change fields wa-sender receives but leaves alone on purpose, with why: acked, logged, never
/// parked. Everything else this build does not model is unreadable (and parked).
pub const IGNORED_FIELDS: &[(&str, &str)] = &[
    (
        "smb_message_echoes",
        "messages the business sent from the WhatsApp Business app, not sends of this worker",
    ),
    (
        "smb_app_state_sync",
        "contact sync of the WhatsApp Business app; wa-sender keeps no contact book",
    ),
    (
        "history",
        "chat history of the WhatsApp Business app; wa-sender keeps no chats",
    ),
];

/// Meta's message status values; any other is unreadable, so it never becomes an event.
pub const KNOWN_STATUSES: &str = "sent, delivered, read, played, failed, deleted, warning";

/// What one body held: the updates in the order they appeared, and every part left out.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// The typed updates.
    pub updates: Vec<Update>,
    /// The business numbers a `messages` value named with both their id and their display
    /// number (`metadata`), once each.
    pub numbers: Vec<DisplayNumber>,
    /// Parts left out on purpose ([`IGNORED_FIELDS`]): where each was and why.
    pub ignored: Vec<String>,
    /// Parts that could not be understood, each to be parked with its reason.
    pub unreadable: Vec<Unreadable>,
}

/// One part of a body that could not be understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// Where it was, e.g. `entry[0].changes[1].value.statuses[2]`.
    pub at: String,
    /// Why it could not be used, e.g. `unmodelled field group_participants_update`.
    pub reason: String,
    /// The part as it came (a change, a status, a message, a list), to be parked.
    pub part: Value,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.reason)
    }
}

/// A business number as a `messages` value's `metadata` names it: Meta's own pairing of its id
/// and its display number, the only name some webhooks give it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DisplayNumber {
    /// `entry[].id`.
    pub waba_id: Option<WabaId>,
    /// `metadata.phone_number_id`.
    pub phone_number_id: PhoneNumberId,
    /// `metadata.display_phone_number`, digits only.
    pub display: String,
}

/// The digits of a display number: Meta's are digits only, a BSP's may carry `+`, spaces or
/// dashes.
pub fn digits(display: &str) -> String {
    display.chars().filter(char::is_ascii_digit).collect()
}

/// A portfolio's messaging limit: how many users it may reach a day outside the care window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessagingLimit {
    /// At most this many users.
    Users(u32),
    /// No limit (`-1`, `TIER_UNLIMITED`).
    Unlimited,
    /// Meta has not set one (`TIER_NOT_SET`): nothing to record.
    NotSet,
}

impl MessagingLimit {
    /// The limit a tier name means (`TIER_2K`: 2,000 users); `None` for a name Meta does not use.
    pub fn from_tier(name: &str) -> Option<MessagingLimit> {
        Some(match name.trim() {
            "TIER_50" => MessagingLimit::Users(50),
            "TIER_250" => MessagingLimit::Users(250),
            "TIER_1K" => MessagingLimit::Users(1000),
            "TIER_2K" => MessagingLimit::Users(2000),
            "TIER_10K" => MessagingLimit::Users(10_000),
            "TIER_100K" => MessagingLimit::Users(100_000),
            "TIER_UNLIMITED" => MessagingLimit::Unlimited,
            "TIER_NOT_SET" => MessagingLimit::NotSet,
            _ => return None,
        })
    }

    /// A `business_capability_update` limit: an integer (`2000`; `-1` is unlimited), the same
    /// as a string of digits, or a tier name (some BSPs forward `"TIER_2K"`).
    fn from_value(value: &Value) -> Option<MessagingLimit> {
        let number = match value {
            Value::Number(n) => n.as_i64()?,
            Value::String(s) if s.trim().starts_with("TIER_") => return Self::from_tier(s),
            Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        match number {
            -1 => Some(MessagingLimit::Unlimited),
            n if n > 0 => Some(MessagingLimit::Users(u32::try_from(n).unwrap_or(u32::MAX))),
            _ => None,
        }
    }
}

/// A restriction Meta put on a WABA (`account_update` `ACCOUNT_RESTRICTION`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// `RESTRICTED_BIZ_INITIATED_MESSAGING`, `RESTRICTED_CUSTOMER_INITIATED_MESSAGING`,
    /// `RESTRICTED_ADD_PHONE_NUMBER_ACTION`, …
    pub kind: String,
    /// When it ends (`expiration`); `None` when Meta gave no end, or one that does not read.
    pub until: Option<DateTime<Utc>>,
}

/// Something that happened to a WABA (`account_update`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUpdate {
    /// `entry[].id`.
    pub waba_id: Option<WabaId>,
    /// `ACCOUNT_VIOLATION`, `ACCOUNT_RESTRICTION`, `DISABLED_UPDATE`, `ACCOUNT_DELETED`, …
    pub event: String,
    /// `restriction_info[]` (of `ACCOUNT_RESTRICTION`).
    pub restrictions: Vec<Restriction>,
    /// `ban_info.waba_ban_state` (of `DISABLED_UPDATE`): `DISABLE`, `REINSTATE`,
    /// `SCHEDULE_FOR_DISABLE`.
    pub ban_state: Option<String>,
    /// `ban_info.waba_ban_date`, as Meta wrote it.
    pub ban_date: Option<String>,
}

/// A template's category changed, or is about to (`template_category_update`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryChange {
    /// `entry[].id`.
    pub waba_id: Option<WabaId>,
    /// `message_template_name`.
    pub name: String,
    /// `message_template_language`, e.g. `en_US`.
    pub language: String,
    /// `new_category`: the template's category now. Meta sends it in both variants: after a
    /// change (beside `previous_category`) and before one (beside `correct_category`, when it is
    /// still the current category).
    pub category: Category,
    /// `previous_category`, after a change.
    pub previous: Option<String>,
    /// `correct_category`: the category it will get at `due`, before a change.
    pub upcoming: Option<String>,
    /// `category_update_timestamp`: when the upcoming change happens.
    pub due: Option<DateTime<Utc>>,
}

/// One thing a webhook told us.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A status of a message we sent (`statuses[]`).
    Status(StatusUpdate),
    /// A message a user sent us (`messages[]`).
    Inbound(InboundMessage),
    /// value.errors[] / top-level errors[]: a problem not tied to one message.
    Error {
        /// `entry[].id`; `None` in the flat format.
        waba_id: Option<WabaId>,
        /// `metadata.phone_number_id`; `None` in the flat format.
        phone_number_id: Option<PhoneNumberId>,
        /// The error.
        error: WebhookError,
    },
    /// A user stopped or resumed marketing messages (`user_preferences`).
    UserPreference {
        /// `entry[].id`.
        waba_id: Option<WabaId>,
        /// The user.
        wa_id: WaId,
        /// `true` for `stop`, `false` for `resume`.
        stop: bool,
        /// When the user chose.
        at: DateTime<Utc>,
    },
    /// A template changed status (`message_template_status_update`).
    TemplateStatus {
        /// `entry[].id`.
        waba_id: Option<WabaId>,
        /// `message_template_name`.
        name: String,
        /// `message_template_language`, e.g. `en_US`.
        language: String,
        /// `APPROVED`, `REJECTED`, `PAUSED`, `DISABLED`, `REINSTATED`, …
        event: String,
        /// Meta's `reason` code; `None` when absent, null or `NONE`.
        reason: Option<String>,
    },
    /// phone_number_quality_update: THROUGHPUT_UPGRADE etc.
    NumberQuality {
        /// `entry[].id`.
        waba_id: Option<WabaId>,
        /// The number's display number, as sent (Meta's are digits only; compare [`digits`]).
        display_phone_number: Option<String>,
        /// `THROUGHPUT_UPGRADE`, `ONBOARDING`, legacy `FLAGGED`/`UNFLAGGED`/`UPGRADE`/`DOWNGRADE`.
        event: String,
        /// `max_daily_conversations_per_business`, or else `current_limit` (`TIER_…`).
        limit: Option<String>,
    },
    /// Something happened to the WABA (`account_update`): violations, restrictions, deletion.
    Account(AccountUpdate),
    /// The portfolio's capabilities changed (`business_capability_update`): its messaging limit.
    BusinessCapability {
        /// `entry[].id`.
        waba_id: Option<WabaId>,
        /// `max_daily_conversations_per_business`, else the deprecated
        /// `max_daily_conversation_per_phone`; `None` when neither is given.
        limit: Option<MessagingLimit>,
        /// `max_phone_numbers_per_waba`, as given.
        max_phone_numbers_per_waba: Option<Value>,
        /// `max_phone_numbers_per_business`, as given.
        max_phone_numbers_per_business: Option<Value>,
    },
    /// A template's category changed (`template_category_update`).
    TemplateCategory(CategoryChange),
}

/// A status webhook for one message we sent.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// The message.
    pub wamid: Wamid,
    /// What happened to it.
    pub status: MessageStatus,
    /// When it happened (Meta's `timestamp`, not when we heard of it).
    pub at: DateTime<Utc>,
    /// The user's number, or a group id.
    pub recipient_id: Option<String>,
    /// The business number that sent it; `None` in the flat format.
    pub phone_number_id: Option<PhoneNumberId>,
    /// `entry[].id`; `None` in the flat format.
    pub waba_id: Option<WabaId>,
    /// What we set on the send (wa-sender puts the job id there).
    pub biz_opaque_callback_data: Option<String>,
    /// How the message is billed; on `sent` and one later status at most.
    pub pricing: Option<Pricing>,
    /// Why it failed (usually on `failed` only).
    pub errors: Vec<WebhookError>,
}

/// A message status, as the webhook names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    /// Meta accepted the message and sent it towards the user.
    Sent,
    /// It reached the user's device.
    Delivered,
    /// The user opened it.
    Read,
    /// The user played the voice message.
    Played,
    /// It could not be delivered; see the status's errors.
    Failed,
    /// On-Premises only: the user deleted the message.
    Deleted,
    /// On-Premises only: a problem with a message that was still delivered (e.g. a catalog item).
    Warning,
    /// A status this build does not know, as sent.
    Other(String),
}

impl MessageStatus {
    /// The status as the webhook spells it.
    pub fn as_str(&self) -> &str {
        match self {
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Read => "read",
            MessageStatus::Played => "played",
            MessageStatus::Failed => "failed",
            MessageStatus::Deleted => "deleted",
            MessageStatus::Warning => "warning",
            MessageStatus::Other(other) => other,
        }
    }

    /// The status as a metric label: as spelled, but `other` for every status this build does
    /// not know, so a stream of new values cannot make a series each.
    pub fn label(&self) -> &'static str {
        match self {
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Read => "read",
            MessageStatus::Played => "played",
            MessageStatus::Failed => "failed",
            MessageStatus::Deleted => "deleted",
            MessageStatus::Warning => "warning",
            MessageStatus::Other(_) => "other",
        }
    }
}

impl From<&str> for MessageStatus {
    /// Case-insensitive, as BSPs do not all keep Meta's lower case.
    fn from(status: &str) -> Self {
        match status.to_ascii_lowercase().as_str() {
            "sent" => MessageStatus::Sent,
            "delivered" => MessageStatus::Delivered,
            "read" => MessageStatus::Read,
            "played" => MessageStatus::Played,
            "failed" => MessageStatus::Failed,
            "deleted" => MessageStatus::Deleted,
            "warning" => MessageStatus::Warning,
            _ => MessageStatus::Other(status.to_owned()),
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error in a webhook: on a failed status, in `value.errors[]` or in top-level `errors[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookError {
    /// The numeric code: the only thing behaviour may depend on (see `vocab::ErrorCode`).
    pub code: i64,
    /// Meta's title (the same as its `message`); empty if there was none.
    pub title: String,
    /// error_data.details, or details (On-Premises), or message; empty if there was none.
    pub details: String,
}

/// A message a user sent to one of our numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    /// The user's message id.
    pub wamid: Wamid,
    /// The user.
    pub from: WaId,
    /// When the user sent it.
    pub at: DateTime<Utc>,
    /// The business number it was sent to; `None` in the flat format.
    pub phone_number_id: Option<PhoneNumberId>,
    /// `entry[].id`; `None` in the flat format.
    pub waba_id: Option<WabaId>,
    /// `text`, `button`, `interactive`, `image`, `system`, `unsupported`, …
    pub kind: String,
    /// `text.body`, `button.text`, or the title of an interactive button or list reply.
    pub text: Option<String>,
    /// The user's profile name from `contacts[]`.
    pub profile_name: Option<String>,
}

/// Whether an inbound text is an opt-out: the whole message, trimmed, equals one of `keywords`
/// ignoring case ("stop", " Stopp ", "ABMELDEN"). A sentence that merely contains a keyword is
/// not an opt-out.
pub fn is_stop_keyword(text: &str, keywords: &[String]) -> bool {
    let text = text.trim();
    !text.is_empty()
        && keywords.iter().any(|keyword| {
            let keyword = keyword.trim();
            !keyword.is_empty()
                && keyword
                    .chars()
                    .flat_map(char::to_lowercase)
                    .eq(text.chars().flat_map(char::to_lowercase))
        })
}

/// Parses a webhook body (already verified by its signature) into updates.
pub fn parse(body: &[u8]) -> Result<Parsed, ParseError> {
    let root: Value = serde_json::from_slice(body).map_err(ParseError::NotJson)?;
    if !root.is_object() {
        return Err(ParseError::NotAnObject(json_kind(&root)));
    }
    let mut parsed = Parsed::default();
    if let Some(entries) = root.get("entry") {
        match root.get("object") {
            None => {}
            Some(object) if object == "whatsapp_business_account" => {}
            Some(other) => return Err(ParseError::NotWhatsApp(other.to_string())),
        }
        let entries = entries
            .as_array()
            .ok_or_else(|| ParseError::EntryNotArray(json_kind(entries)))?;
        for (i, entry) in entries.iter().enumerate() {
            parsed.entry(&format!("entry[{i}]"), entry);
        }
    } else if let Some(flat) = message_lists(&root) {
        // The flat format is a `messages` change value without metadata or WABA.
        parsed.messages(&Source::default(), "", flat);
    } else {
        return Err(ParseError::UnknownFormat);
    }
    Ok(parsed)
}

/// Where the items of one change came from.
#[derive(Default)]
struct Source {
    waba_id: Option<WabaId>,
    phone_number_id: Option<PhoneNumberId>,
}

/// The template categories Meta gives (`SERVICE` is a pricing category, not a template's).
const TEMPLATE_CATEGORIES: &str = "MARKETING, UTILITY, AUTHENTICATION";

impl Parsed {
    /// Notes `part`, found `at`, as unreadable for `why`.
    fn skip(&mut self, at: impl fmt::Display, why: impl fmt::Display, part: &Value) {
        self.unreadable.push(Unreadable {
            at: at.to_string(),
            reason: why.to_string(),
            part: part.clone(),
        });
    }

    /// Deserializes `value` as `T`, or notes why not.
    fn decode<T: DeserializeOwned>(&mut self, at: impl fmt::Display, value: &Value) -> Option<T> {
        T::deserialize(value)
            .inspect_err(|e| self.skip(at, e, value))
            .ok()
    }

    fn entry(&mut self, at: &str, entry: &Value) {
        let waba_id = entry
            .get("id")
            .and_then(|id| self.id(format_args!("{at}.id"), id, WabaId::parse));
        let Some(changes) = entry.get("changes").and_then(Value::as_array) else {
            self.skip(at, "no changes[]", entry);
            return;
        };
        for (i, change) in changes.iter().enumerate() {
            let at = format!("{at}.changes[{i}]");
            let Some(field) = change.get("field").and_then(Value::as_str) else {
                self.skip(at, "no field", change);
                continue;
            };
            if let Some((_, why)) = IGNORED_FIELDS.iter().find(|(f, _)| *f == field) {
                self.ignored
                    .push(format!("{at}: field {field} ignored: {why}"));
                continue;
            }
            match change.get("value") {
                Some(value) if value.is_object() => {
                    self.change(&format!("{at}.value"), waba_id.clone(), field, change);
                }
                Some(other) => {
                    let why = format!("value is {}, not an object", json_kind(other));
                    self.skip(at, why, change);
                }
                None => self.skip(at, "no value", change),
            }
        }
    }

    /// One change (`field` and an object `value`); `at` names its value.
    fn change(&mut self, at: &str, waba_id: Option<WabaId>, field: &str, change: &Value) {
        let value = &change["value"];
        if field == "messages"
            && let Some(lists) = message_lists(value)
        {
            let phone_number_id = value.pointer("/metadata/phone_number_id").and_then(|id| {
                self.id(
                    format_args!("{at}.metadata.phone_number_id"),
                    id,
                    PhoneNumberId::parse,
                )
            });
            let display = value
                .pointer("/metadata/display_phone_number")
                .and_then(Value::as_str)
                .map(digits)
                .filter(|d| !d.is_empty());
            if let (Some(phone_number_id), Some(display)) = (&phone_number_id, display) {
                let seen = DisplayNumber {
                    waba_id: waba_id.clone(),
                    phone_number_id: phone_number_id.clone(),
                    display,
                };
                if !self.numbers.contains(&seen) {
                    self.numbers.push(seen);
                }
            }
            let source = Source {
                waba_id,
                phone_number_id,
            };
            self.messages(&source, at, lists);
            return;
        }
        if field == "user_preferences"
            && let Some(list) = value.get("user_preferences").and_then(Value::as_array)
        {
            for (i, item) in list.iter().enumerate() {
                let at = format!("{at}.user_preferences[{i}]");
                if let Some(update) = self.user_preference(&at, waba_id.clone(), item) {
                    self.updates.push(update);
                }
            }
            return;
        }
        let update = match field {
            "message_template_status_update" => {
                self.decode(at, value)
                    .map(|t: RawTemplateStatus| Update::TemplateStatus {
                        waba_id,
                        name: t.message_template_name,
                        language: t.message_template_language,
                        event: t.event,
                        reason: t.reason.filter(|r| !r.is_empty() && r != "NONE"),
                    })
            }
            "phone_number_quality_update" => {
                self.decode(at, value)
                    .map(|q: RawNumberQuality| Update::NumberQuality {
                        waba_id,
                        display_phone_number: q.display_phone_number,
                        event: q.event,
                        limit: q.max_daily_conversations_per_business.or(q.current_limit),
                    })
            }
            "account_update" => self.account_update(at, waba_id, value),
            "business_capability_update" => self.business_capability(at, waba_id, value),
            "template_category_update" => self.template_category(at, waba_id, value),
            "messages" | "user_preferences" => {
                self.skip(at, format_args!("a {field} value without its list"), change);
                None
            }
            // `group_lifecycle_update`, `group_participants_update`, … and Meta's next field.
            _ => {
                self.skip(at, format_args!("unmodelled field {field}"), change);
                None
            }
        };
        self.updates.extend(update);
    }

    /// A `messages` change value, or the whole flat On-Premises body.
    fn messages(&mut self, source: &Source, at: &str, value: &Map<String, Value>) {
        let path = |list: &str, i: usize| {
            if at.is_empty() {
                format!("{list}[{i}]")
            } else {
                format!("{at}.{list}[{i}]")
            }
        };
        for key in ["statuses", "messages", "errors", "contacts"] {
            if let Some(other) = value.get(key).filter(|v| !v.is_array()) {
                let at = if at.is_empty() {
                    key.to_owned()
                } else {
                    format!("{at}.{key}")
                };
                self.skip(
                    at,
                    format_args!("is {}, not an array", json_kind(other)),
                    other,
                );
            }
        }
        for (i, status) in list(value, "statuses").enumerate() {
            if let Some(status) = self.status(&path("statuses", i), source, status) {
                self.updates.push(Update::Status(status));
            }
        }
        let contacts: Vec<RawContact> = list(value, "contacts")
            .enumerate()
            .filter_map(|(i, contact)| self.decode(path("contacts", i), contact))
            .collect();
        for (i, message) in list(value, "messages").enumerate() {
            if let Some(message) = self.inbound(&path("messages", i), source, &contacts, message) {
                self.updates.push(Update::Inbound(message));
            }
        }
        for (i, error) in list(value, "errors").enumerate() {
            if let Some(error) = self.error(path("errors", i), error) {
                self.updates.push(Update::Error {
                    waba_id: source.waba_id.clone(),
                    phone_number_id: source.phone_number_id.clone(),
                    error,
                });
            }
        }
    }

    fn status(&mut self, at: &str, source: &Source, value: &Value) -> Option<StatusUpdate> {
        let raw: RawStatus = self.decode(at, value)?;
        let status = MessageStatus::from(raw.status.as_str());
        if let MessageStatus::Other(other) = &status {
            let why = format!("status {other:?} is not one of Meta's ({KNOWN_STATUSES})");
            self.skip(at, why, value);
            return None;
        }
        let wamid = Wamid::parse(raw.id)
            .inspect_err(|e| self.skip(at, e, value))
            .ok()?;
        // A pricing quirk must not cost us the status: the status goes on without it.
        let pricing = raw
            .pricing
            .and_then(|p| self.decode(format_args!("{at}.pricing (ignored)"), &p));
        let errors = raw
            .errors
            .iter()
            .enumerate()
            .filter_map(|(i, e)| self.error(format_args!("{at}.errors[{i}]"), e))
            .collect();
        Some(StatusUpdate {
            wamid,
            status,
            at: raw.timestamp,
            recipient_id: raw.recipient_id,
            phone_number_id: source.phone_number_id.clone(),
            waba_id: source.waba_id.clone(),
            biz_opaque_callback_data: raw.biz_opaque_callback_data,
            pricing,
            errors,
        })
    }

    fn inbound(
        &mut self,
        at: &str,
        source: &Source,
        contacts: &[RawContact],
        value: &Value,
    ) -> Option<InboundMessage> {
        let raw: RawMessage = self.decode(at, value)?;
        let wamid = Wamid::parse(raw.id)
            .inspect_err(|e| self.skip(at, e, value))
            .ok()?;
        let from = WaId::parse(raw.from)
            .inspect_err(|e| self.skip(at, format_args!("from: {e}"), value))
            .ok()?;
        let text = match raw.kind.as_str() {
            "text" => raw.text.and_then(|t| t.body),
            "button" => raw.button.and_then(|b| b.text),
            "interactive" => raw
                .interactive
                .and_then(|i| i.button_reply.or(i.list_reply))
                .and_then(|reply| reply.title),
            _ => None,
        };
        // A value carries the contacts of its messages; with one contact there is no doubt.
        let contact = contacts
            .iter()
            .find(|c| c.wa_id.as_deref() == Some(from.as_str()))
            .or(match contacts {
                [only] => Some(only),
                _ => None,
            });
        Some(InboundMessage {
            wamid,
            from,
            at: raw.timestamp,
            phone_number_id: source.phone_number_id.clone(),
            waba_id: source.waba_id.clone(),
            kind: raw.kind,
            text,
            profile_name: contact.and_then(|c| c.profile.as_ref()?.name.clone()),
        })
    }

    fn error(&mut self, at: impl fmt::Display, value: &Value) -> Option<WebhookError> {
        let raw: RawError = self.decode(at, value)?;
        let present = |s: Option<String>| s.filter(|s| !s.is_empty());
        let details = present(raw.error_data.and_then(|d| d.details))
            .or(present(raw.details))
            .or(present(raw.message.clone()));
        Some(WebhookError {
            code: raw.code,
            title: present(raw.title).or(raw.message).unwrap_or_default(),
            details: details.unwrap_or_default(),
        })
    }

    fn user_preference(
        &mut self,
        at: &str,
        waba_id: Option<WabaId>,
        value: &Value,
    ) -> Option<Update> {
        let raw: RawUserPreference = self.decode(at, value)?;
        if let Some(category) = raw.category.filter(|c| c != "marketing_messages") {
            self.skip(
                at,
                format_args!("category {category:?} is not marketing_messages"),
                value,
            );
            return None;
        }
        let stop = match raw.value.to_ascii_lowercase().as_str() {
            "stop" => true,
            "resume" => false,
            other => {
                self.skip(
                    at,
                    format_args!("value {other:?} is neither stop nor resume"),
                    value,
                );
                return None;
            }
        };
        let wa_id = WaId::parse(raw.wa_id)
            .inspect_err(|e| self.skip(at, format_args!("wa_id: {e}"), value))
            .ok()?;
        Some(Update::UserPreference {
            waba_id,
            wa_id,
            stop,
            at: raw.timestamp,
        })
    }

    fn account_update(
        &mut self,
        at: &str,
        waba_id: Option<WabaId>,
        value: &Value,
    ) -> Option<Update> {
        let raw: RawAccountUpdate = self.decode(at, value)?;
        let mut restrictions = Vec::new();
        for (i, item) in raw.restriction_info.iter().enumerate() {
            let at = format!("{at}.restriction_info[{i}]");
            let Some(r) = self.decode::<RawRestriction>(&at, item) else {
                continue;
            };
            // An end that does not read must not cost us the restriction: it holds until
            // lifted, and the part is parked so that someone reads the end.
            let until = r.expiration.as_ref().and_then(|e| {
                let until = time(e);
                if until.is_none() {
                    let why = format!("expiration {e} is neither unix seconds nor a date and time");
                    self.skip(format_args!("{at}.expiration (ignored)"), why, item);
                }
                until
            });
            restrictions.push(Restriction {
                kind: r.restriction_type,
                until,
            });
        }
        let (ban_state, ban_date) = raw
            .ban_info
            .map_or((None, None), |b| (b.waba_ban_state, b.waba_ban_date));
        Some(Update::Account(AccountUpdate {
            waba_id,
            event: raw.event,
            restrictions,
            ban_state,
            ban_date,
        }))
    }

    fn business_capability(
        &mut self,
        at: &str,
        waba_id: Option<WabaId>,
        value: &Value,
    ) -> Option<Update> {
        let raw: RawBusinessCapability = self.decode(at, value)?;
        // `max_daily_conversation_per_phone` is deprecated (removed 2026-02): the business's
        // limit wins when both are given.
        let stated = [
            (
                "max_daily_conversations_per_business",
                &raw.max_daily_conversations_per_business,
            ),
            (
                "max_daily_conversation_per_phone",
                &raw.max_daily_conversation_per_phone,
            ),
        ]
        .into_iter()
        .find_map(|(name, v)| v.as_ref().filter(|v| !v.is_null()).map(|v| (name, v)));
        let limit = match stated {
            None => None,
            Some((name, v)) => match MessagingLimit::from_value(v) {
                Some(limit) => Some(limit),
                None => {
                    let why = format!(
                        "{name} {v} is not a messaging limit (250, 2000, 10000, 100000, -1 for \
                         unlimited, or a TIER_* name)"
                    );
                    self.skip(at, why, value);
                    return None;
                }
            },
        };
        Some(Update::BusinessCapability {
            waba_id,
            limit,
            max_phone_numbers_per_waba: raw.max_phone_numbers_per_waba,
            max_phone_numbers_per_business: raw.max_phone_numbers_per_business,
        })
    }

    fn template_category(
        &mut self,
        at: &str,
        waba_id: Option<WabaId>,
        value: &Value,
    ) -> Option<Update> {
        let raw: RawTemplateCategory = self.decode(at, value)?;
        let Some(category) = Category::parse(&raw.new_category).filter(|c| *c != Category::Service)
        else {
            let why = format!(
                "new_category {:?} is not a template category ({TEMPLATE_CATEGORIES})",
                raw.new_category
            );
            self.skip(at, why, value);
            return None;
        };
        let due = raw.category_update_timestamp.as_ref().and_then(time);
        Some(Update::TemplateCategory(CategoryChange {
            waba_id,
            name: raw.message_template_name,
            language: raw.message_template_language,
            category,
            previous: raw.previous_category,
            upcoming: raw.correct_category,
            due,
        }))
    }

    /// An id beside the items (WABA, phone number): a bad one is noted and left out, and the
    /// items are still parsed.
    fn id<T, E: fmt::Display>(
        &mut self,
        at: impl fmt::Display,
        value: &Value,
        parse: fn(String) -> Result<T, E>,
    ) -> Option<T> {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        parse(text).inspect_err(|e| self.skip(at, e, value)).ok()
    }
}

/// The object, if it carries any of a `messages` value's lists.
fn message_lists(value: &Value) -> Option<&Map<String, Value>> {
    value.as_object().filter(|map| {
        ["statuses", "messages", "errors"]
            .iter()
            .any(|key| map.contains_key(*key))
    })
}

/// The elements of `value[key]`, none if it is absent or not an array.
fn list<'v>(value: &'v Map<String, Value>, key: &str) -> impl Iterator<Item = &'v Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Unix seconds, as a string (Meta's statuses and messages) or a number (`user_preferences`).
fn unix_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let value = Value::deserialize(deserializer)?;
    let seconds = match &value {
        Value::String(s) => s.trim().parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    };
    seconds
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .ok_or_else(|| D::Error::custom(format!("timestamp {value} is not unix seconds")))
}

/// A time Meta gives as unix seconds (a number or a string of digits) or as a date and time
/// (`2026-04-19T13:59:20+0000`, RFC 3339).
fn time(value: &Value) -> Option<DateTime<Utc>> {
    let text = match value {
        Value::Number(n) => return DateTime::from_timestamp(n.as_i64()?, 0),
        Value::String(s) => s.trim(),
        _ => return None,
    };
    if let Ok(seconds) = text.parse::<i64>() {
        return DateTime::from_timestamp(seconds, 0);
    }
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// An error code, as a number or (from some BSPs) a string of digits.
fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let value = Value::deserialize(deserializer)?;
    match &value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| D::Error::custom(format!("code {value} is not an integer")))
}

// The wire shapes. Ids stay strings here and are parsed after, so that a skip names the field.

#[derive(Deserialize)]
struct RawStatus {
    id: String,
    status: String,
    #[serde(deserialize_with = "unix_seconds")]
    timestamp: DateTime<Utc>,
    #[serde(default)]
    recipient_id: Option<String>,
    #[serde(default)]
    biz_opaque_callback_data: Option<String>,
    /// Decoded on its own: a pricing quirk must not cost us the status.
    #[serde(default)]
    pricing: Option<Value>,
    #[serde(default)]
    errors: Vec<Value>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(deserialize_with = "integer")]
    code: i64,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    message: Option<String>,
    /// On-Premises puts the details at the top.
    #[serde(default)]
    details: Option<String>,
    #[serde(default)]
    error_data: Option<RawErrorData>,
}

#[derive(Deserialize)]
struct RawErrorData {
    #[serde(default)]
    details: Option<String>,
}

#[derive(Deserialize)]
struct RawContact {
    #[serde(default)]
    wa_id: Option<String>,
    #[serde(default)]
    profile: Option<RawProfile>,
}

#[derive(Deserialize)]
struct RawProfile {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    id: String,
    from: String,
    #[serde(deserialize_with = "unix_seconds")]
    timestamp: DateTime<Utc>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<RawText>,
    #[serde(default)]
    button: Option<RawText>,
    #[serde(default)]
    interactive: Option<RawInteractive>,
}

/// `text{body}` and `button{payload, text}`.
#[derive(Deserialize)]
struct RawText {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct RawInteractive {
    #[serde(default)]
    button_reply: Option<RawReply>,
    #[serde(default)]
    list_reply: Option<RawReply>,
}

#[derive(Deserialize)]
struct RawReply {
    #[serde(default)]
    title: Option<String>,
}

#[derive(Deserialize)]
struct RawUserPreference {
    wa_id: String,
    value: String,
    #[serde(default)]
    category: Option<String>,
    #[serde(deserialize_with = "unix_seconds")]
    timestamp: DateTime<Utc>,
}

#[derive(Deserialize)]
struct RawTemplateStatus {
    event: String,
    message_template_name: String,
    message_template_language: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct RawNumberQuality {
    event: String,
    #[serde(default)]
    display_phone_number: Option<String>,
    #[serde(default)]
    max_daily_conversations_per_business: Option<String>,
    #[serde(default)]
    current_limit: Option<String>,
}

#[derive(Deserialize)]
struct RawAccountUpdate {
    event: String,
    /// Decoded one by one: a restriction that does not read must not cost us the others.
    #[serde(default)]
    restriction_info: Vec<Value>,
    #[serde(default)]
    ban_info: Option<RawBanInfo>,
}

#[derive(Deserialize)]
struct RawRestriction {
    restriction_type: String,
    #[serde(default)]
    expiration: Option<Value>,
}

#[derive(Deserialize)]
struct RawBanInfo {
    #[serde(default)]
    waba_ban_state: Option<String>,
    #[serde(default)]
    waba_ban_date: Option<String>,
}

#[derive(Deserialize)]
struct RawBusinessCapability {
    #[serde(default)]
    max_daily_conversations_per_business: Option<Value>,
    #[serde(default)]
    max_daily_conversation_per_phone: Option<Value>,
    #[serde(default)]
    max_phone_numbers_per_waba: Option<Value>,
    #[serde(default)]
    max_phone_numbers_per_business: Option<Value>,
}

#[derive(Deserialize)]
struct RawTemplateCategory {
    message_template_name: String,
    message_template_language: String,
    new_category: String,
    #[serde(default)]
    previous_category: Option<String>,
    #[serde(default)]
    correct_category: Option<String>,
    #[serde(default)]
    category_update_timestamp: Option<Value>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::webhook::status::{Transition, transition};

    const WABA: &str = "102290129340398";
    const NUMBER: &str = "106540352242922";

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).expect("in range")
    }

    fn waba(id: &str) -> Option<WabaId> {
        Some(WabaId::parse(id).expect("waba id"))
    }

    fn number(id: &str) -> Option<PhoneNumberId> {
        Some(PhoneNumberId::parse(id).expect("phone number id"))
    }

    /// The updates of a body that must parse without skipping anything.
    fn updates(body: &[u8]) -> Vec<Update> {
        let parsed = parse(body).expect("a webhook");
        assert_eq!(parsed.unreadable, Vec::new());
        parsed.updates
    }

    fn only(body: &[u8]) -> Update {
        let mut updates = updates(body);
        assert_eq!(updates.len(), 1, "{updates:#?}");
        updates.remove(0)
    }

    fn status(update: &Update) -> &StatusUpdate {
        match update {
            Update::Status(status) => status,
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn delivered_with_pricing() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/status-delivered-pricing.json"
        ));
        assert_eq!(
            update,
            Update::Status(StatusUpdate {
                wamid: Wamid::parse(
                    "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQUFERjg0NDEzNDdFODU3MUMxMAA="
                )
                .unwrap(),
                status: MessageStatus::Delivered,
                at: at(1750030080),
                recipient_id: Some("16505551234".into()),
                phone_number_id: number(NUMBER),
                waba_id: waba(WABA),
                biz_opaque_callback_data: Some("job-8c1f".into()),
                pricing: Some(Pricing {
                    billable: Some(true),
                    pricing_model: Some("PMP".into()),
                    kind: Some("regular".into()),
                    category: Some("utility".into()),
                }),
                errors: vec![],
            })
        );
    }

    #[test]
    fn failed_131049_takes_details_from_error_data() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/status-failed-131049.json"
        ));
        let status = status(&update);
        assert_eq!(status.status, MessageStatus::Failed);
        assert_eq!(status.pricing, None);
        assert_eq!(
            status.errors,
            [WebhookError {
                code: 131049,
                title: "This message was not delivered to maintain healthy ecosystem engagement."
                    .into(),
                details: "In order to maintain a healthy ecosystem engagement, the message failed \
                          to be delivered."
                    .into(),
            }]
        );
    }

    #[test]
    fn inbound_text_with_profile_name() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/inbound-text.json"
        ));
        assert_eq!(
            update,
            Update::Inbound(InboundMessage {
                wamid: Wamid::parse(
                    "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
                )
                .unwrap(),
                from: WaId::parse("16505551234").unwrap(),
                at: at(1749416383),
                phone_number_id: number(NUMBER),
                waba_id: waba("419561257915477"),
                kind: "text".into(),
                text: Some("Does it come in another color?".into()),
                profile_name: Some("Sheena Nelson".into()),
            })
        );
    }

    #[test]
    fn replies_to_buttons_carry_their_title_as_text() {
        let Update::Inbound(reply) = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/inbound-button-reply.json"
        )) else {
            panic!("not inbound");
        };
        assert_eq!(
            (reply.kind.as_str(), reply.text.as_deref()),
            ("interactive", Some("Cancel"))
        );

        let list = br#"{"statuses":[],"messages":[{"from":"16505551234","id":"wamid.L","timestamp":"1749854575",
            "type":"interactive","interactive":{"type":"list_reply","list_reply":{"id":"priority_express",
            "title":"Priority Mail Express","description":"Next Day to 2 Days"}}}]}"#;
        let Update::Inbound(reply) = only(list) else {
            panic!("not inbound");
        };
        assert_eq!(reply.text.as_deref(), Some("Priority Mail Express"));
        assert_eq!(reply.profile_name, None, "no contacts, no name");
    }

    #[test]
    fn user_preferences_stop_with_a_numeric_timestamp() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/user-preferences-stop.json"
        ));
        assert_eq!(
            update,
            Update::UserPreference {
                waba_id: waba(WABA),
                wa_id: WaId::parse("16505551234").unwrap(),
                stop: true,
                at: at(1739321024),
            }
        );
    }

    #[test]
    fn template_paused_without_a_reason() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/template-status-paused.json"
        ));
        assert_eq!(
            update,
            Update::TemplateStatus {
                waba_id: waba(WABA),
                name: "order_update".into(),
                language: "en_US".into(),
                event: "PAUSED".into(),
                reason: None,
            }
        );
    }

    #[test]
    fn template_rejected_keeps_its_reason() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{
            "field":"message_template_status_update","value":{"event":"REJECTED","message_template_id":1,
            "message_template_name":"promo","message_template_language":"de","reason":"INVALID_FORMAT"}}]}]}"#;
        let Update::TemplateStatus { event, reason, .. } = only(body) else {
            panic!("not a template status");
        };
        assert_eq!(
            (event.as_str(), reason.as_deref()),
            ("REJECTED", Some("INVALID_FORMAT"))
        );
    }

    #[test]
    fn throughput_upgrade() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/phone-quality-throughput-upgrade.json"
        ));
        assert_eq!(
            update,
            Update::NumberQuality {
                waba_id: waba(WABA),
                display_phone_number: Some("15550783881".into()),
                event: "THROUGHPUT_UPGRADE".into(),
                limit: Some("TIER_UNLIMITED".into()),
            }
        );
        let current = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{
            "field":"phone_number_quality_update","value":{"event":"UPGRADE","current_limit":"TIER_10K"}}]}]}"#;
        let Update::NumberQuality { limit, .. } = only(current) else {
            panic!("not a quality update");
        };
        assert_eq!(limit.as_deref(), Some("TIER_10K"));
    }

    #[test]
    fn account_update() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/account-update-violation.json"
        ));
        assert_eq!(
            update,
            Update::Account(AccountUpdate {
                waba_id: waba(WABA),
                event: "ACCOUNT_VIOLATION".into(),
                restrictions: vec![],
                ban_state: None,
                ban_date: None,
            })
        );
    }

    /// The only change of a body built around `value` for `field`, parsed.
    fn change(field: &str, value: Value) -> Parsed {
        let body = serde_json::json!({"object": "whatsapp_business_account",
            "entry": [{"id": WABA, "changes": [{"field": field, "value": value}]}]});
        parse(&serde_json::to_vec(&body).unwrap()).expect("a webhook")
    }

    #[test]
    fn business_capability_update_states_the_portfolios_messaging_limit() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/business-capability-update.json"
        ));
        assert_eq!(
            update,
            Update::BusinessCapability {
                waba_id: waba(WABA),
                limit: Some(MessagingLimit::Users(2000)),
                max_phone_numbers_per_waba: Some(2.into()),
                max_phone_numbers_per_business: Some(2.into()),
            }
        );
        let per_business = "max_daily_conversations_per_business";
        let per_phone = "max_daily_conversation_per_phone";
        let cases = [
            (
                serde_json::json!({per_business: -1}),
                Some(MessagingLimit::Unlimited),
            ),
            (
                serde_json::json!({per_business: 100_000}),
                Some(MessagingLimit::Users(100_000)),
            ),
            // Some senders forward Meta's tier names, or the number as a string.
            (
                serde_json::json!({per_business: "TIER_2K"}),
                Some(MessagingLimit::Users(2000)),
            ),
            (
                serde_json::json!({per_business: "TIER_UNLIMITED"}),
                Some(MessagingLimit::Unlimited),
            ),
            (
                serde_json::json!({per_business: "TIER_NOT_SET"}),
                Some(MessagingLimit::NotSet),
            ),
            (
                serde_json::json!({per_business: "10000"}),
                Some(MessagingLimit::Users(10_000)),
            ),
            // The deprecated per-phone field counts only without the business's.
            (
                serde_json::json!({per_phone: 250}),
                Some(MessagingLimit::Users(250)),
            ),
            (
                serde_json::json!({per_phone: 2000, per_business: 10_000}),
                Some(MessagingLimit::Users(10_000)),
            ),
            (
                serde_json::json!({per_business: null, per_phone: -1}),
                Some(MessagingLimit::Unlimited),
            ),
            (serde_json::json!({"max_phone_numbers_per_waba": 20}), None),
        ];
        for (value, expected) in cases {
            let parsed = change("business_capability_update", value.clone());
            assert_eq!(parsed.unreadable, [], "{value}");
            let [Update::BusinessCapability { limit, .. }] = parsed.updates.as_slice() else {
                panic!("{value}: {:?}", parsed.updates);
            };
            assert_eq!(*limit, expected, "{value}");
        }
        for (value, shown) in [
            (serde_json::json!(0), "0"),
            (serde_json::json!(-2), "-2"),
            (serde_json::json!("TIER_3K"), "\"TIER_3K\""),
            (serde_json::json!("lots"), "\"lots\""),
            (serde_json::json!(true), "true"),
        ] {
            let parsed = change(
                "business_capability_update",
                serde_json::json!({per_business: value}),
            );
            assert_eq!(parsed.updates, [], "{value}: never a guessed limit");
            let reasons: Vec<String> = parsed.unreadable.iter().map(ToString::to_string).collect();
            assert_eq!(
                reasons,
                [format!(
                    "entry[0].changes[0].value: max_daily_conversations_per_business {shown} \
                          is not a messaging limit (250, 2000, 10000, 100000, -1 for unlimited, or a \
                          TIER_* name)"
                )]
            );
        }
    }

    #[test]
    fn template_category_update_after_and_before_the_change() {
        let done = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/template-category-update.json"
        ));
        assert_eq!(
            done,
            Update::TemplateCategory(CategoryChange {
                waba_id: waba(WABA),
                name: "order_update".into(),
                language: "en_US".into(),
                category: Category::Marketing,
                previous: Some("UTILITY".into()),
                upcoming: None,
                due: None,
            })
        );
        // Before an automated change, new_category is still the current one.
        let impending = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/template-category-update-impending.json"
        ));
        assert_eq!(
            impending,
            Update::TemplateCategory(CategoryChange {
                waba_id: waba(WABA),
                name: "order_update".into(),
                language: "en_US".into(),
                category: Category::Utility,
                previous: None,
                upcoming: Some("MARKETING".into()),
                due: Some(at(1_751_852_348)),
            })
        );
        let base = serde_json::json!({"message_template_id": 1, "message_template_name": "order_update",
                                      "message_template_language": "en_US"});
        let with = |key: &str, v: &str| {
            let mut value = base.clone();
            value[key] = serde_json::json!(v);
            value
        };
        for (value, reason) in [
            (
                with("new_category", "SERVICE"),
                "new_category \"SERVICE\" is not a template category (MARKETING, UTILITY, AUTHENTICATION)",
            ),
            (
                with("new_category", "PROMO"),
                "new_category \"PROMO\" is not a template category (MARKETING, UTILITY, AUTHENTICATION)",
            ),
            (
                with("previous_category", "UTILITY"),
                "missing field `new_category`",
            ),
        ] {
            let parsed = change("template_category_update", value);
            assert_eq!(parsed.updates, []);
            assert_eq!(parsed.unreadable.len(), 1);
            assert!(
                parsed.unreadable[0].reason.starts_with(reason),
                "{}",
                parsed.unreadable[0]
            );
        }
    }

    #[test]
    fn account_restrictions_and_bans_are_read_with_their_ends() {
        let Update::Account(restricted) = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/account-update-restriction.json"
        )) else {
            panic!("not an account update");
        };
        assert_eq!(restricted.event, "ACCOUNT_RESTRICTION");
        assert_eq!(
            restricted.restrictions,
            [
                Restriction {
                    kind: "RESTRICTED_ADD_PHONE_NUMBER_ACTION".into(),
                    until: Some(at(1_739_491_200))
                },
                Restriction {
                    kind: "RESTRICTED_BIZ_INITIATED_MESSAGING".into(),
                    until: Some(at(1_739_491_200))
                },
            ]
        );
        let Update::Account(disabled) = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/account-update-disabled.json"
        )) else {
            panic!("not an account update");
        };
        assert_eq!(
            (disabled.ban_state.as_deref(), disabled.ban_date.as_deref()),
            (Some("DISABLE"), Some("2025-02-12"))
        );
        // BSPs forward the end as a date and time; one that does not read is parked, and the
        // restriction holds until lifted rather than not at all.
        let parsed = change(
            "account_update",
            serde_json::json!({"event": "ACCOUNT_RESTRICTION", "restriction_info": [
            {"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": "2026-04-19T13:59:20+0000"},
            {"restriction_type": "RESTRICTED_CUSTOMER_INITIATED_MESSAGING", "expiration": "2026-04-19T13:59:20Z"},
            {"restriction_type": "RESTRICTED_CUSTOMER_INITIATED_MESSAGING", "expiration": "1776607160"},
            {"restriction_type": "RESTRICTED_BIZ_INITIATED_MESSAGING", "expiration": "next week"},
            {"expiration": 1}]}),
        );
        let [Update::Account(update)] = parsed.updates.as_slice() else {
            panic!("{:?}", parsed.updates);
        };
        let ends: Vec<Option<DateTime<Utc>>> =
            update.restrictions.iter().map(|r| r.until).collect();
        let april = Some(at(1_776_607_160));
        assert_eq!(ends, [april, april, april, None]);
        let reasons: Vec<String> = parsed.unreadable.iter().map(ToString::to_string).collect();
        assert_eq!(reasons.len(), 2, "{reasons:#?}");
        assert_eq!(
            reasons[0],
            "entry[0].changes[0].value.restriction_info[3].expiration (ignored): expiration \
             \"next week\" is neither unix seconds nor a date and time"
        );
        assert!(reasons[1].starts_with(
            "entry[0].changes[0].value.restriction_info[4]: missing field `restriction_type`"
        ));
    }

    #[test]
    fn messages_values_pair_each_number_with_its_display_number_once() {
        let parsed = parse(include_bytes!(
            "../../tests/fixtures/cloud/webhook/batched-two-entries.json"
        ))
        .unwrap();
        assert!(!parsed.numbers.is_empty(), "{parsed:#?}");
        let formatted = serde_json::json!({"object": "whatsapp_business_account", "entry": [{"id": WABA, "changes": [
            {"field": "messages", "value": {"metadata": {"display_phone_number": "+1 555-078-3882", "phone_number_id": "106540352242923"},
             "statuses": [{"id": "wamid.A", "status": "sent", "timestamp": "1"}, {"id": "wamid.B", "status": "sent", "timestamp": "1"}]}},
            {"field": "messages", "value": {"metadata": {"display_phone_number": "15550783882", "phone_number_id": "106540352242923"},
             "statuses": [{"id": "wamid.C", "status": "sent", "timestamp": "1"}]}},
            {"field": "messages", "value": {"metadata": {"display_phone_number": "", "phone_number_id": NUMBER},
             "statuses": [{"id": "wamid.D", "status": "sent", "timestamp": "1"}]}}]}]});
        let parsed = parse(&serde_json::to_vec(&formatted).unwrap()).unwrap();
        assert_eq!(
            parsed.numbers,
            [DisplayNumber {
                waba_id: waba(WABA),
                phone_number_id: number("106540352242923").unwrap(),
                display: "15550783882".into(),
            }],
            "digits only, once, and none without a display number"
        );
    }

    #[test]
    fn value_errors_are_not_tied_to_a_message() {
        let update = only(include_bytes!(
            "../../tests/fixtures/cloud/webhook/value-errors.json"
        ));
        assert_eq!(
            update,
            Update::Error {
                waba_id: waba(WABA),
                phone_number_id: number(NUMBER),
                error: WebhookError {
                    code: 131000,
                    title: "Something went wrong".into(),
                    details: "Message failed to send due to an unknown error.".into(),
                },
            }
        );
    }

    #[test]
    fn a_batch_of_two_entries_keeps_every_status_in_order_with_its_own_source() {
        let statuses = |prefix: &str| {
            format!(
                r#"[{{"id":"wamid.{prefix}1","status":"sent","timestamp":"100","recipient_id":"16505551234"}},
                    {{"id":"wamid.{prefix}2","status":"delivered","timestamp":101,"recipient_id":"16505551234"}},
                    {{"id":"wamid.{prefix}3","status":"read","timestamp":"102","recipient_id":"16505551234"}}]"#
            )
        };
        let body = format!(
            r#"{{"object":"whatsapp_business_account","entry":[
                {{"id":"111","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp",
                  "metadata":{{"display_phone_number":"15550000001","phone_number_id":"201"}},"statuses":{}}}}}]}},
                {{"id":"222","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp",
                  "metadata":{{"display_phone_number":"15550000002","phone_number_id":"202"}},"statuses":{}}}}}]}}]}}"#,
            statuses("A"),
            statuses("B")
        );
        let updates = updates(body.as_bytes());
        let seen: Vec<_> = updates
            .iter()
            .map(status)
            .map(|s| {
                (
                    s.wamid.as_str(),
                    s.status.as_str(),
                    s.at.timestamp(),
                    s.waba_id.as_ref().map(WabaId::as_str),
                    s.phone_number_id.as_ref().map(PhoneNumberId::as_str),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("wamid.A1", "sent", 100, Some("111"), Some("201")),
                ("wamid.A2", "delivered", 101, Some("111"), Some("201")),
                ("wamid.A3", "read", 102, Some("111"), Some("201")),
                ("wamid.B1", "sent", 100, Some("222"), Some("202")),
                ("wamid.B2", "delivered", 101, Some("222"), Some("202")),
                ("wamid.B3", "read", 102, Some("222"), Some("202")),
            ]
        );
    }

    #[test]
    fn batched_fixture_mixes_statuses_and_a_quick_reply() {
        let updates = updates(include_bytes!(
            "../../tests/fixtures/cloud/webhook/batched-two-entries.json"
        ));
        let kinds: Vec<_> = updates
            .iter()
            .map(|u| match u {
                Update::Status(s) => s.status.to_string(),
                Update::Inbound(m) => format!("{}:{}", m.kind, m.text.as_deref().unwrap_or("")),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["sent", "read", "button:Unsubscribe"]);
    }

    const VONAGE_1020: &[u8] = br#"{
        "statuses":[{"id":"gBEGkYiEB1VXAglK1ZEqA1YKPrU","recipient_id":"16315555555","status":"failed",
          "timestamp":"1586351700","errors":[{"code":1020,"title":"Invalid params",
          "details":"The value of one or more parameters is invalid: the fallback policy is no longer supported"}]}]}"#;

    const VONAGE_1022: &[u8] = br#"{
        "statuses":[{"id":"gBEGkYiEB1VXAglK1ZEqA1YKPrV","recipient_id":"16315555555","status":"failed",
          "timestamp":1586351701,"errors":[{"code":1022,"title":"Invalid template"}]}],
        "contacts":[], "meta":{"api_status":"stable"}}"#;

    #[test]
    fn flat_on_premises_failures_1020_and_1022() {
        for (body, code, wamid, details) in [
            (
                VONAGE_1020,
                1020,
                "gBEGkYiEB1VXAglK1ZEqA1YKPrU",
                "The value of one or more parameters is invalid: the fallback policy is no longer \
                 supported",
            ),
            (VONAGE_1022, 1022, "gBEGkYiEB1VXAglK1ZEqA1YKPrV", ""),
        ] {
            let update = only(body);
            let status = status(&update);
            assert_eq!(status.wamid.as_str(), wamid);
            assert_eq!(status.status, MessageStatus::Failed);
            assert_eq!(
                (status.waba_id.as_ref(), status.phone_number_id.as_ref()),
                (None, None)
            );
            assert_eq!(status.errors.len(), 1);
            assert_eq!(status.errors[0].code, code);
            assert_eq!(status.errors[0].details, details);
        }
    }

    #[test]
    fn flat_on_premises_statuses_messages_and_errors() {
        let body = br#"{
            "contacts":[{"profile":{"name":"Kerry Fisher"},"wa_id":"16315551234"}],
            "messages":[{"from":"16315551234","id":"ABGGFlA5FpafAgo6EhmKwSIu","timestamp":"1518694235",
              "type":"text","text":{"body":"Hello this is an answer"}}],
            "statuses":[
              {"id":"gBGGFlB5YjhvAgnhuF1qIUvCo7A","recipient_id":"16315555555","status":"deleted","timestamp":"1518694700"},
              {"id":"gBGGFlB5YjhvAgnhuF1qIUvCo7B","recipient_id":"16315555555","status":"warning","timestamp":"1518694701"}],
            "errors":[{"code":1022,"title":"Webhooks URL is not configured","details":"Set a webhook URL"}]}"#;
        let updates = updates(body);
        assert_eq!(updates.len(), 4, "{updates:#?}");
        assert_eq!(status(&updates[0]).status, MessageStatus::Deleted);
        assert_eq!(status(&updates[1]).status, MessageStatus::Warning);
        let Update::Inbound(message) = &updates[2] else {
            panic!("not inbound: {:?}", updates[2]);
        };
        assert_eq!(message.profile_name.as_deref(), Some("Kerry Fisher"));
        assert_eq!(message.text.as_deref(), Some("Hello this is an answer"));
        assert_eq!(
            updates[3],
            Update::Error {
                waba_id: None,
                phone_number_id: None,
                error: WebhookError {
                    code: 1022,
                    title: "Webhooks URL is not configured".into(),
                    details: "Set a webhook URL".into(),
                },
            }
        );
    }

    #[test]
    fn read_before_delivered_parses_both_and_the_machine_keeps_read() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{
            "field":"messages","value":{"metadata":{"phone_number_id":"106540352242922"},"statuses":[
              {"id":"wamid.R","status":"read","timestamp":"1750030300","recipient_id":"16505551234"},
              {"id":"wamid.R","status":"delivered","timestamp":"1750030080","recipient_id":"16505551234"}]}}]}]}"#;
        let updates = updates(body);
        let mut recorded: Option<MessageStatus> = Some(MessageStatus::Sent);
        let mut decisions = Vec::new();
        for update in &updates {
            let next = &status(update).status;
            let decision = transition(recorded.as_ref(), next);
            if decision == Transition::Apply {
                recorded = Some(next.clone());
            }
            decisions.push(decision);
        }
        assert_eq!(decisions, [Transition::Apply, Transition::Stale]);
        assert_eq!(recorded, Some(MessageStatus::Read));
        assert!(
            status(&updates[1]).at < status(&updates[0]).at,
            "timestamps tell the true order"
        );
    }

    #[test]
    fn unknown_fields_values_and_statuses_are_tolerated() {
        let body = br#"{"object":"whatsapp_business_account","future":true,"entry":[{"id":"102290129340398","time":1,
            "changes":[
              {"field":"smb_message_echoes","value":{"message_echoes":[{"id":"wamid.E"}]}},
              {"field":"messages","value":{"groups":[]}},
              {"field":"messages","value":{"metadata":{"phone_number_id":"106540352242922","new":1},
                "statuses":[{"id":"wamid.U","status":"pending_review","timestamp":"1750030080",
                  "recipient_id":"16505551234","recipient_identity_key_hash":"x","shiny":{"a":[1]}}]}}]}]}"#;
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.updates, [], "nothing here is understood");
        assert_eq!(
            parsed.ignored,
            [
                "entry[0].changes[0]: field smb_message_echoes ignored: messages the business sent \
              from the WhatsApp Business app, not sends of this worker"
            ]
        );
        let unreadable: Vec<String> = parsed.unreadable.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            unreadable,
            [
                "entry[0].changes[1].value: a messages value without its list",
                "entry[0].changes[2].value.statuses[0]: status \"pending_review\" is not one of \
                 Meta's (sent, delivered, read, played, failed, deleted, warning)",
            ]
        );
        assert_eq!(
            parsed.unreadable[1].part["id"], "wamid.U",
            "the status is kept whole for the parked queue"
        );
    }

    #[test]
    fn unknown_keys_inside_an_understood_status_are_tolerated() {
        let body = br#"{"object":"whatsapp_business_account","future":true,"entry":[{"id":"102290129340398",
            "changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"106540352242922","new":1},
                "statuses":[{"id":"wamid.U","status":"delivered","timestamp":"1750030080",
                  "recipient_id":"16505551234","recipient_identity_key_hash":"x","shiny":{"a":[1]}}]}}]}]}"#;
        assert_eq!(status(&only(body)).status, MessageStatus::Delivered);
    }

    #[test]
    fn lists_that_are_not_lists_null_values_and_group_fields_are_unreadable() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[
            {"field":"messages","value":{"metadata":{"phone_number_id":"106540352242922"},"statuses":"x"}},
            {"field":"messages","value":null},
            {"field":"group_participants_update","value":{"groups":[{"group_id":"G","type":"group_create"}]}},
            {"value":{}},
            {"field":"messages","value":{"metadata":{"phone_number_id":"106540352242922"},"statuses":[
              {"id":"wamid.K","status":"teleported","timestamp":"1750030080"},
              {"id":"wamid.OK","status":"read","timestamp":"1750030080"}]}}]}]}"#;
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.updates.len(), 1, "the readable status is kept");
        assert_eq!(status(&parsed.updates[0]).wamid.as_str(), "wamid.OK");
        let unreadable: Vec<(String, Value)> = parsed
            .unreadable
            .iter()
            .map(|u| (u.to_string(), u.part.clone()))
            .collect();
        let expected = [
            (
                "entry[0].changes[0].value.statuses: is a string, not an array",
                serde_json::json!("x"),
            ),
            (
                "entry[0].changes[1]: value is null, not an object",
                serde_json::json!({"field": "messages", "value": null}),
            ),
            (
                "entry[0].changes[2].value: unmodelled field group_participants_update",
                serde_json::json!({"field": "group_participants_update",
                    "value": {"groups": [{"group_id": "G", "type": "group_create"}]}}),
            ),
            (
                "entry[0].changes[3]: no field",
                serde_json::json!({"value": {}}),
            ),
        ];
        assert_eq!(unreadable[..4], expected.map(|(a, v)| (a.to_owned(), v)));
        assert!(
            unreadable[4].0.starts_with(
                "entry[0].changes[4].value.statuses[0]: status \"teleported\" is not one of Meta's"
            ),
            "{unreadable:#?}"
        );
        assert_eq!(unreadable.len(), 5);
    }

    #[test]
    fn bodies_that_are_not_webhooks_are_errors_that_say_why() {
        let cases: [(&[u8], &str); 6] = [
            (b"<html>", "not JSON: "),
            (b"[]", "not a JSON object but an array"),
            (b"42", "not a JSON object but a number"),
            (
                b"{}",
                "neither a Cloud API envelope (object/entry) nor a flat On-Premises payload \
                 (statuses/messages/errors)",
            ),
            (
                br#"{"object":"page","entry":[]}"#,
                r#"object is "page", not"#,
            ),
            (
                br#"{"object":"whatsapp_business_account","entry":{}}"#,
                "entry is an object, not an array",
            ),
        ];
        for (body, message) in cases {
            let error = parse(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                error.to_string().starts_with(message),
                "{:?}: {error}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn an_empty_envelope_is_a_webhook_with_nothing_in_it() {
        let parsed = parse(br#"{"object":"whatsapp_business_account","entry":[]}"#).unwrap();
        assert_eq!(parsed, Parsed::default());
    }

    #[test]
    fn unusable_items_are_skipped_with_their_reason_and_the_rest_is_kept() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[
            {"field":"messages","value":{"metadata":{"phone_number_id":"106540352242922"},"statuses":[
              {"id":"","status":"delivered","timestamp":"1750030080","recipient_id":"16505551234"},
              {"id":"wamid.T","status":"delivered","timestamp":"yesterday"},
              {"id":"wamid.OK","status":"failed","timestamp":"1750030080",
                "pricing":{"billable":"yes"},"errors":[{"title":"no code"},{"code":"131050","title":"t"}]}]}},
            {"field":"messages","value":{"contacts":[],"messages":[
              {"from":"+0123","id":"wamid.IN","timestamp":"1","type":"text","text":{"body":"hi"}}]}},
            {"field":"user_preferences","value":{"user_preferences":[
              {"wa_id":"16505551234","value":"maybe","category":"marketing_messages","timestamp":1}]}},
            {"field":"message_template_status_update","value":{"event":"PAUSED","message_template_name":"x"}}]}]}"#;
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.updates.len(), 1);
        let kept = status(&parsed.updates[0]);
        assert_eq!(kept.wamid.as_str(), "wamid.OK");
        assert_eq!(kept.pricing, None);
        assert_eq!(kept.errors.len(), 1);
        assert_eq!(
            kept.errors[0].code, 131050,
            "a code as a string of digits is read"
        );

        let expected = [
            "entry[0].changes[0].value.statuses[0]: wamid must not be empty",
            "entry[0].changes[0].value.statuses[1]: timestamp \"yesterday\" is not unix seconds",
            "entry[0].changes[0].value.statuses[2].pricing (ignored): invalid type",
            "entry[0].changes[0].value.statuses[2].errors[0]: missing field `code`",
            "entry[0].changes[1].value.messages[0]: from: ",
            "entry[0].changes[2].value.user_preferences[0]: value \"maybe\" is neither stop nor resume",
            "entry[0].changes[3].value: missing field `message_template_language`",
        ];
        let skipped: Vec<String> = parsed.unreadable.iter().map(|u| u.to_string()).collect();
        assert_eq!(skipped.len(), expected.len(), "{skipped:#?}");
        for (skipped, expected) in skipped.iter().zip(expected) {
            assert!(
                skipped.starts_with(expected),
                "{skipped:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn a_bad_waba_or_phone_number_id_is_noted_and_the_status_kept_without_it() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"WABA","changes":[{"field":"messages",
            "value":{"metadata":{"phone_number_id":"+1 555"},"statuses":[
              {"id":"wamid.S","status":"sent","timestamp":"1"}]}}]}]}"#;
        let parsed = parse(body).unwrap();
        let status = status(&parsed.updates[0]);
        assert_eq!(
            (status.waba_id.as_ref(), status.phone_number_id.as_ref()),
            (None, None)
        );
        let skipped: Vec<String> = parsed.unreadable.iter().map(|u| u.to_string()).collect();
        assert_eq!(skipped.len(), 2, "{skipped:#?}");
        assert!(skipped[0].starts_with("entry[0].id: waba_id"));
        assert!(skipped[1].starts_with("entry[0].changes[0].value.metadata.phone_number_id"));
    }

    /// The shapes `simulator::statuses` produces: merged statuses, v23 `conversation`, a numeric
    /// template id, a numeric `user_preferences` timestamp, a quality update without metadata.
    #[test]
    fn everything_the_simulator_posts_parses() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[
            {"field":"messages","value":{"messaging_product":"whatsapp",
              "metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},
              "statuses":[
                {"id":"wamid.S1","status":"sent","timestamp":"1750030021","recipient_id":"16505551234",
                 "biz_opaque_callback_data":"job-1",
                 "pricing":{"billable":true,"pricing_model":"PMP","type":"regular","category":"marketing"},
                 "conversation":{"id":"c4e8f0b1d2a3948576afbe0d1c2b3a49","origin":{"type":"marketing"},
                   "expiration_timestamp":"1750116421"}},
                {"id":"wamid.S2","status":"failed","timestamp":"1750030022","recipient_id":"16505551234",
                 "errors":[{"code":131047,"title":"Re-engagement message","message":"Re-engagement message",
                   "error_data":{"details":"more than 24 hours"},
                   "href":"/documentation/business-messaging/whatsapp/support/error-codes"}]}]}},
            {"field":"user_preferences","value":{"messaging_product":"whatsapp",
              "metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},
              "user_preferences":[{"wa_id":"16505551234","detail":"User requested to resume marketing messages",
                "category":"marketing_messages","value":"resume","timestamp":1750030030}]}},
            {"field":"message_template_status_update","value":{"event":"DISABLED","message_template_id":42,
              "message_template_name":"promo","message_template_language":"en","message_template_category":"MARKETING",
              "reason":"NONE","disable_info":{"disable_date":1750030040}}},
            {"field":"phone_number_quality_update","value":{"display_phone_number":"15550783881",
              "event":"THROUGHPUT_UPGRADE","max_daily_conversations_per_business":"TIER_UNLIMITED"}}]}]}"#;
        let updates = updates(body);
        assert_eq!(updates.len(), 5, "{updates:#?}");
        assert_eq!(
            status(&updates[0]).biz_opaque_callback_data.as_deref(),
            Some("job-1")
        );
        assert_eq!(status(&updates[1]).errors[0].details, "more than 24 hours");
        assert!(matches!(
            updates[2],
            Update::UserPreference { stop: false, .. }
        ));
        assert!(matches!(&updates[3], Update::TemplateStatus { event, .. } if event == "DISABLED"));
        assert!(
            matches!(&updates[4], Update::NumberQuality { event, .. } if event == "THROUGHPUT_UPGRADE")
        );
    }

    fn fixtures(dir: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("dir entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .map(|path| {
                let body = std::fs::read(&path).expect("fixture");
                (path.display().to_string(), body)
            })
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no fixtures in {}", dir.display());
        files
    }

    #[test]
    fn every_valid_fixture_parses_completely() {
        for (path, body) in fixtures("tests/fixtures/cloud/webhook") {
            let parsed = parse(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(parsed.unreadable, Vec::new(), "{path}");
            assert_eq!(parsed.ignored, Vec::<String>::new(), "{path}");
            assert!(!parsed.updates.is_empty(), "{path}: no updates");
        }
    }

    /// The schema rejects these; the parser, which must not lose Meta's next surprise, reads
    /// every one of them except the envelope of another product.
    #[test]
    fn schema_invalid_but_plausible_webhooks_are_tolerated() {
        for (path, body) in fixtures("tests/fixtures/cloud/invalid/webhook") {
            let fixture: Value = serde_json::from_slice(&body).expect("fixture JSON");
            let instance = serde_json::to_vec(&fixture["instance"]).expect("instance");
            let result = parse(&instance);
            if path.ends_with("object-not-waba.json") {
                assert!(matches!(result, Err(ParseError::NotWhatsApp(_))), "{path}");
            } else {
                assert!(result.is_ok(), "{path}: {result:?}");
            }
        }
    }

    #[test]
    fn stop_keywords_match_the_whole_message_ignoring_case_and_spaces() {
        let keywords: Vec<String> = ["stop", "stopp", "abmelden", "UNSUBSCRIBE", "arrêt"]
            .map(String::from)
            .to_vec();
        for (text, stop) in [
            ("stop", true),
            ("STOP", true),
            (" Stopp ", true),
            ("ABMELDEN", true),
            ("unsubscribe\n", true),
            ("ARRÊT", true),
            ("please stop", false),
            ("stop!", false),
            ("stopping", false),
            ("", false),
            ("   ", false),
        ] {
            assert_eq!(is_stop_keyword(text, &keywords), stop, "{text:?}");
        }
        assert!(
            !is_stop_keyword("", &[String::new()]),
            "an empty keyword matches nothing"
        );
    }
}
