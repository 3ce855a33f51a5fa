//! Concurrency building blocks the layers share.

pub(crate) mod free_list;
mod lease;

pub(crate) use lease::{Lease, Leased, SHARDS, shard};

/// Keeps a value on cache lines of its own (128 bytes: adjacent-line prefetch pairs
/// lines), so a counter written on every call does not slow down readers of its
/// neighbours on other cores.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// Takes a unit of the task's Tokio budget for an answer given without waiting (a
/// rejection, a refusal), and answers `Pending` when the task has spent it: the task then
/// yields and is polled again after the runtime's other tasks had their turn.
///
/// Tokio's own resources do this (a channel, a socket, a timer), so a task looping over
/// them cannot hold its worker for good. A call that fails at once without touching any
/// of them must do it too: an app's `while client.set(..).await.is_err() {}` would
/// otherwise spin without ever yielding while Redis is away, and the reconnect loop,
/// a task on the same runtime, would never run to bring it back (on a `current_thread`
/// runtime, never at all). Outside a Tokio task the budget is unlimited: always `Ready`.
#[inline]
pub(crate) fn proceed(cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
    std::task::ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
    std::task::Poll::Ready(())
}
