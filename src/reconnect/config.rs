use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use redis::Value;
use tower::{Service, util::BoxCloneSyncService};

use crate::{Error, RedisService, Request, backoff::ExponentialBackoff};

/// How many connections for blocking commands are kept open between calls, unless
/// [`ReconnectConfig::dedicated_blocking_connections`] says otherwise.
pub const DEFAULT_IDLE_BLOCKING_CONNECTIONS: usize = 4;

/// How many blocking commands may run at once on connections of their own, unless
/// [`ReconnectConfig::max_blocking_connections`] says otherwise.
pub const DEFAULT_MAX_BLOCKING_CONNECTIONS: usize = 64;

/// How long a connection kept for blocking commands may sit idle and still be reused,
/// unless [`ReconnectConfig::blocking_idle_timeout`] says otherwise.
pub const DEFAULT_BLOCKING_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connection suspected of being stuck has to answer a `PING` before it is
/// replaced, unless [`ReconnectConfig::stuck_ping_timeout`] says otherwise.
pub const DEFAULT_STUCK_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the connection is asked a `PING`, unless
/// [`ReconnectConfig::health_check`] says otherwise: each gets
/// [`DEFAULT_STUCK_PING_TIMEOUT`] to answer.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

type OnConnect<S> =
    Arc<dyn Fn(S) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> + Send + Sync>;

/// How [`Reconnect`](super::Reconnect) behaves when the connection is lost.
///
/// The default schedule is made for short blips and long outages alike: an attempt at
/// once, then one every 25 ms (±50 %) for the first 2 s, so a restart or failover is
/// noticed within a few tens of milliseconds; then exponential from 50 ms, doubling, with
/// full jitter, capped at 1 s. Against a server that refuses at once that costs about 40
/// attempts per second per client for 2 s, then one every ½ s on average.
///
/// ```
/// use std::time::Duration;
/// use tower_redis_resilience::{backoff::ExponentialBackoff, reconnect::ReconnectConfig};
///
/// let config = ReconnectConfig::new()
///     .backoff(ExponentialBackoff::new(Duration::from_millis(25), Duration::from_secs(1)))
///     .max_wait(Duration::from_millis(50))
///     .health_check(Duration::from_secs(1), Duration::from_millis(250))
///     .on_connect(|mut redis| async move {
///         use tower::{Service, ServiceExt};
///         let name = redis::cmd("CLIENT").arg("SETNAME").arg("checkout-api").to_owned();
///         redis.ready().await?.call(name.into()).await.map(|_| ())
///     });
/// # let _ = config;
/// ```
///
/// `S` is the connection's service: [`RedisService`] unless a custom
/// [`MakeConnection`](crate::MakeConnection) opens something else.
#[must_use]
pub struct ReconnectConfig<S = RedisService> {
    pub(super) backoff: ExponentialBackoff,
    pub(super) stuck_after: u32,
    pub(super) stuck_ping_timeout: Duration,
    pub(super) max_wait: Duration,
    pub(super) health_check: Option<(Duration, Duration)>,
    pub(super) on_connect: Option<OnConnect<S>>,
    pub(super) readonly_reconnect: Option<Duration>,
    pub(super) blocking_idle: Option<usize>,
    pub(super) blocking_max: usize,
    pub(super) blocking_idle_timeout: Duration,
    pub(super) replica: Option<Replica>,
    pub(super) side_reads: bool,
}

/// Where reads go while there is no connection ([`ReconnectConfig::read_replica`]).
pub(super) type Replica = BoxCloneSyncService<Request, Value, Error>;

impl<S> Clone for ReconnectConfig<S> {
    fn clone(&self) -> Self {
        ReconnectConfig {
            backoff: self.backoff.clone(),
            stuck_after: self.stuck_after,
            stuck_ping_timeout: self.stuck_ping_timeout,
            max_wait: self.max_wait,
            health_check: self.health_check,
            on_connect: self.on_connect.clone(),
            readonly_reconnect: self.readonly_reconnect,
            blocking_idle: self.blocking_idle,
            blocking_max: self.blocking_max,
            blocking_idle_timeout: self.blocking_idle_timeout,
            replica: self.replica.clone(),
            side_reads: self.side_reads,
        }
    }
}

