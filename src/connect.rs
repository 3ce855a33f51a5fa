//! How to reach Redis: where, with which credentials, within which connect timeout.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    aio::{AsyncStream, MultiplexedConnection},
    io::tcp::{TcpSettings, socket2::TcpKeepalive},
};

use redis::Value;
use tower::Service;

use crate::{
    Credentials, Error, Request,
    credentials::{Provider, fresh},
    sentinel::Sentinels,
    service::{Conn, Driver, RedisService},
};

/// Opens connections for [`Reconnect`](crate::reconnect::Reconnect): [`Connector`] opens
/// [`RedisService`]s; implement it to find Redis another way (ask Sentinel for the
/// current master, say) or to put an in-memory service under the stack in tests.
pub trait MakeConnection: Send + Sync + 'static {
    /// The service over one connection.
    type Connection: Service<Request, Response = Value, Error = Error, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static;

    /// Opens one connection, within whatever deadline the implementation sets.
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, Error>> + Send;

    /// Opens a connection for blocking commands alone (`BLPOP q 0` may wait for good), as
    /// [`connect`](Self::connect) by default. A cluster's gives up on no node's reply,
    /// where the shared one does after the connect timeout.
    fn connect_blocking(&self) -> impl Future<Output = Result<Self::Connection, Error>> + Send {
        self.connect()
    }

    /// Where it connects, for logs: no credentials.
    fn address(&self) -> &str;

    /// Where `connection` leads, for health reports: no credentials. For a connector that
    /// finds Redis anew on each connect (through Sentinel, say), the server it found.
    /// `None` when the connector cannot tell (the default).
    fn connected_to(&self, connection: &Self::Connection) -> Option<String> {
        let _ = connection;
        None
    }

    /// The servers behind `connection` that cannot be reached while it serves through
    /// the others, for health reports (no credentials): a cluster's masters whose slots'
    /// requests are answered at once, unsent. Empty when the connector cannot tell (the
    /// default).
    fn unreachable(&self, connection: &Self::Connection) -> Vec<String> {
        let _ = connection;
        Vec::new()
    }

    /// Counts the times a part of the servers behind `connection` was found unreachable
    /// and fenced off while the rest serve: a cluster's master gone or stalled, whose
    /// slots' requests are then answered at once, unsent. On each,
    /// [`Reconnect`](crate::reconnect::Reconnect) tells the watchers of its
    /// [state](crate::reconnect::Reconnect::state) (the value stays `Connected`), so a
    /// breaker that follows it
    /// ([`half_open_on_reconnect`](crate::circuit_breaker::CircuitBreakerLayer::half_open_on_reconnect))
    /// forgives the calls that part failed before it was fenced off, as it does a lost
    /// connection's. `None` when the connector cannot tell (the default).
    fn fences(&self, connection: &Self::Connection) -> Option<tokio::sync::watch::Receiver<u64>> {
        let _ = connection;
        None
    }

    /// Whether `connection` has closed for good, so a call on it would be refused: an
    /// idle connection kept for blocking commands is checked before it is used. `false`
    /// when the connector cannot tell (the default): the call then finds out.
    fn is_closed(&self, connection: &Self::Connection) -> bool {
        let _ = connection;
        false
    }

    /// A future that resolves once `connection` has closed for good (and
    /// [`is_closed`](Self::is_closed) says so), holding nothing that keeps it open:
    /// `Reconnect` then opens another at once, where it would otherwise learn of it from
    /// the next call (or health check), which would wait for the new one. `None` when the
    /// connector cannot tell (the default).
    fn closed(
        &self,
        connection: &Self::Connection,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let _ = connection;
        None::<std::future::Pending<()>>
    }

    /// Whether calls on `connection` dropped unanswered one after another say it is stuck
    /// (see [`stuck_after`](crate::reconnect::ReconnectConfig::stuck_after)). `true` by
    /// default; `false` for a connection that spreads calls over servers that fail apart
    /// (a cluster's), where a stalled node holds up only its own calls.
    fn hung_calls_mean_stuck(&self, connection: &Self::Connection) -> bool {
        let _ = connection;
        true
    }

    /// The server's id for `connection` (`CLIENT ID`), if the connector asked: while the
    /// connection is suspect and Redis answers on another, [`Reconnect`](crate::reconnect::Reconnect)
    /// asks the server there whether it holds this one's command up (a write pause, a
    /// `WAIT`), to wait for it rather than replace it. `None` by default.
    fn client_id(&self, connection: &Self::Connection) -> Option<u64> {
        let _ = connection;
        None
    }

    /// Reads its connections sent to a replica by themselves, which
    /// [`ReconnectStats::replica_reads`](crate::reconnect::ReconnectStats::replica_reads)
    /// adds to those [`Reconnect`](crate::reconnect::Reconnect) sent: a cluster's, with
    /// [`Connector::read_replicas`]. 0 by default.
    fn replica_reads(&self) -> u64 {
        0
    }
}

impl MakeConnection for Connector {
    type Connection = RedisService;

    fn connect(&self) -> impl Future<Output = Result<RedisService, Error>> + Send {
        Connector::connect(self)
    }

    fn connect_blocking(&self) -> impl Future<Output = Result<RedisService, Error>> + Send {
        self.connect_for(Use::Blocking)
    }

    fn address(&self) -> &str {
        Connector::address(self)
    }

    fn connected_to(&self, connection: &RedisService) -> Option<String> {
        Some(connection.address().to_owned())
    }

    fn unreachable(&self, connection: &RedisService) -> Vec<String> {
        connection.unreachable()
    }

    fn fences(&self, connection: &RedisService) -> Option<tokio::sync::watch::Receiver<u64>> {
        connection.fences()
    }

    fn is_closed(&self, connection: &RedisService) -> bool {
        connection.is_closed()
    }

    fn closed(
        &self,
        connection: &RedisService,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        connection.closed()
    }

    fn hung_calls_mean_stuck(&self, connection: &RedisService) -> bool {
        !connection.is_cluster()
    }

    fn client_id(&self, connection: &RedisService) -> Option<u64> {
        connection.client_id()
    }

    fn replica_reads(&self) -> u64 {
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.cluster {
            return match cluster.replicas.get() {
                Some(Some(replicas)) => replicas.served(),
                _ => 0,
            };
        }
        0
    }
}

/// How often a [Sentinel connector](Connector::sentinel) asks whether the master moved,
/// unless [`Connector::sentinel_check_interval`] says otherwise.
pub const DEFAULT_SENTINEL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The connect timeout used unless [`Connector::connect_timeout`] sets another.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection may be quiet before TCP keepalive probes ask whether the other
/// end is still there, unless [`Connector::tcp_keepalive`] says otherwise: 30 s, then a
/// probe every 10 s, and the connection is closed after 3 unanswered (on Linux, data
/// unacknowledged for as long, 60 s, closes it too). A dead peer is so found within a
/// minute, and no load balancer or NAT with an idle timeout above 30 s drops the
/// connection for being quiet.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The largest argument sent unless [`Connector::max_argument_size`] says otherwise:
/// 512 MiB, Redis's default `proto-max-bulk-len`.
pub const DEFAULT_MAX_ARGUMENT_SIZE: usize = 512 * 1024 * 1024;

/// How to open a connection to Redis: a [`redis::Client`] (built from a URL, a
/// [`ConnectionInfo`], or by you, with TLS certificates say) and a connect timeout that
/// bounds the whole handshake (TCP, TLS, `AUTH`, `SELECT`).
///
/// Cheap to clone. Its `Debug` shows the address and database, never the credentials.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_redis_resilience::Connector;
///
/// # async fn run() -> Result<(), tower_redis_resilience::Error> {
/// let connector = Connector::from_url("redis://:secret@127.0.0.1:6379/0")?
///     .connect_timeout(Duration::from_millis(250));
/// let redis = connector.connect().await?;
/// # let _ = redis; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connector {
    client: redis::Client,
    connect_timeout: Duration,
    /// The address as shown in `Debug` and logs, computed once.
    display: Arc<str>,
    /// Set when Sentinel says where the master is; `client` then holds how to talk to it.
    sentinel: Option<Arc<Sentinels>>,
    /// How often Sentinel is asked whether the master moved, while connections are out.
    sentinel_check_interval: Duration,
    /// Set for a Redis Cluster: its initial nodes. `client` then holds the first.
    #[cfg(feature = "cluster")]
    cluster: Option<Arc<ClusterNodes>>,
    /// The largest argument its connections send.
    max_argument: usize,
    /// How it opens TLS connections itself.
    own_tls: OwnTls,
    /// Asked for credentials before each connection ([`Connector::credentials`]).
    credentials: Option<Provider>,
    /// The name its connections give themselves ([`Connector::client_name`]).
    client_name: Option<Arc<str>>,
}

/// How a connector opens TLS connections itself (feature `tls`): with nothing to open,
/// nothing to hold.
#[cfg(feature = "tls")]
pub(crate) use crate::tls::OwnTls;
#[cfg(not(feature = "tls"))]
#[derive(Clone, Default)]
pub(crate) struct OwnTls {}

