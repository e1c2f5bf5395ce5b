//! Per-number throughput, the `pace` stage: a schedule of send slots per number at this
//! replica's share of the number's limit, checked by a governor bucket. Shares follow the live
//! replicas (heartbeats in the store) and a limit recorded by a throughput-upgrade webhook; a
//! 130429 takes a tenth off the share for a few seconds.

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
fn share(limit: u32, replicas: u32, headroom: f64, slowdown: f64) -> f64 {
    let even = f64::from(limit) / f64::from(replicas.max(1));
    let base = if even >= 1.0 { even.floor() } else { even };
    base * headroom * slowdown
}

/// What one 130429 takes off a share, and the least a share keeps after several.
const THROTTLE_STEP: f64 = 0.9;
const THROTTLE_FLOOR: f64 = 0.5;

struct Pace {
    configured: u32,
    limit: u32,
    throttled_until: Option<Instant>,
    /// 1.0, or less for a while after 130429s.
    slowdown: f64,
    rate: f64,
    /// The next free send slot of this replica for the number.
    next_slot: Instant,
    /// The latest slot whose job went ahead (no slot may follow it closer than one interval).
    last_used: Option<Instant>,
    /// Bumped when the rate changes, so slots reserved at the old rate are taken again.
    generation: u64,
    limiter: Arc<DefaultDirectRateLimiter>,
}

/// governor's bucket for `rate`: the guard that no schedule can outrun. One token: two sends
/// are never closer than one interval, which is what the window bound in [`share`] assumes (a
/// second token let a late send and the next one go together, a burst on top of the share).
fn limiter(rate: f64) -> Arc<DefaultDirectRateLimiter> {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let quota = Quota::with_period(period)
        .expect("period above zero")
        .allow_burst(NonZeroU32::new(1).expect("one"));
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
                let rate = share(n.throughput_mps, 1, headroom, 1.0);
                let pace = Pace {
                    configured: n.throughput_mps,
                    limit: n.throughput_mps,
                    throttled_until: None,
                    slowdown: 1.0,
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

    /// A 130429 for `number`: Meta counted more than the limit in some second, so this
    /// replica's share loses a tenth (each further 130429 in the cool-down another tenth, down
    /// to half) and recovers when the cool-down ends. A tenth, not a half: the share overshot
    /// by a few messages, and halving it left the number at half speed for the cool-down.
    pub fn throttled(&self, number: &PhoneNumberId) {
        if let Some(pace) = self.numbers.get(number) {
            let mut pace = pace.lock().expect("pacer lock");
            pace.throttled_until = Some(Instant::now() + self.cooldown);
            pace.slowdown = (pace.slowdown * THROTTLE_STEP).max(THROTTLE_FLOOR);
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
                pace.slowdown = 1.0;
            }
            let rate = share(pace.limit, replicas, self.headroom, pace.slowdown);
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

    /// Waits for this replica's next send slot for `number`. Only this number's jobs wait here
    /// (each number has its own queues), so a long wait is flow control, not a reason to defer:
    /// the broker hands out the number's next job when one of these is settled. An `urgent` job
    /// (otp) takes the first slot after the last one used, and the jobs that had booked later
    /// slots book again behind it: an otp job never queues behind a campaign on the same number.
    ///
    /// CORRECTNESS: slots are booked on an absolute schedule, one interval apart, so a waiter
    /// woken a millisecond late does not push every later send back (a plain wait-until-ready
    /// loop loses that millisecond on every message); governor's bucket then checks the send,
    /// so no schedule can exceed the share.
    pub async fn wait(&self, number: &PhoneNumberId, urgent: bool) {
        let Some(pace) = self.numbers.get(number) else {
            return;
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
            return;
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
                let rate = share(limit, replicas, 0.99, 1.0);
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
        let total = 3.0 * share(80, 3, 0.99, 1.0);
        assert!(total >= 0.95 * 80.0, "{total}");
    }

    #[tokio::test]
    async fn slots_are_spaced_otp_goes_first_and_a_130429_slows_by_a_tenth() {
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
        let start = Instant::now();
        pacer.wait(&number, false).await;
        assert!(
            start.elapsed() < Duration::from_millis(50),
            "the first slot is now"
        );
        // A bulk job books the next slot; an otp job arriving later still goes first, and the
        // bulk job books again behind it.
        let order = Mutex::new(Vec::new());
        let bulk = async {
            pacer.wait(&number, false).await;
            order.lock().unwrap().push(("bulk", start.elapsed()));
        };
        let otp = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            pacer.wait(&number, true).await;
            order.lock().unwrap().push(("otp", start.elapsed()));
        };
        tokio::join!(bulk, otp);
        let order = order.into_inner().unwrap();
        assert_eq!(order[0].0, "otp");
        assert_eq!(order[1].0, "bulk");
        assert!(
            order[1].1 - order[0].1 >= Duration::from_millis(95),
            "sends one interval apart at 10 msg/s: {order:?}"
        );
        pacer.throttled(&number);
        assert!(
            (pacer.rate(&number).unwrap() - 9.0).abs() < 1e-9,
            "a 130429 takes a tenth off"
        );
        for _ in 0..20 {
            pacer.throttled(&number);
        }
        assert!(
            (pacer.rate(&number).unwrap() - 5.0).abs() < 1e-9,
            "never below half"
        );
    }
}
