//! Keeping a connection: one reconnect loop with backoff for every clone, fail-fast (or a
//! bounded wait) while it runs, and detection of connections that broke or went quiet.

mod config;
mod future;
mod shared;

pub use config::{
    DEFAULT_BLOCKING_IDLE_TIMEOUT, DEFAULT_HEALTH_CHECK_INTERVAL,
    DEFAULT_IDLE_BLOCKING_CONNECTIONS, DEFAULT_MAX_BLOCKING_CONNECTIONS,
    DEFAULT_STUCK_PING_TIMEOUT, ReconnectConfig,
};
pub(crate) use config::{SETTLED, Young, default_backoff, delay_after};
pub use future::ResponseFuture;

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use redis::Value;
use tokio::sync::watch;
use tower::Service;

use self::{future::Tracker, shared::Shared};
use crate::{
    CommandInfo, Connector, Error, MakeConnection, Request,
    sync::{Lease, Leased},
};

/// Where the connection of a [`Reconnect`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ConnectionState {
    /// Calls go to Redis.
    Connected,
    /// The connection is being (re-)established; `attempt` counts from 1 within this
    /// outage (0 before the first attempt starts).
    Reconnecting {
        /// The attempt under way.
        attempt: u32,
    },
    /// Calls on the connection kept timing out
    /// ([`stuck_after`](ReconnectConfig::stuck_after)): it is out of use, and calls fail
    /// fast, while a `PING` asks whether it is stuck (reads go to another connection if
    /// Redis answers there: [`side_reads`](ReconnectConfig::side_reads)). `Connected` again if it answers
    /// within [`stuck_ping_timeout`](ReconnectConfig::stuck_ping_timeout) (Redis is slow,
    /// not unreachable), `Reconnecting` if not.
    Suspect,
    /// The backoff schedule ran out (`max_attempts`/`max_elapsed`); calls fail until
    /// [`Reconnect::reconnect`] starts over.
    Failed,
}

/// Counters of connection attempts since the `Reconnect` was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ReconnectStats {
    /// Connection attempts, the first one included.
    pub attempts: u64,
    /// Attempts that produced a connection.
    pub successes: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// Connections opened beside the shared one, not counted above: for blocking commands
    /// ([`dedicated_blocking_connections`](ReconnectConfig::dedicated_blocking_connections)),
    /// and for reads while the shared one is suspect
    /// ([`side_reads`](ReconnectConfig::side_reads)).
    pub blocking_connections: u64,
    /// Reads a [replica](ReconnectConfig::read_replica) answered while there was no
    /// connection, and for a cluster with
    /// [`read_replicas`](crate::Connector::read_replicas), reads a replica served when
    /// their master could not.
    pub replica_reads: u64,
    /// Reads served on a connection of their own while the shared one was suspect and
    /// the server answered on another ([`side_reads`](ReconnectConfig::side_reads)).
    pub side_reads: u64,
}

