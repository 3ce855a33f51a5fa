//! The breaker every service of one layer shares: a state word read on every call, the
//! window, and the rarely taken lock that serialises state changes.

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*},
    },
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle, time::Instant};

use super::{
    BreakerMetrics, BreakerState, Transition,
    config::{CircuitBreakerConfig, Outcome},
    window::{Counts, FAILED, PackedCounts, RECORDED, SLOW, Sample, Window},
};
use crate::{
    Error,
    backoff::Delays,
    clock,
    reconnect::ConnectionState,
    sync::{Leased, Padded},
};

// The state word: `epoch << 8 | code`. The epoch grows with every change, so a call admitted
// under one state is not counted in the next.
const CLOSED: u64 = 0;
/// Open, with a task that will move it to half-open: rejecting reads no clock.
const OPEN: u64 = 1;
/// Open with no task to end the wait (no runtime when it opened, or the runtime shut
/// down since): callers check the clock.
const OPEN_UNDRIVEN: u64 = 2;
const HALF_OPEN: u64 = 3;
const FORCED_OPEN: u64 = 4;
const DISABLED: u64 = 5;

const CODE_MASK: u64 = 0xff;

fn code(word: u64) -> u64 {
    word & CODE_MASK
}

fn public(word: u64) -> BreakerState {
    match code(word) {
        CLOSED => BreakerState::Closed,
        OPEN | OPEN_UNDRIVEN => BreakerState::Open,
        HALF_OPEN => BreakerState::HalfOpen,
        FORCED_OPEN => BreakerState::ForcedOpen,
        _ => BreakerState::Disabled,
    }
}

/// The state word a call was admitted under, and whether it is a half-open probe.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket {
    word: u64,
}

impl Ticket {
    fn probe(self) -> bool {
        code(self.word) == HALF_OPEN
    }
}

pub(super) enum Admission {
    /// Call, and record the outcome.
    Record(Ticket),
    /// Call; nothing is recorded (disabled).
    Pass,
    /// Reject: the breaker was in this state.
    Reject(u64),
}

pub(super) struct Shared {
    pub(super) config: CircuitBreakerConfig,
    /// Read by every call; on lines of its own, away from the counters calls write.
    state: Padded<AtomicU64>,
    window: Window,
    minimum_calls: u64,
    /// Since when the slow-call rate has stood at its threshold, in nanoseconds after
    /// `origin` plus one; 0 while it does not. It opens the breaker only once it has
    /// stood there for `slow_call_duration`.
    slow_since: AtomicU64,
    /// Taken and outcome counts of the current half-open period.
    probes_taken: AtomicU32,
    probes: PackedCounts,
    /// Probe failures (slow probes) that re-open the breaker.
    probe_failures_to_open: u64,
    probe_slow_to_open: u64,
    /// When the open breaker lets probes through, after `origin`: seconds in the high
    /// half, nanoseconds in the low half, so a rejection divides nothing.
    open_until: AtomicU64,
    origin: Instant,
    control: Mutex<Control>,
    states: watch::Sender<BreakerState>,
    /// The owner the services hold, for the task that ends an open wait: it stops when
    /// the services are gone.
    this: Weak<Leased<Shared>>,
    /// Whether a connection was given to follow ([`follow_connection`]).
    follows: AtomicBool,
    /// How many tasks follow it. One runs on the runtime that started it and ends with
    /// it; a rejection on another runtime, finding none, starts one there (a client
    /// shared by runtimes, as `#[tokio::test]`s share a static one).
    following: AtomicU32,
}

/// What only state changes touch.
#[derive(Default)]
struct Control {
    /// The growing wait of repeated opens, when configured; reset by a close.
    reopen_delays: Option<Delays>,
    driver: Option<JoinHandle<()>>,
    /// The connection state followed, when one is ([`half_open_on_reconnect`]).
    ///
    /// [`half_open_on_reconnect`]: super::CircuitBreakerLayer::half_open_on_reconnect
    connection: Option<watch::Receiver<ConnectionState>>,
}

impl Shared {
    /// A breaker in its owner, shared by the services: calls lease it.
    pub(super) fn new(config: CircuitBreakerConfig) -> Arc<Leased<Shared>> {
        Shared::starting(config, CLOSED)
    }

