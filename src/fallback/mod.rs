//! Answering reads with "nothing there" while Redis cannot answer.

mod future;
mod layer;

pub use future::ResponseFuture;
pub use layer::{FallbackFn, FallbackLayer, FallbackPolicy};

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use redis::Value;
use tower::Service;

use self::{future::Plan, layer::Shared};
use crate::{Error, Request};

/// The service [`FallbackLayer`] makes.
#[derive(Clone)]
pub struct Fallback<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request> for Fallback<S>
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
        let settings = &self.shared.settings;
        let plan = if settings.on {
            Plan::for_request(&settings.policy, &request)
        } else {
            None
        };
        let fallback = plan.map(|plan| (self.shared.key, plan));
        ResponseFuture::new(self.inner.call(request), fallback)
    }
}

impl<S: fmt::Debug> fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("policy", &self.shared.settings.policy)
            .finish()
    }
}

#[cfg(test)]
mod tests;
