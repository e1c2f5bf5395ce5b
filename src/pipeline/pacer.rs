//! Per-number throughput, the `pace` stage.
//!
//! The schedule is shared, not split: each job books its send slot in its number's schedule in
//! the store, one interval (`1 / (limit × headroom)`) after the last slot any replica booked
//! (`policy::pace`, one atomic round trip). Replicas joining, leaving or dying change nothing, no replica's jobs wait while another
//! holds the rest of the backlog, and a 130429 slows the number for every replica at once.
//! What is left here is per replica: each number's interval (its configured limit, or a higher
//! one a webhook recorded), the wait for a booked slot, and governor's bucket at the number's
//! full limit, a guard that this replica never outruns the limit whatever the store says.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Number;
use crate::ids::PhoneNumberId;
use crate::store::Live;

/// The interval between a number's send slots: `limit × headroom` messages per second.
///
/// CORRECTNESS: Meta counts messages in any 1 s window. Slots spaced `1/r` apart put at most
/// `⌈r·(1 + J)⌉` sends into a 1 s window when each send leaves up to `J` seconds after its slot
/// (scheduling and network jitter); with `r = headroom · limit` that stays within the limit
/// for `J` up to `1/headroom − 1` seconds (31 ms at the default 0.97).
fn interval(limit: u32, headroom: f64) -> Duration {
    Duration::from_secs_f64(1.0 / rate(limit, headroom))
}

/// The schedule's rate in messages per second, the inverse of [`interval`].
fn rate(limit: u32, headroom: f64) -> f64 {
    f64::from(limit.max(1)) * headroom
}

