//! What Meta's `account_update` webhook means for sending, decided once as plain data: the
//! halts it raises or lifts on the WABA. The processor applies them through the store
//! (`Store::raise_account_halt`), so every replica stops, or resumes, within a heartbeat.
//!
//! The halts stop a whole WABA: wa-sender's halts have no narrower scope, so a restriction of
//! business-initiated messaging stops the WABA's replies as well until it ends.

use chrono::{DateTime, Utc};

use super::payload::AccountUpdate;

/// Meta restricted business-initiated messaging (`RESTRICTED_BIZ_INITIATED_MESSAGING`).
pub const RESTRICTED_BUSINESS_INITIATED: &str = "restricted_business_initiated";
/// Meta restricted replies as well (`RESTRICTED_CUSTOMER_INITIATED_MESSAGING`).
pub const RESTRICTED_CUSTOMER_INITIATED: &str = "restricted_customer_initiated";
/// Meta disabled the WABA (`DISABLED_UPDATE` `DISABLE`, lifted by `REINSTATE`).
pub const DISABLED: &str = "disabled";
/// Meta deleted the WABA (`ACCOUNT_DELETED`).
pub const DELETED: &str = "deleted";
/// The WABA left this app's Solution Partner (`ACCOUNT_OFFBOARDED`, lifted by
/// `ACCOUNT_RECONNECTED`).
pub const OFFBOARDED: &str = "offboarded";

/// One thing an account update does to sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Halt the WABA for `condition` until `until` (`None`: until a webhook or an operator
    /// lifts it), saying `cause`.
    Raise {
        /// Which halt, so that its own end lifts it and no other.
        condition: &'static str,
        /// When Meta said it ends.
        until: Option<DateTime<Utc>>,
        /// What happened, for operators (`wa-sender halt list`).
        cause: String,
    },
    /// Lift the WABA's halt for `condition`.
    Lift {
        /// Which halt.
        condition: &'static str,
    },
    /// Concerns sending but changes nothing here, and why (logged).
    Unapplied(String),
}

