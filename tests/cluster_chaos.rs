//! The default client on a Redis Cluster (3 masters, a replica each, every write fsynced)
//! with replica reads on, while 8 callers `INCR`, run transactions and read, and the
//! cluster goes through a seeded random sequence of faults: masters killed and restarted
//! at once, masters paused, slots resharded, coordinated failovers, replicas killed,
//! masters stalled until the cluster has failed them over and a while longer.
//! Every call answers within its deadline, every reply is the value or a miss, every
//! count adds up, reads miss (but for a handful) only while their master holds writes for
//! a failover, and every call is served from 2 s after the last fault.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use support::{RedisCluster, RedisServer};
use tower_redis_resilience::{Connector, Error, ResilientClient};

/// Keys of each kind, spread over the slots.
const KEYS: usize = 24;
const DEADLINE: Duration = Duration::from_millis(250);
/// For a debug build on 2 cores, with the harness's own processes.
const GRACE: Duration = Duration::from_millis(150);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGKILL a master and start it again at once: it answers `CLUSTERDOWN` while it
    /// rejoins (no failover: that takes `cluster-node-timeout`, 500 ms here).
    RestartMaster,
    /// SIGSTOP a master for 300 ms (below the node timeout).
    PauseMaster,
    /// Move a counter's slot to another master, 10 keys at a time.
    Reshard,
    /// `CLUSTER FAILOVER` on a master's replica.
    Failover,
    /// SIGKILL a replica, start it again after a while.
    KillReplica,
    /// SIGSTOP a master until the cluster has failed it over, and a while longer: it
    /// answers nothing, so no `MOVED` tells redis-rs.
    StallPastFailover,
}

/// What the callers saw.
#[derive(Default)]
struct Seen {
    /// Per key: (acknowledged, may have run).
    incrs: Mutex<HashMap<String, (u64, u64)>>,
    transactions: Mutex<HashMap<String, (u64, u64)>>,
    /// Per fault (and the calm after the last): reads that missed.
    misses: Mutex<Vec<u64>>,
    phase: AtomicUsize,
    late: Mutex<Vec<(String, Duration)>>,
    wrong: Mutex<Vec<String>>,
    failed_after: Mutex<Vec<String>>,
    settled: AtomicBool,
}

/// Each fault once in a shuffled order, then three more at random: `seed` picks them,
/// the nodes and the pauses.
struct Plan(u64);

impl Plan {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }

    fn faults(&mut self) -> Vec<Fault> {
        use Fault::*;
        let kinds = [
            RestartMaster,
            PauseMaster,
            Reshard,
            Failover,
            KillReplica,
            StallPastFailover,
        ];
        let mut faults = kinds.to_vec();
        for i in (1..faults.len()).rev() {
            faults.swap(i, self.next(i as u64 + 1) as usize);
        }
        for _ in 0..3 {
            faults.push(kinds[self.next(kinds.len() as u64) as usize]);
        }
        faults
    }
}

fn nodes(cluster: &RedisCluster) -> Vec<&RedisServer> {
    cluster.masters.iter().chain(&cluster.replicas).collect()
}

fn node_mut(cluster: &mut RedisCluster, index: usize) -> &mut RedisServer {
    let masters = cluster.masters.len();
    if index < masters {
        &mut cluster.masters[index]
    } else {
        &mut cluster.replicas[index - masters]
    }
}

/// The indexes (in [`nodes`]) of the nodes that are masters now.
fn masters_now(cluster: &RedisCluster) -> Vec<usize> {
    nodes(cluster)
        .iter()
        .enumerate()
        .filter(|(_, node)| node.raw_command(&["ROLE"]).starts_with("master"))
        .map(|(index, _)| index)
        .collect()
}

/// A node as another sees it: `(port, id, master id if a replica, slot ranges)`.
type NodeView = (u16, String, Option<String>, Vec<(u32, u32)>);