/// The bottom of a resilient stack: a [`tower::Service`] that keeps one Redis connection
/// and re-establishes it when it is lost.
///
/// Every clone shares one connection and one reconnect loop, so many callers during an
/// outage cause one connection attempt per backoff step, not one each. (It is a service,
/// not a `Layer`, because it makes its leaf itself from a [`Connector`]; clone the one
/// handle wherever a stack is built, as axum does per request.)
///
/// - **Lost connections** are noticed when a call fails with a broken connection (reset,
///   closed, refused), when [`stuck_after`](ReconnectConfig::stuck_after) calls in a row
///   are dropped unanswered (an outer timeout gave up on a stalled server) and a `PING`
///   then gets no reply either within
///   [`stuck_ping_timeout`](ReconnectConfig::stuck_ping_timeout) (a Redis that is only
///   slow answers it, and keeps its connection), or when the optional
///   [health check](ReconnectConfig::health_check) `PING` gets no reply.
/// - **While reconnecting**, and while a `PING` asks whether the connection is stuck,
///   calls fail at once with an [unavailable](Error::is_unavailable)
///   error ("reconnecting, attempt 3, next try in 20ms") that never reached Redis, or wait
///   at most [`max_wait`](ReconnectConfig::max_wait). While a `PING` asks, reads go to
///   another connection to the same server if Redis answers there, as it does when only
///   the shared connection is held up (a write that `CLIENT PAUSE WRITE` holds, a `WAIT`):
///   [`side_reads`](ReconnectConfig::side_reads).
/// - **Blocking commands** that wait for data (`BLPOP`, `XREAD BLOCK`...) run on
///   connections of their own, kept for reuse, so they hold up no other call and one
///   given up on pops nothing
///   ([`dedicated_blocking_connections`](ReconnectConfig::dedicated_blocking_connections)).
/// - **Wrong credentials or settings** are retried at the slowest rate of the schedule
///   with a warning, never in a hot loop.
/// - **Connections dropped as soon as they open** (a load balancer or proxy whose
///   backend is gone, a firewall that resets flows) are opened at the schedule's pace:
///   one lost within a second of opening, before any call had a reply on it, is
///   followed by the schedule's next step, not by an attempt at once. One that answered
///   is replaced at once.
/// - **State** is observable through [`state`](Reconnect::state) (a `watch` channel) and
///   [`stats`](Reconnect::stats), and logged with `tracing` (never the password).
///
/// ```no_run
/// use tower_redis_resilience::{Client, Connector, reconnect::{Reconnect, ReconnectConfig}};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let connector = Connector::from_url("redis://127.0.0.1:6379")?;
/// // Start even if Redis is down; calls fail fast until it is reachable.
/// let redis = Reconnect::lazy(connector, ReconnectConfig::new())?;
/// let mut state = redis.state();
/// tokio::spawn(async move {
///     while state.changed().await.is_ok() {
///         println!("redis is now {:?}", *state.borrow());
///     }
/// });
/// let client = Client::new(redis);
/// # let _ = client; Ok(()) }
/// ```
///
/// `M` says how to open a connection: a [`Connector`] unless you bring your own
/// [`MakeConnection`].
pub struct Reconnect<M: MakeConnection = Connector> {
    shared: Arc<Leased<Shared<M>>>,
    cached_generation: u64,
    cached: Option<M::Connection>,
    /// Whether calls on `cached` dropped unanswered count towards `stuck_after`.
    cached_may_hang: bool,
}

/// A clone starts with an empty cache that its first call fills (one lock): cloning is
/// one reference count, which matters because tower's `Retry` clones the service it wraps
/// on every call in case it has to retry.
impl<M: MakeConnection> Clone for Reconnect<M> {
    fn clone(&self) -> Self {
        Reconnect {
            shared: self.shared.clone(),
            cached_generation: 0,
            cached: None,
            cached_may_hang: true,
        }
    }
}

impl<M: MakeConnection> Reconnect<M> {
    /// Connects now and returns the error if that fails (eager start).
    pub async fn connect(
        connector: M,
        config: ReconnectConfig<M::Connection>,
    ) -> Result<Self, Error> {
        require_runtime()?;
        let connection = shared::open(&connector, &config).await?;
        let shared = Shared::new(connector, config, Some(connection));
        shared.count_initial_connect();
        Ok(Reconnect::start(shared))
    }

    /// Returns at once and connects in the background (lazy start): calls fail as
    /// unavailable until the first connection is up. Needs a tokio runtime.
    pub fn lazy(connector: M, config: ReconnectConfig<M::Connection>) -> Result<Self, Error> {
        require_runtime()?;
        let shared = Shared::new(connector, config, None);
        shared.reconnect_now();
        Ok(Reconnect::start(shared))
    }

    fn start(shared: Arc<Leased<Shared<M>>>) -> Self {
        shared.keep_health_checked();
        Reconnect {
            shared,
            cached_generation: 0,
            cached: None,
            cached_may_hang: true,
        }
    }

