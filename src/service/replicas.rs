//! Reads a cluster's master cannot serve, sent to its replicas
//! ([`Connector::read_replicas`](crate::Connector::read_replicas)).

use std::{
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::{Cmd, Pipeline, RedisError, RedisResult, Value, cluster::ClusterClient};
use tokio::time::Instant;

use super::{
    ClusterConnection, Driver,
    redirect::{Node, Unlisted, follow, follow_command},
    topology::{self, Address, SOURCES},
};
use crate::{CommandInfo, Error, request::simple_args};

/// A second cluster connection, set up for replica reads (its connections to replicas
/// in `READONLY` mode), one for every connection a connector opens, opened in the
/// background beside the first (or by the first read that needs it).
///
/// A read goes to a replica of its key's slot by the replica's address (on redis-rs's
/// connection to it, or, when redis-rs has none, on a `READONLY` connection of this
/// crate's own), from a map of the slots' replicas that this reads itself
/// (`CLUSTER NODES`), not by redis-rs's routing:
/// that goes by its map from `CLUSTER SLOTS`, which leaves out a replica until the node
/// asked has heard its replication offset is above 0 (a cluster just built, a replica
/// syncing again with a master that restarted), and sends a slot's reads to its master
/// when it knows no replica (measured on a cluster just built: 50 `GET`s, 50 to the
/// master). A master that is up but cannot serve (`CLUSTERDOWN` for ~2 s after a
/// restart, `LOADING` a large dataset first) is exactly when the replica is wanted.
pub(crate) struct ReplicaReads {
    /// Built with `read_from_replicas`, and otherwise as the main connection's.
    client: ClusterClient,
    connect_timeout: Duration,
    /// The connection, with the task that ends with the runtime it was opened on (and
    /// redis-rs's client's task with it): opened again on another runtime once that one
    /// has shut down. It is opened on the runtime of the first connect, and kept across
    /// the main connection's replacements; a client made on a runtime that then shut down
    /// read no replica again.
    connection: Mutex<Option<(ClusterConnection, Arc<Driver>)>>,
    /// Held while the connection is opened: the reads that want it meanwhile wait.
    opening: tokio::sync::Mutex<()>,
    /// The slots' replicas as the cluster last told, and when.
    map: Mutex<Option<(SlotReplicas, Instant)>>,
    /// Held while a read of the map is under way: the reads that would start another
    /// meanwhile wait for it (at most [`SOURCES`] × [`topology::QUESTION_TIMEOUT`]) and go
    /// on with what it read, so that a failover's new roles reach every read that met
    /// the old ones.
    reading_map: tokio::sync::Mutex<()>,
    /// Turns among a slot's replicas.
    turn: AtomicUsize,
    /// Reads a replica served.
    served: AtomicU64,
    /// Connections of our own to the replicas redis-rs's client has none to: its map
    /// (from `CLUSTER SLOTS`) may name none, as in a cluster just built, until something
    /// makes it read the map again.
    unlisted: Arc<Unlisted>,
}

/// How long a read waits for a master before a replica is asked too
/// ([`ReplicaReads::hedged`]): far beyond a healthy master's answer (a millisecond or
/// two), and early enough in the default 250 ms deadline for the replica's.
const HEDGE_AFTER: Duration = Duration::from_millis(100);

/// How old the map must be before a read that found no replica for its slot reads it
/// again: at most ten `CLUSTER NODES` a second while it names none, and a map that a
/// failover made wrong is read again within this. (A replica that could not serve has it
/// read again once the map is [`REPLICA_PATIENCE`] old: see `reread_map`.)
const REREAD_AFTER: Duration = Duration::from_millis(100);

/// How long a replica is given to answer a read before the map is read again (if old
/// enough) and the read sent to the replica it names, once: a healthy replica answers
/// within a millisecond or two. A failover since the map was read leaves it naming the
/// old roles, so a read of a slot whose new master stalls goes first to that same
/// master, as the slot's replica, and no error shows the map is wrong. After a hedge
/// (100 ms), the second try comes at ~150 ms (~180 ms if the node asked for the map is
/// the stalled one), within the default 250 ms deadline.
const REPLICA_PATIENCE: Duration = Duration::from_millis(50);

/// Each range of slots (first, last), with the addresses of its replicas.
#[derive(Clone, Default)]
struct SlotReplicas(Vec<(u16, u16, Vec<Address>)>);

impl SlotReplicas {
    fn of(&self, slot: u16) -> &[Address] {
        self.0
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map_or(&[], |(_, _, replicas)| replicas)
    }

    /// Whether every range has a replica.
    fn complete(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|(_, _, replicas)| !replicas.is_empty())
    }

    /// Adds the replicas `other` names that this lacks.
    fn merge(&mut self, other: SlotReplicas) {
        for (start, end, replicas) in other.0 {
            match self.0.iter_mut().find(|(s, e, _)| (*s, *e) == (start, end)) {
                Some((_, _, known)) => {
                    for replica in replicas {
                        if !known.contains(&replica) {
                            known.push(replica);
                        }
                    }
                }
                None => self.0.push((start, end, replicas)),
            }
        }
    }

    /// The replicas of each master's ranges among the nodes of `CLUSTER NODES`, but for
    /// those flagged failed or without an address. (`CLUSTER SLOTS` would not do: it
    /// leaves out a replica whose replication offset it has not heard is above 0, as
    /// while the replica syncs again with a master that restarted, which is when it is
    /// wanted.)
    fn of_nodes(nodes: &[topology::Node]) -> SlotReplicas {
        let mut map = Vec::new();
        for master in nodes.iter().filter(|node| node.master.is_none()) {
            let replicas: Vec<Address> = nodes
                .iter()
                .filter(|node| node.usable && node.master.as_ref() == Some(&master.id))
                .filter_map(|node| node.address.clone())
                .collect();
            for &(first, last) in &master.ranges {
                map.push((first, last, replicas.clone()));
            }
        }
        SlotReplicas(map)
    }
}

