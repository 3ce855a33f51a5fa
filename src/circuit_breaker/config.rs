use std::{fmt, sync::Arc, time::Duration};

use redis::Value;

use super::Transition;
use crate::{Error, backoff::ExponentialBackoff};

/// What a finished call says about Redis's health, as the breaker's classifier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Redis served the call (a `WRONGTYPE` reply included: Redis is fine, the command
    /// was wrong).
    Success,
    /// Evidence of an outage: counts towards the failure rate.
    Failure,
    /// Says nothing either way; not recorded.
    Ignore,
}

/// How a call whose future was dropped before it finished (an outer timeout gave up on
/// it, the client disconnected) is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CancelPolicy {
    /// A failure (and a slow call) if it had run for at least
    /// [`slow_call_duration`](CircuitBreakerConfig::slow_call_duration), otherwise not
    /// recorded. The default: an app-level timeout cannot hide a stalled Redis, and a
    /// client hanging up early says nothing about Redis.
    #[default]
    FailureIfSlow,
    /// Always a failure.
    Failure,
    /// Never recorded.
    Ignore,
}

/// Which recent calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlidingWindow {
    /// The last `n` calls. Costs no clock read.
    Count(u32),
    /// The calls of the last `length`, kept in `buckets` buckets that expire one at a
    /// time. Reads the clock once per call.
    Time {
        /// How far back the window reaches.
        length: Duration,
        /// Into how many buckets it is cut (the expiry granularity).
        buckets: u32,
    },
}

/// The largest count window: counts are packed into one atomic word.
pub(super) const MAX_COUNT_WINDOW: u32 = (1 << 20) - 1;

pub(super) type Classifier = Arc<dyn Fn(&Result<Value, Error>) -> Outcome + Send + Sync>;
pub(super) type OnTransition = Arc<dyn Fn(Transition) + Send + Sync>;

/// How a [`CircuitBreakerLayer`](super::CircuitBreakerLayer) decides, with defaults made
/// for a Redis cache.
///
/// | setting | default | why |
/// |---|---|---|
/// | [`sliding_window`](Self::sliding_window) | last 100 calls | reacts within 100 calls at any traffic level and needs no clock |
/// | [`minimum_calls`](Self::minimum_calls) | 20 | enough evidence that 10 failures are not one unlucky burst, few enough to trip within milliseconds under load |
/// | [`failure_rate_threshold`](Self::failure_rate_threshold) | 50 % | a Redis that fails half its calls is down for a cache |
/// | [`slow_call_duration`](Self::slow_call_duration) | 100 ms | a cache read a thousand times slower than usual helps nobody |
/// | [`slow_call_rate_threshold`](Self::slow_call_rate_threshold) | 100 % | trip on slowness only when every call is slow, for as long as a slow call takes (a Redis that is slow, not one that stalled a moment); timeouts below the breaker catch the rest as failures |
/// | [`wait_in_open`](Self::wait_in_open) | 2 s | a stall rarely ends sooner, and a reconnect ends the wait at once (see [`half_open_on_reconnect`](super::CircuitBreakerLayer::half_open_on_reconnect)) |
/// | [`permitted_calls_in_half_open`](Self::permitted_calls_in_half_open) | 5 | one probe landing in a stray stall must not keep the app dark |
/// | [`on_cancel`](Self::on_cancel) | [`CancelPolicy::FailureIfSlow`] | an outer timeout cannot hide an outage |
/// | classifier | unavailable, timeout and configuration errors fail; server errors and write refusals (`READONLY`, `NOREPLICAS`, `MISCONF`, `UNBLOCKED`) succeed | `WRONGTYPE` is a bug in the app, not an outage; a write refusal (a write that reached a replica after a failover, or a master short of replicas) comes from an up server that refuses writes only, and opening would refuse the reads it serves |
///
/// Blocking commands (`BLPOP k 5`, `XREAD BLOCK`) are never slow calls and are not
/// recorded when cancelled: waiting is what they are for.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::circuit_breaker::{CircuitBreakerConfig, Outcome, SlidingWindow};
///
/// let config = CircuitBreakerConfig::new()
///     .sliding_window(SlidingWindow::Time { length: Duration::from_secs(10), buckets: 10 })
///     .minimum_calls(50)
///     .failure_rate_threshold(25.0)
///     .wait_in_open(Duration::from_secs(1))
///     // Count only lost connections, not timeouts.
///     .classifier(|result| match result {
///         Err(err) if err.is_unavailable() => Outcome::Failure,
///         Err(err) if err.is_circuit_open() => Outcome::Ignore,
///         _ => Outcome::Success,
///     })
///     .on_state_change(|change| eprintln!("redis breaker: {:?} -> {:?}", change.from, change.to));
/// # let _ = config;
/// ```
#[derive(Clone)]
#[must_use]
pub struct CircuitBreakerConfig {
    pub(super) name: Arc<str>,
    pub(super) window: SlidingWindow,
    pub(super) minimum_calls: u32,
    pub(super) failure_rate_threshold: f32,
    pub(super) slow_call_rate_threshold: f32,
    pub(super) slow_call_duration: Duration,
    pub(super) wait_in_open: Duration,
    pub(super) wait_in_open_backoff: Option<ExponentialBackoff>,
    pub(super) permitted_calls_in_half_open: u32,
    pub(super) on_cancel: CancelPolicy,
    pub(super) classifier: Option<Classifier>,
    pub(super) on_state_change: Option<OnTransition>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            name: Arc::from("redis"),
            window: SlidingWindow::Count(100),
            minimum_calls: 20,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration: Duration::from_millis(100),
            wait_in_open: Duration::from_secs(2),
            wait_in_open_backoff: None,
            permitted_calls_in_half_open: 5,
            on_cancel: CancelPolicy::default(),
            classifier: None,
            on_state_change: None,
        }
    }
}

