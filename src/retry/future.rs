use std::{
    future::Future,
    pin::Pin,
    sync::PoisonError,
    task::{Context, Poll, ready},
};

use pin_project::pin_project;
use redis::Value;
use tokio::time::Sleep;
use tower::Service;

use super::Shared;
use crate::{Error, Request, backoff::Delays, sync::Lease};

/// The future of [`Retry`](super::Retry).
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<S: Service<Request>> {
    #[pin]
    state: State<S::Future>,
    /// What a retry needs; `None` when the layer never retries (it stands in for a
    /// removed one).
    retry: Option<Retrying<S>>,
    /// Cloned from the shared spare on the first retry (boxed: most calls never retry,
    /// and every layer above moves this future).
    service: Option<Box<S>>,
    retries: u32,
    /// Made on the first retry; most calls never need one.
    delays: Option<Box<Delays>>,
}

struct Retrying<S> {
    request: Request,
    shared: Lease<Shared<S>>,
}

#[pin_project(project = StateProj)]
enum State<F> {
    Called {
        #[pin]
        future: F,
    },
    Waiting {
        sleep: Pin<Box<Sleep>>,
    },
    Readying,
}

impl<S: Service<Request>> ResponseFuture<S> {
    pub(super) fn new(future: S::Future, retry: Option<(Request, Lease<Shared<S>>)>) -> Self {
        ResponseFuture {
            state: State::Called { future },
            retry: retry.map(|(request, shared)| Retrying { request, shared }),
            service: None,
            retries: 0,
            delays: None,
        }
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request, Response = Value, Error = Error> + Clone,
{
    type Output = Result<Value, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            match this.state.project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    let (Err(error), Some(Retrying { request, shared })) = (&result, &this.retry)
                    else {
                        return Poll::Ready(result);
                    };
                    if !shared.settings.allows_retry(request, error, *this.retries) {
                        return Poll::Ready(result);
                    }
                    let settings = &shared.settings;
                    let delays = this
                        .delays
                        .get_or_insert_with(|| Box::new(settings.backoff.iter()));
                    let Some(delay) = delays.next() else {
                        return Poll::Ready(result);
                    };
                    // Outside a runtime (a call polled by another executor) there is no
                    // timer to wait with: the failure is the answer.
                    if tokio::runtime::Handle::try_current().is_err() {
                        return Poll::Ready(result);
                    }
                    *this.retries += 1;
                    tracing::debug!(
                        command = request.info().name(),
                        retry = *this.retries,
                        ?delay,
                        %error,
                        "retrying redis call"
                    );
                    let sleep = Box::pin(tokio::time::sleep(delay));
                    self.as_mut().project().state.set(State::Waiting { sleep });
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    self.as_mut().project().state.set(State::Readying);
                }
                StateProj::Readying => {
                    // Only a call that can retry gets here.
                    let Some(Retrying { request, shared }) = &this.retry else {
                        return Poll::Ready(Err(Error::unavailable("retry without a request")));
                    };
                    let spare = &shared.spare;
                    let service = this.service.get_or_insert_with(|| {
                        Box::new(spare.lock().unwrap_or_else(PoisonError::into_inner).clone())
                    });
                    ready!(service.poll_ready(cx))?;
                    let future = service.call(request.clone());
                    self.as_mut().project().state.set(State::Called { future });
                }
            }
        }
    }
}

impl<S: Service<Request>> std::fmt::Debug for ResponseFuture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}
