//! The deadlines of every call through one [`TimeoutLayer`](super::TimeoutLayer), kept by
//! one task instead of one runtime timer per call.
//!
//! A tokio `Sleep` per call costs a timer-wheel insert and remove under the driver's lock,
//! and makes every future above it ~130 bytes larger (each layer moves it once more).
//! Here a call that has to wait puts its deadline and waker in a slot of a small table
//! (one uncontended lock) and takes it out when it finishes; a single driver task sleeps
//! until the earliest deadline it knows, wakes the calls whose deadline has passed and
//! sleeps again. Calls finish long before their deadline, so the driver mostly wakes to
//! find their slots already empty: about once per deadline period under steady traffic,
//! never while the table is empty.
//!
//! A driver runs on each runtime whose calls wait here, spawned by the first such call,
//! so a call is never left to a driver on a runtime that is idle or gone (as a client
//! shared by two runtimes, or by tests each with its own, would otherwise risk). It reads
//! tokio's clock, so `tokio::time::pause` governs it. A call made outside any runtime
//! (another executor's `block_on`) is left to a driver on a multi-threaded runtime, one
//! started on the runtime the services were made on if none runs: a `current_thread`
//! runtime runs its tasks only while a thread is in its `block_on`, so none is counted on.
//!
//! The driver is the one that says a call timed out, so it can tell a deadline Redis
//! missed from one the runtime missed. When it runs more than [`STALL`] later than it
//! should have (at the deadline it slept until, or when a call told it of an earlier
//! one), its thread was blocked, or the process throttled or descheduled, and replies may
//! be waiting in the sockets, unread because nothing could run. The calls then due are
//! given, once, as long again as the stall held them up, at most their deadline, so a
//! reply that came meanwhile is taken rather than thrown away. A stall is only seen while
//! tokio's clock runs with the real one, so a paused or advanced clock is never taken
//! for one.

use std::{
    cell::Cell,
    hash::{Hash, Hasher},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::Waker,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::sync::{self, Lease, Leased};

/// Tables, so threads of a multi-threaded runtime rarely share a lock.
const SHARDS: usize = 8;

/// How late the driver may wake before it takes the runtime to have been held up: tokio's
/// timer fires on a 1 ms tick, and a busy runtime runs the driver a little after.
const STALL: Duration = Duration::from_millis(2);

/// One layer's deadlines; clones share them.
#[derive(Clone, Default)]
pub(crate) struct Timer {
    owner: Arc<Owner>,
}

/// What the layer's services hold: when the last goes, the driver may stop once no call
/// waits.
struct Owner(Leased<Shared>);

/// A call's hold on the timer, leased when the call starts, before it knows whether it
/// will wait: taking it writes nothing other threads write.
pub(crate) struct CallTimer(Lease<Shared>);

struct Shared {
    shards: [Shard; SHARDS],
    /// Wakes a driver early: a deadline before a shard's `next_wake`, a driver gone, or
    /// the services gone.
    wake: Notify,
    /// Set when the services are gone: the drivers stop once no call waits.
    closed: AtomicBool,
    /// The runtime the last call came from, which has a driver: most calls check only
    /// this.
    last_runtime: AtomicU64,
    /// The runtimes with a driver running, and whether each runs its tasks by itself (a
    /// multi-threaded runtime's workers do; a `current_thread` one runs them only while
    /// a thread is in its `block_on`).
    drivers: Mutex<Vec<(u64, bool)>>,
    /// The last runtime that runs by itself (not a `current_thread` one) the services
    /// were made on or started a driver on: a call made outside any runtime, when no
    /// driver runs on such a runtime, has one started there. Kept only while nothing
    /// replaces it, so a runtime shut down holds at most one handle (and its file
    /// descriptors) here.
    home: Mutex<Option<tokio::runtime::Handle>>,
    /// When a call first told the drivers of a deadline they did not know since they last
    /// looked: they should have run then, which tells a stall that held them up.
    told: Mutex<Option<Since>>,
}

/// Its own cache line, so two threads' tables do not share one.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<Slots>);

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    vacant: Vec<u32>,
    next_id: u64,
    /// When the drivers will next look, as they last told this shard; `None` while they
    /// look or know of no deadline: then every new deadline must tell them.
    next_wake: Option<Instant>,
}