    /// The connection state, now and as it changes. Watchers are also told, the value
    /// staying `Connected`, when a part of the servers behind the connection is fenced
    /// off while the rest serve ([`MakeConnection::fences`]: a cluster's master gone or
    /// stalled), as the calls that failed there before say nothing of the rest.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.subscribe()
    }

    /// Connection attempt counters.
    pub fn stats(&self) -> ReconnectStats {
        self.shared.stats()
    }

    /// Drops the current connection, if any, and connects again; also restarts a loop that
    /// gave up ([`ConnectionState::Failed`]).
    pub fn reconnect(&self) {
        self.shared.reconnect_now();
    }

    /// How it connects.
    pub(crate) fn connector(&self) -> &M {
        &self.shared.connector
    }

    /// Where it connects, safe to log.
    pub fn address(&self) -> &str {
        self.shared.connector.address()
    }

    /// Where the connection in use leads, if there is one and the connector can tell
    /// ([`MakeConnection::connected_to`]): after a Sentinel failover, the new master.
    pub fn connected_to(&self) -> Option<String> {
        let (_, connection) = self.shared.current();
        self.shared.connector.connected_to(&connection?)
    }

    /// The connection in use, if there is one.
    #[cfg(feature = "cluster")]
    pub(crate) fn connection(&self) -> Option<M::Connection> {
        self.shared.current().1
    }

    /// The servers behind the connection in use that cannot be reached while it serves
    /// through the others ([`MakeConnection::unreachable`]): a cluster's masters that are
    /// gone.
    pub fn unreachable(&self) -> Vec<String> {
        let (_, connection) = self.shared.current();
        connection.map_or_else(Vec::new, |connection| {
            self.shared.connector.unreachable(&connection)
        })
    }
}

fn require_runtime() -> Result<(), Error> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|_| Error::config("Reconnect needs to be created inside a tokio runtime"))
}

impl<M: MakeConnection> Service<Request> for Reconnect<M> {
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture<<M::Connection as Service<Request>>::Future, M>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Rejections while reconnecting come from `call`, so readiness never blocks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if request.info().is_blocking()
            && self.shared.config.blocking_idle.is_some()
            && let Some(name) = blocks_for_data(&request)
        {
            return ResponseFuture::wait(call_blocking(self.shared.lease(), request, name));
        }
        if self.shared.generation.load(Ordering::Acquire) != self.cached_generation {
            (self.cached_generation, self.cached) = self.shared.current();
            self.cached_may_hang = self
                .cached
                .as_ref()
                .is_none_or(|connection| self.shared.connector.hung_calls_mean_stuck(connection));
        }
        let counts_cancellation = cancellation_may_mean_stuck(&request) && self.cached_may_hang;
        if self.cached.is_none() {
            self.shared.keep_reconnecting();
        }
        match &mut self.cached {
            Some(connection) => {
                let tracker = Tracker::new(
                    self.shared.lease(),
                    self.cached_generation,
                    counts_cancellation,
                );
                ResponseFuture::call(connection.call(request), tracker)
            }
            None if self.shared.has_aside()
                && goes_aside(&request)
                && let Some((generation, aside)) = self.shared.aside() =>
            {
                ResponseFuture::wait(read_aside(self.shared.lease(), aside, generation, request))
            }
            None => match &self.shared.config.replica {
                Some(replica) if request.info().is_read_only() => ResponseFuture::wait(
                    read_from_replica(self.shared.lease(), replica.clone(), request),
                ),
                _ if self.shared.config.max_wait.is_zero() => {
                    ResponseFuture::rejected(self.shared.lease(), request.info().name())
                }
                _ => ResponseFuture::wait(wait_then_call(self.shared.lease(), request)),
            },
        }
    }
}

