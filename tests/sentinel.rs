//! Finding and following the master through Redis Sentinel, against real `redis-server`
//! masters, replicas and Sentinels.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::{RedisServer, ServerConfig, TokenService, eventually};
use tower::ServiceExt;
use tower_redis_resilience::{
    Connector, Credentials, Error, RedisService, Request, ResilientClient,
    pubsub::{Event, Events, Subscriber, SubscriberConfig},
    reconnect::{ConnectionState, ReconnectConfig},
};

const MASTER: &str = "cache";

/// A master, its replica, and `count` Sentinels watching them, which know the replica.
async fn replicated_pair(count: usize) -> (RedisServer, RedisServer, Vec<RedisServer>) {
    replicated_pair_with(count, RedisServer::config()).await
}

async fn replicated_pair_with(
    count: usize,
    master: ServerConfig,
) -> (RedisServer, RedisServer, Vec<RedisServer>) {
    let master = master.start();
    let replica = RedisServer::start();
    replica.replicate(&master);
    replica.catch_up(&master);
    let sentinels: Vec<_> = (0..count)
        .map(|_| RedisServer::sentinel_of(&master, MASTER))
        .collect();
    // Sentinel learns of replicas from the master's INFO (every ten seconds at first),
    // then connects to them; a failover before that finds no replica to promote.
    for sentinel in &sentinels {
        eventually(Duration::from_secs(15), async || {
            knows_in_sync(sentinel, &replica)
        })
        .await;
    }
    (master, replica, sentinels)
}

/// `sentinel` knows `replica`, is connected to it, and sees it in sync with its master.
fn knows_in_sync(sentinel: &RedisServer, replica: &RedisServer) -> bool {
    // One replica: its fields, a line each, name then value.
    let fields = sentinel.raw_command(&["SENTINEL", "REPLICAS", MASTER]);
    let fields: Vec<&str> = fields.lines().collect();
    let field = |name: &str| {
        fields
            .iter()
            .position(|line| *line == name)
            .and_then(|at| fields.get(at + 1))
            .copied()
    };
    field("port") == Some(&replica.port().to_string())
        && field("flags") == Some("slave")
        && field("master-link-status") == Some("ok")
}

/// Writes `SET last i` every 2 ms until stopped; answers the failures.
fn keep_writing(
    client: &ResilientClient,
) -> (
    tokio::task::JoinHandle<Vec<Error>>,
    tokio::sync::watch::Sender<bool>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut client = client.clone();
    let writer = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut i = 0u64;
        while !*stopped.borrow() {
            if let Err(err) = client.set::<_, _, ()>("last", i).await {
                failures.push(Error::from(err));
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        failures
    });
    (writer, stop)
}

/// From the moment Sentinel names `new`, how long until the writes land there.
async fn writes_reach(new: &RedisServer, sentinel: &RedisServer) -> Duration {
    eventually(Duration::from_secs(5), async || {
        sentinel.master_port(MASTER) == new.port()
    })
    .await;
    let switched = Instant::now();
    let replicated = new.raw_command(&["GET", "last"]);
    eventually(Duration::from_secs(5), async || {
        new.raw_command(&["GET", "last"]) != replicated
    })
    .await;
    switched.elapsed()
}

