//! Blocking commands through the default stack against real redis-server processes: on
//! connections of their own, so they hold up no other call and a call given up on pops
//! nothing; `WAIT` and transactions stay on the shared connection.

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::{FaultProxy, RedisServer, eventually};
use tower_redis_resilience::{
    Connector, Error, ResilientClient,
    backoff::{ExponentialBackoff, Jitter},
    reconnect::ReconnectConfig,
};

async fn client(server: &RedisServer) -> ResilientClient {
    ResilientClient::builder(&server.url())
        .connect()
        .await
        .unwrap()
}

/// How many clients Redis holds blocked now.
fn blocked_clients(server: &RedisServer) -> u32 {
    server.info_field("blocked_clients").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blpop_holds_up_no_other_call() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    let () = client.set("k", "v").await.unwrap();

    let mut waiter = client.clone();
    let popped = tokio::spawn(async move {
        waiter
            .blpop::<_, Option<(String, String)>>("queue", 5.0)
            .await
    });
    eventually(Duration::from_secs(5), async || {
        blocked_clients(&server) == 1
    })
    .await;

    // On the shared connection each GET would wait behind the BLPOP and time out at the
    // default 250 ms deadline.
    for _ in 0..20 {
        let value: Option<String> = client.get("k").await.unwrap();
        assert_eq!(value.as_deref(), Some("v"));
    }
    assert!(!popped.is_finished(), "the BLPOP still waits for data");

    assert_eq!(server.raw_command(&["LPUSH", "queue", "job"]), "1");
    let popped = popped.await.unwrap().unwrap();
    assert_eq!(popped, Some(("queue".to_owned(), "job".to_owned())));
    assert_eq!(client.reconnect_stats().blocking_connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_call_given_up_on_pops_nothing() {
    let server = RedisServer::start();
    let mut client = client(&server).await;

    // `BLPOP queue 0` has no deadline of its own; the app gives up on it.
    let given_up = tokio::time::timeout(
        Duration::from_millis(200),
        client.blpop::<_, Option<(String, String)>>("queue", 0.0),
    )
    .await;
    assert!(given_up.is_err(), "nothing was pushed: {given_up:?}");

    // Its connection closed, so Redis no longer holds a BLPOP that would pop the next
    // element and send it to nobody.
    eventually(Duration::from_secs(5), async || {
        blocked_clients(&server) == 0
    })
    .await;
    assert_eq!(server.raw_command(&["LPUSH", "queue", "job"]), "1");
    let () = client.set("after", "1").await.unwrap();
    assert_eq!(
        server.raw_command(&["LLEN", "queue"]),
        "1",
        "the job is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_one_after_another_reuse_one_connection() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    // `INFO` over a connection of its own, which it counts.
    let connections = || -> u64 {
        server
            .info_field("total_connections_received")
            .parse()
            .unwrap()
    };
    let before = connections();
    for _ in 0..5 {
        let nothing: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
        assert_eq!(nothing, None);
    }
    assert_eq!(
        connections() - before,
        2,
        "one for the BLPOPs, one for INFO"
    );
    assert_eq!(client.reconnect_stats().blocking_connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_blocking_connection_redis_closed_is_replaced_and_pops_once() {
    let server = RedisServer::start();
    // No retry to resend a call refused on the closed connection: the connection must be
    // skipped before the call is made.
    let mut client = ResilientClient::builder(&server.url())
        .without_retry()
        .connect()
        .await
        .unwrap();
    let nothing: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
    assert_eq!(nothing, None);

    // Redis's `timeout` closes idle connections the same way.
    let list = server.raw_command(&["CLIENT", "LIST"]);
    let idle = list
        .lines()
        .find(|line| line.contains("cmd=blpop"))
        .and_then(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")))
        .expect("the idle BLPOP connection")
        .to_owned();
    assert_eq!(server.raw_command(&["CLIENT", "KILL", "ID", &idle]), "1");
    // The connection's task sees the close within microseconds; this is ample.
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_eq!(server.raw_command(&["RPUSH", "queue", "a", "b"]), "2");
    let popped: Option<(String, String)> = client.blpop("queue", 1.0).await.unwrap();
    assert_eq!(popped, Some(("queue".to_owned(), "a".to_owned())));
    assert_eq!(server.raw_command(&["LLEN", "queue"]), "1", "popped once");
    assert_eq!(client.reconnect_stats().blocking_connections, 2);
}

/// A client whose connections probe after 1 s quiet, every second, 3 unanswered: a
/// vanished server is found ~4 s after its last packet.
async fn quick_keepalive_client(server: &RedisServer) -> ResilientClient {
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .tcp_keepalive(Some(Duration::from_secs(1)));
    ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap()
}

/// A `BLPOP` in a task: what it popped, and when it ended.
type Waiting = tokio::task::JoinHandle<(redis::RedisResult<Option<(String, String)>>, Instant)>;

/// `BLPOP jobs 0` on `worker`, in a task that answers its result and when it ended.
fn blpop_forever(mut worker: ResilientClient) -> Waiting {
    tokio::spawn(async move {
        let popped = worker.blpop("jobs", 0.0).await;
        (popped, Instant::now())
    })
}

/// The call in `waiting` fails as unavailable and one that may have run, within 10 s of
/// `vanished`.
async fn fails_soon_after(waiting: Waiting, vanished: Instant) {
    let (popped, ended) = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the BLPOP ends once the server is found gone")
        .unwrap();
    let err = Error::from(popped.unwrap_err());
    assert!(err.is_unavailable() && err.may_have_run(), "{err:?}");
    let after = ended - vanished;
    eprintln!("the BLPOP failed {after:?} after its server vanished: {err}");
    assert!(after < Duration::from_secs(10), "{after:?}");
}

/// A worker's `BLPOP jobs 0` whose server's host vanishes: its connection is quiet by
/// design, nothing can be sent on it, and no packet comes back. TCP keepalive finds it,
/// and the call fails as unavailable and may have run (an element may have been popped
/// into the dead connection). Without probes it waited for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blpop_without_end_fails_once_keepalive_finds_its_server_gone() {
    let server = RedisServer::start();
    let waiting = blpop_forever(quick_keepalive_client(&server).await);
    eventually(Duration::from_secs(5), async || {
        blocked_clients(&server) == 1
    })
    .await;
    // The server's acknowledgement of the `BLPOP` has come: the connection is quiet,
    // as keepalive needs (the next test is the other case).
    eventually(Duration::from_secs(5), async || {
        let sockets = support::tcp_options_of_connections_to(server.port());
        sockets.iter().all(|socket| socket.unacked == 0)
    })
    .await;
    let _gone = server.blackhole();
    fails_soon_after(waiting, Instant::now()).await;
}

/// The same, with the host gone before it acknowledged the `BLPOP`: keepalive does not
/// probe a connection with data unacknowledged, which TCP retransmits for many minutes.
/// `TCP_USER_TIMEOUT`, set to the keepalive's total time, bounds that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blpop_sent_to_a_server_already_gone_fails_within_the_keepalive_time() {
    let server = RedisServer::start();
    let mut worker = quick_keepalive_client(&server).await;
    // A blocking connection, kept for reuse: the next `BLPOP` is sent on it.
    let nothing: Option<(String, String)> = worker.blpop("jobs", 0.01).await.unwrap();
    assert_eq!(nothing, None);
    let _gone = server.blackhole();
    let vanished = Instant::now();
    fails_soon_after(blpop_forever(worker), vanished).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_stays_with_the_writes_it_waits_for() {
    let (master, replica) = (RedisServer::start(), RedisServer::start());
    replica.replicate(&master);
    let mut client = client(&master).await;
    let () = client.set("k", "1").await.unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(1000)
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!(acked, 1);

    // A stalled replica acknowledges nothing more. On a fresh connection, with no write
    // of its own to wait for, WAIT would answer 1 at once.
    replica.pause();
    let () = client.set("k", "2").await.unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(100)
        .query_async(&mut client)
        .await
        .unwrap();
    replica.resume();
    assert_eq!(acked, 0, "the SET before it is not acknowledged");
    assert_eq!(client.reconnect_stats().blocking_connections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_never_blocks() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    // Inside MULTI, Redis answers BLPOP on an empty list at once: well within the default
    // 250 ms deadline, which the transaction keeps.
    let (popped,): (Option<(String, String)>,) = redis::pipe()
        .atomic()
        .blpop("queue", 5.0)
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!(popped, None);
    assert_eq!(client.reconnect_stats().blocking_connections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_blocking_commands_may_block_for_each_in_turn() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    // Redis runs the two BLPOPs one after the other: the first waits its second out, then
    // the second waits for the push at ~1.5 s. A deadline of the longer block time plus
    // the grace (1.25 s) would give up on a pipeline Redis was still serving.
    let started = std::time::Instant::now();
    let pipeline = async {
        redis::pipe()
            .blpop("first", 1.0)
            .blpop("second", 1.0)
            .query_async::<(Option<(String, String)>, Option<(String, String)>)>(&mut client)
            .await
    };
    let push = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(server.raw_command(&["LPUSH", "second", "job"]), "1");
    };
    let (replies, ()) = tokio::join!(pipeline, push);
    let (first, second) = replies.unwrap();
    assert_eq!(first, None);
    assert_eq!(second, Some(("second".to_owned(), "job".to_owned())));
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_blocking_calls_share_the_connection() {
    let server = RedisServer::start();
    let mut client = ResilientClient::builder(&server.url())
        .reconnect(ReconnectConfig::new().dedicated_blocking_connections(None))
        .connect()
        .await
        .unwrap();
    let nothing: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
    assert_eq!(nothing, None);
    assert_eq!(client.reconnect_stats().blocking_connections, 0);
    assert_eq!(
        server.info_field("connected_clients"),
        "2",
        "ours and INFO's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blpop_follows_a_failover_behind_one_address() {
    let (old, new) = (RedisServer::start(), RedisServer::start());
    // The address the app knows, as a DNS name: it moves to the new master, the open
    // connections stay on the old one.
    let proxy = FaultProxy::start(old.port()).await;
    let mut client = ResilientClient::builder(&proxy.url())
        .connect()
        .await
        .unwrap();
    let nothing: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
    assert_eq!(
        nothing, None,
        "an idle blocking connection to the old master"
    );

    old.replicate(&new);
    proxy.retarget(new.port());
    assert_eq!(new.raw_command(&["RPUSH", "queue", "job"]), "1");

    // The idle connection reaches a replica: READONLY, not run, so the retry resends the
    // BLPOP on a new connection, which leads to the new master.
    let popped: Option<(String, String)> = client.blpop("queue", 1.0).await.unwrap();
    assert_eq!(popped, Some(("queue".to_owned(), "job".to_owned())));
    assert_eq!(client.reconnect_stats().blocking_connections, 2);
    // And the shared connection followed too, without a write of its own.
    eventually(Duration::from_secs(5), async || {
        client.reconnect_stats().successes == 2
    })
    .await;
    let () = client.set("k", "v").await.unwrap();
    assert_eq!(new.raw_command(&["GET", "k"]), "v");
}

/// A `BLPOP` waiting on the master when a failover demotes it: Redis gives up on it
/// (`UNBLOCKED ... instance state changed (master -> replica?)`) without popping. Before,
/// the app got that as a server error, its bug's kind of error; now it is unavailable
/// and not run, so the retry waits on the new master and pops what is pushed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blpop_waiting_through_a_failover_goes_on_waiting_on_the_new_master() {
    let (old, new) = (RedisServer::start(), RedisServer::start());
    let proxy = FaultProxy::start(old.port()).await;
    let client = ResilientClient::builder(&proxy.url())
        .connect()
        .await
        .unwrap();
    let mut waiting = client.clone();
    let waiter = tokio::spawn(async move {
        waiting
            .blpop::<_, Option<(String, String)>>("queue", 3.0)
            .await
    });
    eventually(Duration::from_secs(2), async || blocked_clients(&old) == 1).await;

    old.replicate(&new);
    proxy.retarget(new.port());
    eventually(Duration::from_secs(2), async || blocked_clients(&new) == 1).await;
    assert_eq!(new.raw_command(&["RPUSH", "queue", "job"]), "1");
    let popped = waiter.await.unwrap().unwrap();
    assert_eq!(popped, Some(("queue".to_owned(), "job".to_owned())));
    assert_eq!(new.raw_command(&["LLEN", "queue"]), "0");
    let breaker = client.health().await.breaker.unwrap();
    assert_eq!(breaker.failed_calls, 0, "{breaker:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_beyond_the_limit_wait_for_a_connection() {
    let server = RedisServer::start();
    let client = ResilientClient::builder(&server.url())
        .reconnect(ReconnectConfig::new().max_blocking_connections(2))
        .connect()
        .await
        .unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .blpop::<_, Option<(String, String)>>("queue", 5.0)
                    .await
            })
        })
        .collect();
    eventually(Duration::from_secs(5), async || {
        blocked_clients(&server) == 2
    })
    .await;
    assert_eq!(client.reconnect_stats().blocking_connections, 2);

    // One pop frees a connection: the third call takes it, and Redis still holds two.
    assert_eq!(server.raw_command(&["RPUSH", "queue", "a"]), "1");
    eventually(Duration::from_secs(5), async || {
        waiters.iter().filter(|waiter| waiter.is_finished()).count() == 1
            && blocked_clients(&server) == 2
    })
    .await;
    assert_eq!(server.raw_command(&["RPUSH", "queue", "b", "c"]), "2");
    let mut popped = Vec::new();
    for waiter in waiters {
        popped.push(waiter.await.unwrap().unwrap().unwrap().1);
    }
    popped.sort();
    assert_eq!(popped, ["a", "b", "c"]);
    assert_eq!(
        client.reconnect_stats().blocking_connections,
        2,
        "the third call reused the connection the first gave back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_blocking_connection_past_its_idle_timeout_is_not_reused() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let mut client = ResilientClient::builder(&proxy.url())
        .reconnect(ReconnectConfig::new().blocking_idle_timeout(Duration::from_millis(200)))
        .connect()
        .await
        .unwrap();
    let nothing: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
    assert_eq!(nothing, None);
    // Something between drops the idle connection without telling either end. A BLPOP
    // sent on it would get no reply and fail at its deadline.
    proxy.silence_open_connections();
    tokio::time::sleep(Duration::from_millis(400)).await;

    assert_eq!(server.raw_command(&["RPUSH", "queue", "a"]), "1");
    let popped: Option<(String, String)> = client.blpop("queue", 1.0).await.unwrap();
    assert_eq!(popped, Some(("queue".to_owned(), "a".to_owned())));
    assert_eq!(client.reconnect_stats().blocking_connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_calls_redis_has_no_room_for_leave_the_breaker_closed_and_reads_served() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    let () = client.set("k", "v").await.unwrap();
    // Room for the client's shared connection only (the one that sets this goes).
    assert_eq!(
        server.raw_command(&["CONFIG", "SET", "maxclients", "1"]),
        "OK"
    );
    // Enough failures to open the breaker (its window counts 20, half of them failed).
    for _ in 0..30 {
        let error = client
            .blpop::<_, Option<(String, String)>>("queue", 0.01)
            .await
            .unwrap_err();
        let error = tower_redis_resilience::Error::from(error);
        assert!(error.is_unavailable() && !error.may_have_run(), "{error}");
        let shown = error.to_string();
        assert!(
            shown.contains("connection of its own")
                && (shown.contains("maxclients") || shown.contains("max number of clients")),
            "says why: {error}"
        );
    }
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"), "served, not a miss");
    assert_eq!(
        client.circuit_breaker().unwrap().state(),
        tower_redis_resilience::circuit_breaker::BreakerState::Closed
    );
}

/// The default client to `url`, with a backoff schedule of 50, 100, 200, 400, 800 ms,
/// then 1 s steps, without jitter, to count the tries by.
async fn paced_client(url: &str) -> ResilientClient {
    let backoff = ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
        .jitter(Jitter::None);
    ResilientClient::builder(url)
        .reconnect(ReconnectConfig::new().backoff(backoff))
        .connect()
        .await
        .unwrap()
}

/// A worker's loop of `BLPOP`s for 2 s, each of which must fail as unavailable: how many,
/// and the last error.
async fn failing_blpops_for_2_s(
    client: &mut ResilientClient,
) -> (u32, tower_redis_resilience::Error) {
    let started = Instant::now();
    let mut calls = 0;
    loop {
        let error = client
            .blpop::<_, Option<(String, String)>>("queue", 0.01)
            .await
            .unwrap_err();
        let error = tower_redis_resilience::Error::from(error);
        assert!(error.is_unavailable(), "{error}");
        calls += 1;
        if started.elapsed() >= Duration::from_secs(2) {
            return (calls, error);
        }
    }
}

/// `INFO stats`' `rejected_connections` (refused at `maxclients`), asked on the client's
/// shared connection: Redis has no room for another.
async fn rejected_connections(client: &mut ResilientClient) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(client)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("rejected_connections:"))
        .expect("INFO stats has rejected_connections")
        .trim()
        .parse()
        .unwrap()
}

/// A worker's `BLPOP` loop against a Redis at `maxclients`, which closes new connections
/// at once: every call fails saying so, and connections are tried at the backoff
/// schedule's pace (here 50, 100, 200, 400, 800 ms, no jitter), not once per call, as
/// they were (measured: ~720 a second, each refused). Once Redis has room, the next try
/// opens one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_for_blocking_calls_redis_has_no_room_for_are_tried_at_the_backoff_pace() {
    let server = RedisServer::start();
    let mut client = paced_client(&server.url()).await;
    // Room for the client's shared connection only (the one that sets this goes).
    assert_eq!(
        server.raw_command(&["CONFIG", "SET", "maxclients", "1"]),
        "OK"
    );
    let before = rejected_connections(&mut client).await;
    let (calls, error) = failing_blpops_for_2_s(&mut client).await;
    assert!(
        error.to_string().contains("connection of its own"),
        "{error}"
    );
    // Tried at ~0, 50, 150, 350 and 750 ms, and ~1.55 s.
    let tried = rejected_connections(&mut client).await - before;
    assert!(
        tried <= 8,
        "{tried} connections tried for {calls} calls in 2 s"
    );

    let () = redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", "100"])
        .query_async(&mut client)
        .await
        .unwrap();
    let () = client.rpush("queue", "a").await.unwrap();
    eventually(Duration::from_secs(2), async || {
        client
            .blpop::<_, Option<(String, String)>>("queue", 0.01)
            .await
            .is_ok_and(|popped| popped.is_some())
    })
    .await;
}

/// A middlebox that lets connections open and resets each at its first request, while
/// the shared connection, opened before, works: each blocking call's connection breaks
/// before it answered, which counts as a failed try, so they are opened at the backoff
/// schedule's pace (50, 100, 200, 400, 800 ms, no jitter), not one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_for_blocking_calls_reset_at_their_first_request_are_opened_at_the_backoff_pace()
 {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let mut client = paced_client(&proxy.url()).await;
    let () = client.set("k", "v").await.unwrap();
    // The shared connection's handshake, then the SET's reply.
    let handshake = proxy.first_connection_bytes() - "+OK\r\n".len() as u64;
    proxy.cut_each_connection_after(handshake);

    let before = proxy.connections();
    let (calls, _) = failing_blpops_for_2_s(&mut client).await;
    // Opened at ~0, 50, 150, 350 and 750 ms, and ~1.55 s.
    let opened = proxy.connections() - before;
    assert!(
        opened <= 8,
        "{opened} connections opened for {calls} calls in 2 s"
    );
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"), "the shared connection serves");
}
