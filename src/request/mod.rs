//! What flows through the stack: a command or a pipeline, and what is known about it.

mod info;
mod shared_cmd;
mod spec;
mod table;

pub(crate) use info::canonical_name;
pub use info::{Blocking, CommandInfo, PIPELINE, TRANSACTION, UNKNOWN_COMMAND};
pub(crate) use shared_cmd::SharedCmd;

use std::sync::Arc;

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

    /// The pipeline, shared: a clone of it costs a reference count.
    #[inline]
    pub(crate) fn shared_pipeline(&self) -> Option<&Arc<Pipeline>> {
        match &self.body {
            Body::Pipeline(pipeline) => Some(pipeline),
            Body::Cmd(_) => None,
        }
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
        }
    }
}

impl From<&Cmd> for Request {
    fn from(cmd: &Cmd) -> Self {
        Request {
            info: CommandInfo::of_cmd(cmd),
            body: Body::Cmd(SharedCmd::copy_of(cmd)),
            start: None,
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
