//! Shared state that every call's future keeps alive, without a counter shared by all
//! threads.
//!
//! A future that records its outcome in a layer's state (the breaker's window, the
//! metrics registry, the timer table) must keep that state alive: the layer may be dropped
//! while a call is in flight. An `Arc` clone per call does it, but every clone and drop
//! writes the one reference count, and two threads calling at once pass its cache line
//! back and forth (~40 ns per call on the 2-core machines here, as much as the whole
//! breaker costs alone).
//!
//! [`Leased`] keeps one count per shard instead, each on its own cache lines, and a thread
//! always counts on the same shard, so the counts threads write are their own. The
//! services hold the [`Leased`] owner (in an `Arc`: cloning a service is rare); a call
//! takes a [`Lease`]. When the owner goes, it seals every shard, sums what they still
//! count, and from then on the leases count down one total; the last one out frees the
//! state. This is the per-CPU reference count of the Linux kernel (`percpu_ref`), with
//! each shard's seal bit doing the work of its RCU grace period.

use std::{
    cell::Cell,
    fmt,
    num::NonZeroUsize,
    ops::Deref,
    ptr::NonNull,
    sync::atomic::{AtomicUsize, Ordering::*, fence},
};

use super::Padded;

/// Shards: more than the threads that call at once on the machines this runs on, so two
/// threads rarely share one; 16 × 128 bytes per leased value.
pub(crate) const SHARDS: usize = 16;

/// Set in a shard's count when the owner has gone: its leases count down `remaining`.
const SEALED: usize = 1 << (usize::BITS - 1);

/// What `remaining` starts at: far above any count of leases, so it cannot reach zero
/// while the owner is still sealing the shards.
const BIAS: usize = SEALED >> 1;

// Leases keep their shard's index in the low bits of the address.
const _: () = assert!(SHARDS <= align_of::<Padded<AtomicUsize>>());

struct Inner<T> {
    shards: [Padded<AtomicUsize>; SHARDS],
    /// Leases outstanding once sealed, plus `BIAS` until the owner has counted them.
    remaining: AtomicUsize,
    value: T,
}

/// The owner of a value that calls lease: the value lives until the owner and every
/// lease are gone. Not `Clone`; share it in an `Arc`.
pub(crate) struct Leased<T> {
    inner: NonNull<Inner<T>>,
}

/// A counted borrow of a [`Leased`] value, for one call's future: one word, as an `Arc`,
/// since every layer's future carries one and the futures are moved whole.
pub(crate) struct Lease<T> {
    /// The address of `Inner`, whose alignment (128) leaves the low bits free, with the
    /// shard's index in them.
    tagged: NonNull<Inner<T>>,
}

// SAFETY: both give shared access to `T` from any thread and may drop it on any thread,
// the bounds `Arc<T>` has for the same reasons.
unsafe impl<T: Send + Sync> Send for Leased<T> {}
unsafe impl<T: Send + Sync> Sync for Leased<T> {}
unsafe impl<T: Send + Sync> Send for Lease<T> {}
unsafe impl<T: Send + Sync> Sync for Lease<T> {}

impl<T> Leased<T> {
    pub(crate) fn new(value: T) -> Self {
        let inner = Box::new(Inner {
            shards: std::array::from_fn(|_| Padded(AtomicUsize::new(0))),
            remaining: AtomicUsize::new(BIAS),
            value,
        });
        Leased {
            inner: NonNull::from(Box::leak(inner)),
        }
    }

    /// A lease for a call: one count on this thread's shard.
    #[inline]
    pub(crate) fn lease(&self) -> Lease<T> {
        // The owner is alive, so no shard is sealed: the count lands where `drop` (of the
        // owner) will find it.
        Lease::on_shard(self.inner, shard())
    }
}

impl<T> Lease<T> {
    /// Counts a new lease on `shard`. The value must be alive: a lease or the owner is.
    #[inline]
    fn on_shard(inner: NonNull<Inner<T>>, shard: usize) -> Self {
        // SAFETY: the caller holds the owner or a lease, so `inner` is alive.
        let shards = unsafe { &inner.as_ref().shards };
        // Relaxed, as `Arc::clone`: a new count needs no ordering, the holder already
        // sees the value.
        if shards[shard].fetch_add(1, Relaxed) & SEALED != 0 {
            // The owner had sealed this shard before: it did not count this one, so it
            // counts on the total its drop will count down.
            // SAFETY: as above.
            unsafe { inner.as_ref() }.remaining.fetch_add(1, Relaxed);
        }
        Lease {
            tagged: inner.map_addr(|address| address | shard),
        }
    }

    #[inline]
    fn inner(&self) -> NonNull<Inner<T>> {
        self.tagged.map_addr(|address| {
            // SAFETY: `Inner`'s address with the shard bits cleared: aligned, not zero.
            unsafe { NonZeroUsize::new_unchecked(address.get() & !(SHARDS - 1)) }
        })
    }

    #[inline]
    fn shard(&self) -> usize {
        self.tagged.addr().get() & (SHARDS - 1)
    }
}

impl<T> Clone for Lease<T> {
    fn clone(&self) -> Self {
        Lease::on_shard(self.inner(), shard())
    }
}

impl<T> Deref for Leased<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the owner keeps the value alive.
        unsafe { &self.inner.as_ref().value }
    }
}

impl<T> Deref for Lease<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the lease keeps the value alive.
        unsafe { &self.inner().as_ref().value }
    }
}