fn connector<'a>(sentinels: impl IntoIterator<Item = &'a RedisServer>) -> Connector {
    Connector::sentinel(
        sentinels.into_iter().map(|sentinel| sentinel.url()),
        MASTER,
        "redis://cache/0",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_goes_to_the_master_sentinel_names() {
    let (master, replica) = (RedisServer::start(), RedisServer::start());
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let mut client = ResilientClient::builder_with_connector(connector([&sentinel]))
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "on the master").await.unwrap();
    assert_eq!(master.raw_command(&["GET", "k"]), "on the master");
    assert_eq!(replica.raw_command(&["GET", "k"]), "");
    assert!(client.address().contains("cache/0 via Sentinel 127.0.0.1:"));
    // The connection to the master Sentinel named sets TCP_NODELAY and keepalive, as
    // every one does; so do those to the Sentinel: the one questions go on, and the
    // subscription to its announcements, made once a connection is out.
    let found = support::tcp_options_of_connections_to(master.port());
    assert!(
        !found.is_empty() && found.iter().all(support::TcpOptions::are_the_defaults),
        "{found:?}"
    );
    eventually(Duration::from_secs(5), async || {
        support::tcp_options_of_connections_to(sentinel.port()).len() == 2
    })
    .await;
    let found = support::tcp_options_of_connections_to(sentinel.port());
    assert!(
        found.iter().all(support::TcpOptions::are_the_defaults),
        "{found:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_sentinels_follow_the_connectors_tcp_settings() {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let connector = connector([&sentinel])
        .tcp_nodelay(false)
        .tcp_keepalive(None);
    let client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), async || {
        support::tcp_options_of_connections_to(sentinel.port()).len() == 2
    })
    .await;
    let found = support::tcp_options_of_connections_to(sentinel.port());
    assert!(
        found
            .iter()
            .all(|options| !options.nodelay && options.keepalive.is_none()),
        "{found:?}"
    );
    drop(client);
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

#[tokio::test]
async fn a_sentinel_password_comes_from_its_url_and_a_wrong_one_is_a_config_error() {
    let master = RedisServer::start();
    let sentinel = ServerConfig::sentinel_of(&master, MASTER)
        .password("sentinel-secret")
        .start();
    connector([&sentinel]).connect().await.unwrap();

    let wrong = sentinel.url().replace("sentinel-secret", "not-it");
    let err = Connector::sentinel([wrong], MASTER, "redis://x")
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("not-it") && !shown.contains("sentinel-secret"),
        "{shown}"
    );
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
    let connector = connector([&stalled, &healthy]).connect_timeout(Duration::from_millis(500));
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
    let err = connector([&sentinel]).connect().await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(err.to_string().contains("not a master"), "{err}");
}

/// Adds the user `app` (password `pw`) as a least-privilege application user is often
/// made: every command but the `@dangerous` ones, `ROLE` among them.
/// `GET key` on a connection `connector` opens, and the service over it: the connection
/// is open while the service lives.
async fn get_on(connector: Connector, key: &str) -> (RedisService, redis::Value) {
    let service = connector.connect().await.unwrap();
    let read = service
        .clone()
        .oneshot(Request::from(redis::cmd("GET").arg(key).to_owned()))
        .await
        .unwrap();
    (service, read)
}

