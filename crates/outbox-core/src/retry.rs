//! Exponential backoff with jitter, for rejected attempts and for broker outages.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When to try a rejected event again, and when to give up.
///
/// The delay before attempt `n + 1` (after `n` failures) is drawn uniformly from
/// `[d/2, d]` with `d = min(cap, base * 2^(n-1))` ("equal jitter"): retries of many events
/// spread out, yet each waits at least half the nominal delay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts before an event is dead (the first attempt counts).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// The nominal (un-jittered) delay after `failures` failed attempts (`failures >= 1`).
    pub fn nominal_delay(&self, failures: u32) -> Duration {
        nominal(self.base, self.cap, failures)
    }

    /// The delay to wait after `failures` failed attempts, jittered.
    pub fn delay(&self, failures: u32) -> Duration {
        jittered(self.nominal_delay(failures))
    }

    /// Whether an event that has failed `failures` times is out of attempts.
    pub fn exhausted(&self, failures: u32) -> bool {
        failures >= self.max_attempts
    }
}

/// Backoff between probes while the broker is unreachable; grows while the outage lasts.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    /// The next wait (jittered); each call doubles the nominal delay up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jittered(nominal(self.min, self.max, self.failures))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

fn nominal(base: Duration, cap: Duration, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    base.saturating_mul(1u32 << exp.min(31)).min(cap)
}

fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_until_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.nominal_delay(1), Duration::from_secs(1));
        assert_eq!(p.nominal_delay(2), Duration::from_secs(2));
        assert_eq!(p.nominal_delay(5), Duration::from_secs(16));
        assert_eq!(p.nominal_delay(9), Duration::from_secs(256));
        assert_eq!(p.nominal_delay(10), Duration::from_secs(300));
        assert_eq!(p.nominal_delay(1000), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        let p = RetryPolicy::default();
        for failures in 1..8 {
            let nominal = p.nominal_delay(failures);
            for _ in 0..100 {
                let d = p.delay(failures);
                assert!(d >= nominal / 2 && d <= nominal, "{d:?} vs {nominal:?}");
            }
        }
    }

    #[test]
    fn exhausted_after_max_attempts() {
        let p = RetryPolicy::default();
        assert!(!p.exhausted(4));
        assert!(p.exhausted(5));
    }

    #[test]
    fn outage_backoff_grows_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(100));
        for _ in 0..10 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_secs(1) && late <= Duration::from_secs(2));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
