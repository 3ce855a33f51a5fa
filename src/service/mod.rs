//! The leaf service: one redis-rs multiplexed connection as a `tower::Service`.

mod future;
#[cfg(feature = "cluster")]
mod node;
#[cfg(feature = "cluster")]
mod redirect;
#[cfg(feature = "cluster")]
mod replicas;
mod slots;
#[cfg(feature = "cluster")]
mod topology;

pub use future::ResponseFuture;
#[cfg(feature = "cluster")]
pub(crate) use node::NodeConnection;
#[cfg(feature = "cluster")]
pub(crate) use redirect::Unlisted;
#[cfg(feature = "cluster")]
pub(crate) use replicas::ReplicaReads;
#[cfg(feature = "cluster")]
pub(crate) use topology::Topology;

/// redis-rs's cluster client, over this crate's connections to the nodes.
#[cfg(feature = "cluster")]
pub(crate) type ClusterConnection = redis::cluster_async::ClusterConnection<node::NodeConnection>;

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{
            AtomicBool,
            Ordering::{Acquire, Release},
        },
    },
    task::{Context, Poll},
};

use redis::{Pipeline, Value, aio::MultiplexedConnection};
use tower::Service;

use crate::{Connector, DEFAULT_MAX_ARGUMENT_SIZE, Error, Request, request::Body};

/// Redis as a [`tower::Service`]: sends each [`Request`] on one multiplexed connection
/// (redis-rs's [`MultiplexedConnection`]), so any number of clones and in-flight calls
/// share one socket.
///
/// It has no deadline of its own (the Timeout layer owns deadlines) and does not
/// reconnect (the Reconnect layer does): once its connection breaks, every call answers
/// [unavailable](Error::is_unavailable). A call made after the connection was known to
/// have closed (Redis closed it while it sat idle, say) says it did not run
/// ([`may_have_run`](Error::may_have_run) false, so it may be sent again) when this crate
/// runs the connection: plain TCP, Unix sockets and TLS. It does not for the connections
/// it leaves to redis-rs (a `redis::Client` built with its own TLS certificates,
/// `#insecure`, `SO_LINGER`), where such a call may have run as far as its error can
/// tell. Server replies that are errors come back as
/// `Err`, classified: `WRONGTYPE` is a [server](Error::is_server) error, `LOADING` is
/// unavailable. A pipeline answers `Value::Array`; see [`Request`].
///
/// Requests that would change the shared connection for the commands after them
/// ([`CommandInfo::changes_connection`](crate::CommandInfo::changes_connection): `SELECT`,
/// `MULTI`, `WATCH`, `SUBSCRIBE`, `MONITOR`, `AUTH`, `HELLO`, `RESET`, `CLIENT REPLY`,
/// `CLIENT TRACKING`, `CLIENT CACHING`, `QUIT`, alone or in a pipeline) are refused unsent with a
/// [configuration](Error::is_config) error saying what to do instead. Sent, a `MULTI`
/// would make every other caller's `GET` answer `QUEUED`, a `SELECT` would have them read
/// another database until the next reconnect, a `SUBSCRIBE` would have Redis refuse
/// their commands. An atomic pipeline (`redis::pipe().atomic()`) is the way to send a
/// transaction; a database is chosen in the URL. The refusal holds in an
/// [`on_connect`](crate::reconnect::ReconnectConfig::on_connect) hook too: a database,
/// credentials or a protocol go in the URL or the [`Connector`], which applies them to
/// every connection it opens.
///
/// A blocking command (`BLPOP q 5`) holds up every request sent after it on the
/// connection until Redis answers it: Redis serves one connection's commands in order.
/// [`Reconnect`](crate::reconnect::Reconnect) sends such commands on connections of their
/// own ([`dedicated_blocking_connections`](crate::reconnect::ReconnectConfig::dedicated_blocking_connections)).
///
/// A call's future lives in a heap box (redis-rs's request future, ~1.3 KiB). A finished
/// call's box is kept, emptied, for the next call on the same thread: each thread keeps
/// at most 64 (~85 KiB), so calls do not allocate it once a thread has some.
///
/// ```no_run
/// use tower::{Service, ServiceExt};
/// use tower_redis_resilience::{RedisService, Request};
///
/// # async fn run() -> Result<(), tower_redis_resilience::Error> {
/// let mut redis = RedisService::connect("redis://127.0.0.1:6379").await?;
/// let reply = redis
///     .ready()
///     .await?
///     .call(Request::from(redis::cmd("PING").to_owned()))
///     .await?;
/// assert_eq!(reply, redis::Value::SimpleString("PONG".into()));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisService {
    /// One pointer: cloning the service (as retries and reconnects do per call) is one
    /// reference count, and futures that hold a clone stay small.
    inner: Arc<Inner>,
}

