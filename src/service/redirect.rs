//! Following the redirects of a cluster that redis-rs's cluster client (its own resends
//! turned off, see [`Connector::cluster`](crate::Connector::cluster)) hands back
//! unfollowed.
//!
//! - `ASK`: while a slot migrates to another node (a resharding, a node added), the node
//!   it is leaving answers `ASK <slot> <host:port>` for each key it no longer holds, new
//!   keys included, without running the command: only that one command may go to the
//!   node named, preceded by `ASKING`. Refreshing the map of the slots does not help (the
//!   slot is still the first node's until the migration ends), so a plain resend meets
//!   the same `ASK`, and every write of a moved key failed until then. Sent with `ASKING`
//!   on its own, the command could meet another caller's command between the two on the
//!   shared connection; sent as one pipeline, the two go out together.
//! - `MOVED` inside a transaction: after a failover or once a migration ends, the node
//!   that served the slot answers `MOVED` to each queued command, and Redis discards the
//!   transaction. redis-rs refreshes its map of the slots when a command or a plain
//!   pipeline meets `MOVED`, but not when a transaction does (it sees only `EXECABORT`),
//!   so every later transaction on the slot went to the old node, and failed, until
//!   some other command refreshed the map. The transaction goes to the node named, and
//!   a read of one of its keys (`EXISTS`) meets the `MOVED` that makes redis-rs refresh.
//!
//! The node named may be one redis-rs's client has no connection to: a master just added
//! to the cluster serves no slot until the first migration to it ends, so the client has
//! not heard of it. Then the command goes on a connection of this crate's own to that
//! node, opened on the first redirect naming it and kept for the next.

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisResult, Value,
    aio::MultiplexedConnection,
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot},
};
use tokio::time::Instant;

use super::{ClusterConnection, Conn, RedisService, topology::Address};
use crate::{
    Error,
    connect::OwnTls,
    credentials::{Provider, fresh},
};

/// Which redirect, to which node, for which slot.
pub(super) struct Redirect {
    pub(super) kind: Kind,
    node: Node,
    slot: u16,
}

impl Redirect {
    /// The node it names, and the slot.
    pub(super) fn to(&self) -> (Address, u16) {
        ((self.node.host.clone(), self.node.port), self.slot)
    }

    /// The redirect itself, as the error of a request that followed it to a node that
    /// could not be reached: not run, as redis-rs reports a `MOVED` to a master that is
    /// gone. It counts as a redirect, which opens no breaker: a breaker that every
    /// node's calls share must not open for one node that is gone, and connects refused
    /// at once soon fill its window (measured before: 4 callers reading keys of a slot
    /// moving to a node that died, and every call of a fifth, to another node, refused as
    /// circuit open).
    fn as_error(&self, cause: RedisError) -> RedisError {
        let kind = match self.kind {
            Kind::Ask => "ASK",
            Kind::Moved => "MOVED",
        };
        let reply = format!(
            "-{kind} {} {}:{}\r\n",
            self.slot, self.node.host, self.node.port
        );
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(Value::ServerError(error)) => error.into(),
            _ => cause,
        }
    }

    /// `result`, with a failure to reach the node made [the redirect](Self::as_error).
    fn unless_unreached<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        result.map_err(|err| match err.kind() {
            ErrorKind::ClusterConnectionNotFound => self.as_error(err),
            _ => err,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Ask,
    Moved,
}

/// A node a redirect names.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Node {
    host: String,
    port: u16,
}

impl Node {
    pub(super) fn new(host: String, port: u16) -> Self {
        Node { host, port }
    }