impl<S> Default for ReconnectConfig<S> {
    fn default() -> Self {
        ReconnectConfig {
            backoff: default_backoff(),
            stuck_after: 3,
            stuck_ping_timeout: DEFAULT_STUCK_PING_TIMEOUT,
            max_wait: Duration::ZERO,
            health_check: Some((DEFAULT_HEALTH_CHECK_INTERVAL, DEFAULT_STUCK_PING_TIMEOUT)),
            on_connect: None,
            readonly_reconnect: Some(Duration::from_secs(1)),
            blocking_idle: Some(DEFAULT_IDLE_BLOCKING_CONNECTIONS),
            blocking_max: DEFAULT_MAX_BLOCKING_CONNECTIONS,
            blocking_idle_timeout: DEFAULT_BLOCKING_IDLE_TIMEOUT,
            replica: None,
            side_reads: true,
        }
    }
}

/// The default reconnect schedule (see [`ReconnectConfig`]), which a
/// [`Subscriber`](crate::pubsub::Subscriber) keeps its connection with too.
pub(crate) fn default_backoff() -> ExponentialBackoff {
    ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
        .fast_phase(Duration::from_millis(25), Duration::from_secs(2))
}

/// How long a connection must have lived for its loss to count as a new outage, met by an
/// attempt at once and a fresh schedule, unless it answered a call. One lost sooner with
/// no call answered goes on with the schedule of the outage it ended, as if its opening
/// had been one more failed attempt.
///
/// Without it, a server or a middlebox that accepts connections and drops them at once
/// (a load balancer whose backend is down, a proxy or firewall that resets flows, a
/// connection reaper) had one opened per failed call, the schedule starting afresh each
/// time (measured: 1,689 connections in 3 s from one client with 8 callers), a storm for
/// the server and the client's ports alike. A connection that answers, however briefly,
/// is of use, and is replaced at once.
pub(crate) const SETTLED: Duration = Duration::from_secs(1);

/// The schedule a connection was opened on, kept while it is young.
pub(crate) struct Young {
    opened: tokio::time::Instant,
    delays: crate::backoff::Delays,
}

impl Young {
    /// A connection opened now, after the attempts `delays` has paced.
    pub(crate) fn new(delays: crate::backoff::Delays) -> Self {
        Young {
            opened: tokio::time::Instant::now(),
            delays,
        }
    }

    /// The connection is lost, having `answered` a call or not: the schedule to go on
    /// with, and how long it lived, if it had neither answered nor [settled](SETTLED).
    pub(crate) fn lost(self, answered: bool) -> Option<(crate::backoff::Delays, Duration)> {
        let lived = self.opened.elapsed();
        (!answered && lived < SETTLED).then_some((self.delays, lived))
    }
}

/// The delay before the next connection attempt after one failed with `error`, `None`
/// when the schedule has ended: configuration and credential errors wait at least the
/// schedule's longest delay, so a wrong password never turns into a hot loop.
pub(crate) fn delay_after(
    delays: &mut crate::backoff::Delays,
    backoff: &ExponentialBackoff,
    error: &Error,
) -> Option<Duration> {
    let delay = delays.next()?;
    Some(if error.is_config() {
        delay.max(backoff.max())
    } else {
        delay
    })
}

impl ReconnectConfig<RedisService> {
    /// The defaults, for connections opened by a [`Connector`](crate::Connector). (With a
    /// custom [`MakeConnection`](crate::MakeConnection), use `ReconnectConfig::default()`.)
    pub fn new() -> Self {
        ReconnectConfig::default()
    }
}

