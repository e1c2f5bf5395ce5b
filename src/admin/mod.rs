//! The operator's levers on the send policy: pause, resume or cancel a campaign, record consent,
//! open a care window; list, show and replay dead letters ([`dead`]). [`Admin`] holds the
//! operations and their checks; [`http`] serves them as a JSON API behind a bearer token, and
//! `wa-sender campaign|consent|window|dead|job` calls them directly, so both paths refuse the
//! same input. [`import`] loads opt-ins from a CSV file.

pub mod dead;
pub mod http;
pub mod import;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use tracing::info;

use crate::broker::BrokerError;
use crate::broker::rabbit::RabbitBroker;
use crate::config::ConfigError;
use crate::ids::{CampaignId, IdError, PhoneNumberId, WaId, WabaId};
use crate::policy::admission::{CARE_WINDOW, CampaignState, Mark};
use crate::store::{Halt, HaltScope, Store, StoreError};

/// How far ahead of our clock a given time may lie: the caller's clock may run a little fast.
const CLOCK_SKEW: TimeDelta = TimeDelta::minutes(5);
/// The longest consent source kept: it is an audit label, not a document.
const MAX_SOURCE_LEN: usize = 200;
/// The source of consent recorded through the HTTP API or the CLI without one.
pub const ADMIN_SOURCE: &str = "admin";

/// Why an admin operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A field of the request is missing or invalid; nothing was changed.
    #[error("{problem}")]
    Invalid {
        /// The field as the HTTP API spells it (`wa_id`, `waba_id`, `phone_number_id`, …).
        field: &'static str,
        /// What is wrong, naming the field.
        problem: String,
    },
    /// The store failed. A campaign change may have reached some portfolios and not others;
    /// repeating it is safe.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed, or this admin has none, while reading or replaying dead letters.
    /// Letters not yet replayed are back in the dead queue; repeating it is safe.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

fn invalid(field: &'static str, problem: impl Into<String>) -> AdminError {
    AdminError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// A campaign's state in every configured portfolio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CampaignStatus {
    /// The campaign.
    pub campaign_id: CampaignId,
    /// The state shared by every portfolio (`active`, `paused`, `cancelled`), or `mixed` when
    /// they differ (a change that failed half-way: repeat it).
    pub state: &'static str,
    /// The state per WABA (`active` when never set).
    pub wabas: BTreeMap<WabaId, CampaignState>,
}

/// What is recorded about one user's consent towards one portfolio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsentStatus {
    /// The portfolio.
    pub waba_id: WabaId,
    /// The user.
    pub wa_id: WaId,
    /// The opt-in, if recorded.
    pub opt_in: Option<Mark>,
    /// The marketing opt-out, if recorded (an opt-in does not withdraw it; a resume does).
    pub opt_out: Option<Mark>,
}

/// A care window opened by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowStatus {
    /// The business number the user "wrote" to.
    pub phone_number_id: PhoneNumberId,
    /// Its portfolio.
    pub waba_id: WabaId,
    /// The user.
    pub wa_id: WaId,
    /// The inbound message time recorded.
    pub opened_at: DateTime<Utc>,
    /// When the window closes, unless the user writes again.
    pub closes_at: DateTime<Utc>,
}

/// A consent fact to record, as the caller gave it; [`Admin`] validates every field.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsentChange<'a> {
    /// The portfolio; may be left out when exactly one is configured.
    pub waba_id: Option<&'a str>,
    /// The user, E.164 with or without `+`.
    pub wa_id: &'a str,
    /// Where the consent came from (default [`ADMIN_SOURCE`]).
    pub source: Option<&'a str>,
    /// When it was given, RFC 3339 (default now).
    pub at: Option<&'a str>,
}

/// The admin operations over the store, for the configured numbers and their portfolios.
#[derive(Clone)]
pub struct Admin {
    store: Arc<dyn Store>,
    numbers: Arc<BTreeMap<PhoneNumberId, WabaId>>,
    /// The queues, for the dead-letter operations ([`dead`]); the others need only the store.
    broker: Option<Arc<RabbitBroker>>,
    /// The rate card's currency, which the HTTP API's reports show their costs in.
    currency: Option<Arc<str>>,
}