    fn route(&self) -> SingleNodeRoutingInfo {
        SingleNodeRoutingInfo::ByAddress {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

/// How a cluster connection reaches the nodes a redirect names that redis-rs's client has
/// no connection to: with the initial nodes' credentials, protocol and TLS, within the
/// connector's connect timeout. Each cluster connection (the shared one, each one for
/// blocking commands) has its own, and closes its connections when it goes. Replica reads
/// have one too, whose connections are in `READONLY` mode
/// ([`Unlisted::replicas`]).
pub(crate) struct Unlisted {
    /// An initial node: where to connect is replaced, the rest is kept.
    template: ConnectionInfo,
    /// Asked for credentials before each connection, when the connector has one.
    credentials: Option<Provider>,
    own_tls: OwnTls,
    connect_timeout: Duration,
    /// Whether each connection is told `READONLY` before use, so a replica serves the
    /// reads of its master's slots instead of redirecting them there.
    readonly: bool,
    /// One per node, once asked for; few (nodes that slots migrated to, replicas
    /// redis-rs's client did not know). Each node's lock is held while its connection
    /// opens, so a connect to one node holds up no other's.
    nodes: std::sync::Mutex<Vec<(Node, Arc<OwnConnection>)>>,
}

impl Unlisted {
    pub(crate) fn new(
        template: ConnectionInfo,
        credentials: Option<Provider>,
        own_tls: OwnTls,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Unlisted::with_mode(template, credentials, own_tls, connect_timeout, false)
    }

    /// For reads sent to replicas by address: each connection is in `READONLY` mode.
    pub(crate) fn replicas(
        template: ConnectionInfo,
        credentials: Option<Provider>,
        own_tls: OwnTls,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Unlisted::with_mode(template, credentials, own_tls, connect_timeout, true)
    }

    fn with_mode(
        template: ConnectionInfo,
        credentials: Option<Provider>,
        own_tls: OwnTls,
        connect_timeout: Duration,
        readonly: bool,
    ) -> Arc<Self> {
        Arc::new(Unlisted {
            template,
            credentials,
            own_tls,
            connect_timeout,
            readonly,
            nodes: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// `cmd`'s reply from `node`, on a connection of our own (opened if need be), past
    /// redis-rs's cluster client, within `limit`; `None` if there is none in time. For
    /// questions that must be answered while redis-rs's client holds every request up
    /// (it does while it reads its map of the slots, and each `MOVED` has it read it).
    pub(super) async fn ask(
        self: &Arc<Self>,
        node: &Node,
        cmd: &Cmd,
        limit: Duration,
    ) -> Option<Value> {
        let asked = async {
            let mut connection = single(&self.connect(node).await?)?;
            connection
                .send_packed_command(cmd)
                .await
                .map_err(Error::from)
        };
        tokio::time::timeout(limit, asked).await.ok()?.ok()
    }

    /// The lock of `node`'s connection, made the first time `node` is asked for.
    fn own(&self, node: &Node) -> Arc<OwnConnection> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, own)) = nodes.iter().find(|(asked, _)| asked == node) {
            return Arc::clone(own);
        }
        let own = Arc::new(OwnConnection::default());
        nodes.push((node.clone(), Arc::clone(&own)));
        own
    }

    /// The open connection of our own to `node`, if there is one (not one being opened).
    fn find(&self, node: &Node) -> Option<RedisService> {
        let own = {
            let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            let (_, own) = nodes.iter().find(|(asked, _)| asked == node)?;
            Arc::clone(own)
        };
        let own = own.try_lock().ok()?;
        own.open
            .as_ref()
            .filter(|service| !service.is_closed())
            .cloned()
    }

    /// A connection of our own to `node`: the open one, or a new one (replacing one that
    /// closed). Callers that find none open wait for the first one's connect. The connect
    /// runs in a task of its own, so a caller that stops waiting (its deadline passed)
    /// leaves it to finish for the next.
    async fn connect(self: &Arc<Self>, node: &Node) -> Result<RedisService, Error> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(Error::config(
                "connecting to a cluster node needs a Tokio runtime: none is current",
            ));
        };
        let (this, node) = (Arc::clone(self), node.clone());
        runtime
            .spawn(async move { this.open_to(&node).await })
            .await
            .unwrap_or_else(|_| Err(Error::unavailable("the connect to a node was cancelled")))
    }

    async fn open_to(&self, node: &Node) -> Result<RedisService, Error> {
        let own = self.own(node);
        let mut own = own.lock().await;
        if let Some(service) = own.open.as_ref().filter(|service| !service.is_closed()) {
            return Ok(service.clone());
        }
        if let Some(failed) = &own.failed
            && failed.next_try_at > Instant::now()
        {
            return Err(failed.error.clone());
        }
        let opened = self.open_new(node).await;
        match &opened {
            Ok(service) => {
                own.open = Some(service.clone());
                own.failed = None;
            }
            Err(error) => {
                tracing::debug!(node = %format!("{}:{}", node.host, node.port), %error, "redis cluster: could not connect to a node redis-rs's client has no connection to");
                let pause = own
                    .failed
                    .as_ref()
                    .map_or(FIRST_PAUSE, |failed| (failed.pause * 2).min(LONGEST_PAUSE));
                own.failed = Some(Failed {
                    next_try_at: Instant::now() + pause,
                    pause,
                    error: error.clone(),
                });
            }
        }
        opened
    }

    /// Opens a new connection to `node`, within the connect timeout.
    async fn open_new(&self, node: &Node) -> Result<RedisService, Error> {
        let address = match self.template.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: node.host.clone(),
                port: node.port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
        };
        let info = self.template.clone().set_addr(address);
        let display = crate::connect::describe(&info);
        let readonly = self.readonly;
        let opening = async move {
            let authenticated = fresh(self.credentials.as_ref(), &info).await?;
            let service =
                crate::connect::open(&authenticated.info, None, &self.own_tls, display.into())
                    .await?;
            authenticated.keep(&service, self.connect_timeout);
            if readonly {
                let mut connection = single(&service)?;
                let told = connection
                    .send_packed_command(&redis::cmd("READONLY"))
                    .await;
                told.map_err(Error::from_connect)?;
            }
            Ok::<_, Error>(service)
        };
        match tokio::time::timeout(self.connect_timeout, opening).await {
            Ok(opened) => opened,
            Err(_) => Err(Error::unavailable(
                "connect to a node redis-rs's cluster client has no connection to timed out",
            )),
        }
    }
}