enum Slot {
    Vacant,
    Waiting {
        /// Tells a registration from an earlier one that held this slot.
        id: u64,
        deadline: Instant,
        waker: Waker,
        /// How long a stall of the runtime may still add to the deadline: the call's
        /// deadline at first, nothing once given.
        grace: Duration,
    },
}

/// A call's place in the timer, removed when dropped.
pub(crate) struct Registration {
    timer: Lease<Shared>,
    shard: u32,
    index: u32,
    id: u64,
}

/// No runtime to run the driver on: the call cannot be timed.
#[derive(Debug)]
pub(crate) struct NoRuntime;

impl Default for Owner {
    fn default() -> Self {
        Owner(Leased::new(Shared::default()))
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.wake.notify_one();
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            shards: Default::default(),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            last_runtime: AtomicU64::new(0),
            drivers: Mutex::new(Vec::new()),
            home: Mutex::new(None),
            told: Mutex::new(None),
        }
    }
}

impl Timer {
    /// The timer, for one call that may wait.
    #[inline]
    pub(crate) fn lease(&self) -> CallTimer {
        CallTimer(self.owner.0.lease())
    }

    /// Keeps the current runtime, if there is one that runs by itself, for calls made
    /// outside any.
    pub(crate) fn remember_runtime(&self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && runs_by_itself(&runtime)
        {
            *self.owner.0.home() = Some(runtime);
        }
    }

    /// Calls waiting in the timer now (for tests).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        (0..SHARDS)
            .map(|shard| {
                let slots = self.owner.0.lock(shard);
                slots.slots.len() - slots.vacant.len()
            })
            .sum()
    }
}

impl CallTimer {
    /// Wakes `waker` once `deadline` has passed, until the registration is dropped; a
    /// stall of the runtime past it may add up to `grace`.
    pub(crate) fn register(
        self,
        deadline: Instant,
        grace: Duration,
        waker: &Waker,
    ) -> Result<Registration, NoRuntime> {
        let shared = &self.0;
        // Outside a runtime (a call polled by another executor: `futures`' `block_on` on a
        // thread of the app's own), a driver on a runtime that runs by itself keeps the
        // deadline. One on a `current_thread` runtime might never run: none is counted on.
        // (The connection's own task is no better off there.)
        let runtime_id = current_runtime_id();
        if runtime_id.is_none() && !shared.has_driver() && !shared.start_at_home(&self.0) {
            return Err(NoRuntime);
        }
        // This thread's table: threads take them in turn.
        let shard = sync::shard() % SHARDS;
        let (index, id, tell) = {
            let mut slots = shared.lock(shard);
            let id = slots.next_id;
            slots.next_id += 1;
            let slot = Slot::Waiting {
                id,
                deadline,
                waker: waker.clone(),
                grace,
            };
            let index = match slots.vacant.pop() {
                Some(index) => {
                    slots.slots[index as usize] = slot;
                    index
                }
                None => {
                    slots.slots.push(slot);
                    u32::try_from(slots.slots.len() - 1).unwrap_or(u32::MAX)
                }
            };
            let tell = slots.next_wake.is_none_or(|next| deadline < next);
            (index, id, tell)
        };
        let registration = Registration {
            timer: self.0,
            shard: shard as u32,
            index,
            id,
        };
        let shared = &registration.timer;
        // After the slot is taken: a driver that stops (see `drive`) first says so here,
        // then looks at the table once more, so it sees this slot, or this call sees it
        // gone and starts another.
        match runtime_id {
            Some(runtime_id) if shared.last_runtime.load(Ordering::Acquire) != runtime_id => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return Err(NoRuntime);
                };
                shared.ensure_driver(shared, &runtime, runtime_id);
            }
            Some(_) => {}
            // None can be started from here: the slot is given back.
            None if !shared.has_driver() => return Err(NoRuntime),
            None => {}
        }
        if tell {
            shared.tell();
        }
        Ok(registration)
    }
}