fn add_app_user_without_dangerous_commands(server: &RedisServer) {
    let reply = server.raw_command(&[
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@all",
        "-@dangerous",
    ]);
    assert_eq!(reply, "OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_run_role_reaches_the_master_and_the_replica_sentinel_names() {
    let (master, replica, sentinels) = replicated_pair(1).await;
    for server in [&master, &replica] {
        add_app_user_without_dangerous_commands(server);
    }
    let as_app = "redis://app:pw@cache/0";
    let sentinel = [sentinels[0].url()];
    let mut client = ResilientClient::builder_with_connector(
        Connector::sentinel(sentinel.clone(), MASTER, as_app).unwrap(),
    )
    .connect()
    .await
    .unwrap();
    let () = client.set("k", "on the master").await.unwrap();
    assert_eq!(master.raw_command(&["GET", "k"]), "on the master");

    replica.catch_up(&master);
    let (on_replica, read) = get_on(
        Connector::sentinel_replica(sentinel, MASTER, as_app).unwrap(),
        "k",
    )
    .await;
    assert_eq!(read, redis::Value::BulkString(b"on the master".to_vec()));
    // Its connection is open while `on_replica` lives: the replica lists it.
    let clients = replica.raw_command(&["CLIENT", "LIST"]);
    assert!(clients.contains("user=app"), "{clients}");
    drop(on_replica);
}

/// Tokens that expire, through Sentinel: the master and the replica it names are reached
/// with the provider's token of the moment, and so is the new master after a failover
/// that came with a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_sentinel_names_are_reached_with_the_credentials_providers_token() {
    let (master, replica, sentinels) = replicated_pair(1).await;
    for server in [&master, &replica] {
        server.set_user_password("app", "token-1");
    }
    let tokens = TokenService::issuing("token-1");
    let asking = |connector: Connector| {
        let tokens = tokens.clone();
        connector.credentials(move || {
            let token = tokens.take();
            async move { Ok::<_, std::io::Error>(Credentials::password_only(token)) }
        })
    };
    let sentinel = [sentinels[0].url()];
    let as_app = "redis://app@cache/0";
    let mut client = ResilientClient::builder_with_connector(asking(
        Connector::sentinel(sentinel.clone(), MASTER, as_app).unwrap(),
    ))
    .connect()
    .await
    .unwrap();
    let () = client.set("k", "on the master").await.unwrap();
    replica.catch_up(&master);
    let replica_connector = asking(Connector::sentinel_replica(sentinel, MASTER, as_app).unwrap());
    let (_, read) = get_on(replica_connector, "k").await;
    assert_eq!(read, redis::Value::BulkString(b"on the master".to_vec()));
    assert_eq!(tokens.handed_out(), 2);

    tokens.issue("token-2");
    for server in [&master, &replica] {
        server.set_user_password("app", "token-2");
    }
    sentinels[0].fail_over(MASTER);
    eventually(Duration::from_secs(10), async || {
        sentinels[0].master_port(MASTER) == replica.port()
    })
    .await;
    // The promoted replica no longer replicates: what it holds now, the client wrote there.
    eventually(Duration::from_secs(10), async || {
        client.set::<_, _, ()>("after", "failover").await.is_ok()
            && replica.raw_command(&["GET", "after"]) == "failover"
    })
    .await;
    let clients = replica.raw_command(&["CLIENT", "LIST"]);
    assert!(clients.contains("user=app"), "{clients}");
    assert!(tokens.handed_out() >= 3);
}

/// A failover with the old master still up: Sentinel promotes the replica at once, but
/// turns the old master into a replica only ~10 s later, and writes it takes meanwhile
/// are lost. The client hears Sentinel announce the switch and moves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_move_to_the_new_master_as_soon_as_sentinel_announces_the_switch() {
    let (old, new, sentinels) = replicated_pair(1).await;
    let sentinel = &sentinels[0];
    // Asking would take a minute: only the announcement can explain a quick move.
    let connector = connector([sentinel]).sentinel_check_interval(Duration::from_secs(60));
    let mut client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    let (writer, stop) = keep_writing(&client);
    // The subscription is made once the first connection is out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sentinel.fail_over(MASTER);
    let followed_in = writes_reach(&new, sentinel).await;
    assert!(
        old.raw_command(&["ROLE"]).starts_with("master"),
        "the old master was demoted already: the client may have followed READONLY"
    );
    assert!(followed_in < Duration::from_millis(500), "{followed_in:?}");
    eprintln!("writes reached the new master {followed_in:?} after Sentinel named it");
    let () = client.set("after", "switch").await.unwrap();
    assert_eq!(new.raw_command(&["GET", "after"]), "switch");
    let health = client.health().await;
    assert_eq!(
        health.connected_to,
        Some(format!("{MASTER} at 127.0.0.1:{}/0", new.port()))
    );
    assert!(health.address.starts_with("cache/0 via Sentinel"));
    stop.send(true).unwrap();
    let failures = writer.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
}

/// An idle client, when Sentinel announces a new master: its connection to the old one
/// is retired, and `Reconnect`, watching it, opens one to the new master at once, with no
/// call to find it retired first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_moves_to_the_new_master_when_sentinel_announces_it() {
    let (_old, new, sentinels) = replicated_pair(1).await;
    let sentinel = &sentinels[0];
    let connector = connector([sentinel]).sentinel_check_interval(Duration::from_secs(60));
    // No health check either, whose `PING` would find the retired connection.
    let mut client = ResilientClient::builder_with_connector(connector)
        .reconnect(ReconnectConfig::new().without_health_check())
        .connect()
        .await
        .unwrap();
    let () = client.set("before", "switch").await.unwrap();
    // The subscription is made once the first connection is out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sentinel.fail_over(MASTER);
    eventually(Duration::from_secs(5), async || {
        client.reconnect_stats().successes == 2
            && client.connection_state() == ConnectionState::Connected
    })
    .await;
    let health = client.health().await;
    assert_eq!(
        health.connected_to,
        Some(format!("{MASTER} at 127.0.0.1:{}/0", new.port()))
    );
    assert_eq!(client.reconnect_stats().attempts, 2);
}

