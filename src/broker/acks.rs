//! Acks of one consuming channel, sent together: the jobs settled while the previous acks were
//! on their way go out as one `basic.ack` with `multiple` for the settled run of delivery tags,
//! and single acks only for tags settled ahead of a delivery still in flight.
//!
//! Nothing waits on a timer: whoever settles first while no acks are being sent sends them, and
//! the ones settled meanwhile form the next batch, so an idle channel acks at once and a busy
//! one acks in batches as large as its settling rate makes them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::BrokerError;

/// The acks to send for one batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Ack every delivery up to and including this tag (`multiple`).
    pub(crate) up_to: Option<u64>,
    /// Ack these one by one: each is ahead of a delivery that is not settled yet.
    pub(crate) singles: Vec<u64>,
}

/// Splits the settled `done` tags into one `multiple` ack for those below every unsettled
/// delivery (`open`) and single acks for the rest.
///
/// CORRECTNESS: a `multiple` ack also acks every earlier delivery of the channel, so it may
/// only reach up to the first delivery still being worked on.
pub(crate) fn plan(open: &BTreeSet<u64>, done: &[u64]) -> Plan {
    let first_open = open.first().copied().unwrap_or(u64::MAX);
    let (covered, singles): (Vec<u64>, Vec<u64>) = done.iter().partition(|tag| **tag < first_open);
    let mut singles = singles;
    singles.sort_unstable();
    Plan {
        up_to: covered.into_iter().max(),
        singles,
    }
}

/// Sends one batch's acks; the RabbitMQ broker implements it on its channel.
#[async_trait::async_trait]
pub(crate) trait SendAcks: Send + Sync {
    /// Acks one tag, or every tag up to it when `multiple`.
    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError>;
}

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct State {
    /// Delivered and not yet settled (or settled into a batch not taken yet).
    open: BTreeSet<u64>,
    /// Settled, waiting for the next batch.
    done: Vec<(u64, Waiter)>,
    /// Someone is sending a batch.
    sending: bool,
}

/// The acks of one channel.
#[derive(Default)]
pub(crate) struct Acks {
    state: Mutex<State>,
}

impl Acks {
    /// A delivery with `tag` was handed out.
    pub(crate) fn delivered(&self, tag: u64) {
        self.lock().open.insert(tag);
    }

    /// The delivery `tag` was settled without an ack (rejected, or dropped by its owner).
    pub(crate) fn forget(&self, tag: u64) {
        self.lock().open.remove(&tag);
    }

    /// Acks `tag`; returns when the ack covering it was written to the channel. The batches
    /// are sent by a task of their own, so a settling job that is cancelled midway never
    /// strands the acks of the others.
    pub(crate) async fn ack(
        self: &Arc<Self>,
        tag: u64,
        sender: &Arc<dyn SendAcks>,
    ) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut state = self.lock();
            state.done.push((tag, tx));
            !std::mem::replace(&mut state.sending, true)
        };
        if lead {
            let (acks, sender) = (Arc::clone(self), Arc::clone(sender));
            tokio::spawn(async move { acks.send_batches(sender.as_ref()).await });
        }
        match rx.await {
            Ok(result) => result.map_err(|detail| BrokerError::op("basic.ack", detail)),
            Err(_) => Err(BrokerError::op("basic.ack", "the ack batch was abandoned")),
        }
    }

    /// Sends batches until no settled tag is left.
    async fn send_batches(&self, sender: &dyn SendAcks) {
        loop {
            let (plan, waiters) = {
                let mut state = self.lock();
                if state.done.is_empty() {
                    state.sending = false;
                    return;
                }
                let batch = std::mem::take(&mut state.done);
                for (tag, _) in &batch {
                    state.open.remove(tag);
                }
                let tags: Vec<u64> = batch.iter().map(|(tag, _)| *tag).collect();
                let waiters: Vec<Waiter> = batch.into_iter().map(|(_, w)| w).collect();
                (plan(&state.open, &tags), waiters)
            };
            let mut result = Ok(());
            if let Some(tag) = plan.up_to {
                result = sender.ack(tag, true).await;
            }
            for tag in plan.singles {
                if result.is_err() {
                    break;
                }
                result = sender.ack(tag, false).await;
            }
            let result = result.map_err(|e| e.to_string());
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn settled_run_below_every_open_delivery_is_one_multiple_ack() {
        let plan = plan(&open(&[9, 12]), &[3, 1, 2, 8]);
        assert_eq!(
            plan,
            Plan {
                up_to: Some(8),
                singles: vec![]
            }
        );
    }

    #[test]
    fn tags_ahead_of_an_open_delivery_are_acked_one_by_one() {
        let plan = plan(&open(&[4]), &[2, 7, 5, 3]);
        assert_eq!(
            plan,
            Plan {
                up_to: Some(3),
                singles: vec![5, 7]
            }
        );
    }

    #[test]
    fn nothing_open_covers_everything() {
        assert_eq!(plan(&open(&[]), &[5, 6]).up_to, Some(6));
        assert_eq!(plan(&open(&[1]), &[]), Plan::default());
    }

    /// Records what was sent.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, bool)>>);

    #[async_trait::async_trait]
    impl SendAcks for Recorder {
        async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
            self.0.lock().unwrap().push((tag, multiple));
            tokio::task::yield_now().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn concurrent_acks_never_cover_a_delivery_in_flight() {
        let acks = Arc::new(Acks::default());
        for tag in 1..=40 {
            acks.delivered(tag);
        }
        let recorder = Arc::new(Recorder::default());
        let sender: Arc<dyn SendAcks> = recorder.clone();
        // Every tag but 20 settles, in a scrambled order, concurrently.
        let mut tasks = Vec::new();
        for tag in (1..=40u64).map(|t| (t * 17) % 41).filter(|t| *t != 20) {
            let (acks, sender) = (acks.clone(), sender.clone());
            tasks.push(tokio::spawn(async move {
                acks.ack(tag, &sender).await.unwrap()
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let sent = recorder.0.lock().unwrap().clone();
        let mut acked = BTreeSet::new();
        for (tag, multiple) in &sent {
            if *multiple {
                assert!(*tag < 20, "a multiple ack up to {tag} covers delivery 20");
                acked.extend(1..=*tag);
            } else {
                acked.insert(*tag);
            }
        }
        let expected: BTreeSet<u64> = (1..=40).filter(|t| *t != 20).collect();
        assert_eq!(acked, expected, "every settled delivery is acked: {sent:?}");
        assert!(
            sent.len() < 39,
            "acks were batched ({} sends for 39 deliveries)",
            sent.len()
        );
    }
}
