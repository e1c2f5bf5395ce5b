//! Meta's two send limits as the simulator enforces them: per-number throughput over a sliding
//! 1 s window (130429) and the per-(number, recipient) pair rate with borrowed bursts (131056).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::scenario::PairRate;

/// Accepted sends per number in the last second.
#[derive(Default)]
pub(crate) struct Throughput {
    windows: HashMap<String, VecDeque<Instant>>,
}

impl Throughput {
    /// Takes one send for `number` at `now` if fewer than `limit` were taken in the second
    /// before; a refused send does not count.
    pub(crate) fn try_take(&mut self, number: &str, limit: u32, now: Instant) -> bool {
        let window = self.windows.entry(number.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() >= limit as usize {
            return false;
        }
        window.push_back(now);
        true
    }
}

/// Pair-rate state of one (number, recipient).
struct Pair {
    /// When the next message is allowed at the sustained rate.
    next: Instant,
    /// Start of the current burst and messages in it.
    burst: Option<(Instant, u32)>,
}

/// Meta's pair rate: one message per period; a burst of up to `burst` messages within one
/// period is allowed but borrows from future quota: after a burst of n the pair waits n periods
/// from the burst's start.
pub(crate) struct PairLimiter {
    rate: PairRate,
    pairs: HashMap<(String, String), Pair>,
}

impl PairLimiter {
    pub(crate) fn new(rate: PairRate) -> Self {
        PairLimiter {
            rate,
            pairs: HashMap::new(),
        }
    }

    /// Takes one message for (number, recipient) at `now`, or says no (131056).
    pub(crate) fn try_take(&mut self, number: &str, recipient: &str, now: Instant) -> bool {
        let period = self.rate.period();
        let key = (number.to_owned(), recipient.to_owned());
        let Some(pair) = self.pairs.get_mut(&key) else {
            self.pairs.insert(
                key,
                Pair {
                    next: now + period,
                    burst: Some((now, 1)),
                },
            );
            return true;
        };
        if now >= pair.next {
            pair.next = now + period;
            pair.burst = Some((now, 1));
            return true;
        }
        match &mut pair.burst {
            Some((start, count))
                if now.duration_since(*start) < period && *count < self.rate.burst =>
            {
                *count += 1;
                pair.next += period;
                true
            }
            _ => false,
        }
    }

    /// Forgets pairs idle for longer than their debt, so memory stays bounded in long runs.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.pairs.retain(|_, p| p.next > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_counts_a_sliding_second() {
        let mut t = Throughput::default();
        let start = Instant::now();
        assert!((0..3).all(|_| t.try_take("n", 3, start)));
        assert!(!t.try_take("n", 3, start + Duration::from_millis(999)));
        assert!(t.try_take("other", 3, start));
        assert!(t.try_take("n", 3, start + Duration::from_millis(1000)));
    }

    #[test]
    fn a_pair_bursts_then_waits_for_the_borrowed_quota() {
        let mut p = PairLimiter::new(PairRate {
            period_s: 6.0,
            burst: 45,
        });
        let start = Instant::now();
        // A burst of 20 within one period is allowed…
        for i in 0..20 {
            assert!(
                p.try_take("n", "u", start + Duration::from_millis(i * 100)),
                "{i}"
            );
        }
        // …and then the pair waits 20 × 6 s = 2 min from the burst's start.
        assert!(!p.try_take("n", "u", start + Duration::from_secs(7)));
        assert!(!p.try_take("n", "u", start + Duration::from_secs(119)));
        assert!(p.try_take("n", "u", start + Duration::from_secs(120)));
        // Other recipients are not affected.
        assert!(p.try_take("n", "v", start + Duration::from_secs(7)));
    }

    #[test]
    fn a_burst_is_capped() {
        let mut p = PairLimiter::new(PairRate {
            period_s: 6.0,
            burst: 45,
        });
        let start = Instant::now();
        let taken = (0..60).filter(|_| p.try_take("n", "u", start)).count();
        assert_eq!(taken, 45);
    }

    #[test]
    fn one_per_period_is_always_allowed() {
        let mut p = PairLimiter::new(PairRate {
            period_s: 6.0,
            burst: 1,
        });
        let start = Instant::now();
        for i in 0..10 {
            assert!(p.try_take("n", "u", start + Duration::from_secs(6 * i)));
        }
        assert!(!p.try_take("n", "u", start + Duration::from_secs(59)));
    }
}
