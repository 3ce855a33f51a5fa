//! redis-rs's command API over any stack of this crate's services, and the assembled
//! resilient client.

mod builder;
mod health;
mod resilient;
mod stack;

pub use builder::ResilientClientBuilder;
#[cfg(feature = "serde")]
pub(crate) use health::millis;
pub use health::{CallSummary, Health, HealthStatus};
pub use resilient::ResilientClient;
pub use stack::{ResilientFuture, ResilientStack};

use std::{future::poll_fn, sync::Arc, time::Duration};

use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value, aio::ConnectionLike};
use tower::Service;

use crate::{Error, Request};

/// A handle that lets redis-rs drive any stack `S`: it implements
/// [`redis::aio::ConnectionLike`], so every `AsyncCommands` method, `Cmd::query_async`
/// and `Pipeline::query_async` go through your layers.
///
/// Errors come out as [`RedisError`]s, as redis-rs's API requires. Server errors are the
/// very `RedisError`s plain redis-rs would give; every other error carries this crate's
/// [`Error`] inside, and `Error::from(redis_error)` recovers it with its classification.
/// redis-rs's own predicates agree: a timeout answers `is_timeout()`, an open circuit
/// `is_connection_refusal()`.
///
/// Cloning clones the stack (cheap for this crate's services).
///
/// ```no_run
/// use redis::AsyncCommands;
/// use tower_redis_resilience::{Client, Error, RedisService};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = RedisService::connect("redis://127.0.0.1:6379").await?;
/// let mut client = Client::new(redis);
/// let () = client.set("greeting", "hello").await?;
/// let greeting: Option<String> = client.get("greeting").await?;
/// assert_eq!(greeting.as_deref(), Some("hello"));
///
/// if let Err(err) = client.incr::<_, _, i64>("greeting", 1).await {
///     let err = Error::from(err);
///     assert!(err.is_server()); // ERR value is not an integer
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client<S> {
    service: S,
    db: i64,
    deadline: Option<Duration>,
}

impl<S> Client<S> {
    /// Wraps a stack. `get_db()` answers 0 unless [`Client::with_db`] says otherwise.
    pub fn new(service: S) -> Self {
        Client {
            service,
            db: 0,
            deadline: None,
        }
    }

    /// Gives every request sent through this handle that has no deadline of its own the
    /// deadline `deadline` ([`Request::with_deadline`]: a timeout layer in the stack
    /// enforces it instead of the one it would choose, and its running out does not
    /// count against Redis in the circuit breaker). For a caller with a budget of its
    /// own; the handle it came from, and its other clones, keep theirs.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use redis::AsyncCommands;
    /// use tower_redis_resilience::ResilientClient;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = ResilientClient::builder("redis://127.0.0.1:6379").build()?;
    /// // This endpoint answers within 50 ms: a read that takes Redis longer than 10 ms
    /// // is a miss (the fallback answers `None`), and the endpoint goes to the database.
    /// let mut hot_path = client.with_deadline(Duration::from_millis(10));
    /// let cached: Option<String> = hot_path.get("item:7").await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The request as this handle sends it: with the handle's deadline unless it has one.
    #[inline]
    pub(crate) fn prepare(&self, request: Request) -> Request {
        match self.deadline {
            Some(deadline) if request.deadline().is_none() => request.with_deadline(deadline),
            _ => request,
        }
    }

    /// Sets the database index that `ConnectionLike::get_db` reports.
    #[must_use]
    pub fn with_db(mut self, db: i64) -> Self {
        self.db = db;
        self
    }

    /// The stack.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The stack, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Unwraps the stack.
    pub fn into_inner(self) -> S {
        self.service
    }
}

impl<S> Client<S>
where
    S: Service<Request, Response = Value, Error = Error>,
{
    /// Sends a request through the stack, waiting for it to be ready first.
    pub async fn send(&mut self, request: impl Into<Request>) -> Result<Value, Error> {
        let request = self.prepare(request.into());
        poll_fn(|cx| self.service.poll_ready(cx)).await?;
        self.service.call(request).await
    }
}

impl<S> ConnectionLike for Client<S>
where
    S: Service<Request, Response = Value, Error = Error> + Send,
    S::Future: Send,
{
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.send(cmd).await.map_err(RedisError::from) })
    }

    /// Answers what `Pipeline::query_async` expects: every reply of a plain pipeline, or
    /// the one `EXEC` reply of an atomic one. Other framings are refused, not guessed.
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let atomic = pipeline.is_transaction();
            let expected = if atomic {
                (pipeline.len() + 1, 1)
            } else {
                (0, pipeline.len())
            };
            if (offset, count) != expected {
                return Err(RedisError::from(Error::config(Arc::<str>::from(format!(
                    "unsupported pipeline framing: offset {offset}, count {count}"
                )))));
            }
            match self.send(pipeline).await.map_err(RedisError::from)? {
                Value::Array(replies) if !atomic => Ok(replies),
                exec if atomic => Ok(vec![exec]),
                other => Err(RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "pipeline answered a non-array reply",
                    format!("{other:?}"),
                ))),
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}