impl Registration {
    /// Wakes `waker` instead, if the call is now polled with another one.
    pub(crate) fn update(&self, waker: &Waker) {
        self.waiting(waker);
    }

    /// Whether the call still waits (the driver has not found its deadline passed); if
    /// so, it wakes `waker` instead, should the call now be polled with another one.
    pub(crate) fn waiting(&self, waker: &Waker) -> bool {
        let mut slots = self.timer.lock(self.shard as usize);
        match slots.slots.get_mut(self.index as usize) {
            Some(Slot::Waiting { id, waker: old, .. }) if *id == self.id => {
                if !old.will_wake(waker) {
                    *old = waker.clone();
                }
                true
            }
            _ => false,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let waker = {
            let mut slots = self.timer.lock(self.shard as usize);
            let index = self.index as usize;
            match slots.slots.get(index) {
                Some(Slot::Waiting { id, .. }) if *id == self.id => {
                    let slot = std::mem::replace(&mut slots.slots[index], Slot::Vacant);
                    slots.vacant.push(self.index);
                    slot
                }
                // Already woken and removed by the driver.
                _ => return,
            }
        };
        // The waker is dropped outside the lock.
        drop(waker);
    }
}

impl Shared {
    /// Tells the drivers of a deadline earlier than they know, and when they were told.
    #[cold]
    #[inline(never)]
    fn tell(&self) {
        self.told
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(Since::now);
        self.wake.notify_one();
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Slots> {
        // A panic while holding it cannot leave the table inconsistent: every update
        // is a single assignment or push.
        self.shards[shard % SHARDS]
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns a driver on `runtime` unless one runs there.
    fn ensure_driver(&self, lease: &Lease<Shared>, runtime: &tokio::runtime::Handle, id: u64) {
        let by_itself = runs_by_itself(runtime);
        if self.add_driver(id, by_itself) {
            if by_itself {
                *self.home() = Some(runtime.clone());
            }
            // Made before the task: one that never runs (its runtime shut down) unlists
            // itself as it is dropped.
            let driving = Driving {
                shared: lease.clone(),
                runtime: id,
                by_itself,
                listed: true,
            };
            runtime.spawn(drive(driving));
        }
    }

    /// Starts a driver on the home runtime, for a call made outside any; false if none
    /// that runs by itself runs (there is no home, or it has shut down).
    #[cold]
    fn start_at_home(&self, lease: &Lease<Shared>) -> bool {
        let Some(home) = self.home().clone() else {
            return false;
        };
        self.ensure_driver(lease, &home, runtime_id(&home));
        self.has_driver()
    }

    fn home(&self) -> MutexGuard<'_, Option<tokio::runtime::Handle>> {
        self.home.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a driver runs on a runtime that runs it by itself.
    fn has_driver(&self) -> bool {
        self.drivers().iter().any(|&(_, by_itself)| by_itself)
    }

    /// Lists a driver for runtime `id`; false if one was listed already.
    fn add_driver(&self, id: u64, by_itself: bool) -> bool {
        let mut drivers = self.drivers();
        let added = !drivers.iter().any(|&(driver, _)| driver == id);
        if added {
            drivers.push((id, by_itself));
        }
        self.last_runtime.store(id, Ordering::Release);
        added
    }

    /// Unlists the driver for runtime `id`: the next call from there starts another.
    fn remove_driver(&self, id: u64) {
        let mut drivers = self.drivers();
        drivers.retain(|&(driver, _)| driver != id);
        // A compare-exchange, not a store: another runtime may be the last now.
        let _ = self
            .last_runtime
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    fn drivers(&self) -> MutexGuard<'_, Vec<(u64, bool)>> {
        self.drivers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long past the moment it should have run the driver runs `now`, if more than
    /// [`STALL`] while tokio's clock ran with the real one; zero otherwise.
    fn stall(&self, now: Instant, asleep: Option<Asleep>) -> Duration {
        let told = self
            .told
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let late = |should_run: Instant, since: &Since| {
            if since.ran_with_real_time(now) {
                now.saturating_duration_since(should_run)
            } else {
                Duration::ZERO
            }
        };
        let slept = asleep.map_or(Duration::ZERO, |asleep| late(asleep.until, &asleep.since));
        let stall = told.map_or(slept, |told| slept.max(late(told.tokio, &told)));
        if stall > STALL { stall } else { Duration::ZERO }
    }

    /// Wakes and removes the calls whose deadline is `now` or earlier, but gives those
    /// that a `stall` of the runtime held up their grace; answers the earliest deadline
    /// left, which it then tells every shard, and how many calls it gave their grace.
    fn sweep(
        &self,
        now: Instant,
        stall: Duration,
        expired: &mut Vec<Waker>,
    ) -> (Option<Instant>, usize) {
        let mut earliest: Option<Instant> = None;
        let mut graced = 0;
        for shard in 0..SHARDS {
            let mut slots = self.lock(shard);
            // Deadlines registered from now until it tells the result must wake it, as
            // it may have swept their shard already.
            slots.next_wake = None;
            let Slots { slots, vacant, .. } = &mut *slots;
            for (index, slot) in slots.iter_mut().enumerate() {
                let Slot::Waiting {
                    deadline, grace, ..
                } = slot
                else {
                    continue;
                };
                if *deadline <= now && !stall.is_zero() && !grace.is_zero() {
                    *deadline = now + stall.min(*grace);
                    *grace = Duration::ZERO;
                    graced += 1;
                }
                if *deadline <= now {
                    if let Slot::Waiting { waker, .. } = std::mem::replace(slot, Slot::Vacant) {
                        expired.push(waker);
                    }
                    vacant.push(index as u32);
                } else if earliest.is_none_or(|earliest| *deadline < earliest) {
                    earliest = Some(*deadline);
                }
            }
            // A burst of calls grew the table; give the memory back once it has drained.
            if vacant.len() == slots.len() && slots.capacity() > 1024 {
                *slots = Vec::new();
                *vacant = Vec::new();
            }
        }
        if earliest.is_some() {
            for shard in 0..SHARDS {
                self.lock(shard).next_wake = earliest;
            }
        }
        (earliest, graced)
    }
}

/// The runtime's id as a number (tokio's `Id` only hashes to one).
/// The id of the runtime this code runs on, as [`runtime_id`] gives it; `None` outside
/// one. Kept per thread for the task running: a task never moves to another runtime, and
/// asking tokio for the runtime clones its handle (two atomic operations per call).
fn current_runtime_id() -> Option<u64> {
    thread_local! {
        static CACHED: Cell<Option<(tokio::task::Id, u64)>> = const { Cell::new(None) };
    }
    let task = tokio::task::try_id();
    if let Some(task) = task
        && let Some((cached, id)) = CACHED.get()
        && cached == task
    {
        return Some(id);
    }
    let id = runtime_id(&tokio::runtime::Handle::try_current().ok()?);
    if let Some(task) = task {
        CACHED.set(Some((task, id)));
    }
    Some(id)
}

fn runtime_id(runtime: &tokio::runtime::Handle) -> u64 {
    /// Keeps the one integer an `Id` hashes.
    #[derive(Default)]
    struct Integer(u64);
    impl Hasher for Integer {
        fn write(&mut self, bytes: &[u8]) {
            for byte in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
        fn finish(&self) -> u64 {
            self.0
        }
    }
    let mut integer = Integer::default();
    runtime.id().hash(&mut integer);
    // 0 means "none" in `last_runtime`; tokio's ids are never 0.
    integer.finish().max(1)
}

/// A driver's listing: if the driver is dropped with its runtime, or before it ever ran,
/// it is unlisted, so the next call from there starts another, and a call from outside
/// a runtime does not count on it.
struct Driving {
    shared: Lease<Shared>,
    runtime: u64,
    by_itself: bool,
    /// False once the driver unlisted itself as it stopped.
    listed: bool,
}

impl Drop for Driving {
    fn drop(&mut self) {
        if !self.listed {
            return;
        }
        let shared = &self.shared;
        shared.remove_driver(self.runtime);
        // Deadlines it was to wake for: another driver takes them over.
        for shard in 0..SHARDS {
            shared.lock(shard).next_wake = None;
        }
        shared.wake.notify_one();
    }
}

/// Whether `runtime` runs its tasks with no one in its `block_on`.
fn runs_by_itself(runtime: &tokio::runtime::Handle) -> bool {
    runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread
}

/// The driver: sleeps until the earliest deadline it knows of, or until told of an
/// earlier one, then wakes the calls that are due. It stops when the services are gone
/// and no call waits.
async fn drive(mut driving: Driving) {
    let (shared, runtime) = (driving.shared.clone(), driving.runtime);
    let mut expired = Vec::new();
    let mut asleep = None;
    let mut stalls = Stalls::default();
    loop {
        let now = Instant::now();
        let stall = shared.stall(now, asleep.take());
        let (mut next, graced) = shared.sweep(now, stall, &mut expired);
        stalls.saw(now, stall, graced);
        for waker in expired.drain(..) {
            waker.wake();
        }
        if next.is_none() && shared.closed.load(Ordering::Acquire) {
            // A call still in flight may take a slot now (see `register`): unlist, then
            // look once more; go on if it did and no other driver was started for it.
            shared.remove_driver(runtime);
            next = shared.sweep(Instant::now(), Duration::ZERO, &mut expired).0;
            for waker in expired.drain(..) {
                waker.wake();
            }
            if next.is_none() || !shared.add_driver(runtime, driving.by_itself) {
                // Unlisted already, and another driver may be listed for this runtime.
                driving.listed = false;
                return;
            }
        }
        match next {
            Some(at) => {
                asleep = Some(Asleep {
                    until: at,
                    since: Since::now(),
                });
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = shared.wake.notified() => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Stalls that held calls up, told in a warning at most once per [`Stalls::EVERY`]: a
/// runtime that is held up is the application's to mend (a blocking call in a task, a
/// CPU limit too tight), and a reason for latency that Redis does not explain.
#[derive(Default)]
struct Stalls {
    warned: Option<Instant>,
    stalls: u64,
    calls: usize,
    longest: Duration,
}

impl Stalls {
    const EVERY: Duration = Duration::from_secs(10);

    /// Counts a stall that held `calls` up, and warns of those counted if it is time.
    fn saw(&mut self, now: Instant, stall: Duration, calls: usize) {
        if calls == 0 {
            return;
        }
        self.stalls += 1;
        self.calls += calls;
        self.longest = self.longest.max(stall);
        if self
            .warned
            .is_some_and(|warned| now.saturating_duration_since(warned) < Stalls::EVERY)
        {
            return;
        }
        self.warned = Some(now);
        tracing::warn!(
            stalls = self.stalls,
            calls = self.calls,
            longest_ms = self.longest.as_secs_f64() * 1e3,
            "redis calls' deadlines passed while the runtime was held up (a blocking call on \
             its thread, or the process throttled or descheduled); they were given time to \
             take the replies that came meanwhile"
        );
        (self.stalls, self.calls, self.longest) = (0, 0, Duration::ZERO);
    }
}

/// The driver's sleep until a deadline, by which it should run again.
struct Asleep {
    until: Instant,
    since: Since,
}

/// A moment on tokio's clock and on the real one, which `tokio::time::pause` does not
/// stop.
struct Since {
    tokio: Instant,
    real: std::time::Instant,
}

impl Since {
    fn now() -> Self {
        Since {
            tokio: Instant::now(),
            real: std::time::Instant::now(),
        }
    }

    /// Whether tokio's clock has run with the real one since: under `pause` it stands
    /// still while real time passes (a blocked thread), and a clock advanced by hand
    /// passes deadlines in no real time.
    fn ran_with_real_time(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.tokio)
            .abs_diff(self.real.elapsed())
            <= STALL
    }
}
