use std::{fmt, sync::Arc, time::Duration};

use tower::Layer;

use super::{Timeout, timer::Timer};
use crate::{Blocking, Error, Request, request::canonical_name};

/// Gives every request a deadline: a default, per-command overrides, a deadline for a
/// whole pipeline, and for blocking commands their own block time plus a grace.
///
/// | request | deadline |
/// |---------|----------|
/// | a request with a deadline of its own ([`Request::with_deadline`]) | its own, whatever it is |
/// | a command with an [override](TimeoutLayer::command) | the override, whatever it is |
/// | `GET k` (not blocking) | the default (250 ms unless given) |
/// | a pipeline or transaction | [`pipeline`](TimeoutLayer::pipeline) for the whole batch (default: the default) |
/// | `BLPOP k 5`, `XREAD BLOCK 5000 ..` | the block time + [`blocking_grace`](TimeoutLayer::blocking_grace) (default: the default), at most [`blocking_cap`](TimeoutLayer::blocking_cap) |
/// | `BLPOP k 0`, `WAIT 1 0` (block forever) | none, unless capped |
///
/// A pipeline that holds blocking commands is treated as blocking for the sum of their
/// block times, as Redis runs them one after the other. A deadline too long to represent
/// (`Duration::MAX`) means none.
///
/// Put it under the breaker and above retries (`CircuitBreaker → Timeout → Retry →
/// Reconnect`): the deadline then covers retries and backoff, and the breaker sees the
/// timeouts. Calls it abandons are dropped, which tells the layers below (Reconnect
/// replaces a connection that keeps being abandoned).
///
/// The runtime's own stalls are not charged to a call: when the application's runtime
/// cannot run (a blocking call on its thread, the process throttled or descheduled), a
/// reply Redis sent meanwhile waits unread in the socket, and the deadline passes. So a
/// call whose deadline passed while the layer's timer ran late by more than 2 ms is given
/// as long again as the stall held it up, at most its deadline, once: the reply is taken
/// when the runtime runs again, rather than thrown away as a timeout. A stall is only seen
/// while tokio's clock runs with the real one; under `tokio::time::pause` deadlines are
/// exact. Stalls that held calls up are told in a warning (at most one per 10 s, with how
/// many and the longest), since a runtime that is held up is the application's to mend.
///
/// Needs a Tokio runtime with time enabled, as redis-rs does. A call made outside any
/// (polled by another executor, as `futures::executor::block_on` on a thread of the
/// app's own does) is timed on a multi-threaded runtime the layer's services were made on
/// or used from; with none running, it ends at once with a
/// [config](crate::Error::is_config) error that says it [may have
/// run](crate::Error::may_have_run).
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::{Request, timeout::TimeoutLayer};
///
/// # fn main() -> Result<(), tower_redis_resilience::Error> {
/// let timeouts = TimeoutLayer::new(Duration::from_millis(100))
///     .command("KEYS", Duration::from_secs(5))?
///     .pipeline(Duration::from_millis(500));
///
/// let deadline = |cmd: &redis::Cmd| timeouts.deadline_for(&Request::from(cmd));
/// assert_eq!(deadline(redis::cmd("GET").arg("k")), Some(Duration::from_millis(100)));
/// assert_eq!(deadline(redis::cmd("keys").arg("*")), Some(Duration::from_secs(5)));
/// // Blocks for 2 s, then gets the grace (here, the default).
/// assert_eq!(deadline(redis::cmd("BLPOP").arg("q").arg(2)), Some(Duration::from_millis(2100)));
/// // Blocks forever: no deadline unless capped.
/// assert_eq!(deadline(redis::cmd("BLPOP").arg("q").arg(0)), None);
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct TimeoutLayer {
    deadlines: Arc<Deadlines>,
    /// Shared by every service made from this layer and its clones.
    pub(super) timer: Timer,
}

