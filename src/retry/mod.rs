//! Retrying calls that are safe to send again, within a budget.

mod budget;
mod future;

pub use budget::RetryBudget;
pub use future::ResponseFuture;

use std::{
    fmt,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use redis::Value;
use tower::{Layer, Service};

use crate::{Error, Request, backoff::ExponentialBackoff, sync::Leased};

/// What the services of one `layer` call share, leased by each call's future: one lease
/// gives it both the settings and the spare inner service it clones to retry.
struct Shared<S> {
    /// Cloned by calls that retry. In a mutex only so that a service that is `Send` but
    /// not `Sync` still makes `Send` futures; it is locked only to retry.
    spare: Mutex<S>,
    settings: Arc<Settings>,
}

/// Retries calls that failed as [unavailable](Error::is_unavailable) when sending them
/// again is safe: the command is idempotent (`GET`, `SET`, `DEL`...), or the error proves
/// Redis did not run it ([`may_have_run`](Error::may_have_run) is false: reconnecting,
/// refused, `TRYAGAIN`). An `INCR` whose connection broke after it was sent is never sent
/// again. Timeouts, server errors, configuration errors and open circuits are never
/// retried, nor are the refusals that last seconds (`LOADING`, `BUSY`, `MASTERDOWN`,
/// `CLUSTERDOWN`), nor calls refused while the connection is out of use for a `PING` to
/// ask whether it is stuck (`ConnectionState::Suspect`): a resend a few milliseconds
/// later would only be refused again, and the caller (a read's fallback) gets its answer
/// at once instead.
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
#[derive(Clone)]
#[must_use]
pub struct RetryLayer {
    settings: Arc<Settings>,
}

pub(crate) struct Settings {
    max_retries: u32,
    backoff: ExponentialBackoff,
    budget: RetryBudget,
    /// Resend writes whose reply counts what they changed after an ambiguous failure.
    resend_counting: bool,
    /// False for a layer that stands in for a removed one: calls pass through, with
    /// nothing kept to retry them and nothing paid into the budget.
    on: bool,
}

impl Settings {
    /// Whether a failed call may be sent again (and takes a retry from the budget if so).
    fn allows_retry(&self, request: &Request, error: &Error, retries: u32) -> bool {
        let info = request.info();
        error.is_unavailable()
            && !error.is_lasting_refusal()
            && !error.is_suspect()
            && (!error.may_have_run()
                || (info.is_idempotent() && (self.resend_counting || !info.reply_counts_changes())))
            && retries < self.max_retries
            && self.budget.withdraw()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer {
            settings: Arc::new(Settings::default()),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_retries: 2,
            backoff: ExponentialBackoff::new(Duration::from_millis(10), Duration::from_millis(100)),
            budget: RetryBudget::new(0.2, 10),
            resend_counting: true,
            on: true,
        }
    }
}

impl RetryLayer {
    /// At most `max_retries` retries per call, `backoff` between them, within `budget`.
    pub fn new(max_retries: u32, backoff: ExponentialBackoff, budget: RetryBudget) -> Self {
        RetryLayer {
            settings: Arc::new(Settings {
                max_retries,
                backoff,
                budget,
                resend_counting: true,
                on: true,
            }),
        }
    }

    /// Whether a write whose reply counts what it changed (`DEL`, `SADD`, `HSET`...: see
    /// [`CommandInfo::reply_counts_changes`](crate::CommandInfo::reply_counts_changes)) is
    /// sent again after a failure that may have come after Redis ran it. Default `true`:
    /// the data ends the same either way (a `DEL` meant to invalidate a cache entry gets
    /// done), but a resend after the first one ran answers 0 where the first answered 1.
    /// Set `false` if the application reads those counts, to tell a first `SADD` of a
    /// message id from a repeat, say: such a call then fails as unavailable with
    /// [`may_have_run`](Error::may_have_run) true, as an `INCR` does.
    ///
    /// Call it on a layer just made: on one already cloned or wrapping services, it makes
    /// a layer of its own, with a retry budget of its own.
    ///
    /// ```
    /// use tower_redis_resilience::retry::RetryLayer;
    ///
    /// let retry = RetryLayer::default().resend_counting_writes(false);
    /// # let _ = retry;
    /// ```
    pub fn resend_counting_writes(mut self, resend: bool) -> Self {
        match Arc::get_mut(&mut self.settings) {
            Some(settings) => settings.resend_counting = resend,
            None => {
                let shared = &self.settings;
                self.settings = Arc::new(Settings {
                    max_retries: shared.max_retries,
                    backoff: shared.backoff.clone(),
                    budget: shared.budget.like_new(),
                    resend_counting: resend,
                    on: shared.on,
                });
            }
        }
        self
    }

    /// A layer that never retries: calls pass through. What the builder puts in place
    /// of a removed retry layer, so the stack keeps one type.
    pub(crate) fn off() -> Self {
        RetryLayer {
            settings: Arc::new(Settings {
                on: false,
                ..Settings::default()
            }),
        }
    }

    /// Retries left in the shared budget.
    pub fn budget_available(&self) -> u64 {
        self.settings.budget.available()
    }
}

impl<S: Clone> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            shared: Arc::new(Leased::new(Shared {
                spare: Mutex::new(inner.clone()),
                settings: self.settings.clone(),
            })),
            inner,
        }
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("max_retries", &self.settings.max_retries)
            .field("backoff", &self.settings.backoff)
            .field("resend_counting_writes", &self.settings.resend_counting)
            .field("budget_available", &self.budget_available())
            .finish()
    }
}

/// The service [`RetryLayer`] makes.
///
/// Unlike tower's generic `Retry`, the healthy path clones no service and arms no
/// timer: a call keeps the request (one reference count) and leases the settings and a
/// spare clone of the inner service, which it clones only if it retries; the backoff
/// sleep and schedule are allocated only when a retry happens.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Leased<Shared<S>>>,
}

impl<S> Service<Request> for Retry<S>
where
    S: Service<Request, Response = Value, Error = Error> + Clone,
{
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> ResponseFuture<S> {
        let settings = &self.shared.settings;
        if !settings.on {
            return ResponseFuture::new(self.inner.call(request), None);
        }
        settings.budget.deposit();
        let future = self.inner.call(request.clone());
        ResponseFuture::new(future, Some((request, self.shared.lease())))
    }
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