/// Every node, as `node` sees them.
fn view(node: &RedisServer) -> Vec<NodeView> {
    node.raw_command(&["CLUSTER", "NODES"])
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields[1].split('@').next().unwrap();
            let port = address.rsplit(':').next().unwrap().parse().unwrap();
            let master = fields[2].contains("slave").then(|| fields[3].to_owned());
            let ranges = fields[8..]
                .iter()
                .filter(|range| !range.starts_with('['))
                .map(|range| match range.split_once('-') {
                    Some((first, last)) => (first.parse().unwrap(), last.parse().unwrap()),
                    None => (range.parse().unwrap(), range.parse().unwrap()),
                })
                .collect();
            (port, fields[0].to_owned(), master, ranges)
        })
        .collect()
}

/// A replica of the master `master` (in [`nodes`]), as that master sees them. Replica
/// migration (or a moment after a restart) can leave a master without one.
fn replica_of(cluster: &RedisCluster, master: usize) -> Option<usize> {
    let all = nodes(cluster);
    let seen = view(all[master]);
    let id = &seen.iter().find(|n| n.0 == all[master].port())?.1;
    seen.iter()
        .find(|n| n.2.as_ref() == Some(id))
        .map(|n| index_of(cluster, n.0))
}

fn index_of(cluster: &RedisCluster, port: u16) -> usize {
    nodes(cluster)
        .iter()
        .position(|node| node.port() == port)
        .unwrap()
}

