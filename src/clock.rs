//! One clock reading for every layer that finishes a call in the same poll.
//!
//! When a call completes, the breaker (is it slow?), the metrics layer (its latency) and
//! the trace layer (its slow warning) each want the time. They finish in the same poll of
//! the outermost future, nanoseconds apart, so the first reading inside a
//! [`shared`] scope is reused by the others: one `clock_gettime` instead of one per layer
//! (each ~25 ns on a VM, a large share of a stack's own cost). Outside a scope [`now`]
//! reads the clock. A reading never outlives the outermost scope, so one poll's instant is
//! never reused in the next. It is tokio's clock, so `tokio::time::pause` governs it.

use std::cell::Cell;

use tokio::time::Instant;

thread_local! {
    /// How many [`shared`] scopes are open on this thread.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The reading shared inside the outermost open scope.
    static READING: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time now: the reading already taken inside the open scope, or a fresh one.
#[inline]
pub(crate) fn now() -> Instant {
    if DEPTH.get() == 0 {
        return Instant::now();
    }
    READING.get().unwrap_or_else(|| {
        let now = Instant::now();
        READING.set(Some(now));
        now
    })
}

/// Runs `f` (a poll of inner futures and what follows it) in a scope where [`now`]
/// answers one reading.
#[inline]
pub(crate) fn shared<R>(f: impl FnOnce() -> R) -> R {
    /// Closes the scope even if `f` unwinds.
    struct Scope;
    impl Drop for Scope {
        #[inline]
        fn drop(&mut self) {
            let depth = DEPTH.get().saturating_sub(1);
            DEPTH.set(depth);
            if depth == 0 {
                READING.set(None);
            }
        }
    }
    DEPTH.set(DEPTH.get().saturating_add(1));
    let _scope = Scope;
    f()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Makes sure the clock has moved on: equal readings then prove sharing.
    fn let_time_pass() {
        std::thread::sleep(Duration::from_millis(1));
    }

    #[test]
    fn a_scope_answers_one_reading_and_forgets_it_when_it_closes() {
        let first = shared(|| {
            let first = now();
            let_time_pass();
            assert_eq!(now(), first);
            assert_eq!(
                shared(now),
                first,
                "a nested scope shares the outer reading"
            );
            first
        });
        let_time_pass();
        assert!(shared(now) > first, "a new scope reads the clock again");
        let outside = now();
        let_time_pass();
        assert!(
            now() > outside,
            "outside a scope every call reads the clock"
        );
    }

    #[test]
    fn a_scope_closes_when_its_closure_panics() {
        let unwound = std::panic::catch_unwind(|| {
            shared(|| {
                now();
                panic!("inner poll")
            })
        });
        assert!(unwound.is_err());
        let outside = now();
        let_time_pass();
        assert!(now() > outside);
    }
}
