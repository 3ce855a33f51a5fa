//! A deadline for every request, sized to what the command is.

mod future;
mod layer;
mod timer;

pub use future::ResponseFuture;
pub use layer::TimeoutLayer;

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use redis::Value;
use tower::Service;

use self::{layer::Deadlines, timer::Timer};
use crate::{Error, Request};

/// The service [`TimeoutLayer`] makes: each call answers within its deadline, with a
/// [timeout](Error::is_timeout) error naming the command and the deadline if Redis has
/// not answered by then.
///
/// The deadline runs from the moment the request entered the stack (the outermost layer
/// that read the clock), so retries below count against it.
#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    deadlines: Arc<Deadlines>,
    timer: Timer,
}

impl<S> Service<Request> for Timeout<S>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)]
    fn call(&mut self, mut request: Request) -> Self::Future {
        let limit = self.deadlines.for_request(&request);
        let own = request.deadline().is_some();
        let deadline = limit.and_then(|limit| {
            Some((
                request.start().checked_add(limit)?,
                limit,
                own,
                self.timer.lease(),
            ))
        });
        let name = request.info().name_ref();
        ResponseFuture::new(self.inner.call(request), deadline, name)
    }
}

impl<S: fmt::Debug> fmt::Debug for Timeout<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timeout")
            .field("inner", &self.inner)
            .field("deadlines", &self.deadlines)
            .finish()
    }
}

#[cfg(test)]
mod tests;
