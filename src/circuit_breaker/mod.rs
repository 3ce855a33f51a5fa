//! Failing fast while Redis is down, and probing for its return.

mod config;
mod future;
mod layer;
mod shared;
mod window;

pub use config::{CancelPolicy, CircuitBreakerConfig, Outcome, SlidingWindow};
pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use redis::Value;
use tower::Service;

use self::{
    future::Call,
    shared::{Admission, Shared},
};
use crate::{Blocking, Error, Request, sync::Leased};

/// Where a circuit breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through and are recorded in the sliding window.
    Closed,
    /// Calls are rejected at once with a [circuit-open](Error::is_circuit_open) error
    /// until the wait ends or Redis reconnects.
    Open,
    /// A few probe calls go through; the rest are rejected until they decide.
    HalfOpen,
    /// Rejects every call until [`reset`](CircuitBreakerLayer::reset).
    ForcedOpen,
    /// Lets every call through and records nothing until
    /// [`reset`](CircuitBreakerLayer::reset).
    Disabled,
}

/// A change of [`BreakerState`], as given to
/// [`on_state_change`](CircuitBreakerConfig::on_state_change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
}

/// A snapshot of a breaker, for health endpoints and dashboards.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BreakerMetrics {
    /// The state now.
    pub state: BreakerState,
    /// Calls in the sliding window (cleared when the breaker closes).
    pub calls: u64,
    /// Of which failed.
    pub failed_calls: u64,
    /// Of which were slow.
    pub slow_calls: u64,
    /// Failed calls in percent, once the window holds
    /// [`minimum_calls`](CircuitBreakerConfig::minimum_calls).
    pub failure_rate: Option<f32>,
    /// Slow calls in percent, once the window holds `minimum_calls`.
    pub slow_call_rate: Option<f32>,
}

/// The service [`CircuitBreakerLayer`] makes: calls go to `inner` while the circuit is
/// closed, and are rejected without touching it while it is open.
///
/// A rejection is an immediately ready [circuit-open](Error::is_circuit_open) error from
/// `call` (`poll_ready` only forwards the inner service's readiness), carrying the time
/// until the next probe; it reads no clock and allocates nothing.
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Leased<Shared>>,
}

impl<S> Service<Request> for CircuitBreaker<S>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        let call = match self.shared.admit() {
            Admission::Record(ticket) => Some(Call::new(
                self.shared.lease(),
                ticket,
                request.info().blocking() != Blocking::No,
                request.start_if_read(),
            )),
            Admission::Pass => None,
            Admission::Reject(word) => {
                self.shared.keep_following();
                return ResponseFuture::rejected(
                    self.shared.rejection(word),
                    request.info().name(),
                );
            }
        };
        ResponseFuture::called(self.inner.call(request), call)
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.shared.state())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
