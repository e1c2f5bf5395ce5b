//! Acks of one consuming channel, sent together: the jobs settled while the previous acks were
//! on their way go out as one `basic.ack` with `multiple` where that is safe, and as single
//! acks where it is not.
//!
//! Nothing waits on a timer: whoever settles first while no acks are being sent sends them, and
//! the ones settled meanwhile form the next batch, so an idle channel acks at once and a busy
//! one acks in batches as large as its settling rate makes them.
//!
//! # The broker's rules
//! RabbitMQ (`rabbit_channel:collect_acks`) holds a channel's client to these; the model test
//! below plays them against random interleavings:
//! - A channel numbers its deliveries 1, 2, 3, … across all its consumers, in the order it
//!   sends them. The client may hold many of them in its buffers (prefetch per consumer) before
//!   a worker takes them, and workers take and settle them in any order.
//! - `basic.ack(tag, multiple)` must name a tag that is still outstanding (delivered, neither
//!   acked nor rejected), or the broker closes the channel (406 `PRECONDITION_FAILED - unknown
//!   delivery tag`) and returns every outstanding delivery to its queue.
//! - With `multiple`, it also acks every outstanding delivery below the tag, whether a worker
//!   has settled it, is working on it, or has not even taken it from the client's buffer yet.
//!
//! So a `multiple` ack may reach only up to the *floor*: the highest tag below which every tag
//! was settled here. Tags never handed out count as unsettled, which keeps the floor below any
//! delivery still buffered. A settled tag above the floor is acked on its own.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::BrokerError;

/// The acks to send for one batch, in this order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Ack every outstanding delivery up to and including this tag (`multiple`).
    pub(crate) up_to: Option<u64>,
    /// Ack these one by one: each is above a tag that is not settled yet.
    pub(crate) singles: Vec<u64>,
}

/// Which of a channel's delivery tags are settled, and which settled ones still need an ack.
///
/// CORRECTNESS: the floor only moves over tags this ledger was told about, so a `multiple` ack
/// it plans can never cover a delivery the worker has not settled (see the module's rules).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Every tag up to here is settled: acked, in the batch being planned, or rejected.
    floor: u64,
    /// Settled tags above the floor.
    above: BTreeSet<u64>,
    /// Settled by an ack and not yet planned.
    pending: Vec<u64>,
}

impl Ledger {
    /// `tag` was settled with an ack, to be sent in the next batch.
    pub(crate) fn acked(&mut self, tag: u64) {
        self.pending.push(tag);
        self.settled(tag);
    }

    /// `tag` was rejected (requeued), and the reject is on the channel ahead of any later ack.
    pub(crate) fn rejected(&mut self, tag: u64) {
        self.settled(tag);
    }

    fn settled(&mut self, tag: u64) {
        if tag > self.floor {
            self.above.insert(tag);
        }
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
    }

    /// Whether an ack is waiting to be planned.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Plans the acks of every tag settled since the last plan: one `multiple` ack for those at
    /// or below the floor (naming the highest of them, which is still outstanding: no earlier
    /// plan named it), single acks for the rest.
    pub(crate) fn plan(&mut self) -> Plan {
        let mut batch = std::mem::take(&mut self.pending);
        batch.sort_unstable();
        let split = batch.partition_point(|tag| *tag <= self.floor);
        let singles = batch.split_off(split);
        Plan {
            up_to: batch.last().copied(),
            singles,
        }
    }
}

/// Sends one batch's acks; the RabbitMQ broker implements it on its channel.
#[async_trait::async_trait]
pub(crate) trait SendAcks: Send + Sync {
    /// Acks one tag, or every outstanding tag up to it when `multiple`.
    async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError>;
}

type Waiter = oneshot::Sender<Result<(), String>>;

#[derive(Default)]
struct State {
    ledger: Ledger,
    /// Whoever waits for an ack planned next.
    waiters: Vec<Waiter>,
    /// Someone is sending a batch.
    sending: bool,
}

/// The acks of one channel.
#[derive(Default)]
pub(crate) struct Acks {
    state: Mutex<State>,
}