/// A node's connection of our own, behind the lock its connect holds.
type OwnConnection = tokio::sync::Mutex<Own>;

#[derive(Default)]
struct Own {
    /// The connection, once opened.
    open: Option<RedisService>,
    /// The last connect's failure, while connects fail: until `next_try_at`, callers get
    /// its error at once instead of a connect of their own. Without it, every request
    /// redirected to a node that is gone (a master just added that died while a slot
    /// moved to it, a replica that died with its master) tried to connect to it
    /// (measured: hundreds of tries a second, one per request).
    failed: Option<Failed>,
}

struct Failed {
    next_try_at: Instant,
    /// The pause it set: the next failure's doubles it.
    pause: Duration,
    error: Error,
}

/// The pause after a node's first failed connect; each further one doubles it, up to
/// [`LONGEST_PAUSE`].
pub(super) const FIRST_PAUSE: Duration = Duration::from_millis(100);
pub(super) const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Where `err` redirects: for one command, its error; for a transaction, the errors
/// Redis queued its commands with, all of them the same redirect to one node (a
/// transaction refused for another reason too would fail there as well).
pub(super) fn redirected(err: &RedisError) -> Option<Redirect> {
    let errors = err.clone().into_server_errors()?;
    let mut found = None::<(Kind, &str, u16, u16)>;
    for (_, error) in errors.iter() {
        let kind = match error.code() {
            "ASK" => Kind::Ask,
            "MOVED" => Kind::Moved,
            _ => return None,
        };
        // "3999 127.0.0.1:6381": the slot, then the node.
        let mut details = error.details()?.split_ascii_whitespace();
        let slot = details.next()?.parse().ok()?;
        let (host, port) = details.next()?.rsplit_once(':')?;
        let port = port.parse().ok()?;
        match found {
            Some(seen) if seen != (kind, host, port, slot) => return None,
            _ => found = Some((kind, host, port, slot)),
        }
    }
    let (kind, host, port, slot) = found?;
    Some(Redirect {
        kind,
        node: Node {
            host: host.to_owned(),
            port,
        },
        slot,
    })
}

