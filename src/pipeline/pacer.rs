//! Step 10, per-number throughput: a governor token bucket per number holding this replica's
//! share of the number's limit. Shares follow the live replicas (heartbeats in the store), a
//! limit recorded by a throughput-upgrade webhook, and halve for a while after a 130429.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::Number;
use crate::ids::PhoneNumberId;
use crate::store::Live;

/// Messages per second one replica may send for a number with `limit` shared by `replicas`.
///
/// CORRECTNESS: Meta counts messages in any 1 s window. Sends spaced at least `1/r` apart put
/// at most `⌈r·L⌉` into a window of length `L`, so `n` replicas at `r = ⌊limit/n⌋ · headroom`
/// stay within the limit as long as jitter stretches a window by less than `1/headroom − 1`
/// (1% is 10 ms). Fewer messages than replicas: each gets its fraction.
fn share(limit: u32, replicas: u32, headroom: f64, throttled: bool) -> f64 {
    let even = f64::from(limit) / f64::from(replicas.max(1));
    let base = if even >= 1.0 { even.floor() } else { even };
    let rate = base * headroom;
    if throttled { rate / 2.0 } else { rate }
}

struct Pace {
    configured: u32,
    limit: u32,
    throttled_until: Option<Instant>,
    rate: f64,
    /// The next free send slot of this replica for the number.
    next_slot: Instant,
    /// The latest slot whose job went ahead (no slot may follow it closer than one interval).
    last_used: Option<Instant>,
    /// Bumped when the rate changes, so slots reserved at the old rate are taken again.
    generation: u64,
    limiter: Arc<DefaultDirectRateLimiter>,
}

/// governor's bucket for `rate`: the guard that no schedule can outrun. Two tokens, so a send
/// woken a little late followed by one on time is not held back.
fn limiter(rate: f64) -> Arc<DefaultDirectRateLimiter> {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let quota = Quota::with_period(period)
        .expect("period above zero")
        .allow_burst(NonZeroU32::new(2).expect("two"));
    Arc::new(RateLimiter::direct(quota))
}

/// This replica's pacing of every configured number.
pub struct Pacer {
    headroom: f64,
    cooldown: Duration,
    replicas: Mutex<u32>,
    numbers: HashMap<PhoneNumberId, Mutex<Pace>>,
}

impl Pacer {
    /// Pacing for `numbers`, as if this replica were alone until the first heartbeat says more.
    pub fn new(
        numbers: &BTreeMap<PhoneNumberId, Number>,
        headroom: f64,
        cooldown: Duration,
    ) -> Self {
        let numbers = numbers
            .iter()
            .map(|(id, n)| {
                let rate = share(n.throughput_mps, 1, headroom, false);
                let pace = Pace {
                    configured: n.throughput_mps,
                    limit: n.throughput_mps,
                    throttled_until: None,
                    rate,
                    next_slot: Instant::now(),
                    last_used: None,
                    generation: 0,
                    limiter: limiter(rate),
                };
                (id.clone(), Mutex::new(pace))
            })
            .collect();
        Pacer {
            headroom,
            cooldown,
            replicas: Mutex::new(1),
            numbers,
        }
    }

    /// Applies a heartbeat's answer: live replicas and recorded limits.
    pub fn update(&self, live: &Live) {
        *self.replicas.lock().expect("pacer lock") = live.replicas.max(1);
        for (id, pace) in &self.numbers {
            let mut pace = pace.lock().expect("pacer lock");
            pace.limit = live.throughput.get(id).copied().unwrap_or(pace.configured);
        }
        self.refresh(Instant::now());
    }

    /// A 130429 for `number`: halve this replica's share for the cool-down.
    pub fn throttled(&self, number: &PhoneNumberId) {
        if let Some(pace) = self.numbers.get(number) {
            pace.lock().expect("pacer lock").throttled_until = Some(Instant::now() + self.cooldown);
        }
        self.refresh(Instant::now());
    }

    /// This replica's current rate for `number`, messages per second.
    pub fn rate(&self, number: &PhoneNumberId) -> Option<f64> {
        self.refresh(Instant::now());
        self.numbers
            .get(number)
            .map(|p| p.lock().expect("pacer lock").rate)
    }

    /// Live replicas as last heard.
    pub fn replicas(&self) -> u32 {
        *self.replicas.lock().expect("pacer lock")
    }

    fn refresh(&self, now: Instant) {
        let replicas = self.replicas();
        for pace in self.numbers.values() {
            let mut pace = pace.lock().expect("pacer lock");
            if pace.throttled_until.is_some_and(|t| t <= now) {
                pace.throttled_until = None;
            }
            let rate = share(
                pace.limit,
                replicas,
                self.headroom,
                pace.throttled_until.is_some(),
            );
            if (rate - pace.rate).abs() > 1e-9 {
                pace.rate = rate;
                pace.limiter = limiter(rate);
                pace.generation += 1;
                // The new schedule starts one new interval from now: slots given at the old
                // rate are void, and nothing is sent twice as fast while the change settles.
                pace.next_slot = now + Duration::from_secs_f64(1.0 / rate.max(0.01));
            }
        }
    }