impl Admin {
    /// Operations over `store` for `numbers` (phone_number_id → WABA); at least one is needed,
    /// or a campaign change would apply to no portfolio and silently do nothing.
    pub fn new(
        store: Arc<dyn Store>,
        numbers: BTreeMap<PhoneNumberId, WabaId>,
    ) -> Result<Self, ConfigError> {
        if numbers.is_empty() {
            return Err(ConfigError(
                "numbers: no business number is configured; add [numbers.<phone_number_id>] with waba_id".into(),
            ));
        }
        Ok(Self {
            store,
            numbers: Arc::new(numbers),
            broker: None,
            currency: None,
        })
    }

    /// The same operations, and the dead-letter ones over `broker`'s dead queue.
    pub fn with_broker(self, broker: Arc<RabbitBroker>) -> Self {
        Self {
            broker: Some(broker),
            ..self
        }
    }

    /// The same operations, with the rate card's `currency` (`pricing.currency`) for the
    /// reports the HTTP API serves.
    pub fn with_currency(self, currency: &str) -> Self {
        Self {
            currency: Some(currency.into()),
            ..self
        }
    }

    /// The store the operations act on.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The configured portfolios.
    pub fn wabas(&self) -> BTreeSet<WabaId> {
        self.numbers.values().cloned().collect()
    }

    /// The portfolio a consent change is for: the one given, which must be configured, or the
    /// only one configured.
    pub fn waba(&self, given: Option<&str>) -> Result<WabaId, AdminError> {
        let wabas = self.wabas();
        match given.map(str::trim).filter(|s| !s.is_empty()) {
            Some(text) => {
                let waba = WabaId::parse(text).map_err(|e| invalid("waba_id", e.to_string()))?;
                if !wabas.contains(&waba) {
                    return Err(invalid(
                        "waba_id",
                        format!(
                            "waba_id {waba} is not configured (configured: {})",
                            list(&wabas)
                        ),
                    ));
                }
                Ok(waba)
            }
            None if wabas.len() == 1 => Ok(wabas.into_iter().next().expect("one WABA")),
            None => Err(invalid(
                "waba_id",
                format!(
                    "waba_id is required: more than one WABA is configured ({})",
                    list(&wabas)
                ),
            )),
        }
    }

    /// Sets a campaign's state in every configured portfolio (campaign keys live per
    /// portfolio, and one campaign may send from numbers of several).
    pub async fn set_campaign(
        &self,
        campaign: &str,
        state: CampaignState,
    ) -> Result<CampaignStatus, AdminError> {
        let id = parse_campaign(campaign)?;
        let wabas = self.wabas();
        for waba in &wabas {
            self.store.set_campaign(waba, &id, state).await?;
        }
        info!(campaign = %id, state = state.as_str(), wabas = wabas.len(), "campaign state set");
        Ok(status(id, wabas.into_iter().map(|w| (w, state)).collect()))
    }

    /// A campaign's state in every configured portfolio.
    pub async fn campaign(&self, campaign: &str) -> Result<CampaignStatus, AdminError> {
        let id = parse_campaign(campaign)?;
        let mut states = BTreeMap::new();
        for waba in self.wabas() {
            let state = self.store.campaign(&waba, &id).await?;
            states.insert(waba, state.unwrap_or(CampaignState::Active));
        }
        Ok(status(id, states))
    }

    /// The halts in force, shared by every replica.
    pub async fn halts(&self) -> Result<Vec<Halt>, AdminError> {
        Ok(self.store.halts(Utc::now()).await?)
    }

    /// Lifts a halt before its end (`number:<id>`, `waba:<id>`, `token` or `app`); the replicas
    /// send again within a heartbeat. The halts left in force.
    pub async fn lift_halt(&self, scope: &str) -> Result<Vec<Halt>, AdminError> {
        let parsed = HaltScope::parse(scope).ok_or_else(|| AdminError::Invalid {
            field: "scope",
            problem: format!(
                "scope {scope:?} is not number:<phone_number_id>, waba:<waba_id>, token or app"
            ),
        })?;
        let lifted = self.store.lift_halt(&parsed).await?;
        info!(scope = %parsed, lifted, "halt lifted by an operator");
        self.halts().await
    }

