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