impl CircuitBreakerConfig {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        CircuitBreakerConfig::default()
    }

    /// A name for this breaker in `tracing` events, when an app has several. Default
    /// `"redis"`.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The calls the rates are computed over. Default: the last 100 calls.
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.window = window;
        self
    }

    /// No decision is made before the window holds this many calls. A count window
    /// smaller than this makes the window size the minimum. Default 20.
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = calls;
        self
    }

    /// Open when at least this percentage of the window's calls failed (0 < p ≤ 100).
    /// Default 50.
    pub fn failure_rate_threshold(mut self, percent: f32) -> Self {
        self.failure_rate_threshold = percent;
        self
    }

    /// Open when at least this percentage of the window's calls were slow (0 < p ≤ 100),
    /// and has been for [`slow_call_duration`](Self::slow_call_duration). Default 100:
    /// only when every call is slow.
    ///
    /// The rate must hold that long because a short stall of Redis (a slow command such
    /// as `KEYS` or a large `DEL`, a fork for a snapshot) makes every call in flight slow,
    /// and they all finish together when it ends: with a few hundred calls in flight they
    /// fill the window at once, though the calls after them are fast again. Calls that
    /// stay slow, as from a Redis that is overloaded or far away, hold it there.
    pub fn slow_call_rate_threshold(mut self, percent: f32) -> Self {
        self.slow_call_rate_threshold = percent;
        self
    }

    /// A call that takes at least this long is slow, and the slow-call rate opens the
    /// breaker once it has stood at its threshold this long. Default 100 ms.
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.slow_call_duration = duration;
        self
    }

    /// How long the breaker stays open before letting probes through, when no reconnect
    /// ends the wait sooner. Default 2 s.
    pub fn wait_in_open(mut self, wait: Duration) -> Self {
        self.wait_in_open = wait;
        self
    }

    /// Make the wait grow when probes fail again and again: the n-th open in a row (with
    /// no close in between) waits the n-th delay of `backoff` instead of
    /// [`wait_in_open`](Self::wait_in_open). A close starts the schedule over.
    pub fn wait_in_open_backoff(mut self, backoff: ExponentialBackoff) -> Self {
        self.wait_in_open_backoff = Some(backoff);
        self
    }

    /// How many calls a half-open breaker lets through to test Redis; the rest are
    /// rejected until the probes decide. The probes re-open the breaker as soon as their
    /// failure (or slow-call) rate is sure to reach its threshold, and close it as soon as
    /// it is sure not to. Default 5.
    pub fn permitted_calls_in_half_open(mut self, calls: u32) -> Self {
        self.permitted_calls_in_half_open = calls;
        self
    }

    /// How cancelled calls are recorded. Default [`CancelPolicy::FailureIfSlow`].
    pub fn on_cancel(mut self, policy: CancelPolicy) -> Self {
        self.on_cancel = policy;
        self
    }

    /// Replace the classifier that decides what a finished call says about Redis.
    ///
    /// The default: [unavailable](Error::is_unavailable), [timeout](Error::is_timeout)
    /// and [configuration](Error::is_config) errors are failures, except:
    ///
    /// - Successes: replies, [server errors](Error::is_server), a cluster's redirects
    ///   (`MOVED`, `ASK`: the slot is served elsewhere), and the refusals of a server that
    ///   refuses writes only and serves reads: `READONLY` (a replica), `NOREPLICAS` (a
    ///   master short of replicas, as an old master is once a failover took its replica)
    ///   and `MISCONF` (a master that cannot persist). Opening would turn away the reads
    ///   the server serves.
    /// - Ignored: the refusals a live server answers at once while it serves nothing
    ///   (`LOADING`, `BUSY`, `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`): calls fail fast
    ///   without the breaker, and an open breaker would learn that Redis serves again
    ///   only from a probe, up to [`wait_in_open`](Self::wait_in_open) later. Ignored too:
    ///   [circuit-open](Error::is_circuit_open) errors (from another breaker), requests
    ///   the leaf refused to send (a `SELECT` or `SUBSCRIBE` on the shared connection, see
    ///   [`CommandInfo::changes_connection`](crate::CommandInfo::changes_connection)), a
    ///   blocking command that found no connection of its own (Redis at `maxclients`)
    ///   while the shared one works, timeouts on a deadline the request carried
    ///   itself ([`Error::is_own_deadline`]), and calls refused unsent while Redis holds up
    ///   the shared connection but serves reads on another
    ///   ([`side_reads`](crate::reconnect::ReconnectConfig::side_reads)): the timeouts
    ///   that made the connection suspect were counted, and writes failing fast would
    ///   otherwise open the breaker over the reads served meanwhile.
    pub fn classifier<F>(mut self, classify: F) -> Self
    where
        F: Fn(&Result<Value, Error>) -> Outcome + Send + Sync + 'static,
    {
        self.classifier = Some(Arc::new(classify));
        self
    }

    /// Call this on every state change (after it happened), for alerting of your own.
    /// Keep it quick: it runs on the task whose call caused the change.
    pub fn on_state_change<F>(mut self, hook: F) -> Self
    where
        F: Fn(Transition) + Send + Sync + 'static,
    {
        self.on_state_change = Some(Arc::new(hook));
        self
    }

    /// Checks the settings, so a typo is a clear error at startup.
    pub(super) fn validate(&self) -> Result<(), Error> {
        let rate = |name: &str, percent: f32| {
            if percent > 0.0 && percent <= 100.0 {
                Ok(())
            } else {
                Err(Error::config(format!(
                    "circuit breaker: {name} must be above 0 and at most 100, got {percent}"
                )))
            }
        };
        rate("failure_rate_threshold", self.failure_rate_threshold)?;
        rate("slow_call_rate_threshold", self.slow_call_rate_threshold)?;
        match self.window {
            SlidingWindow::Count(n) if n == 0 || n > MAX_COUNT_WINDOW => {
                return Err(Error::config(format!(
                    "circuit breaker: a count window holds 1 to {MAX_COUNT_WINDOW} calls, got {n}"
                )));
            }
            SlidingWindow::Time { length, buckets } => {
                if buckets == 0 || length.is_zero() || length.as_nanos() < u128::from(buckets) {
                    return Err(Error::config(format!(
                        "circuit breaker: a time window needs a length and at least one bucket, \
                         got {length:?} in {buckets} buckets"
                    )));
                }
            }
            SlidingWindow::Count(_) => {}
        }
        if self.minimum_calls == 0 {
            return Err(Error::config(
                "circuit breaker: minimum_calls must be at least 1",
            ));
        }
        if self.permitted_calls_in_half_open == 0 || self.permitted_calls_in_half_open > 1 << 20 {
            return Err(Error::config(format!(
                "circuit breaker: permitted_calls_in_half_open must be 1 to {}, got {}",
                1 << 20,
                self.permitted_calls_in_half_open
            )));
        }
        Ok(())
    }

    /// The default classifier, inlined on the hot path; errors are classified out of line.
    #[inline]
    pub(super) fn classify(&self, result: &Result<Value, Error>) -> Outcome {
        match (&self.classifier, result) {
            (Some(classify), result) => classify(result),
            (None, Ok(_)) => Outcome::Success,
            (None, Err(err)) => classify_error(err),
        }
    }
}