/// The effects of `update` on sending, in the order of its parts; none for the events that do
/// not stop sending (`ACCOUNT_VIOLATION`, `VOLUME_BASED_PRICING_TIER_UPDATE`, …).
pub fn effects(update: &AccountUpdate) -> Vec<Effect> {
    let raise = |condition, until, cause: String| Effect::Raise {
        condition,
        until,
        cause,
    };
    let on = |date: &Option<String>| {
        date.as_ref()
            .map(|d| format!(" on {d}"))
            .unwrap_or_default()
    };
    match update.event.as_str() {
        "ACCOUNT_RESTRICTION" if update.restrictions.is_empty() => vec![Effect::Unapplied(
            "ACCOUNT_RESTRICTION without restriction_info: nothing halted".into(),
        )],
        "ACCOUNT_RESTRICTION" => update
            .restrictions
            .iter()
            .filter_map(|r| {
                let until = r.until.map_or("until lifted".into(), |t| {
                    format!("until {}", t.to_rfc3339())
                });
                match r.kind.as_str() {
                    "RESTRICTED_BIZ_INITIATED_MESSAGING" => Some(raise(
                        RESTRICTED_BUSINESS_INITIATED,
                        r.until,
                        format!(
                            "Meta restricted business-initiated messaging {until} \
                             (account_update ACCOUNT_RESTRICTION); the whole WABA is halted, \
                             replies included"
                        ),
                    )),
                    "RESTRICTED_CUSTOMER_INITIATED_MESSAGING" => Some(raise(
                        RESTRICTED_CUSTOMER_INITIATED,
                        r.until,
                        format!(
                            "Meta restricted customer-initiated messaging (replies) {until} \
                             (account_update ACCOUNT_RESTRICTION)"
                        ),
                    )),
                    // Adding phone numbers is not sending.
                    "RESTRICTED_ADD_PHONE_NUMBER_ACTION" => None,
                    other => Some(Effect::Unapplied(format!(
                        "restriction {other} is not one this build knows: nothing halted"
                    ))),
                }
            })
            .collect(),
        "DISABLED_UPDATE" => match update.ban_state.as_deref() {
            Some("DISABLE") => vec![raise(
                DISABLED,
                None,
                format!(
                    "Meta disabled the WABA{} (account_update DISABLED_UPDATE DISABLE); halted \
                     until it is reinstated",
                    on(&update.ban_date)
                ),
            )],
            Some("REINSTATE") => vec![Effect::Lift {
                condition: DISABLED,
            }],
            Some("SCHEDULE_FOR_DISABLE") => vec![Effect::Unapplied(format!(
                "Meta will disable the WABA{}: sending goes on until it does",
                on(&update.ban_date)
            ))],
            other => vec![Effect::Unapplied(format!(
                "DISABLED_UPDATE with ban state {other:?}: nothing halted"
            ))],
        },
        "ACCOUNT_DELETED" => vec![raise(
            DELETED,
            None,
            "Meta deleted the WABA (account_update ACCOUNT_DELETED)".into(),
        )],
        "ACCOUNT_OFFBOARDED" => vec![raise(
            OFFBOARDED,
            None,
            "the WABA was offboarded from this app (account_update ACCOUNT_OFFBOARDED); halted \
             until it is reconnected"
                .into(),
        )],
        "ACCOUNT_RECONNECTED" => vec![Effect::Lift {
            condition: OFFBOARDED,
        }],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::payload::Restriction;

    fn update(event: &str) -> AccountUpdate {
        AccountUpdate {
            waba_id: None,
            event: event.into(),
            restrictions: Vec::new(),
            ban_state: None,
            ban_date: None,
        }
    }

    fn restricted(kinds: &[(&str, Option<i64>)]) -> AccountUpdate {
        AccountUpdate {
            restrictions: kinds
                .iter()
                .map(|(kind, until)| Restriction {
                    kind: (*kind).into(),
                    until: until.and_then(|s| DateTime::from_timestamp(s, 0)),
                })
                .collect(),
            ..update("ACCOUNT_RESTRICTION")
        }
    }

    fn banned(state: &str) -> AccountUpdate {
        AccountUpdate {
            ban_state: Some(state.into()),
            ban_date: Some("2026-05-21".into()),
            ..update("DISABLED_UPDATE")
        }
    }

    /// An effect as (raise/lift/unapplied, condition, end in unix seconds).
    type Row = (&'static str, &'static str, Option<i64>);

    fn summary(update: &AccountUpdate) -> Vec<Row> {
        effects(update)
            .into_iter()
            .map(|e| match e {
                Effect::Raise {
                    condition, until, ..
                } => ("raise", condition, until.map(|t| t.timestamp())),
                Effect::Lift { condition } => ("lift", condition, None),
                Effect::Unapplied(_) => ("unapplied", "", None),
            })
            .collect()
    }

    #[test]
    fn each_account_event_raises_lifts_or_leaves_the_halts() {
        let cases: [(AccountUpdate, &[Row]); 13] = [
            (
                restricted(&[("RESTRICTED_BIZ_INITIATED_MESSAGING", Some(1_780_000_000))]),
                &[("raise", RESTRICTED_BUSINESS_INITIATED, Some(1_780_000_000))],
            ),
            (
                restricted(&[
                    ("RESTRICTED_ADD_PHONE_NUMBER_ACTION", Some(1_780_000_000)),
                    ("RESTRICTED_CUSTOMER_INITIATED_MESSAGING", None),
                ]),
                &[("raise", RESTRICTED_CUSTOMER_INITIATED, None)],
            ),
            (
                restricted(&[("RESTRICTED_MARKETING_MESSAGING", Some(1))]),
                &[("unapplied", "", None)],
            ),
            (restricted(&[]), &[("unapplied", "", None)]),
            (banned("DISABLE"), &[("raise", DISABLED, None)]),
            (banned("REINSTATE"), &[("lift", DISABLED, None)]),
            (banned("SCHEDULE_FOR_DISABLE"), &[("unapplied", "", None)]),
            (update("DISABLED_UPDATE"), &[("unapplied", "", None)]),
            (update("ACCOUNT_DELETED"), &[("raise", DELETED, None)]),
            (update("ACCOUNT_OFFBOARDED"), &[("raise", OFFBOARDED, None)]),
            (update("ACCOUNT_RECONNECTED"), &[("lift", OFFBOARDED, None)]),
            (update("ACCOUNT_VIOLATION"), &[]),
            (update("PARTNER_APP_UNINSTALLED"), &[]),
        ];
        for (update, expected) in cases {
            assert_eq!(summary(&update), expected, "{update:?}");
        }
    }

    #[test]
    fn a_business_initiated_restriction_says_the_whole_waba_is_halted_and_until_when() {
        let effects = effects(&restricted(&[(
            "RESTRICTED_BIZ_INITIATED_MESSAGING",
            Some(1_780_000_000),
        )]));
        let [Effect::Raise { cause, .. }] = effects.as_slice() else {
            panic!("{effects:?}");
        };
        assert!(cause.contains("until 2026-05-28T20:26:40+00:00"), "{cause}");
        assert!(cause.contains("the whole WABA is halted"), "{cause}");
    }
}
