use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::Value;
use tokio::time::Instant;

use super::{
    config::{CancelPolicy, Outcome},
    shared::{Rejection, Shared, Ticket},
};
use crate::{
    Error, clock,
    sync::{self, Lease},
};

/// The future of [`CircuitBreaker`](super::CircuitBreaker).
#[pin_project(project = Proj)]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    kind: Kind<F>,
}

#[pin_project(project = KindProj)]
enum Kind<F> {
    Called {
        #[pin]
        future: F,
        /// `None` when the breaker is disabled.
        call: Option<Call>,
    },
    Rejected {
        /// Taken when answered.
        rejection: Option<(Rejection, &'static str)>,
    },
}

impl<F> ResponseFuture<F> {
    pub(super) fn called(future: F, call: Option<Call>) -> Self {
        ResponseFuture {
            kind: Kind::Called { future, call },
        }
    }

    pub(super) fn rejected(rejection: Rejection, command: &'static str) -> Self {
        ResponseFuture {
            kind: Kind::Rejected {
                rejection: Some((rejection, command)),
            },
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Value, Error>>,
{
    type Output = Result<Value, Error>;

    // Always inlined: a rejection is answered in a few instructions where the caller
    // polls, its error made in place; the called path is `poll_called`'s to inline or not.
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { future, call } => poll_called(future, call, cx),
            KindProj::Rejected { rejection } => {
                // An answer given without waiting takes its unit of the task's budget.
                std::task::ready!(sync::proceed(cx));
                Poll::Ready(Err(match rejection.take() {
                    Some((rejection, command)) => rejection.into_error().with_command(command),
                    None => Error::polled_after_completion(),
                }))
            }
        }
    }
}

#[inline]
fn poll_called<F>(
    future: Pin<&mut F>,
    call: &mut Option<Call>,
    cx: &mut Context<'_>,
) -> Poll<Result<Value, Error>>
where
    F: Future<Output = Result<Value, Error>>,
{
    clock::shared(|| match future.poll(cx) {
        Poll::Ready(result) => {
            if let Some(call) = call {
                call.finish(&result);
            }
            Poll::Ready(result)
        }
        Poll::Pending => {
            if let Some(call) = call {
                call.started();
            }
            Poll::Pending
        }
    })
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

/// A call the breaker let through, until its outcome is recorded: when it finishes, or
/// when it is dropped unfinished (cancelled).
pub(super) struct Call {
    shared: Lease<Shared>,
    ticket: Ticket,
    /// Blocking commands wait by design: never slow, not recorded when cancelled.
    blocking: bool,
    /// When the request entered the stack, if an outer layer read the clock for it.
    start: Option<Instant>,
    /// Set when the inner future first waits, so a call answered at once costs no clock
    /// reading, and one that waits costs at most two (none at the start when an outer
    /// layer read it; the end reading is shared with the layers above).
    timing: Timing,
    finished: bool,
}

#[derive(Clone, Copy)]
enum Timing {
    /// Answered at once so far (or blocking): not slow.
    Untimed,
    /// Slow if it finishes at or after this instant.
    SlowAt(Instant),
    /// `slow_call_duration` is too long to ever be reached.
    NeverSlow,
}

impl Call {
    pub(super) fn new(
        shared: Lease<Shared>,
        ticket: Ticket,
        blocking: bool,
        start: Option<Instant>,
    ) -> Self {
        Call {
            shared,
            ticket,
            blocking,
            start,
            timing: Timing::Untimed,
            finished: false,
        }
    }

    fn started(&mut self) {
        if matches!(self.timing, Timing::Untimed) && !self.blocking {
            let start = self.start.unwrap_or_else(clock::now);
            self.timing = match start.checked_add(self.shared.config.slow_call_duration) {
                Some(at) => Timing::SlowAt(at),
                None => Timing::NeverSlow,
            };
        }
    }

    /// Whether the call is slow, and the time now if it had to be read.
    fn slow_and_now(&self) -> (bool, Option<Instant>) {
        match self.timing {
            Timing::Untimed => (false, None),
            Timing::SlowAt(at) => {
                let now = clock::now();
                (now >= at, Some(now))
            }
            Timing::NeverSlow => (false, Some(clock::now())),
        }
    }

    #[inline]
    fn finish(&mut self, result: &Result<Value, Error>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let outcome = self.shared.config.classify(result);
        if outcome == Outcome::Ignore {
            return self.shared.ignore(self.ticket);
        }
        let (slow, now) = self.slow_and_now();
        self.shared.record(self.ticket, outcome, slow, now);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (slow, now) = self.slow_and_now();
        let failure = !self.blocking
            && match self.shared.config.on_cancel {
                CancelPolicy::Failure => true,
                CancelPolicy::FailureIfSlow => slow,
                CancelPolicy::Ignore => false,
            };
        if failure {
            self.shared.record(self.ticket, Outcome::Failure, slow, now);
        } else {
            self.shared.ignore(self.ticket);
        }
    }
}