#[derive(Debug, Clone)]
pub(crate) struct Deadlines {
    default: Duration,
    pipeline: Option<Duration>,
    blocking_grace: Option<Duration>,
    blocking_cap: Option<Duration>,
    /// Few, so a scan beats a map; names are canonical.
    overrides: Vec<(&'static str, Duration)>,
    /// False for a layer that stands in for a removed one: no call has a deadline.
    on: bool,
}

/// The default deadline: for a cache, an answer later than this is worse than a miss,
/// and a healthy Redis answers in well under a millisecond.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

impl Deadlines {
    /// The deadline of a request; `None` when it has none.
    #[inline]
    pub(crate) fn for_request(&self, request: &Request) -> Option<Duration> {
        if !self.on {
            return None;
        }
        if let Some(own) = request.deadline() {
            return Some(own);
        }
        let info = request.info();
        if !self.overrides.is_empty()
            && let Some((_, limit)) = self.overrides.iter().find(|(name, _)| *name == info.name())
        {
            return Some(*limit);
        }
        let limit = match info.blocking() {
            Blocking::No if request.pipeline().is_some() => {
                return self.pipeline.or(Some(self.default));
            }
            Blocking::No => return Some(self.default),
            Blocking::For(block) => {
                Some(block.saturating_add(self.blocking_grace.unwrap_or(self.default)))
            }
            Blocking::Forever => None,
        };
        match (limit, self.blocking_cap) {
            (Some(limit), Some(cap)) => Some(limit.min(cap)),
            (limit, cap) => limit.or(cap),
        }
    }
}

impl Default for TimeoutLayer {
    /// A 250 ms default deadline, no overrides.
    fn default() -> Self {
        TimeoutLayer::new(DEFAULT_TIMEOUT)
    }
}

impl TimeoutLayer {
    /// Every request gets `default` unless something below says otherwise.
    pub fn new(default: Duration) -> Self {
        TimeoutLayer {
            deadlines: Arc::new(Deadlines {
                default,
                pipeline: None,
                blocking_grace: None,
                blocking_cap: None,
                overrides: Vec::new(),
                on: true,
            }),
            timer: Timer::default(),
        }
    }

    /// A layer that gives no call a deadline. What the builder puts in place of a
    /// removed timeout, so the stack keeps one type.
    pub(crate) fn off() -> Self {
        let mut layer = TimeoutLayer::default();
        Arc::make_mut(&mut layer.deadlines).on = false;
        layer
    }

    /// The deadline for every request named `command` (`"KEYS"`, `"config get"`,
    /// `"EVALSHA"`, `"PIPELINE"`, `"MULTI"` for transactions, `"UNKNOWN"` for commands
    /// missing from the command table), instead of anything else, blocking or not.
    /// A name no request can have is a [config](Error::is_config) error.
    pub fn command(mut self, command: &str, limit: Duration) -> Result<Self, Error> {
        let Some(name) = canonical_name(command) else {
            return Err(Error::config(format!(
                "no Redis command is named `{command}`; use a name such as `GET`, `CONFIG GET` or `PIPELINE`"
            )));
        };
        let deadlines = Arc::make_mut(&mut self.deadlines);
        deadlines.overrides.retain(|(n, _)| *n != name);
        deadlines.overrides.push((name, limit));
        Ok(self)
    }

    /// One deadline for a whole pipeline or transaction, however many commands it holds.
    /// Default: the default deadline.
    pub fn pipeline(mut self, limit: Duration) -> Self {
        Arc::make_mut(&mut self.deadlines).pipeline = Some(limit);
        self
    }

    /// How long past its block time a blocking command may take (`BLPOP k 5` gets
    /// `5 s + grace`). Default: the default deadline, the time any command may take.
    pub fn blocking_grace(mut self, grace: Duration) -> Self {
        Arc::make_mut(&mut self.deadlines).blocking_grace = Some(grace);
        self
    }

    /// The longest deadline a blocking command gets, including the ones that block
    /// forever (`BLPOP k 0`), which otherwise have none.
    pub fn blocking_cap(mut self, cap: Duration) -> Self {
        Arc::make_mut(&mut self.deadlines).blocking_cap = Some(cap);
        self
    }

    /// The deadline this layer gives `request`; `None` when it has none.
    pub fn deadline_for(&self, request: &Request) -> Option<Duration> {
        self.deadlines.for_request(request)
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        self.timer.remember_runtime();
        Timeout {
            inner,
            deadlines: self.deadlines.clone(),
            timer: self.timer.clone(),
        }
    }
}

impl fmt::Debug for TimeoutLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.deadlines, f)
    }
}
