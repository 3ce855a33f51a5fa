//! Shared state that a response future can find again by a small key, so a call that
//! succeeds holds no reference count on it: the count costs more than some layers'
//! whole budget (an atomic increment and decrement per call, contended between threads).
//! Only the rare path (a fallback, say) looks the state up, under a read lock.

use std::{
    any::Any,
    sync::{Arc, PoisonError, RwLock, Weak},
};

/// Where a registered state lives; a key outlives its state harmlessly (lookups fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

struct Slot {
    generation: u32,
    state: Option<Weak<dyn Any + Send + Sync>>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: RwLock<Table> = RwLock::new(Table {
    slots: Vec::new(),
    free: Vec::new(),
});

/// Creates a state that knows its own key. Its `Drop` must call [`unregister`].
pub(crate) fn register<T: Any + Send + Sync>(make: impl FnOnce(Key) -> T) -> Arc<T> {
    Arc::new_cyclic(|weak: &Weak<T>| {
        let weak: Weak<dyn Any + Send + Sync> = weak.clone();
        let mut table = TABLE.write().unwrap_or_else(PoisonError::into_inner);
        let key = match table.free.pop() {
            Some(index) => {
                let slot = &mut table.slots[index as usize];
                slot.state = Some(weak);
                Key {
                    index,
                    generation: slot.generation,
                }
            }
            None => {
                let index = u32::try_from(table.slots.len()).unwrap_or(u32::MAX);
                table.slots.push(Slot {
                    generation: 0,
                    state: Some(weak),
                });
                Key {
                    index,
                    generation: 0,
                }
            }
        };
        drop(table);
        make(key)
    })
}

/// The state under `key`, if it is still alive and of type `T`.
pub(crate) fn find<T: Any + Send + Sync>(key: Key) -> Option<Arc<T>> {
    let table = TABLE.read().unwrap_or_else(PoisonError::into_inner);
    let slot = table.slots.get(key.index as usize)?;
    if slot.generation != key.generation {
        return None;
    }
    slot.state.as_ref()?.upgrade()?.downcast::<T>().ok()
}

/// Frees the key of a state being dropped.
pub(crate) fn unregister(key: Key) {
    let mut table = TABLE.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(slot) = table.slots.get_mut(key.index as usize)
        && slot.generation == key.generation
    {
        slot.state = None;
        slot.generation = slot.generation.wrapping_add(1);
        table.free.push(key.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct State {
        key: Key,
        value: u32,
    }

    impl Drop for State {
        fn drop(&mut self) {
            unregister(self.key);
        }
    }

    #[test]
    fn a_key_finds_its_state_while_it_lives_and_never_another_after() {
        let first = register(|key| State { key, value: 1 });
        let key = first.key;
        assert_eq!(find::<State>(key).map(|s| s.value), Some(1));
        assert!(find::<String>(key).is_none(), "wrong type");
        drop(first);
        assert!(find::<State>(key).is_none());
        // The slot is reused under a new generation: the old key stays dead.
        let states: Vec<_> = (0..4)
            .map(|v| register(|key| State { key, value: v }))
            .collect();
        assert!(find::<State>(key).is_none());
        for state in &states {
            assert_eq!(find::<State>(state.key).map(|s| s.value), Some(state.value));
        }
    }
}