    /// A breaker disabled from the start (no transition logged or published).
    pub(super) fn disabled(config: CircuitBreakerConfig) -> Arc<Leased<Shared>> {
        Shared::starting(config, DISABLED)
    }

    fn starting(config: CircuitBreakerConfig, state: u64) -> Arc<Leased<Shared>> {
        Arc::new_cyclic(|this| Leased::new(Shared::with_owner(config, this.clone(), state)))
    }

    fn with_owner(config: CircuitBreakerConfig, this: Weak<Leased<Shared>>, state: u64) -> Shared {
        let origin = Instant::now();
        let window = Window::new(config.window, origin);
        let minimum_calls =
            u64::from(config.minimum_calls).min(window.capacity().unwrap_or(u64::MAX));
        let permitted = f64::from(config.permitted_calls_in_half_open);
        let needed = |percent: f32| ((f64::from(percent) * permitted / 100.0).ceil() as u64).max(1);
        Shared {
            probe_failures_to_open: needed(config.failure_rate_threshold),
            probe_slow_to_open: needed(config.slow_call_rate_threshold),
            state: Padded(AtomicU64::new(state)),
            window,
            minimum_calls,
            slow_since: AtomicU64::new(0),
            probes_taken: AtomicU32::new(0),
            probes: PackedCounts::default(),
            open_until: AtomicU64::new(0),
            origin,
            control: Mutex::new(Control::default()),
            states: watch::channel(public(state)).0,
            this,
            follows: AtomicBool::new(false),
            following: AtomicU32::new(0),
            config,
        }
    }

    /// Decides whether a call may go through. The closed path is one atomic load.
    #[inline]
    pub(super) fn admit(&self) -> Admission {
        let word = self.state.load(Acquire);
        match code(word) {
            CLOSED => Admission::Record(Ticket { word }),
            OPEN => Admission::Reject(word),
            DISABLED => Admission::Pass,
            _ => self.admit_slow(word),
        }
    }

    #[cold]
    fn admit_slow(&self, word: u64) -> Admission {
        if code(word) == OPEN_UNDRIVEN && self.end_wait_if_due(word) {
            return self.admit();
        }
        if code(word) == HALF_OPEN {
            let permitted = self.config.permitted_calls_in_half_open;
            let taken = self.probes_taken.fetch_update(AcqRel, Acquire, |taken| {
                (taken < permitted).then_some(taken + 1)
            });
            if taken.is_ok() {
                return Admission::Record(Ticket { word });
            }
        }
        Admission::Reject(word)
    }

    /// Why a call is rejected under `word`: made into its error when the call's future
    /// is polled, so the future carries a few words rather than a whole error.
    #[inline]
    pub(super) fn rejection(&self, word: u64) -> Rejection {
        match code(word) {
            OPEN | OPEN_UNDRIVEN => Rejection::Until(self.open_until()),
            HALF_OPEN => Rejection::HalfOpen,
            _ => Rejection::Forced,
        }
    }

    #[inline]
    fn open_until(&self) -> Instant {
        let packed = self.open_until.load(Relaxed);
        let after = Duration::new(packed >> 32, packed as u32);
        self.origin.checked_add(after).unwrap_or(self.origin)
    }

    fn set_open_until(&self, wait: Duration) {
        let since = Instant::now()
            .saturating_duration_since(self.origin)
            .saturating_add(wait);
        let secs = since.as_secs().min(u64::from(u32::MAX));
        self.open_until
            .store(secs << 32 | u64::from(since.subsec_nanos()), Relaxed);
    }

    /// Moves an open breaker whose wait is over to half-open. True if it did.
    fn end_wait_if_due(&self, word: u64) -> bool {
        Instant::now() >= self.open_until()
            && self.change(Some(word), HALF_OPEN, "wait in open elapsed")
    }

    /// Records what a finished call said. `now` is a clock reading the caller already
    /// has, if any.
    pub(super) fn record(
        &self,
        ticket: Ticket,
        outcome: Outcome,
        slow: bool,
        now: Option<Instant>,
    ) {
        let sample: Sample = match outcome {
            Outcome::Ignore => return self.ignore(ticket),
            Outcome::Success => RECORDED,
            Outcome::Failure => RECORDED | FAILED,
        } | if slow { SLOW } else { 0 };
        let word = self.state.load(Acquire);
        if word != ticket.word {
            // The state changed since this call was admitted: it belongs to a past period.
            return;
        }
        if ticket.probe() {
            return self.record_probe(word, sample);
        }
        let counts = match self.window.record(sample, now) {
            Some(counts) => counts,
            // The same sample as the one it replaced: the rates did not change, but time
            // went by while the slow-call rate stood at its threshold.
            None if self.slow_since.load(Relaxed) != 0 => self.window.counts(),
            None => return,
        };
        if self.trips(counts, now) {
            self.change(
                Some(word),
                OPEN,
                "failure or slow-call rate reached its threshold",
            );
        }
    }