/// Sends `cmd`, which the node serving its slot redirected with `ASK`, to the node
/// named, after `ASKING`.
pub(super) async fn command(
    connection: &mut ClusterConnection,
    unlisted: &Arc<Unlisted>,
    to: Redirect,
    cmd: &Cmd,
) -> RedisResult<Value> {
    let mut pipeline = redis::pipe();
    pipeline.cmd("ASKING").add_command(cmd.clone());
    let followed = follow(connection, unlisted, &to.node, pipeline, 1, 1).await;
    let mut replies = to.unless_unreached(followed)?;
    replies.pop().ok_or_else(short)
}

/// Sends the one command of a plain pipeline as [`command`] does.
pub(super) async fn lone_command(
    connection: &mut ClusterConnection,
    unlisted: &Arc<Unlisted>,
    to: Redirect,
    lone: &Pipeline,
) -> RedisResult<Vec<Value>> {
    let mut pipeline = redis::pipe();
    pipeline.cmd("ASKING");
    for cmd in lone.cmd_iter() {
        pipeline.add_command(cmd.clone());
    }
    let followed = follow(connection, unlisted, &to.node, pipeline, 1, lone.len()).await;
    to.unless_unreached(followed)
}

/// Sends `transaction`, whose commands the node serving its slot redirected (so it
/// discarded the transaction, and nothing ran), to the node named: after `ASKING` for an
/// `ASK` (Redis keeps it for the commands between `MULTI` and `EXEC`), and for a `MOVED`
/// after making redis-rs refresh its map of the slots. Answers `EXEC`'s reply alone, as
/// redis-rs does for a transaction. If an `ASK`'s keys are split between the two nodes,
/// the node named refuses it (`TRYAGAIN`).
pub(super) async fn transaction(
    connection: &mut ClusterConnection,
    unlisted: &Arc<Unlisted>,
    to: Redirect,
    transaction: &Pipeline,
) -> RedisResult<Vec<Value>> {
    let mut pipeline = redis::pipe();
    match to.kind {
        Kind::Ask => {
            pipeline.cmd("ASKING");
        }
        Kind::Moved => refresh_slots(connection, transaction, to.slot).await,
    }
    pipeline.cmd("MULTI");
    for cmd in transaction.cmd_iter() {
        pipeline.add_command(cmd.clone());
    }
    pipeline.cmd("EXEC");
    let exec = pipeline.len() - 1;
    let followed = follow(connection, unlisted, &to.node, pipeline, exec, 1).await;
    to.unless_unreached(followed)
}

/// Makes redis-rs refresh its map of the slots, which a transaction that met `MOVED`
/// does not: sends `EXISTS` of an argument of `transaction` that hashes to `slot` (one
/// of its keys) where redis-rs routes it, the node that answered `MOVED`, whose `MOVED`
/// makes redis-rs refresh. A read: it changes nothing, whatever the node.
async fn refresh_slots(connection: &mut ClusterConnection, transaction: &Pipeline, slot: u16) {
    let Some(slot) = Slot::new(slot) else {
        return;
    };
    let key = transaction
        .cmd_iter()
        .flat_map(|cmd| cmd.args_iter().skip(1))
        .find_map(|arg| match arg {
            redis::Arg::Simple(arg) if Slot::for_key(arg) == slot => Some(arg),
            _ => None,
        });
    if let Some(key) = key {
        let exists = redis::cmd("EXISTS").arg(key).to_owned();
        let _ = redis::aio::ConnectionLike::req_packed_command(connection, &exists).await;
    }
}

/// Sends `pipeline` to `to`, as [`to_node`] does.
pub(super) async fn follow(
    connection: &mut ClusterConnection,
    unlisted: &Arc<Unlisted>,
    to: &Node,
    pipeline: Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let pipeline = &pipeline;
    let listed = async move {
        let to = to.route();
        connection
            .route_pipeline(pipeline.clone(), offset, count, to)
            .await
    };
    let own = async |service: RedisService| {
        let mut own = single(&service)?;
        own.send_packed_commands(pipeline, offset, count).await
    };
    to_node(unlisted, to, listed, own).await
}

/// Sends `cmd` to `to`, as [`to_node`] does.
pub(super) async fn follow_command(
    connection: &mut ClusterConnection,
    unlisted: &Arc<Unlisted>,
    to: &Node,
    cmd: &Cmd,
) -> RedisResult<Value> {
    let listed = async move {
        let to = RoutingInfo::SingleNode(to.route());
        connection.route_command(cmd.clone(), to).await
    };
    let own = async |service: RedisService| single(&service)?.send_packed_command(cmd).await;
    to_node(unlisted, to, listed, own).await
}