/// A cluster's initial nodes, shared by a connector's clones.
#[cfg(feature = "cluster")]
struct ClusterNodes {
    nodes: Vec<ConnectionInfo>,
    /// Given with [`Connector::tls_certificates`]: redis-rs's cluster client takes them
    /// apart from the nodes' addresses.
    #[cfg(feature = "tls")]
    certificates: Option<redis::TlsCertificates>,
    /// The node the next Pub/Sub connection tries first. Each attempt starts one node
    /// further on, so a subscriber whose node died or stalled moves to another (the
    /// cluster bus carries every publish to every node, so any node will do).
    next_pubsub_node: std::sync::atomic::AtomicUsize,
    /// Reads a master cannot serve go to its replicas ([`Connector::read_replicas`]).
    read_replicas: bool,
    /// The connection for them, one for every connection this connector opens (the
    /// shared one, each for blocking commands, and those after a reconnect); `None`
    /// inside if it could not be set up.
    replicas: std::sync::OnceLock<Option<Arc<crate::service::ReplicaReads>>>,
    /// Asked for credentials before each connection to a node.
    credentials: Option<Provider>,
}

#[cfg(feature = "cluster")]
impl ClusterNodes {
    /// The same settings, with `nodes` (and `certificates`, when given) instead.
    fn with_nodes(
        &self,
        nodes: Vec<ConnectionInfo>,
        #[cfg(feature = "tls")] certificates: Option<redis::TlsCertificates>,
    ) -> ClusterNodes {
        ClusterNodes {
            nodes,
            #[cfg(feature = "tls")]
            certificates: certificates.or_else(|| self.certificates.clone()),
            next_pubsub_node: std::sync::atomic::AtomicUsize::new(0),
            read_replicas: self.read_replicas,
            replicas: std::sync::OnceLock::new(),
            credentials: self.credentials.clone(),
        }
    }

    /// The connection for replica reads, if they are asked for: set up by the first
    /// connection this connector opens, and opened in the background then, so that
    /// connection neither waits for it nor fails with it.
    fn replicas(
        &self,
        connect_timeout: Duration,
        template: &ConnectionInfo,
        own_tls: &OwnTls,
    ) -> Option<Arc<crate::service::ReplicaReads>> {
        if !self.read_replicas {
            return None;
        }
        self.replicas
            .get_or_init(|| {
                let builder = cluster_builder(self, connect_timeout);
                let client = with_node_response_timeout(builder, connect_timeout)
                    .read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy)
                    .build();
                match client {
                    Ok(client) => {
                        let unlisted = crate::service::Unlisted::replicas(
                            template.clone(),
                            self.credentials.clone(),
                            own_tls.clone(),
                            connect_timeout,
                        );
                        Some(crate::service::ReplicaReads::new(
                            client,
                            connect_timeout,
                            unlisted,
                        ))
                    }
                    Err(error) => {
                        tracing::warn!(%error, "redis cluster: no connection for replica reads");
                        None
                    }
                }
            })
            .clone()
            .inspect(|replicas| replicas.open())
    }
}