impl Acks {
    /// The delivery `tag` was rejected; call once the reject is on the channel.
    pub(crate) fn rejected(&self, tag: u64) {
        self.lock().ledger.rejected(tag);
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
            state.ledger.acked(tag);
            state.waiters.push(tx);
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
                if !state.ledger.has_pending() {
                    state.sending = false;
                    return;
                }
                (state.ledger.plan(), std::mem::take(&mut state.waiters))
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
            // Each waiter reports the failure as its own `basic.ack`: keep only the cause.
            let result = result.map_err(|e| match e {
                BrokerError::Operation { detail, .. } => detail,
                other => other.to_string(),
            });
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
    use std::collections::{BTreeMap, VecDeque};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn ledger(acked: &[u64], rejected: &[u64]) -> Ledger {
        let mut ledger = Ledger::default();
        acked.iter().for_each(|t| ledger.acked(*t));
        rejected.iter().for_each(|t| ledger.rejected(*t));
        ledger
    }

    #[test]
    fn a_settled_run_from_the_first_tag_is_one_multiple_ack() {
        let plan = ledger(&[3, 1, 2, 8], &[]).plan();
        assert_eq!(
            plan,
            Plan {
                up_to: Some(3),
                singles: vec![8]
            }
        );
    }

    #[test]
    fn a_tag_not_yet_settled_stops_the_multiple_ack_even_if_nobody_took_it() {
        // 4 was delivered but is still in the client's buffer: nothing above it is covered.
        let plan = ledger(&[2, 7, 5, 3, 1], &[]).plan();
        assert_eq!(
            plan,
            Plan {
                up_to: Some(3),
                singles: vec![5, 7]
            }
        );
        // Nothing settled from the first tag on: single acks only.
        assert_eq!(ledger(&[5, 6], &[]).plan().up_to, None);
    }

    #[test]
    fn a_rejected_tag_lets_the_floor_pass_but_is_never_named() {
        let mut ledger = ledger(&[1, 3], &[2]);
        assert_eq!(
            ledger.plan(),
            Plan {
                up_to: Some(3),
                singles: vec![]
            }
        );
        // Only 4 is new: 1–3 were planned, so the next multiple ack names 4.
        ledger.rejected(5);
        ledger.acked(4);
        ledger.acked(6);
        assert_eq!(
            ledger.plan(),
            Plan {
                up_to: Some(6),
                singles: vec![]
            }
        );
        assert_eq!(ledger.plan(), Plan::default());
    }

    #[test]
    fn a_tag_acked_on_its_own_is_never_named_again_when_the_floor_passes_it() {
        let mut ledger = ledger(&[2], &[]);
        assert_eq!(ledger.plan().singles, vec![2]);
        ledger.acked(1);
        // The floor is 2 now, but 2 is no longer outstanding: the multiple ack names 1.
        assert_eq!(
            ledger.plan(),
            Plan {
                up_to: Some(1),
                singles: vec![]
            }
        );
    }

    /// RabbitMQ's side of one channel, as `rabbit_channel` keeps it.
    #[derive(Default)]
    struct BrokerModel {
        /// Ready messages per queue (message ids), in queue order.
        queues: Vec<VecDeque<u64>>,
        /// Outstanding deliveries: tag → (queue, message).
        outstanding: BTreeMap<u64, (usize, u64)>,
        /// The last tag handed out on the channel.
        last_tag: u64,
        /// How many times each message was removed by an ack.
        removed: BTreeMap<u64, u32>,
        /// Messages the worker settled with an ack (the only ones an ack may remove).
        settled: BTreeSet<u64>,
    }

    impl BrokerModel {
        fn unacked(&self, queue: usize) -> usize {
            self.outstanding
                .values()
                .filter(|(q, _)| *q == queue)
                .count()
        }

        /// Delivers the head of `queue` to its consumer, if its prefetch allows.
        fn deliver(&mut self, queue: usize, prefetch: usize) -> Option<(u64, u64)> {
            if self.unacked(queue) >= prefetch {
                return None;
            }
            let message = self.queues[queue].pop_front()?;
            self.last_tag += 1;
            self.outstanding.insert(self.last_tag, (queue, message));
            Some((self.last_tag, message))
        }

        /// `basic.ack`; `Err` is the channel closed with 406, or a delivery acked unsettled.
        fn ack(&mut self, tag: u64, multiple: bool) -> Result<(), String> {
            if !self.outstanding.contains_key(&tag) {
                return Err(format!(
                    "406 PRECONDITION_FAILED - unknown delivery tag {tag}"
                ));
            }
            let covered: Vec<u64> = if multiple {
                self.outstanding.range(..=tag).map(|(t, _)| *t).collect()
            } else {
                vec![tag]
            };
            for t in covered {
                let (_, message) = self.outstanding.remove(&t).expect("outstanding");
                if !self.settled.contains(&message) {
                    return Err(format!(
                        "ack of tag {tag} (multiple: {multiple}) removed message {message}, \
                         which no worker had settled"
                    ));
                }
                *self.removed.entry(message).or_default() += 1;
            }
            Ok(())
        }

        /// `basic.reject` with requeue: back to the head of its queue.
        fn reject(&mut self, tag: u64) -> Result<(), String> {
            let (queue, message) = self
                .outstanding
                .remove(&tag)
                .ok_or_else(|| format!("406 PRECONDITION_FAILED - unknown delivery tag {tag}"))?;
            self.queues[queue].push_front(message);
            Ok(())
        }
    }

    /// One run of the model: `queues` consumers on one channel with `prefetch` each, a worker
    /// taking at most `concurrency` deliveries from the client's buffers in a random order,
    /// settling them in a random order (some by a requeue), and acks planned by the ledger and
    /// sent whenever the sender gets its turn. Returns the first broken rule.
    fn run_model(
        seed: u64,
        queues: usize,
        prefetch: usize,
        concurrency: usize,
    ) -> Result<(), String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let per_queue = 60u64;
        let mut broker = BrokerModel {
            queues: (0..queues)
                .map(|q| (0..per_queue).map(|m| q as u64 * 1000 + m).collect())
                .collect(),
            ..BrokerModel::default()
        };
        let total = queues as u64 * per_queue;
        // The client's per-consumer buffers, and the worker's deliveries in flight.
        let mut buffers: Vec<VecDeque<(u64, u64)>> = vec![VecDeque::new(); queues];
        let mut in_flight: Vec<(u64, u64)> = Vec::new();
        let mut ledger = Ledger::default();
        // Ack frames planned and not yet written to the channel, in order.
        let mut frames: VecDeque<(u64, bool)> = VecDeque::new();
        for _ in 0..100_000 {
            if broker.removed.len() as u64 == total && in_flight.is_empty() && frames.is_empty() {
                break;
            }
            match rng.random_range(0..10) {
                // The broker pushes a delivery to a consumer with room.
                0..=2 => {
                    let q = rng.random_range(0..queues);
                    if let Some(d) = broker.deliver(q, prefetch) {
                        buffers[q].push_back(d);
                    }
                }
                // The worker takes a delivery from one consumer's buffer (lanes by preference,
                // so some buffers wait a long time).
                3..=4 if in_flight.len() < concurrency => {
                    let q = if rng.random_bool(0.7) {
                        0
                    } else {
                        rng.random_range(0..queues)
                    };
                    if let Some(d) = buffers[q].pop_front() {
                        in_flight.push(d);
                    }
                }
                // A job in flight settles: mostly an ack, sometimes a requeue (the reject is
                // written before the ledger hears of it).
                5..=7 if !in_flight.is_empty() => {
                    let (tag, message) =
                        in_flight.swap_remove(rng.random_range(0..in_flight.len()));
                    if rng.random_bool(0.1) {
                        broker.reject(tag)?;
                        ledger.rejected(tag);
                    } else {
                        broker.settled.insert(message);
                        ledger.acked(tag);
                    }
                }
                // The ack sender's turn: plan a batch, or write its next frame, while everything
                // else goes on.
                _ => match frames.pop_front() {
                    Some((tag, multiple)) => broker.ack(tag, multiple)?,
                    None => {
                        let plan = ledger.plan();
                        frames.extend(plan.up_to.map(|tag| (tag, true)));
                        frames.extend(plan.singles.into_iter().map(|tag| (tag, false)));
                    }
                },
            }
        }
        let plan = ledger.plan();
        frames.extend(plan.up_to.map(|tag| (tag, true)));
        frames.extend(plan.singles.into_iter().map(|tag| (tag, false)));
        for (tag, multiple) in frames {
            broker.ack(tag, multiple)?;
        }
        let twice: Vec<_> = broker.removed.iter().filter(|(_, n)| **n > 1).collect();
        if !twice.is_empty() {
            return Err(format!("acked twice: {twice:?}"));
        }
        if broker.removed.len() as u64 != total {
            return Err(format!(
                "{} of {total} messages never acked",
                total - broker.removed.len() as u64
            ));
        }
        Ok(())
    }

