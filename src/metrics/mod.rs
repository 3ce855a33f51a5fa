//! Counts and latency histograms per command and outcome.

#[cfg(feature = "metrics")]
mod facade;
mod future;
mod layer;
mod registry;

pub use future::ResponseFuture;
pub use layer::MetricsLayer;
pub use registry::{CommandMetrics, Latency, Outcome, Registry, Snapshot};

use std::{
    fmt,
    task::{Context, Poll},
};

use redis::Value;
use tower::Service;

use self::future::Recorder;
use crate::{Error, Request};

/// The service [`MetricsLayer`] makes: records every call's [`Outcome`] and latency in
/// the layer's [`Registry`].
#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
    registry: Registry,
    on: bool,
}

impl<S> Service<Request> for Metrics<S>
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
    fn call(&mut self, mut request: Request) -> Self::Future {
        let recorder = if self.on {
            self.registry
                .slot(request.info().name())
                .map(|slot| Recorder::new(self.registry.lease(), slot, request.start()))
        } else {
            None
        };
        ResponseFuture::new(self.inner.call(request), recorder)
    }
}

impl<S: fmt::Debug> fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .finish()
    }
}

#[cfg(test)]
mod tests;