/// The key a command is routed by, as redis-rs routes it: the first argument after the
/// name, but for scripts and the few reads whose key comes later. `None` for a command of
/// no key (and for one of the rare others whose key comes later: only an estimate then).
pub(super) fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = simple_args(cmd);
    let name = args.next()?;
    let is = |word: &str| name.eq_ignore_ascii_case(word.as_bytes());
    let script = [
        "EVAL",
        "EVALSHA",
        "FCALL",
        "EVAL_RO",
        "EVALSHA_RO",
        "FCALL_RO",
    ];
    if script.into_iter().any(is) {
        // script numkeys key...
        let numkeys = args.nth(1)?;
        return (numkeys != b"0").then(|| args.next()).flatten();
    }
    if is("XREAD") {
        return args
            .skip_while(|arg| !arg.eq_ignore_ascii_case(b"STREAMS"))
            .nth(1);
    }
    if is("OBJECT") || is("MEMORY") || is("XINFO") {
        return args.nth(1);
    }
    args.next()
}

/// The slot a pipeline is routed by: its first command's with a key.
pub(super) fn slot_of_pipeline(pipeline: &Pipeline) -> Option<u16> {
    pipeline.cmd_iter().find_map(key_of).map(slot_of)
}

/// The hash slot of `key`, as Redis Cluster computes it (CRC16-XMODEM of the key, or of
/// its hash tag, modulo 16384): redis-rs's `Slot::for_key` gives no number back.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

impl ReplicaReads {
    pub(crate) fn new(
        client: ClusterClient,
        connect_timeout: Duration,
        unlisted: Arc<Unlisted>,
    ) -> Arc<Self> {
        Arc::new(ReplicaReads {
            client,
            connect_timeout,
            connection: Mutex::new(None),
            opening: tokio::sync::Mutex::const_new(()),
            map: Mutex::new(None),
            reading_map: tokio::sync::Mutex::const_new(()),
            turn: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            unlisted,
        })
    }