    /// A call that says nothing: gives its probe permit back.
    pub(super) fn ignore(&self, ticket: Ticket) {
        if ticket.probe() && self.state.load(Acquire) == ticket.word {
            self.probes_taken.fetch_sub(1, AcqRel);
        }
    }

    /// Whether the window's rates open the breaker: the failure rate at its threshold, or
    /// the slow-call rate at its own for `slow_call_duration` (`now` is the time the call
    /// finished, if it was read).
    ///
    /// The slow-call rate waits because the calls a short stall of Redis holds up (a slow
    /// command, a fork) all finish together when it ends: a window full of slow calls
    /// that says once that Redis stalled, not that it is slow, and the calls after it are
    /// fast again. A stall past the deadline is seen as timeouts, failures.
    fn trips(&self, counts: Counts, now: Option<Instant>) -> bool {
        let config = &self.config;
        let calls = counts.calls as f32;
        let reached = |part: u64, threshold: f32| part as f32 * 100.0 >= threshold * calls;
        if counts.calls < self.minimum_calls {
            self.slow_rate_fell();
            return false;
        }
        if reached(counts.failures, config.failure_rate_threshold) {
            return true;
        }
        if !reached(counts.slow, config.slow_call_rate_threshold) {
            self.slow_rate_fell();
            return false;
        }
        // Only while calls are slow: a call that was not has no reading of its own.
        let now = now.unwrap_or_else(clock::now);
        let at = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let since = match self.slow_since.compare_exchange(0, at, Relaxed, Relaxed) {
            Ok(_) => at,
            Err(since) => since,
        };
        let sustained = u64::try_from(config.slow_call_duration.as_nanos()).unwrap_or(u64::MAX);
        at.saturating_sub(since) >= sustained
    }

    fn slow_rate_fell(&self) {
        if self.slow_since.load(Relaxed) != 0 {
            self.slow_since.store(0, Relaxed);
        }
    }

    /// Half-open decides as soon as the permitted probes' rates are sure to reach a
    /// threshold (re-open) or sure not to (close).
    fn record_probe(&self, word: u64, sample: Sample) {
        let Some(probes) = self.probes.replace(0, sample) else {
            return;
        };
        let permitted = u64::from(self.config.permitted_calls_in_half_open);
        let remaining = permitted.saturating_sub(probes.calls);
        if probes.failures >= self.probe_failures_to_open || probes.slow >= self.probe_slow_to_open
        {
            self.change(Some(word), OPEN, "probes failed");
        } else if probes.failures + remaining < self.probe_failures_to_open
            && probes.slow + remaining < self.probe_slow_to_open
        {
            self.change(Some(word), CLOSED, "probes succeeded");
        }
    }

    /// The connection serves again: an open breaker probes at once. On a new connection
    /// (not one put back after answering a `PING`), a closed breaker also forgets the
    /// calls it counted: they were the lost connection's, and with few calls a second the
    /// window would otherwise reach `minimum_calls` only after Redis is back, and open
    /// on an outage that has ended.
    pub(super) fn on_reconnected(&self, new_connection: bool) {
        let word = self.state.load(Acquire);
        match code(word) {
            OPEN | OPEN_UNDRIVEN => {
                self.change(
                    Some(word),
                    HALF_OPEN,
                    "redis reconnected, or the part of it that failed was fenced off",
                );
            }
            CLOSED if new_connection => self.forgive(word),
            _ => {}
        }
    }

    /// Starts a new window while closed, under a new epoch: the calls in the window, and
    /// those in flight, whose outcomes would come after (a lost connection's, which time
    /// out; a fenced-off cluster master's), are not counted. Nothing if the state is no
    /// longer `word`.
    fn forgive(&self, word: u64) {
        let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if self.state.load(Acquire) == word {
            self.window.clear();
            self.slow_since.store(0, Relaxed);
            self.state
                .store(((word >> 8) + 1) << 8 | code(word), Release);
        }
        drop(control);
    }

