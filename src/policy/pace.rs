//! A number's send schedule, shared by every replica (the `pace` stage's rules): each send
//! books the next free slot, one interval after the last one booked; a 130429 slows the
//! schedule by a tenth (down to half) for a cool-down. The Redis store runs the same rules as
//! two small Lua scripts; the conformance suite holds both stores to the same answers.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// Full speed, permille.
pub const FULL_SPEED: u32 = 1000;
/// What one 130429 leaves of the speed in force (a tenth off), permille.
pub const THROTTLE_STEP: u32 = 900;
/// The least speed several 130429s leave, permille.
pub const THROTTLE_FLOOR: u32 = 500;

/// One number's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceState {
    /// The next free send slot (microsecond precision).
    pub next: Option<DateTime<Utc>>,
    /// Speed in permille of full speed while slowed down.
    pub speed: u32,
    /// When the slow-down ends (millisecond precision).
    pub slow_until: Option<DateTime<Utc>>,
}

impl Default for PaceState {
    fn default() -> Self {
        PaceState {
            next: None,
            speed: FULL_SPEED,
            slow_until: None,
        }
    }
}

impl PaceState {
    /// The speed in force at `now`, permille.
    pub fn speed_at(&self, now: DateTime<Utc>) -> u32 {
        match self.slow_until {
            Some(until) if now.timestamp_millis() < until.timestamp_millis() => {
                self.speed.clamp(THROTTLE_FLOOR, FULL_SPEED)
            }
            _ => FULL_SPEED,
        }
    }

    /// Books a slot at `now`: the slot, and the schedule after it.
    pub fn book(&self, now: DateTime<Utc>, interval: Duration) -> (DateTime<Utc>, PaceState) {
        let at = self.next.map_or(now, |next| next.max(now));
        let interval = slowed(interval, self.speed_at(now));
        let next = at + TimeDelta::from_std(interval).expect("a short interval");
        (
            at,
            PaceState {
                next: Some(next),
                ..*self
            },
        )
    }

    /// After a 130429 at `now`: a tenth slower than the speed in force (each further one in
    /// the cool-down another tenth, down to half), until `cooldown` from now.
    pub fn throttled(&self, now: DateTime<Utc>, cooldown: Duration) -> PaceState {
        let until = now.timestamp_millis() + cooldown.as_millis() as i64;
        PaceState {
            speed: (self.speed_at(now) * THROTTLE_STEP / FULL_SPEED).max(THROTTLE_FLOOR),
            slow_until: DateTime::from_timestamp_millis(until),
            ..*self
        }
    }
}

/// `interval` at `speed` permille, in whole microseconds (the Lua scripts' arithmetic).
pub fn slowed(interval: Duration, speed: u32) -> Duration {
    let us = interval.as_micros() as u64 * u64::from(FULL_SPEED) / u64::from(speed.max(1));
    Duration::from_micros(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_one_another_and_a_130429_slows_them_for_a_while() {
        let t = DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        let ms = Duration::from_millis;
        let (a, s) = PaceState::default().book(t, ms(100));
        let (b, s) = s.book(t, ms(100));
        assert_eq!((b - a).num_milliseconds(), 100);
        let s = s.throttled(t, ms(1000)).throttled(t, ms(1000));
        assert_eq!(s.speed_at(t), 810);
        let (c, s) = s.book(t, ms(100));
        let (d, _) = s.book(t, ms(100));
        assert_eq!((d - c).num_microseconds(), Some(123_456));
        assert_eq!(s.speed_at(t + TimeDelta::seconds(1)), FULL_SPEED);
        for _ in 0..20 {
            assert!(s.throttled(t, ms(1000)).speed >= THROTTLE_FLOOR);
        }
    }
}
