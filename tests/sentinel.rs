//! Finding and following the master through Redis Sentinel, against real `redis-server`
//! masters, replicas and Sentinels.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::{RedisServer, eventually};
use tower_redis_resilience::{Connector, Error, ResilientClient};

const MASTER: &str = "cache";

/// A master, its replica, and a Sentinel watching them, which knows the replica.
async fn replicated_pair() -> (RedisServer, RedisServer, RedisServer) {
    let master = RedisServer::start();
    let replica = RedisServer::start();
    replica.replicate(&master);
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let replica_port = replica.port().to_string();
    // Sentinel learns of replicas from the master's INFO, every ten seconds at first; a
    // failover before that has no replica to promote.
    let sentinel_view = || sentinel.raw_command(&["SENTINEL", "REPLICAS", MASTER]);
    eventually(Duration::from_secs(15), async || {
        sentinel_view().contains(&replica_port)
    })
    .await;
    (master, replica, sentinel)
}

fn connector(sentinels: &[&RedisServer]) -> Connector {
    Connector::sentinel(
        sentinels.iter().map(|sentinel| sentinel.url()),
        MASTER,
        "redis://cache/0",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_goes_to_the_master_sentinel_names() {
    let (master, replica) = (RedisServer::start(), RedisServer::start());
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let mut client = ResilientClient::builder_with_connector(connector(&[&sentinel]))
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "on the master").await.unwrap();
    assert_eq!(master.raw_command(&["GET", "k"]), "on the master");
    assert_eq!(replica.raw_command(&["GET", "k"]), "");
    assert!(client.address().contains("cache/0 via Sentinel 127.0.0.1:"));
}

#[tokio::test]
async fn a_sentinel_that_does_not_know_the_name_is_a_config_error() {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let err = Connector::sentinel([sentinel.url()], "no-such-master", "redis://x")
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(err.to_string().contains("no-such-master"), "{err}");
}

#[tokio::test]
async fn no_sentinel_reachable_is_unavailable_and_says_which_were_asked() {
    let gone = RedisServer::start();
    let url = gone.url();
    drop(gone);
    let err = Connector::sentinel([url.clone()], MASTER, "redis://x")
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    let port = url.rsplit(':').next().unwrap();
    assert!(err.to_string().contains(port), "{err}");
}

#[test]
fn a_connector_needs_a_sentinel() {
    let none: [&str; 0] = [];
    let err = Connector::sentinel(none, MASTER, "redis://x").unwrap_err();
    assert!(err.is_config(), "{err:?}");
}

#[tokio::test]
async fn a_stalled_sentinel_does_not_hold_up_a_connect() {
    let master = RedisServer::start();
    let stalled = RedisServer::sentinel_of(&master, MASTER);
    let healthy = RedisServer::sentinel_of(&master, MASTER);
    stalled.pause();
    let connector = connector(&[&stalled, &healthy]).connect_timeout(Duration::from_millis(500));
    let started = Instant::now();
    for _ in 0..3 {
        connector.connect().await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    stalled.resume();
}

#[tokio::test]
async fn a_replica_that_sentinel_still_names_is_refused() {
    // A Sentinel whose news is stale names a server that is a replica by now.
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let other = RedisServer::start();
    master.replicate(&other);
    let err = connector(&[&sentinel]).connect().await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(err.to_string().contains("not a master"), "{err}");
}

/// A failover with the old master still up: Sentinel promotes the replica at once, but
/// turns the old master into a replica only ~10 s later. Writes must move to the new
/// master within about a second of the switch, not keep landing on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_writes_move_to_the_new_master_before_the_old_one_is_demoted() {
    let (old, new, sentinel) = replicated_pair().await;
    let mut client = ResilientClient::builder_with_connector(connector(&[&sentinel]))
        .connect()
        .await
        .unwrap();
    let writer = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut failures = Vec::new();
            for i in 0u64..2_000 {
                if let Err(err) = client.set::<_, _, ()>("last", i).await {
                    failures.push(Error::from(err));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failures
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sentinel.fail_over(MASTER);
    let failed_over = Instant::now();
    eventually(Duration::from_secs(5), async || {
        sentinel.master_port(MASTER) == new.port()
    })
    .await;
    // Writes reach the new master: its `last` moves on from what it replicated.
    let replicated = new.raw_command(&["GET", "last"]);
    eventually(Duration::from_secs(5), async || {
        new.raw_command(&["GET", "last"]) != replicated
            && new.raw_command(&["ROLE"]).starts_with("master")
    })
    .await;
    let followed_in = failed_over.elapsed();
    assert!(
        old.raw_command(&["ROLE"]).starts_with("master"),
        "the old master was demoted already: the client may have followed READONLY"
    );
    assert!(followed_in < Duration::from_secs(4), "{followed_in:?}");
    eprintln!("writes reached the new master {followed_in:?} after the failover began");
    // And they stay there.
    let () = client.set("after", "switch").await.unwrap();
    assert_eq!(new.raw_command(&["GET", "after"]), "switch");
    let failures = writer.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
}

/// The master dies: Sentinel notices within 300 ms and promotes the replica; the client
/// finds it through Sentinel and goes on, every call answered within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_the_replica_sentinel_promotes() {
    let (mut old, new, sentinel) = replicated_pair().await;
    let mut client = ResilientClient::builder_with_connector(connector(&[&sentinel]))
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "before").await.unwrap();
    old.kill();
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let recovered = loop {
        let started = Instant::now();
        let written = client.set::<_, _, ()>("k", "after").await;
        slowest = slowest.max(started.elapsed());
        if written.is_ok() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(new.raw_command(&["GET", "k"]), "after");
    assert!(new.raw_command(&["ROLE"]).starts_with("master"));
    // The default deadline is 250 ms; a call may wait that plus a little for a reply.
    assert!(slowest < Duration::from_millis(400), "{slowest:?}");
    eprintln!("recovered {recovered:?} after the kill; slowest call {slowest:?}");
}