struct Inner {
    connection: Conn,
    /// The connection's task, when this crate runs it.
    driver: Option<Arc<Driver>>,
    db: i64,
    address: Arc<str>,
    /// Requests with a larger argument are refused: see
    /// [`Connector::max_argument_size`](crate::Connector::max_argument_size).
    max_argument: usize,
    /// The server's id for the connection (`CLIENT ID`), when it was asked: another
    /// connection can then ask the server what holds it up.
    client_id: Option<u64>,
}

impl RedisService {
    /// Connects to the URL with the default connect timeout. See [`Connector`] for the
    /// other ways to say where Redis is and for the errors.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Connector::from_url(url)?.connect().await
    }

    /// Connects with a `redis::Client` you built (TLS certificates, custom settings).
    pub async fn from_client(client: redis::Client) -> Result<Self, Error> {
        Connector::from_client(client).connect().await
    }

    /// Wraps a connection you opened yourself. Mind that redis-rs gives connections a
    /// 500 ms response timeout by default; [`Connector`] turns it off.
    pub fn from_connection(connection: MultiplexedConnection, db: i64) -> Self {
        // The connection does not say where it goes; `Connector` knows and shows it.
        RedisService::from_parts(
            Conn::Single(connection),
            None,
            db,
            Arc::from("(connection opened by caller)"),
        )
    }

    pub(crate) fn from_parts(
        connection: Conn,
        driver: Option<Arc<Driver>>,
        db: i64,
        address: Arc<str>,
    ) -> Self {
        RedisService {
            inner: Arc::new(Inner {
                connection,
                driver,
                db,
                address,
                max_argument: DEFAULT_MAX_ARGUMENT_SIZE,
                client_id: None,
            }),
        }
    }

    /// The first words on a connection just made, in one round trip: its name
    /// (`CLIENT SETNAME`), if given, and the server's id for it (`CLIENT ID`), if
    /// `learn_id`. A refusal (an ACL user that may not, a renamed command) leaves it
    /// unnamed, or its id unknown.
    pub(crate) async fn introduce(mut self, name: Option<&str>, learn_id: bool) -> Self {
        let mut connection = match &self.inner.connection {
            Conn::Single(connection) => connection.clone(),
            #[cfg(feature = "cluster")]
            Conn::Cluster { .. } => return self,
        };
        let mut words = redis::pipe();
        if let Some(name) = name {
            words.cmd("CLIENT").arg("SETNAME").arg(name);
        }
        if learn_id {
            words.cmd("CLIENT").arg("ID");
        }
        if words.is_empty() {
            return self;
        }
        // Replies one by one, a refusal among them, where `query_async` fails them all.
        let replies = redis::aio::ConnectionLike::req_packed_commands(
            &mut connection,
            &words,
            0,
            words.len(),
        );
        let Ok(replies) = replies.await else {
            // The connection failed: the first call finds out.
            return self;
        };
        if let (Some(name), Some(Value::ServerError(refusal))) = (name, replies.first()) {
            tracing::debug!(
                address = &*self.inner.address,
                name,
                %refusal,
                "redis refused the connection's name; it serves unnamed"
            );
        }
        let id = match replies.last() {
            Some(&Value::Int(id)) if learn_id => u64::try_from(id).ok(),
            _ => None,
        };
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.client_id = id;
        }
        self
    }

    /// The server's id for the connection, if it was asked.
    pub(crate) fn client_id(&self) -> Option<u64> {
        self.inner.client_id
    }

    /// Refuses requests with an argument larger than `bytes` (a service just made).
    pub(crate) fn with_max_argument_size(mut self, bytes: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_argument = bytes;
        }
        self
    }

    /// Where the connection leads, as its connector describes it (no credentials).
    pub(crate) fn address(&self) -> &str {
        &self.inner.address
    }

    /// The connection has closed or was retired: it will take no request again. (`false`
    /// for a connection opened by the caller, whose task this crate does not see.)
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.driver.as_deref().is_some_and(Driver::has_ended)
    }

    /// Resolves once the connection has closed or was retired, holding nothing of it;
    /// `None` when this crate does not run it (a cluster's, one opened by the caller).
    pub(crate) fn closed(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        self.inner.driver.as_deref().map(Driver::ended)
    }

    /// The masters of a cluster that cannot be reached (`host:port`), whose slots'
    /// requests are answered at once, unsent.
    pub(crate) fn unreachable(&self) -> Vec<String> {
        match &self.inner.connection {
            Conn::Single(_) => Vec::new(),
            #[cfg(feature = "cluster")]
            Conn::Cluster { topology, .. } => topology.gone_masters(),
        }
    }

    /// For a cluster's connection, each master's answer to a health check
    /// ([`Topology::health`]); `None` for one server's, or when no node gives the
    /// cluster's view of its nodes.
    #[cfg(feature = "cluster")]
    pub(crate) async fn masters_health(
        &self,
        limit: std::time::Duration,
    ) -> Option<topology::MastersHealth> {
        match &self.inner.connection {
            Conn::Single(_) => None,
            Conn::Cluster { topology, .. } => topology.health(limit).await,
        }
    }

    /// For a cluster's connection, the count of its masters found gone or stalled (see
    /// [`MakeConnection::fences`](crate::MakeConnection::fences)); `None` for one
    /// server's.
    pub(crate) fn fences(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match &self.inner.connection {
            Conn::Single(_) => None,
            #[cfg(feature = "cluster")]
            Conn::Cluster { topology, .. } => Some(topology.fences()),
        }
    }

    /// The connection is a cluster's.
    pub(crate) fn is_cluster(&self) -> bool {
        match self.inner.connection {
            Conn::Single(_) => false,
            #[cfg(feature = "cluster")]
            Conn::Cluster { .. } => true,
        }
    }

    /// The connection's task, when this crate runs it.
    pub(crate) fn driver(&self) -> Option<&Arc<Driver>> {
        self.inner.driver.as_ref()
    }

    /// The database index the connection selected.
    pub fn db(&self) -> i64 {
        self.inner.db
    }

    /// A handle that does not keep the connection open.
    pub(crate) fn downgrade(&self) -> WeakService {
        WeakService(Arc::downgrade(&self.inner))
    }
}

