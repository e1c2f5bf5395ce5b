//! The status machine per wamid: after parsing ([`super::payload`]), each status is checked
//! against the last one recorded for its message before it is applied.
//!
//! Meta does not guarantee order and retries deliveries for days, so the same status arrives
//! twice and `delivered` can arrive after `read` (Meta even skips `delivered` when `read` comes
//! first). A message's recorded status therefore only moves forward: sent → delivered →
//! read/played, with `failed` terminal.

use super::payload::MessageStatus;

/// What to do with a status, given the one recorded before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Record it: it moves the message forward (or is the first status seen).
    Apply,
    /// The status recorded already; a redelivered webhook. Acknowledge and do nothing.
    Duplicate,
    /// It would move the message backwards (or past `failed`). Acknowledge and do nothing.
    Stale,
}

/// How far a status is along the way: sent 1 < delivered 2 < read 3 = played 3 < failed 4.
/// `None` for statuses outside the Cloud API's order (`deleted`, `warning`, unknown ones).
pub fn rank(status: &MessageStatus) -> Option<u8> {
    match status {
        MessageStatus::Sent => Some(1),
        MessageStatus::Delivered => Some(2),
        MessageStatus::Read | MessageStatus::Played => Some(3),
        MessageStatus::Failed => Some(4),
        MessageStatus::Deleted | MessageStatus::Warning | MessageStatus::Other(_) => None,
    }
}

/// Whether `next` may replace `previous` (the status recorded for the same wamid, if any).
///
/// - The first status of a message is always applied, whatever it is.
/// - A higher rank applies, so `read` after `sent` applies when `delivered` never came, and
///   `failed` applies after `delivered` or `read`: Meta documents that a failure may race a
///   delivery, and the failure is what the sender must act on.
/// - A lower rank is stale, and so is anything after `failed`, which is terminal.
/// - Of the equal ranks, `played` after `read` applies (a voice message is read, then played);
///   `read` after `played` is stale.
/// - A status without a rank applies only as the first one: it cannot be placed in the order.
pub fn transition(previous: Option<&MessageStatus>, next: &MessageStatus) -> Transition {
    let Some(previous) = previous else {
        return Transition::Apply;
    };
    if previous == next {
        return Transition::Duplicate;
    }
    match (rank(previous), rank(next)) {
        (_, None) => Transition::Stale,
        (None, Some(_)) => Transition::Apply,
        (Some(before), Some(after)) if after > before => Transition::Apply,
        (Some(_), Some(_))
            if *previous == MessageStatus::Read && *next == MessageStatus::Played =>
        {
            Transition::Apply
        }
        (Some(_), Some(_)) => Transition::Stale,
    }
}

/// The statuses a message newly reaches when `next` is applied after `previous`, the skipped
/// ones included: `read` right after `sent` reaches `delivered` too (Meta skips it when the read
/// receipt comes first), so delivery and read rates counted from these stay true. `played`
/// counts as `read`; `failed` reaches only itself.
pub fn reached(previous: Option<&MessageStatus>, next: &MessageStatus) -> Vec<&'static str> {
    if *next == MessageStatus::Failed {
        return vec!["failed"];
    }
    let before = previous.and_then(rank).filter(|r| *r <= 3).unwrap_or(0);
    let after = rank(next).filter(|r| *r <= 3).unwrap_or(0);
    [("sent", 1), ("delivered", 2), ("read", 3)]
        .into_iter()
        .filter(|(_, r)| before < *r && *r <= after)
        .map(|(name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses() -> [MessageStatus; 8] {
        [
            MessageStatus::Sent,
            MessageStatus::Delivered,
            MessageStatus::Read,
            MessageStatus::Played,
            MessageStatus::Failed,
            MessageStatus::Deleted,
            MessageStatus::Warning,
            MessageStatus::Other("pending".into()),
        ]
    }

    #[test]
    fn ranks_follow_the_delivery_order() {
        let ranks: Vec<_> = statuses().iter().map(rank).collect();
        assert_eq!(
            ranks,
            [
                Some(1),
                Some(2),
                Some(3),
                Some(3),
                Some(4),
                None,
                None,
                None
            ]
        );
    }

    /// Every (previous, next) pair. A = Apply, D = Duplicate, S = Stale.
    #[test]
    fn every_pair_of_statuses() {
        // next:          sent delivered read played failed deleted warning other
        let table = [
            (None, "AAAAAAAA"),
            (Some(MessageStatus::Sent), "DAAAASSS"),
            (Some(MessageStatus::Delivered), "SDAAASSS"),
            (Some(MessageStatus::Read), "SSDAASSS"),
            (Some(MessageStatus::Played), "SSSDASSS"),
            (Some(MessageStatus::Failed), "SSSSDSSS"),
            (Some(MessageStatus::Deleted), "AAAAADSS"),
            (Some(MessageStatus::Warning), "AAAAASDS"),
            (Some(MessageStatus::Other("pending".into())), "AAAAASSD"),
        ];
        for (previous, row) in table {
            for (next, expected) in statuses().iter().zip(row.chars()) {
                let expected = match expected {
                    'A' => Transition::Apply,
                    'D' => Transition::Duplicate,
                    _ => Transition::Stale,
                };
                assert_eq!(
                    transition(previous.as_ref(), next),
                    expected,
                    "{previous:?} then {next:?}"
                );
            }
        }
    }

    #[test]
    fn two_different_unknown_statuses_do_not_replace_each_other() {
        let before = MessageStatus::Other("pending".into());
        let after = MessageStatus::Other("queued".into());
        assert_eq!(transition(Some(&before), &after), Transition::Stale);
    }

    #[test]
    fn read_before_delivered_keeps_read() {
        // Meta posts read first; the late delivered must not move the message back.
        let mut recorded: Option<MessageStatus> = None;
        for next in [
            MessageStatus::Sent,
            MessageStatus::Read,
            MessageStatus::Delivered,
            MessageStatus::Read,
        ] {
            if transition(recorded.as_ref(), &next) == Transition::Apply {
                recorded = Some(next);
            }
        }
        assert_eq!(recorded, Some(MessageStatus::Read));
    }

    #[test]
    fn skipped_statuses_are_reached_too() {
        use MessageStatus::*;
        assert_eq!(reached(None, &Sent), ["sent"]);
        assert_eq!(reached(None, &Read), ["sent", "delivered", "read"]);
        assert_eq!(reached(Some(&Sent), &Read), ["delivered", "read"]);
        assert_eq!(reached(Some(&Delivered), &Read), ["read"]);
        assert!(reached(Some(&Read), &Played).is_empty());
        assert_eq!(reached(Some(&Delivered), &Failed), ["failed"]);
        assert!(reached(None, &Other("pending".into())).is_empty());
    }
}
