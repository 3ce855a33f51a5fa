//! Reconnect against real redis-server processes that are killed, restarted and paused.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::Value;
use support::{FaultProxy, RedisServer, eventually};
use tower::{Service, ServiceExt};
use tower_redis_resilience::{
    Connector, Error, Request,
    backoff::{ExponentialBackoff, Jitter},
    reconnect::{ConnectionState, Reconnect, ReconnectConfig},
};

fn get(key: &str) -> Request {
    Request::from(redis::cmd("GET").arg(key).to_owned())
}

async fn call(redis: &mut Reconnect, request: Request) -> Result<Value, Error> {
    redis.ready().await?.call(request).await
}

fn connector(url: &str) -> Connector {
    Connector::from_url(url)
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
}

/// Waits until the state satisfies `ready`, failing the test with `what` after `within`.
async fn wait_for_state(
    state: &mut tokio::sync::watch::Receiver<ConnectionState>,
    within: Duration,
    what: &str,
    ready: impl FnMut(&ConnectionState) -> bool,
) {
    tokio::time::timeout(within, state.wait_for(ready))
        .await
        .unwrap_or_else(|_| panic!("not {what} within {within:?}"))
        .expect("the Reconnect is alive");
}

/// Waits until the connection was given up for lost (`Reconnecting`), failing the test
/// after `within`.
async fn until_reconnecting(redis: &Reconnect, within: Duration) {
    let mut state = redis.state();
    wait_for_state(&mut state, within, "reconnecting", |state| {
        matches!(state, ConnectionState::Reconnecting { .. })
    })
    .await;
}

/// Runs a blocking harness operation without stalling the runtime's other tasks.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Three calls in a row dropped at a 100 ms deadline, as `why` says they must be: the
/// connection is suspect after them.
async fn three_calls_time_out(redis: &mut Reconnect, why: &str) {
    for _ in 0..3 {
        let outcome = tokio::time::timeout(Duration::from_millis(100), call(redis, get("k")));
        assert!(outcome.await.is_err(), "{why}");
    }
}

/// With writes paused (`CLIENT PAUSE WRITE`): an `INCR` the server holds, and two reads
/// queued behind it, each dropped at 100 ms; the connection is suspect after them.
async fn a_held_write_makes_it_suspect(redis: &mut Reconnect) {
    let incr = Request::from(redis::cmd("INCR").arg("n").to_owned());
    let deadline = Duration::from_millis(100);
    let held = tokio::time::timeout(deadline, call(redis, incr)).await;
    assert!(held.is_err(), "the write is held");
    for _ in 0..2 {
        let queued = tokio::time::timeout(deadline, call(redis, get("k"))).await;
        assert!(
            queued.is_err(),
            "a read behind the held write waits with it"
        );
    }
}

/// One connection opened by the reconnect loop, and through `proxy` at most one more:
/// the one opened beside it to ask Redis a `PING`, kept.
fn one_connection_and_at_most_one_beside(redis: &Reconnect, proxy: &FaultProxy) {
    assert_eq!(redis.stats().attempts, 1, "{:?}", redis.stats());
    let connections = proxy.connections();
    assert!(connections <= 2, "{connections} connections");
}