/// A [`RedisService`] that may have gone: for work on its connection that must not keep
/// it open (sending `AUTH` with a new token before the old one expires).
pub(crate) struct WeakService(std::sync::Weak<Inner>);

impl WeakService {
    /// Its one connection, while the service is held and the connection takes requests.
    /// Holding the connection does not keep a task this crate runs going: that ends when
    /// the last service lets it go.
    pub(crate) fn connection(&self) -> Option<MultiplexedConnection> {
        let inner = self.0.upgrade()?;
        if inner.driver.as_deref().is_some_and(Driver::has_ended) {
            return None;
        }
        match &inner.connection {
            Conn::Single(connection) => Some(connection.clone()),
            #[cfg(feature = "cluster")]
            Conn::Cluster { .. } => None,
        }
    }
}

impl Service<Request> for RedisService {
    type Response = Value;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // The multiplexer queues requests itself; there is nothing to wait for here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> ResponseFuture {
        let refusal = if request.info().changes_connection() {
            Some(Refusal::ChangesConnection)
        } else {
            let largest = request.largest_argument();
            (largest > self.inner.max_argument).then_some(Refusal::Oversized {
                bytes: largest,
                limit: self.inner.max_argument,
            })
        };
        ResponseFuture::new(Job {
            connection: self.inner.connection.clone(),
            driver: self.inner.driver.clone(),
            name: request.info().name(),
            refusal,
            body: request.into_body(),
        })
    }
}