impl Connector {
    /// Parses a `redis://`, `rediss://` or `unix://` URL. A malformed URL is a
    /// [config](Error::is_config) error that quotes the URL with its password hidden.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(|err| {
            Error::config(format!("invalid redis URL `{}`: {err}", redact_url(url)))
        })?;
        Ok(Connector::from_client(client))
    }

    /// Uses connection details you assembled yourself.
    pub fn from_connection_info(info: impl IntoConnectionInfo) -> Result<Self, Error> {
        let client = redis::Client::open(info)
            .map_err(|err| Error::config(format!("invalid redis connection info: {err}")))?;
        Ok(Connector::from_client(client))
    }

    /// Uses a `redis::Client` you built. (For TLS certificates of your own,
    /// `tls_certificates`, with feature `tls`, does better than `Client::build_with_tls`.)
    pub fn from_client(client: redis::Client) -> Self {
        let client = with_tcp(client, tcp_defaults);
        let display = describe(client.get_connection_info()).into();
        Connector {
            client,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            display,
            sentinel: None,
            sentinel_check_interval: DEFAULT_SENTINEL_CHECK_INTERVAL,
            #[cfg(feature = "cluster")]
            cluster: None,
            max_argument: DEFAULT_MAX_ARGUMENT_SIZE,
            own_tls: OwnTls::default(),
            credentials: None,
            client_name: None,
        }
    }

    /// Asks Redis Sentinel where the master named `master_name` is, on every connect,
    /// and follows it when it moves.
    ///
    /// Every Sentinel is asked at once and the first answer is taken, so one that is down
    /// or stalled does not hold a connect up; the server it names must answer `ROLE` as a
    /// master, unless the user may not run `ROLE` (it is `@dangerous`, which
    /// least-privilege users often lack): a server that refuses it is taken for what
    /// Sentinel named. While connections are open, the connector listens for a Sentinel's
    /// `+switch-master` announcement, and also asks every
    /// [`sentinel_check_interval`](Self::sentinel_check_interval) (1 s) in case one went
    /// unheard. After a failover it retires the connections to the old master: requests
    /// already sent get their replies; new ones are refused as not sent, so [`Reconnect`]
    /// connects to the new master and [`Retry`] sends them there. An old master that is
    /// still up would otherwise take writes until Sentinel turns it into a replica (about
    /// ten seconds later, in Redis 7), and those writes would be lost. The same holds
    /// over TLS.
    ///
    /// `master` says how to talk to the master once found: its credentials, database,
    /// protocol and TLS (`rediss://`). Its host and port are not used; Sentinel's answer
    /// replaces them. The connect timeout bounds the whole attempt, the questions to
    /// Sentinel included.
    ///
    /// [`Reconnect`]: crate::reconnect::Reconnect
    /// [`Retry`]: crate::retry::Retry
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, ResilientClient};
    ///
    /// # async fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let connector = Connector::sentinel(
    ///     ["redis://127.0.0.1:26379", "redis://127.0.0.1:26380", "redis://127.0.0.1:26381"],
    ///     "mymaster",
    ///     "redis://:secret@mymaster/0",
    /// )?;
    /// let client = ResilientClient::builder_with_connector(connector).build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn sentinel<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master_name: &str,
        master: impl IntoConnectionInfo,
    ) -> Result<Self, Error> {
        Connector::via_sentinel(sentinels, master_name, master, false)
    }

    /// A connector that asks `sentinels` for the master named `master_name`, or for one
    /// of its replicas, and talks to it as `template` says.
    fn via_sentinel<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master_name: &str,
        template: impl IntoConnectionInfo,
        replicas: bool,
    ) -> Result<Self, Error> {
        let nodes = addresses(sentinels, "Sentinel")?
            .into_iter()
            .map(|node| info_with_tcp(node, tcp_defaults))
            .collect();
        let mut sentinels = Sentinels::new(nodes, master_name, OwnTls::default())?;
        if replicas {
            sentinels = sentinels.for_replicas();
        }
        let mut connector = Connector::from_connection_info(template)?;
        let user = match connector.connection_info().redis_settings().username() {
            Some(user) => format!("{user}@"),
            None => String::new(),
        };
        let db = connector.connection_info().redis_settings().db();
        let which = if replicas { "a replica of " } else { "" };
        connector.display = format!(
            "{which}{user}{master_name}/{db} via Sentinel {}",
            sentinels.addresses()
        )
        .into();
        connector.sentinel = Some(Arc::new(sentinels));
        Ok(connector)
    }

    /// Asks Redis Sentinel for the replicas of the master named `master_name`, on every
    /// connect, and connects to the first that answers `ROLE` as a replica (or as a
    /// master: one being promoted in a failover; or refuses `ROLE` to a user that may
    /// not run it), trying those Sentinel deems up first. For reads that must go on while
    /// the master cannot serve:
    /// give it to [`ResilientClientBuilder::read_replica`](crate::ResilientClientBuilder::read_replica)
    /// (or [`ReconnectConfig::read_replica`](crate::reconnect::ReconnectConfig::read_replica))
    /// of a client built with [`sentinel`](Self::sentinel).
    ///
    /// Every Sentinel is asked at once and the first that knows the master answers, as
    /// for the master. A replica that Sentinel promotes in a failover stays connected: it
    /// serves reads as a master too. `replica` says how to talk to the replica (its
    /// credentials, database, protocol and TLS); its host and port are not used.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, ResilientClient};
    ///
    /// # async fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let sentinels = ["redis://127.0.0.1:26379", "redis://127.0.0.1:26380"];
    /// let client = ResilientClient::builder_with_connector(Connector::sentinel(
    ///     sentinels,
    ///     "mymaster",
    ///     "redis://:secret@mymaster/0",
    /// )?)
    /// .read_replica(Connector::sentinel_replica(
    ///     sentinels,
    ///     "mymaster",
    ///     "redis://:secret@mymaster/0",
    /// )?)
    /// .build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn sentinel_replica<T: IntoConnectionInfo>(
        sentinels: impl IntoIterator<Item = T>,
        master_name: &str,
        replica: impl IntoConnectionInfo,
    ) -> Result<Self, Error> {
        Connector::via_sentinel(sentinels, master_name, replica, true)
    }

    /// Connects to a Redis Cluster through redis-rs's cluster client, which keeps a
    /// connection to each node and sends every command to the node that serves its key
    /// (feature `cluster`).
    ///
    /// `nodes` are where to start: any reachable one tells where the others are. Their
    /// credentials, protocol and TLS apply to every node (`rediss://` URLs; for
    /// certificates signed by a CA of your own, add
    /// [`tls_certificates`](Self::tls_certificates)). A connect that every node refuses
    /// for its credentials or its certificate is a [config](Error::is_config) error, as
    /// for one server.
    ///
    /// What this crate changes in redis-rs's client: it never resends a command by itself
    /// (`retries(0)`), since it cannot tell an `INCR` that may have run from one that did
    /// not. A `MOVED` (the slot is served elsewhere now, after a failover or a resharding)
    /// comes back as an [unavailable](Error::is_unavailable) error that did not run, which
    /// [`Retry`](crate::retry::Retry) sends again once the client has refreshed its map
    /// of the slots; a transaction that meets one (which Redis discards) goes to the node
    /// named at once, and a read of one of its keys makes the client refresh its map,
    /// which it does not for a transaction by itself. An `ASK` (the slot is migrating, and
    /// the key has gone, or is new) is followed at once: the command goes to the node
    /// named, after `ASKING`, in one pipeline, as does a transaction (which Redis
    /// discarded, so nothing of it ran), on redis-rs's connection to that node, or on one
    /// of this crate's own to a node the client does not know yet (a master just added,
    /// before any slot is its). A plain
    /// pipeline of several commands that meets an `ASK` fails: the commands on keys still
    /// there ran, so the error says it [may have run](Error::may_have_run), and only a
    /// pipeline of idempotent commands is sent again. A transaction or multi-key command
    /// whose keys are split between the two nodes is refused by Redis (`TRYAGAIN`, did
    /// not run) until the migration ends. A node's lost connection, or calls to a stalled
    /// node timing out one after another, do not make
    /// [`Reconnect`](crate::reconnect::Reconnect) replace the whole cluster connection
    /// (the client reconnects to that node, the others serve on); a connect leaves out a
    /// node that does not answer within a quarter of the connect timeout; redirects never
    /// open the breaker. Blocking commands run on cluster connections of their own, as
    /// [`Reconnect`](crate::reconnect::Reconnect) does for one server; each such
    /// connection reaches every node (redis-rs's cluster client connects to all), so keep
    /// [`max_blocking_connections`](crate::reconnect::ReconnectConfig::max_blocking_connections)
    /// in proportion. A [subscriber](crate::pubsub::Subscriber) subscribes on one node
    /// (the cluster bus carries every publish to every node): each connect tries the
    /// nodes in turn, starting one node further on than the one before, so subscribers
    /// spread over the nodes and one whose node dies or stalls subscribes again on
    /// another.
    ///
    /// A master that cannot be reached (its process or its host gone) is found by the
    /// `MOVED`s that name it, which the other nodes answer for its slots, and then tried
    /// with a TCP connect of this crate's own: until it accepts one (tried again at 100 ms,
    /// doubling to 1 s) or the cluster names another master for its slots (asked every
    /// 250 ms), its slots' requests are answered at once, unsent, with an
    /// [unavailable](Error::is_unavailable) error that is not resent and does not count
    /// for the breaker; reads go to a replica with [`read_replicas`](Self::read_replicas).
    /// Left to redis-rs's client, each of those requests had it read its map of the slots
    /// and try to connect to the master, while every other request waited. A master that
    /// stalls (paused, hung) is found when a request of its slots goes unanswered and it
    /// does not answer a `PING` on a connection of this crate's own within 250 ms; its
    /// slots' requests are then answered at once the same way, until it answers again
    /// (asked after 250 ms, then at intervals doubling to 1 s) or the cluster names
    /// another master for them (asked every 250 ms). Such masters
    /// show in [`ResilientClient::unreachable`](crate::ResilientClient::unreachable).
    ///
    /// A master that fails with no replica to take over costs only its own slots if the
    /// cluster runs with `cluster-require-full-coverage no`; with Redis's default (`yes`),
    /// every node refuses every key (`CLUSTERDOWN`) until it is back.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, ResilientClient};
    ///
    /// # fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let connector = Connector::cluster([
    ///     "redis://127.0.0.1:7000",
    ///     "redis://127.0.0.1:7001",
    ///     "redis://127.0.0.1:7002",
    /// ])?;
    /// let client = ResilientClient::builder_with_connector(connector).build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    #[cfg(feature = "cluster")]
    pub fn cluster<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<Self, Error> {
        let nodes: Vec<ConnectionInfo> = addresses(nodes, "cluster node")?
            .into_iter()
            .map(|node| info_with_tcp(node, tcp_defaults))
            .collect();
        let Some(first) = nodes.first() else {
            return Err(Error::config("a cluster connector needs at least one node"));
        };
        let mut connector = Connector::from_connection_info(first.clone())?;
        let addresses: Vec<String> = nodes.iter().map(describe).collect();
        connector.display = format!("cluster {}", addresses.join(", ")).into();
        connector.cluster = Some(Arc::new(ClusterNodes {
            nodes,
            #[cfg(feature = "tls")]
            certificates: None,
            next_pubsub_node: std::sync::atomic::AtomicUsize::new(0),
            read_replicas: false,
            replicas: std::sync::OnceLock::new(),
            credentials: None,
        }));
        Ok(connector)
    }

    /// Trusts the CA in `certificates` (and presents their client certificate, for
    /// servers that ask for one) on every TLS connection this connector opens: to the
    /// server, to a cluster's nodes, to Sentinels and the master they name (feature
    /// `tls`). For servers whose certificate is signed by a CA of your own; one signed
    /// by a public CA needs nothing.
    ///
    /// Prefer it to building the connector [`from_client`](Self::from_client) a
    /// `Client::build_with_tls`: with the certificates in hand, this crate opens the TLS
    /// connections itself and sees them close, so a call made on one the server closed
    /// while it was quiet is sent again on a new one (redis-rs reports such a call as
    /// possibly run). For a cluster it is the only way, as redis-rs's cluster client
    /// takes certificates apart from the nodes' addresses.
    ///
    /// A [config](Error::is_config) error when no address uses TLS (`rediss://`), or when
    /// the certificates cannot be read.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, ResilientClient};
    ///
    /// # fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let ca = std::fs::read("ca.crt").expect("the CA's PEM");
    /// let connector = Connector::from_url("rediss://127.0.0.1:6380")?
    ///     .tls_certificates(redis::TlsCertificates {
    ///         client_tls: None,
    ///         root_cert: Some(ca),
    ///     })?;
    /// let client = ResilientClient::builder_with_connector(connector).build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls_certificates(mut self, certificates: redis::TlsCertificates) -> Result<Self, Error> {
        self.own_tls = OwnTls::with_certificates(&certificates)?;
        let is_tls = |info: &ConnectionInfo| matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        // A TLS address with the certificates; a plain one as it is.
        let certify = |info: &ConnectionInfo| -> Result<ConnectionInfo, Error> {
            if !is_tls(info) {
                return Ok(info.clone());
            }
            redis::Client::build_with_tls(info.clone(), certificates.clone())
                .map(|client| client.get_connection_info().clone())
                .map_err(|err| {
                    Error::config(format!("TLS certificates for {}: {err}", describe(info)))
                })
        };
        let mut any_tls = is_tls(self.connection_info());
        self.client =
            redis::Client::open(certify(self.connection_info())?).map_err(Error::from_connect)?;
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.cluster {
            // redis-rs refuses a cluster whose nodes mix TLS and plain TCP; it says so.
            let nodes = cluster
                .nodes
                .iter()
                .map(certify)
                .collect::<Result<Vec<_>, _>>()?;
            any_tls |= nodes.iter().any(is_tls);
            self.cluster = Some(Arc::new(
                cluster.with_nodes(nodes, Some(certificates.clone())),
            ));
        }
        if let Some(sentinels) = &self.sentinel {
            let renewed = sentinels.with_nodes_changed(certify, self.own_tls.clone())?;
            any_tls |= renewed.infos().any(is_tls);
            self.sentinel = Some(Arc::new(renewed));
        }
        if !any_tls {
            return Err(Error::config(format!(
                "TLS certificates were given for {}, which is not reached over TLS \
                 (use rediss:// URLs)",
                self.display
            )));
        }
        Ok(self)
    }

    /// Asks `provider` for the [`Credentials`] of each connection, just before it is
    /// opened: for servers whose passwords are tokens that expire (AWS ElastiCache and
    /// MemoryDB IAM authentication, Azure Entra ID, Vault's dynamic secrets), or a
    /// password that is rotated (read from the file a secret manager keeps current, a
    /// Kubernetes Secret mounted as a volume). A password in the URL would authenticate
    /// the first connection and be refused by every one after it changed: the first
    /// reconnect after a restart or a failover would fail for good.
    ///
    /// Every connection this connector opens asks it: the shared one and each reconnect,
    /// those of blocking commands and subscribers, the master or replica Sentinel names,
    /// and a cluster's (redis-rs's cluster client asks once or twice for each node it
    /// connects to, its own reconnects included). The Sentinels themselves are asked with
    /// the credentials of their URLs. The provider's user name, when it gives one,
    /// replaces the URL's; [`Credentials::password_only`] keeps the URL's user.
    ///
    /// The connect timeout bounds the provider's answer too. A provider that fails makes
    /// the connect [unavailable](Error::is_unavailable), with its error in the message, and
    /// [`Reconnect`](crate::reconnect::Reconnect) tries again at its schedule's pace.
    /// Calls may come from several tasks at once (a blocking command's connection opens
    /// beside the shared one): cache in the provider whatever is slow to get.
    ///
    /// Redis checks credentials at `AUTH` only, so a connection keeps working on the ones
    /// it opened with. Services that close connections whose token has expired want them
    /// authenticated again before then (Azure's, with Entra ID): credentials given
    /// [`valid_for`](Credentials::valid_for) a time are renewed on the open connection, the
    /// provider asked again at three quarters of it and `AUTH` sent with its answer,
    /// without a reconnect. A subscriber's connection is the exception: Redis takes no
    /// `AUTH` on a subscribed RESP2 connection, so when the service closes it, the
    /// subscriber subscribes again on a new one and says so with its events. One closed
    /// for another reason (ElastiCache IAM's after 12 hours) is reconnected to with new
    /// credentials.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, Credentials, ResilientClient};
    ///
    /// /// Stands in for a token service: a signed IAM request, an Entra ID token.
    /// async fn fetch_token() -> Result<String, std::io::Error> {
    ///     Ok(std::env::var("REDIS_TOKEN").unwrap_or_default())
    /// }
    ///
    /// # fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let connector = Connector::from_url("redis://app@127.0.0.1:6379")?.credentials(|| async {
    ///     Ok::<_, std::io::Error>(Credentials::password_only(fetch_token().await?))
    /// });
    /// let client = ResilientClient::builder_with_connector(connector).build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    #[must_use]
    pub fn credentials<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Credentials, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let provider = Provider::new(provider);
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.cluster {
            let mut renewed = cluster.with_nodes(
                cluster.nodes.clone(),
                #[cfg(feature = "tls")]
                None,
            );
            renewed.credentials = Some(provider.clone());
            self.cluster = Some(Arc::new(renewed));
        }
        self.credentials = Some(provider);
        self
    }

    /// How often a [Sentinel connector](Self::sentinel) asks Sentinel whether the master
    /// moved, while it has connections open, besides listening for `+switch-master`.
    /// Default: [`DEFAULT_SENTINEL_CHECK_INTERVAL`]. No effect on other connectors.
    #[must_use]
    pub fn sentinel_check_interval(mut self, interval: Duration) -> Self {
        self.sentinel_check_interval = interval;
        self
    }

    /// Whether connections set `TCP_NODELAY` (default: yes), so each request leaves at
    /// once instead of waiting for the server's acknowledgement of the one before
    /// (Nagle's algorithm). On one connection that many callers share, Nagle holds every
    /// request written while another is unacknowledged until the reply or a delayed
    /// acknowledgement comes: measured with 8 to 32 callers through a proxy that delays
    /// replies by 1 ms, half the throughput and twice the median latency of `TCP_NODELAY`.
    /// redis-rs 1.x leaves Nagle on (its 2.0 turns it off). Pass `false` (Nagle on) only
    /// for a Redis on the same host under heavy load, where fewer, larger packets are
    /// worth more than the wait (measured on loopback with 32 callers: ~1.4 times the
    /// throughput). Applies to every connection this connector opens: to the server, to
    /// a cluster's nodes, to the Sentinels and the master or replica they name, and
    /// subscribers'.
    ///
    /// ```
    /// use tower_redis_resilience::Connector;
    ///
    /// let connector = Connector::from_url("redis://127.0.0.1:6379")?;
    /// assert!(connector.connection_info().tcp_settings().nodelay());
    /// let nagle = connector.tcp_nodelay(false);
    /// assert!(!nagle.connection_info().tcp_settings().nodelay());
    /// # Ok::<(), tower_redis_resilience::Error>(())
    /// ```
    #[must_use]
    pub fn tcp_nodelay(self, on: bool) -> Self {
        self.with_tcp_settings(|settings| settings.set_nodelay(on))
    }

    /// Whether connections send TCP keepalive probes, and after how long a quiet
    /// connection does (default: [`DEFAULT_TCP_KEEPALIVE`], 30 s). After `idle` with
    /// nothing sent or received, the OS asks the other end every `idle / 3` (at least
    /// 1 s), and after 3 probes unanswered it closes the connection. On Linux,
    /// `TCP_USER_TIMEOUT` is set to the same total (`idle` plus the 3 probes): keepalive
    /// does not probe a connection with data unacknowledged, which TCP would otherwise
    /// retransmit for many minutes, so a request sent just as the host vanished is given
    /// up on as soon.
    ///
    /// It is what finds a dead peer on a connection that is waiting by design: a
    /// [blocking command](crate::Blocking) (`BLPOP jobs 0` in a worker, `XREADGROUP ...
    /// BLOCK 0`) has its own connection, quiet for as long as the queue is, and no
    /// `PING` can be sent on it meanwhile. If Redis's host is gone, or a load balancer
    /// or NAT dropped the connection for being quiet (Azure's default idle timeout is
    /// 4 min, AWS's NLB 350 s), nothing else ever tells the client: measured through a
    /// black hole, the `BLPOP` waits for good without probes, and fails within
    /// `2 × idle` with them, as [unavailable](Error::is_unavailable) and one that may
    /// have run (it may have popped an element into the dead connection). The probes
    /// also keep such middle boxes from dropping the connection in the first place. The
    /// shared connection has the health-check `PING` besides
    /// ([`ReconnectConfig::health_check`](crate::reconnect::ReconnectConfig::health_check)).
    ///
    /// Settings given in the [`ConnectionInfo`] (its `TcpSettings` with a keepalive of
    /// their own) are kept: the default applies only when they set none, and keeps a
    /// user timeout they set. `None` turns the probes and the user timeout off. (A linger
    /// time set in those settings cannot be read back, so `None` drops it too.) Applies
    /// to every connection this connector opens, as [`tcp_nodelay`](Self::tcp_nodelay)
    /// does. (To the Sentinels too: their `+switch-master` announcements come on a
    /// subscription that is quiet in between.)
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_redis_resilience::Connector;
    ///
    /// let connector = Connector::from_url("redis://127.0.0.1:6379")?;
    /// assert!(connector.connection_info().tcp_settings().keepalive().is_some());
    /// let quick = connector.tcp_keepalive(Some(Duration::from_secs(5)));
    /// let off = quick.tcp_keepalive(None);
    /// assert!(off.connection_info().tcp_settings().keepalive().is_none());
    /// # Ok::<(), tower_redis_resilience::Error>(())
    /// ```
    #[must_use]
    pub fn tcp_keepalive(self, idle: Option<Duration>) -> Self {
        self.with_tcp_settings(|settings| match idle {
            Some(idle) => with_keepalive(settings, idle),
            None => without_keepalive(&settings),
        })
    }

    /// Changes the TCP settings of every connection this connector opens.
    fn with_tcp_settings(mut self, change: impl Fn(TcpSettings) -> TcpSettings) -> Self {
        self.client = with_tcp(self.client, &change);
        if let Some(sentinels) = &self.sentinel {
            let changed = |node: &ConnectionInfo| Ok(info_with_tcp(node.clone(), &change));
            // It has nodes, so it is made again.
            if let Ok(renewed) = sentinels.with_nodes_changed(changed, self.own_tls.clone()) {
                self.sentinel = Some(Arc::new(renewed));
            }
        }
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.cluster {
            let nodes = cluster
                .nodes
                .iter()
                .map(|node| info_with_tcp(node.clone(), &change))
                .collect();
            self.cluster = Some(Arc::new(cluster.with_nodes(
                nodes,
                #[cfg(feature = "tls")]
                None,
            )));
        }
        self
    }

    /// For a [cluster](Self::cluster): reads that a master cannot serve go to a replica
    /// of its slots, on a second cluster connection set up for replica reads (so a
    /// connection more to every node, whatever the connections this connector opens),
    /// opened in the background beside the first, its connections to the replicas in
    /// `READONLY` mode.
    ///
    /// Read-only commands and plain pipelines that fail as
    /// [unavailable](Error::is_unavailable) on the master's connection are sent once to
    /// a replica of their key's slot, by its address. It is found in a map of the slots'
    /// replicas that this connection reads itself (`CLUSTER NODES`, from up to three
    /// nodes, since a node learns of a replica by gossip), and reads again when a replica
    /// cannot serve or none is known for the slot (at most ten times a second): after a
    /// failover, the map names the old roles until then. The read goes on redis-rs's
    /// connection to that replica, or, when it has none, on a connection of this crate's
    /// own (`READONLY`, opened as the initial nodes' are, kept for the next read). A
    /// replica that has not answered within 50 ms counts as one that cannot serve.
    /// redis-rs's own routing is not
    /// used for this: it goes by its map from `CLUSTER SLOTS`, which leaves out a replica
    /// until the node asked has heard that the replica's replication offset is above 0
    /// (in a cluster just built, and while a replica syncs again with a master that
    /// restarted), and with no replica in its map it sends a slot's reads to the master.
    /// If the replica cannot serve either, the read gets the master's error (a miss
    /// through the fallback). Writes are never sent there. A read command (not a
    /// pipeline) the master has not answered within 100 ms (a master that stalls: a long
    /// command, a fork, a slow disk) is sent to a replica too, and the first answer wins, so it is served within its
    /// deadline instead of waiting it out (a timer for each read while this is on; a
    /// healthy master answers long before it fires).
    ///
    /// When a master cannot serve: one that died leaves its slots without a master until
    /// the cluster fails it over, which begins after `cluster-node-timeout` (15 s by
    /// default); one that restarted answers `CLUSTERDOWN` for ~2 s while it rejoins (and
    /// `LOADING` first while it loads a large dataset), though it accepts connections.
    /// Its replicas still hold what it had (`replica-serve-stale-data`, Redis's default),
    /// a moment behind. For a moment after a master dies (seen: up to 0.2 s), redis-rs's
    /// client may route a read to a node that redirects it to the master that is gone,
    /// until it has refreshed its map: those miss. Tested with a killed master (after
    /// those 0.3 s, every read of its keys served by its replica until the failover;
    /// without, all missed), with a restarted one (every read served while it answered
    /// `CLUSTERDOWN`; before this connection routed by address, 0 to 9 of ~390), with a
    /// restarted one after a failover (the map read again), and with a paused one (every
    /// read served, in ~103 ms; without the second request, every one missed at its
    /// 250 ms deadline). Not for a managed cluster
    /// that does not route reads to replicas (Azure Managed Redis, per redis-rs). No
    /// effect on other connectors. Default: off.
    ///
    /// ```no_run
    /// use tower_redis_resilience::{Connector, ResilientClient};
    ///
    /// # fn run() -> Result<(), tower_redis_resilience::Error> {
    /// let connector = Connector::cluster(["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"])?
    ///     .read_replicas(true);
    /// let client = ResilientClient::builder_with_connector(connector).build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    #[cfg(feature = "cluster")]
    #[must_use]
    pub fn read_replicas(mut self, on: bool) -> Self {
        if let Some(cluster) = &self.cluster {
            let mut renewed = cluster.with_nodes(
                cluster.nodes.clone(),
                #[cfg(feature = "tls")]
                None,
            );
            renewed.read_replicas = on;
            self.cluster = Some(Arc::new(renewed));
        }
        self
    }

    /// Bounds each connection attempt, handshake included. Default:
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    ///
    /// For a [cluster](Self::cluster), it also bounds how long the shared connection waits
    /// for a node's reply before giving up on it (an [unavailable](Error::is_unavailable)
    /// error that [may have run](Error::may_have_run)): redis-rs's cluster client reads its
    /// map of the slots one node at a time while every request waits, so a stalled node
    /// would otherwise hold up every node's requests. Calls with a deadline beyond it (set
    /// with [`TimeoutLayer`](crate::timeout::TimeoutLayer) or `with_deadline`) end at it
    /// instead; blocking commands, on connections of their own, are not bounded by it.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Requests with an argument (a key, a value) larger than `bytes` are refused
    /// unsent, with a [config](Error::is_config) error that says why. Default
    /// [`DEFAULT_MAX_ARGUMENT_SIZE`], 512 MiB: Redis's default `proto-max-bulk-len`, set
    /// this to the server's if it was changed.
    ///
    /// Redis answers a larger argument with a protocol error and closes the connection,
    /// and on a connection every caller shares that fails their calls in flight too, and
    /// makes [`Reconnect`](crate::reconnect::Reconnect) open a new one.
    ///
    /// ```
    /// use tower_redis_resilience::Connector;
    ///
    /// // A server run with `proto-max-bulk-len 64mb`.
    /// let connector = Connector::from_url("redis://127.0.0.1:6379")?
    ///     .max_argument_size(64 * 1024 * 1024);
    /// # let _ = connector; Ok::<(), tower_redis_resilience::Error>(())
    /// ```
    #[must_use]
    pub fn max_argument_size(mut self, bytes: usize) -> Self {
        self.max_argument = bytes;
        self
    }

    /// Names every connection this connector opens (`CLIENT SETNAME`, sent with the
    /// first words on it): the shared one and each that replaces it, those for blocking
    /// commands and the one beside a suspect connection, on the server Sentinel names
    /// too. `CLIENT LIST`, `CLIENT KILL` and the server's monitoring then say which
    /// application a connection belongs to (which service holds 5,000 connections?),
    /// where it would otherwise show only an address and port.
    ///
    /// Not named: a cluster's node connections (redis-rs's cluster client asks for each
    /// with settings of its own, which carry no name) and
    /// [`Subscriber`](crate::pubsub::Subscriber)s'. A server that refuses the name (an ACL
    /// user that may not run `CLIENT`) leaves the connection unnamed, and it serves as
    /// usual. A name Redis would refuse (empty, or with a space, a newline or a character
    /// outside printable ASCII) is a [config](Error::is_config) error here.
    ///
    /// ```
    /// use tower_redis_resilience::Connector;
    ///
    /// let url = "redis://127.0.0.1:6379";
    /// let connector = Connector::from_url(url)?.client_name("checkout-api")?;
    /// // Redis takes no spaces in a name.
    /// assert!(Connector::from_url(url)?.client_name("checkout api").is_err());
    /// # let _ = connector; Ok::<(), tower_redis_resilience::Error>(())
    /// ```
    pub fn client_name(mut self, name: &str) -> Result<Self, Error> {
        // Redis's own rule: printable ASCII but the space.
        if name.is_empty() || !name.bytes().all(|byte| (b'!'..=b'~').contains(&byte)) {
            return Err(Error::config(format!(
                "client name {name:?}: Redis takes only printable ASCII characters, and \
                 no spaces"
            )));
        }
        self.client_name = Some(name.into());
        Ok(self)
    }

    /// The configured connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The connection details. For a connector made by [`Connector::sentinel`], those of
    /// the master as given there: its address is not the master's, which Sentinel says.
    pub fn connection_info(&self) -> &ConnectionInfo {
        self.client.get_connection_info()
    }

    /// Where this connector connects, safe to log: `127.0.0.1:6379/0`, no credentials.
    pub fn address(&self) -> &str {
        &self.display
    }

    /// Opens a connection and returns the leaf service over it. A connector that asks
    /// Sentinel asks it first, and checks that the server it names is a master.
    ///
    /// Errors: [unavailable](Error::is_unavailable) when Redis cannot be reached in time
    /// (refused, timed out, `LOADING`, no Sentinel answered), [config](Error::is_config)
    /// when it rejects the handshake (`WRONGPASS`, a database index out of range, TLS
    /// mismatch) or no Sentinel knows the master's name.
    pub async fn connect(&self) -> Result<RedisService, Error> {
        self.connect_for(Use::Shared).await
    }

    async fn connect_for(&self, used: Use) -> Result<RedisService, Error> {
        self.within_connect_timeout(async {
            #[cfg(feature = "cluster")]
            if let Some(cluster) = &self.cluster {
                let display = self.display.clone();
                let timeout = self.connect_timeout;
                return open_cluster(cluster, timeout, &self.own_tls, display, used)
                    .await
                    .map(|service| service.with_max_argument_size(self.max_argument));
            }
            let authenticated = fresh(self.credentials.as_ref(), self.connection_info()).await?;
            let info = &authenticated.info;
            let service = match &self.sentinel {
                None => {
                    // The client is its connection details, which `info` replaces
                    // when it has credentials of its own.
                    let client = self.credentials.is_none().then_some(&self.client);
                    open(info, client, &self.own_tls, self.display.clone()).await?
                }
                Some(sentinel) => {
                    let every = self.sentinel_check_interval;
                    sentinel.connect(info, self.connect_timeout, every).await?
                }
            };
            let service = service.with_max_argument_size(self.max_argument);
            // Its name, and the shared connection's id, so that while it is suspect
            // another connection can ask whether the server holds it up.
            let name = self.client_name.as_deref();
            let service = service.introduce(name, used == Use::Shared).await;
            // Last: a renewal holds a weak handle, and the service is complete.
            authenticated.keep(&service, self.connect_timeout);
            Ok(service)
        })
        .await
    }

    /// Runs a connection attempt within the connect timeout: redis-rs's own may not
    /// cover every step of a handshake, this one does.
    async fn within_connect_timeout<T>(
        &self,
        attempt: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        // Tokio's timers and sockets panic outside a runtime: a clear error instead.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::config(
                "connecting to redis needs a Tokio runtime: none is current",
            ));
        }
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable("connect timed out")),
        }
    }

    /// Opens a Pub/Sub connection (redis-rs's, which it runs), to where this connector
    /// leads now, within the connect timeout. Through Sentinel, with a handle that is
    /// retired when Sentinel names another master.
    pub(crate) async fn open_pubsub(
        &self,
    ) -> Result<(redis::aio::PubSub, Option<Arc<Driver>>), Error> {
        self.within_connect_timeout(async {
            #[cfg(feature = "cluster")]
            if let Some(cluster) = &self.cluster {
                return Ok((cluster.open_pubsub(self.connect_timeout).await?, None));
            }
            // A subscribed connection takes no `AUTH` (in RESP2): credentials that expire
            // are not renewed on it, and one the server closes is subscribed again.
            let info = fresh(self.credentials.as_ref(), self.connection_info())
                .await?
                .info;
            match &self.sentinel {
                None => {
                    let pubsub = redis::Client::open(info.into_owned())
                        .map_err(Error::from_connect)?
                        .get_async_pubsub()
                        .await
                        .map_err(Error::from_connect)?;
                    Ok((pubsub, None))
                }
                Some(sentinel) => {
                    let every = self.sentinel_check_interval;
                    let (pubsub, driver) = sentinel
                        .open_pubsub(&info, self.connect_timeout, every)
                        .await?;
                    Ok((pubsub, Some(driver)))
                }
            }
        })
        .await
    }

    /// The master's name, for a connector that asks Sentinel where it is.
    pub(crate) fn sentinel_master_name(&self) -> Option<&str> {
        self.sentinel.as_deref().map(Sentinels::master_name)
    }
}

