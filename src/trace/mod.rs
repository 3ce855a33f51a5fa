//! A `tracing` span per call, following OpenTelemetry's database conventions.

mod future;
mod layer;

pub use future::ResponseFuture;
pub use layer::TraceLayer;

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use redis::Value;
use tower::Service;

use self::{future::Traced, layer::Settings};
use crate::{Error, Request};

/// The service [`TraceLayer`] makes.
#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> Service<Request> for Trace<S>
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
        // Nobody listens at this level and slow calls are not reported: not even an empty
        // span is made (moving one around costs more than this whole check).
        let traced = if self.settings.may_trace() {
            let span = self.settings.span(&request);
            let slow = self
                .settings
                .slow_call
                .filter(|_| !request.info().is_blocking())
                .map(|after| (request.start(), after));
            Traced::new(span, slow, request.info().name())
        } else {
            None
        };
        // One call site, so the inner future is built where the outer one keeps it.
        let inner = {
            let _entered = traced.as_ref().map(|traced| traced.span.enter());
            self.inner.call(request)
        };
        ResponseFuture::new(inner, traced)
    }
}

impl<S: fmt::Debug> fmt::Debug for Trace<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("inner", &self.inner)
            .field("settings", &self.settings)
            .finish()
    }
}

#[cfg(test)]
mod tests;
