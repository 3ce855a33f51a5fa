//! A cluster node's connection, as redis-rs's cluster client holds it: redis-rs's own
//! multiplexed connection, whose replies are waited for without a time limit but for
//! those of the commands the cluster client sends of its own accord.
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

/// What a connection redis-rs's cluster client opens to a node is. One pointer:
/// redis-rs's client moves a copy of the connection with each request it routes.
#[derive(Clone)]
pub(crate) struct NodeConnection(Arc<Node>);

struct Node {
    connection: MultiplexedConnection,
    /// How long the cluster client's own commands wait for the node's reply.
    own_commands_limit: Option<Duration>,
}

impl ConnectionLike for NodeConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut connection = self.0.connection.clone();
        match self.0.own_commands_limit {
            Some(limit) if sent_by_the_cluster_client(cmd) => Box::pin(async move {
                tokio::time::timeout(limit, connection.send_packed_command(cmd))
                    .await
                    // The error redis-rs gives a request past its response timeout.
                    .unwrap_or_else(|_| {
                        Err(RedisError::from(io::Error::from(io::ErrorKind::TimedOut)))
                    })
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
        let own_commands_limit = response_timeout(&config);
        let config = config.set_response_timeout(None);
        Box::pin(async move {
            let connection = MultiplexedConnection::connect_with_config(info, config).await?;
            Ok(NodeConnection(Arc::new(Node {
                connection,
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

/// When redis-rs cannot be read, its own commands wait at most this long: the connect
/// timeout's default.
const FALLBACK_LIMIT: Duration = Duration::from_secs(1);

/// The response timeout the cluster client gave `config` (its `response_timeout`, which
/// this crate sets to the connect timeout for the shared connection). redis-rs has no
/// getter for it, so it is read from the `Debug` text, which shows it first
/// (`AsyncConnectionConfig { response_timeout: Some(250ms), ...`). If that text cannot be
/// read (a later redis-rs shows it otherwise), [`FALLBACK_LIMIT`]: a limit on the
/// client's own commands is never lost.
fn response_timeout(config: &AsyncConnectionConfig) -> Option<Duration> {
    limit_shown(&format!("{config:?}"))
}

/// The response timeout in a config's `Debug` text `shown`.
fn limit_shown(shown: &str) -> Option<Duration> {
    let Some((_, field)) = shown.split_once("response_timeout: ") else {
        return Some(FALLBACK_LIMIT);
    };
    if field.starts_with("None") {
        return None;
    }
    let read = field
        .strip_prefix("Some(")
        .and_then(|some| some.split_once(')'))
        .and_then(|(duration, _)| parse_duration(duration));
    Some(read.unwrap_or(FALLBACK_LIMIT))
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
    fn the_response_timeout_given_is_read_back_exactly() {
        for limit in [
            Duration::from_secs(1),
            Duration::from_millis(250),
            Duration::from_millis(1_500),
            Duration::from_nanos(333_333_333),
            Duration::from_micros(100),
            Duration::from_nanos(7),
            Duration::from_secs(3_600),
        ] {
            let config = AsyncConnectionConfig::new().set_response_timeout(Some(limit));
            assert_eq!(response_timeout(&config), Some(limit), "{config:?}");
        }
        let none = AsyncConnectionConfig::new().set_response_timeout(None);
        assert_eq!(response_timeout(&none), None);
    }

    #[test]
    fn text_that_cannot_be_read_keeps_a_limit() {
        for shown in [
            "AsyncConnectionConfig { response_timeout: Some(1.5 fortnights), .. }",
            "AsyncConnectionConfig { response_timeout: 250ms, .. }",
            "AsyncConnectionConfig { .. }",
        ] {
            assert_eq!(limit_shown(shown), Some(FALLBACK_LIMIT), "{shown}");
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
