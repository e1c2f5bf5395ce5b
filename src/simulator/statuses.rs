//! The webhook payloads the simulator sends, shaped as Meta sends them: status updates with
//! `pricing` (and, up to v23, `conversation`), asynchronous failures with Meta's error objects,
//! inbound messages, `user_preferences`, template status changes and throughput upgrades.
//! Everything here is pure: it builds `changes[].value` objects and the plan of when each is due.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::scenario::{SimNumber, SimTemplate, WebhookSettings};
use super::unix_string;

/// How a message is billed, as the `pricing` object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pricing {
    /// `marketing`, `utility`, `authentication`, `service`.
    pub(crate) category: String,
    /// `regular` or `free_customer_service`.
    pub(crate) kind: &'static str,
}

impl Pricing {
    /// Per-message pricing: templates are charged by category, except utility inside an open
    /// care window; free-form messages (only possible inside the window) are free service.
    pub(crate) fn for_message(template_category: Option<&str>, window_open: bool) -> Self {
        match template_category.map(str::to_ascii_lowercase) {
            Some(c) if c == "utility" && window_open => Pricing {
                category: c,
                kind: "free_customer_service",
            },
            Some(c) => Pricing {
                category: c,
                kind: "regular",
            },
            None => Pricing {
                category: "service".into(),
                kind: "free_customer_service",
            },
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "billable": self.kind == "regular",
            "pricing_model": "PMP",
            "type": self.kind,
            "category": self.category,
        })
    }
}

/// An accepted message, as its status webhooks describe it.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub(crate) number: SimNumber,
    pub(crate) wamid: String,
    pub(crate) recipient: String,
    pub(crate) job_id: Option<String>,
    pub(crate) pricing: Pricing,
    /// Graph API major version of the request (`conversation` objects stop at v23).
    pub(crate) version: u32,
}

/// What becomes of an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Fails asynchronously with this code (131026, 131047, 131049, 131050).
    Fail(i64),
    /// Sent and delivered, and read if `read`.
    Deliver {
        /// The user reads it.
        read: bool,
    },
}

/// One webhook update and when it is due.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    pub(crate) after: Duration,
    /// For the audit: `sent`, `delivered`, `read`, `failed:<code>`.
    pub(crate) kind: String,
    pub(crate) value: Value,
}

/// The status webhooks for one accepted message, in the order they are due. With `reorder`,
/// `read` falls due before `delivered` (their timestamps still tell the true order).
pub(crate) fn plan(
    message: &Accepted,
    fate: Fate,
    settings: &WebhookSettings,
    reorder: bool,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let sent_after = settings.sent_after.sample();
    let at = |after: Duration| now + chrono::Duration::from_std(after).unwrap_or_default();
    match fate {
        Fate::Fail(code) => vec![Planned {
            after: sent_after,
            kind: format!("failed:{code}"),
            value: status(message, "failed", at(sent_after), false, Some(code)),
        }],
        Fate::Deliver { read } => {
            let delivered_after = sent_after + settings.delivered_after.sample();
            let read_after = delivered_after + settings.read_after.sample();
            let mut plan = vec![
                Planned {
                    after: sent_after,
                    kind: "sent".into(),
                    value: status(message, "sent", at(sent_after), true, None),
                },
                Planned {
                    after: delivered_after,
                    kind: "delivered".into(),
                    value: status(message, "delivered", at(delivered_after), true, None),
                },
            ];
            if read {
                plan.push(Planned {
                    after: read_after,
                    kind: "read".into(),
                    value: status(message, "read", at(read_after), false, None),
                });
                if reorder {
                    let (d, r) = (plan[1].after, plan[2].after);
                    plan[1].after = r;
                    plan[2].after = d;
                }
            }
            plan
        }
    }
}

fn metadata(number: &SimNumber) -> Value {
    json!({
        "display_phone_number": number.display_phone_number.chars().filter(char::is_ascii_digit).collect::<String>(),
        "phone_number_id": number.phone_number_id,
    })
}

