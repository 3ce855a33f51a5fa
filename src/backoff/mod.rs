//! Exponential backoff with jitter, as an iterator of delays.

use std::{
    hash::{BuildHasher, RandomState},
    time::Duration,
};

use rand::{RngExt, SeedableRng, rngs::SmallRng};

/// How a delay is randomised, following AWS's "Exponential Backoff And Jitter": with `d`
/// the exponential delay of the attempt,
///
/// | jitter | delay |
/// |--------|-------|
/// | `None` | `d` |
/// | `Full` | `U(0, d)` |
/// | `Equal` | `d/2 + U(0, d/2)` |
/// | `Decorrelated` | `min(max, U(base, previous * 3))` |
///
/// Jitter keeps many clients that lost Redis at the same moment from retrying in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly the exponential delay.
    None,
    /// Uniform between zero and the exponential delay: spreads clients the most.
    Full,
    /// Half the delay plus a uniform half: never retries much sooner than planned.
    Equal,
    /// Each delay drawn from `base` to three times the previous one, capped at `max`.
    Decorrelated,
}

/// A schedule of delays: `base * factor^n`, capped at `max`, randomised by [`Jitter`],
/// ending after `max_attempts` delays or once the delays add up to `max_elapsed`.
///
/// An optional fast phase comes first: a fixed short interval for the first stretch of an
/// outage, so that a restart or failover of a second or two is noticed within tens of
/// milliseconds, before the schedule slows down to spare a server that stays down.
///
/// "Elapsed" is the sum of the delays handed out, so a schedule is a pure function of its
/// settings and seed: [`seed`](Self::seed) makes it exact for tests.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::backoff::{ExponentialBackoff, Jitter};
///
/// let backoff = ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1))
///     .jitter(Jitter::None)
///     .max_attempts(5);
/// let delays: Vec<u64> = backoff.iter().map(|d| d.as_millis() as u64).collect();
/// assert_eq!(delays, [100, 200, 400, 800, 1000]);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct ExponentialBackoff {
    base: Duration,
    factor: f64,
    max: Duration,
    max_attempts: Option<u32>,
    max_elapsed: Option<Duration>,
    jitter: Jitter,
    fast_phase: Option<(Duration, Duration)>,
    seed: Option<u64>,
}

impl ExponentialBackoff {
    /// Doubles from `base` up to `max`, with [`Jitter::Full`], forever. A `max` below
    /// `base` is raised to `base`.
    pub fn new(base: Duration, max: Duration) -> Self {
        ExponentialBackoff {
            base,
            factor: 2.0,
            max: max.max(base),
            max_attempts: None,
            max_elapsed: None,
            jitter: Jitter::Full,
            fast_phase: None,
            seed: None,
        }
    }

    /// The growth per attempt; values below 1 (or not finite) are taken as 1.
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() && factor >= 1.0 {
            factor
        } else {
            1.0
        };
        self
    }

    /// Ends the schedule after this many delays.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Ends the schedule once its delays add up to this; the last delay is shortened so
    /// the total never exceeds it.
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.max_elapsed = Some(elapsed);
        self
    }

    /// How delays are randomised.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Waits `interval` between attempts until the delays add up to `duration`, then
    /// continues exponentially from `base`. Jitter other than `None` applies as `Equal`
    /// to the fast interval.
    pub fn fast_phase(mut self, interval: Duration, duration: Duration) -> Self {
        self.fast_phase = Some((interval, duration));
        self
    }

    /// Seeds the random numbers, for schedules that repeat exactly.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The first exponential delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap on every delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// A fresh schedule.
    pub fn iter(&self) -> Delays {
        let seed = self
            .seed
            .unwrap_or_else(|| RandomState::new().hash_one(std::time::SystemTime::now()));
        Delays {
            config: self.clone(),
            attempt: 0,
            exponential_attempt: 0,
            elapsed: Duration::ZERO,
            previous: self.base,
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl IntoIterator for &ExponentialBackoff {
    type Item = Duration;
    type IntoIter = Delays;

    fn into_iter(self) -> Delays {
        self.iter()
    }
}

/// The delays of one [`ExponentialBackoff`] schedule.
#[derive(Debug, Clone)]
pub struct Delays {
    config: ExponentialBackoff,
    attempt: u32,
    exponential_attempt: i32,
    elapsed: Duration,
    previous: Duration,
    rng: SmallRng,
}

impl Delays {
    /// How many delays were handed out.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The sum of the delays handed out.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    fn uniform(&mut self, low: Duration, high: Duration) -> Duration {
        if high <= low {
            return low;
        }
        let span = (high - low).as_nanos().min(u64::MAX as u128) as u64;
        low + Duration::from_nanos(self.rng.random_range(0..=span))
    }

    fn exponential(&mut self) -> Duration {
        let c = &self.config;
        let grown = c.base.as_secs_f64() * c.factor.powi(self.exponential_attempt);
        self.exponential_attempt = self.exponential_attempt.saturating_add(1);
        // `min` first: the growth may overflow to infinity.
        Duration::from_secs_f64(grown.min(c.max.as_secs_f64()))
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let c = &self.config;
        if c.max_attempts.is_some_and(|max| self.attempt >= max)
            || c.max_elapsed.is_some_and(|max| self.elapsed >= max)
        {
            return None;
        }
        let jitter = c.jitter;
        let (base, max) = (c.base, c.max);
        let delay = match c.fast_phase {
            Some((interval, duration)) if self.elapsed < duration => match jitter {
                Jitter::None => interval,
                _ => self.uniform(interval / 2, interval),
            },
            _ => {
                let d = self.exponential();
                match jitter {
                    Jitter::None => d,
                    Jitter::Full => self.uniform(Duration::ZERO, d),
                    Jitter::Equal => self.uniform(d / 2, d),
                    Jitter::Decorrelated => {
                        let high = self.previous.saturating_mul(3).min(max);
                        let next = self.uniform(base, high);
                        self.previous = next;
                        next
                    }
                }
            }
        };
        let delay = match self.config.max_elapsed {
            Some(max) => delay.min(max - self.elapsed),
            None => delay,
        };
        self.attempt += 1;
        self.elapsed += delay;
        Some(delay)
    }
}

#[cfg(test)]
mod tests;
