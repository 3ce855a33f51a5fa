use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project::pin_project;
use redis::Value;
use tokio::time::Instant;

use super::timer::{CallTimer, NoRuntime, Registration};
use crate::{Error, clock};

/// The future of [`Timeout`](super::Timeout).
///
/// A call answered at once never touches the timer; one that waits takes a slot in the
/// layer's shared timer until it finishes.
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    timing: Timing,
    /// One pointer: the future moves through every layer above, so its size counts.
    command: &'static &'static str,
}

/// A deadline's length in nanoseconds, and in the top bit whether it is the request's own:
/// eight bytes where a `Duration` takes sixteen. (Saturates at 292 years.)
#[derive(Clone, Copy)]
struct Limit(u64);

impl Limit {
    const OWN: u64 = 1 << 63;

    fn of(limit: Duration, own: bool) -> Self {
        let nanos = u64::try_from(limit.as_nanos())
            .map_or(Limit::OWN - 1, |nanos| nanos.min(Limit::OWN - 1));
        Limit(nanos | if own { Limit::OWN } else { 0 })
    }

    fn get(self) -> Duration {
        Duration::from_nanos(self.0 & !Limit::OWN)
    }

    fn error(self) -> Error {
        match self.0 & Limit::OWN {
            0 => Error::timed_out(self.get()),
            _ => Error::timed_out_on_own_deadline(self.get()),
        }
    }
}

enum Timing {
    /// No deadline, or the call is over.
    None,
    /// Times out at `at`, the deadline `limit` after the start; not waiting yet.
    Armed {
        at: Instant,
        limit: Limit,
        timer: CallTimer,
    },
    /// Waits in the timer, whose driver says when the deadline has passed.
    Waiting {
        at: Instant,
        limit: Limit,
        registration: Registration,
    },
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(
        inner: F,
        deadline: Option<(Instant, Duration, bool, CallTimer)>,
        command: &'static &'static str,
    ) -> Self {
        let timing = match deadline {
            Some((at, limit, own, timer)) => Timing::Armed {
                at,
                limit: Limit::of(limit, own),
                timer,
            },
            None => Timing::None,
        };
        ResponseFuture {
            inner,
            timing,
            command,
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Value, Error>>,
{
    type Output = Result<Value, Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The answer wins over a deadline that passed in the same instant.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            // Gives the slot back now, not when the future is dropped.
            *this.timing = Timing::None;
            return Poll::Ready(result);
        }
        if let Timing::Waiting {
            at,
            limit,
            registration,
        } = this.timing
        {
            if clock::now() < *at {
                registration.update(cx.waker());
                return Poll::Pending;
            }
            // Past it, the driver says whether the call timed out: it may have given it
            // longer, for a stall of the runtime.
            if registration.waiting(cx.waker()) {
                return Poll::Pending;
            }
            let error = limit.error().with_command(this.command);
            *this.timing = Timing::None;
            return Poll::Ready(Err(error));
        }
        match std::mem::replace(this.timing, Timing::None) {
            Timing::Armed { at, limit, timer } => {
                // A stall of the runtime may add up to the deadline again.
                match timer.register(at, limit.get(), cx.waker()) {
                    Ok(registration) => {
                        *this.timing = Timing::Waiting {
                            at,
                            limit,
                            registration,
                        };
                        Poll::Pending
                    }
                    // The request may be on its way: said so, not "not sent".
                    Err(NoRuntime) => Poll::Ready(Err(Error::config_after_sending(
                        "the timeout layer needs a Tokio runtime to time a call: none is \
                         current, and none runs its deadlines; the call was given up, and \
                         may have run",
                    )
                    .with_command(this.command))),
                }
            }
            Timing::None | Timing::Waiting { .. } => Poll::Pending,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("command", &self.command)
            .field(
                "deadline",
                &match &self.timing {
                    Timing::Armed { limit, .. } | Timing::Waiting { limit, .. } => {
                        Some(limit.get())
                    }
                    Timing::None => None,
                },
            )
            .finish_non_exhaustive()
    }
}
