//! The sliding windows: what the breaker remembers of recent calls, updated without a lock.

use std::{
    sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::*},
    time::Duration,
};

use tokio::time::Instant;

use super::config::SlidingWindow;
use crate::sync::Padded;

/// One recorded call: bit 0 set (recorded), bit 1 failed, bit 2 slow. Zero is an empty
/// slot.
pub(super) type Sample = u8;

pub(super) const RECORDED: Sample = 1;
pub(super) const FAILED: Sample = 2;
pub(super) const SLOW: Sample = 4;

/// The calls, failures and slow calls of a window (or of the half-open probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Counts {
    pub(super) calls: u64,
    pub(super) failures: u64,
    pub(super) slow: u64,
}

/// Three counts packed in one word, 21 bits each, so one atomic add updates all three.
/// A count window holds under 2^20 calls, so a field above that can only be a transient
/// borrow between two concurrent updates, and is read as "no answer yet".
#[derive(Debug, Default)]
pub(super) struct PackedCounts(AtomicU64);

const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const BORROWED: u64 = 1 << (FIELD_BITS - 1);

/// What adding a sample adds to the packed word.
const fn packed(sample: Sample) -> u64 {
    (sample & RECORDED) as u64
        | (((sample & FAILED) >> 1) as u64) << FIELD_BITS
        | (((sample & SLOW) >> 2) as u64) << (2 * FIELD_BITS)
}

impl PackedCounts {
    /// Replaces `old` by `new` and returns the counts after the change, if they are
    /// consistent.
    pub(super) fn replace(&self, old: Sample, new: Sample) -> Option<Counts> {
        let delta = packed(new).wrapping_sub(packed(old));
        let word = self.0.fetch_add(delta, Relaxed).wrapping_add(delta);
        unpack(word)
    }

    fn raw(&self) -> u64 {
        self.0.load(Relaxed)
    }

    pub(super) fn load(&self) -> Option<Counts> {
        unpack(self.0.load(Relaxed))
    }

    pub(super) fn clear(&self) {
        self.0.store(0, Relaxed);
    }
}

fn unpack(word: u64) -> Option<Counts> {
    let counts = Counts {
        calls: word & FIELD_MASK,
        failures: (word >> FIELD_BITS) & FIELD_MASK,
        slow: (word >> (2 * FIELD_BITS)) & FIELD_MASK,
    };
    let consistent =
        counts.calls < BORROWED && counts.failures <= counts.calls && counts.slow <= counts.calls;
    consistent.then_some(counts)
}

// One per breaker, read on every call: the padding is the point, a box would add a hop.
#[allow(clippy::large_enum_variant)]
pub(super) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(super) fn new(window: SlidingWindow, origin: Instant) -> Window {
        match window {
            SlidingWindow::Count(size) => Window::Count(CountWindow::new(size)),
            SlidingWindow::Time { length, buckets } => {
                Window::Time(TimeWindow::new(length, buckets, origin))
            }
        }
    }

    /// Records a call that finished at `now` (read here if the caller has no reading).
    /// Returns the window's counts if they changed.
    pub(super) fn record(&self, sample: Sample, now: Option<Instant>) -> Option<Counts> {
        match self {
            Window::Count(window) => window.record(sample),
            Window::Time(window) => window.record(sample, now.unwrap_or_else(Instant::now)),
        }
    }

    pub(super) fn counts(&self) -> Counts {
        match self {
            Window::Count(window) => window.counts(),
            Window::Time(window) => window.counts(Instant::now()),
        }
    }

    pub(super) fn clear(&self) {
        match self {
            Window::Count(window) => window.clear(),
            Window::Time(window) => window.clear(),
        }
    }

    /// The most calls the window can hold, where that is bounded.
    pub(super) fn capacity(&self) -> Option<u64> {
        match self {
            Window::Count(window) => Some(window.slots.len() as u64),
            Window::Time(_) => None,
        }
    }
}

