use std::sync::atomic::{AtomicI64, Ordering};

/// Milli-tokens per token.
const SCALE: i64 = 1000;

/// Bounds retries to a share of the traffic, so an outage is not multiplied by the retry
/// count: every request deposits `ratio` of a token (up to `burst` tokens), every retry
/// withdraws a whole one. A client that has been quiet still has `burst` retries ready.
///
/// Unlike tower's `TpsBudget` it reads no clock: the healthy path is one atomic load once
/// the bucket is full.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: AtomicI64,
    deposit: i64,
    cap: i64,
}

impl RetryBudget {
    /// Allows retries for `ratio` of the requests (0.2: one retry per five requests) plus a
    /// reserve of `burst` retries.
    pub fn new(ratio: f64, burst: u32) -> Self {
        let cap = i64::from(burst) * SCALE;
        RetryBudget {
            tokens: AtomicI64::new(cap),
            deposit: (ratio.clamp(0.0, 1000.0) * SCALE as f64) as i64,
            cap,
        }
    }

    /// A budget with this one's ratio and reserve, full.
    pub(crate) fn like_new(&self) -> Self {
        RetryBudget {
            tokens: AtomicI64::new(self.cap),
            deposit: self.deposit,
            cap: self.cap,
        }
    }

    /// A request was made.
    pub fn deposit(&self) {
        if self.tokens.load(Ordering::Relaxed) >= self.cap {
            return;
        }
        let after = self.tokens.fetch_add(self.deposit, Ordering::Relaxed) + self.deposit;
        if after > self.cap {
            // Trim the overshoot; a racing withdraw only makes this conservative.
            self.tokens.fetch_sub(after - self.cap, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        self.tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                (tokens >= SCALE).then_some(tokens - SCALE)
            })
            .is_ok()
    }

    /// Whole retries available now.
    pub fn available(&self) -> u64 {
        (self.tokens.load(Ordering::Relaxed).max(0) / SCALE) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_available_at_once_then_requests_refill_it() {
        let budget = RetryBudget::new(0.25, 2);
        assert!(budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw(), "burst spent");
        for _ in 0..3 {
            budget.deposit();
        }
        assert!(!budget.withdraw(), "three requests earn 0.75 of a retry");
        budget.deposit();
        assert!(budget.withdraw(), "the fourth completes one");
        assert!(!budget.withdraw());
    }

    #[test]
    fn deposits_stop_at_the_cap() {
        let budget = RetryBudget::new(1.0, 3);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 3);
    }
}