/// The task that runs a connection this crate opened. While a service or a call holds it
/// the task runs; when the last one lets go, it is stopped, so the socket closes even
/// under a blocking command nobody waits for any more.
pub(crate) struct Driver {
    /// `None` for a connection redis-rs runs (a subscriber's), which only Sentinel's
    /// retiring can end here.
    task: Option<tokio::task::JoinHandle<()>>,
    /// Set when the connection takes no new request: its task ended (the server closed
    /// it, or it broke), or it was retired (Sentinel named another master: requests
    /// already sent get their replies, new ones are refused as not sent).
    ended: Arc<Ended>,
}

/// That a connection takes no more requests, and the news of it for those who wait.
#[derive(Default)]
struct Ended {
    flag: AtomicBool,
    news: tokio::sync::Notify,
}

impl Ended {
    fn set(&self) {
        self.flag.store(true, Release);
        self.news.notify_waiters();
    }
}

/// Held by the connection's task: however the task ends (the connection closed, the task
/// aborted, or dropped unpolled with its runtime), the connection has ended.
struct EndsWith(Arc<Ended>);

impl Drop for EndsWith {
    fn drop(&mut self) {
        self.0.set();
    }
}

impl Driver {
    /// Runs redis-rs's connection task. Needs a tokio runtime.
    pub(crate) fn spawn(driver: impl Future<Output = ()> + Send + 'static) -> Arc<Driver> {
        let ended = Arc::<Ended>::default();
        let ends_with = EndsWith(ended.clone());
        let task = tokio::spawn(async move {
            let _ends_with = ends_with;
            driver.await;
        });
        Arc::new(Driver {
            task: Some(task),
            ended,
        })
    }

    /// A handle for a connection whose task redis-rs spawns on the current runtime (a
    /// cluster's): a task of ours beside it, which waits for nothing, ends with that
    /// runtime, and the connection is known to have ended with it. Without it, a cluster
    /// connection made on a runtime that shut down (a client shared by `#[tokio::test]`s,
    /// a runtime per job) failed every call on the next runtime, for good, while it
    /// looked connected. Needs a tokio runtime.
    #[cfg(feature = "cluster")]
    pub(crate) fn beside_runtime() -> Arc<Driver> {
        Driver::spawn(std::future::pending())
    }

    /// A handle for a connection whose task redis-rs runs: it can be retired (Sentinel
    /// named another master), and its holder checks [`has_ended`](Self::has_ended).
    pub(crate) fn without_task() -> Arc<Driver> {
        Arc::new(Driver {
            task: None,
            ended: Arc::default(),
        })
    }

    /// The connection takes no more requests: it was retired, or its task has ended, so
    /// nothing sent from now on would reach Redis.
    pub(crate) fn has_ended(&self) -> bool {
        self.ended.flag.load(Acquire)
    }

    /// Resolves once the connection has ended; holds nothing of it meanwhile.
    pub(crate) fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let ended = self.ended.clone();
        async move {
            loop {
                // Told of every `set` from its creation on, polled or not.
                let news = ended.news.notified();
                if ended.flag.load(Acquire) {
                    return;
                }
                news.await;
            }
        }
    }

    /// Takes no new request from now on: each is refused as not sent, which marks the
    /// connection broken, so `Reconnect` opens another.
    pub(crate) fn retire(&self) {
        self.ended.set();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The connection a service sends on: one server's, or a cluster's (redis-rs's cluster
/// client, which keeps a connection to each node and routes by key).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster {
        connection: ClusterConnection,
        /// How it reaches nodes a redirect names that redis-rs's client does not know.
        unlisted: Arc<redirect::Unlisted>,
        /// Where reads the masters cannot serve go, when asked for.
        replicas: Option<Arc<replicas::ReplicaReads>>,
        /// Checks, when requests go unanswered, that redis-rs's map of the slots still
        /// names each master.
        topology: Arc<topology::Topology>,
    },
}