    #[test]
    fn model_acks_never_cover_an_unsettled_delivery_nor_name_an_unknown_tag() {
        // Several consumers per channel, deliveries buffered behind a worker that takes fewer
        // than it was sent, settled out of order, some requeued and delivered again.
        for (queues, prefetch, concurrency) in [(3, 64, 8), (3, 16, 16), (1, 16, 16), (3, 4, 2)] {
            for seed in 0..200 {
                if let Err(broken) = run_model(seed, queues, prefetch, concurrency) {
                    panic!(
                        "seed {seed}, {queues} consumers, prefetch {prefetch}, concurrency \
                         {concurrency}: {broken}"
                    );
                }
            }
        }
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
    async fn concurrent_acks_are_batched_and_never_cover_an_unsettled_delivery() {
        let acks = Arc::new(Acks::default());
        let recorder = Arc::new(Recorder::default());
        let sender: Arc<dyn SendAcks> = recorder.clone();
        // Every tag of 1..=40 but 20 settles, in a scrambled order, concurrently.
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
                assert!(acked.insert(*tag), "{tag} acked twice: {sent:?}");
            }
        }
        let expected: BTreeSet<u64> = (1..=40).filter(|t| *t != 20).collect();
        assert_eq!(acked, expected, "every settled delivery is acked: {sent:?}");
        assert!(
            sent.iter().any(|(_, multiple)| *multiple),
            "acks were batched: {sent:?}"
        );
    }
}
