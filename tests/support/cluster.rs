//! A Redis Cluster of test servers, built with plain commands (no `redis-cli`): slots spread
//! evenly over the masters, every node introduced to the first, replicas attached.

use std::time::{Duration, Instant};

use super::{RedisServer, TempDir, free_port};

/// The 16384 hash slots of Redis Cluster.
const SLOTS: usize = 16384;

/// Masters and replicas of one cluster; dropped, they all stop.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    pub replicas: Vec<RedisServer>,
    /// The CA and certificate every node of a TLS cluster serves.
    certificates: Option<TempDir>,
}

impl RedisCluster {
    /// `masters` masters, each with `replicas` replicas, the cluster state `ok` on every
    /// node. Nodes deem an unreachable peer failed after 500 ms; without full coverage the
    /// cluster still serves the slots of the masters that are up.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, None)
    }

    /// [`start`](Self::start), every node serving clients, its replicas and the cluster
    /// bus over TLS with certificates of one CA ([`ca_certificate`](Self::ca_certificate)),
    /// so `CLUSTER SLOTS` names TLS ports to TLS clients. Each node also serves plain
    /// TCP on a port of its own, for the harness's commands.
    pub fn start_tls(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, Some(super::certificates()))
    }

    fn start_with(masters: usize, replicas: usize, certificates: Option<TempDir>) -> RedisCluster {
        let node = || {
            let config = match &certificates {
                Some(dir) => RedisServer::config()
                    .tls_beside_plain(dir.path())
                    .arg("tls-cluster", "yes")
                    .arg("tls-replication", "yes"),
                None => RedisServer::config(),
            };
            config
                .arg("cluster-enabled", "yes")
                .arg("cluster-config-file", "nodes.conf")
                .arg("cluster-node-timeout", "500")
                // A failed master costs only its own slots (by default Redis refuses every
                // key, CLUSTERDOWN, once a master fails with no replica to take over).
                .arg("cluster-require-full-coverage", "no")
                // The bus port of its own: port + 10000 may be past 65535 or taken.
                .arg("cluster-port", &free_port().to_string())
                .start()
        };
        let cluster = RedisCluster {
            masters: (0..masters).map(|_| node()).collect(),
            replicas: (0..masters * replicas).map(|_| node()).collect(),
            certificates,
        };
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

    /// The PEM of the CA of a [TLS cluster](Self::start_tls).
    pub fn ca_certificate(&self) -> Vec<u8> {
        let dir = self.certificates.as_ref().expect("a TLS cluster");
        std::fs::read(dir.path().join("ca.crt")).expect("the CA certificate")
    }

    /// Every node, masters first.
    pub fn nodes(&self) -> impl Iterator<Item = &RedisServer> {
        self.masters.iter().chain(&self.replicas)
    }

    fn len(&self) -> usize {
        self.masters.len() + self.replicas.len()
    }

    /// `redis://` URLs of every node, for a client's list of initial nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes().map(RedisServer::url).collect()
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
