//! Retrying calls that are safe to send again, within a budget.

mod budget;

pub use budget::RetryBudget;

use std::{sync::Arc, time::Duration};

use redis::Value;
use tower::{Layer, retry::Policy};

use crate::{
    Error, Request,
    backoff::{Delays, ExponentialBackoff},
};

/// tower's retry middleware driven by [`RetryPolicy`].
pub type Retry<S> = tower::retry::Retry<RetryPolicy, S>;

/// Retries calls that failed as [unavailable](Error::is_unavailable) when sending them
/// again is safe: the command is idempotent (`GET`, `SET`, `DEL`...), or the error proves
/// Redis did not run it ([`may_have_run`](Error::may_have_run) is false: reconnecting,
/// refused, `LOADING`). An `INCR` whose connection broke after it was sent is never sent
/// again. Timeouts, server errors, configuration errors and open circuits are never
/// retried.
///
/// Retries wait a backoff step first (default 10 ms growing to 100 ms, full jitter, at
/// most 2 retries) and draw from a [`RetryBudget`] shared by every service this layer
/// makes (default: 20 % of requests plus a reserve of 10), so an outage is not amplified.
/// Put it under the deadline (`Timeout → Retry → Reconnect`) so the deadline covers the
/// retries.
///
/// ```no_run
/// use tower::ServiceBuilder;
/// use tower_redis_resilience::{Connector, reconnect::{Reconnect, ReconnectConfig}, retry::RetryLayer};
///
/// # async fn run() -> Result<(), tower_redis_resilience::Error> {
/// let redis = Reconnect::lazy(Connector::from_url("redis://127.0.0.1:6379")?, ReconnectConfig::new())?;
/// let stack = ServiceBuilder::new().layer(RetryLayer::default()).service(redis);
/// # let _ = stack; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryLayer {
    policy: RetryPolicy,
}

#[derive(Debug)]
struct Settings {
    max_retries: u32,
    backoff: ExponentialBackoff,
    budget: RetryBudget,
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new(
            2,
            ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(100)),
            RetryBudget::new(0.2, 10),
        )
    }
}

impl RetryLayer {
    /// At most `max_retries` retries per call, `backoff` between them, within `budget`.
    pub fn new(max_retries: u32, backoff: ExponentialBackoff, budget: RetryBudget) -> Self {
        RetryLayer {
            policy: RetryPolicy {
                settings: Arc::new(Settings {
                    max_retries,
                    backoff,
                    budget,
                }),
                retries: 0,
                delays: None,
            },
        }
    }

    /// Retries left in the shared budget.
    pub fn budget_available(&self) -> u64 {
        self.policy.settings.budget.available()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        tower::retry::Retry::new(self.policy.clone(), inner)
    }
}

/// The decision of [`RetryLayer`]; one copy per call carries that call's retry count.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    settings: Arc<Settings>,
    retries: u32,
    delays: Option<Delays>,
}

impl RetryPolicy {
    fn may_retry(request: &Request, error: &Error) -> bool {
        error.is_unavailable() && (!error.may_have_run() || request.info().is_idempotent())
    }
}

impl Policy<Request, Value, Error> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request,
        result: &mut Result<Value, Error>,
    ) -> Option<Self::Future> {
        let error = result.as_ref().err()?;
        if !RetryPolicy::may_retry(request, error)
            || self.retries >= self.settings.max_retries
            || !self.settings.budget.withdraw()
        {
            return None;
        }
        self.retries += 1;
        let settings = &self.settings;
        let delay = self
            .delays
            .get_or_insert_with(|| settings.backoff.iter())
            .next()?;
        tracing::debug!(command = request.info().name(), retry = self.retries, ?delay, %error, "retrying redis call");
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &Request) -> Option<Request> {
        // tower calls this on the service's own policy before each first send (where no
        // retry ever happened) and on the call's copy before each retry: only the first
        // earns the budget a deposit.
        if self.retries == 0 {
            self.settings.budget.deposit();
        }
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests;