/// Whether the request dropped before its reply is a sign of a stuck connection: not for
/// a blocking command, which is expected to go quiet, nor for a request with a deadline
/// of its own, which may be shorter than Redis needs.
#[inline]
fn cancellation_may_mean_stuck(request: &Request) -> bool {
    !request.info().is_blocking() && request.deadline().is_none()
}

/// The name of a blocking request that waits for data (a key, a stream) and so goes to a
/// connection of its own; `None` for `WAIT` and `WAITAOF`, which wait for the writes
/// made before them on the shared connection and must follow them there.
fn blocks_for_data(request: &Request) -> Option<&'static str> {
    let name = request.info().name();
    (!matches!(name, "WAIT" | "WAITAOF")).then_some(name)
}

/// The current connection and its generation; while there is none, waits up to
/// `max_wait` for one.
async fn current_connection<M: MakeConnection>(
    shared: &Lease<Shared<M>>,
    name: &'static str,
) -> Result<(u64, M::Connection), Error> {
    let deadline = tokio::time::Instant::now() + shared.config.max_wait;
    let mut state = shared.subscribe();
    loop {
        // Mark the state seen before looking for the connection, so a connection that
        // arrives in between wakes `changed()` instead of being missed.
        let failed = *state.borrow_and_update() == ConnectionState::Failed;
        if let (generation, Some(connection)) = shared.current() {
            return Ok((generation, connection));
        }
        // Outside a runtime (a call polled by another executor) there is no timer to
        // wait with.
        if failed
            || shared.config.max_wait.is_zero()
            || tokio::runtime::Handle::try_current().is_err()
        {
            return Err(shared.rejection().with_command(name));
        }
        match tokio::time::timeout_at(deadline, state.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Err(shared.rejection().with_command(name)),
        }
    }
}

/// Sends a read to the replica while there is no connection. Its answer is the answer;
/// if it cannot serve, the read gets the refusal it would have had without one.
async fn read_from_replica<M: MakeConnection>(
    shared: Lease<Shared<M>>,
    replica: config::Replica,
    request: Request,
) -> Result<Value, Error> {
    let name = request.info().name();
    match tower::ServiceExt::oneshot(replica, request).await {
        Ok(value) => {
            shared.read_from_replica();
            Ok(value)
        }
        // Its own answer (`WRONGTYPE` there too).
        Err(error) if error.is_server() => Err(error),
        Err(error) => {
            tracing::debug!(command = name, %error, "the replica could not serve the read either");
            Err(shared.rejection().with_command(name))
        }
    }
}

/// Whether `request` may go on the connection aside while the shared one is suspect
/// ([`ReconnectConfig::side_reads`]): a read, but not `PFCOUNT`, which `CLIENT PAUSE
/// WRITE` holds as it does writes (it may rewrite its key), so that it would hold up the
/// reads after it there too.
fn goes_aside(request: &Request) -> bool {
    const HELD: &str = "PFCOUNT";
    let info = request.info();
    info.is_read_only()
        && match request.pipeline() {
            None => info.name() != HELD,
            Some(pipeline) => !pipeline
                .cmd_iter()
                .any(|cmd| CommandInfo::of_cmd(cmd).name() == HELD),
        }
}

/// Sends a read on the connection aside, serving `generation`, while the shared one is
/// suspect. A server's own error reply is the answer; if the connection aside cannot
/// serve, the read gets the refusal it would have had without it.
async fn read_aside<M: MakeConnection>(
    shared: Lease<Shared<M>>,
    mut aside: M::Connection,
    generation: u64,
    request: Request,
) -> Result<Value, Error> {
    let name = request.info().name();
    let result = match std::future::poll_fn(|cx| aside.poll_ready(cx)).await {
        Ok(()) => aside.call(request).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(value) => {
            shared.read_aside();
            Ok(value)
        }
        Err(error) if error.is_server() => Err(error),
        Err(error) => {
            if error.breaks_connection() {
                shared.aside_lost(generation);
            }
            tracing::debug!(command = name, %error, "the connection aside could not serve the read");
            Err(shared.rejection().with_command(name))
        }
    }
}

