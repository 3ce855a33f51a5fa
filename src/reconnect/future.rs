use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use pin_project::pin_project;
use redis::Value;

use super::shared::Shared;
use crate::{
    Error, MakeConnection,
    sync::{self, Lease},
};

/// The future of [`Reconnect`](super::Reconnect): the connection's future `F`, watched.
#[pin_project]
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<F, M: MakeConnection> {
    #[pin]
    kind: Kind<F, M>,
}

#[pin_project(project = KindProj)]
enum Kind<F, M: MakeConnection> {
    Call {
        #[pin]
        inner: F,
        tracker: Tracker<M>,
    },
    /// No connection: the error is made when polled (from the layer's state then), so
    /// this variant stays small and the calls that do go out carry no room for an error.
    Rejected {
        rejection: Option<(Lease<Shared<M>>, &'static str)>,
    },
    Wait {
        inner: Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>,
    },
}

impl<F, M: MakeConnection> ResponseFuture<F, M> {
    pub(super) fn call(inner: F, tracker: Tracker<M>) -> Self {
        ResponseFuture {
            kind: Kind::Call { inner, tracker },
        }
    }

    pub(super) fn rejected(shared: Lease<Shared<M>>, command: &'static str) -> Self {
        ResponseFuture {
            kind: Kind::Rejected {
                rejection: Some((shared, command)),
            },
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

impl<F, M> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<Value, Error>>,
    M: MakeConnection,
{
    type Output = Result<Value, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Call { inner, tracker } => {
                let result = ready!(inner.poll(cx));
                tracker.finish(&result);
                Poll::Ready(result)
            }
            KindProj::Rejected { rejection } => {
                // An answer given without waiting takes its unit of the task's budget.
                ready!(sync::proceed(cx));
                Poll::Ready(Err(match rejection.take() {
                    Some((shared, command)) => shared.rejection().with_command(command),
                    None => Error::polled_after_completion(),
                }))
            }
            KindProj::Wait { inner } => inner.as_mut().poll(cx),
        }
    }
}

impl<F, M: MakeConnection> std::fmt::Debug for ResponseFuture<F, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Reports how a call on a connection ended: a reply proves the connection alive, a
/// broken connection starts the reconnect loop, and a call dropped before its reply (an
/// outer timeout gave up on it) is evidence the connection may be stuck.
pub(super) struct Tracker<M: MakeConnection> {
    shared: Lease<Shared<M>>,
    generation: u64,
    /// Blocking commands are expected to go quiet; their cancellation proves nothing.
    counts_cancellation: bool,
    done: bool,
}

impl<M: MakeConnection> Tracker<M> {
    pub fn new(shared: Lease<Shared<M>>, generation: u64, counts_cancellation: bool) -> Self {
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
            // A replica answered (a pipeline's write slot, too: the leaf fails the
            // pipeline with it).
            Err(error) if error.is_replica_refusal() => {
                self.shared.alive();
                self.shared.read_only_reply(self.generation);
            }
            _ => self.shared.alive(),
        }
    }
}

impl<M: MakeConnection> Drop for Tracker<M> {
    fn drop(&mut self) {
        if !self.done && self.counts_cancellation {
            self.shared.cancelled(self.generation);
        }
    }
}
