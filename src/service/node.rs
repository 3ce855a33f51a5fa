//! A cluster node's connection, as redis-rs's cluster client holds it: redis-rs's own
//! multiplexed connection, opened and run by this crate where it can (as one server's
//! is), so that a request made after the node closed it is known not to have been sent;
//! its replies are waited for without a time limit but for those of the commands the
//! cluster client sends of its own accord.
//!
//! redis-rs applies the cluster client's response timeout to every request on every
//! node, a tokio timer each; the Timeout layer already gives each call its deadline. The
//! limit is needed for the client's own commands: it reads its map of the slots
//! (`CLUSTER SLOTS`) of one node after another while every request waits, so a node
//! that stalls must not hold that up for longer than the limit. And redis-rs's client
//! moves a copy of the node's connection with each request it routes: one pointer here,
//! where redis-rs's connection is 72 bytes (a field of 16 more cost 3 points of
//! throughput). `cargo bench --bench cluster --features cluster`, 64 in flight on
//! `current_thread`, the leaf against raw redis-rs: 0.875–0.878 before, 0.949–0.955
//! now.

use std::{io, sync::Arc, time::Duration};

use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::Connect,
};

use super::Driver;

/// What a connection redis-rs's cluster client opens to a node is. One pointer:
/// redis-rs's client moves a copy of the connection with each request it routes.
#[derive(Clone)]
pub(crate) struct NodeConnection(Arc<Node>);

struct Node {
    connection: MultiplexedConnection,
    /// The connection's task, where this crate runs it: it tells when the node closed the
    /// connection, and is stopped when redis-rs's client lets go of the connection.
    driver: Option<Arc<Driver>>,
    /// How long the cluster client's own commands wait for the node's reply.
    own_commands_limit: Option<Duration>,
}

impl Node {
    /// The error of a request made once the connection is known to have closed (the node
    /// closed it while it sat idle: a restart, its `timeout`, `CLIENT KILL`): not sent.
    /// redis-rs's client takes it for a dropped connection and connects to the node
    /// again, and the retry may send the request there, an `INCR` included.
    fn closed(&self) -> Option<RedisError> {
        self.driver
            .as_deref()
            .is_some_and(Driver::has_ended)
            .then(|| crate::Error::not_sent().into())
    }
}

