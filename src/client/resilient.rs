use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use redis::{Cmd, Pipeline, RedisFuture, Value, aio::ConnectionLike};
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use super::{Client, ResilientClientBuilder, ResilientFuture, ResilientStack, health::Health};
use crate::{
    Connector, Error, Request,
    circuit_breaker::CircuitBreakerLayer,
    fallback::FallbackLayer,
    metrics::{Registry, Snapshot},
    pubsub::{Events, Subscriber, SubscriberConfig},
    reconnect::{ConnectionState, Reconnect, ReconnectStats},
    retry::RetryLayer,
    timeout::TimeoutLayer,
};

/// The handles of the layers a client was built with, shared by its clones.
pub(super) struct Parts {
    pub(super) redis: Reconnect,
    pub(super) breaker: Option<CircuitBreakerLayer>,
    pub(super) registry: Option<Registry>,
    pub(super) fallback: Option<FallbackLayer>,
    pub(super) timeout: Option<TimeoutLayer>,
    pub(super) retry: Option<RetryLayer>,
    pub(super) health_timeout: Duration,
}

/// A Redis client with the whole resilient stack in it: `Fallback → Metrics → Trace →
/// CircuitBreaker → Timeout → Retry → Reconnect`, assembled by
/// [`ResilientClient::builder`].
///
/// - redis-rs's whole command API works on it (it is a [`ConnectionLike`]):
///   `client.get::<_, Option<String>>(k)` answers `None` rather than an error while Redis
///   is down, and returns within its deadline whatever Redis does.
/// - It is a [`tower::Service`] too, so tower's own layers (`ConcurrencyLimit`,
///   `LoadShed`, `Buffer`...) wrap it like any other service.
/// - Cloning is cheap (a reference count per layer) and every clone shares
///   one connection, one breaker and one registry: clone it into each task or keep it in
///   axum's `State`. It is `Send + Sync + 'static`.
/// - [`health`](Self::health) reports connection, breaker, ping and call metrics for a
///   health endpoint.
/// - It outlives the runtime it was made on (a static client shared by `#[tokio::test]`s,
///   each with a runtime of its own): the next call, on whatever runtime it is made,
///   reconnects if the connection, or the work of replacing it, ended with that runtime.
///   Calls made outside any runtime (`futures::executor::block_on` on a thread of your
///   own) are served while a multi-threaded runtime it was made on runs, and fail with a
///   clear error, never a panic, once none does.
///
/// ```no_run
/// use redis::AsyncCommands;
/// use tower_redis_resilience::ResilientClient;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut client = ResilientClient::builder("redis://127.0.0.1:6379").build()?;
/// let () = client.set_ex("session:42", "alice", 3600).await?;
/// // `None` when the key is missing, and also while Redis cannot answer.
/// let user: Option<String> = client.get("session:42").await?;
/// println!("{user:?}, redis is {:?}", client.health().await.status);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ResilientClient {
    pub(super) client: Client<ResilientStack>,
    pub(super) parts: Arc<Parts>,
}

impl ResilientClient {
    /// A builder for the default stack on `url` (`redis://`, `rediss://` with feature
    /// `tls`, `unix://`).
    pub fn builder(url: &str) -> ResilientClientBuilder {
        ResilientClientBuilder::new(url)
    }

    /// A builder for the default stack on `connector`.
    pub fn builder_with_connector(connector: Connector) -> ResilientClientBuilder {
        ResilientClientBuilder::with_connector(connector)
    }

    /// A clone whose calls each get `deadline` unless they carry one of their own: see
    /// [`Client::with_deadline`]. This handle and its other clones keep theirs; all
    /// share the connection, breaker and metrics.
    #[must_use]
    pub fn with_deadline(&self, deadline: Duration) -> ResilientClient {
        ResilientClient {
            client: self.client.clone().with_deadline(deadline),
            parts: self.parts.clone(),
        }
    }

    /// Sends a request through the stack.
    pub async fn send(&mut self, request: impl Into<Request>) -> Result<Value, Error> {
        self.client.send(request).await
    }

    /// Where it connects, safe to log (no credentials).
    pub fn address(&self) -> &str {
        self.parts.redis.address()
    }

    /// Where the connection in use leads (no credentials), if there is one: for a
    /// [Sentinel connector](crate::Connector::sentinel), the master it found, which a
    /// failover changes.
    pub fn connected_to(&self) -> Option<String> {
        self.parts.redis.connected_to()
    }

    /// The servers behind the connection that cannot be reached, or do not answer, while
    /// it serves through the others (no credentials): a cluster's masters whose process
    /// or host is gone, or that stall, whose slots' requests are answered at once,
    /// unsent, until they answer or the cluster fails them over. Empty for one server.
    pub fn unreachable(&self) -> Vec<String> {
        self.parts.redis.unreachable()
    }

    /// The connection state now.
    pub fn connection_state(&self) -> ConnectionState {
        *self.parts.redis.state().borrow()
    }

    /// The connection state, now and as it changes.
    pub fn watch_connection(&self) -> watch::Receiver<ConnectionState> {
        self.parts.redis.state()
    }