/// Sends a request to `to`: on our own connection there if one is open, else through
/// redis-rs's client (`listed`, not polled otherwise), and when that has no connection
/// there, on a new one of our own (`own`).
async fn to_node<T>(
    unlisted: &Arc<Unlisted>,
    to: &Node,
    listed: impl Future<Output = RedisResult<T>>,
    own: impl AsyncFnOnce(RedisService) -> RedisResult<T>,
) -> RedisResult<T> {
    if let Some(service) = unlisted.find(to) {
        return own(service).await;
    }
    match listed.await {
        Err(err) if err.kind() == ErrorKind::ClusterConnectionNotFound => {
            match unlisted.connect(to).await {
                Ok(service) => own(service).await,
                // Rejected credentials or settings: what must be fixed, as it is.
                Err(error) if error.is_config() => Err(error.into()),
                Err(error) => Err(RedisError::from((
                    ErrorKind::ClusterConnectionNotFound,
                    "could not connect to the node",
                    format!("{}:{}: {error}", to.host, to.port),
                ))),
            }
        }
        reply => reply,
    }
}

/// The multiplexed connection of a service [`Unlisted`] opened: one node's.
fn single(own: &RedisService) -> Result<MultiplexedConnection, Error> {
    match &own.inner.connection {
        Conn::Single(connection) => Ok(connection.clone()),
        Conn::Cluster { .. } => Err(Error::config(
            "a node of a cluster was opened as a cluster of its own",
        )),
    }
}

fn short() -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "the node a redirect named answered no reply",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &[u8]) -> RedisError {
        match redis::parse_redis_value(text) {
            Ok(Value::ServerError(err)) => err.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn a_redirect_names_its_node_and_slot_and_other_errors_name_none() {
        let asked = redirected(&reply(b"-ASK 3999 127.0.0.1:6381\r\n")).unwrap();
        assert!(asked.kind == Kind::Ask && asked.slot == 3999);
        assert_eq!(
            (asked.node.host.as_str(), asked.node.port),
            ("127.0.0.1", 6381)
        );
        let moved = redirected(&reply(b"-MOVED 3999 ::1:6381\r\n")).unwrap();
        assert!(moved.kind == Kind::Moved);
        assert_eq!((moved.node.host.as_str(), moved.node.port), ("::1", 6381));
        for other in [
            &b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"[..],
            b"-ASK 3999\r\n",
            b"-ASK 3999 127.0.0.1:port\r\n",
            b"-MOVED slot 127.0.0.1:6381\r\n",
        ] {
            assert!(redirected(&reply(other)).is_none(), "{other:?}");
        }
    }

    #[test]
    fn a_redirect_to_a_node_that_could_not_be_reached_fails_as_that_redirect() {
        let unreached = || {
            RedisError::from((
                ErrorKind::ClusterConnectionNotFound,
                "could not connect to the node",
                "127.0.0.1:6381: connection refused".to_owned(),
            ))
        };
        for (text, kind) in [
            (&b"-ASK 3999 127.0.0.1:6381\r\n"[..], Kind::Ask),
            (b"-MOVED 12 ::1:6381\r\n", Kind::Moved),
        ] {
            let to = redirected(&reply(text)).unwrap();
            let err = to.unless_unreached::<()>(Err(unreached())).unwrap_err();
            let again = redirected(&err).expect("the redirect");
            assert!(again.kind == kind && again.slot == to.slot && again.node == to.node);
            let err = Error::from_request(err);
            assert!(err.is_redirect() && !err.may_have_run(), "{err}");
        }
        // Any other failure is left as it is.
        let to = redirected(&reply(b"-ASK 3999 127.0.0.1:6381\r\n")).unwrap();
        let refused = to.unless_unreached::<()>(Err(reply(b"-WRONGPASS no\r\n")));
        assert_eq!(refused.unwrap_err().code(), Some("WRONGPASS"));
    }
}