/// The last `n` calls in a ring. A writer takes the next slot with one atomic add and
/// swaps its sample in; the counts change by the difference only when the sample differs
/// from the one it replaces. When every slot holds the same sample as the writer's, it
/// writes nothing at all.
pub(super) struct CountWindow {
    slots: Box<[AtomicU8]>,
    /// Wraps at 2^32: the ring then restarts one slot early, which only reorders which
    /// call is forgotten first.
    cursor: Padded<AtomicU32>,
    counts: Padded<PackedCounts>,
}

impl CountWindow {
    fn new(size: u32) -> CountWindow {
        CountWindow {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            cursor: Padded(AtomicU32::new(0)),
            counts: Padded(PackedCounts::default()),
        }
    }

    fn record(&self, sample: Sample) -> Option<Counts> {
        // A ring holding nothing but this sample stays the same whichever slot it goes
        // to, so the cursor need not move: a healthy breaker's calls write nothing shared.
        let uniform = packed(sample).wrapping_mul(self.slots.len() as u64);
        if self.counts.raw() == uniform {
            return None;
        }
        let index = self.cursor.fetch_add(1, Relaxed) % self.slots.len() as u32;
        let slot = &self.slots[index as usize];
        if slot.load(Relaxed) == sample {
            return None;
        }
        let old = slot.swap(sample, Relaxed);
        if old == sample {
            return None;
        }
        self.counts.replace(old, sample)
    }

    fn counts(&self) -> Counts {
        // A borrow lasts as long as two concurrent writers take; a few reads see past it.
        (0..16).find_map(|_| self.counts.load()).unwrap_or_default()
    }

    fn clear(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(0, Relaxed);
            if old != 0 {
                self.counts.replace(old, 0);
            }
        }
    }
}

/// The calls of the last `length`, in buckets of `length / buckets` that are reused as
/// time moves on. A bucket is tagged with the period it counts; the first writer of a new
/// period resets it.
pub(super) struct TimeWindow {
    buckets: Box<[Bucket]>,
    bucket_nanos: u64,
    origin: Instant,
}

#[derive(Default)]
struct Bucket {
    /// The period counted (its index plus one); 0 when empty, [`ROLLING`] while a writer
    /// resets it.
    period: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

const ROLLING: u64 = u64::MAX;

impl TimeWindow {
    fn new(length: Duration, buckets: u32, origin: Instant) -> TimeWindow {
        let nanos = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
        TimeWindow {
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            bucket_nanos: (nanos / u64::from(buckets)).max(1),
            origin,
        }
    }

    fn period(&self, now: Instant) -> u64 {
        let elapsed = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX - 1);
        elapsed / self.bucket_nanos + 1
    }

    fn record(&self, sample: Sample, now: Instant) -> Option<Counts> {
        let period = self.period(now);
        let bucket = &self.buckets[(period % self.buckets.len() as u64) as usize];
        let current = bucket.period.load(Acquire);
        if current != period {
            // Older than the bucket (a slow writer), or another writer is resetting it:
            // this one sample is dropped rather than waited for.
            if current > period
                || bucket
                    .period
                    .compare_exchange(current, ROLLING, Acquire, Relaxed)
                    .is_err()
            {
                return None;
            }
            bucket.calls.store(0, Relaxed);
            bucket.failures.store(0, Relaxed);
            bucket.slow.store(0, Relaxed);
            bucket.period.store(period, Release);
        }
        bucket.calls.fetch_add(1, Relaxed);
        if sample & FAILED != 0 {
            bucket.failures.fetch_add(1, Relaxed);
        }
        if sample & SLOW != 0 {
            bucket.slow.fetch_add(1, Relaxed);
        }
        Some(self.sum(period))
    }

