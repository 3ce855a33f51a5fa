//! Per-thread free lists: a finished call's allocation kept for the next call on the
//! same thread, so a busy thread stops paying the allocator for each call.

use std::{cell::RefCell, thread::LocalKey};

/// A free list: one per thread, declared with `thread_local!`.
pub(crate) type FreeList<T> = LocalKey<RefCell<Vec<T>>>;

/// One of this thread's kept items, if it has one.
#[inline]
pub(crate) fn take<T>(list: &'static FreeList<T>) -> Option<T> {
    list.try_with(|free| free.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
}

/// Keeps `item` for a later [`take`] on this thread, unless the thread keeps `keep`
/// already (or is exiting): then it is dropped.
#[inline]
pub(crate) fn give_back<T>(list: &'static FreeList<T>, item: T, keep: usize) {
    let mut item = Some(item);
    let _ = list.try_with(|free| {
        if let Ok(mut free) = free.try_borrow_mut()
            && free.len() < keep
            && let Some(item) = item.take()
        {
            free.push(item);
        }
    });
    // Dropped here, outside the list's borrow: its drop may use the list again.
    drop(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static LIST: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn keeps_up_to_its_bound_per_thread() {
        assert_eq!(take(&LIST), None);
        for n in 0..5 {
            give_back(&LIST, n, 3);
        }
        assert_eq!(LIST.with_borrow(Vec::len), 3, "the bound holds");
        assert_eq!(take(&LIST), Some(2));
        std::thread::spawn(|| assert_eq!(take(&LIST), None, "another thread's list"))
            .join()
            .unwrap();
    }
}
