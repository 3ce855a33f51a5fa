use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project::pin_project;
use redis::Value;
use tokio::time::{Instant, Sleep};

use crate::Error;

/// The future of [`Timeout`](super::Timeout).
///
/// The timer is armed only when the inner future first waits, so a call answered at
/// once never touches the timer wheel.
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    #[pin]
    sleep: Option<Sleep>,
    /// When it times out, and the deadline that is (for the error); `None`: never.
    deadline: Option<(Instant, Duration)>,
    command: &'static str,
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(
        inner: F,
        deadline: Option<(Instant, Duration)>,
        command: &'static str,
    ) -> Self {
        ResponseFuture {
            inner,
            sleep: None,
            deadline,
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
        let mut this = self.project();
        // The answer wins over a deadline that passed in the same instant.
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        let Some((at, limit)) = *this.deadline else {
            return Poll::Pending;
        };
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep_until(at)));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => {
                Poll::Ready(Err(Error::timed_out(limit).with_command(this.command)))
            }
            _ => Poll::Pending,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("command", &self.command)
            .field("deadline", &self.deadline.map(|(_, limit)| limit))
            .finish_non_exhaustive()
    }
}