    fn sum(&self, period: u64) -> Counts {
        // Periods start at 1, so an empty bucket (0) is never in range.
        let oldest = period.saturating_sub(self.buckets.len() as u64 - 1).max(1);
        let mut counts = Counts::default();
        for bucket in self.buckets.iter() {
            let counted = bucket.period.load(Acquire);
            if counted != ROLLING && counted >= oldest && counted <= period {
                counts.calls += bucket.calls.load(Relaxed);
                counts.failures += bucket.failures.load(Relaxed);
                counts.slow += bucket.slow.load(Relaxed);
            }
        }
        counts
    }

    fn counts(&self, now: Instant) -> Counts {
        self.sum(self.period(now))
    }

    fn clear(&self) {
        for bucket in self.buckets.iter() {
            let counted = bucket.period.load(Acquire);
            if counted != ROLLING {
                let _ = bucket.period.compare_exchange(counted, 0, AcqRel, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_counts_follow_replacements_and_reject_transient_borrows() {
        let counts = PackedCounts::default();
        counts.replace(0, RECORDED | FAILED);
        counts.replace(0, RECORDED | SLOW);
        assert_eq!(
            counts.replace(0, RECORDED),
            Some(Counts {
                calls: 3,
                failures: 1,
                slow: 1
            })
        );
        // Two writers replacing the same failure: the second one's subtraction lands
        // first, so the failure count dips below zero for a moment.
        let borrowed = counts.replace(RECORDED | FAILED, RECORDED);
        assert_eq!(
            borrowed,
            Some(Counts {
                calls: 3,
                failures: 0,
                slow: 1
            })
        );
        assert_eq!(counts.replace(RECORDED | FAILED, RECORDED), None);
        assert_eq!(
            counts.replace(RECORDED, RECORDED | FAILED),
            Some(Counts {
                calls: 3,
                failures: 0,
                slow: 1
            })
        );
    }

    #[test]
    fn count_window_forgets_the_oldest_call() {
        let window = CountWindow::new(3);
        window.record(RECORDED | FAILED);
        window.record(RECORDED);
        window.record(RECORDED);
        assert_eq!(window.counts().failures, 1);
        assert_eq!(
            window.record(RECORDED),
            Some(Counts {
                calls: 3,
                failures: 0,
                slow: 0
            })
        );
        // Same sample over the same sample: nothing changes, nothing to report.
        assert_eq!(window.record(RECORDED), None);
        window.clear();
        assert_eq!(window.counts(), Counts::default());
    }

    #[test]
    fn a_uniform_ring_keeps_exact_last_n_semantics_without_moving_the_cursor() {
        let window = CountWindow::new(3);
        for _ in 0..3 {
            window.record(RECORDED);
        }
        for _ in 0..5 {
            assert_eq!(window.record(RECORDED), None);
        }
        assert_eq!(window.cursor.load(Relaxed), 3, "nothing written");
        window.record(RECORDED | FAILED);
        window.record(RECORDED);
        window.record(RECORDED);
        assert_eq!(
            window.counts().failures,
            1,
            "the failure is one of the last 3 calls"
        );
        window.record(RECORDED);
        assert_eq!(window.counts().failures, 0, "and now it is not");
    }

    #[test]
    fn concurrent_writers_keep_the_counts_equal_to_the_ring() {
        let window = std::sync::Arc::new(CountWindow::new(7));
        let writers: Vec<_> = (0..4u8)
            .map(|writer| {
                let window = window.clone();
                std::thread::spawn(move || {
                    for i in 0..100_000u32 {
                        let sample = match (i * 7 + u32::from(writer)) % 5 {
                            0 => RECORDED | FAILED,
                            1 => RECORDED | SLOW,
                            2 => RECORDED | FAILED | SLOW,
                            _ => RECORDED,
                        };
                        window.record(sample);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let mut ring = Counts::default();
        for slot in window.slots.iter() {
            let sample = slot.load(Relaxed);
            ring.calls += u64::from(sample & RECORDED);
            ring.failures += u64::from((sample & FAILED) >> 1);
            ring.slow += u64::from((sample & SLOW) >> 2);
        }
        assert_eq!(ring.calls, 7);
        assert_eq!(window.counts.load(), Some(ring));
    }
}