/// The same failover when the Sentinel the client listens to is stalled: asking the
/// others, every `sentinel_check_interval`, finds the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_unheard_is_found_by_asking_the_sentinels_that_answer() {
    let (old, new, sentinels) = replicated_pair(2).await;
    let (silent, announcing) = (&sentinels[0], &sentinels[1]);
    let connector =
        connector([silent, announcing]).sentinel_check_interval(Duration::from_millis(300));
    let client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    let (writer, stop) = keep_writing(&client);
    // Subscribed to the first Sentinel by now; it goes silent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    silent.pause();
    announcing.fail_over(MASTER);
    let followed_in = writes_reach(&new, announcing).await;
    assert!(old.raw_command(&["ROLE"]).starts_with("master"));
    assert!(followed_in < Duration::from_secs(2), "{followed_in:?}");
    eprintln!("writes reached the new master {followed_in:?} after Sentinel named it");
    stop.send(true).unwrap();
    let failures = writer.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    silent.resume();
}

/// With `min-replicas-to-write 1` the old master refuses writes (`NOREPLICAS`) from the
/// moment the failover takes its replica until Sentinel announces the new master. The
/// client reports those as not run, keeps the breaker closed (reads go on), then writes
/// to the new master: every acknowledged `INCR` is there, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_to_write_no_acknowledged_incr_is_lost_in_a_failover() {
    let master = RedisServer::config()
        .arg("min-replicas-to-write", "1")
        .arg("min-replicas-max-lag", "10");
    let (_old, new, sentinels) = replicated_pair_with(1, master).await;
    let mut client = ResilientClient::builder_with_connector(connector(&sentinels[..1]))
        .connect()
        .await
        .unwrap();
    let failed_over = Instant::now();
    sentinels[0].fail_over(MASTER);
    let (mut acknowledged, mut refused) = (0u64, 0u64);
    while failed_over.elapsed() < Duration::from_secs(4) {
        match client.incr::<_, _, u64>("count", 1).await {
            Ok(_) => acknowledged += 1,
            Err(err) => {
                let err = Error::from(err);
                assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
                refused += 1;
                let _: Option<String> = client.get("count").await.expect("reads go on");
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Replication is asynchronous: an INCR the old master acknowledged and had not yet
    // passed on when its replica was promoted is lost (one at most here, as one is in
    // flight at a time); `min-replicas-to-write` stops it acknowledging more after. None
    // is counted twice, and none that was refused ran.
    let on_new: u64 = new.raw_command(&["GET", "count"]).parse().unwrap();
    assert!(
        on_new <= acknowledged && acknowledged - on_new <= 1,
        "{acknowledged} acknowledged, {on_new} on the new master"
    );
    assert!(new.raw_command(&["ROLE"]).starts_with("master"));
    let breaker = client.circuit_breaker().unwrap().metrics();
    assert_eq!(breaker.failed_calls, 0, "{breaker:?}");
    eprintln!(
        "{acknowledged} INCRs acknowledged ({on_new} on the new master), {refused} refused as not run"
    );
}

/// A master that stalls past `down-after-milliseconds` (300 ms here) and comes back
/// before Sentinel has ended the failover: its replica is already promoted, but every
/// Sentinel still names the old master until the failover ends (measured: ~0.7 s after
/// it came back), and the old master, still a master, takes the writes of connections
/// that were open to it, which Sentinel discards when it demotes it (measured without
/// `min-replicas-to-write`: ~10,000 of ~150,000 acknowledged `INCR`s from 4 writers lost
/// in a release build, ~14,600 of ~24,800 in one run of two of this test). With `min-replicas-to-write 1` it refuses them (its replica left it), the
/// client reports them as not run, and they are sent again on the new master once
/// Sentinel names it: no more are lost than were in flight when it stalled, and none is
/// counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_to_write_a_master_that_stalls_past_the_failover_loses_no_write() {
    let master = RedisServer::config()
        .arg("min-replicas-to-write", "1")
        .arg("min-replicas-max-lag", "10");
    let (old, new, sentinels) = replicated_pair_with(3, master).await;
    let client = ResilientClient::builder_with_connector(connector(&sentinels))
        .connect()
        .await
        .unwrap();
    const WRITERS: u64 = 4;
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Failed, but may have run (timed out on the new master, say).
    let maybe_run = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (mut client, acknowledged, maybe_run, stopped) = (
                client.clone(),
                acknowledged.clone(),
                maybe_run.clone(),
                stopped.clone(),
            );
            tokio::spawn(async move {
                while !*stopped.borrow() {
                    match client.incr::<_, _, u64>("count", 1).await {
                        Ok(_) => {
                            acknowledged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(err) => {
                            if Error::from(err).may_have_run() {
                                maybe_run.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    old.pause();
    tokio::time::sleep(Duration::from_secs(1)).await;
    old.resume();
    eventually(Duration::from_secs(10), async || {
        sentinels[0].master_port(MASTER) == new.port()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    let maybe_run = maybe_run.load(std::sync::atomic::Ordering::SeqCst);
    let on_new: u64 = new.raw_command(&["GET", "count"]).parse().unwrap();
    eprintln!(
        "{acknowledged} INCRs acknowledged, {maybe_run} failed that may have run, {on_new} on the new master"
    );
    // Lost: at most those in flight when it stalled. More than acknowledged: at most
    // those that failed but may have run (seen once: one).
    assert!(
        on_new <= acknowledged + maybe_run && acknowledged.saturating_sub(on_new) <= WRITERS,
        "{acknowledged} acknowledged, {maybe_run} may have run, {on_new} on the new master"
    );
    assert!(
        on_new > 1000,
        "the writes moved to the new master: {on_new}"
    );
}

/// The master dies: Sentinel notices within 300 ms and promotes the replica; the client
/// finds it through Sentinel and goes on, every call answered within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_the_replica_sentinel_promotes() {
    let (mut old, new, sentinels) = replicated_pair(1).await;
    let mut client = ResilientClient::builder_with_connector(connector(&sentinels[..1]))
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

/// A client that goes away takes its Sentinel connections with it: the one it asks
/// questions on and the one it listens on, and the task that follows the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_client_closes_its_sentinel_connections() {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    // Sentinels talk to each other and to the master; count the normal clients and the
    // subscribers, which are ours (the harness's own probe is one of the normal ones).
    let ours = |sentinel: &RedisServer| {
        let list = sentinel.raw_command(&["CLIENT", "LIST"]);
        list.lines()
            .filter(|line| !line.contains("cmd=client"))
            .count()
    };
    let before = ours(&sentinel);
    // The task that follows the master would otherwise notice only at its next check.
    let connector = connector([&sentinel]).sentinel_check_interval(Duration::from_secs(60));
    let client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    eventually(Duration::from_secs(2), async || {
        ours(&sentinel) == before + 2
    })
    .await;
    drop(client);
    eventually(Duration::from_secs(2), async || ours(&sentinel) == before).await;
}

/// The next subscriber event, within 5 s.
async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the subscriber runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_moves_to_the_new_master_sentinel_names() {
    let (old, new, sentinels) = replicated_pair(1).await;
    let sentinel = &sentinels[0];
    let config = SubscriberConfig::new().ping_interval(Duration::from_millis(50));
    let (subscriber, mut events) = Subscriber::connect(connector([sentinel]), config)
        .await
        .unwrap();
    subscriber.subscribe("news").await.unwrap();
    assert_eq!(old.raw_command(&["PUBLISH", "news", "before"]), "1");
    assert!(matches!(next_event(&mut events).await, Event::Message(_)));
    // The subscription to Sentinel's announcements is made once the connection is out.
    tokio::time::sleep(Duration::from_millis(200)).await;

    sentinel.fail_over(MASTER);
    // Left on the old master, still up, it would not hear what is published on the new
    // one until Sentinel demotes the old one, and no event would say so.
    let moved = next_event(&mut events).await;
    assert!(
        matches!(&moved, Event::Disconnected { error } if error.to_string().contains("Sentinel")),
        "{moved:?}"
    );
    assert!(matches!(
        next_event(&mut events).await,
        Event::Resubscribed { .. }
    ));
    assert_eq!(new.raw_command(&["PUBLISH", "news", "after"]), "1");
    match next_event(&mut events).await {
        Event::Message(message) => assert_eq!(message.get_payload::<String>().unwrap(), "after"),
        other => panic!("{other:?}"),
    }
}

/// Sentinel, master and replica all over TLS with certificates of one CA (replication and
/// Sentinel's own connections too), and the CA given to the connector once: it reaches
/// the Sentinel, the master it names, and after a failover the new one, as soon as
/// Sentinel names it (redis-rs runs TLS connections, and they are retired all the same).
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_masters_over_tls_are_reached_with_the_ca_given_to_the_connector() {
    let certificates = support::certificates();
    let tls = |config: ServerConfig| {
        config
            .tls_beside_plain(certificates.path())
            .arg("tls-replication", "yes")
    };
    let master = tls(RedisServer::config()).start();
    let replica = tls(RedisServer::config()).start();
    replica.replicate(&master);
    replica.catch_up(&master);
    let sentinel = tls(ServerConfig::sentinel_of(&master, MASTER)).start();
    eventually(Duration::from_secs(15), async || {
        knows_in_sync(&sentinel, &replica)
    })
    .await;
    assert!(sentinel.url().starts_with("rediss://"));

    let ca = std::fs::read(certificates.path().join("ca.crt")).unwrap();
    let connector = Connector::sentinel([sentinel.url()], MASTER, "rediss://cache/0")
        .unwrap()
        .tls_certificates(support::trust(ca))
        .unwrap();
    // Writes made while the new connection opens wait for it: a connect through Sentinel
    // over TLS took 25–50 ms in this unoptimised test build (7–10 ms optimised, over
    // plain TCP 1–2 ms), longer than the retries' backoff (two waits of up to 10 and
    // 20 ms), after which they would fail, unsent.
    let mut client = ResilientClient::builder_with_connector(connector)
        .reconnect(
            tower_redis_resilience::reconnect::ReconnectConfig::new()
                .max_wait(Duration::from_millis(200)),
        )
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "over tls").await.unwrap();
    assert_eq!(master.raw_command(&["GET", "k"]), "over tls");

    let (writer, stop) = keep_writing(&client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    sentinel.fail_over(MASTER);
    let followed_in = writes_reach(&replica, &sentinel).await;
    // Followed on Sentinel's word, not on the old master's READONLY (which comes about
    // ten seconds later, and until then it acknowledges writes the failover loses).
    assert!(
        master.raw_command(&["ROLE"]).starts_with("master"),
        "the old master was demoted already: the client may have followed READONLY"
    );
    assert!(followed_in < Duration::from_millis(500), "{followed_in:?}");
    stop.send(true).unwrap();
    let failures = writer.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let health = client.health().await;
    assert_eq!(
        health.connected_to,
        Some(format!("{MASTER} at 127.0.0.1:{}/0", replica.port()))
    );
}

fn replica_connector<'a>(sentinels: impl IntoIterator<Item = &'a RedisServer>) -> Connector {
    Connector::sentinel_replica(
        sentinels.into_iter().map(|sentinel| sentinel.url()),
        MASTER,
        "redis://cache/0",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_connector_reaches_the_replica_sentinel_knows() {
    let (master, replica, sentinels) = replicated_pair(1).await;
    let redis = replica_connector(&sentinels).connect().await.unwrap();
    let port = redis
        .oneshot(Request::from(
            redis::cmd("CONFIG").arg("GET").arg("port").to_owned(),
        ))
        .await
        .unwrap();
    let port: Vec<String> = redis::from_redis_value(port).unwrap();
    assert_eq!(port[1], replica.port().to_string());
    assert_ne!(port[1], master.port().to_string());

    // The only replica stalled: unavailable, saying so, within the connect timeout.
    replica.pause();
    let started = Instant::now();
    let err = replica_connector(&sentinels)
        .connect_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    replica.resume();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// From the kill of the master until Sentinel has promoted its replica, reads are
/// served by that replica instead of missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_master_is_down_and_failed_over_reads_are_served_by_its_replica() {
    let (mut master, replica, sentinels) = replicated_pair(1).await;
    let mut client = ResilientClient::builder_with_connector(connector(&sentinels))
        .read_replica(replica_connector(&sentinels))
        .connect()
        .await
        .unwrap();
    for i in 0..10 {
        let () = client.set(format!("k{i}"), i).await.unwrap();
    }
    replica.catch_up(&master);

    master.kill();
    let killed = Instant::now();
    let mut reads = 0;
    let mut misses = Vec::new();
    while killed.elapsed() < Duration::from_secs(3) {
        let i = reads % 10;
        let value: Option<i64> = client.get(format!("k{i}")).await.unwrap();
        if value != Some(i) {
            misses.push(killed.elapsed());
        }
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Without a replica, a third of them missed (152 of 451: the second until Sentinel
    // had promoted the replica). A read on the replica's connection as Sentinel cuts it
    // (it kills the clients of the replica it promotes) could still miss: at most that.
    assert!(
        misses.len() <= 2,
        "{} of {reads} missed, at {misses:?}",
        misses.len()
    );
    assert!(client.reconnect_stats().replica_reads > 50);
    // Sentinel promoted the replica: writes go there.
    eventually(Duration::from_secs(10), async || {
        client.set::<_, _, ()>("k0", 100).await.is_ok()
    })
    .await;
    assert_eq!(replica.raw_command(&["GET", "k0"]), "100");
}

/// A master and its Sentinel, and a connector that reaches the Sentinel through a proxy
/// that closes every connection 20 ms after it opened.
async fn behind_a_proxy_that_closes_connections_at_20_ms()
-> ([RedisServer; 2], support::FaultProxy, Connector) {
    let master = RedisServer::start();
    let sentinel = RedisServer::sentinel_of(&master, MASTER);
    let proxy = support::FaultProxy::start(sentinel.port()).await;
    proxy.close_connections_after(Duration::from_millis(20));
    let connector = Connector::sentinel([proxy.url()], MASTER, "redis://cache/0").unwrap();
    ([master, sentinel], proxy, connector)
}

/// Something in front of the Sentinel closes every connection 20 ms after it opened (a
/// load balancer with a limit on a connection's age, a reaper): the task that follows
/// the master subscribes to the Sentinel's announcements again at most once a second,
/// not as soon as each subscription ends, and its questions are asked on a connection
/// that is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_a_sentinel_that_ends_at_once_is_not_made_again_at_once() {
    let (_servers, proxy, connector) = behind_a_proxy_that_closes_connections_at_20_ms().await;
    let mut client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    let before = proxy.connections();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let opened = proxy.connections() - before;
    // About one subscription and one question a second.
    assert!(opened <= 10, "{opened} connections to the Sentinel in 3 s");
    let () = client.set("k", "v").await.unwrap();
}

/// The connection kept for questions to a Sentinel was closed while idle (here by
/// something in front of it that closes connections 20 ms after they open; a Sentinel
/// restarted, or a middlebox's idle timeout): the next connect asks on a new one
/// instead of failing on the closed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_connection_closed_while_idle_is_opened_again() {
    let (_servers, _proxy, connector) = behind_a_proxy_that_closes_connections_at_20_ms().await;
    drop(connector.connect().await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(connector.connect().await.unwrap());
}
