//! Redis Cluster through the default stack: `INCR`s on keys all over the slots while a
//! replica takes over from its master, and while a slot moves to a master just added (a
//! resharding), then the count on the cluster against the `INCR`s acknowledged.
//!
//! `cargo run --example cluster --features cluster` starts a throwaway cluster of three
//! masters, each with a replica, on free loopback ports (`redis-server` must be installed).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use support::RedisCluster;
use tower_redis_resilience::{Connector, Error, ResilientClient};

const KEYS: usize = 12;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cluster = RedisCluster::start(3, 1);
    // A fourth master, serving no slot until the resharding below moves one to it.
    cluster.join_new_master();
    let cluster = Arc::new(cluster);
    println!("a cluster of 3 masters and 3 replicas is up, and a 4th master with no slot");
    let connector = Connector::cluster(cluster.urls())?;
    let mut client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await?;
    let keys: Vec<String> = (0..KEYS).map(|n| format!("counter:{n}")).collect();

    let started = Instant::now();
    let (mut acknowledged, mut refused, mut ambiguous) = (0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    let mut resharding = None;
    for round in 0..100 {
        if round == 70 {
            // The slot of a counter on the second master moves to the fourth, key by key
            // as `redis-cli --cluster reshard` moves them: while it moves, its old master
            // redirects (ASK) the keys that have gone.
            let moved = keys
                .iter()
                .find(|key| cluster.master_index_of(key) == 1)
                .expect("a counter on the second master")
                .clone();
            println!(
                "{:>5} ms  the slot of {moved} moves to the 4th master",
                started.elapsed().as_millis()
            );
            let cluster = cluster.clone();
            resharding = Some(std::thread::spawn(move || {
                let (from, to) = (&cluster.masters[1], &cluster.joined[0]);
                cluster.reshard(&moved, from, to, 1, Duration::from_millis(20));
            }));
        }
        if round == 40 {
            // The replica of the first master takes over, coordinated; the old master then
            // redirects (MOVED) its slots to it.
            println!(
                "{:>5} ms  CLUSTER FAILOVER on a replica",
                started.elapsed().as_millis()
            );
            cluster.replicas[0].raw_command(&["CLUSTER", "FAILOVER"]);
        }
        for key in &keys {
            let call = Instant::now();
            match client.incr::<_, _, u64>(key, 1).await {
                Ok(_) => acknowledged += 1,
                Err(err) if Error::from(err.clone()).may_have_run() => ambiguous += 1,
                Err(_) => refused += 1,
            }
            slowest = slowest.max(call.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    if let Some(resharding) = resharding {
        resharding.join().expect("the resharding ran");
        let held = cluster.joined[0].raw_command(&["DBSIZE"]);
        println!("the 4th master holds {held} counter(s) now");
    }
    let mut counted = 0u64;
    for key in &keys {
        counted += client.get::<_, Option<u64>>(key).await?.unwrap_or(0);
    }
    println!(
        "{} INCRs: {acknowledged} acknowledged, {refused} refused unrun, {ambiguous} may have run; \
         slowest call {slowest:?}",
        100 * KEYS
    );
    println!("the counters on the cluster add up to {counted}");
    assert!(
        counted >= acknowledged && counted <= acknowledged + ambiguous,
        "every acknowledged INCR counted once"
    );
    println!("every acknowledged INCR is there, once; none was run twice");
    Ok(())
}
