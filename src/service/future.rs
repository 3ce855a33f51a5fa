use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use redis::Value;

use super::{Job, slots};
use crate::Error;

/// The future of [`RedisService`](super::RedisService): redis-rs's future for the request,
/// on the heap because it borrows the command it sends (in a box reused from an earlier
/// call on the same thread when there is one).
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    /// `None` only while dropping.
    slot: Option<slots::Slot>,
}

impl ResponseFuture {
    pub(super) fn new(job: Job) -> Self {
        ResponseFuture {
            slot: Some(slots::take(job)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Value, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.slot {
            Some(slot) => slot.as_mut().poll_job(cx),
            None => Poll::Ready(Err(Error::polled_after_completion())),
        }
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slots::give_back(slot);
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