impl ConnectionLike for NodeConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if let Some(closed) = self.0.closed() {
            return Box::pin(std::future::ready(Err(closed)));
        }
        let mut connection = self.0.connection.clone();
        match self.0.own_commands_limit {
            Some(limit) if sent_by_the_cluster_client(cmd) => Box::pin(async move {
                tokio::time::timeout(limit, connection.send_packed_command(cmd))
                    .await
                    .unwrap_or_else(|_| Err(timed_out()))
            }),
            _ => Box::pin(async move { connection.send_packed_command(cmd).await }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if let Some(closed) = self.0.closed() {
            return Box::pin(std::future::ready(Err(closed)));
        }
        let mut connection = self.0.connection.clone();
        Box::pin(async move {
            connection
                .send_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.0.connection.get_db()
    }
}

impl Connect for NodeConnection {
    fn connect_with_config<'a, T>(info: T, config: AsyncConnectionConfig) -> RedisFuture<'a, Self>
    where
        T: IntoConnectionInfo + Send + 'a,
    {
        let own_commands_limit = limit_shown(&config, "response_timeout");
        let connect_limit = limit_shown(&config, "connection_timeout");
        let config = config.set_response_timeout(None);
        Box::pin(async move {
            let info = info.into_connection_info()?;
            let open = crate::connect::open_node(&info, config);
            let opened = match connect_limit {
                Some(limit) => tokio::time::timeout(limit, open)
                    .await
                    .unwrap_or_else(|_| Err(crate::Error::from_connect(timed_out()))),
                None => open.await,
            };
            let (connection, driver) = opened?;
            Ok(NodeConnection(Arc::new(Node {
                connection,
                driver,
                own_commands_limit,
            })))
        })
    }
}

/// Whether `cmd` is one redis-rs's cluster client sends of its own accord: a read of the
/// slots' map (`CLUSTER SLOTS`), a check of a node (`PING`, `READONLY`), the `ASKING`
/// before a redirected request. The same commands sent by the application are given the
/// limit too; it is longer than the deadline the Timeout layer gives them.
fn sent_by_the_cluster_client(cmd: &Cmd) -> bool {
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return false;
    };
    [&b"CLUSTER"[..], b"PING", b"READONLY", b"ASKING"]
        .iter()
        .any(|own| name.eq_ignore_ascii_case(own))
}

/// A limit redis-rs's config is read to have where it cannot be read: the connect
/// timeout's default.
const FALLBACK_LIMIT: Duration = Duration::from_secs(1);

/// The time limit the cluster client gave `config` in `field`: its `response_timeout`
/// (which this crate sets to the connect timeout for the shared connection) or its
/// `connection_timeout` (a quarter of it). redis-rs has no getters for them, so they are
/// read from the `Debug` text (`AsyncConnectionConfig { response_timeout: Some(1s),
/// connection_timeout: Some(250ms), ...`). If that cannot be read (a later redis-rs
/// shows it otherwise), [`FALLBACK_LIMIT`]: a limit is never lost.
fn limit_shown(config: &AsyncConnectionConfig, field: &str) -> Option<Duration> {
    limit_in(&format!("{config:?}"), field)
}

/// The limit in `field` of a config's `Debug` text `shown`.
fn limit_in(shown: &str, field: &str) -> Option<Duration> {
    let Some((_, value)) = shown.split_once(&format!(" {field}: ")) else {
        return Some(FALLBACK_LIMIT);
    };
    if value.starts_with("None") {
        return None;
    }
    let read = value
        .strip_prefix("Some(")
        .and_then(|some| some.split_once(')'))
        .and_then(|(duration, _)| parse_duration(duration));
    Some(read.unwrap_or(FALLBACK_LIMIT))
}

/// The error redis-rs gives a request past its response timeout, or a connect past its
/// connection timeout.
fn timed_out() -> RedisError {
    RedisError::from(io::Error::from(io::ErrorKind::TimedOut))
}

/// A `Duration` from its `Debug` text (`1s`, `250ms`, `1.5s`, `333.333333ms`, `100µs`,
/// `7ns`), exactly.
fn parse_duration(shown: &str) -> Option<Duration> {
    let digits = shown
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(shown.len());
    let (number, unit) = shown.split_at(digits);
    let unit_nanos: u128 = match unit {
        "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "µs" => 1_000,
        "ns" => 1,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u128 = whole.parse().ok()?;
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
        fraction.parse::<u128>().ok()?.checked_mul(unit_nanos)? / scale
    };
    let nanos = whole.checked_mul(unit_nanos)?.checked_add(fraction_nanos)?;
    Some(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_given_are_read_back_exactly() {
        for limit in [
            Duration::from_secs(1),
            Duration::from_millis(250),
            Duration::from_millis(1_500),
            Duration::from_nanos(333_333_333),
            Duration::from_micros(100),
            Duration::from_nanos(7),
            Duration::from_secs(3_600),
        ] {
            let config = AsyncConnectionConfig::new()
                .set_response_timeout(Some(limit))
                .set_connection_timeout(Some(limit / 4));
            assert_eq!(
                limit_shown(&config, "response_timeout"),
                Some(limit),
                "{config:?}"
            );
            assert_eq!(limit_shown(&config, "connection_timeout"), Some(limit / 4));
        }
        let none = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(None);
        assert_eq!(limit_shown(&none, "response_timeout"), None);
        assert_eq!(limit_shown(&none, "connection_timeout"), None);
    }

    #[test]
    fn text_that_cannot_be_read_keeps_a_limit() {
        for shown in [
            "AsyncConnectionConfig { response_timeout: Some(1.5 fortnights), .. }",
            "AsyncConnectionConfig { response_timeout: 250ms, .. }",
            "AsyncConnectionConfig { .. }",
        ] {
            assert_eq!(
                limit_in(shown, "response_timeout"),
                Some(FALLBACK_LIMIT),
                "{shown}"
            );
        }
        assert_eq!(parse_duration("1.5 fortnights"), None);
        assert_eq!(parse_duration("ms"), None);
        assert_eq!(parse_duration("99999999999999999999s"), None);
    }

    #[test]
    fn only_the_cluster_clients_own_commands_are_limited() {
        for own in ["CLUSTER", "cluster", "PING", "READONLY", "ASKING"] {
            assert!(sent_by_the_cluster_client(&redis::cmd(own)), "{own}");
        }
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        assert!(sent_by_the_cluster_client(&slots));
        for user in ["GET", "SET", "BLPOP", "EVAL", "CLUSTERX"] {
            assert!(!sent_by_the_cluster_client(&redis::cmd(user)), "{user}");
        }
    }
}