    /// Records an opt-in. It does not withdraw a marketing opt-out: only [`Admin::resume`] does.
    pub async fn opt_in(&self, change: ConsentChange<'_>) -> Result<ConsentStatus, AdminError> {
        let (waba, to, mark) = self.mark(change)?;
        self.store
            .record_opt_ins(&waba, &[(to.clone(), mark.clone())])
            .await?;
        info!(waba = %waba, to = %to.masked(), source = %mark.source, "opt-in recorded");
        self.consent_of(waba, to).await
    }

    /// Records a marketing opt-out: marketing templates to the user are dead-lettered.
    pub async fn opt_out(&self, change: ConsentChange<'_>) -> Result<ConsentStatus, AdminError> {
        let (waba, to, mark) = self.mark(change)?;
        self.store
            .record_opt_out(&waba, &to, Some(mark.clone()))
            .await?;
        info!(waba = %waba, to = %to.masked(), source = %mark.source, "opt-out recorded");
        self.consent_of(waba, to).await
    }

    /// Withdraws a marketing opt-out (the user resumed).
    pub async fn resume(
        &self,
        waba_id: Option<&str>,
        wa_id: &str,
    ) -> Result<ConsentStatus, AdminError> {
        let (waba, to) = self.user(waba_id, wa_id)?;
        self.store.record_opt_out(&waba, &to, None).await?;
        info!(waba = %waba, to = %to.masked(), "opt-out withdrawn");
        self.consent_of(waba, to).await
    }

    /// What is recorded about a user's consent.
    pub async fn consent(
        &self,
        waba_id: Option<&str>,
        wa_id: &str,
    ) -> Result<ConsentStatus, AdminError> {
        let (waba, to) = self.user(waba_id, wa_id)?;
        self.consent_of(waba, to).await
    }

    /// The portfolio and the user a consent command is about.
    fn user(&self, waba_id: Option<&str>, wa_id: &str) -> Result<(WabaId, WaId), AdminError> {
        let waba = self.waba(waba_id)?;
        let to = parse_wa_id(wa_id).map_err(|e| invalid("wa_id", e))?;
        Ok((waba, to))
    }

    /// Opens the care window of `wa_id` with a configured number, as if the user had written at
    /// `at` (default now): for tests and migrations from another sender.
    pub async fn open_window(
        &self,
        phone_number_id: &str,
        wa_id: &str,
        at: Option<&str>,
    ) -> Result<WindowStatus, AdminError> {
        let number = PhoneNumberId::parse(phone_number_id.trim())
            .map_err(|e| invalid("phone_number_id", e.to_string()))?;
        let waba = self.numbers.get(&number).cloned().ok_or_else(|| {
            invalid(
                "phone_number_id",
                format!(
                    "phone_number_id {number} is not configured (configured: {})",
                    list(self.numbers.keys())
                ),
            )
        })?;
        let to = parse_wa_id(wa_id).map_err(|e| invalid("wa_id", e))?;
        let now = now();
        let opened_at = match at {
            Some(text) => parse_time("at", text, now).map_err(|e| invalid("at", e))?,
            None => now,
        };
        let closes_at = opened_at + TimeDelta::from_std(CARE_WINDOW).expect("24 h fits");
        if closes_at <= now {
            // The store would keep a window that is already closed: surely not what was meant.
            return Err(invalid(
                "at",
                format!("at {opened_at} is more than 24 h ago: the window would already be closed"),
            ));
        }
        self.store
            .record_inbound(&waba, &number, &to, opened_at)
            .await?;
        info!(number = %number, to = %to.masked(), %opened_at, "care window opened by hand");
        Ok(WindowStatus {
            phone_number_id: number,
            waba_id: waba,
            wa_id: to,
            opened_at,
            closes_at,
        })
    }