impl Conn {
    async fn command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Single(connection) => connection.send_packed_command(cmd).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster {
                connection,
                unlisted,
                replicas,
                topology,
            } => {
                let gone = topology.gone(|| replicas::key_of(cmd).map(replicas::slot_of));
                let reply = if let Some(gone) = gone {
                    // Answered without waiting: takes its unit of the task's budget (see
                    // `sync::proceed`), so a caller that tries again at once yields.
                    tokio::task::coop::consume_budget().await;
                    Err(gone)
                } else {
                    let request = topology::Request::Command(cmd);
                    let unanswered = topology::Unanswered::new(topology, request);
                    let main = redis::aio::ConnectionLike::req_packed_command(connection, cmd);
                    let reply = match replicas {
                        Some(replicas) if crate::CommandInfo::of_cmd(cmd).is_read_only() => {
                            Box::pin(replicas.hedged(cmd, main)).await
                        }
                        _ => main.await,
                    };
                    unanswered.answered();
                    match reply {
                        // A `MOVED` is Retry's to resend, once redis-rs has refreshed its
                        // map; its node is tried, in case redis-rs cannot reach it.
                        Err(err) => match redirect::redirected(&err) {
                            // Boxed: the rare path does not make every call's future larger.
                            Some(to) if to.kind == redirect::Kind::Ask => {
                                Box::pin(redirect::command(connection, unlisted, to, cmd)).await
                            }
                            Some(to) => {
                                topology.moved(&to);
                                Err(err)
                            }
                            None => Err(err),
                        },
                        reply => reply,
                    }
                };
                match (reply, replicas) {
                    (Err(err), Some(replicas)) => {
                        Box::pin(replicas.command(cmd, &err)).await.ok_or(err)
                    }
                    (reply, _) => reply,
                }
            }
        }
    }

    pub(super) async fn commands(
        &mut self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Single(connection) => {
                connection
                    .send_packed_commands(pipeline, offset, count)
                    .await
            }
            #[cfg(feature = "cluster")]
            Conn::Cluster {
                connection,
                unlisted,
                replicas,
                topology,
            } => {
                if let Some(gone) = topology.gone(|| replicas::slot_of_pipeline(pipeline)) {
                    tokio::task::coop::consume_budget().await;
                    return match replicas {
                        Some(replicas) if !pipeline.is_transaction() => {
                            let reads = replicas.commands(pipeline, offset, count, &gone);
                            Box::pin(reads).await.ok_or(gone)
                        }
                        _ => Err(gone),
                    };
                }
                let request = topology::Request::Pipeline(pipeline);
                let unanswered = topology::Unanswered::new(topology, request);
                let replies = redis::aio::ConnectionLike::req_packed_commands(
                    connection, pipeline, offset, count,
                )
                .await;
                unanswered.answered();
                let replies = match replies {
                    Err(err) => match redirect::redirected(&err).inspect(|to| {
                        if to.kind == redirect::Kind::Moved {
                            topology.moved(to);
                        }
                    }) {
                        // A transaction that met a redirect was discarded: nothing ran,
                        // and it may go to the node named. A plain pipeline's other
                        // commands may have run where it went: what ran cannot be told.
                        Some(to) if pipeline.is_transaction() => {
                            let transaction =
                                redirect::transaction(connection, unlisted, to, pipeline);
                            Box::pin(transaction).await
                        }
                        Some(to) if to.kind == redirect::Kind::Ask && pipeline.len() == 1 => {
                            let lone = redirect::lone_command(connection, unlisted, to, pipeline);
                            Box::pin(lone).await
                        }
                        _ => Err(err),
                    },
                    replies => replies,
                };
                match (replies, replicas) {
                    (Err(err), Some(replicas)) if !pipeline.is_transaction() => {
                        let reads = replicas.commands(pipeline, offset, count, &err);
                        Box::pin(reads).await.ok_or(err)
                    }
                    (replies, _) => replies,
                }
            }
        }
    }

    /// The error of a request sent on this connection. A cluster's node that fails is
    /// that node's problem: the cluster client reconnects to it by itself, and the other
    /// nodes serve on, so such an error does not make `Reconnect` replace the whole
    /// cluster connection.
    fn error(&self, err: redis::RedisError) -> Error {
        match self {
            Conn::Single(_) => Error::from_request(err),
            #[cfg(feature = "cluster")]
            Conn::Cluster { .. } => Error::from_request(err).of_one_node(),
        }
    }
}