/// A `messages` change value with one status.
fn status(
    message: &Accepted,
    status: &str,
    at: DateTime<Utc>,
    with_pricing: bool,
    error: Option<i64>,
) -> Value {
    let mut s = json!({
        "id": message.wamid,
        "status": status,
        "timestamp": unix_string(at),
        "recipient_id": message.recipient,
    });
    if let Some(job) = &message.job_id {
        s["biz_opaque_callback_data"] = json!(job);
    }
    if with_pricing {
        s["pricing"] = message.pricing.to_json();
        if message.version <= 23 {
            let mut conversation = json!({
                "id": format!("{:032x}", fnv1a(&message.wamid)),
                "origin": {"type": message.pricing.category},
            });
            if status == "sent" {
                conversation["expiration_timestamp"] =
                    unix_string(at + chrono::Duration::hours(24));
            }
            s["conversation"] = conversation;
        }
    }
    if let Some(code) = error {
        s["errors"] = json!([async_error(code)]);
    }
    json!({
        "messaging_product": "whatsapp",
        "metadata": metadata(&message.number),
        "statuses": [s],
    })
}

/// A stable pseudo-id derived from a wamid (FNV-1a, 128 bits) (a conversation id looks like 32 hex digits).
fn fnv1a(text: &str) -> u128 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u128, |h, b| {
        (h ^ u128::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Meta's error object in a failed status.
pub(crate) fn async_error(code: i64) -> Value {
    let (title, details) = match code {
        131026 => (
            "Message undeliverable",
            "Unable to deliver message. Reasons can include: the recipient phone number is not a WhatsApp phone number; the recipient has not accepted the new Terms of Service; the recipient is using an old WhatsApp version.",
        ),
        131047 => (
            "Re-engagement message",
            "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        ),
        131049 => (
            "This message was not delivered to maintain healthy ecosystem engagement.",
            "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
        ),
        131050 => (
            "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp from your business.",
            "The recipient has stopped marketing messages from this business.",
        ),
        132015 => (
            "Template is paused",
            "The template was paused due to low quality; held messages were dropped.",
        ),
        _ => ("Something went wrong", "Unknown error"),
    };
    json!({
        "code": code,
        "title": title,
        "message": title,
        "error_data": {"details": details},
        "href": "/documentation/business-messaging/whatsapp/support/error-codes",
    })
}

/// An inbound text message from a user.
pub(crate) fn inbound_text(
    number: &SimNumber,
    from: &str,
    name: &str,
    wamid: &str,
    text: &str,
    at: DateTime<Utc>,
) -> Value {
    json!({
        "messaging_product": "whatsapp",
        "metadata": metadata(number),
        "contacts": [{"profile": {"name": name}, "wa_id": from}],
        "messages": [{
            "from": from,
            "id": wamid,
            "timestamp": unix_string(at),
            "type": "text",
            "text": {"body": text},
        }],
    })
}

/// A `user_preferences` change: the user stopped or resumed marketing.
pub(crate) fn user_preference(
    number: &SimNumber,
    wa_id: &str,
    stop: bool,
    at: DateTime<Utc>,
) -> Value {
    let (value, detail) = if stop {
        ("stop", "User requested to stop marketing messages")
    } else {
        ("resume", "User requested to resume marketing messages")
    };
    json!({
        "messaging_product": "whatsapp",
        "metadata": metadata(number),
        "user_preferences": [{
            "wa_id": wa_id,
            "detail": detail,
            "category": "marketing_messages",
            "value": value,
            "timestamp": at.timestamp(),
        }],
    })
}

/// A `message_template_status_update` change. `reason` is a rejection reason, `NONE` otherwise;
/// pauses and disables say why in `other_info`.
pub(crate) fn template_status(template: &SimTemplate, event: &str, at: DateTime<Utc>) -> Value {
    let mut value = json!({
        "event": event,
        "message_template_id": template.id.parse::<u64>().map(Value::from).unwrap_or_else(|_| json!(template.id)),
        "message_template_name": template.name,
        "message_template_language": template.language,
        "message_template_category": template.category,
        "reason": if event == "REJECTED" { "INVALID_FORMAT" } else { "NONE" },
    });
    match event {
        "PAUSED" => {
            value["other_info"] = json!({
                "title": "FIRST_PAUSE",
                "description": "Your template has been paused for 3 hours because of low quality.",
            });
        }
        "DISABLED" => {
            value["disable_info"] = json!({"disable_date": at.timestamp()});
        }
        _ => {}
    }
    value
}

/// A `phone_number_quality_update` announcing the upgrade to 1,000 msg/s.
pub(crate) fn throughput_upgrade(number: &SimNumber) -> Value {
    json!({
        "display_phone_number": number.display_phone_number.chars().filter(char::is_ascii_digit).collect::<String>(),
        "event": "THROUGHPUT_UPGRADE",
        "max_daily_conversations_per_business": "TIER_UNLIMITED",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::scenario::DelayRange;

    fn accepted(category: Option<&str>, window_open: bool, version: u32) -> Accepted {
        Accepted {
            number: SimNumber::new("106540352242922", "102290129340398"),
            wamid: "wamid.X".into(),
            recipient: "16505551234".into(),
            job_id: Some("job-1".into()),
            pricing: Pricing::for_message(category, window_open),
            version,
        }
    }

    fn settings() -> WebhookSettings {
        WebhookSettings {
            sent_after: DelayRange::fixed(10),
            delivered_after: DelayRange::fixed(10),
            read_after: DelayRange::fixed(10),
            ..WebhookSettings::default()
        }
    }

    #[test]
    fn utility_is_free_inside_the_window_and_marketing_never_is() {
        assert_eq!(
            Pricing::for_message(Some("UTILITY"), true).kind,
            "free_customer_service"
        );
        assert_eq!(Pricing::for_message(Some("UTILITY"), false).kind, "regular");
        assert_eq!(
            Pricing::for_message(Some("MARKETING"), true).kind,
            "regular"
        );
        let service = Pricing::for_message(None, true);
        assert_eq!(
            (service.category.as_str(), service.kind),
            ("service", "free_customer_service")
        );
    }

    #[test]
    fn a_delivered_message_goes_sent_delivered_read_with_pricing_on_the_first_two() {
        let plan = plan(
            &accepted(Some("MARKETING"), false, 24),
            Fate::Deliver { read: true },
            &settings(),
            false,
            Utc::now(),
        );
        let kinds: Vec<_> = plan.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(kinds, ["sent", "delivered", "read"]);
        let statuses: Vec<&Value> = plan.iter().map(|p| &p.value["statuses"][0]).collect();
        assert_eq!(statuses[0]["pricing"]["category"], "marketing");
        assert_eq!(statuses[0]["biz_opaque_callback_data"], "job-1");
        assert!(statuses[2].get("pricing").is_none());
        assert!(
            statuses[0].get("conversation").is_none(),
            "v24 has no conversation"
        );
        assert!(plan[0].after < plan[1].after && plan[1].after < plan[2].after);
    }

    #[test]
    fn reordering_posts_read_before_delivered_but_keeps_timestamps_true() {
        let plan = plan(
            &accepted(Some("UTILITY"), false, 23),
            Fate::Deliver { read: true },
            &settings(),
            true,
            Utc::now(),
        );
        assert!(plan[2].after < plan[1].after, "read falls due first");
        let ts = |i: usize| {
            plan[i].value["statuses"][0]["timestamp"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap()
        };
        assert!(ts(1) <= ts(2));
        assert!(plan[0].value["statuses"][0]["conversation"]["origin"]["type"] == "utility");
    }

    #[test]
    fn failures_carry_meta_error_objects_and_no_pricing() {
        let plan = plan(
            &accepted(None, false, 24),
            Fate::Fail(131047),
            &settings(),
            false,
            Utc::now(),
        );
        assert_eq!(plan.len(), 1);
        let s = &plan[0].value["statuses"][0];
        assert_eq!(s["status"], "failed");
        assert_eq!(s["errors"][0]["code"], 131047);
        assert!(s.get("pricing").is_none());
    }
}
