use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use pin_project::{pin_project, pinned_drop};
use redis::Value;
use tokio::time::Instant;
use tracing::Span;

use crate::{Error, clock, metrics::Outcome};

/// The future of [`Trace`](super::Trace): polls the inner future inside the call's span
/// and records how the call ended on it.
#[pin_project(PinnedDrop)]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    /// `None` when nobody listens and slow calls are not reported: the future stays one
    /// pointer larger than the inner one, and the call costs next to nothing.
    traced: Option<Box<Traced>>,
}

pub(super) struct Traced {
    pub(super) span: Span,
    /// When the call started and how long is slow, if slow calls are reported.
    slow: Option<(Instant, Duration)>,
    command: &'static str,
    done: bool,
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, traced: Option<Box<Traced>>) -> Self {
        ResponseFuture { inner, traced }
    }
}

impl Traced {
    /// What a traced call keeps, or `None` when the span is disabled and slow calls are
    /// not reported.
    pub(super) fn new(
        span: Span,
        slow: Option<(Instant, Duration)>,
        command: &'static str,
    ) -> Option<Box<Traced>> {
        (!span.is_disabled() || slow.is_some()).then(|| {
            Box::new(Traced {
                span,
                slow,
                command,
                done: false,
            })
        })
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
        let Some(traced) = this.traced else {
            return this.inner.poll(cx);
        };
        let result = {
            let _entered = traced.span.enter();
            std::task::ready!(this.inner.poll(cx))
        };
        traced.done = true;
        if let Err(error) = &result {
            record_error(&traced.span, Outcome::of(&result), error.server_code());
        }
        if let Some((start, after)) = traced.slow {
            let took = clock::now().saturating_duration_since(start);
            if took >= after {
                tracing::warn!(
                    parent: &traced.span,
                    command = traced.command,
                    took_ms = took.as_secs_f64() * 1e3,
                    slow_ms = after.as_secs_f64() * 1e3,
                    "slow redis call"
                );
            }
        }
        Poll::Ready(result)
    }
}

fn record_error(span: &Span, outcome: Outcome, code: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    span.record("error.type", outcome.as_str());
    span.record("otel.status_code", "ERROR");
    if let Some(code) = code {
        span.record("db.response.status_code", code);
    }
}

#[pinned_drop]
impl<F> PinnedDrop for ResponseFuture<F> {
    fn drop(self: Pin<&mut Self>) {
        if let Some(traced) = &self.traced
            && !traced.done
        {
            record_error(&traced.span, Outcome::Cancelled, None);
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.traced.as_ref().map(|traced| &traced.span))
            .finish_non_exhaustive()
    }
}