    /// Waits for this replica's next send slot for `number`, at most `bound`. `false`: the wait
    /// would be longer, so the job should be deferred rather than hold a slot that other
    /// numbers' jobs need. An `urgent` job (otp) takes the first slot after the last one used,
    /// and the jobs that had booked later slots book again behind it: an otp job never queues
    /// behind a campaign on the same number.
    ///
    /// CORRECTNESS: slots are booked on an absolute schedule, one interval apart, so a waiter
    /// woken a millisecond late does not push every later send back (a plain wait-until-ready
    /// loop loses that millisecond on every message); governor's bucket then checks the send,
    /// so no schedule can exceed the share.
    pub async fn wait(&self, number: &PhoneNumberId, bound: Duration, urgent: bool) -> bool {
        let Some(pace) = self.numbers.get(number) else {
            return true;
        };
        loop {
            let now = Instant::now();
            if pace
                .lock()
                .expect("pacer lock")
                .throttled_until
                .is_some_and(|t| t <= now)
            {
                self.refresh(now);
            }
            let (slot, generation, limiter) = {
                let mut pace = pace.lock().expect("pacer lock");
                let interval = Duration::from_secs_f64(1.0 / pace.rate.max(0.01));
                let slot = if urgent {
                    pace.last_used
                        .map_or(now, |used| (used + interval).max(now))
                } else {
                    pace.next_slot.max(now)
                };
                if slot.duration_since(now) > bound {
                    return false;
                }
                if urgent && slot < pace.next_slot {
                    // Everyone booked after this slot books again, behind it.
                    pace.generation += 1;
                }
                pace.next_slot = slot + interval;
                (slot, pace.generation, Arc::clone(&pace.limiter))
            };
            tokio::time::sleep_until(slot.into()).await;
            {
                let mut pace = pace.lock().expect("pacer lock");
                if pace.generation != generation {
                    continue;
                }
                pace.last_used = Some(pace.last_used.map_or(slot, |used| used.max(slot)));
            }
            limiter.until_ready().await;
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_never_add_up_to_more_than_the_limit_in_any_second() {
        for limit in [20, 80, 250, 1000] {
            for replicas in 1..=12 {
                let rate = share(limit, replicas, 0.99, false);
                // Sends at least 1/rate apart: at most ceil(rate * L) in a window of L = 1.005 s
                // (5 ms of jitter between our clock and Meta's).
                let worst = f64::from(replicas) * (rate * 1.005).ceil();
                assert!(
                    worst <= f64::from(limit),
                    "{limit} mps, {replicas} replicas: {worst}"
                );
            }
        }
    }

    #[test]
    fn three_replicas_use_at_least_95_percent_of_80() {
        let total = 3.0 * share(80, 3, 0.99, false);
        assert!(total >= 0.95 * 80.0, "{total}");
        assert!(share(80, 3, 0.99, true) <= share(80, 3, 0.99, false) / 2.0);
    }

    #[tokio::test]
    async fn slots_are_refused_beyond_the_bound_and_otp_goes_first() {
        let number = PhoneNumberId::parse("106540352242922").unwrap();
        let numbers = BTreeMap::from([(
            number.clone(),
            Number {
                waba: crate::ids::WabaId::parse("102290129340398").unwrap(),
                throughput_mps: 10,
                token: secrecy::SecretString::from("t"),
            },
        )]);
        let pacer = Pacer::new(&numbers, 1.0, Duration::from_secs(60));
        assert_eq!(pacer.rate(&number), Some(10.0));
        assert!(
            pacer.wait(&number, Duration::ZERO, false).await,
            "the first slot is now"
        );
        // The next slot is 100 ms away: refused with no wait allowed, and refusing took no slot.
        for _ in 0..3 {
            assert!(!pacer.wait(&number, Duration::ZERO, false).await);
        }
        // A bulk job books the next slot; an otp job arriving later still goes first, and the
        // bulk job books again behind it.
        let order = Mutex::new(Vec::new());
        let bulk = async {
            assert!(pacer.wait(&number, Duration::from_secs(1), false).await);
            order.lock().unwrap().push("bulk");
        };
        let otp = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(pacer.wait(&number, Duration::from_secs(1), true).await);
            order.lock().unwrap().push("otp");
        };
        tokio::join!(bulk, otp);
        assert_eq!(*order.lock().unwrap(), ["otp", "bulk"]);
        pacer.throttled(&number);
        assert_eq!(pacer.rate(&number), Some(5.0), "a 130429 halves the share");
    }
}