    /// How many reads a replica served.
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Relaxed)
    }

    /// Opens the connection and reads the map in the background, unless the connection
    /// is open (and its runtime runs): at each connect of the main connection, while the
    /// masters are up, so that both are there when a master goes. If either cannot be had
    /// now, the first read that needs it tries again.
    pub(crate) fn open(self: &Arc<Self>) {
        if self.opened().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = Arc::clone(self);
        runtime.spawn(async move {
            if let Some(mut connection) = this.connection().await {
                this.read_map(&mut connection).await;
            }
        });
    }

    /// The connection, opened within the connect timeout if it is not yet (or its
    /// runtime has shut down); `None` if it cannot be (tried again next time). It opens
    /// in a task of its own, so a read that stops waiting (its deadline passed) leaves it
    /// to finish for the next: redis-rs's client connects to every node, and waits for
    /// a stalled one, just when a replica is wanted.
    async fn connection(self: &Arc<Self>) -> Option<ClusterConnection> {
        if let Some(connection) = self.opened() {
            return Some(connection);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let this = Arc::clone(self);
        let open = runtime.spawn(async move {
            let _opening = this.opening.lock().await;
            if let Some(connection) = this.opened() {
                return Ok(connection);
            }
            let connection = this
                .client
                .get_async_generic_connection::<super::NodeConnection>()
                .await?;
            *this
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some((connection.clone(), Driver::beside_runtime()));
            Ok::<_, RedisError>(connection)
        });
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok(Ok(connection))) => Some(connection),
            Ok(Ok(Err(error))) => {
                tracing::debug!(%error, "redis cluster: the connection for replica reads could not be opened");
                None
            }
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// The connection, if it is open and the runtime it was opened on still runs.
    fn opened(&self) -> Option<ClusterConnection> {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*connection {
            Some((connection, runtime)) if !runtime.has_ended() => Some(connection.clone()),
            _ => None,
        }
    }

    /// Reads the map of the slots' replicas from a node, and from another or two if its
    /// map lacks a slot's replica; keeps it if one was read.
    async fn read_map(&self, connection: &mut ClusterConnection) {
        let asked = Instant::now();
        let _reading = self.reading_map.lock().await;
        let read_meanwhile = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|(_, read)| *read >= asked);
        if read_meanwhile {
            return;
        }
        let mut map: Option<SlotReplicas> = None;
        for _ in 0..SOURCES {
            let Some(nodes) = topology::ask_a_node(connection).await else {
                continue;
            };
            let read = SlotReplicas::of_nodes(&nodes);
            match &mut map {
                Some(map) => map.merge(read),
                None => map = Some(read),
            }
            if map.as_ref().is_some_and(SlotReplicas::complete) {
                break;
            }
        }
        if let Some(map) = map {
            *self.map.lock().unwrap_or_else(PoisonError::into_inner) = Some((map, Instant::now()));
        }
    }

    /// A replica of `slot` to send a read to (in turn, when it has several), reading the
    /// map first if there is none, or if it names none for `slot` and is old enough.
    async fn replica_of(&self, slot: u16, connection: &mut ClusterConnection) -> Option<Address> {
        let pick = |map: &SlotReplicas| {
            let replicas = map.of(slot);
            (!replicas.is_empty())
                .then(|| replicas[self.turn.fetch_add(1, Relaxed) % replicas.len()].clone())
        };
        let stale = {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            match &*map {
                Some((map, _)) if !map.of(slot).is_empty() => return pick(map),
                Some((_, read)) => read.elapsed() >= REREAD_AFTER,
                None => true,
            }
        };
        if !stale {
            return None;
        }
        self.read_map(connection).await;
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.as_ref().and_then(|(map, _)| pick(map))
    }

    /// After a replica could not serve a read: reads the map again if it is old enough
    /// (the replica may have become the master, or left), and answers whether it did.
    /// Old enough is [`REPLICA_PATIENCE`], the time a try that went unanswered took: a
    /// map read just before it (the read found no replica for its slot in the one it had)
    /// is read again once, where [`REREAD_AFTER`] had the read give up, and miss at its
    /// deadline, when the replica that map named was the stalled new master. Tries that
    /// fail at once do not read it more than twenty times a second.
    async fn reread_map(&self, connection: &mut ClusterConnection) -> bool {
        let old = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(|(_, read)| read.elapsed() >= REPLICA_PATIENCE);
        if old {
            self.read_map(connection).await;
        }
        old
    }

    /// `cmd`'s reply from a replica, if `cmd` is a read that failed on the master's
    /// connection as unavailable (`err`) and a replica answers; `None` otherwise.
    pub(super) async fn command(self: &Arc<Self>, cmd: &Cmd, err: &RedisError) -> Option<Value> {
        if !CommandInfo::of_cmd(cmd).is_read_only() || !for_a_replica(err) {
            return None;
        }
        self.read_on_a_replica(cmd).await
    }

    /// `main`'s reply to `cmd`, a read, unless the master is slow to give it: after
    /// [`HEDGE_AFTER`] a replica is asked too, and the first answer wins (a replica's
    /// only if it could answer). A master that stalls (a long command, a fork, a slow
    /// disk, a paused process) would otherwise have its reads wait out their deadline,
    /// and miss, until the cluster fails it over.
    pub(super) async fn hedged(
        self: &Arc<Self>,
        cmd: &Cmd,
        main: impl Future<Output = RedisResult<Value>>,
    ) -> RedisResult<Value> {
        let mut main = std::pin::pin!(main);
        tokio::select! {
            biased;
            reply = &mut main => return reply,
            () = tokio::time::sleep(HEDGE_AFTER) => {}
        }
        let replica = std::pin::pin!(self.read_on_a_replica(cmd));
        tokio::select! {
            biased;
            reply = &mut main => reply,
            Some(reply) = replica => {
                tracing::debug!("redis cluster: a read the master was slow to answer was served by a replica");
                Ok(reply)
            }
        }
    }

    /// `cmd`'s reply from a replica of its key's slot, if one answers.
    async fn read_on_a_replica(self: &Arc<Self>, cmd: &Cmd) -> Option<Value> {
        let mut connection = self.connection().await?;
        let Some(key) = key_of(cmd) else {
            // A read of no key: wherever redis-rs sends it.
            let reply = redis::aio::ConnectionLike::req_packed_command(&mut connection, cmd).await;
            return self.count(answered(reply));
        };
        let slot = slot_of(key);
        for first in [true, false] {
            let (host, port) = self.replica_of(slot, &mut connection).await?;
            let to = Node::new(host, port);
            let read = follow_command(&mut connection, &self.unlisted, &to, cmd);
            match patiently(read).await {
                Ok(reply) => return self.count(answered(Ok(reply))),
                Err(error) => {
                    tracing::debug!(%error, "redis cluster: a replica could not serve a read the master could not either");
                    if !(first && self.reread_map(&mut connection).await) {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// The same for a plain pipeline of reads, sent to a replica of its first key's slot.
    pub(super) async fn commands(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
        err: &RedisError,
    ) -> Option<Vec<Value>> {
        if !CommandInfo::of_pipeline(pipeline).is_read_only() || !for_a_replica(err) {
            return None;
        }
        let mut connection = self.connection().await?;
        let Some(slot) = slot_of_pipeline(pipeline) else {
            let replies = redis::aio::ConnectionLike::req_packed_commands(
                &mut connection,
                pipeline,
                offset,
                count,
            )
            .await;
            return answered(replies);
        };
        for first in [true, false] {
            let (host, port) = self.replica_of(slot, &mut connection).await?;
            let to = Node::new(host, port);
            let reads = follow(
                &mut connection,
                &self.unlisted,
                &to,
                pipeline.clone(),
                offset,
                count,
            );
            match patiently(reads).await {
                Ok(replies) => return answered(Ok(replies)),
                Err(error) => {
                    tracing::debug!(%error, "redis cluster: a replica could not serve reads the master could not either");
                    if !(first && self.reread_map(&mut connection).await) {
                        return None;
                    }
                }
            }
        }
        None
    }
}

impl ReplicaReads {
    fn count<T>(&self, served: Option<T>) -> Option<T> {
        if served.is_some() {
            self.served.fetch_add(1, Relaxed);
        }
        served
    }
}

/// `read`'s reply, or an error if the replica gives none within [`REPLICA_PATIENCE`].
async fn patiently<T>(read: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(REPLICA_PATIENCE, read)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from((
                redis::ErrorKind::Io,
                "the replica did not answer in time",
            )))
        })
}

/// Whether a read that failed so may be served by a replica: the master could not serve
/// it (its node's connection lost, no master for the slot, `MOVED` to a master that is
/// gone...), as opposed to an error of the read's own.
fn for_a_replica(err: &RedisError) -> bool {
    Error::from_request(err.clone()).is_unavailable()
}

/// A replica's answer, or `None` if it could not give one.
fn answered<T>(reply: RedisResult<T>) -> Option<T> {
    match reply {
        Ok(reply) => {
            tracing::debug!(
                "redis cluster: a read the master could not serve was served by a replica"
            );
            Some(reply)
        }
        Err(error) => {
            tracing::debug!(%error, "redis cluster: a replica could not serve a read the master could not either");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn slots_are_redis_rs_s() {
        let keys = [
            "",
            "a",
            "foo",
            "{user1000}.following",
            "{}x",
            "x{}",
            "a{b}c{d}",
            "{{a}}",
        ];
        let many = (0..2000).map(|n| format!("key:{n}"));
        for key in keys.into_iter().map(str::to_owned).chain(many) {
            let ours = Slot::new(slot_of(key.as_bytes()));
            assert_eq!(ours, Some(Slot::for_key(&key)), "{key:?}");
        }
        // Redis's own examples.
        assert_eq!(slot_of(b"foo"), 12182);
        // CRC16-XMODEM's check value, below 16384.
        assert_eq!(slot_of(b"123456789"), 0x31C3);
    }

    #[test]
    fn reads_are_routed_by_the_key_redis_routes_them_by() {
        let key = |args: &[&str]| {
            let mut cmd = redis::cmd(args[0]);
            for arg in &args[1..] {
                cmd.arg(*arg);
            }
            key_of(&cmd).map(|k| String::from_utf8(k.to_vec()).unwrap())
        };
        assert_eq!(key(&["GET", "k"]).as_deref(), Some("k"));
        assert_eq!(key(&["MGET", "a", "b"]).as_deref(), Some("a"));
        assert_eq!(
            key(&["EVALSHA_RO", "sha", "1", "k", "arg"]).as_deref(),
            Some("k")
        );
        assert_eq!(key(&["EVAL_RO", "script", "0", "arg"]), None);
        assert_eq!(
            key(&["EVAL", "script", "2", "k", "k2", "arg"]).as_deref(),
            Some("k")
        );
        assert_eq!(key(&["SET", "k", "v"]).as_deref(), Some("k"));
        assert_eq!(
            key(&["XREAD", "COUNT", "2", "STREAMS", "s", "0"]).as_deref(),
            Some("s")
        );
        assert_eq!(key(&["OBJECT", "ENCODING", "k"]).as_deref(), Some("k"));
        assert_eq!(key(&["DBSIZE"]), None);
    }

    #[test]
    fn the_map_gives_each_masters_ranges_its_usable_replicas_and_merges_views() {
        let view = |lines: &[&str]| Value::BulkString(lines.join("\n").into_bytes());
        let first = view(&[
            "m1 127.0.0.1:7000@17000 master - 0 0 1 connected 0-5460 [5461->-m2]",
            "m2 127.0.0.1:7001@17001,redis-1 myself,master - 0 0 2 connected 5461-10921",
            "m3 127.0.0.1:7002@17002 master - 0 0 3 connected 10922-16383",
            "r1 127.0.0.1:7003@17003 slave m1 0 0 1 connected",
            "r1b 127.0.0.1:7006@17006 slave,fail m1 0 0 1 disconnected",
            "r2 :0@0 slave,noaddr m2 0 0 2 disconnected",
        ]);
        let mut map = SlotReplicas::of_nodes(&topology::parse(&first).unwrap());
        let at = |port| [("127.0.0.1".to_owned(), port)];
        assert_eq!(map.of(100), at(7003), "a failed one left out");
        assert!(map.of(6000).is_empty(), "no address");
        assert!(map.of(16383).is_empty(), "none");
        assert!(!map.complete());
        let second = view(&[
            "m2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10921",
            "m3 127.0.0.1:7002@17002 master - 0 0 3 connected 10922-16383",
            "r3 127.0.0.1:7005@17005 slave m3 0 0 3 connected",
            "r2 127.0.0.1:7004@17004 slave m2 0 0 2 connected",
        ]);
        map.merge(SlotReplicas::of_nodes(&topology::parse(&second).unwrap()));
        assert_eq!(map.of(16383), at(7005));
        assert_eq!(map.of(5461), at(7004));
        assert!(map.complete());
        assert_eq!(
            topology::address("127.0.0.1:7001@17001,redis-1"),
            Some(at(7001)[0].clone())
        );
        assert_eq!(topology::address(":0@0"), None);
    }
}