/// `client` with its TCP settings changed.
fn with_tcp(client: redis::Client, change: impl Fn(TcpSettings) -> TcpSettings) -> redis::Client {
    let info = info_with_tcp(client.get_connection_info().clone(), change);
    // A client is its connection details: opening them again cannot fail.
    redis::Client::open(info).unwrap_or(client)
}

/// `info` with its TCP settings changed.
fn info_with_tcp(
    info: ConnectionInfo,
    change: impl Fn(TcpSettings) -> TcpSettings,
) -> ConnectionInfo {
    let settings = change(info.tcp_settings().clone());
    info.set_tcp_settings(settings)
}

/// What this crate sets unless told otherwise: `TCP_NODELAY`, and keepalive after
/// [`DEFAULT_TCP_KEEPALIVE`] unless the settings have a keepalive of their own (a user
/// timeout of their own is kept).
fn tcp_defaults(settings: TcpSettings) -> TcpSettings {
    let settings = settings.set_nodelay(true);
    if settings.keepalive().is_some() {
        return settings;
    }
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    if settings.user_timeout().is_some() {
        return settings.set_keepalive(keepalive_after(DEFAULT_TCP_KEEPALIVE).0);
    }
    with_keepalive(settings, DEFAULT_TCP_KEEPALIVE)
}

