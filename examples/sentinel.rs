//! Redis Sentinel: the client asks Sentinel where the master is, and follows a failover.
//!
//! `cargo run --example sentinel` starts a throwaway master, replica and Sentinel on free
//! loopback ports (`redis-server` must be installed), counts with `INCR` every 2 ms
//! through the default stack, and after a second asks Sentinel to fail the master over.
//! A line every 250 ms says which server the client's connection leads to and how the
//! calls went; the summary compares the INCRs acknowledged with the count on the new
//! master.
//!
//! The master runs with `min-replicas-to-write 1`: between the replica's promotion and
//! Sentinel's announcement of it, the old master refuses writes (`NOREPLICAS`, which the
//! client reports as not run) instead of acknowledging writes the failover discards.
//! `MIN_REPLICAS_TO_WRITE=0 cargo run --example sentinel` shows those writes lost.
//!
//! With `REDIS_SENTINELS` (comma-separated URLs) and `REDIS_MASTER_NAME` set, it uses
//! your Sentinels instead and injects no failover: run one yourself
//! (`SENTINEL FAILOVER <name>`) and watch the client follow.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use redis::AsyncCommands;
use support::RedisServer;
use tower_redis_resilience::{Connector, ResilientClient};

const NAME: &str = "demo-master";

/// The servers the example runs itself.
struct Lab {
    master: RedisServer,
    replica: RedisServer,
    sentinel: RedisServer,
}

#[derive(Default)]
struct Counts {
    acknowledged: AtomicU64,
    failed: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (sentinels, name, lab) = match std::env::var("REDIS_SENTINELS") {
        Ok(urls) => {
            let name = std::env::var("REDIS_MASTER_NAME").unwrap_or_else(|_| "mymaster".into());
            let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
            (urls, name, None)
        }
        Err(_) => {
            let lab = tokio::task::spawn_blocking(start_lab).await?;
            (vec![lab.sentinel.url()], NAME.to_owned(), Some(lab))
        }
    };
    let connector = Connector::sentinel(sentinels, &name, format!("redis://{name}"))?;
    println!("connecting through {}", connector.address());
    let client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await?;
    let mut setup = client.clone();
    let () = setup.del("demo:count").await?;

    let counts = Arc::new(Counts::default());
    let writer = tokio::spawn(count(client.clone(), counts.clone()));

    let started = Instant::now();
    let run_for = if lab.is_some() { 4 } else { 30 };
    let mut failed_over = false;
    let mut last = (0, 0);
    println!(
        "\n{:>6}  {:<22} {:>6} {:>6}",
        "t", "writes go to", "ok", "failed"
    );
    while started.elapsed() < Duration::from_secs(run_for) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(lab) = &lab
            && !failed_over
            && started.elapsed() >= Duration::from_secs(1)
        {
            failed_over = true;
            let at = lab.sentinel.url();
            lab.sentinel.fail_over(NAME);
            println!("        -- SENTINEL FAILOVER {NAME} (asked at {at})");
        }
        let ok = counts.acknowledged.load(Relaxed);
        let failed = counts.failed.load(Relaxed);
        println!(
            "{:>5.2}s  {:<22} {:>6} {:>6}",
            started.elapsed().as_secs_f64(),
            serving(&client).await,
            ok - last.0,
            failed - last.1
        );
        last = (ok, failed);
    }
    writer.abort();

    let acknowledged = counts.acknowledged.load(Relaxed);
    let failed = counts.failed.load(Relaxed);
    println!("\n{acknowledged} INCRs acknowledged, {failed} failed");
    if let Some(lab) = lab {
        let on_new: u64 = lab.replica.raw_command(&["GET", "demo:count"]).parse()?;
        let old_role = lab.master.raw_command(&["ROLE"]);
        println!(
            "the counter on the new master: {on_new}; the old master is still a {} (Sentinel \
             demotes it ~10 s after the failover)",
            old_role.lines().next().unwrap_or("?")
        );
        if on_new == acknowledged {
            println!(
                "every acknowledged INCR is there, once. The failed ones did not run: the old \
                 master refused them (NOREPLICAS)\nonce the failover took its replica, until \
                 Sentinel announced the new master; reads went on meanwhile."
            );
        } else {
            println!(
                "{} acknowledged INCRs are missing: the old master took them after the replica \
                 was promoted and before\nSentinel announced it; the failover discards them \
                 (replication is asynchronous). `min-replicas-to-write 1` on\nthe master \
                 makes it refuse them instead.",
                acknowledged.saturating_sub(on_new)
            );
        }
    }
    Ok(())
}

/// A master, its replica, and a Sentinel that knows both.
fn start_lab() -> Lab {
    // A master that takes no write it cannot pass to a replica: once the replica is
    // promoted (it leaves the master at once), the old master answers NOREPLICAS instead
    // of acknowledging writes that the failover will discard.
    let min_replicas = std::env::var("MIN_REPLICAS_TO_WRITE").unwrap_or_else(|_| "1".into());
    let master = RedisServer::config()
        .arg("min-replicas-to-write", &min_replicas)
        .arg("min-replicas-max-lag", "10")
        .start();
    let replica = RedisServer::start();
    replica.replicate(&master);
    // Until the replica first acknowledges (within a second), the master counts it as no
    // good replica and streams it none of its writes.
    replica.catch_up(&master);
    let sentinel = RedisServer::sentinel_of(&master, NAME);
    let port = replica.port().to_string();
    // Sentinel learns of replicas from the master's INFO; without one it cannot fail over.
    let started = Instant::now();
    while !sentinel
        .raw_command(&["SENTINEL", "REPLICAS", NAME])
        .contains(&port)
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "Sentinel never saw the replica"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Lab {
        master,
        replica,
        sentinel,
    }
}

/// `INCR demo:count` every 2 ms, one at a time.
async fn count(mut client: ResilientClient, counts: Arc<Counts>) {
    loop {
        match client.incr::<_, _, u64>("demo:count", 1).await {
            Ok(_) => counts.acknowledged.fetch_add(1, Relaxed),
            Err(_) => counts.failed.fetch_add(1, Relaxed),
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The server the client's connection leads to, as it describes itself.
async fn serving(client: &ResilientClient) -> String {
    let mut client = client.clone();
    let info: Result<String, _> = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut client)
        .await;
    let role: Result<Vec<redis::Value>, _> = redis::cmd("ROLE").query_async(&mut client).await;
    let port = info
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("tcp_port:").map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    let role = match role.ok().as_deref() {
        Some([redis::Value::BulkString(role), ..]) => String::from_utf8_lossy(role).into_owned(),
        _ => "?".into(),
    };
    format!("127.0.0.1:{port} ({role})")
}
