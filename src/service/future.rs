use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use redis::Value;

use crate::Error;

/// The future of [`RedisService`](super::RedisService): redis-rs's future for the request,
/// boxed once because it borrows the command it sends.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>,
}

impl ResponseFuture {
    pub(super) fn new(inner: impl Future<Output = Result<Value, Error>> + Send + 'static) -> Self {
        ResponseFuture {
            inner: Box::pin(inner),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Value, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
