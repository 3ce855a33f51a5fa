use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::Value;
use tower::{Service, util::BoxCloneSyncService};

use crate::{
    Error, Request, circuit_breaker::CircuitBreaker, fallback::Fallback, metrics::Metrics,
    reconnect::Reconnect, retry::Retry, timeout::Timeout, trace::Trace,
};

/// Every layer present, in the recommended order.
pub(super) type Full = Fallback<Metrics<Trace<CircuitBreaker<Timeout<Retry<Reconnect>>>>>>;

/// With layers removed: each optional layer is an `Either`, and the whole is boxed.
pub(super) type Custom = BoxCloneSyncService<Request, Value, Error>;

/// The stack a [`ResilientClient`](super::ResilientClient) holds: one nameable type
/// whatever layers it was built with.
///
/// With every layer present (the builder's default, whatever each layer's settings) it is
/// the concrete stack: a call allocates nothing and dispatches nothing. With layers
/// removed it is type-erased, at one allocation per call.
#[derive(Clone)]
pub struct ResilientStack {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Full(Full),
    Custom(Custom),
}

impl ResilientStack {
    pub(super) fn full(stack: Full) -> Self {
        ResilientStack {
            kind: Kind::Full(stack),
        }
    }

    pub(super) fn custom(stack: Custom) -> Self {
        ResilientStack {
            kind: Kind::Custom(stack),
        }
    }
}

impl Service<Request> for ResilientStack {
    type Response = Value;
    type Error = Error;
    type Future = ResilientFuture;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match &mut self.kind {
            Kind::Full(stack) => stack.poll_ready(cx),
            Kind::Custom(stack) => stack.poll_ready(cx),
        }
    }

    #[inline]
    fn call(&mut self, request: Request) -> ResilientFuture {
        let kind = match &mut self.kind {
            Kind::Full(stack) => FutureKind::Full(stack.call(request)),
            Kind::Custom(stack) => FutureKind::Custom(stack.call(request)),
        };
        ResilientFuture { kind }
    }
}

impl fmt::Debug for ResilientStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Full(_) => "every layer",
            Kind::Custom(_) => "layers removed, boxed",
        };
        f.debug_tuple("ResilientStack").field(&kind).finish()
    }
}

/// The future of [`ResilientStack`].
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResilientFuture {
    #[pin]
    kind: FutureKind,
}

/// The large variant is the common one, kept inline on purpose: boxing it is the
/// allocation per call this type exists to avoid.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = FutureProj)]
enum FutureKind {
    Full(#[pin] <Full as Service<Request>>::Future),
    Custom(#[pin] <Custom as Service<Request>>::Future),
}

impl Future for ResilientFuture {
    type Output = Result<Value, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureProj::Full(future) => future.poll(cx),
            FutureProj::Custom(future) => future.poll(cx),
        }
    }
}

impl fmt::Debug for ResilientFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientFuture").finish_non_exhaustive()
    }
}
