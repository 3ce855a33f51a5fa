use std::time::Duration;

use rand::{RngExt, SeedableRng, rngs::SmallRng};

use super::*;

const MS: Duration = Duration::from_millis(1);

fn millis(delays: impl Iterator<Item = Duration>) -> Vec<u128> {
    delays.map(|d| d.as_millis()).collect()
}

#[test]
fn no_jitter_doubles_from_base_to_the_cap() {
    let backoff = ExponentialBackoff::new(25 * MS, 1000 * MS).jitter(Jitter::None);
    assert_eq!(
        millis(backoff.iter().take(8)),
        [25, 50, 100, 200, 400, 800, 1000, 1000]
    );
}

#[test]
fn factor_changes_the_growth() {
    let backoff = ExponentialBackoff::new(10 * MS, 10_000 * MS)
        .factor(3.0)
        .jitter(Jitter::None);
    assert_eq!(millis(backoff.iter().take(4)), [10, 30, 90, 270]);
    let flat = ExponentialBackoff::new(10 * MS, 100 * MS)
        .factor(0.5)
        .jitter(Jitter::None);
    assert_eq!(
        millis(flat.iter().take(3)),
        [10, 10, 10],
        "factors below 1 mean constant"
    );
}

#[test]
fn max_attempts_and_max_elapsed_end_the_schedule() {
    let by_count = ExponentialBackoff::new(MS, 10 * MS)
        .jitter(Jitter::None)
        .max_attempts(3);
    assert_eq!(by_count.iter().count(), 3);

    let by_time = ExponentialBackoff::new(100 * MS, 1000 * MS)
        .jitter(Jitter::None)
        .max_elapsed(1000 * MS);
    // 100 + 200 + 400 = 700, then the 800 is cut to the 300 that is left.
    assert_eq!(millis(by_time.iter()), [100, 200, 400, 300]);
}

#[test]
fn fast_phase_comes_first_then_the_exponential_starts_at_base() {
    let backoff = ExponentialBackoff::new(50 * MS, 1000 * MS)
        .jitter(Jitter::None)
        .fast_phase(25 * MS, 100 * MS);
    assert_eq!(
        millis(backoff.iter().take(8)),
        [25, 25, 25, 25, 50, 100, 200, 400]
    );
}

#[test]
fn a_seed_repeats_the_schedule_exactly_and_another_seed_differs() {
    for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
        let backoff = ExponentialBackoff::new(10 * MS, 5000 * MS).jitter(jitter);
        let a: Vec<_> = backoff.clone().seed(7).iter().take(20).collect();
        let b: Vec<_> = backoff.clone().seed(7).iter().take(20).collect();
        let c: Vec<_> = backoff.clone().seed(8).iter().take(20).collect();
        assert_eq!(a, b, "{jitter:?}");
        assert_ne!(a, c, "{jitter:?}");
    }
}

#[test]
fn unseeded_schedules_differ_between_clients() {
    let backoff = ExponentialBackoff::new(10 * MS, 5000 * MS);
    let a: Vec<_> = backoff.iter().take(10).collect();
    let b: Vec<_> = backoff.iter().take(10).collect();
    assert_ne!(a, b, "two clients must not retry in lockstep");
}

/// The exponential delay of attempt `n` (counted from the end of any fast phase).
fn expected(base: Duration, factor: f64, max: Duration, n: i32) -> Duration {
    Duration::from_secs_f64((base.as_secs_f64() * factor.powi(n)).min(max.as_secs_f64()))
}

#[test]
fn property_every_delay_stays_within_its_bounds_for_every_strategy() {
    let mut rng = SmallRng::seed_from_u64(0xBAC0FF);
    for case in 0..4000 {
        let base = Duration::from_micros(rng.random_range(1..200_000));
        let max = base + Duration::from_micros(rng.random_range(0..5_000_000));
        let factor = [1.0, 1.5, 2.0, 3.0][rng.random_range(0..4)];
        let jitter = [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ][rng.random_range(0..4)];
        let mut backoff = ExponentialBackoff::new(base, max)
            .factor(factor)
            .jitter(jitter)
            .seed(rng.random());
        let max_attempts = rng.random_range(0..40u32);
        let max_elapsed = Duration::from_micros(rng.random_range(0..20_000_000));
        let limit_count = rng.random_bool(0.5);
        let limit_time = rng.random_bool(0.5);
        if limit_count {
            backoff = backoff.max_attempts(max_attempts);
        }
        if limit_time {
            backoff = backoff.max_elapsed(max_elapsed);
        }
        let fast = rng.random_bool(0.3).then(|| {
            (
                Duration::from_micros(rng.random_range(1..50_000)),
                Duration::from_micros(rng.random_range(0..2_000_000)),
            )
        });
        if let Some((interval, duration)) = fast {
            backoff = backoff.fast_phase(interval, duration);
        }

        let mut total = Duration::ZERO;
        let mut previous = base;
        let mut exponential_n = 0;
        let mut count = 0u32;
        for delay in backoff.iter().take(60) {
            let cut = limit_time && total + delay >= max_elapsed;
            let in_fast = fast.is_some_and(|(_, duration)| total < duration);
            let ok = if cut {
                true // the last delay may be shortened to fit max_elapsed
            } else if let (true, Some((interval, _))) = (in_fast, fast) {
                match jitter {
                    Jitter::None => delay == interval,
                    _ => delay >= interval / 2 && delay <= interval,
                }
            } else {
                let d = expected(base, factor, max, exponential_n);
                exponential_n += 1;
                match jitter {
                    Jitter::None => delay == d,
                    Jitter::Full => delay <= d,
                    Jitter::Equal => delay >= d / 2 && delay <= d,
                    Jitter::Decorrelated => {
                        let within = delay >= base && delay <= max && delay <= previous * 3;
                        previous = delay;
                        within
                    }
                }
            };
            assert!(
                ok,
                "case {case}: delay {delay:?} out of bounds ({jitter:?}, base {base:?}, max {max:?}, factor {factor}, fast {fast:?})"
            );
            assert!(
                delay <= max.max(fast.map_or(Duration::ZERO, |f| f.0)),
                "case {case}: above the cap"
            );
            total += delay;
            count += 1;
        }
        if limit_time {
            assert!(
                total <= max_elapsed,
                "case {case}: {total:?} > {max_elapsed:?}"
            );
        }
        if limit_count {
            assert!(count <= max_attempts, "case {case}");
        }
    }
}
