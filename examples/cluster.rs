//! Redis Cluster through the default stack: `INCR`s on keys all over the slots while a
//! replica takes over from its master, then the count on the cluster against the `INCR`s
//! acknowledged.
//!
//! `cargo run --example cluster --features cluster` starts a throwaway cluster of three
//! masters, each with a replica, on free loopback ports (`redis-server` must be installed).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::RedisCluster;
use tower_redis_resilience::{Connector, Error, ResilientClient};

const KEYS: usize = 12;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = RedisCluster::start(3, 1);
    println!("a cluster of 3 masters and 3 replicas is up");
    let connector = Connector::cluster(cluster.urls())?;
    let mut client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await?;
    let keys: Vec<String> = (0..KEYS).map(|n| format!("counter:{n}")).collect();

    let started = Instant::now();
    let (mut acknowledged, mut refused, mut ambiguous) = (0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    for round in 0..100 {
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