/// governor's bucket at the full `limit`, with a tenth of a second's burst: late sends may
/// catch up with their slots, a runaway schedule may not go faster than the limit.
fn guard(limit: u32) -> Arc<DefaultDirectRateLimiter> {
    let rate = NonZeroU32::new(limit.max(1)).expect("at least one");
    let burst = NonZeroU32::new((limit / 10).max(2)).expect("at least two");
    Arc::new(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

/// How far ahead of its sends a replica books a number's slots (except for otp jobs).
const BOOK_AHEAD: Duration = Duration::from_millis(250);

/// How many slots a replica may hold booked and not yet reached for a number with `limit`.
fn ahead(limit: u32, headroom: f64) -> Arc<Semaphore> {
    let slots = (f64::from(limit) * headroom * BOOK_AHEAD.as_secs_f64()).ceil();
    Arc::new(Semaphore::new((slots as usize).max(1)))
}

struct Pace {
    configured: u32,
    limit: u32,
    guard: Arc<DefaultDirectRateLimiter>,
    ahead: Arc<Semaphore>,
}

/// This replica's side of every configured number's pacing.
pub struct Pacer {
    headroom: f64,
    replicas: Mutex<u32>,
    numbers: HashMap<PhoneNumberId, Mutex<Pace>>,
}

impl Pacer {
    /// Pacing for `numbers` at their configured limits until the store records others.
    pub fn new(numbers: &BTreeMap<PhoneNumberId, Number>, headroom: f64) -> Self {
        let numbers = numbers
            .iter()
            .map(|(id, n)| {
                crate::metrics::number_pace(
                    id.as_str(),
                    n.throughput_mps,
                    rate(n.throughput_mps, headroom),
                );
                let pace = Pace {
                    configured: n.throughput_mps,
                    limit: n.throughput_mps,
                    guard: guard(n.throughput_mps),
                    ahead: ahead(n.throughput_mps, headroom),
                };
                (id.clone(), Mutex::new(pace))
            })
            .collect();
        Pacer {
            headroom,
            replicas: Mutex::new(1),
            numbers,
        }
    }

    /// How late after its slot a send may still leave: half the headroom's worth of a second
    /// (15 ms at the default 0.97), at least 10 ms. By the bound on [`interval`], sends up to
    /// `1/headroom − 1` seconds late keep every 1 s window within the limit; the other half
    /// is left for the admission request and the network after the wake.
    pub fn late_tolerance(&self) -> Duration {
        Duration::from_secs_f64((1.0 / self.headroom - 1.0) / 2.0).max(Duration::from_millis(10))
    }

    /// Applies a heartbeat's answer: live replicas (for the logs) and recorded limits.
    pub fn update(&self, live: &Live) {
        *self.replicas.lock().expect("pacer lock") = live.replicas.max(1);
        crate::metrics::replicas(live.replicas.max(1));
        for (id, pace) in &self.numbers {
            let mut pace = pace.lock().expect("pacer lock");
            let limit = live.throughput.get(id).copied().unwrap_or(pace.configured);
            if limit != pace.limit {
                crate::metrics::number_pace(id.as_str(), limit, rate(limit, self.headroom));
                pace.limit = limit;
                pace.guard = guard(limit);
                pace.ahead = ahead(limit, self.headroom);
            }
        }
    }

    /// The interval between `number`'s send slots at full speed (`None`: not configured).
    pub fn interval(&self, number: &PhoneNumberId) -> Option<Duration> {
        let pace = self.numbers.get(number)?.lock().expect("pacer lock");
        Some(interval(pace.limit, self.headroom))
    }

    /// Leave to book a slot of `number`: a replica holds at most a quarter of a second of a
    /// number's slots booked and not yet reached, so an `urgent` (otp) job, which books at
    /// once, finds at most that many bulk slots ahead of it, not every job in flight. Hold the
    /// permit until the slot is reached.
    pub async fn book_ahead(
        &self,
        number: &PhoneNumberId,
        urgent: bool,
    ) -> Option<OwnedSemaphorePermit> {
        if urgent {
            return None;
        }
        let ahead = Arc::clone(&self.numbers.get(number)?.lock().expect("pacer lock").ahead);
        ahead.acquire_owned().await.ok()
    }

    /// Live replicas as last heard.
    pub fn replicas(&self) -> u32 {
        *self.replicas.lock().expect("pacer lock")
    }

    /// Waits until the job's booked slot (`deadline`), then for the guard.
    ///
    /// Only this number's jobs wait here (each number has its own queues), so a wait is flow
    /// control: the broker hands out the number's next job when one is settled. The slot is
    /// absolute, so a job woken a millisecond late does not push the next one back.
    pub async fn wait(&self, number: &PhoneNumberId, deadline: Instant) {
        tokio::time::sleep_until(deadline.into()).await;
        let Some(pace) = self.numbers.get(number) else {
            return;
        };
        let guard = Arc::clone(&pace.lock().expect("pacer lock").guard);
        // governor's own `until_ready` sleeps on a timer thread of its own (a wake-up and two
        // context switches per send); a check and tokio's timer do the same here.
        while let Err(not_until) = guard.check() {
            tokio::time::sleep(not_until.wait_time_from(guard.clock().now())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_put_more_than_the_limit_into_a_second() {
        for limit in [20, 80, 250, 1000] {
            let rate = 1.0 / interval(limit, 0.99).as_secs_f64();
            // Sends leave up to 5 ms after their slots: a window of 1.005 s of slots.
            let worst = (rate * 1.005).ceil();
            assert!(worst <= f64::from(limit), "{limit} mps: {worst}");
            assert!(rate >= 0.97 * f64::from(limit), "{limit} mps: {rate}");
        }
    }

    #[tokio::test]
    async fn the_guard_lets_late_sends_catch_up_but_not_outrun_the_limit() {
        let number = PhoneNumberId::parse("106540352242922").unwrap();
        let numbers = BTreeMap::from([(
            number.clone(),
            Number {
                waba: crate::ids::WabaId::parse("102290129340398").unwrap(),
                throughput_mps: 20,
                token: secrecy::SecretString::from("t"),
            },
        )]);
        let pacer = Pacer::new(&numbers, 1.0);
        assert_eq!(pacer.interval(&number), Some(Duration::from_millis(50)));
        // Two late sends may go at once (a burst of two), a third may not.
        let g = guard(20);
        assert!(g.check().is_ok() && g.check().is_ok());
        assert!(g.check().is_err());
        // Twenty-two sends through the pacer take at least the limit's time: 20 msg/s.
        let start = Instant::now();
        for _ in 0..22 {
            pacer.wait(&number, Instant::now()).await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(950),
            "{:?}",
            start.elapsed()
        );
    }
}
