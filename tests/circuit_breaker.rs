//! The circuit breaker against real redis-server processes that are killed, restarted and
//! paused.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::Value;
use support::RedisServer;
use tower::{Service, ServiceBuilder, ServiceExt, util::BoxCloneService};
use tower_redis_resilience::{
    Connector, Error, Request,
    circuit_breaker::{BreakerState, CircuitBreakerConfig, CircuitBreakerLayer, SlidingWindow},
    reconnect::{Reconnect, ReconnectConfig},
};

type Stack = BoxCloneService<Request, Value, Error>;

fn cmd(args: &[&str]) -> Request {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    Request::from(cmd)
}

async fn call(stack: &mut Stack, args: &[&str]) -> Result<Value, Error> {
    stack.ready().await?.call(cmd(args)).await
}

/// Breaker over a counter of the calls that get past it, over a reconnecting connection.
async fn stack(
    server: &RedisServer,
    config: CircuitBreakerConfig,
) -> (Stack, CircuitBreakerLayer, Arc<AtomicU64>) {
    stack_with(server, config, ReconnectConfig::new()).await
}

async fn stack_with(
    server: &RedisServer,
    config: CircuitBreakerConfig,
    reconnect: ReconnectConfig,
) -> (Stack, CircuitBreakerLayer, Arc<AtomicU64>) {
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .connect_timeout(Duration::from_millis(200));
    let redis = Reconnect::connect(connector, reconnect).await.unwrap();
    let breaker = CircuitBreakerLayer::new(config).unwrap();
    breaker.half_open_on_reconnect(redis.state()).unwrap();
    let passed = Arc::new(AtomicU64::new(0));
    let counter = passed.clone();
    let stack = ServiceBuilder::new()
        .layer(breaker.clone())
        .map_request(move |request: Request| {
            counter.fetch_add(1, Ordering::SeqCst);
            request
        })
        .service(redis);
    (BoxCloneService::new(stack), breaker, passed)
}