    fn mark(&self, change: ConsentChange<'_>) -> Result<(WabaId, WaId, Mark), AdminError> {
        let waba = self.waba(change.waba_id)?;
        let to = parse_wa_id(change.wa_id).map_err(|e| invalid("wa_id", e))?;
        let now = now();
        let at = match change.at {
            Some(text) => parse_time("at", text, now).map_err(|e| invalid("at", e))?,
            None => now,
        };
        let source = parse_source(change.source, ADMIN_SOURCE).map_err(|e| invalid("source", e))?;
        Ok((waba, to, Mark { at, source }))
    }

    async fn consent_of(&self, waba: WabaId, to: WaId) -> Result<ConsentStatus, AdminError> {
        let consent = self.store.consent(&waba, &to).await?;
        Ok(ConsentStatus {
            waba_id: waba,
            wa_id: to,
            opt_in: consent.opt_in,
            opt_out: consent.opt_out,
        })
    }
}

fn status(campaign_id: CampaignId, wabas: BTreeMap<WabaId, CampaignState>) -> CampaignStatus {
    let mut states = wabas.values().copied();
    let first = states.next();
    let state = match first {
        Some(s) if states.all(|other| other == s) => s.as_str(),
        _ => "mixed",
    };
    CampaignStatus {
        campaign_id,
        state,
        wabas,
    }
}

fn parse_campaign(text: &str) -> Result<CampaignId, AdminError> {
    CampaignId::parse(text.trim()).map_err(|e| invalid("campaign_id", e.to_string()))
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Now, to the millisecond: the store keeps milliseconds, so what is answered is what is kept.
pub(crate) fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// A user's number; the reason names the `wa_id` field (the id type calls it `to`).
pub(crate) fn parse_wa_id(text: &str) -> Result<WaId, String> {
    let text = text.trim();
    WaId::parse(text).map_err(|e| match e {
        IdError::Empty { .. } => "wa_id is missing".to_owned(),
        IdError::Malformed { rule, .. } => {
            format!("wa_id {text:?} is not a valid phone number: {rule}")
        }
        IdError::TooLong { .. } => format!("wa_id {text:?} is too long for a phone number"),
    })
}

/// An RFC 3339 time that is not in the future (beyond clock skew).
pub(crate) fn parse_time(
    field: &str,
    text: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    let at = DateTime::parse_from_rfc3339(text)
        .map_err(|e| {
            format!("{field} {text:?} is not an RFC 3339 time like 2025-05-01T09:30:00Z ({e})")
        })?
        .with_timezone(&Utc);
    if at > now + CLOCK_SKEW {
        return Err(format!("{field} {text:?} is in the future"));
    }
    Ok(DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at))
}

/// A consent source: the given one (trimmed) or `default` when blank.
pub(crate) fn parse_source(text: Option<&str>, default: &str) -> Result<String, String> {
    let source = text
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(default);
    if source.chars().count() > MAX_SOURCE_LEN {
        return Err(format!("source is longer than {MAX_SOURCE_LEN} characters"));
    }
    if source.chars().any(char::is_control) {
        return Err("source must not contain control characters".into());
    }
    Ok(source.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_problems_name_their_field() {
        assert_eq!(parse_wa_id(" ").unwrap_err(), "wa_id is missing");
        let e = parse_wa_id("12ab5678").unwrap_err();
        assert!(
            e.starts_with("wa_id \"12ab5678\" is not a valid phone number"),
            "{e}"
        );
        assert_eq!(
            parse_wa_id(" +16505551234 ").unwrap().as_str(),
            "16505551234"
        );
        let now = DateTime::parse_from_rfc3339("2025-05-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let e = parse_time("at", "yesterday", now).unwrap_err();
        assert!(
            e.starts_with("at \"yesterday\" is not an RFC 3339 time"),
            "{e}"
        );
        let e = parse_time("opted_in_at", "2025-05-02T10:00:00Z", now).unwrap_err();
        assert_eq!(e, "opted_in_at \"2025-05-02T10:00:00Z\" is in the future");
        assert_eq!(
            parse_time("at", "2025-05-01T12:00:00+02:00", now).unwrap(),
            now,
            "offsets are converted to UTC"
        );
        assert_eq!(parse_source(Some("  "), "admin").unwrap(), "admin");
        assert!(parse_source(Some("a\nb"), "admin").is_err());
    }
}
