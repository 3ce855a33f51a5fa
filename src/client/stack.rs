use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::Value;
use tower::Service;

use crate::{
    Error, Request, circuit_breaker::CircuitBreaker, fallback::Fallback, metrics::Metrics,
    reconnect::Reconnect, retry::Retry, timeout::Timeout, trace::Trace,
};

/// Every layer, in the recommended order.
pub(super) type Full = Fallback<Metrics<Trace<CircuitBreaker<Timeout<Retry<Reconnect>>>>>>;

/// The stack a [`ResilientClient`](super::ResilientClient) holds: one nameable type
/// whatever layers it was built with.
///
/// It is always the concrete stack: a layer removed in the builder is there switched off
/// (it passes calls through), so a call allocates nothing and dispatches nothing, and
/// removing a layer never makes calls dearer than keeping it.
#[derive(Clone)]
pub struct ResilientStack {
    stack: Full,
}

impl ResilientStack {
    pub(super) fn new(stack: Full) -> Self {
        ResilientStack { stack }
    }
}

impl Service<Request> for ResilientStack {
    type Response = Value;
    type Error = Error;
    type Future = ResilientFuture;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.stack.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> ResilientFuture {
        ResilientFuture {
            inner: self.stack.call(request),
        }
    }
}

impl fmt::Debug for ResilientStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientStack").finish_non_exhaustive()
    }
}

/// The future of [`ResilientStack`].
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResilientFuture {
    #[pin]
    inner: <Full as Service<Request>>::Future,
}

impl Future for ResilientFuture {
    type Output = Result<Value, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl fmt::Debug for ResilientFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientFuture").finish_non_exhaustive()
    }
}