impl fmt::Debug for CircuitBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerConfig")
            .field("name", &self.name)
            .field("window", &self.window)
            .field("minimum_calls", &self.minimum_calls)
            .field("failure_rate_threshold", &self.failure_rate_threshold)
            .field("slow_call_rate_threshold", &self.slow_call_rate_threshold)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("wait_in_open", &self.wait_in_open)
            .field("wait_in_open_backoff", &self.wait_in_open_backoff)
            .field(
                "permitted_calls_in_half_open",
                &self.permitted_calls_in_half_open,
            )
            .field("on_cancel", &self.on_cancel)
            .field("custom_classifier", &self.classifier.is_some())
            .finish_non_exhaustive()
    }
}

/// What the default classifier makes of an error.
#[inline(never)]
fn classify_error(err: &Error) -> Outcome {
    match err {
        // Never sent: another breaker's rejection, or a request the leaf refused (a SELECT
        // or SUBSCRIBE on the shared connection): the app's mistake.
        err if err.is_circuit_open() || err.is_refused() => Outcome::Ignore,
        // A blocking command found no connection of its own (Redis at `maxclients`) while
        // the shared one works: opening would refuse the calls it serves.
        err if err.is_no_connection_of_its_own() => Outcome::Ignore,
        // Its caller's own budget ran out (`Request::with_deadline`): one impatient caller
        // must not cut Redis off for the others. The layer's deadlines speak for Redis.
        err if err.is_own_deadline() => Outcome::Ignore,
        // Refused unsent while Redis holds up the shared connection but serves reads on
        // another (a write pause): the timeouts that made it suspect were counted, and
        // writes failing fast would otherwise open the breaker over the reads served.
        err if err.is_held() => Outcome::Ignore,
        // Not sent: a cluster's master that cannot be reached. The breaker every node's
        // calls share must not open for one node, while the others serve.
        err if err.is_master_gone() => Outcome::Ignore,
        // Redis is up and answered at once that it serves nothing for now (loading its
        // data, running a script): calls fail fast as it is, and an open breaker would
        // keep the app dark for up to `wait_in_open` after Redis serves again.
        err if err.is_refusal_of_a_live_server() => Outcome::Ignore,
        err if err.is_server() => Outcome::Success,
        // Redis is up and refused a write only (a replica after a failover, a master short
        // of replicas): reads through the breaker are served, and opening would refuse
        // them. `Reconnect` looks for the master.
        err if err.is_write_refusal() => Outcome::Success,
        // A cluster node redirected it: the slot moved (a failover, a resharding).
        err if err.is_redirect() => Outcome::Success,
        _ => Outcome::Failure,
    }
}