impl<T> Drop for Lease<T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: this lease keeps `inner` alive until the end of this function.
        let inner = unsafe { self.inner().as_ref() };
        // Release: this lease's uses of the value happen before whoever frees it, which
        // reads this shard (sealing it) or `remaining` with acquire.
        if inner.shards[self.shard()].fetch_sub(1, Release) & SEALED != 0 {
            self.drop_sealed();
        }
    }
}

impl<T> Lease<T> {
    /// The owner is gone and counted this lease in `remaining`.
    #[cold]
    #[inline(never)]
    fn drop_sealed(&self) {
        let pointer = self.inner();
        // SAFETY: this lease still keeps `inner` alive.
        if unsafe { pointer.as_ref() }.remaining.fetch_sub(1, Release) == 1 {
            // SAFETY: the count was the last one: nothing else refers to `inner`.
            unsafe { free(pointer) }
        }
    }
}

impl<T> Drop for Leased<T> {
    fn drop(&mut self) {
        // SAFETY: the owner keeps `inner` alive until the end of this function.
        let inner = unsafe { self.inner.as_ref() };
        // Seal each shard, taking the leases it counts at that moment. A lease dropped
        // before its shard is sealed counted down the shard; one dropped after counts
        // down `remaining`, which cannot reach zero before the line below (it holds
        // `BIAS`). Acquire: see the uses of the value by leases already dropped.
        let leases: usize = inner
            .shards
            .iter()
            .map(|shard| shard.fetch_or(SEALED, Acquire) & !SEALED)
            .sum();
        // Swap the bias for the leases counted; zero means none is left to free it.
        if inner.remaining.fetch_sub(BIAS - leases, Release) == BIAS - leases {
            // SAFETY: no lease is left and the owner is going.
            unsafe { free(self.inner) }
        }
    }
}

/// Frees the leased value.
///
/// # Safety
/// `inner` came from [`Leased::new`], and neither its owner nor any lease will use it
/// again.
unsafe fn free<T>(inner: NonNull<Inner<T>>) {
    // Acquire: every use of the value by the owner and the leases happens before the
    // drop; their count-downs released them.
    fence(Acquire);
    // SAFETY: allocated by `Box` in `Leased::new`; the caller says it is unused now.
    drop(unsafe { Box::from_raw(inner.as_ptr()) });
}

impl<T: fmt::Debug> fmt::Debug for Leased<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<T: fmt::Debug> fmt::Debug for Lease<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// This thread's shard, below [`SHARDS`]: given out in turn to threads as they first ask,
/// so the few threads of a runtime each get one of their own.
#[inline]
pub(crate) fn shard() -> usize {
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // A thread-local without a destructor is always accessible; 0 is never wrong anyway.
    SHARD
        .try_with(|shard| {
            let mut index = shard.get();
            if index >= SHARDS {
                index = NEXT.fetch_add(1, Relaxed) % SHARDS;
                shard.set(index);
            }
            index
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    /// Counts its drops, so a test sees that the value is dropped exactly once.
    struct Tracked(Arc<AtomicUsize>);

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn tracked() -> (Leased<Tracked>, Arc<AtomicUsize>) {
        let drops = Arc::new(AtomicUsize::new(0));
        (Leased::new(Tracked(drops.clone())), drops)
    }

    #[test]
    fn the_value_is_dropped_with_the_owner_when_no_lease_is_out() {
        let (owner, drops) = tracked();
        drop(owner.lease());
        assert_eq!(drops.load(SeqCst), 0);
        drop(owner);
        assert_eq!(drops.load(SeqCst), 1);
    }

    #[test]
    fn a_lease_keeps_the_value_alive_after_the_owner_is_gone() {
        let (owner, drops) = tracked();
        let first = owner.lease();
        let second = owner.lease();
        drop(owner);
        assert_eq!(drops.load(SeqCst), 0);
        let third = first.clone();
        drop(first);
        drop(second);
        assert_eq!(drops.load(SeqCst), 0);
        assert!(Arc::ptr_eq(&third.0, &drops));
        drop(third);
        assert_eq!(drops.load(SeqCst), 1);
    }

    #[test]
    fn leases_taken_and_dropped_on_other_threads_free_the_value_once() {
        let threads = 4;
        for round in 0..20 {
            let (owner, drops) = tracked();
            let mut owner = Some(Arc::new(owner));
            let start = Arc::new(Barrier::new(threads + 1));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let owner = owner.clone();
                    let start = start.clone();
                    std::thread::spawn(move || {
                        let mut leases: Vec<_> =
                            (0..50).map(|_| owner.as_ref().map(|o| o.lease())).collect();
                        drop(owner);
                        start.wait();
                        // Cloned while the last owner may be sealing the shards.
                        let clones: Vec<_> = leases.iter().map(Clone::clone).collect();
                        leases.extend(clones);
                        leases.into_iter().flatten().collect::<Vec<_>>()
                    })
                })
                .collect();
            start.wait();
            if round % 2 == 0 {
                owner = None;
            }
            let mut leases: Vec<Vec<Lease<Tracked>>> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            drop(owner);
            assert_eq!(drops.load(SeqCst), 0, "round {round}: freed under leases");
            let last = leases[0].pop().unwrap();
            // Dropped on other threads than the ones that took them.
            std::thread::scope(|scope| {
                for batch in leases {
                    scope.spawn(move || drop(batch));
                }
            });
            assert_eq!(drops.load(SeqCst), 0, "round {round}: freed under a lease");
            drop(last);
            assert_eq!(drops.load(SeqCst), 1, "round {round}");
        }
    }
}