/// What one call sends, on which connection.
struct Job {
    connection: Conn,
    /// Held while the call waits: the connection's task must run until the reply comes.
    driver: Option<Arc<Driver>>,
    body: Body,
    name: &'static str,
    /// Why it is refused unsent, if it is.
    refusal: Option<Refusal>,
}

/// Why a request is refused unsent: it would break the connection every caller shares.
#[derive(Clone, Copy)]
enum Refusal {
    /// See [`CommandInfo::changes_connection`](crate::CommandInfo::changes_connection).
    ChangesConnection,
    /// An argument larger than Redis accepts: Redis would close the connection.
    Oversized { bytes: usize, limit: usize },
}

/// One call's work: a plain function, so its future has one type and a finished call's
/// box can hold the next call's future (see `slots`).
async fn send(job: Job) -> Result<Value, Error> {
    let Job {
        mut connection,
        driver,
        body,
        name,
        refusal,
    } = job;
    if let Some(refusal) = refusal {
        // An answer given without waiting takes its unit of the task's budget (see
        // `sync::proceed`), as the calls that go out do in redis-rs's channels.
        tokio::task::coop::consume_budget().await;
        let batch = matches!(body, Body::Pipeline(_));
        let why = match refusal {
            Refusal::ChangesConnection => changes_connection(name, batch),
            Refusal::Oversized { bytes, limit } => oversized(bytes, limit),
        };
        return Err(Error::refused(why).with_command(name));
    }
    if driver.as_deref().is_some_and(Driver::has_ended) {
        tokio::task::coop::consume_budget().await;
        return Err(Error::not_sent().with_command(name));
    }
    match body {
        Body::Cmd(cmd) => match connection.command(&cmd).await {
            Ok(Value::ServerError(err)) => Err(Error::from_server_error(err)),
            Ok(value) => Ok(value),
            Err(err) => Err(connection.error(err)),
        },
        Body::Pipeline(pipeline) => send_pipeline(&mut connection, &pipeline).await,
    }
    .map_err(|err| err.with_command(name))
}

async fn send_pipeline(connection: &mut Conn, pipeline: &Pipeline) -> Result<Value, Error> {
    let atomic = pipeline.is_transaction();
    if pipeline.is_empty() && !atomic {
        return Ok(Value::Array(Vec::new()));
    }
    // The same framing as Pipeline::query_async: skip MULTI and the QUEUED replies of an
    // atomic pipeline and keep EXEC's reply; keep every reply of a plain one.
    let (offset, count) = if atomic {
        (pipeline.len() + 1, 1)
    } else {
        (0, pipeline.len())
    };
    let mut replies = match connection.commands(pipeline, offset, count).await {
        Ok(replies) => replies,
        // A cluster node redirected a command of a plain pipeline with `ASK` (its slot is
        // migrating): the commands whose keys the node still held ran there.
        Err(err) => {
            let error = connection.error(err);
            let partly = !atomic && pipeline.len() > 1 && error.server_code() == Some("ASK");
            return Err(if partly { error.ran_partially() } else { error });
        }
    };
    // A plain pipeline keeps each command's server error in its slot, like redis-rs, unless
    // Redis could not serve at all: then the pipeline failed as a whole. Commands before
    // that slot may have run.
    if let Some(Value::ServerError(err)) = replies.iter().find(|v| Error::is_unavailable_reply(v)) {
        let err = Error::from_server_error(err.clone());
        return Err(if replies.iter().all(Error::is_unavailable_reply) {
            err
        } else {
            err.ran_partially()
        });
    }
    if atomic {
        match replies.pop() {
            Some(Value::ServerError(err)) => Err(Error::from_server_error(err)),
            Some(exec) if replies.is_empty() => Ok(exec),
            _ => Err(Error::from_request(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "transaction answered an unexpected number of replies",
            )))),
        }
    } else {
        Ok(Value::Array(replies))
    }
}