impl<S> ReconnectConfig<S> {
    /// The schedule of delays between connection attempts. A fresh schedule starts with
    /// each outage; when it ends (`max_attempts`, `max_elapsed`) the state becomes
    /// [`Failed`](super::ConnectionState::Failed). A connection lost within a second of
    /// opening, before any call had a reply on it, does not end the outage: the schedule
    /// goes on (its opening counted as one more failed attempt), so connections that a
    /// middlebox or server drops as soon as they open are opened at the schedule's pace,
    /// not at each call, and count towards `max_attempts`.
    pub fn backoff(mut self, backoff: ExponentialBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Suspect the connection after this many calls in a row were cancelled (an outer
    /// timeout dropped them, say) with no reply in between: a connection to a stalled
    /// server or a half-open TCP connection never fails by itself. A `PING` then decides
    /// (see [`stuck_ping_timeout`](Self::stuck_ping_timeout)). Blocking commands do not
    /// count, nor requests with a deadline of their own
    /// ([`Request::with_deadline`](crate::Request::with_deadline)), which may be shorter
    /// than a healthy Redis needs. `0` turns this off. Default 3.
    pub fn stuck_after(mut self, cancelled_calls: u32) -> Self {
        self.stuck_after = cancelled_calls;
        self
    }

    /// How long a suspect connection (see [`stuck_after`](Self::stuck_after)) has to
    /// answer a `PING` before it is replaced. Default
    /// [`DEFAULT_STUCK_PING_TIMEOUT`](super::DEFAULT_STUCK_PING_TIMEOUT), 1 s.
    ///
    /// The calls may have timed out because Redis is slow, not unreachable: overloaded,
    /// busy with a slow command, far away. Its replies then still come, late. A new
    /// connection would be just as slow, and opening one every few timeouts (twice a
    /// second, measured against a Redis answering in 300 ms) adds handshakes, TLS ones
    /// too, to a server that is already struggling. So a suspect connection is taken out
    /// of use at once, and a `PING` is sent on it (it waits behind the calls already
    /// sent). Calls meanwhile fail fast, unsent, with an
    /// [unavailable](crate::Error::is_unavailable) error (or wait
    /// [`max_wait`](Self::max_wait)), as while reconnecting, instead of each waiting out
    /// its deadline, but reads, which go to another connection if Redis answers a `PING`
    /// there ([`side_reads`](Self::side_reads)); the [state](super::Reconnect::state) is
    /// [`Suspect`](super::ConnectionState::Suspect). An answer within this time puts the
    /// connection back (`Connected`: a breaker that follows the state probes at once,
    /// as after a reconnect, since a stall may have ended); silence replaces it, unless
    /// Redis, answering on another connection, says it holds this one's command up (a
    /// write pause): see [`side_reads`](Self::side_reads). Zero
    /// replaces it at once, without asking.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_resilience::reconnect::ReconnectConfig;
    ///
    /// // Redis replies within 2 s even when it struggles: replace only what is silent longer.
    /// let config = ReconnectConfig::new().stuck_ping_timeout(Duration::from_secs(2));
    /// # let _ = config;
    /// ```
    pub fn stuck_ping_timeout(mut self, timeout: Duration) -> Self {
        self.stuck_ping_timeout = timeout;
        self
    }

    /// While a suspect connection is out of use (see
    /// [`stuck_after`](Self::stuck_after)), send reads on a connection of their own to the
    /// same server, if that one answers a `PING`, instead of failing them. Default on.
    ///
    /// Redis serves one connection's commands in order, so a command it holds back holds
    /// up every command sent after it on that connection, while the server serves other
    /// connections. `CLIENT PAUSE WRITE` holds writes (and `PFCOUNT`): Redis's `FAILOVER`
    /// and a cluster's manual `CLUSTER FAILOVER` pause writes this way until the replica
    /// has caught up, as do managed services during maintenance and migration tools at
    /// their cut-over. A `WAIT` for replicas that are gone holds its connection up to its
    /// timeout; a large reply holds the ones after it while it arrives. On the shared
    /// connection every read queued behind such a command times out, and each later one
    /// too. Measured with the default client, 4 readers and a writer: before this, not
    /// one read of ~1,900 was served during a 1.5 s `CLIENT PAUSE WRITE`; now 1,942 of
    /// 1,946 were, 5,950 of 5,954 through a 4 s one, and 2,036 of 2,040 and 6,113 of
    /// 6,117 through a `WAIT 1 1500` and a `WAIT 1 4000` with no replica (those missed
    /// are the ones queued behind it before the connection was suspect), with no
    /// reconnect. redis-rs's `ConnectionManager`, on its one connection, served 4 to 9
    /// of its reads in the same runs, each waiting behind the held command.
    ///
    /// When calls have kept timing out and the suspect connection's `PING` is not answered
    /// yet, a `PING` on another connection tells a held connection from a stalled
    /// server: if it answers, reads (read-only commands and read-only pipelines, but
    /// `PFCOUNT`, which a write pause holds too) go on that connection until the suspect
    /// one answers or is replaced. Writes fail fast as before, unsent, with an error
    /// saying Redis holds the connection up, which the default circuit breaker does not
    /// count (the timeouts that made the connection suspect were counted).
    ///
    /// Held up by Redis, or cut off by a middlebox that forgot it, the suspect connection
    /// looks the same from the client; but one is replaced in vain (the next write holds
    /// the new one too, whose reads miss again until it is suspect in turn, and whose
    /// first timeouts can open a breaker), and the other never answers. So once the
    /// `PING`'s time ([`stuck_ping_timeout`](Self::stuck_ping_timeout)) is up, the server
    /// is asked on the side connection whether it holds the suspect one's command up
    /// (`CLIENT LIST ID`, with the id the connection learned with `CLIENT ID` when it
    /// opened: flagged `b`, blocked, as a write a pause holds, or a `WAIT`). While it
    /// does (asked again every `stuck_ping_timeout`, ten times at most), the connection
    /// is kept; when it does not (it sees the connection idle: what was sent never
    /// arrived), or cannot tell (Redis before 6.2, an ACL user that may not run `CLIENT`),
    /// or stops answering (it stalls now), the connection is replaced then, and reads go
    /// on beside it until its successor is open (one that fails there ends that).
    ///
    /// The other
    /// connection is opened the first time a connection is suspect (counted in
    /// [`ReconnectStats::blocking_connections`](super::ReconnectStats::blocking_connections))
    /// and kept, beside the shared one, for the next time, until the shared connection is
    /// replaced: against a Redis that is only slow, a new one each time would be one
    /// more handshake every few timeouts. If it cannot be opened, or does not answer (a
    /// stalled server answers nothing), calls fail fast as they would without it, and no
    /// other is tried until the shared connection is replaced.
    /// Reads served this way are counted in
    /// [`ReconnectStats::side_reads`](super::ReconnectStats::side_reads). A `Reconnect`
    /// over a cluster never suspects its connection (a stalled node holds up only its own
    /// slots, and is found stalled on its own: see
    /// [`Connector::cluster`](crate::Connector::cluster)), so this does not apply there:
    /// [`read_replicas`](crate::Connector::read_replicas) sends a read its master has not
    /// answered within 100 ms to a replica too.
    ///
    /// ```
    /// use tower_redis_resilience::reconnect::ReconnectConfig;
    ///
    /// // Redis allows this client one connection: never open another.
    /// let config = ReconnectConfig::new()
    ///     .side_reads(false)
    ///     .dedicated_blocking_connections(None);
    /// # let _ = config;
    /// ```
    pub fn side_reads(mut self, on: bool) -> Self {
        self.side_reads = on;
        self
    }

    /// While reconnecting, let calls wait up to this long for the connection instead of
    /// failing at once. Default zero: fail fast with an unavailable error saying which
    /// attempt is under way and when the next one comes.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Send `PING` every `interval` and replace the connection if it gets no reply within
    /// `timeout`, so a dead connection is found before a user request finds it. On a
    /// cluster's connection a `PING` that times out may be waiting on one stalled node,
    /// so only a failed one (the whole connection lost) replaces it, as for calls.
    ///
    /// Default: every [`DEFAULT_HEALTH_CHECK_INTERVAL`] (5 s), within
    /// [`DEFAULT_STUCK_PING_TIMEOUT`] (1 s). Besides finding a connection that died while
    /// the app was quiet (a host gone, a connection a NAT or load balancer dropped
    /// without telling either end), before the next call does, it keeps the connection
    /// from going quiet at all, so such middle boxes do not drop it for being idle: the
    /// shortest idle timeouts of the common ones are minutes. Without it, the first calls
    /// after a silent drop time out (a write then may or may not have run) until three
    /// in a row make the connection suspect. A `PING` every 5 s is one command per
    /// client per 5 s, whatever the traffic.
    pub fn health_check(mut self, interval: Duration, timeout: Duration) -> Self {
        self.health_check = Some((interval, timeout));
        self
    }

    /// No [`health_check`](Self::health_check): the connection is asked nothing while
    /// the app is quiet. For a custom [`MakeConnection`](crate::MakeConnection) whose
    /// service does not answer `PING`, this keeps it from being replaced every interval.
    pub fn without_health_check(mut self) -> Self {
        self.health_check = None;
        self
    }

    /// Run this on every new connection before it serves calls (`CLIENT SETNAME`,
    /// `SCRIPT LOAD`...). If it fails, the connection is dropped and the attempt counts as
    /// failed. If it panics, the attempt fails with a [config](Error::is_config) error
    /// (retried at the slowest rate) and the reconnect loop goes on.
    pub fn on_connect<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.on_connect = Some(Arc::new(move |redis| Box::pin(hook(redis))));
        self
    }

    /// Replace the connection when Redis answers `READONLY` ("You can't write against a
    /// read only replica"), at most once per `interval`; `None` never does.
    ///
    /// That reply is how a failover shows: the master this connection reached was
    /// demoted, and the address it was opened with (a DNS name, a proxy, a cloud
    /// endpoint) now leads to the new master, but an open connection stays where it is,
    /// so every write would keep failing until something broke it. A new connection
    /// looks the address up again. It is opened in the background: the old one serves
    /// calls until it is up (reads succeed there, writes get `READONLY`), and stays if it
    /// cannot be opened; the connection state does not change. The call that got the
    /// reply keeps its error (Redis did not run it, so [`Retry`](crate::retry::Retry) may
    /// send it again). While the address still leads to a replica (DNS not updated yet),
    /// each `interval` tries once more, so writes during that time cost at most one new
    /// connection per `interval`, not one each.
    ///
    /// Default `Some(1 s)`. Set `None` for a connection to a replica on purpose (reads
    /// from a replica), where a stray write should just fail.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_resilience::reconnect::ReconnectConfig;
    ///
    /// // Follow a failover within 250 ms of the first write that finds the old master.
    /// let primary = ReconnectConfig::new().reconnect_on_readonly(Some(Duration::from_millis(250)));
    /// // Reads from a replica: a write is a mistake to report, not a failover.
    /// let replica = ReconnectConfig::new().reconnect_on_readonly(None);
    /// # let _ = (primary, replica);
    /// ```
    pub fn reconnect_on_readonly(mut self, interval: Option<Duration>) -> Self {
        self.readonly_reconnect = interval;
        self
    }

    /// Send commands that wait for data (`BLPOP`, `BRPOP`, `BLMOVE`, `BZPOPMIN`,
    /// `XREAD BLOCK`, `XREADGROUP BLOCK`...) on a connection of their own, and keep up to
    /// `idle` such connections open between calls for the next ones; `None` sends them on
    /// the shared connection.
    ///
    /// Redis serves one connection's commands in order, and holds all of them behind a
    /// command that blocks. On the shared connection a `BLPOP q 5` would hold up every
    /// other call of the application for up to five seconds: they would time out, and
    /// the breaker would count an outage. And a blocking call given up on (its deadline
    /// passed, its future dropped) stays blocked in Redis, which would later pop an
    /// element and send it to nobody: lost. On a connection of its own, a call given up on
    /// closes that connection, so Redis unblocks it and pops nothing.
    ///
    /// A blocking call takes an idle connection (one that has closed meanwhile is
    /// skipped) or opens one through the connector, running the
    /// [`on_connect`](Self::on_connect) hook on it, and puts it back when Redis answers.
    /// While the shared connection is down, blocking calls are refused as other calls are
    /// (or wait [`max_wait`](Self::max_wait)), so an outage does not turn every blocked
    /// worker into a stream of connection attempts. Idle connections opened before the
    /// shared connection was lost or replaced are closed, not reused; one that finds a
    /// replica (`READONLY`: a failover behind the address) has the shared connection
    /// replaced, as a write would (see
    /// [`reconnect_on_readonly`](Self::reconnect_on_readonly)). Each blocking call
    /// in flight holds one connection, up to
    /// [`max_blocking_connections`](Self::max_blocking_connections); calls beyond wait
    /// for one to come free, within their deadline. If one cannot be opened while the
    /// shared connection works (Redis at `maxclients`, most likely), the call fails as
    /// unavailable and not sent, and says so; the default breaker classifier ignores
    /// that failure, since the calls on the shared connection are served. Opening is
    /// then tried again at the pace of the [`backoff`](Self::backoff) schedule, not at
    /// each call (a worker's `BLPOP` loop made one try per call), until a new one opens
    /// and answers; the calls in between fail at once the same way, saying when the next
    /// try is. One that opens and breaks within a second, before it answered, counts as
    /// a failed try.
    ///
    /// `WAIT` and `WAITAOF` stay on the shared connection: they wait for the writes made
    /// before them on their own connection. (A pipeline that writes and then `WAIT`s goes
    /// to a connection of its own whole, so the `WAIT` still follows its writes.) A
    /// transaction never blocks: Redis runs blocking commands inside `MULTI` without
    /// waiting.
    ///
    /// Default `Some(4)`
    /// ([`DEFAULT_IDLE_BLOCKING_CONNECTIONS`](super::DEFAULT_IDLE_BLOCKING_CONNECTIONS)).
    ///
    /// ```
    /// use tower_redis_resilience::reconnect::ReconnectConfig;
    ///
    /// // Eight workers loop on BLPOP: keep a connection for each between calls.
    /// let workers = ReconnectConfig::new().dedicated_blocking_connections(Some(8));
    /// // Every blocking command on the one shared connection, as redis-rs does.
    /// let shared = ReconnectConfig::new().dedicated_blocking_connections(None);
    /// # let _ = (workers, shared);
    /// ```
    pub fn dedicated_blocking_connections(mut self, idle: Option<usize>) -> Self {
        self.blocking_idle = idle;
        self
    }

    /// At most this many blocking commands run at once on connections of their own
    /// (default 64,
    /// [`DEFAULT_MAX_BLOCKING_CONNECTIONS`](super::DEFAULT_MAX_BLOCKING_CONNECTIONS); at
    /// least 1); more wait, in the order they came, for one to finish, within their
    /// deadline. So a burst of blocking calls (a bug that spawns a worker per request,
    /// say) cannot open connections until Redis reaches `maxclients` and refuses
    /// everyone's, this client's reconnects included.
    pub fn max_blocking_connections(mut self, connections: usize) -> Self {
        self.blocking_max = connections.max(1);
        self
    }

    /// A connection kept for blocking commands that has sat idle longer than this is
    /// closed instead of reused (default 60 s,
    /// [`DEFAULT_BLOCKING_IDLE_TIMEOUT`](super::DEFAULT_BLOCKING_IDLE_TIMEOUT)).
    ///
    /// A NAT, firewall or load balancer may drop an idle connection without telling
    /// either end (an AWS Network Load Balancer after 350 s, an Azure one after 4
    /// minutes): a `BLPOP` sent on it then gets no reply, and waits out its whole
    /// deadline, which for `BLPOP k 0` never comes. Keep this below the shortest idle
    /// limit between the app and Redis. Workers that loop on a blocking command reuse
    /// their connections long before it.
    pub fn blocking_idle_timeout(mut self, timeout: Duration) -> Self {
        self.blocking_idle_timeout = timeout;
        self
    }

    /// While there is no connection (Redis is down and the connection is being
    /// re-established, or it is out of use while a `PING` asks whether it is stuck),
    /// send read-only commands and pipelines to `replica` instead of refusing them (or
    /// waiting [`max_wait`](Self::max_wait)): a [`Reconnect`](super::Reconnect) to a
    /// replica of this Redis, or to a managed Redis's reader endpoint. Writes are still
    /// refused, and so are blocking reads that take a connection of their own
    /// (`XREAD BLOCK`, with [`dedicated_blocking_connections`](Self::dedicated_blocking_connections)
    /// on, the default). If the replica cannot serve either, the read gets the refusal it
    /// would have had without one. Counted in
    /// [`ReconnectStats::replica_reads`](super::ReconnectStats::replica_reads).
    ///
    /// For the time a master is down: a Sentinel failover takes the master's
    /// `down-after-milliseconds` (30 s by default) and more, a managed Redis's failover
    /// tens of seconds, and meanwhile every read would miss and go to the database at
    /// once, while a replica still serves what it had (Redis's
    /// `replica-serve-stale-data`, on by default), as old as the replication lag.
    ///
    /// The layers above this one apply to what the replica does as to the rest: the
    /// deadline bounds it, the metrics count it, a replica's answer is a success to the
    /// breaker (so reads served there keep it closed; a read it turns away, after the
    /// timeouts that began a stall opened it under heavy traffic, still misses until it
    /// probes). Nothing is added to calls while there is a connection.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, reconnect::{Reconnect, ReconnectConfig}};
    ///
    /// # async fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let replica = Reconnect::lazy(
    ///     Connector::from_url("redis://127.0.0.1:6380")?,
    ///     // A write there is a mistake to report, not a failover to follow.
    ///     ReconnectConfig::new().reconnect_on_readonly(None),
    /// )?;
    /// let master = Reconnect::lazy(
    ///     Connector::from_url("redis://127.0.0.1:6379")?,
    ///     ReconnectConfig::new().read_replica(replica),
    /// )?;
    /// # let _ = master; Ok(()) }
    /// ```
    pub fn read_replica<R>(mut self, replica: R) -> Self
    where
        R: Service<Request, Response = Value, Error = Error> + Clone + Send + Sync + 'static,
        R::Future: Send + 'static,
    {
        self.replica = Some(BoxCloneSyncService::new(replica));
        self
    }
}

impl<S> fmt::Debug for ReconnectConfig<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectConfig")
            .field("backoff", &self.backoff)
            .field("stuck_after", &self.stuck_after)
            .field("stuck_ping_timeout", &self.stuck_ping_timeout)
            .field("max_wait", &self.max_wait)
            .field("health_check", &self.health_check)
            .field("on_connect", &self.on_connect.as_ref().map(|_| "<hook>"))
            .field("reconnect_on_readonly", &self.readonly_reconnect)
            .field("dedicated_blocking_connections", &self.blocking_idle)
            .field("max_blocking_connections", &self.blocking_max)
            .field("blocking_idle_timeout", &self.blocking_idle_timeout)
            .field("read_replica", &self.replica.is_some())
            .field("side_reads", &self.side_reads)
            .finish()
    }
}
