//! A request's command, shared by the request's clones (a retry keeps one). A copy of a
//! borrowed command (what `Client` gets from redis-rs's `AsyncCommands`, per call) is
//! recycled: when its last clone goes, its allocations (the `Arc` and the command's two
//! buffers) are kept on the thread, and the next copy made there is written into them.
//! Without it, each such call paid three allocations and three frees for the copy alone.
//! A command handed over owned is shared as it is and freed as usual.

use std::{cell::RefCell, mem::ManuallyDrop, ops::Deref, sync::Arc};

use redis::{Arg, Cmd};

use crate::sync::free_list;

/// How many emptied commands a thread keeps.
const KEEP: usize = 64;

/// A command whose arguments take more bytes than this is not kept: kept buffers hold
/// on to their capacity, so this bounds what a thread keeps (about twice this, per
/// command).
const KEEP_AT_MOST_BYTES: usize = 1024;

thread_local! {
    /// Emptied commands, each the only reference to its `Arc`.
    static FREE: RefCell<Vec<Arc<Cmd>>> = const { RefCell::new(Vec::new()) };
}

/// A shared command; the last clone of a copy gives its allocations back to its thread.
#[derive(Debug)]
pub(crate) struct SharedCmd {
    cmd: ManuallyDrop<Arc<Cmd>>,
    /// A copy, whose allocations are kept when it goes.
    recycled: bool,
}

impl SharedCmd {
    /// Shares `cmd` as it is.
    pub(crate) fn new(cmd: Cmd) -> Self {
        SharedCmd {
            cmd: ManuallyDrop::new(Arc::new(cmd)),
            recycled: false,
        }
    }

    /// A copy of `cmd`, written into a kept command's buffers when this thread has one.
    pub(crate) fn copy_of(cmd: &Cmd) -> Self {
        let clone = || SharedCmd {
            cmd: ManuallyDrop::new(Arc::new(cmd.clone())),
            recycled: true,
        };
        let Some(mut kept) = free_list::take(&FREE) else {
            return clone();
        };
        let Some(copy) = Arc::get_mut(&mut kept) else {
            return clone();
        };
        copy.clear();
        for arg in cmd.args_iter() {
            match arg {
                Arg::Simple(bytes) => {
                    copy.arg(bytes);
                }
                // A scan's cursor (whose value a command does not show), or a kind of
                // argument a later redis-rs adds: only a clone carries it.
                _ => return SharedCmd::new(cmd.clone()),
            }
        }
        copy.set_no_response(cmd.is_no_response());
        SharedCmd {
            cmd: ManuallyDrop::new(kept),
            recycled: true,
        }
    }
}

impl Clone for SharedCmd {
    fn clone(&self) -> Self {
        SharedCmd {
            cmd: ManuallyDrop::new(Arc::clone(&self.cmd)),
            recycled: self.recycled,
        }
    }
}

impl Deref for SharedCmd {
    type Target = Cmd;

    #[inline]
    fn deref(&self) -> &Cmd {
        &self.cmd
    }
}

impl Drop for SharedCmd {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `self.cmd` is taken once, here, and never used again.
        let cmd = unsafe { ManuallyDrop::take(&mut self.cmd) };
        if self.recycled {
            recycle(cmd);
        }
    }
}

/// Keeps a copy's allocations on this thread, if it was the last clone and is small.
fn recycle(mut cmd: Arc<Cmd>) {
    let Some(only) = Arc::get_mut(&mut cmd) else {
        // Another clone holds it still.
        return;
    };
    if written_bytes(only) > KEEP_AT_MOST_BYTES {
        return;
    }
    free_list::give_back(&FREE, cmd, KEEP);
}

/// The bytes of a command's arguments: what its buffer had to hold.
fn written_bytes(cmd: &Cmd) -> usize {
    super::info::simple_args(cmd).map(<[u8]>::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept() -> usize {
        FREE.with_borrow(Vec::len)
    }

    #[test]
    fn a_copy_sends_what_the_original_sends() {
        let mut original = redis::cmd("SET");
        original
            .arg("key")
            .arg(b"\x00binary\r\n".as_slice())
            .arg(42)
            .arg(&["a", "b"]);
        // The first copy is a clone; the second is written into its kept buffers.
        drop(SharedCmd::copy_of(
            &redis::cmd("GET").arg("a longer key than the next").clone(),
        ));
        assert_eq!(kept(), 1);
        let copy = SharedCmd::copy_of(&original);
        assert_eq!(kept(), 0, "written into the kept command");
        assert_eq!(copy.get_packed_command(), original.get_packed_command());
        assert!(!copy.is_no_response());

        let mut quiet = redis::cmd("PUBLISH");
        quiet.arg("c").arg("m").set_no_response(true);
        drop(copy);
        assert!(SharedCmd::copy_of(&quiet).is_no_response());
    }

    #[test]
    fn a_scan_is_cloned_with_its_cursor() {
        drop(SharedCmd::copy_of(&redis::cmd("GET").arg("k").clone()));
        let mut scan = redis::cmd("SSCAN");
        scan.arg("set").cursor_arg(7);
        let copy = SharedCmd::copy_of(&scan);
        assert!(copy.in_scan_mode());
        assert_eq!(copy.get_packed_command(), scan.get_packed_command());
    }

    #[test]
    fn only_the_last_clone_of_a_copy_gives_it_back_and_large_ones_are_not_kept() {
        let before = kept();
        let first = SharedCmd::copy_of(&redis::cmd("GET").arg("k").clone());
        let second = first.clone();
        drop(first);
        assert_eq!(kept(), before);
        drop(second);
        assert_eq!(kept(), before + 1);
        drop(SharedCmd::copy_of(
            &redis::cmd("SET").arg("k").arg(vec![0u8; 2000]).clone(),
        ));
        assert_eq!(kept(), before, "a large command's buffers are freed");
        drop(SharedCmd::new(redis::cmd("GET").arg("k").clone()));
        assert_eq!(
            kept(),
            before,
            "a command handed over owned is freed as usual"
        );
    }

    #[test]
    fn copies_made_in_kept_buffers_match_their_originals_over_random_commands() {
        use rand::{RngExt, SeedableRng, rngs::SmallRng};

        let mut rng = SmallRng::seed_from_u64(0x5ca1_ab1e);
        let mut alive: Vec<(SharedCmd, Vec<u8>)> = Vec::new();
        let mut written_into_kept = 0;
        for _ in 0..2000 {
            let mut original = redis::cmd(["GET", "SET", "HSET", "EVAL"][rng.random_range(0..4)]);
            for _ in 0..rng.random_range(0..6) {
                let len = if rng.random_range(0..20) == 0 {
                    rng.random_range(1000..3000)
                } else {
                    rng.random_range(0..40)
                };
                let arg: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                original.arg(arg);
            }
            let had_kept = kept() > 0;
            let copy = SharedCmd::copy_of(&original);
            written_into_kept += usize::from(had_kept);
            assert_eq!(copy.get_packed_command(), original.get_packed_command());
            alive.push((copy, original.get_packed_command()));
            // Drop some, in a random order, so kept buffers of every size get reused.
            while !alive.is_empty() && rng.random_range(0..3) == 0 {
                let (copy, packed) = alive.swap_remove(rng.random_range(0..alive.len()));
                assert_eq!(copy.get_packed_command(), packed, "unchanged while alive");
            }
        }
        assert!(
            written_into_kept > 500,
            "{written_into_kept} copies reused kept buffers"
        );
    }
}