impl fmt::Debug for RedisService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisService")
            .field("address", &self.inner.address)
            .field("db", &self.inner.db)
            .finish()
    }
}

/// Why a request with an argument of `bytes` is refused, over a limit of `limit`.
fn oversized(bytes: usize, limit: usize) -> String {
    format!(
        "an argument of {bytes} bytes, over the {limit} Redis accepts (its \
         `proto-max-bulk-len`, which Connector::max_argument_size follows): Redis would close \
         the connection every caller shares, failing their calls in flight; store it in \
         parts, or raise both limits"
    )
}

/// Why a request that would change the shared connection is refused, and what to do
/// instead: `name` is the command's canonical name, or the batch's (`PIPELINE`, `MULTI`).
fn changes_connection(name: &'static str, batch: bool) -> String {
    let why = match name {
        _ if batch => {
            "holds a command that changes the connection every caller shares (SELECT, \
             WATCH, SUBSCRIBE, AUTH...); send it on a connection of its own"
        }
        "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE"
        | "SUNSUBSCRIBE" => {
            "would make the connection every caller shares a subscriber, refusing their \
             commands; subscribe through tower_redis_resilience::pubsub::Subscriber, on a \
             connection of its own"
        }
        "MONITOR" | "SYNC" | "PSYNC" => {
            "would turn the connection every caller shares into a stream, refusing their \
             commands; use a connection of its own"
        }
        "WATCH" | "UNWATCH" => {
            "would apply to the next transaction of any caller sharing the connection, not \
             yours; check-and-set in a script (EVAL, FCALL), which runs atomically"
        }
        "MULTI" | "EXEC" | "DISCARD" => {
            "would take the commands of every caller sharing the connection into the \
             transaction; send a transaction as one request (redis::pipe().atomic())"
        }
        "SELECT" => {
            "would switch the database of every caller sharing the connection, until the \
             next reconnect; choose the database in the URL (redis://127.0.0.1:6379/2)"
        }
        "AUTH" | "HELLO" | "RESET" => {
            "would change the user, protocol or database of every caller sharing the \
             connection, until the next reconnect; give them in the URL or the Connector"
        }
        "CLIENT REPLY" => {
            "would stop Redis answering every caller sharing the connection; leave replies on"
        }
        "CLIENT TRACKING" | "CLIENT CACHING" => {
            "would have Redis track the keys every caller sharing the connection reads (and \
             CLIENT CACHING applies to whichever caller's command comes next), with nobody to \
             hear the invalidations, and the tracking would end unseen at the next reconnect, \
             leaving a cache kept by it stale; track on a connection of its own"
        }
        "QUIT" => {
            "would close the connection every caller shares, failing their calls in flight; \
             drop the client to close it"
        }
        _ => "would change the connection every caller shares; use a connection of its own",
    };
    let name = if batch && name == crate::TRANSACTION {
        "transaction"
    } else if batch {
        "pipeline"
    } else {
        name
    };
    format!("{name} refused: it {why}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Driver;

    async fn within_a_second(ended: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(1), ended)
            .await
            .expect("the end was announced");
    }

    #[tokio::test]
    async fn a_connections_end_is_announced_however_it_comes() {
        // Its task finishes: the server closed the connection.
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let driver = Driver::spawn(async move {
            let _ = closed.await;
        });
        let ended = driver.ended();
        tokio::task::yield_now().await;
        assert!(!driver.has_ended());
        drop(close);
        within_a_second(ended).await;
        assert!(driver.has_ended());
        // Told at once once it has ended.
        within_a_second(driver.ended()).await;

        // Its task is stopped: the last holder let go.
        let driver = Driver::spawn(std::future::pending());
        let ended = driver.ended();
        drop(driver);
        within_a_second(ended).await;

        // Retired (Sentinel named another master).
        let driver = Driver::without_task();
        let ended = driver.ended();
        assert!(!driver.has_ended());
        driver.retire();
        within_a_second(ended).await;
        assert!(driver.has_ended());
    }
}