fn config() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .sliding_window(SlidingWindow::Count(20))
        .minimum_calls(10)
        // Far longer than the test: only the reconnect can end the open period in time.
        .wait_in_open(Duration::from_secs(30))
        .permitted_calls_in_half_open(3)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_when_redis_dies_rejects_without_the_network_and_closes_when_it_returns() {
    let mut server = RedisServer::start();
    let (mut stack, breaker, passed) = stack(&server, config()).await;
    assert_eq!(
        call(&mut stack, &["SET", "k", "v"]).await.unwrap(),
        Value::Okay
    );

    let server = blocking(move || {
        server.kill();
        server
    })
    .await;
    // The evidence: failed calls (a broken connection, then fail-fast "reconnecting").
    let mut failures = 0;
    while breaker.state() == BreakerState::Closed {
        let err = call(&mut stack, &["GET", "k"]).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        failures += 1;
        assert!(failures <= 10, "still closed after {failures} failures");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        failures, 9,
        "opens at minimum_calls: 1 success and 9 failures"
    );
    assert_eq!(breaker.metrics().failure_rate, Some(90.0));

    // Open: rejected at once, and nothing gets past the breaker.
    let reached = passed.load(Ordering::SeqCst);
    let mut took = Vec::new();
    for _ in 0..1_000 {
        let started = Instant::now();
        let err = call(&mut stack, &["GET", "k"]).await.unwrap_err();
        took.push(started.elapsed());
        assert!(err.is_circuit_open() && !err.may_have_run(), "{err}");
        let retry_in = err.retry_in().unwrap();
        assert!(retry_in > Duration::from_secs(25) && retry_in <= Duration::from_secs(30));
    }
    assert_eq!(
        passed.load(Ordering::SeqCst),
        reached,
        "no call reached Redis"
    );
    took.sort();
    let slowest = took[took.len() - 1];
    assert!(
        slowest < Duration::from_millis(10),
        "slowest rejection {slowest:?}"
    );
    eprintln!(
        "rejections: median {:?}, slowest {slowest:?}",
        took[took.len() / 2]
    );

    // Redis comes back on the same port: the reconnect ends the 30 s wait at once.
    let mut states = breaker.subscribe();
    let mut server = server;
    let restarted = blocking(move || {
        server.restart();
        (server, Instant::now())
    })
    .await;
    let (_server, restarted_at) = restarted;
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|state| *state == BreakerState::HalfOpen),
    )
    .await
    .expect("half-open within 5 s of the restart, not after wait_in_open")
    .unwrap();
    let half_open_after = restarted_at.elapsed();
    let mut probes = 0;
    while breaker.state() != BreakerState::Closed {
        match call(&mut stack, &["GET", "k"]).await {
            Ok(_) => probes += 1,
            Err(err) => assert!(err.is_circuit_open(), "{err}"),
        }
        assert!(
            restarted_at.elapsed() < Duration::from_secs(5),
            "not closed"
        );
    }
    assert_eq!(
        probes, 2,
        "2 of 3 probes succeeded: the 50 % failure rate is out of reach"
    );
    eprintln!(
        "after the restart: half-open in {half_open_after:?}, closed in {:?}",
        restarted_at.elapsed()
    );
    call(&mut stack, &["GET", "k"]).await.unwrap();
    let metrics = breaker.metrics();
    assert_eq!(
        (metrics.state, metrics.failed_calls),
        (BreakerState::Closed, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrongtype_storm_never_opens_it() {
    let server = RedisServer::start();
    let (mut stack, breaker, passed) = stack(&server, config()).await;
    call(&mut stack, &["SET", "s", "a string"]).await.unwrap();
    for _ in 0..500 {
        let err = call(&mut stack, &["LPUSH", "s", "x"]).await.unwrap_err();
        assert_eq!(err.server_code(), Some("WRONGTYPE"));
    }
    let metrics = breaker.metrics();
    assert_eq!(metrics.state, BreakerState::Closed);
    assert_eq!((metrics.calls, metrics.failed_calls), (20, 0));
    assert_eq!(passed.load(Ordering::SeqCst), 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_by_a_replica_never_open_it_and_reads_go_on() {
    let (replica, master) = (RedisServer::start(), RedisServer::start());
    replica.replicate(&master);
    // Connected to the replica on purpose: the connection stays (the breaker alone is
    // under test; following a failover is `Reconnect`'s, tested there).
    let reconnect = ReconnectConfig::new().reconnect_on_readonly(None);
    let (mut stack, breaker, _) = stack_with(&replica, config(), reconnect).await;
    for _ in 0..100 {
        let err = call(&mut stack, &["SET", "k", "v"]).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        call(&mut stack, &["GET", "k"])
            .await
            .expect("the replica serves reads");
    }
    let metrics = breaker.metrics();
    assert_eq!(metrics.state, BreakerState::Closed);
    assert_eq!(metrics.failed_calls, 0);
    drop(master);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outer_timeout_cannot_hide_a_stalled_server() {
    let server = RedisServer::start();
    let (stack, breaker, _) = stack(
        &server,
        config().slow_call_duration(Duration::from_millis(100)),
    )
    .await;
    let mut stack = stack;
    call(&mut stack, &["GET", "k"]).await.unwrap();

    server.pause();
    // The app gives up after 200 ms: the breaker sees no error, only dropped calls. (After
    // 3 of them Reconnect replaces the connection it thinks is stuck, and later calls fail
    // fast while it reconnects: failures too.)
    let (mut dropped, mut failed) = (0, 0);
    while breaker.state() == BreakerState::Closed {
        match tokio::time::timeout(Duration::from_millis(200), call(&mut stack, &["GET", "k"]))
            .await
        {
            Err(_) => dropped += 1,
            Ok(Err(err)) if err.is_unavailable() => failed += 1,
            Ok(other) => panic!("a paused server cannot answer: {other:?}"),
        }
        assert!(
            dropped + failed <= 9,
            "still closed after {dropped} dropped calls"
        );
    }
    assert!(dropped >= 3, "{dropped} dropped, {failed} failed");
    assert_eq!(dropped + failed, 9, "1 success and 9 failures");
    let metrics = breaker.metrics();
    assert_eq!((metrics.failed_calls, metrics.slow_calls), (9, dropped));
    let err = call(&mut stack, &["GET", "k"]).await.unwrap_err();
    assert!(err.is_circuit_open(), "{err}");
    server.resume();
}