/// Blocks until every node says the cluster is up, with 3 masters that take writes (a
/// coordinated failover that did not complete leaves its master holding writes until
/// Redis's manual-failover timeout, 5 s, as seen after a stall past a failover).
fn settle(cluster: &RedisCluster) {
    let started = Instant::now();
    while !(nodes(cluster).iter().all(|node| {
        node.raw_command(&["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
    }) && masters_now(cluster).len() == 3
        && masters_now(cluster)
            .into_iter()
            .all(|master| nodes(cluster)[master].takes_writes(Duration::from_millis(100))))
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the cluster did not settle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Applies `fault` to the master or replica `pick` chooses; answers what it did and
/// whether a master lost its role (a failover that was not asked for: its last
/// acknowledged writes may be lost, as Redis Cluster allows).
fn apply(cluster: &mut RedisCluster, fault: Fault, pick: u64, millis: u64) -> (String, bool) {
    let masters = masters_now(cluster);
    let master = masters[pick as usize % masters.len()];
    let done = match fault {
        Fault::RestartMaster => {
            let node = node_mut(cluster, master);
            node.kill();
            node.restart();
            std::thread::sleep(Duration::from_millis(300));
            let still = node.raw_command(&["ROLE"]).starts_with("master");
            settle(cluster);
            return (format!("restart master {master}"), !still);
        }
        Fault::PauseMaster => {
            let node = &nodes(cluster)[master];
            node.pause();
            std::thread::sleep(Duration::from_millis(300));
            node.resume();
            format!("pause master {master} 300 ms")
        }
        Fault::Reshard => {
            let key = format!("counter:{}", pick as usize % KEYS);
            let all = nodes(cluster);
            let slot: u32 = all[master]
                .raw_command(&["CLUSTER", "KEYSLOT", &key])
                .parse()
                .unwrap();
            let owner = view(all[master])
                .into_iter()
                .find(|(_, _, replica_of, ranges)| {
                    replica_of.is_none() && ranges.iter().any(|r| (r.0..=r.1).contains(&slot))
                })
                .unwrap();
            let from = index_of(cluster, owner.0);
            let to = *masters.iter().find(|&&i| i != from).unwrap();
            cluster.reshard(&key, all[from], all[to], 10, Duration::from_millis(5));
            format!("reshard {key} from {from} to {to}")
        }
        Fault::Failover => {
            let all = nodes(cluster);
            let Some(replica) = replica_of(cluster, master) else {
                return (
                    format!("no failover: master {master} has no replica"),
                    false,
                );
            };
            let started = Instant::now();
            while all[replica].info_field("master_link_status") != "up" {
                assert!(started.elapsed() < Duration::from_secs(10), "no replica");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(all[replica].raw_command(&["CLUSTER", "FAILOVER"]), "OK");
            while !all[replica].raw_command(&["ROLE"]).starts_with("master") {
                assert!(started.elapsed() < Duration::from_secs(10), "no failover");
                std::thread::sleep(Duration::from_millis(5));
            }
            format!("failover of master {master} to {replica}")
        }
        Fault::StallPastFailover => {
            let all = nodes(cluster);
            let Some(replica) = replica_of(cluster, master) else {
                return (format!("no stall: master {master} has no replica"), false);
            };
            all[master].pause();
            let started = Instant::now();
            while !all[replica].raw_command(&["ROLE"]).starts_with("master") {
                assert!(started.elapsed() < Duration::from_secs(10), "no failover");
                std::thread::sleep(Duration::from_millis(5));
            }
            let promoted = started.elapsed();
            std::thread::sleep(Duration::from_millis(millis));
            all[master].resume();
            settle(cluster);
            return (
                format!(
                    "stall master {master}: {replica} promoted after {} ms, resumed {millis} ms later",
                    promoted.as_millis()
                ),
                true,
            );
        }
        Fault::KillReplica => {
            let replicas: Vec<usize> = (0..nodes(cluster).len())
                .filter(|i| !masters.contains(i))
                .collect();
            let replica = replicas[pick as usize % replicas.len()];
            let node = node_mut(cluster, replica);
            node.kill();
            std::thread::sleep(Duration::from_millis(millis));
            node.restart();
            format!("kill replica {replica} for {millis} ms")
        }
    };
    settle(cluster);
    (done, false)
}

/// One caller: `INCR`s, transactions and reads in turn until `stop`.
async fn caller(mut client: ResilientClient, number: u64, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    for turn in number * 7.. {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let k = (turn as usize * 7 + number as usize) % KEYS;
        let started = Instant::now();
        let count = |counts: &Mutex<HashMap<String, (u64, u64)>>,
                     key: String,
                     result: Result<(), redis::RedisError>| {
            let mut counts = counts.lock().unwrap();
            let entry = counts.entry(key).or_default();
            match result {
                Ok(()) => entry.0 += 1,
                Err(err) if Error::from(err.clone()).may_have_run() => entry.1 += 1,
                Err(_) => {}
            }
        };
        let (what, served) = match turn % 4 {
            0 => {
                let key = format!("counter:{k}");
                let reply: redis::RedisResult<u64> = client.incr(&key, 1).await;
                let served = reply.is_ok();
                count(&seen.incrs, key.clone(), reply.map(drop));
                (format!("INCR {key}"), served)
            }
            1 => {
                let tag = format!("{{tx{}}}", k % 4);
                let reply: redis::RedisResult<(u64, u64)> = redis::pipe()
                    .atomic()
                    .incr(format!("{tag}:a"), 1)
                    .incr(format!("{tag}:b"), 1)
                    .query_async(&mut client)
                    .await;
                let served = reply.is_ok();
                count(&seen.transactions, tag.clone(), reply.map(drop));
                (format!("MULTI {tag}"), served)
            }
            _ => {
                let key = format!("value:{k}");
                let reply: redis::RedisResult<Option<String>> = client.get(&key).await;
                match &reply {
                    Ok(Some(value)) if value == "v" => {}
                    Ok(None) => {
                        seen.misses.lock().unwrap()[seen.phase.load(Ordering::SeqCst)] += 1;
                    }
                    other => seen.wrong.lock().unwrap().push(format!("{key}: {other:?}")),
                }
                (format!("GET {key}"), matches!(reply, Ok(Some(_))))
            }
        };
        let took = started.elapsed();
        if took > DEADLINE + GRACE {
            seen.late.lock().unwrap().push((what.clone(), took));
        }
        if !served {
            if seen.settled.load(Ordering::SeqCst) {
                seen.failed_after.lock().unwrap().push(what);
            }
            // An application backs off a little when Redis is away.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_client_keeps_its_promises_through_cluster_faults_in_turn() {
    // CI's seed, 8, has a master that a failover promoted restart: before replica reads
    // went to a replica by address, its 2,354 reads in that phase all missed in one run
    // of five (the timing decides; `tests/cluster.rs` has the test that fails every time
    // without the fix). `CHAOS_SEEDS=1,2,3` runs others.
    for seed in support::chaos_seeds(8) {
        through_the_faults(seed).await;
    }
}

async fn through_the_faults(seed: u64) {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_durable(3, 1))
        .await
        .unwrap();
    let connector = Connector::cluster(cluster.urls())
        .unwrap()
        .read_replicas(true);
    let mut client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    for k in 0..KEYS {
        let () = client.set(format!("value:{k}"), "v").await.unwrap();
    }
    let mut plan = Plan(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let faults = plan.faults();
    let seen = Arc::new(Seen {
        misses: Mutex::new(vec![0; faults.len() + 1]),
        ..Seen::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|n| tokio::spawn(caller(client.clone(), n, seen.clone(), stop.clone())))
        .collect();

    let mut cluster = cluster;
    let mut done = Vec::new();
    let mut loss_possible = false;
    for (index, fault) in faults.iter().copied().enumerate() {
        seen.phase.store(index, Ordering::SeqCst);
        let (pick, millis, calm) = (plan.next(1000), 200 + plan.next(600), plan.next(500));
        let (applied, lost);
        (cluster, applied, lost) = tokio::task::spawn_blocking(move || {
            let (applied, lost) = apply(&mut cluster, fault, pick, millis);
            std::thread::sleep(Duration::from_millis(calm));
            (cluster, applied, lost)
        })
        .await
        .unwrap();
        loss_possible |= lost;
        done.push(applied);
    }
    seen.phase.store(faults.len(), Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    seen.settled.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.expect("no caller panicked");
    }

    let misses = seen.misses.lock().unwrap().clone();
    eprintln!("seed {seed}:");
    for (i, what) in done.iter().enumerate() {
        eprintln!("  {what}: {} reads missed", misses[i]);
    }
    let late = seen.late.lock().unwrap().clone();
    assert!(late.is_empty(), "seed {seed}: past the deadline: {late:?}");
    let wrong = seen.wrong.lock().unwrap().clone();
    assert!(wrong.is_empty(), "seed {seed}: {wrong:?}");
    let failed_after = seen.failed_after.lock().unwrap().clone();
    assert!(
        failed_after.is_empty(),
        "seed {seed}: failed 2 s after the last fault: {failed_after:?}"
    );
    for (i, fault) in faults.iter().enumerate() {
        // A read queued on the shared connection behind a write that a master holds
        // during a coordinated failover may miss (seen: 0 or 80). Every other fault's
        // reads are served, by a replica if need be, but for a few in the moment a node's
        // connection breaks (seen: 0 to 2; thousands before replica reads went to a
        // replica by address). A read of a paused master is sent to its replica after
        // 100 ms (seen: 0 to 5 missed; up to 8 before replica reads used connections of
        // their own to replicas redis-rs had none to, gave up on a silent replica after
        // 50 ms, and redis-rs gave up on a silent node's reply).
        if !matches!(fault, Fault::Failover) {
            assert!(
                misses[i] <= 20,
                "seed {seed}: {} reads missed in {}",
                misses[i],
                done[i]
            );
        }
    }

    let mut bad = Vec::new();
    let incrs = seen.incrs.lock().unwrap().clone();
    for (key, (acked, maybe_run)) in incrs {
        let value: Option<u64> = client.get(&key).await.unwrap();
        let value = value.unwrap_or(0);
        if (value < acked && !loss_possible) || value > acked + maybe_run {
            bad.push(format!(
                "{key} is {value}: {acked} acknowledged, {maybe_run} may have run"
            ));
        }
    }
    let transactions = seen.transactions.lock().unwrap().clone();
    for (tag, (acked, maybe_run)) in transactions {
        let (a, b): (Option<u64>, Option<u64>) = (
            client.get(format!("{tag}:a")).await.unwrap(),
            client.get(format!("{tag}:b")).await.unwrap(),
        );
        let (a, b) = (a.unwrap_or(0), b.unwrap_or(0));
        if a != b || (a < acked && !loss_possible) || a > acked + maybe_run {
            bad.push(format!(
                "{tag}: {a} and {b}: {acked} acknowledged, {maybe_run} may have run"
            ));
        }
    }
    assert!(bad.is_empty(), "seed {seed}: counts: {bad:?}");
}
