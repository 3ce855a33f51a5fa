use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::Value;
use tokio::time::Instant;

use super::{Outcome, registry::Inner};
use crate::{Error, clock, sync::Lease};

/// The future of [`Metrics`](super::Metrics).
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    recorder: Option<Recorder>,
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, recorder: Option<Recorder>) -> Self {
        ResponseFuture { inner, recorder }
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
        clock::shared(|| {
            let result = std::task::ready!(this.inner.poll(cx));
            if let Some(recorder) = this.recorder.take() {
                recorder.finish(Outcome::of(&result));
            }
            Poll::Ready(result)
        })
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("recording", &self.recorder.is_some())
            .finish_non_exhaustive()
    }
}

/// Records a call once: when it finishes, or as `Cancelled` when it is dropped before.
pub(super) struct Recorder {
    registry: Lease<Inner>,
    slot: u16,
    start: Instant,
    done: bool,
}

impl Recorder {
    pub(super) fn new(registry: Lease<Inner>, slot: u16, start: Instant) -> Self {
        Recorder {
            registry,
            slot,
            start,
            done: false,
        }
    }

    #[inline]
    fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    #[inline]
    fn record(&mut self, outcome: Outcome) {
        self.done = true;
        if let Some(stats) = self.registry.stats(self.slot) {
            let latency = clock::now().saturating_duration_since(self.start);
            stats.record(outcome, latency);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            self.record(Outcome::Cancelled);
        }
    }
}