    /// Changes state if it is still `expected` (any state for `None`, the manual
    /// controls). True if it changed.
    pub(super) fn change(&self, expected: Option<u64>, to: u64, reason: &'static str) -> bool {
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let word = self.state.load(Acquire);
        if expected.is_some_and(|expected| expected != word) {
            return false;
        }
        let mut to = to;
        let mut wait = Duration::ZERO;
        // The next period's slow calls are timed afresh.
        self.slow_since.store(0, Relaxed);
        match to {
            CLOSED => {
                self.window.clear();
                control.reopen_delays = None;
            }
            OPEN => {
                wait = self.next_wait(&mut control);
                self.set_open_until(wait);
                if !self.ensure_driver(&mut control) {
                    to = OPEN_UNDRIVEN;
                }
            }
            HALF_OPEN => {
                self.probes.clear();
                self.probes_taken.store(0, Release);
            }
            FORCED_OPEN => {}
            _ => control.reopen_delays = None,
        }
        let counts = self.window.counts();
        let new_word = ((word >> 8) + 1) << 8 | to;
        self.state.store(new_word, Release);
        let transition = Transition {
            from: public(word),
            to: public(new_word),
        };
        self.states.send_replace(transition.to);
        drop(control);
        self.trace(transition, reason, counts, wait);
        if let Some(hook) = &self.config.on_state_change {
            hook(transition);
        }
        true
    }

    fn next_wait(&self, control: &mut Control) -> Duration {
        let Some(backoff) = &self.config.wait_in_open_backoff else {
            return self.config.wait_in_open;
        };
        control
            .reopen_delays
            .get_or_insert_with(|| backoff.iter())
            .next()
            .unwrap_or_else(|| backoff.max())
    }

