//! Reusable heap slots for the leaf's futures.
//!
//! redis-rs's future for one request is ~1.3 KiB (the send on the connection's channel,
//! the reply channel and a response timer, nested), and it lives on the heap because it
//! borrows the command it sends. glibc's malloc serves blocks over 1 KiB outside its
//! per-thread cache: each call then paid a slow allocation, a free and the heap
//! consolidation they trigger (raw redis-rs pays it too, in `req_packed_command`). So a
//! finished future's box goes back to a small per-thread free list, and the next call
//! on that thread writes its future into it.

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use pin_project::pin_project;
use redis::Value;

use super::Job;
use crate::{Error, sync::free_list};

/// A box that holds one request's future at a time.
pub(super) type Slot = Pin<Box<dyn Reusable>>;

/// How many free slots a thread keeps (~1.3 KiB each): enough for the calls that finish
/// between two new ones on a busy thread, little memory on an idle one.
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// A slot holding the future of `job`: a free one of this thread if there is one.
pub(super) fn take(job: Job) -> Slot {
    let mut slot = free_list::take(&FREE).unwrap_or_else(|| {
        Box::pin(Holder {
            future: None,
            make: super::send,
        })
    });
    slot.as_mut().start(job);
    slot
}

/// Drops the future in `slot` and keeps the box for a later call, unless this thread has
/// enough already (or is exiting).
pub(super) fn give_back(mut slot: Slot) {
    slot.as_mut().clear();
    free_list::give_back(&FREE, slot, KEEP);
}

/// What a slot can do, whatever the concrete (unnameable) future type in it.
pub(super) trait Reusable: Send {
    fn start(self: Pin<&mut Self>, job: Job);
    fn poll_job(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Value, Error>>;
    fn clear(self: Pin<&mut Self>);
}

/// `make` is the function itself (a type of no size), not a pointer to it, so that
/// `start` can inline it and write the new future's few initial fields in place rather
/// than build all ~1.3 KiB aside and copy them in.
#[pin_project]
struct Holder<M, F> {
    #[pin]
    future: Option<F>,
    make: M,
}

impl<M, F> Reusable for Holder<M, F>
where
    M: Fn(Job) -> F + Send,
    F: Future<Output = Result<Value, Error>> + Send,
{
    fn start(self: Pin<&mut Self>, job: Job) {
        let mut this = self.project();
        this.future.set(Some((this.make)(job)));
    }

    fn poll_job(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Value, Error>> {
        let mut future = self.project().future;
        let Some(running) = future.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(Error::polled_after_completion()));
        };
        let answer = std::task::ready!(running.poll(cx));
        // A finished `async fn` must not be polled again; an empty slot answers an error.
        future.set(None);
        Poll::Ready(answer)
    }

    fn clear(self: Pin<&mut Self>) {
        self.project().future.set(None);
    }
}