/// `settings` with keepalive probes after `idle` quiet and, where the OS has it,
/// `TCP_USER_TIMEOUT` at the probes' total time: keepalive does not probe a connection
/// with data unacknowledged, which TCP would otherwise retransmit for many minutes.
fn with_keepalive(settings: TcpSettings, idle: Duration) -> TcpSettings {
    let (keepalive, total) = keepalive_after(idle);
    let settings = settings.set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(total);
    #[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
    let _ = total;
    settings
}

/// Probes after `idle` quiet, then every third of it (at least a second), 3 at most;
/// and how long from the last packet until the third goes unanswered.
fn keepalive_after(idle: Duration) -> (TcpKeepalive, Duration) {
    let interval = (idle / 3).max(Duration::from_secs(1));
    let keepalive = TcpKeepalive::new().with_time(idle);
    // Where the OS lets both be set; elsewhere its own interval and count apply.
    #[cfg(any(
        target_os = "android",
        target_os = "freebsd",
        target_os = "ios",
        target_os = "linux",
        target_os = "macos",
        target_os = "netbsd"
    ))]
    let keepalive = keepalive.with_interval(interval).with_retries(3);
    (keepalive, idle.saturating_add(interval.saturating_mul(3)))
}

/// `settings` without keepalive or a user timeout: rebuilt from `TCP_NODELAY` (a linger
/// time cannot be read back).
fn without_keepalive(settings: &TcpSettings) -> TcpSettings {
    TcpSettings::default().set_nodelay(settings.nodelay())
}