/// Waits up to `max_wait` for a connection, then calls on it.
async fn wait_then_call<M: MakeConnection>(
    shared: Lease<Shared<M>>,
    request: Request,
) -> Result<Value, Error> {
    let (generation, mut connection) = current_connection(&shared, request.info().name()).await?;
    let counts_cancellation = cancellation_may_mean_stuck(&request)
        && shared.connector.hung_calls_mean_stuck(&connection);
    let mut tracker = Tracker::new(shared.clone(), generation, counts_cancellation);
    let result = match std::future::poll_fn(|cx| connection.poll_ready(cx)).await {
        Ok(()) => connection.call(request).await,
        Err(error) => Err(error),
    };
    tracker.finish(&result);
    result
}

/// Runs a blocking command on a connection of its own: an idle one that still works, or
/// a new one. It goes back to the idle ones when Redis answers (an error reply leaves it
/// fine); if the call is given up on, it is dropped with the future, which closes it, so
/// Redis unblocks the command and pops nothing for nobody.
async fn call_blocking<M: MakeConnection>(
    shared: Lease<Shared<M>>,
    request: Request,
    name: &'static str,
) -> Result<Value, Error> {
    // Not while the shared connection is down: no connection storm during an outage.
    current_connection(&shared, name).await?;
    // Held for the call: at most `max_blocking_connections` run at once.
    let _turn = shared.blocking_turn().await;
    let (generation, _) = current_connection(&shared, name).await?;
    // When this call opened its connection.
    let mut opened_at = None;
    let mut connection = loop {
        if let Some(mut idle) = shared.idle_blocking(generation) {
            // One that closed while idle (Redis's `timeout`, say) is dropped: the next.
            if !shared.connector.is_closed(&idle)
                && std::future::poll_fn(|cx| idle.poll_ready(cx)).await.is_ok()
            {
                break idle;
            }
            continue;
        }
        if let Some(refusal) = shared.blocking_paced() {
            return Err(refusal.with_command(name));
        }
        let opening = async {
            let mut opened = shared.open_blocking().await?;
            std::future::poll_fn(|cx| opened.poll_ready(cx)).await?;
            Ok::<_, Error>(opened)
        };
        match opening.await {
            Ok(opened) => {
                opened_at = Some(tokio::time::Instant::now());
                break opened;
            }
            // The shared connection went down meanwhile: that is the news.
            Err(error) if shared.generation.load(Ordering::Acquire) != generation => {
                return Err(error.with_command(name));
            }
            // The shared connection works and no other could be opened: a limit, not an
            // outage (Redis at `maxclients` closes new connections at once).
            Err(error) if !error.is_config() => {
                shared.blocking_open_failed(&error);
                return Err(Error::no_connection_of_its_own(&error).with_command(name));
            }
            Err(error) => {
                shared.blocking_open_failed(&error);
                return Err(error.with_command(name));
            }
        }
    };
    let result = connection.call(request).await;
    if let Some(opened_at) = opened_at {
        match &result {
            // Broke before it answered, as soon as it opened: as good as not opened.
            Err(error) if error.breaks_connection() => {
                if opened_at.elapsed() < config::SETTLED {
                    shared.blocking_open_failed(error);
                }
            }
            _ => shared.blocking_opened(),
        }
    }
    match &result {
        Err(error) if error.breaks_connection() => {}
        // A replica answered: a failover behind the address. The shared connection is
        // replaced as a write on it would have it, and the idle ones go with it.
        Err(error) if error.is_replica_refusal() => shared.read_only_reply(generation),
        _ => shared.put_back_blocking(generation, connection),
    }
    result
}

impl<M: MakeConnection> fmt::Debug for Reconnect<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconnect")
            .field("address", &self.shared.connector.address())
            .field("state", &*self.shared.subscribe().borrow())
            .finish()
    }
}

#[cfg(test)]
mod tests;
