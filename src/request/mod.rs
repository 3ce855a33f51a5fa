//! What flows through the stack: a command or a pipeline, and what is known about it.

mod info;
mod shared_cmd;
mod spec;
mod table;

pub(crate) use info::canonical_name;
#[cfg(feature = "cluster")]
pub(crate) use info::simple_args;
pub use info::{Blocking, CommandInfo, PIPELINE, TRANSACTION, UNKNOWN_COMMAND};
pub(crate) use shared_cmd::SharedCmd;

use std::{num::NonZeroU64, sync::Arc, time::Duration};

use redis::{Cmd, Pipeline};
use tokio::time::Instant;

/// One request for Redis: a [`Cmd`] or a [`Pipeline`] (plain or `.atomic()`), with its
/// [`CommandInfo`] computed once so no layer parses arguments again.
///
/// A command answers its reply as a [`redis::Value`]. A plain pipeline answers
/// `Value::Array` of its replies in order (a command's server error stays in its slot as
/// `Value::ServerError`); an atomic pipeline answers the `EXEC` reply, `Value::Array` of
/// the queued commands' replies.
///
/// ```
/// use tower_redis_resilience::Request;
///
/// let request = Request::from(redis::cmd("SET").arg("k").arg("v").to_owned());
/// assert_eq!(request.info().name(), "SET");
///
/// let mut pipe = redis::pipe();
/// pipe.atomic().cmd("INCR").arg("n").cmd("GET").arg("n");
/// let request = Request::from(pipe);
/// assert_eq!(request.info().name(), "MULTI");
/// assert!(!request.info().is_idempotent());
/// ```
#[derive(Debug, Clone)]
pub struct Request {
    body: Body,
    info: CommandInfo,
    /// When the first layer that needed the time saw it, so a stack reads the clock once
    /// per request for its start (deadline, latency, slowness) however many layers use it.
    start: Option<Instant>,
    /// The deadline its caller gave it, in nanoseconds plus one (eight bytes where an
    /// `Option<Duration>` takes sixteen: every layer moves the request).
    deadline: Option<NonZeroU64>,
}

/// Shared, so cloning a request for a possible retry costs a reference count, not a copy
/// of the command's buffers.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    Cmd(SharedCmd),
    Pipeline(Arc<Pipeline>),
}

impl Request {
    /// What the stack knows about this request.
    pub fn info(&self) -> &CommandInfo {
        &self.info
    }

    /// Gives the request a deadline of its own: a [`TimeoutLayer`](crate::timeout::TimeoutLayer)
    /// times it out `deadline` after it entered the stack, instead of with the deadline
    /// it would choose (the default, a command's override, a blocking command's block
    /// time), for a caller with a budget of its own: an endpoint that must answer within
    /// 50 ms gives its reads 10 ms, and a read that takes longer falls back to a miss.
    ///
    /// Running out of it says the caller's budget ran out, not that Redis failed: the
    /// timeout ([`is_own_deadline`](crate::Error::is_own_deadline)) does not count
    /// towards opening the circuit breaker, nor as a sign of a stuck connection, so one
    /// impatient caller cannot cut Redis off for the others. It still counts as a
    /// `timeout` in the metrics, and reads still fall back. A stack without a timeout
    /// layer has nothing to enforce it with. [`Client::with_deadline`](crate::Client::with_deadline)
    /// gives one to every call made through a handle.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_resilience::{Request, timeout::TimeoutLayer};
    ///
    /// let layer = TimeoutLayer::new(Duration::from_millis(250));
    /// let get = Request::from(redis::cmd("GET").arg("k"));
    /// assert_eq!(layer.deadline_for(&get), Some(Duration::from_millis(250)));
    /// let get = get.with_deadline(Duration::from_millis(10));
    /// assert_eq!(get.deadline(), Some(Duration::from_millis(10)));
    /// assert_eq!(layer.deadline_for(&get), Some(Duration::from_millis(10)));
    /// ```
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        let nanos = u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX);
        self.deadline = NonZeroU64::new(nanos.saturating_add(1));
        self
    }

    /// The deadline the request carries itself, if it was given one
    /// ([`with_deadline`](Self::with_deadline)). (Saturates at 584 years.)
    #[inline]
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
            .map(|packed| Duration::from_nanos(packed.get() - 1))
    }

    /// The command, if this request is one.
    pub fn cmd(&self) -> Option<&Cmd> {
        match &self.body {
            Body::Cmd(cmd) => Some(cmd),
            Body::Pipeline(_) => None,
        }
    }

    /// The pipeline, if this request is one.
    pub fn pipeline(&self) -> Option<&Pipeline> {
        match &self.body {
            Body::Pipeline(pipeline) => Some(pipeline),
            Body::Cmd(_) => None,
        }
    }

    /// When the request entered the stack: the first call to this reads the clock, later
    /// ones (in inner layers, in retries) answer the same instant.
    #[inline]
    pub(crate) fn start(&mut self) -> Instant {
        *self.start.get_or_insert_with(Instant::now)
    }

    /// The start if a layer already read it, without reading the clock.
    #[inline]
    pub(crate) fn start_if_read(&self) -> Option<Instant> {
        self.start
    }

    pub(crate) fn into_body(self) -> Body {
        self.body
    }

    /// The size of its largest argument, in bytes (of any command, for a pipeline).
    pub(crate) fn largest_argument(&self) -> usize {
        fn largest(cmd: &Cmd) -> usize {
            info::simple_args(cmd).map(<[u8]>::len).max().unwrap_or(0)
        }
        match &self.body {
            Body::Cmd(cmd) => largest(cmd),
            Body::Pipeline(pipeline) => pipeline.cmd_iter().map(largest).max().unwrap_or(0),
        }
    }
}

impl From<Cmd> for Request {
    fn from(cmd: Cmd) -> Self {
        Request {
            info: CommandInfo::of_cmd(&cmd),
            body: Body::Cmd(SharedCmd::new(cmd)),
            start: None,
            deadline: None,
        }
    }
}

impl From<&Cmd> for Request {
    fn from(cmd: &Cmd) -> Self {
        Request {
            info: CommandInfo::of_cmd(cmd),
            body: Body::Cmd(SharedCmd::copy_of(cmd)),
            start: None,
            deadline: None,
        }
    }
}

/// So `Request::from(redis::cmd("GET").arg("k"))` works as written.
impl From<&mut Cmd> for Request {
    fn from(cmd: &mut Cmd) -> Self {
        Request::from(cmd.clone())
    }
}

impl From<Pipeline> for Request {
    fn from(pipeline: Pipeline) -> Self {
        Request {
            info: CommandInfo::of_pipeline(&pipeline),
            body: Body::Pipeline(Arc::new(pipeline)),
            start: None,
            deadline: None,
        }
    }
}

impl From<&Pipeline> for Request {
    fn from(pipeline: &Pipeline) -> Self {
        Request::from(pipeline.clone())
    }
}

impl From<&mut Pipeline> for Request {
    fn from(pipeline: &mut Pipeline) -> Self {
        Request::from(pipeline.clone())
    }
}
