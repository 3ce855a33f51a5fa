//! A Redis Cluster of test servers, built with plain commands (no `redis-cli`): slots spread
//! evenly over the masters, every node introduced to the first, replicas attached.

use std::time::{Duration, Instant};

use std::{
    io::{BufReader, Write},
    net::TcpStream,
};

use super::{RedisServer, TempDir, free_port, read_reply, write_command};

/// The 16384 hash slots of Redis Cluster.
const SLOTS: usize = 16384;

/// Masters and replicas of one cluster; dropped, they all stop.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    pub replicas: Vec<RedisServer>,
    /// Masters that joined later, serving no slot until some migrate to them.
    pub joined: Vec<RedisServer>,
    /// The CA and certificate every node of a TLS cluster serves.
    certificates: Option<TempDir>,
    /// Every node keeps every write in its append-only file, fsynced before it answers.
    durable: bool,
}

impl RedisCluster {
    /// `masters` masters, each with `replicas` replicas, the cluster state `ok` on every
    /// node. Nodes deem an unreachable peer failed after 500 ms; without full coverage the
    /// cluster still serves the slots of the masters that are up.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, None, false)
    }

    /// [`start`](Self::start), every node writing every write to its append-only file
    /// and fsyncing it before it answers, so a node killed and restarted keeps every
    /// write it acknowledged.
    pub fn start_durable(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, None, true)
    }

    /// [`start`](Self::start), every node serving clients, its replicas and the cluster
    /// bus over TLS with certificates of one CA ([`ca_certificate`](Self::ca_certificate)),
    /// so `CLUSTER SLOTS` names TLS ports to TLS clients. Each node also serves plain
    /// TCP on a port of its own, for the harness's commands.
    pub fn start_tls(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, Some(super::certificates()), false)
    }

    fn start_with(
        masters: usize,
        replicas: usize,
        certificates: Option<TempDir>,
        durable: bool,
    ) -> RedisCluster {
        let mut cluster = RedisCluster {
            masters: Vec::new(),
            replicas: Vec::new(),
            joined: Vec::new(),
            certificates,
            durable,
        };
        cluster.masters = (0..masters)
            .map(|_| cluster_node(cluster.node_config()))
            .collect();
        cluster.replicas = (0..masters * replicas)
            .map(|_| cluster_node(cluster.node_config()))
            .collect();
        for (i, master) in cluster.masters.iter().enumerate() {
            let slots: Vec<String> = (i * SLOTS / masters..(i + 1) * SLOTS / masters)
                .map(|slot| slot.to_string())
                .collect();
            let mut args = vec!["CLUSTER", "ADDSLOTS"];
            args.extend(slots.iter().map(String::as_str));
            assert_eq!(master.raw_command(&args), "OK");
        }
        let first = &cluster.masters[0];
        for other in cluster.nodes().skip(1) {
            let port = other.port().to_string();
            let bus = other.raw_command(&["CONFIG", "GET", "cluster-port"]);
            let bus = bus.lines().nth(1).expect("the cluster-port setting");
            let met = first.raw_command(&["CLUSTER", "MEET", "127.0.0.1", &port, bus]);
            assert_eq!(met, "OK");
        }
        cluster.wait_for(|node| {
            node.raw_command(&["CLUSTER", "NODES"]).lines().count() == cluster.len()
        });
        for (i, replica) in cluster.replicas.iter().enumerate() {
            let master = &cluster.masters[i % masters];
            let id = master.raw_command(&["CLUSTER", "MYID"]);
            // The replica must know the master first: gossip brings it within a moment.
            let started = Instant::now();
            loop {
                let reply = replica.raw_command(&["CLUSTER", "REPLICATE", &id]);
                if reply == "OK" {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "CLUSTER REPLICATE: {reply}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster.wait_for(|node| {
            node.raw_command(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
        });
        for replica in &cluster.replicas {
            cluster.wait_for(|_| replica.info_field("master_link_status") == "up");
        }
        cluster
    }

    /// How a node of this cluster is configured before it is made a cluster node: over
    /// TLS for a TLS cluster, with an fsynced append-only file for a durable one.
    fn node_config(&self) -> super::ServerConfig {
        let config = match &self.certificates {
            Some(dir) => RedisServer::config()
                .tls_beside_plain(dir.path())
                .arg("tls-cluster", "yes")
                .arg("tls-replication", "yes"),
            None => RedisServer::config(),
        };
        if self.durable {
            config.arg("appendonly", "yes").arg("appendfsync", "always")
        } else {
            config
        }
    }

    /// The PEM of the CA of a [TLS cluster](Self::start_tls).
    pub fn ca_certificate(&self) -> Vec<u8> {
        let dir = self.certificates.as_ref().expect("a TLS cluster");
        std::fs::read(dir.path().join("ca.crt")).expect("the CA certificate")
    }

    /// Every node, masters first, those that joined later last.
    pub fn nodes(&self) -> impl Iterator<Item = &RedisServer> {
        self.masters
            .iter()
            .chain(&self.replicas)
            .chain(&self.joined)
    }

    fn len(&self) -> usize {
        self.masters.len() + self.replicas.len() + self.joined.len()
    }

    /// Starts a node, introduces it to the cluster and waits until every node knows it:
    /// a master that serves no slot, as an operator adds one before moving slots to it.
    /// Returns it, in [`joined`](Self::joined).
    pub fn join_new_master(&mut self) -> &RedisServer {
        let node = cluster_node(self.node_config());
        let bus = node.raw_command(&["CONFIG", "GET", "cluster-port"]);
        let bus = bus
            .lines()
            .nth(1)
            .expect("the cluster-port setting")
            .to_owned();
        let port = node.port().to_string();
        let met = self.masters[0].raw_command(&["CLUSTER", "MEET", "127.0.0.1", &port, &bus]);
        assert_eq!(met, "OK");
        self.joined.push(node);
        self.wait_for(|node| {
            node.raw_command(&["CLUSTER", "NODES"]).lines().count() == self.len()
                && node
                    .raw_command(&["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
        });
        self.joined.last().expect("just joined")
    }

    /// Begins moving `key`'s slot from the master `from` serves it on to `to`, and
    /// moves `key` (only): the slot is `MIGRATING` on the one and `IMPORTING` on the
    /// other, as a resharding leaves it while it moves the slot's keys one batch at a
    /// time. Until [`finish_migration`](Self::finish_migration), `from` redirects
    /// commands on `key` (and on keys of the slot it does not hold) with `ASK`.
    pub fn begin_migration(&self, key: &str, from: &RedisServer, to: &RedisServer) {
        mark_migrating(key, from, to);
        move_keys(&[key], from, to);
    }

    /// Ends the migration [`begin_migration`](Self::begin_migration) began, moving the
    /// slot's other keys first: `to` serves the slot, and `from` redirects it with
    /// `MOVED`.
    pub fn finish_migration(&self, key: &str, from: &RedisServer, to: &RedisServer) {
        let slot = from.raw_command(&["CLUSTER", "KEYSLOT", key]);
        while move_batch(&slot, 100, from, to) {}
        self.assign(&slot, to);
    }

    /// Moves `key`'s slot from `from` to `to` as `redis-cli --cluster reshard` does: marks
    /// it migrating, moves its keys `batch` at a time with a `pause` after each batch, and
    /// tells every node that `to` serves it. Blocks until it has.
    pub fn reshard(
        &self,
        key: &str,
        from: &RedisServer,
        to: &RedisServer,
        batch: usize,
        pause: Duration,
    ) {
        let slot = mark_migrating(key, from, to);
        while move_batch(&slot, batch, from, to) {
            std::thread::sleep(pause);
        }
        self.assign(&slot, to);
    }

    /// Tells every node that `to` serves `slot`, `to` first.
    fn assign(&self, slot: &str, to: &RedisServer) {
        let to_id = to.raw_command(&["CLUSTER", "MYID"]);
        let set = to.raw_command(&["CLUSTER", "SETSLOT", slot, "NODE", &to_id]);
        assert_eq!(set, "OK");
        for node in self.nodes() {
            node.raw_command(&["CLUSTER", "SETSLOT", slot, "NODE", &to_id]);
        }
    }

    /// `redis://` URLs of every node, for a client's list of initial nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes().map(RedisServer::url).collect()
    }

    /// Blocks until every node's `CLUSTER SLOTS` names every replica. A node leaves out a
    /// replica until it has heard (by gossip) that the replica's replication offset is
    /// above 0, so until some write has reached it: call this after one.
    pub fn wait_for_every_node_to_name_the_replicas(&self) {
        let replicas: Vec<String> = self
            .nodes()
            .filter(|node| node.raw_command(&["ROLE"]).starts_with("slave"))
            .map(|node| node.port().to_string())
            .collect();
        self.wait_for(|node| {
            let slots = node.raw_command(&["CLUSTER", "SLOTS"]);
            replicas
                .iter()
                .all(|port| slots.lines().any(|line| line == port))
        });
    }

    /// Blocks until `check` holds on every node (10 s at most).
    pub fn wait_for(&self, check: impl Fn(&RedisServer) -> bool) {
        let started = Instant::now();
        while !self.nodes().all(&check) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the cluster did not settle"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Which of `masters` served `key`'s slot when the cluster started (its replicas are
    /// `replicas[i]`, `replicas[i + masters]`...).
    pub fn master_index_of(&self, key: &str) -> usize {
        let slot: usize = self.masters[0]
            .raw_command(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        let masters = self.masters.len();
        (0..masters)
            .find(|i| slot < (i + 1) * SLOTS / masters)
            .unwrap()
    }
}

/// What `node` answers `args` with after `ASKING`, as a client an `ASK` redirected to it
/// asks: for a key of a slot it imports, which it redirects otherwise. Plain TCP, no
/// password (a TLS node's plain port).
pub fn asking(node: &RedisServer, args: &[&str]) -> String {
    let port = node.plain_port.unwrap_or(node.port());
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut request = Vec::new();
    write_command(&mut request, &["ASKING"]);
    write_command(&mut request, args);
    stream.write_all(&request).unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_reply(&mut reader), "OK", "ASKING");
    read_reply(&mut reader)
}

/// Marks `key`'s slot `IMPORTING` on `to` and `MIGRATING` on `from`; returns the slot.
fn mark_migrating(key: &str, from: &RedisServer, to: &RedisServer) -> String {
    let slot = from.raw_command(&["CLUSTER", "KEYSLOT", key]);
    let from_id = from.raw_command(&["CLUSTER", "MYID"]);
    let to_id = to.raw_command(&["CLUSTER", "MYID"]);
    let importing = to.raw_command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
    assert_eq!(importing, "OK");
    let migrating = from.raw_command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
    assert_eq!(migrating, "OK");
    slot
}

/// Moves up to `batch` of `slot`'s keys from `from` to `to`; false when none was left.
fn move_batch(slot: &str, batch: usize, from: &RedisServer, to: &RedisServer) -> bool {
    let keys = from.raw_command(&["CLUSTER", "GETKEYSINSLOT", slot, &batch.to_string()]);
    let keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
    if !keys.is_empty() {
        move_keys(&keys, from, to);
    }
    !keys.is_empty()
}

/// `MIGRATE`s `keys` from `from` to `to`.
fn move_keys(keys: &[&str], from: &RedisServer, to: &RedisServer) {
    let port = to.port().to_string();
    let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
    args.extend(keys);
    assert_eq!(from.raw_command(&args), "OK");
}

/// A cluster-enabled node. Nodes deem an unreachable peer failed after 500 ms.
fn cluster_node(config: super::ServerConfig) -> RedisServer {
    config
        .arg("cluster-enabled", "yes")
        .arg("cluster-config-file", "nodes.conf")
        .arg("cluster-node-timeout", "500")
        // A failed master costs only its own slots (by default Redis refuses every key,
        // CLUSTERDOWN, once a master fails with no replica to take over).
        .arg("cluster-require-full-coverage", "no")
        // The bus port of its own: port + 10000 may be past 65535 or taken.
        .arg("cluster-port", &free_port().to_string())
        .start()
}