    /// Connection attempt counters.
    pub fn reconnect_stats(&self) -> ReconnectStats {
        self.parts.redis.stats()
    }

    /// A [Pub/Sub subscriber](Subscriber) to the same Redis (URL, credentials, TLS,
    /// Sentinel), on a connection of its own that it keeps through restarts. Returns at
    /// once and connects in the background ([`Subscriber::lazy`]).
    ///
    /// ```no_run
    /// use tower_redis_resilience::{ResilientClient, pubsub::{Event, SubscriberConfig}};
    ///
    /// # async fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let client = ResilientClient::builder("redis://127.0.0.1:6379").build()?;
    /// let (subscriber, mut events) = client.subscriber(SubscriberConfig::new())?;
    /// subscriber.subscribe("invalidations").await?;
    /// while let Some(Event::Message(message)) = events.recv().await {
    ///     println!("{:?}", message.get_payload::<String>());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn subscriber(&self, config: SubscriberConfig) -> Result<(Subscriber, Events), Error> {
        Subscriber::lazy(self.parts.redis.connector().clone(), config)
    }

    /// The circuit breaker, for its state, metrics and manual controls.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreakerLayer> {
        self.parts.breaker.as_ref()
    }

    /// The metrics registry.
    pub fn registry(&self) -> Option<&Registry> {
        self.parts.registry.as_ref()
    }

    /// Counts and latencies per command and outcome so far.
    pub fn metrics(&self) -> Option<Snapshot> {
        self.parts.registry.as_ref().map(Registry::snapshot)
    }

    /// The fallback layer, for its policy and count.
    pub fn fallback(&self) -> Option<&FallbackLayer> {
        self.parts.fallback.as_ref()
    }

    /// The deadlines, to ask what a request would get.
    pub fn timeout(&self) -> Option<&TimeoutLayer> {
        self.parts.timeout.as_ref()
    }

    /// The retry layer, for its remaining budget.
    pub fn retry(&self) -> Option<&RetryLayer> {
        self.parts.retry.as_ref()
    }

    /// The stack, to wrap in more layers or hand to code that takes a service.
    pub fn stack(&self) -> ResilientStack {
        self.client.get_ref().clone()
    }

    /// Pings Redis (on the connection, past the breaker, not counted in the metrics) and
    /// reports how things stand; see [`Health`].
    ///
    /// For a cluster, each master is asked on its own (`CLUSTER MYID`, the masters known
    /// to be gone left out), each within the health timeout: one that does not answer in
    /// time is listed in [`Health::unreachable`] and makes the status `Degraded`, and
    /// only none answering makes it `Down`.
    pub async fn health(&self) -> Health {
        #[cfg(feature = "cluster")]
        if let Some((ping, silent)) = self.ping_masters().await {
            return Health::new(self, ping, silent);
        }
        let ping = self.ping().await;
        Health::new(self, ping, Vec::new())
    }

    /// [`health`](Self::health)'s question to each master of a cluster: how long the
    /// slowest that answered took (an error if none did), and those that did not. `None`
    /// for one server, with no connection, or when no node gave the cluster's view of its
    /// nodes (the `PING` is then sent as to one server).
    #[cfg(feature = "cluster")]
    async fn ping_masters(&self) -> Option<(Result<Duration, Error>, Vec<String>)> {
        tokio::runtime::Handle::try_current().ok()?;
        let connection = self.parts.redis.connection()?;
        let limit = self.parts.health_timeout;
        let masters = connection.masters_health(limit).await?;
        let ping = masters.slowest.ok_or_else(|| {
            Error::unavailable_because(format!(
                "no master of the cluster answered within {limit:?}: {}",
                masters.silent.join(", ")
            ))
            .with_command("CLUSTER MYID")
        });
        Some((ping, masters.silent))
    }

    async fn ping(&self) -> Result<Duration, Error> {
        let started = tokio::time::Instant::now();
        let request = Request::from(redis::cmd("PING"));
        let limit = self.parts.health_timeout;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::config(
                "the health check's PING needs a Tokio runtime to time it: none is current",
            ));
        }
        match tokio::time::timeout(limit, self.parts.redis.clone().oneshot(request)).await {
            // An error about the command itself is an answer too: an ACL user may not
            // run `PING` (`NOPERM`), and the server that says so is up.
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(error)) if error.is_server() => Ok(started.elapsed()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::timed_out(limit).with_command("PING")),
        }
    }
}

impl fmt::Debug for ResilientClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientClient")
            .field("address", &self.address())
            .field("connection", &self.connection_state())
            .field(
                "breaker",
                &self.parts.breaker.as_ref().map(CircuitBreakerLayer::state),
            )
            .finish_non_exhaustive()
    }
}

impl Service<Request> for ResilientClient {
    type Response = Value;
    type Error = Error;
    type Future = ResilientFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.client.get_mut().poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let request = self.client.prepare(request);
        self.client.get_mut().call(request)
    }
}

impl ConnectionLike for ResilientClient {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.client.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.client.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.client.get_db()
    }
}