/// Calls until one succeeds; returns when it did. Every failure must be immediate.
async fn until_ok(redis: &mut Reconnect, limit: Duration) -> Instant {
    let started = Instant::now();
    loop {
        let before = Instant::now();
        let result = call(redis, get("k")).await;
        assert!(
            before.elapsed() < Duration::from_millis(100),
            "a call took {:?}",
            before.elapsed()
        );
        match result {
            Ok(_) => return Instant::now(),
            Err(err) => assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}"),
        }
        assert!(started.elapsed() < limit, "no success within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_by_itself_within_100ms_of_a_restarted_server_accepting() {
    let mut server = RedisServer::start();
    let mut redis = Reconnect::connect(connector(&server.url()), ReconnectConfig::new())
        .await
        .unwrap();
    call(&mut redis, get("k")).await.unwrap();

    server = blocking(move || {
        server.kill();
        server
    })
    .await;
    let err = call(&mut redis, get("k")).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = call(&mut redis, get("k")).await.unwrap_err();
    assert!(err.to_string().contains("reconnecting, attempt"), "{err}");
    assert!(!err.may_have_run());

    let (server, back) = blocking(move || {
        server.restart();
        (server, Instant::now())
    })
    .await;
    let first_success = until_ok(&mut redis, Duration::from_secs(2)).await;
    let recovery = first_success.duration_since(back);
    assert!(
        recovery < Duration::from_millis(100),
        "recovered {recovery:?} after the server was back"
    );
    assert_eq!(*redis.state().borrow(), ConnectionState::Connected);
    assert_eq!(redis.stats().successes, 2, "{:?}", redis.stats());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_connection_to_a_paused_server_is_replaced_after_resume() {
    let server = RedisServer::start();
    let ping_timeout = Duration::from_millis(300);
    let config = ReconnectConfig::new().stuck_ping_timeout(ping_timeout);
    let mut redis = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap();
    call(&mut redis, get("k")).await.unwrap();
    let deadline = Duration::from_millis(100);
    let grace = Duration::from_millis(50);

    server.pause();
    // The outer deadline drops each call; three in a row make the connection suspect.
    for _ in 0..3 {
        let started = Instant::now();
        let outcome = tokio::time::timeout(deadline, call(&mut redis, get("k"))).await;
        assert!(outcome.is_err(), "a paused server cannot answer");
        assert!(started.elapsed() < deadline + grace);
    }
    let suspect = Instant::now();
    // Out of use at once: calls fail fast while a PING asks whether it is stuck.
    let err = call(&mut redis, get("k")).await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(err.to_string().contains("PING"), "{err}");
    assert_eq!(*redis.state().borrow(), ConnectionState::Suspect);
    // The paused server does not answer the PING, so the connection goes.
    until_reconnecting(&redis, ping_timeout + grace).await;
    assert!(
        suspect.elapsed() >= ping_timeout - Duration::from_millis(20),
        "replaced after the PING's time, not before: {:?}",
        suspect.elapsed()
    );
    // While the paused server cannot complete a handshake, calls fail fast.
    for _ in 0..5 {
        let started = Instant::now();
        let outcome = tokio::time::timeout(deadline, call(&mut redis, get("k"))).await;
        let err = outcome.expect("fails fast instead of waiting").unwrap_err();
        assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
        assert!(started.elapsed() < deadline + grace);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    server.resume();
    until_ok(&mut redis, Duration::from_secs(3)).await;
    assert!(redis.stats().successes >= 2, "{:?}", redis.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_servers_connection_is_replaced_on_time_while_one_beside_it_still_opens() {
    let server = RedisServer::start();
    // The side connection's handshake waits out this, far past the PING's time.
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(3));
    let ping_timeout = Duration::from_millis(300);
    let config = ReconnectConfig::new().stuck_ping_timeout(ping_timeout);
    let mut redis = Reconnect::connect(connector, config).await.unwrap();
    call(&mut redis, get("k")).await.unwrap();
    server.pause();
    three_calls_time_out(&mut redis, "a paused server cannot answer").await;
    let suspect = Instant::now();
    until_reconnecting(&redis, ping_timeout + Duration::from_millis(150)).await;
    assert!(suspect.elapsed() >= ping_timeout - Duration::from_millis(20));
    server.resume();
    until_ok(&mut redis, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_keeps_its_connection_while_calls_time_out() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let mut redis = Reconnect::connect(connector(&proxy.url()), ReconnectConfig::new())
        .await
        .unwrap();
    call(&mut redis, get("k")).await.unwrap();

    // Every reply comes, 300 ms late: past the callers' 100 ms, well within the PING's
    // second. Before the PING decided, the connection went every three timeouts.
    proxy.delay_replies(Duration::from_millis(300));
    let deadline = Duration::from_millis(100);
    let (mut dropped, mut refused) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(deadline, call(&mut redis, get("k"))).await {
            Err(_) => dropped += 1,
            // While a PING asks, calls fail fast, unsent.
            Ok(Err(err)) if err.is_unavailable() && !err.may_have_run() => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(other) => panic!("no reply comes within the deadline: {other:?}"),
        }
    }
    // Three timeouts, a PING answered in ~300 ms, and again: about three rounds.
    assert!(dropped >= 6, "{dropped} calls timed out");
    assert!(refused >= 10, "{refused} calls failed fast");
    let state = *redis.state().borrow();
    assert!(
        matches!(state, ConnectionState::Connected | ConnectionState::Suspect),
        "{state:?}"
    );
    // Beside it, one connection was opened to ask Redis a `PING` (does it answer on
    // another connection, as when only this one is held up?), and kept for each later
    // round: not one a round.
    one_connection_and_at_most_one_beside(&redis, &proxy);
    assert!(
        redis.stats().blocking_connections <= 1,
        "{:?}",
        redis.stats()
    );

    // Fast again: served on the same connection.
    proxy.delay_replies(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(400)).await;
    call(&mut redis, get("k")).await.unwrap();
    one_connection_and_at_most_one_beside(&redis, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_for_a_suspect_connection_goes_out_on_it_once_it_answers() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let config = ReconnectConfig::new().max_wait(Duration::from_secs(2));
    let mut redis = Reconnect::connect(connector(&proxy.url()), config)
        .await
        .unwrap();
    call(&mut redis, get("k")).await.unwrap();

    proxy.delay_replies(Duration::from_millis(300));
    three_calls_time_out(&mut redis, "no reply within 100 ms").await;
    // Suspect now: this call waits for it, and goes out on it once the PING is answered
    // (~300 ms), then waits its own reply (~300 ms). Not the whole `max_wait`.
    let started = Instant::now();
    call(&mut redis, get("k")).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1200), "took {took:?}");
    assert!(
        took >= Duration::from_millis(500),
        "took {took:?}: sent before the PING"
    );
    // The one connection, and perhaps one asked a `PING` beside it.
    one_connection_and_at_most_one_beside(&redis, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_beside_a_connection_that_a_write_pause_holds_up() {
    let server = RedisServer::start();
    assert_eq!(server.raw_command(&["SET", "k", "v"]), "OK");
    let mut redis = Reconnect::connect(connector(&server.url()), ReconnectConfig::new())
        .await
        .unwrap();
    assert_eq!(
        call(&mut redis, get("k")).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );

    // As Redis's `FAILOVER` and `CLUSTER FAILOVER` do while the replica catches up: the
    // server serves reads, but holds a write, and with it every command sent after it
    // on the same connection.
    assert_eq!(
        server.raw_command(&["CLIENT", "PAUSE", "3000", "WRITE"]),
        "OK"
    );
    let paused = Instant::now();
    let incr = Request::from(redis::cmd("INCR").arg("n").to_owned());
    let deadline = Duration::from_millis(100);
    a_held_write_makes_it_suspect(&mut redis).await;
    assert_eq!(*redis.state().borrow(), ConnectionState::Suspect);

    // The suspect connection's PING waits behind the write too, but Redis answers one
    // on another connection: reads go there, at once. And past the PING's second the
    // suspect connection is kept, since Redis says it holds its write up: a new one would
    // be held by the next write as well.
    let mut served = 0;
    while paused.elapsed() < Duration::from_millis(2000) {
        let started = Instant::now();
        match tokio::time::timeout(deadline, call(&mut redis, get("k"))).await {
            Ok(Ok(value)) => {
                assert_eq!(value, Value::BulkString(b"v".to_vec()));
                assert!(started.elapsed() < Duration::from_millis(50));
                served += 1;
            }
            // Only until the side connection has answered its `PING`.
            Ok(Err(err)) => {
                assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
                assert_eq!(served, 0, "a read failed after others were served: {err}");
            }
            Err(_) => panic!("a read waited out its deadline"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(served >= 100, "{served} reads served during the pause");
    assert_eq!(redis.stats().side_reads, served);
    assert_eq!(*redis.state().borrow(), ConnectionState::Suspect);
    // Writes fail fast, unsent; so does `PFCOUNT`, which the pause holds as well.
    for held_too in [
        incr,
        Request::from(redis::cmd("PFCOUNT").arg("h").to_owned()),
    ] {
        let err = tokio::time::timeout(deadline, call(&mut redis, held_too))
            .await
            .expect("fails fast")
            .unwrap_err();
        assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    }
    assert_eq!(redis.stats().attempts, 1, "{:?}", redis.stats());
    assert_eq!(redis.stats().blocking_connections, 1, "{:?}", redis.stats());

    // Once the pause ends, the held connection answers its PING, and serves again.
    assert_eq!(server.raw_command(&["CLIENT", "UNPAUSE"]), "OK");
    let mut state = redis.state();
    wait_for_state(&mut state, Duration::from_secs(1), "connected", |state| {
        *state == ConnectionState::Connected
    })
    .await;
    let set = Request::from(redis::cmd("SET").arg("k").arg("w").to_owned());
    eventually_ok(&mut redis, set).await;
    assert_eq!(redis.stats().attempts, 1, "{:?}", redis.stats());
}

/// A connection through a proxy, with a 400 ms `PING` timeout, that the proxy then cuts
/// off as a middlebox that forgot it would: what is sent on it never arrives, while new
/// connections work. Answers once it is suspect and reads are served beside it, with
/// when it was found suspect.
async fn cut_off_while_redis_answers_beside() -> (RedisServer, FaultProxy, Reconnect, Instant) {
    let server = RedisServer::start();
    assert_eq!(server.raw_command(&["SET", "k", "v"]), "OK");
    let proxy = FaultProxy::start(server.port()).await;
    let config = ReconnectConfig::new().stuck_ping_timeout(CUT_OFF_PING_TIMEOUT);
    let mut redis = Reconnect::connect(connector(&proxy.url()), config)
        .await
        .unwrap();
    call(&mut redis, get("k")).await.unwrap();
    proxy.silence_open_connections();
    three_calls_time_out(&mut redis, "nothing arrives").await;
    let suspect = Instant::now();
    let mut beside = redis.clone();
    eventually(Duration::from_secs(1), async || {
        call(&mut beside, get("k")).await.is_ok()
    })
    .await;
    (server, proxy, redis, suspect)
}

/// The `PING` timeout of [`cut_off_while_redis_answers_beside`].
const CUT_OFF_PING_TIMEOUT: Duration = Duration::from_millis(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_off_while_redis_answers_beside_it_is_replaced_at_its_pings_time() {
    // From the client a cut-off connection looks like a held one; the server sees it
    // idle, not holding anything up, so it is replaced at its PING's time.
    let (_server, _proxy, mut redis, suspect) = cut_off_while_redis_answers_beside().await;
    let ping_timeout = CUT_OFF_PING_TIMEOUT;
    until_reconnecting(&redis, ping_timeout + Duration::from_millis(300)).await;
    assert!(suspect.elapsed() >= ping_timeout - Duration::from_millis(20));
    until_ok(&mut redis, Duration::from_secs(2)).await;
    let set = Request::from(redis::cmd("SET").arg("k").arg("w").to_owned());
    eventually_ok(&mut redis, set).await;
}

/// A connection cut off while Redis answers beside it is replaced at its `PING`'s time,
/// and its successor may take a while to open (a server slow to take connections, a
/// handshake far away): reads go on beside it until the successor is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_beside_a_replaced_connection_until_its_successor_opens() {
    let (server, proxy, mut redis, _) = cut_off_while_redis_answers_beside().await;
    // Within the connector's 200 ms connect timeout.
    proxy.delay_new_connections(Duration::from_millis(150));
    until_reconnecting(&redis, CUT_OFF_PING_TIMEOUT + Duration::from_millis(300)).await;
    let state = redis.state();
    let (mut served, mut missed) = (0, 0);
    while matches!(*state.borrow(), ConnectionState::Reconnecting { .. }) {
        match call(&mut redis, get("k")).await {
            Ok(_) => served += 1,
            Err(err) => {
                assert!(err.is_unavailable(), "{err}");
                missed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        served >= 5 && missed == 0,
        "served {served}, missed {missed}"
    );
    assert_eq!(*state.borrow(), ConnectionState::Connected);
    let set = Request::from(redis::cmd("SET").arg("k").arg("w").to_owned());
    eventually_ok(&mut redis, set).await;
    assert_eq!(redis.stats().attempts, 2, "{:?}", redis.stats());
    // The connection beside it closes with the successor in place: the server keeps the
    // successor and the harness's own.
    eventually(Duration::from_secs(1), async || {
        server.raw_command(&["CLIENT", "LIST"]).lines().count() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stalls_while_reads_go_beside_its_held_connection_fails_reads_fast_again() {
    let server = RedisServer::start();
    assert_eq!(server.raw_command(&["SET", "k", "v"]), "OK");
    let ping_timeout = Duration::from_millis(400);
    let config = ReconnectConfig::new().stuck_ping_timeout(ping_timeout);
    let mut redis = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap();
    call(&mut redis, get("k")).await.unwrap();
    assert_eq!(
        server.raw_command(&["CLIENT", "PAUSE", "10000", "WRITE"]),
        "OK"
    );
    a_held_write_makes_it_suspect(&mut redis).await;
    let suspect = Instant::now();
    let mut beside = redis.clone();
    eventually(Duration::from_secs(1), async || {
        call(&mut beside, get("k")).await.is_ok()
    })
    .await;
    assert!(redis.stats().side_reads > 0, "{:?}", redis.stats());
    // Past the PING's time: Redis said it holds the connection's write up, so it is kept.
    tokio::time::sleep_until((suspect + ping_timeout + Duration::from_millis(200)).into()).await;
    assert_eq!(*redis.state().borrow(), ConnectionState::Suspect);

    // Now Redis stalls: asked again whether it holds the connection up, it does not
    // answer, and the held connection is replaced then (not at the end of the longest
    // wait, ten times its PING's time); reads no longer go beside it.
    server.pause();
    until_reconnecting(&redis, 2 * ping_timeout + Duration::from_millis(400)).await;
    // Calls fail fast again, rather than wait out their deadline on the side connection.
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(1), call(&mut redis, get("k")))
        .await
        .expect("not waiting on the side connection to the stalled server")
        .unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(50));
    server.resume();
}

/// Sends `request` until it succeeds, for at most 3 s.
async fn eventually_ok(redis: &mut Reconnect, request: Request) {
    let started = Instant::now();
    while let Err(err) = call(redis, request.clone()).await {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still failing: {err}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_while_the_connection_is_out_of_use() {
    let master = RedisServer::start();
    let replica = RedisServer::start();
    replica.replicate(&master);
    assert_eq!(master.raw_command(&["SET", "k", "v"]), "OK");
    replica.catch_up(&master);
    let to_replica = Reconnect::connect(
        connector(&replica.url()),
        ReconnectConfig::new().reconnect_on_readonly(None),
    )
    .await
    .unwrap();
    let config = ReconnectConfig::new().read_replica(to_replica);
    let mut redis = Reconnect::connect(connector(&master.url()), config)
        .await
        .unwrap();
    assert_eq!(
        call(&mut redis, get("k")).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );

    // Stalled: three calls time out, and the connection is out of use while a PING asks.
    master.pause();
    three_calls_time_out(&mut redis, "a paused server cannot answer").await;
    assert_eq!(*redis.state().borrow(), ConnectionState::Suspect);
    // Reads are served by the replica, at once; writes are refused, unsent.
    let started = Instant::now();
    assert_eq!(
        call(&mut redis, get("k")).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );
    assert!(started.elapsed() < Duration::from_millis(50));
    let set = Request::from(redis::cmd("SET").arg("k").arg("w").to_owned());
    let err = call(&mut redis, set).await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    // And once the connection is given up for lost, as well.
    until_reconnecting(&redis, Duration::from_secs(2)).await;
    assert_eq!(
        call(&mut redis, get("k")).await.unwrap(),
        Value::BulkString(b"v".to_vec())
    );
    assert_eq!(redis.stats().replica_reads, 2);
    master.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_tasks_through_a_three_second_outage() {
    let mut server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    // Equal jitter so the fewest possible delays give a firm upper bound on attempts.
    let config = ReconnectConfig::new().backoff(
        ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
            .jitter(Jitter::Equal)
            .fast_phase(Duration::from_millis(25), Duration::from_secs(2)),
    );
    let redis = Reconnect::connect(connector(&proxy.url()), config)
        .await
        .unwrap();
    let bound = Duration::from_millis(200);
    let slowest = Arc::new(AtomicU64::new(0));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Instant::now() + Duration::from_millis(4500);

    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut redis = redis.clone();
            let (slowest, ok, failed) = (slowest.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let started = Instant::now();
                    match tokio::time::timeout(bound, call(&mut redis, get("k"))).await {
                        Ok(Ok(_)) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    slowest.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proxy.connections();
    server = blocking(move || {
        server.kill();
        server
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = proxy.connections() - before;
    let attempts_during = redis.stats().attempts - 1;
    server = blocking(move || {
        server.restart();
        server
    })
    .await;
    for task in tasks {
        task.await.expect("no task panicked");
    }

    let slowest = Duration::from_micros(slowest.load(Ordering::Relaxed));
    assert!(
        slowest < bound + Duration::from_millis(50),
        "a call took {slowest:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 0 && failed.load(Ordering::Relaxed) > 0);
    // One loop for all 64 tasks: the proxy saw exactly the loop's attempts, and no more
    // than the schedule allows in 3 s (fast phase: 2 s at >= 12.5 ms, then >= 25, 50,
    // 100, 200, 400 ms): 160 + 5, plus slack for the attempt in flight.
    assert!(
        during.abs_diff(attempts_during) <= 1,
        "proxy saw {during}, loop made {attempts_during}"
    );
    assert!(during <= 170, "{during} connection attempts in 3 s");
    // The restarted server counts from zero: one connection shared by all 64 tasks, plus
    // the one this INFO comes over.
    let connections = server.info_field("total_connections_received");
    assert_eq!(connections, "2", "64 tasks must share one new connection");
    assert_eq!(*redis.state().borrow(), ConnectionState::Connected);
}

#[tokio::test]
async fn wrong_password_fails_calls_with_the_reason_at_a_bounded_attempt_rate() {
    let server = RedisServer::config().password("right").start();
    let url = format!("redis://:wrong@127.0.0.1:{}", server.port());
    let config = ReconnectConfig::new().backoff(ExponentialBackoff::new(
        Duration::from_millis(10),
        Duration::from_millis(300),
    ));
    let mut redis = Reconnect::lazy(connector(&url), config).unwrap();

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stats = redis.stats();
    // Attempts at 0 ms, then every 300 ms: at most 4 in one second.
    assert!(stats.attempts <= 4 && stats.attempts >= 2, "{stats:?}");
    assert_eq!(stats.successes, 0);
    let err = call(&mut redis, get("k")).await.unwrap_err();
    assert!(err.is_config(), "{err:?}");
    assert!(!err.may_have_run());
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(
        !format!("{err} {err:?} {redis:?}").contains("wrong@"),
        "password shown"
    );
}

#[tokio::test]
async fn lazy_start_with_no_server_comes_up_by_itself() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();

    let mut redis = Reconnect::lazy(connector(&url), ReconnectConfig::new()).unwrap();
    let err = call(&mut redis, get("k")).await.unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
    assert!(
        Reconnect::connect(connector(&url), ReconnectConfig::new())
            .await
            .is_err(),
        "eager start reports the error"
    );

    server.restart();
    let mut state = redis.state();
    wait_for_state(
        &mut state,
        Duration::from_secs(2),
        "connected by itself",
        |s| *s == ConnectionState::Connected,
    )
    .await;
    assert_eq!(call(&mut redis, get("k")).await.unwrap(), Value::Nil);
}

#[tokio::test]
async fn health_check_finds_a_stalled_server_without_user_traffic() {
    let server = RedisServer::start();
    let config =
        ReconnectConfig::new().health_check(Duration::from_millis(100), Duration::from_millis(50));
    let mut redis = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap();
    let mut state = redis.state();

    server.pause();
    wait_for_state(
        &mut state,
        Duration::from_secs(1),
        "the health check noticed",
        |s| *s != ConnectionState::Connected,
    )
    .await;
    server.resume();
    wait_for_state(
        &mut state,
        Duration::from_secs(3),
        "reconnected after resume",
        |s| *s == ConnectionState::Connected,
    )
    .await;
    call(&mut redis, get("k")).await.unwrap();
}

fn incr(key: &str) -> Request {
    Request::from(redis::cmd("INCR").arg(key).to_owned())
}

/// Redis closes the idle connection (`CLIENT KILL`, its `timeout` setting, a restart, a
/// proxy's idle timeout): the connection's task sees it at once, and so does `Reconnect`,
/// which opens another before the next call needs it. That call is served at once, where
/// it found the connection closed, and waited for the new one; a health report taken
/// meanwhile said Redis was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_redis_closes_while_idle_is_replaced_before_the_next_call() {
    let server = RedisServer::start();
    let close_idle_connections = || {
        let killed: u32 = server
            .raw_command(&["CLIENT", "KILL", "TYPE", "normal"])
            .parse()
            .unwrap();
        assert!(killed >= 1);
    };
    // No health check: the close alone is what tells it.
    let config = ReconnectConfig::new().without_health_check();
    let mut redis = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap();
    assert_eq!(call(&mut redis, incr("n")).await.unwrap(), Value::Int(1));
    close_idle_connections();
    eventually(Duration::from_secs(2), async || {
        redis.stats().successes == 2 && *redis.state().borrow() == ConnectionState::Connected
    })
    .await;
    assert_eq!(redis.stats().attempts, 2);
    assert_eq!(call(&mut redis, incr("n")).await.unwrap(), Value::Int(2));

    // A call on the closed connection itself knows it was not sent (redis-rs alone
    // reports it as it reports a request lost in flight: it may have run), so an `INCR`
    // could be sent again.
    let mut leaf = connector(&server.url()).connect().await.unwrap();
    close_idle_connections();
    // The connection's task sees the close within microseconds; this is ample.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = leaf
        .ready()
        .await
        .unwrap()
        .call(incr("n"))
        .await
        .unwrap_err();
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
}

/// The TCP timers (`/proc/net/tcp`'s `tr`: 2 is keepalive) of this machine's established
/// connections to `port`, seen from the client's end.
fn tcp_timers_to(port: u16) -> Vec<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(fields.get(2)?.split(':').nth(1)?, 16).ok()?;
            let established = *fields.get(3)? == "01";
            let timer = u8::from_str_radix(fields.get(5)?.split(':').next()?, 16).ok()?;
            (established && remote_port == port).then_some(timer)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tcp_keepalive_the_leaf_still_runs_the_connection_and_sees_it_close() {
    use redis::{
        IntoConnectionInfo,
        io::tcp::{TcpSettings, socket2::TcpKeepalive},
    };

    let server = RedisServer::start();
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(30));
    let info = server
        .url()
        .into_connection_info()
        .unwrap()
        .set_tcp_settings(TcpSettings::default().set_keepalive(keepalive));
    let connector = Connector::from_connection_info(info).unwrap();
    let mut redis = Reconnect::connect(connector, ReconnectConfig::new())
        .await
        .unwrap();
    assert_eq!(call(&mut redis, incr("n")).await.unwrap(), Value::Int(1));
    assert_eq!(
        tcp_timers_to(server.port()),
        [2],
        "the one connection, idle, has its keepalive timer running"
    );

    // As without socket options: the connection's task sees Redis close the idle
    // connection, and another is opened before the next call.
    let killed = server.raw_command(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert_eq!(killed, "1");
    eventually(Duration::from_secs(2), async || {
        redis.stats().successes == 2
    })
    .await;
    assert_eq!(call(&mut redis, incr("n")).await.unwrap(), Value::Int(2));
}

#[tokio::test]
async fn on_connect_hook_runs_on_every_new_connection() {
    let server = RedisServer::start();
    let runs = Arc::new(AtomicU64::new(0));
    let counter = runs.clone();
    let config = ReconnectConfig::new().on_connect(move |mut redis| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let setname =
                Request::from(redis::cmd("CLIENT").arg("SETNAME").arg("hooked").to_owned());
            redis.ready().await?.call(setname).await.map(|_| ())
        }
    });
    let mut redis = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap();
    let name = call(
        &mut redis,
        Request::from(redis::cmd("CLIENT").arg("GETNAME").to_owned()),
    )
    .await;
    assert_eq!(name.unwrap(), Value::BulkString(b"hooked".to_vec()));

    redis.reconnect();
    let mut state = redis.state();
    wait_for_state(&mut state, Duration::from_secs(2), "reconnected", |s| {
        *s == ConnectionState::Connected
    })
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let name = call(
        &mut redis,
        Request::from(redis::cmd("CLIENT").arg("GETNAME").to_owned()),
    )
    .await;
    assert_eq!(name.unwrap(), Value::BulkString(b"hooked".to_vec()));
}

#[tokio::test]
async fn failing_hook_fails_the_attempt() {
    let server = RedisServer::start();
    let config =
        ReconnectConfig::new().on_connect(|_| async { Err(Error::unavailable("hook says no")) });
    let err = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("hook says no"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropped_during_an_outage_stops_reconnecting() {
    let mut server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let mut redis = Reconnect::connect(connector(&proxy.url()), ReconnectConfig::new())
        .await
        .unwrap();
    server.kill();
    // The call finds the connection gone, and the loop starts: an attempt every ~25 ms.
    assert!(call(&mut redis, get("k")).await.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(proxy.connections() > 3, "the loop runs");
    drop(redis);
    // An attempt under way when the last handle went may still finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_drop = proxy.connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        proxy.connections(),
        after_drop,
        "no attempt once every handle is gone"
    );
}

#[tokio::test]
async fn a_hook_that_panics_fails_one_attempt_and_the_loop_goes_on() {
    let server = RedisServer::start();
    let runs = Arc::new(AtomicU64::new(0));
    let counter = runs.clone();
    let config = ReconnectConfig::new()
        .backoff(tower_redis_resilience::backoff::ExponentialBackoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ))
        .on_connect(move |_| {
            let run = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                assert!(run != 2, "a bug in the application's hook");
                Ok(())
            }
        });
    let mut redis = Reconnect::connect(connector(&server.url()), config)
        .await
        .unwrap();
    redis.reconnect();
    let mut state = redis.state();
    // The second run panics: a config error, and the loop tries again at its slowest.
    wait_for_state(&mut state, Duration::from_secs(2), "reconnected", |s| {
        *s == ConnectionState::Connected
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(call(&mut redis, get("k")).await.unwrap(), Value::Nil);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_wait_lets_calls_wait_for_the_connection_but_never_longer() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let config = ReconnectConfig::new().max_wait(Duration::from_millis(150));
    let mut redis = Reconnect::lazy(connector(&url), config).unwrap();

    let started = Instant::now();
    let err = call(&mut redis, get("k")).await.unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        waited >= Duration::from_millis(140) && waited < Duration::from_millis(250),
        "{waited:?}"
    );

    let patient = ReconnectConfig::new().max_wait(Duration::from_secs(3));
    let mut patient = Reconnect::lazy(connector(&url), patient).unwrap();
    let pending = tokio::spawn(async move { call(&mut patient, get("k")).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _server = blocking(move || {
        server.restart();
        server
    })
    .await;
    assert_eq!(
        pending.await.unwrap().unwrap(),
        Value::Nil,
        "the waiting call was served"
    );
}

#[tokio::test]
async fn exhausted_schedule_fails_until_reconnect_is_asked_for() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let config = ReconnectConfig::new().backoff(
        ExponentialBackoff::new(Duration::from_millis(5), Duration::from_millis(5)).max_attempts(2),
    );
    let mut redis = Reconnect::lazy(connector(&url), config).unwrap();
    let mut state = redis.state();
    wait_for_state(
        &mut state,
        Duration::from_secs(2),
        "gave up after the schedule ran out",
        |s| *s == ConnectionState::Failed,
    )
    .await;
    assert_eq!(
        redis.stats().attempts,
        3,
        "the first attempt and one per delay"
    );
    let err = call(&mut redis, get("k")).await.unwrap_err();
    assert!(
        err.is_unavailable() && err.to_string().contains("gave up"),
        "{err}"
    );

    server.restart();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *redis.state().borrow(),
        ConnectionState::Failed,
        "no attempts after giving up"
    );
    redis.reconnect();
    wait_for_state(
        &mut state,
        Duration::from_secs(2),
        "reconnect() starts over",
        |s| *s == ConnectionState::Connected,
    )
    .await;
    call(&mut redis, get("k")).await.unwrap();
}

fn set(key: &str, value: &str) -> Request {
    Request::from(redis::cmd("SET").arg(key).arg(value).to_owned())
}

/// Makes `old` a replica of `new`, as a failover leaves the master it demoted, and points
/// the proxy (the address clients know) at `new`.
fn fail_over(old: &RedisServer, new: &RedisServer, proxy: &FaultProxy) {
    old.replicate(new);
    proxy.retarget(new.port());
}

/// A master, a standby, the address clients know (a proxy to the master, as a DNS name
/// would be), and a `Reconnect` with the default settings through that address.
async fn behind_an_address() -> (RedisServer, RedisServer, FaultProxy, Reconnect) {
    let (master, standby) = (RedisServer::start(), RedisServer::start());
    let proxy = FaultProxy::start(master.port()).await;
    let redis = Reconnect::connect(connector(&proxy.url()), ReconnectConfig::new())
        .await
        .unwrap();
    (master, standby, proxy, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_is_followed_once_a_write_reaches_the_demoted_master() {
    let (old, new, proxy, mut redis) = behind_an_address().await;
    call(&mut redis, set("k", "before")).await.unwrap();
    fail_over(&old, &new, &proxy);

    // Reads still work on the old connection; the first write finds the replica.
    call(&mut redis, get("k")).await.unwrap();
    let err = call(&mut redis, set("k", "after")).await.unwrap_err();
    assert_eq!(err.server_code(), Some("READONLY"), "{err:?}");
    assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");

    // The next writes reach the new master, through one new connection; until it is up
    // they reach the replica, and reads never fail.
    let started = Instant::now();
    loop {
        match call(&mut redis, set("k", "after")).await {
            Ok(_) => break,
            Err(err) => assert_eq!(err.server_code(), Some("READONLY"), "{err:?}"),
        }
        call(&mut redis, get("k")).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "never reached the new master"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(proxy.connections(), 2, "one new connection");
    assert_eq!(redis.stats().successes, 2, "{:?}", redis.stats());
    let value = blocking(move || new.raw_command(&["GET", "k"])).await;
    assert_eq!(value, "after");
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_pipeline_with_a_refused_write_also_follows_the_failover() {
    let (old, new, proxy, mut redis) = behind_an_address().await;
    fail_over(&old, &new, &proxy);

    let mut pipeline = redis::pipe();
    pipeline.get("k").set("k", "v");
    // Redis could not serve the write: the pipeline fails as a whole, its read may have
    // run.
    let err = call(&mut redis, Request::from(pipeline)).await.unwrap_err();
    assert_eq!(err.server_code(), Some("READONLY"), "{err:?}");
    assert!(err.is_unavailable() && err.may_have_run(), "{err:?}");
    tokio::time::timeout(Duration::from_secs(2), async {
        while let Err(err) = call(&mut redis, set("k", "v")).await {
            assert_eq!(err.server_code(), Some("READONLY"), "{err:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("reconnected to the new master");
    assert_eq!(proxy.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stays_a_replica_costs_one_new_connection_per_interval_not_per_write() {
    let (replica, master) = (RedisServer::start(), RedisServer::start());
    replica.replicate(&master);
    let proxy = FaultProxy::start(replica.port()).await;
    // An interval far longer than the test: every write after the first reconnect is
    // within it.
    let config = ReconnectConfig::new().reconnect_on_readonly(Some(Duration::from_secs(600)));
    let mut redis = Reconnect::connect(connector(&proxy.url()), config)
        .await
        .unwrap();
    for _ in 0..200 {
        let err = call(&mut redis, set("k", "v")).await.unwrap_err();
        assert_eq!(err.server_code(), Some("READONLY"), "{err:?}");
        // The connection serves reads while its replacement is made, and after.
        call(&mut redis, get("k")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        proxy.connections(),
        2,
        "one reconnect for 200 refused writes"
    );
    call(&mut redis, get("k"))
        .await
        .expect("reads from the replica still work");

    // Turned off, as for reads from a replica on purpose: the connection stays.
    let config = ReconnectConfig::new().reconnect_on_readonly(None);
    let proxy = FaultProxy::start(replica.port()).await;
    let mut redis = Reconnect::connect(connector(&proxy.url()), config)
        .await
        .unwrap();
    for _ in 0..50 {
        let err = call(&mut redis, set("k", "v")).await.unwrap_err();
        assert_eq!(err.server_code(), Some("READONLY"), "{err:?}");
    }
    assert_eq!(proxy.connections(), 1);
    drop(master);
}

/// A load balancer or firewall that lets connections open and resets each at its first
/// request: each one breaks before it answered a call, so the next is opened at the
/// schedule's pace (here 50, 100, 200, 400, 800 ms, then 1 s steps, no jitter), not at
/// the next call, as it was: one connection per failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_at_their_first_request_are_opened_at_the_backoff_pace() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    // The handshake's bytes, from a first connection.
    drop(connector(&proxy.url()).connect().await.unwrap());
    let handshake = proxy.first_connection_bytes();
    assert!(handshake > 0);
    proxy.cut_each_connection_after(handshake);
    let backoff = ExponentialBackoff::new(Duration::from_millis(50), Duration::from_secs(1))
        .jitter(Jitter::None);
    let config = ReconnectConfig::new()
        .backoff(backoff)
        .without_health_check();
    let redis = Reconnect::connect(connector(&proxy.url()), config)
        .await
        .unwrap();
    let started = Instant::now();
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let mut redis = redis.clone();
            tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(3) {
                    let error = call(&mut redis, get("k")).await.unwrap_err();
                    assert!(error.is_unavailable(), "{error}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    // The first connection measured the handshake. The client's first is replaced at
    // once; the next ones opened at ~50, ~150, ~350, ~750 ms, ~1.55 and ~2.55 s. Before:
    // one per failed call, hundreds.
    let opened = proxy.connections() - 1;
    assert!((3..=10).contains(&opened), "{opened} connections in 3 s");
}
