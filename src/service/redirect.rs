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

use std::{sync::Arc, time::Duration};

use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisResult, Value,
    cluster_async::ClusterConnection,
    cluster_routing::{SingleNodeRoutingInfo, Slot},
};

use super::RedisService;
use crate::{Error, connect::OwnTls};

/// Which redirect, to which node, for which slot.
pub(super) struct Redirect {
    pub(super) kind: Kind,
    node: Node,
    slot: u16,
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
/// blocking commands) has its own, and closes its connections when it goes.
pub(crate) struct Unlisted {
    /// An initial node: where to connect is replaced, the rest is kept.
    template: ConnectionInfo,
    own_tls: OwnTls,
    connect_timeout: Duration,
    /// One per node, once opened; few (nodes that slots migrated to).
    open: tokio::sync::Mutex<Vec<(Node, RedisService)>>,
}

impl Unlisted {
    pub(crate) fn new(
        template: ConnectionInfo,
        own_tls: OwnTls,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Unlisted {
            template,
            own_tls,
            connect_timeout,
            open: tokio::sync::Mutex::new(Vec::new()),
        })
    }

    /// The open connection of our own to `node`, if there is one.
    async fn find(&self, node: &Node) -> Option<RedisService> {
        let open = self.open.lock().await;
        let (_, service) = open.iter().find(|(asked, _)| asked == node)?;
        (!service.is_closed()).then(|| service.clone())
    }

    /// A connection of our own to `node`: the open one, or a new one (replacing one that
    /// closed). Callers that find none open wait for the first one's connect.
    async fn connect(&self, node: &Node) -> Result<RedisService, Error> {
        let mut open = self.open.lock().await;
        let position = open.iter().position(|(asked, _)| asked == node);
        if let Some(at) = position
            && !open[at].1.is_closed()
        {
            return Ok(open[at].1.clone());
        }
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
        let opening = crate::connect::open(&info, None, &self.own_tls, display.into());
        let service = match tokio::time::timeout(self.connect_timeout, opening).await {
            Ok(opened) => opened?,
            Err(_) => {
                return Err(Error::unavailable(
                    "connect to the node a redirect named timed out",
                ));
            }
        };
        match position {
            Some(at) => open[at].1 = service.clone(),
            None => open.push((node.clone(), service.clone())),
        }
        Ok(service)
    }
}

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
    unlisted: &Unlisted,
    to: Redirect,
    cmd: &Cmd,
) -> RedisResult<Value> {
    let mut pipeline = redis::pipe();
    pipeline.cmd("ASKING").add_command(cmd.clone());
    let mut replies = follow(connection, unlisted, &to.node, pipeline, 1, 1).await?;
    replies.pop().ok_or_else(short)
}

/// Sends the one command of a plain pipeline as [`command`] does.
pub(super) async fn lone_command(
    connection: &mut ClusterConnection,
    unlisted: &Unlisted,
    to: Redirect,
    lone: &Pipeline,
) -> RedisResult<Vec<Value>> {
    let mut pipeline = redis::pipe();
    pipeline.cmd("ASKING");
    for cmd in lone.cmd_iter() {
        pipeline.add_command(cmd.clone());
    }
    follow(connection, unlisted, &to.node, pipeline, 1, lone.len()).await
}

/// Sends `transaction`, whose commands the node serving its slot redirected (so it
/// discarded the transaction, and nothing ran), to the node named: after `ASKING` for an
/// `ASK` (Redis keeps it for the commands between `MULTI` and `EXEC`), and for a `MOVED`
/// after making redis-rs refresh its map of the slots. Answers `EXEC`'s reply alone, as
/// redis-rs does for a transaction. If an `ASK`'s keys are split between the two nodes,
/// the node named refuses it (`TRYAGAIN`).
pub(super) async fn transaction(
    connection: &mut ClusterConnection,
    unlisted: &Unlisted,
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
    follow(connection, unlisted, &to.node, pipeline, exec, 1).await
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

/// Sends `pipeline` to `to`: through redis-rs's client when it has a connection there,
/// else on one of our own.
async fn follow(
    connection: &mut ClusterConnection,
    unlisted: &Unlisted,
    to: &Node,
    pipeline: Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let own = match unlisted.find(to).await {
        Some(own) => own,
        None => {
            let listed = connection
                .route_pipeline(pipeline.clone(), offset, count, to.route())
                .await;
            match listed {
                Err(err) if err.kind() == ErrorKind::ClusterConnectionNotFound => {
                    unlisted.connect(to).await?
                }
                replies => return replies,
            }
        }
    };
    own.inner
        .connection
        .clone()
        .commands(&pipeline, offset, count)
        .await
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
}