/// Parses a list of addresses; a malformed one is a config error naming `what` it was.
fn addresses<T: IntoConnectionInfo>(
    nodes: impl IntoIterator<Item = T>,
    what: &str,
) -> Result<Vec<ConnectionInfo>, Error> {
    nodes
        .into_iter()
        .map(|node| {
            node.into_connection_info()
                .map_err(|err| Error::config(format!("invalid {what} address: {err}")))
        })
        .collect()
}

/// Opens a connection to `info` and returns the leaf service over it. `client`, when
/// given, is the one `info` came from (it may carry TLS certificates).
///
/// Opens the socket and runs the connection's task itself where it can (TCP with the
/// socket options it can read back, TLS it can set up as redis-rs would, a Unix socket),
/// so the leaf knows when that task has ended: a request made after that was certainly
/// not sent. Otherwise (`SO_LINGER`, a `Client` with redis-rs's own TLS certificates,
/// `#insecure`) redis-rs opens it and runs the task.
pub(crate) async fn open(
    info: &ConnectionInfo,
    client: Option<&redis::Client>,
    own_tls: &OwnTls,
    display: Arc<str>,
) -> Result<RedisService, Error> {
    // No response timeout: deadlines belong to the Timeout layer, and a redis-rs timeout
    // would fire under it with a different error. The caller bounds the connect.
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(None)
        .set_response_timeout(None);
    let (connection, driver) = open_multiplexed(info, client, own_tls, config).await?;
    Ok(RedisService::from_parts(
        Conn::Single(connection),
        driver,
        info.redis_settings().db(),
        display,
    ))
}

#[cfg(feature = "cluster")]
impl ClusterNodes {
    /// A Pub/Sub connection to one node: the nodes are tried in turn, each for at most a
    /// quarter of the connect timeout (as a cluster connect waits for each), starting one
    /// node further on than the attempt before.
    async fn open_pubsub(&self, connect_timeout: Duration) -> Result<redis::aio::PubSub, Error> {
        use std::sync::atomic::Ordering;

        let first = self.next_pubsub_node.fetch_add(1, Ordering::Relaxed);
        let mut failure: Option<Error> = None;
        for k in 0..self.nodes.len() {
            let node = &self.nodes[first.wrapping_add(k) % self.nodes.len()];
            let attempt = async {
                let node = fresh(self.credentials.as_ref(), node).await?.info;
                redis::Client::open(node.into_owned())
                    .map_err(Error::from_connect)?
                    .get_async_pubsub()
                    .await
                    .map_err(Error::from_connect)
            };
            let error = match tokio::time::timeout(node_timeout(connect_timeout), attempt).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(error)) => error,
                Err(_) => {
                    Error::unavailable_because(format!("connect to {} timed out", describe(node)))
                }
            };
            tracing::debug!(node = %describe(node), %error, "redis subscriber could not connect to a cluster node; trying the next");
            // Rejected settings or credentials are what the caller must hear about, even
            // if another node was merely down.
            if !failure.as_ref().is_some_and(Error::is_config) {
                failure = Some(error);
            }
        }
        Err(failure.unwrap_or_else(|| Error::config("a cluster connector needs at least one node")))
    }
}

/// What a connection is opened for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Shared by every call but blocking ones.
    Shared,
    /// A blocking command's own: it may wait for its reply as long as the command says.
    Blocking,
}

/// Connects to a cluster: to a node of `nodes` that answers, and through it to every
/// node that serves slots.
#[cfg(feature = "cluster")]
async fn open_cluster(
    cluster: &ClusterNodes,
    connect_timeout: Duration,
    own_tls: &OwnTls,
    display: Arc<str>,
    used: Use,
) -> Result<RedisService, Error> {
    let builder = cluster_builder(cluster, connect_timeout);
    let builder = match used {
        Use::Shared => with_node_response_timeout(builder, connect_timeout),
        Use::Blocking => builder,
    };
    let client = builder.build().map_err(Error::from_connect)?;
    let connection = match client
        .get_async_generic_connection::<crate::service::NodeConnection>()
        .await
    {
        Ok(connection) => connection,
        Err(err) => return Err(diagnose(cluster, connect_timeout, err).await),
    };
    let template = cluster
        .nodes
        .first()
        .cloned()
        .ok_or_else(|| Error::config("a cluster connector needs at least one node"))?;
    let replicas = cluster.replicas(connect_timeout, &template, own_tls);
    let unlisted = crate::service::Unlisted::new(
        template,
        cluster.credentials.clone(),
        own_tls.clone(),
        connect_timeout,
    );
    // The connector's nodes: where the cluster's view is asked past redis-rs's client
    // until one is read.
    let seeds = cluster
        .nodes
        .iter()
        .filter_map(|node| match node.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                Some((host.clone(), *port))
            }
            _ => None,
        })
        .collect();
    let topology =
        crate::service::Topology::new(connection.clone(), connect_timeout, unlisted.clone(), seeds);
    Ok(RedisService::from_parts(
        Conn::Cluster {
            topology,
            connection,
            unlisted,
            replicas,
        },
        // redis-rs's cluster client runs its task on this runtime: ended with it.
        Some(Driver::beside_runtime()),
        0,
        display,
    ))
}

