use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use pin_project::pin_project;
use redis::Value;

use super::shared::Shared;
use crate::{Error, service};

/// The future of [`Reconnect`](super::Reconnect).
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    #[pin]
    kind: Kind,
}

#[pin_project(project = KindProj)]
enum Kind {
    Call {
        #[pin]
        inner: service::ResponseFuture,
        tracker: Tracker,
    },
    Rejected {
        error: Option<Error>,
    },
    Wait {
        inner: Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>,
    },
}

impl ResponseFuture {
    pub(super) fn call(inner: service::ResponseFuture, tracker: Tracker) -> Self {
        ResponseFuture {
            kind: Kind::Call { inner, tracker },
        }
    }

    pub(super) fn rejected(error: Error) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { error: Some(error) },
        }
    }

    pub(super) fn wait(inner: impl Future<Output = Result<Value, Error>> + Send + 'static) -> Self {
        ResponseFuture {
            kind: Kind::Wait {
                inner: Box::pin(inner),
            },
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Value, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Call { inner, tracker } => {
                let result = ready!(inner.poll(cx));
                tracker.finish(&result);
                Poll::Ready(result)
            }
            KindProj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| Error::unavailable("response future polled after completion")))),
            KindProj::Wait { inner } => inner.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Reports how a call on a connection ended: a reply proves the connection alive, a
/// broken connection starts the reconnect loop, and a call dropped before its reply (an
/// outer timeout gave up on it) is evidence the connection may be stuck.
pub(super) struct Tracker {
    shared: Arc<Shared>,
    generation: u64,
    /// Blocking commands are expected to go quiet; their cancellation proves nothing.
    counts_cancellation: bool,
    done: bool,
}

impl Tracker {
    pub fn new(shared: Arc<Shared>, generation: u64, counts_cancellation: bool) -> Self {
        Tracker {
            shared,
            generation,
            counts_cancellation,
            done: false,
        }
    }

    pub fn finish(&mut self, result: &Result<Value, Error>) {
        self.done = true;
        match result {
            Err(error) if error.breaks_connection() => self
                .shared
                .connection_lost(self.generation, "the connection broke"),
            _ => self.shared.alive(),
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done && self.counts_cancellation {
            self.shared.cancelled(self.generation);
        }
    }
}