    /// Makes sure a task will end the open wait; false if there is no runtime to run it.
    fn ensure_driver(&self, control: &mut Control) -> bool {
        if control
            .driver
            .as_ref()
            .is_some_and(|driver| !driver.is_finished())
        {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        control.driver = Some(runtime.spawn(drive(
            DriverGone(self.this.clone()),
            self.states.subscribe(),
        )));
        true
    }

    fn trace(&self, transition: Transition, reason: &'static str, counts: Counts, wait: Duration) {
        let name = &*self.config.name;
        let Transition { from, to } = transition;
        match to {
            BreakerState::Open => tracing::warn!(
                breaker = name,
                ?from,
                reason,
                calls = counts.calls,
                failed_calls = counts.failures,
                slow_calls = counts.slow,
                ?wait,
                "circuit breaker opened: redis calls are rejected until it probes again"
            ),
            BreakerState::Closed => {
                tracing::info!(breaker = name, ?from, reason, "circuit breaker closed")
            }
            BreakerState::HalfOpen => {
                tracing::info!(
                    breaker = name,
                    reason,
                    "circuit breaker half-open: probing redis"
                )
            }
            BreakerState::ForcedOpen => {
                tracing::warn!(breaker = name, ?from, "circuit breaker forced open by hand")
            }
            BreakerState::Disabled => {
                tracing::warn!(breaker = name, ?from, "circuit breaker disabled by hand")
            }
        }
    }

    pub(super) fn state(&self) -> BreakerState {
        public(self.state.load(Acquire))
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.states.subscribe()
    }

    /// Follows `connection` from now on, with a task on the current runtime; the last
    /// connection given is the one a task started again on another runtime follows.
    pub(super) fn follow(
        &self,
        runtime: &tokio::runtime::Handle,
        connection: watch::Receiver<ConnectionState>,
    ) {
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connection = Some(connection.clone());
        self.follows.store(true, Release);
        self.following.fetch_add(1, AcqRel);
        let following = Following(self.this.clone());
        runtime.spawn(follow_connection(following, self.subscribe(), connection));
    }

    /// Starts a task that follows the connection on the current runtime if none runs (the
    /// one that did ended with the runtime that started it). Called on a rejection: two
    /// relaxed loads while one runs.
    #[inline]
    pub(super) fn keep_following(&self) {
        if !self.follows.load(Relaxed) || self.following.load(Relaxed) > 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let connection = self
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connection
            .clone();
        let Some(connection) = connection else {
            return;
        };
        if connection.has_changed().is_err() {
            // The connection is gone: nothing to follow any more.
            self.follows.store(false, Release);
            return;
        }
        if self
            .following
            .compare_exchange(0, 1, AcqRel, Acquire)
            .is_err()
        {
            return;
        }
        let following = Following(self.this.clone());
        runtime.spawn(follow_connection(following, self.subscribe(), connection));
    }

    pub(super) fn metrics(&self) -> BreakerMetrics {
        let counts = self.window.counts();
        let rate = |part: u64| {
            (counts.calls >= self.minimum_calls).then(|| part as f32 * 100.0 / counts.calls as f32)
        };
        BreakerMetrics {
            state: self.state(),
            calls: counts.calls,
            failed_calls: counts.failures,
            slow_calls: counts.slow,
            failure_rate: rate(counts.failures),
            slow_call_rate: rate(counts.slow),
        }
    }

    pub(super) fn force_open(&self) {
        self.change(None, FORCED_OPEN, "forced open");
    }

    pub(super) fn disable(&self) {
        self.change(None, DISABLED, "disabled");
    }

    pub(super) fn reset(&self) {
        self.change(None, CLOSED, "reset by hand");
    }
}

/// Ends each open wait: when it has elapsed, or at once on a reconnect (see
/// [`follow_connection`]). Lives as long as the breaker.
///
/// The guard is an argument so that it is dropped with the future even if the task never
/// ran.
async fn drive(gone: DriverGone, mut states: watch::Receiver<BreakerState>) {
    let breaker = gone.0.clone();
    loop {
        let open = {
            let Some(shared) = breaker.upgrade() else {
                return;
            };
            let word = shared.state.load(Acquire);
            (code(word) == OPEN).then(|| (word, shared.open_until()))
        };
        match open {
            Some((word, until)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {
                        if let Some(shared) = breaker.upgrade() {
                            shared.change(Some(word), HALF_OPEN, "wait in open elapsed");
                        }
                    }
                    changed = states.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if states.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Dropped with the driver's future: if its runtime shuts down while the breaker is open,
/// callers take over ending the wait.
struct DriverGone(Weak<Leased<Shared>>);

impl Drop for DriverGone {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            let word = shared.state.load(Acquire);
            if code(word) == OPEN {
                let undriven = word & !CODE_MASK | OPEN_UNDRIVEN;
                let _ = shared
                    .state
                    .compare_exchange(word, undriven, AcqRel, Acquire);
            }
        }
    }
}

/// Tells the breaker whenever the connection serves again (see
/// [`Shared::on_reconnected`]). Ends when either side is dropped.
async fn follow_connection(
    following: Following,
    mut states: watch::Receiver<BreakerState>,
    mut connection: watch::Receiver<ConnectionState>,
) {
    let breaker = following.0.clone();
    let mut before = *connection.borrow_and_update();
    loop {
        tokio::select! {
            changed = connection.changed() => {
                if changed.is_err() {
                    return;
                }
                // A change to `Connected` from `Connected` had others in between that
                // this task did not see: taken for a new connection.
                let now = *connection.borrow_and_update();
                if now == ConnectionState::Connected {
                    let Some(shared) = breaker.upgrade() else {
                        return;
                    };
                    shared.on_reconnected(before != ConnectionState::Suspect);
                }
                before = now;
            }
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}

/// Held by the future of a task that follows the connection: dropped with it however it
/// ends (its runtime shut down, even before it first ran), it counts the task out.
struct Following(Weak<Leased<Shared>>);

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.following.fetch_sub(1, AcqRel);
        }
    }
}

/// Why the breaker turned a call away.
#[derive(Debug, Clone, Copy)]
pub(super) enum Rejection {
    /// Open: the next probe is due then.
    Until(Instant),
    /// Half-open, with every probe taken.
    HalfOpen,
    /// Forced open by hand.
    Forced,
}

impl Rejection {
    #[inline]
    pub(super) fn into_error(self) -> Error {
        match self {
            Rejection::Until(at) => Error::circuit_open_until(at),
            Rejection::HalfOpen => Error::circuit_open(Duration::ZERO),
            Rejection::Forced => Error::circuit_forced_open(),
        }
    }
}