/// How long one node of a cluster is given to accept a connection (and answer its
/// handshake): a quarter of the connect timeout, so that one node that does not (a
/// stalled process, a host gone) leaves time to reach the others within it. redis-rs's
/// cluster client leaves such a node out of its connections; this crate takes it for
/// unreachable.
#[cfg(feature = "cluster")]
pub(crate) fn node_timeout(connect_timeout: Duration) -> Duration {
    connect_timeout / 4
}

/// How this crate has redis-rs's cluster client connect to `cluster`.
#[cfg(feature = "cluster")]
fn cluster_builder(
    cluster: &ClusterNodes,
    connect_timeout: Duration,
) -> redis::cluster::ClusterClientBuilder {
    // No resends (an INCR may have run), no response timeout (the Timeout layer's), and
    // a node that does not answer within `node_timeout` is left out.
    let builder = redis::cluster::ClusterClient::builder(cluster.nodes.to_vec())
        .retries(0)
        .connection_timeout(node_timeout(connect_timeout));
    // redis-rs's cluster client takes TCP settings apart from the nodes' addresses.
    let builder = match cluster.nodes.first() {
        Some(first) => builder.tcp_settings(first.tcp_settings().clone()),
        None => builder,
    };
    #[cfg(feature = "tls")]
    let builder = match &cluster.certificates {
        Some(certificates) => builder.certs(certificates.clone()),
        None => builder,
    };
    match &cluster.credentials {
        Some(provider) => {
            let username = cluster
                .nodes
                .first()
                .and_then(|node| node.redis_settings().username());
            builder.set_credentials_provider(crate::credentials::ForCluster::new(
                provider.clone(),
                username,
            ))
        }
        None => builder,
    }
}

/// Has redis-rs's cluster client give up on a node's reply to its own commands after the
/// connect timeout (an I/O error for that command; see `NodeConnection`, which keeps the
/// application's requests free of a timer each). Without it, a stalled node held up every
/// request to every node whenever the client read its map of the slots again (after a
/// `MOVED`, say): it asks the nodes it knows one at a time, the stalled one perhaps
/// first, and every request waits for it (measured: a master paused, then a slot moved
/// between two others; not one read of the other masters' keys served until the paused
/// one resumed). No overall limit on top: the Timeout layer sets the call's deadline.
#[cfg(feature = "cluster")]
fn with_node_response_timeout(
    builder: redis::cluster::ClusterClientBuilder,
    connect_timeout: Duration,
) -> redis::cluster::ClusterClientBuilder {
    builder
        .response_timeout(connect_timeout)
        .overall_response_timeout(None)
}

/// The error of a cluster connect that failed. redis-rs's cluster client reports a
/// connect that failed on every node as one I/O error, the nodes' own errors flattened
/// into its text, so a rejected password or an untrusted certificate would read as
/// "unavailable" and be retried as an outage. A connect to one node alone tells what it
/// was, classified as every connect is: the nodes are asked in turn, within a quarter of
/// the connect timeout in all (the cluster connect took at most another quarter), until
/// one answers with a [config](Error::is_config) error; if none does, the cluster's
/// error stands.
#[cfg(feature = "cluster")]
async fn diagnose(
    cluster: &ClusterNodes,
    connect_timeout: Duration,
    err: redis::RedisError,
) -> Error {
    let error = Error::from_connect(err);
    if !error.is_unavailable() {
        return error;
    }
    let ask = async {
        for node in &cluster.nodes {
            let alone = async {
                let node = fresh(cluster.credentials.as_ref(), node).await?.info;
                open(&node, None, &OwnTls::default(), describe(&node).into()).await
            }
            .await;
            if let Err(found) = alone
                && found.is_config()
            {
                return Some(found);
            }
        }
        None
    };
    match tokio::time::timeout(node_timeout(connect_timeout), ask).await {
        Ok(Some(found)) => found,
        _ => error,
    }
}

/// A cluster node's connection, for redis-rs's cluster client, with the `config` it
/// gives (its credentials provider included): run by this crate where it can be, so that
/// a request made after the node closed it is known not to have been sent. Not bounded
/// in time: the caller bounds it.
#[cfg(feature = "cluster")]
pub(crate) async fn open_node(
    info: &ConnectionInfo,
    config: AsyncConnectionConfig,
) -> Result<(MultiplexedConnection, Option<Arc<Driver>>), Error> {
    // TLS with certificates of the connector's own goes through redis-rs's TLS, which
    // the cluster client is given them for.
    open_multiplexed(info, None, &OwnTls::default(), config).await
}

/// A connection to `info` with `config`, run by this crate ([`Driver::spawn`]) where it
/// can open the stream as redis-rs would, else opened and run by redis-rs.
async fn open_multiplexed(
    info: &ConnectionInfo,
    client: Option<&redis::Client>,
    own_tls: &OwnTls,
    config: AsyncConnectionConfig,
) -> Result<(MultiplexedConnection, Option<Arc<Driver>>), Error> {
    let io = |err: std::io::Error| Error::from_connect(err.into());
    #[cfg(not(feature = "tls"))]
    let OwnTls {} = own_tls;
    let settings = info.tcp_settings();
    let stream = match info.addr() {
        ConnectionAddr::Tcp(host, port) if readable(settings) => {
            boxed(connect_tcp(host, *port, settings).await.map_err(io)?)
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => {
            boxed(tokio::net::UnixStream::connect(path).await.map_err(io)?)
        }
        #[cfg(feature = "tls")]
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params,
        } if readable(settings) => {
            let Some(tls) = own_tls.for_host(host, tls_params.is_some()) else {
                return run_by_redis(info, client, &config).await;
            };
            let tcp = connect_tcp(host, *port, settings).await.map_err(io)?;
            match tls.handshake(tcp).await {
                Ok(stream) => boxed(stream),
                // A certificate this crate's trust rejects: redis-rs may trust more roots
                // (webpki's, with its feature on). It decides, and says why if not.
                Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                    return run_by_redis(info, client, &config).await;
                }
                Err(err) => return Err(io(err)),
            }
        }
        _ => return run_by_redis(info, client, &config).await,
    };
    let (connection, driver) =
        MultiplexedConnection::new_with_config(info.redis_settings(), stream, config)
            .await
            .map_err(Error::from_connect)?;
    Ok((connection, Some(Driver::spawn(driver))))
}

/// A connection redis-rs opens and runs (TLS this crate cannot set up as redis-rs would,
/// `SO_LINGER`).
async fn run_by_redis(
    info: &ConnectionInfo,
    client: Option<&redis::Client>,
    config: &AsyncConnectionConfig,
) -> Result<(MultiplexedConnection, Option<Arc<Driver>>), Error> {
    let opened;
    let client = match client {
        Some(client) => client,
        None => {
            opened = redis::Client::open(info.clone()).map_err(Error::from_connect)?;
            &opened
        }
    };
    let connection = client
        .get_multiplexed_async_connection_with_config(config)
        .await
        .map_err(Error::from_connect)?;
    // A handle without the task, so Sentinel can still retire it when it names another
    // master.
    Ok((connection, Some(Driver::without_task())))
}

/// The stream as redis-rs's own connect hands it over, so the connection's code is the
/// one instance redis-rs uses for every kind of stream (TLS included).
fn boxed<S>(stream: S) -> Pin<Box<dyn AsyncStream + Send + Sync>>
where
    S: AsyncStream + Send + Sync + 'static,
{
    Box::pin(stream)
}

/// Whether this crate can apply `settings` as redis-rs would: `TCP_NODELAY`, keepalive
/// and the user timeout can be read back, linger cannot, so a connection that sets
/// linger is left to redis-rs. (Its `Debug` shows every option: rebuilt from what can be
/// read, the settings must look the same.)
fn readable(settings: &TcpSettings) -> bool {
    let mut rebuilt = TcpSettings::default().set_nodelay(settings.nodelay());
    if let Some(keepalive) = settings.keepalive() {
        rebuilt = rebuilt.set_keepalive(keepalive.clone());
    }
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    if let Some(timeout) = settings.user_timeout() {
        rebuilt = rebuilt.set_user_timeout(timeout);
    }
    format!("{rebuilt:?}") == format!("{settings:?}")
}

/// A TCP connection with the socket options redis-rs would set ([`readable`] ones).
async fn connect_tcp(
    host: &str,
    port: u16,
    settings: &TcpSettings,
) -> std::io::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream.set_nodelay(settings.nodelay())?;
    let socket = redis::io::tcp::socket2::SockRef::from(&stream);
    if let Some(keepalive) = settings.keepalive() {
        socket.set_tcp_keepalive(keepalive)?;
    }
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    socket.set_tcp_user_timeout(settings.user_timeout())?;
    Ok(stream)
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("address", &self.display)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_argument_size", &self.max_argument)
            .field("credentials_provider", &self.credentials.is_some())
            .field("client_name", &self.client_name)
            .finish()
    }
}

/// `user@host:port/db` (`[::1]:6379/0` for an IPv6 address, the path for a Unix
/// socket); never a password.
pub(crate) fn describe(info: &ConnectionInfo) -> String {
    let db = info.redis_settings().db();
    let user = match info.redis_settings().username() {
        Some(user) => format!("{user}@"),
        None => String::new(),
    };
    let address = match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. }
            if host.contains(':') =>
        {
            format!("[{host}]:{port}")
        }
        address => address.to_string(),
    };
    format!("{user}{address}/{db}")
}

/// Hides the password of a URL (`redis://user:***@host`) and any `pass=` or `password=`
/// query value (a Unix socket's URL gives its password as `?pass=`), even when the rest
/// of the URL does not parse. It errs towards hiding: everything up to the last `@` is
/// taken for user information, as a password may hold `@` or `/`.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    // The user information first: a password may hold `?`, `&` or `=`, which the query
    // step would take for its own.
    let mut hidden = String::with_capacity(url.len());
    hidden.push_str(scheme);
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    hidden.push_str(user);
                    hidden.push_str(":***");
                }
                None => hidden.push_str(userinfo),
            }
            hidden.push('@');
            hidden.push_str(host);
        }
        None => hidden.push_str(rest),
    }
    let Some((before, query)) = hidden.split_once('?') else {
        return hidden;
    };
    let pairs = query.split('&').map(|pair| match pair.split_once('=') {
        Some((key, _))
            if key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password") =>
        {
            format!("{key}=***")
        }
        _ => pair.to_owned(),
    });
    format!("{before}?{}", pairs.collect::<Vec<_>>().join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_shown_without_passwords_and_ipv6_in_brackets() {
        let shown = |url: &str| describe(&url.into_connection_info().unwrap());
        assert_eq!(shown("redis://127.0.0.1:6379/2"), "127.0.0.1:6379/2");
        assert_eq!(shown("redis://[::1]:6380"), "[::1]:6380/0");
        assert_eq!(shown("redis://app:secret@[::1]:6380/1"), "app@[::1]:6380/1");
        assert_eq!(shown("redis://:secret@localhost"), "localhost:6379/0");
    }

    #[test]
    fn socket_options_this_crate_can_apply_are_told_from_those_it_cannot() {
        let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(30));
        assert!(readable(&TcpSettings::default()));
        assert!(readable(&TcpSettings::default().set_nodelay(true)));
        assert!(readable(&TcpSettings::default().set_keepalive(keepalive)));
        #[cfg(target_os = "linux")]
        assert!(readable(
            &TcpSettings::default().set_user_timeout(Duration::from_secs(5))
        ));
        // Linger has no getter: redis-rs applies it.
        assert!(!readable(
            &TcpSettings::default().set_linger_time(Duration::ZERO)
        ));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn keepalive_and_its_user_timeout_are_set_unless_the_settings_have_their_own() {
        let secs = Duration::from_secs;
        let settings =
            |connector: &Connector| format!("{:?}", connector.connection_info().tcp_settings());
        let probes = |idle, interval| {
            TcpKeepalive::new()
                .with_time(secs(idle))
                .with_interval(secs(interval))
                .with_retries(3)
        };
        let expected = |keepalive: Option<TcpKeepalive>, user_timeout: Option<u64>| {
            let mut expected = TcpSettings::default().set_nodelay(true);
            if let Some(keepalive) = keepalive {
                expected = expected.set_keepalive(keepalive);
            }
            if let Some(timeout) = user_timeout {
                expected = expected.set_user_timeout(secs(timeout));
            }
            format!("{expected:?}")
        };
        let url = "redis://127.0.0.1:6379";
        let default = Connector::from_url(url).unwrap();
        assert_eq!(settings(&default), expected(Some(probes(30, 10)), Some(60)));
        let quick = default.tcp_keepalive(Some(secs(9)));
        assert_eq!(settings(&quick), expected(Some(probes(9, 3)), Some(18)));
        assert_eq!(settings(&quick.tcp_keepalive(None)), expected(None, None));

        // The settings' own keepalive is kept as it is, and so is their user timeout.
        let info = |tcp: TcpSettings| url.into_connection_info().unwrap().set_tcp_settings(tcp);
        let own = TcpKeepalive::new().with_time(secs(100));
        let connector =
            Connector::from_connection_info(info(TcpSettings::default().set_keepalive(own)))
                .unwrap();
        let own = TcpKeepalive::new().with_time(secs(100));
        assert_eq!(settings(&connector), expected(Some(own), None));
        let with_timeout = TcpSettings::default().set_user_timeout(secs(7));
        let connector = Connector::from_connection_info(info(with_timeout)).unwrap();
        assert_eq!(
            settings(&connector),
            expected(Some(probes(30, 10)), Some(7))
        );
    }

    #[cfg(feature = "tls")]
    fn has_certificates(info: &ConnectionInfo) -> bool {
        matches!(
            info.addr(),
            ConnectionAddr::TcpTls {
                tls_params: Some(_),
                ..
            }
        )
    }

    #[cfg(feature = "tls")]
    #[test]
    fn certificates_reach_sentinels_and_the_master_over_tls_and_leave_plain_ones_alone() {
        let certificates = || redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(crate::tls::tests::CERT.as_bytes().to_vec()),
        };
        let connector = Connector::sentinel(
            ["rediss://127.0.0.1:26379", "redis://127.0.0.1:26380"],
            "mymaster",
            "rediss://:secret@mymaster/0",
        )
        .unwrap()
        .tls_certificates(certificates())
        .unwrap();
        assert!(has_certificates(connector.connection_info()), "the master");
        let sentinels: Vec<bool> = connector
            .sentinel
            .as_ref()
            .unwrap()
            .infos()
            .map(has_certificates)
            .collect();
        assert_eq!(sentinels, [true, false]);
        assert_eq!(connector.sentinel_master_name(), Some("mymaster"));

        let plain = Connector::sentinel(["redis://127.0.0.1:26379"], "m", "redis://m/0")
            .unwrap()
            .tls_certificates(certificates())
            .map(|_| ())
            .unwrap_err();
        assert!(plain.is_config(), "{plain}");
    }

    #[test]
    fn redact_url_hides_passwords_and_keeps_the_rest() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1/"),
            "redis://:***@127.0.0.1/"
        );
        assert_eq!(
            redact_url("rediss://app:p@ss/w0rd@::1:6380"),
            "rediss://app:***@::1:6380"
        );
        assert_eq!(
            redact_url("redis://alice@127.0.0.1"),
            "redis://alice@127.0.0.1"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1/?protocol=resp3&password=hunter2"),
            "redis://127.0.0.1/?protocol=resp3&password=***"
        );
        assert_eq!(redact_url("no scheme:hunter2@x"), "no scheme:***@x");
        // A Unix socket's URL gives its password in the query.
        assert_eq!(
            redact_url("redis+unix:///tmp/redis.sock?db=x&pass=hunter2"),
            "redis+unix:///tmp/redis.sock?db=x&pass=***"
        );
        assert_eq!(
            redact_url("unix:///tmp/redis.sock?PASS=hunter2&db=1"),
            "unix:///tmp/redis.sock?PASS=***&db=1"
        );
        // An `@` in the query hides no password.
        assert_eq!(
            redact_url("redis://127.0.0.1/?x=a@b&password=hunter2"),
            "redis://127.0.0.1/?x=a@b&password=***"
        );
        assert_eq!(
            redact_url("redis://:hunter2@127.0.0.1/?x=a@b"),
            "redis://:***@b"
        );
        // Nor does a password that looks like a query.
        assert_eq!(
            redact_url("redis://:a?pass=b@127.0.0.1/"),
            "redis://:***@127.0.0.1/"
        );
    }

    #[test]
    fn malformed_url_is_a_config_error_without_the_password() {
        let err = Connector::from_url("redis://:hunter2@127.0.0.1:notaport").unwrap_err();
        assert!(err.is_config(), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://:***@127.0.0.1:notaport"), "{shown}");
        let err =
            Connector::from_url("redis+unix:///tmp/redis.sock?db=x&pass=hunter2").unwrap_err();
        assert!(err.is_config(), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Invalid database number"), "{shown}");
    }

    #[test]
    fn a_sentinel_connector_shows_the_master_name_and_the_sentinels_not_the_credentials() {
        let connector = Connector::sentinel(
            [
                "redis://:sentinel-secret@127.0.0.1:26379",
                "redis://127.0.0.1:26380",
            ],
            "cache",
            "redis://app:hunter2@cache/2",
        )
        .unwrap();
        let shown = format!("{connector:?}");
        assert!(
            shown.contains("app@cache/2 via Sentinel 127.0.0.1:26379/0, 127.0.0.1:26380/0"),
            "{shown}"
        );
        assert!(
            !shown.contains("secret") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert_eq!(connector.sentinel_master_name(), Some("cache"));
        assert_eq!(connector.connection_info().redis_settings().db(), 2);
    }

    #[test]
    fn debug_shows_the_address_not_the_credentials() {
        let connector = Connector::from_url("redis://bob:hunter2@127.0.0.1:6390/3").unwrap();
        let shown = format!("{connector:?}");
        assert!(shown.contains("bob@127.0.0.1:6390/3"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
