//! The assembled client against real redis-server processes: built lazily or eagerly,
//! through a kill and a restart, with layers removed, and wrapped in tower's own layers.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{AsyncCommands, Value};
use support::{FaultProxy, RedisServer, current_thread_runtime, eventually};
use tower::{
    BoxError, Service, ServiceBuilder, ServiceExt, load_shed::error::Overloaded,
    util::BoxCloneService,
};
use tower_redis_resilience::{
    Connector, Error, HealthStatus, MakeConnection, Request, ResilientClient,
    circuit_breaker::{BreakerState, CircuitBreakerConfig},
    metrics::Outcome,
    reconnect::{ConnectionState, ReconnectConfig},
    timeout::TimeoutLayer,
};

/// The default stack, connected to `server`.
async fn client(server: &RedisServer) -> ResilientClient {
    ResilientClient::builder(&server.url())
        .connect()
        .await
        .unwrap()
}

fn assert_send_sync_static<T: Send + Sync + 'static>() {}

#[test]
fn the_client_can_live_in_shared_state() {
    assert_send_sync_static::<ResilientClient>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_stack_serves_redis_rs_commands_and_reports_health() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    let () = client.set("k", "v").await.unwrap();
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"));
    let (a, b): (Option<String>, i64) = redis::pipe()
        .get("k")
        .incr("n", 5)
        .query_async(&mut client)
        .await
        .unwrap();
    assert_eq!((a.as_deref(), b), (Some("v"), 5));
    // WRONGTYPE is the app's problem: it passes through every layer.
    let err = Error::from(client.incr::<_, _, i64>("k", 1).await.unwrap_err());
    assert!(err.is_server(), "{err}");

    let health = client.health().await;
    assert_eq!(health.status, HealthStatus::Up);
    assert_eq!(health.connection, ConnectionState::Connected);
    assert_eq!(health.address, format!("127.0.0.1:{}/0", server.port()));
    assert_eq!(health.connected_to.as_ref(), Some(&health.address));
    assert!(health.ping.is_some() && health.ping_error.is_none());
    assert_eq!(health.breaker.unwrap().state, BreakerState::Closed);
    let calls = health.calls.unwrap();
    // SET, GET, the pipeline and INCR; the health PING is not a call of the app.
    assert_eq!(calls.total, 4);
    assert_eq!(
        (calls.outcomes["ok"], calls.outcomes["server_error"]),
        (3, 1)
    );
    assert_eq!(calls.latency.count, 4);
    let snapshot = client.metrics().unwrap();
    assert!(snapshot.command("PING").is_none());
    assert_eq!(snapshot.command("PIPELINE").unwrap().count(Outcome::Ok), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_run_ping_is_reported_up_and_its_connection_kept() {
    let server = RedisServer::start();
    // A least-privilege ACL user: its keys' commands, not `PING`.
    let reply = server.raw_command(&["ACL", "SETUSER", "app", "on", ">pw", "~*", "+get", "+set"]);
    assert_eq!(reply, "OK");
    let url = server.url().replace("redis://", "redis://app:pw@");
    let mut client = ResilientClient::builder(&url)
        .reconnect(
            ReconnectConfig::default()
                .health_check(Duration::from_millis(50), Duration::from_millis(500)),
        )
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "v").await.unwrap();

    let health = client.health().await;
    assert_eq!(health.status, HealthStatus::Up, "{health:?}");
    assert!(
        health.ping.is_some() && health.ping_error.is_none(),
        "{health:?}"
    );
    // The health checks' `PING`s are refused too, and answered: the connection stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One entry, its fields a line each, name then value.
    let log = server.raw_command(&["ACL", "LOG"]);
    let lines: Vec<&str> = log.lines().collect();
    let field = |name: &str| {
        lines
            .iter()
            .position(|l| *l == name)
            .map(|at| lines[at + 1])
    };
    assert_eq!(field("object"), Some("ping"), "{log}");
    let refused: u32 = field("count").unwrap().parse().unwrap();
    assert!(refused >= 5, "{log}");
    assert_eq!(client.reconnect_stats().successes, 1);
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"));
}

#[cfg(feature = "serde")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_report_serializes_with_durations_in_milliseconds() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    let _: Option<String> = client.get("k").await.unwrap();
    let json = serde_json::to_value(client.health().await).unwrap();
    assert_eq!(json["status"], "up");
    assert_eq!(json["connection"], "connected");
    assert_eq!(json["breaker"]["state"], "closed");
    assert_eq!(json["reconnects"]["successes"], 1);
    assert_eq!(json["calls"]["outcomes"]["ok"], 1);
    assert_eq!(json["calls"]["total"], 1);
    let ping = json["ping_ms"].as_f64().unwrap();
    assert!(ping > 0.0 && ping < 250.0, "{ping}");
    assert!(json["calls"]["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(json["ping_error"].is_null());
    assert_eq!(json["unreachable"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_client_starts_without_redis_and_comes_up_by_itself() {
    let mut server = RedisServer::start();
    server.kill();
    let mut client = ResilientClient::builder(&server.url()).build().unwrap();

    // Reads are misses, writes fail fast, health says down.
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value, None);
    let err = Error::from(client.set::<_, _, ()>("k", "v").await.unwrap_err());
    assert!(err.is_unavailable(), "{err}");
    let health = client.health().await;
    assert_eq!(health.status, HealthStatus::Down);
    assert_eq!(health.connected_to, None, "no connection");
    assert!(health.ping.is_none());
    assert!(health.ping_error.unwrap().contains("PING"));

    server.restart();
    eventually(Duration::from_secs(2), async || {
        client.health().await.status == HealthStatus::Up
    })
    .await;
    let () = client.set("k", "v").await.unwrap();
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_errors_at_build_time() {
    let err = ResilientClient::builder("redis://127.0.0.1:notaport")
        .build()
        .unwrap_err();
    assert!(err.is_config(), "{err}");
    let err = ResilientClient::builder("redis://127.0.0.1:6379")
        .circuit_breaker(CircuitBreakerConfig::new().failure_rate_threshold(150.0))
        .build()
        .unwrap_err();
    assert!(err.is_config(), "{err}");
    let server = RedisServer::start();
    let url = server.url().replace("redis://", "redis://:wrong@");
    let err = ResilientClient::builder(&url).connect().await.unwrap_err();
    assert!(err.is_config(), "{err}");
    assert!(!format!("{err} {err:?}").contains("wrong"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_kill_reads_miss_within_the_deadline_the_breaker_opens_then_all_recovers() {
    let mut server = RedisServer::start();
    let mut client = client(&server).await;
    let () = client.set("k", "v").await.unwrap();
    let breaker = client.circuit_breaker().unwrap().clone();

    server.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let started = Instant::now();
        let value: Option<String> = client.get("k").await.unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(value, None);
    }
    assert!(slowest < Duration::from_millis(300), "{slowest:?}");
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(client.health().await.status, HealthStatus::Down);
    let err = Error::from(client.set::<_, _, ()>("k", "w").await.unwrap_err());
    assert!(err.is_circuit_open(), "{err}");

    // A clone sees the same breaker and connection.
    let mut clone = client.clone();
    server.restart();
    let took = eventually(Duration::from_secs(2), async || {
        clone.set::<_, _, ()>("k", "w").await.is_ok()
    })
    .await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("w"));
    eventually(Duration::from_secs(1), async || {
        let _: Option<String> = client.get("k").await.unwrap();
        breaker.state() == BreakerState::Closed
    })
    .await;
    let snapshot = client.metrics().unwrap();
    let get = snapshot.command("GET").unwrap();
    assert!(get.count(Outcome::Unavailable) + get.count(Outcome::CircuitOpen) >= 40);
    assert_eq!(get.count(Outcome::Fallback), 40);
    assert_eq!(client.fallback().unwrap().fallbacks(), 40);
}

/// 50 counting writes through a failover behind one address: the address the app knows
/// (as a DNS name or a virtual IP) moves to the new master, the open connection stays on
/// the old one. The first write finds the demoted master: `READONLY`, so it did not run;
/// the retry resends it once the connection is replaced. Whatever a call reports, the
/// count on the new master must match the writes acknowledged.
async fn writes_through_a_failover(
    mut write: impl AsyncFnMut(&mut ResilientClient) -> redis::RedisResult<u64>,
) {
    let (old, new) = (RedisServer::start(), RedisServer::start());
    let proxy = FaultProxy::start(old.port()).await;
    let mut client = ResilientClient::builder(&proxy.url())
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "v").await.unwrap();

    old.replicate(&new);
    proxy.retarget(new.port());

    let mut acknowledged = 0u64;
    let started = Instant::now();
    for _ in 0..50 {
        match write(&mut client).await {
            Ok(value) => {
                acknowledged += 1;
                assert_eq!(value, acknowledged, "each acknowledged write ran once");
            }
            Err(err) => {
                let err = Error::from(err);
                assert!(err.is_unavailable() && !err.may_have_run(), "{err:?}");
            }
        }
    }
    assert!(
        acknowledged >= 45,
        "only {acknowledged} of 50 writes went through"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Counted first: the new master goes with the closure below, and its connection is
    // replaced as it closes.
    assert_eq!(proxy.connections(), 2, "one new connection");
    let on_new = tokio::task::spawn_blocking(move || new.raw_command(&["GET", "counter"]))
        .await
        .unwrap();
    assert_eq!(on_new, acknowledged.to_string());
    let breaker = client.health().await.breaker.unwrap();
    assert_eq!(breaker.state, BreakerState::Closed, "{breaker:?}");
    drop(old);
}

/// An app's loop that retries a write until Redis answers, with no pause between tries,
/// on a `current_thread` runtime, where the reconnect loop shares the one thread with it.
/// While Redis is away each try fails at once, and answers that do not wait must still
/// yield now and then: before, the loop never did, so the reconnect never ran and the
/// loop spun for good (measured: ~10 million tries in 5 s, never served).
#[tokio::test]
async fn a_loop_retrying_a_write_without_a_pause_is_served_once_redis_is_back() {
    let mut server = RedisServer::start();
    let mut client = client(&server).await;
    server.kill();
    let restarted = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
        server
    });
    let started = Instant::now();
    let mut tries = 0u64;
    while client.set::<_, _, ()>("k", "v").await.is_err() {
        tries += 1;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{tries} tries in 10 s, none served: the reconnect never ran"
        );
    }
    let served_after = started.elapsed();
    let _server = restarted.join().unwrap();
    assert!(served_after < Duration::from_secs(3), "{served_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_failover_and_every_acknowledged_incr_counts_once() {
    writes_through_a_failover(async |client| client.incr("counter", 1).await).await;
}

/// A transaction that reaches the demoted master is discarded (`EXECABORT`) because
/// Redis refused its commands (`READONLY`): the same failover signal. Before, the
/// connection was kept, every transaction failed, and the breaker opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_follow_a_failover_and_every_acknowledged_one_counts_once() {
    writes_through_a_failover(async |client| {
        let (value,): (u64,) = redis::pipe()
            .atomic()
            .incr("counter", 1)
            .query_async(client)
            .await?;
        Ok(value)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_would_change_the_shared_connection_is_refused_and_the_rest_goes_on() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    let () = client.set("k", "v").await.unwrap();
    for command in [
        redis::cmd("MULTI"),
        redis::cmd("SELECT").arg(1).to_owned(),
        redis::cmd("SUBSCRIBE").arg("news").to_owned(),
    ] {
        let err = command.query_async::<Value>(&mut client).await.unwrap_err();
        let err = Error::from(err);
        assert!(err.is_config() && !err.may_have_run(), "{err:?}");
        // Sent, these made every GET after them answer "QUEUED", read database 1, or fail.
        let value: Option<String> = client.get("k").await.unwrap();
        assert_eq!(value.as_deref(), Some("v"));
    }
    // A mistake in the app, not an outage.
    let breaker = client.circuit_breaker().unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.metrics().failed_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incr_after_redis_closed_the_idle_connection_goes_through_once() {
    let server = RedisServer::start();
    let mut client = client(&server).await;
    assert_eq!(client.incr::<_, _, u64>("n", 1).await.unwrap(), 1);
    // A restart, the server's `timeout` or a load balancer would close it the same way.
    let killed = server.raw_command(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert_eq!(killed, "1");
    // The connection's task sees the close within microseconds; this is ample.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.incr::<_, _, u64>("n", 1).await.unwrap(), 2);
    assert_eq!(server.raw_command(&["GET", "n"]), "2");
    assert_eq!(client.reconnect_stats().successes, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_layers_are_gone() {
    let mut server = RedisServer::start();
    let mut client = ResilientClient::builder(&server.url())
        .without_fallback()
        .without_circuit_breaker()
        .without_metrics()
        .without_trace()
        .without_retry()
        .timeout(TimeoutLayer::new(Duration::from_millis(100)))
        .connect()
        .await
        .unwrap();
    assert!(client.circuit_breaker().is_none() && client.metrics().is_none());
    assert!(client.fallback().is_none() && client.retry().is_none());
    assert_eq!(
        client
            .timeout()
            .unwrap()
            .deadline_for(&Request::from(redis::cmd("GET"))),
        Some(Duration::from_millis(100))
    );
    server.kill();
    for _ in 0..30 {
        let err = Error::from(client.get::<_, Option<String>>("k").await.unwrap_err());
        assert!(err.is_unavailable(), "{err}");
    }
    let health = client.health().await;
    assert_eq!(
        (health.status, health.breaker, health.calls),
        (HealthStatus::Down, None, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_own_layers_wrap_the_client() {
    let server = RedisServer::start();
    let client = client(&server).await;
    let service: BoxCloneService<Request, Value, BoxError> = BoxCloneService::new(
        ServiceBuilder::new()
            .buffer(16)
            .load_shed()
            .concurrency_limit(1)
            .service(client.clone()),
    );

    // One BLPOP holds the only slot, so the next call is shed at once.
    let blocked = tokio::spawn(service.clone().oneshot(Request::from(
        redis::cmd("BLPOP").arg("queue").arg(1).to_owned(),
    )));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shed = service
        .clone()
        .oneshot(Request::from(redis::cmd("GET").arg("k").to_owned()))
        .await
        .unwrap_err();
    assert!(shed.is::<Overloaded>(), "{shed}");
    assert_eq!(blocked.await.unwrap().unwrap(), Value::Nil);

    // Once the slot is free, calls pass, and this crate's errors come through intact.
    let mut service = service;
    let set = Request::from(redis::cmd("SET").arg("k").arg("v").to_owned());
    assert_eq!(
        service.ready().await.unwrap().call(set).await.unwrap(),
        Value::Okay
    );
    let incr = Request::from(redis::cmd("INCR").arg("k").to_owned());
    let err = service.ready().await.unwrap().call(incr).await.unwrap_err();
    let err = err.downcast::<Error>().unwrap();
    assert_eq!(err.server_code(), Some("ERR"));
    let calls = client.metrics().unwrap();
    assert_eq!(calls.command("BLPOP").unwrap().count(Outcome::Ok), 1);
    assert!(
        calls.command("GET").is_none(),
        "the shed GET never reached the stack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_argument_is_refused_unsent_and_every_other_call_goes_on() {
    const LIMIT: usize = 1024 * 1024;
    let server = RedisServer::start();
    assert_eq!(
        server.raw_command(&["CONFIG", "SET", "proto-max-bulk-len", "1mb"]),
        "OK"
    );
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .max_argument_size(LIMIT);
    let client = ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap();
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    client.incr::<_, _, i64>("n", 1).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut client_of_big = client.clone();
    let error = client_of_big
        .set::<_, _, ()>("big", vec![b'x'; LIMIT + 1])
        .await
        .unwrap_err();
    let error = tower_redis_resilience::Error::from(error);
    assert!(error.is_config() && !error.may_have_run(), "{error}");
    assert!(error.to_string().contains("proto-max-bulk-len"), "{error}");
    let mut pipe = redis::pipe();
    pipe.set("a", 1).set("big", vec![b'x'; LIMIT + 1]);
    let error = client_of_big
        .send(pipe)
        .await
        .expect_err("a pipeline with an oversized argument");
    assert!(error.is_config(), "{error}");
    // Every INCR in flight meanwhile was answered: the shared connection stayed up.
    for writer in writers {
        writer.await.unwrap();
    }
    let counted: i64 = client_of_big.get("n").await.unwrap();
    assert_eq!(counted, 8 * 200);
    assert_eq!(client.reconnect_stats().attempts, 1, "no reconnect");
    assert!(
        !server
            .raw_command(&["INFO", "commandstats"])
            .contains("cmdstat_set:")
    );
    // At the limit exactly, Redis takes it.
    let () = client_of_big.set("big", vec![b'x'; LIMIT]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_runs_again_after_a_restart_emptied_the_script_cache() {
    // Rate limiters and locks are scripts. A restart empties Redis's script cache, and
    // redis-rs's `Script` loads the script again when `EVALSHA` answers `NOSCRIPT`: it
    // must get that error as redis-rs's own.
    let mut server = RedisServer::start();
    let mut client = client(&server).await;
    let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
    let n: i64 = script.key("n").invoke_async(&mut client).await.unwrap();
    assert_eq!(n, 1);
    server.kill();
    server.restart();
    eventually(Duration::from_secs(5), async || {
        client.connection_state() == ConnectionState::Connected
    })
    .await;
    let n: i64 = script.key("n").invoke_async(&mut client).await.unwrap();
    assert_eq!(n, 1, "the restarted server had no counter");
    let stats = server.raw_command(&["INFO", "commandstats"]);
    assert!(stats.contains("cmdstat_script|load:calls=1,"), "{stats}");
    assert!(stats.contains("cmdstat_evalsha:calls=2,"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_with_a_deadline_of_its_own_misses_within_it_and_cuts_redis_off_for_nobody() {
    let server = RedisServer::start();
    let client = client(&server).await;
    let () = client.clone().set("k", "v").await.unwrap();
    let attempts = client.reconnect_stats().attempts;
    let mut hurried = client.with_deadline(Duration::from_millis(15));

    // A Redis that takes longer than the caller can wait: paused, its calls unanswered.
    // More of them than the breaker needs to open (20) and than make a connection look
    // stuck (3): neither is the caller's budget running out.
    server.pause();
    for _ in 0..25 {
        let started = Instant::now();
        let value: Option<String> = hurried.get("k").await.unwrap();
        assert_eq!(value, None, "a miss, from the fallback");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(150),
            "{took:?}, not the layer's 250 ms"
        );
    }
    let err = Error::from(hurried.incr::<_, _, i64>("n", 1).await.unwrap_err());
    assert!(err.is_timeout() && err.is_own_deadline(), "{err:?}");
    assert_eq!(err.timeout(), Some(Duration::from_millis(15)));
    // As a tower `Service` too.
    let started = Instant::now();
    let get = Request::from(redis::cmd("GET").arg("k"));
    let reply = hurried.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(reply, Value::Nil);
    assert!(started.elapsed() < Duration::from_millis(150));
    server.resume();

    assert_eq!(
        client.circuit_breaker().unwrap().state(),
        BreakerState::Closed
    );
    let value: Option<String> = client.clone().get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"));
    assert_eq!(
        client.reconnect_stats().attempts,
        attempts,
        "the connection was kept"
    );
    let get = client.metrics().unwrap();
    let get = get.command("GET").unwrap();
    assert_eq!(
        (get.count(Outcome::Timeout), get.count(Outcome::Ok)),
        (26, 1)
    );
    assert_eq!(client.fallback().unwrap().fallbacks(), 26);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_keeping_redis_busy_costs_misses_and_the_first_call_after_it_is_served() {
    // Redis answers BUSY to everyone while a script runs past `busy-reply-threshold`.
    let server = RedisServer::config()
        .arg("busy-reply-threshold", "100")
        .start();
    let client = client(&server).await;
    let () = client.clone().set("k", "v").await.unwrap();
    let url = server.url();
    let script = tokio::spawn(async move {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut connection = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<Value>(&mut connection)
            .await
    });
    eventually(Duration::from_secs(5), async || {
        let refused = client.clone().incr::<_, _, i64>("n", 1).await.err();
        refused.is_some_and(|err| Error::from(err).server_code() == Some("BUSY"))
    })
    .await;

    // Every read misses, fast: Redis refuses each at once.
    for _ in 0..40 {
        let started = Instant::now();
        let value: Option<String> = client.clone().get("k").await.unwrap();
        assert_eq!(value, None);
        assert!(started.elapsed() < Duration::from_millis(200));
    }
    // The breaker stayed closed: open, it would learn that Redis serves again only from
    // a probe, up to its 2 s wait later.
    assert_eq!(
        client.circuit_breaker().unwrap().state(),
        BreakerState::Closed
    );
    // `SCRIPT KILL` answers at once, and the script stops at its next check, when its
    // caller gets the error: until then Redis still answers BUSY (on a busy machine a
    // call sent right after the `OK` met it).
    assert_eq!(server.raw_command(&["SCRIPT", "KILL"]), "OK");
    let killed = script.await.unwrap().unwrap_err();
    assert!(killed.to_string().contains("SCRIPT KILL"), "{killed}");
    let value: Option<String> = client.clone().get("k").await.unwrap();
    assert_eq!(
        value.as_deref(),
        Some("v"),
        "served by the first call after it"
    );
}

/// What callers met through a fault: each call's start (from the test's start), how long
/// it took, and whether it was a read served or a write acknowledged.
#[derive(Default)]
struct Calls {
    reads: Vec<(Duration, Duration, bool)>,
    writes: Vec<(Duration, Duration, Result<(), Error>)>,
}

impl Calls {
    /// No call outlived the default deadline (250 ms, and a little for a busy machine).
    fn assert_within_the_deadline(&self) {
        let reads = self.reads.iter().map(|(at, took, _)| ("read", at, took));
        let writes = self.writes.iter().map(|(at, took, _)| ("write", at, took));
        for (call, at, took) in reads.chain(writes) {
            assert!(
                *took < Duration::from_millis(350),
                "a {call} at {at:?} took {took:?}"
            );
        }
    }
}

/// 4 readers and 4 writers `INCR`ing `n` for `period` (a failed write is tried again
/// after 1 ms), while `CLIENT PAUSE WRITE` holds writes from 0.5 s for `pause`.
async fn through_a_write_pause(
    server: &RedisServer,
    client: &ResilientClient,
    period: Duration,
    pause: Duration,
) -> Calls {
    let millis = pause.as_millis().to_string();
    let pause = async || {
        assert_eq!(
            server.raw_command(&["CLIENT", "PAUSE", &millis, "WRITE"]),
            "OK"
        );
    };
    through(client, period, pause).await.0
}

/// 4 readers of `k` and 4 writers `INCR`ing `n` for `period` (a failed write is tried
/// again after 1 ms), while `fault` runs from 0.5 s; with what `fault` answered.
async fn through<T>(
    client: &ResilientClient,
    period: Duration,
    fault: impl AsyncFnOnce() -> T,
) -> (Calls, T) {
    let () = client.clone().set("k", "v").await.unwrap();
    let start = Instant::now();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut reads = Vec::new();
                while start.elapsed() < period {
                    let at = start.elapsed();
                    let value: Option<String> = client.get("k").await.unwrap();
                    reads.push((at, start.elapsed() - at, value.as_deref() == Some("v")));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                reads
            })
        })
        .collect();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let mut writer = client.clone();
            tokio::spawn(async move {
                let mut writes = Vec::new();
                while start.elapsed() < period {
                    let at = start.elapsed();
                    let result = writer.incr::<_, _, i64>("n", 1).await;
                    let pause = if result.is_ok() { 5 } else { 1 };
                    writes.push((
                        at,
                        start.elapsed() - at,
                        result.map(drop).map_err(Error::from),
                    ));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                writes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let faulted = fault().await;
    let mut calls = Calls::default();
    for reader in readers {
        calls.reads.extend(reader.await.unwrap());
    }
    for writer in writers {
        calls.writes.extend(writer.await.unwrap());
    }
    (calls, faulted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_served_through_a_write_pause_and_every_acknowledged_write_counts() {
    let server = RedisServer::start();
    let client = client(&server).await;
    let pause = Duration::from_millis(1500);
    let calls = through_a_write_pause(&server, &client, Duration::from_secs(3), pause).await;

    calls.assert_within_the_deadline();
    // The reads held behind the first paused write miss at their deadline; from then on
    // reads are served beside the held connection, and the writes refused meanwhile do
    // not open the breaker over them. Before, every read missed until the pause ended
    // (measured: none of ~1,900).
    let pause_starts = Duration::from_millis(500);
    let during: Vec<bool> = calls
        .reads
        .iter()
        .filter(|(at, _, _)| {
            *at > pause_starts + Duration::from_millis(400) && *at < pause_starts + pause
        })
        .map(|(_, _, served)| *served)
        .collect();
    let served = during.iter().filter(|served| **served).count();
    assert!(
        served * 10 >= during.len() * 9 && during.len() >= 100,
        "{served} of {} reads served during the pause",
        during.len()
    );
    assert!(client.reconnect_stats().side_reads > 0);
    assert_eq!(
        client.circuit_breaker().unwrap().state(),
        BreakerState::Closed
    );

    // Writes failed while paused, each as not run or as one that may have run (held,
    // it may run once the pause ends): the counter holds every acknowledged one, and no
    // more than those and the ones that may have run.
    let acknowledged = calls
        .writes
        .iter()
        .filter(|(_, _, result)| result.is_ok())
        .count();
    let may_have_run = calls
        .writes
        .iter()
        .filter(|(_, _, result)| result.as_ref().is_err_and(Error::may_have_run))
        .count();
    assert!(acknowledged < calls.writes.len(), "writes were held");
    let n: usize = client.clone().get("n").await.unwrap();
    assert!(
        (acknowledged..=acknowledged + may_have_run).contains(&n),
        "n = {n}: {acknowledged} acknowledged, {may_have_run} may have run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_that_loads_its_data_reads_are_served_as_soon_as_it_is_loaded() {
    let mut server = RedisServer::config()
        .arg("enable-debug-command", "yes")
        .arg("save", "")
        .start();
    let client = client(&server).await;
    let () = client.clone().set("k", "v").await.unwrap();
    // Enough data that loading it takes a while (~2 s here), during which Redis answers
    // every read LOADING.
    assert_eq!(
        server.raw_command(&["DEBUG", "POPULATE", "2000000", "filler", "64"]),
        "OK"
    );
    assert_eq!(server.raw_command(&["SAVE"]), "OK");
    server.restart_while_loading();
    let port = server.port();
    let loaded = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            let mut redis = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_connection()
                .unwrap();
            if redis::cmd("GET")
                .arg("k")
                .query::<Option<String>>(&mut redis)
                .is_ok()
            {
                return Instant::now();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "still loading");
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    // Four readers from the restart on, each until it reads the value.
    let readers = (0..4).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while client.get::<_, Option<String>>("k").await.unwrap() != Some("v".into()) {
                assert!(started.elapsed() < Duration::from_secs(30), "never served");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Instant::now()
        })
    });
    let served = futures::future::join_all(readers).await;
    let loaded = loaded.await.unwrap();
    // Whatever the breaker did while Redis was down, the reads it answered `LOADING`
    // do not keep it open: it would turn reads away until a probe found Redis loaded,
    // up to 2 s after it was (measured before the change: 1.1 s).
    for served in served {
        let late = served.unwrap().saturating_duration_since(loaded);
        assert!(
            late < Duration::from_millis(100),
            "served {late:?} after loading ended"
        );
    }
}

/// The protocol the client's shared connection speaks, from `CLIENT INFO` (`resp=3`).
async fn protocol(client: &mut ResilientClient) -> String {
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async(client)
        .await
        .unwrap();
    let resp = info
        .split_whitespace()
        .find(|field| field.starts_with("resp="));
    resp.unwrap_or(&info).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_connections_serve_through_a_quiet_restart() {
    let mut server = RedisServer::start();
    let url = format!("{}?protocol=resp3", server.url());
    let mut client = ResilientClient::builder(&url).connect().await.unwrap();
    assert_eq!(protocol(&mut client).await, "resp=3");
    let () = client
        .hset_multiple("h", &[("a", "1"), ("b", "2")])
        .await
        .unwrap();
    let map: std::collections::HashMap<String, String> = client.hgetall("h").await.unwrap();
    assert_eq!(map.len(), 2);

    server.restart();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Found closed while quiet, so not sent: an INCR goes to a new connection.
    let n: i64 = client.incr("n", 1).await.unwrap();
    assert_eq!(n, 1);
    assert_eq!(protocol(&mut client).await, "resp=3");
}

/// A master that dies leaves its replica serving what it had (`replica-serve-stale-data`,
/// Redis's default): with `read_replica`, reads get that data instead of misses while
/// the master is being reconnected, and writes still fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_master_is_down_reads_are_served_by_its_replica() {
    let mut master = RedisServer::start();
    let mut replica = RedisServer::start();
    replica.replicate(&master);
    let mut client = ResilientClient::builder(&master.url())
        .read_replica(Connector::from_url(&replica.url()).unwrap())
        .connect()
        .await
        .unwrap();
    for i in 0..10 {
        let () = client.set(format!("k{i}"), i).await.unwrap();
    }
    replica.catch_up(&master);
    assert_eq!(
        client.reconnect_stats().replica_reads,
        0,
        "not while connected"
    );

    master.kill();
    // Every read is served, from the first that finds the connection lost on.
    for _ in 0..30 {
        for i in 0..10 {
            let started = Instant::now();
            let value: Option<i64> = client.get(format!("k{i}")).await.unwrap();
            assert_eq!(value, Some(i), "k{i}");
            assert!(started.elapsed() < Duration::from_millis(300));
        }
    }
    let mget: Vec<Option<i64>> = client.mget(&["k1", "k2", "nope"]).await.unwrap();
    assert_eq!(mget, [Some(1), Some(2), None]);
    let write = client.set::<_, _, ()>("k0", 100).await.unwrap_err();
    assert!(Error::from(write).is_unavailable());
    assert!(client.reconnect_stats().replica_reads >= 300);
    assert_eq!(client.fallback().unwrap().fallbacks(), 0, "no misses");

    // The replica gone too: misses, each within the deadline.
    replica.kill();
    let started = Instant::now();
    let value: Option<i64> = client.get("k1").await.unwrap();
    assert_eq!(value, None);
    assert!(started.elapsed() < Duration::from_millis(300));

    // The master back (empty: it kept nothing): served there.
    master.restart();
    eventually(Duration::from_secs(3), async || {
        client.set::<_, _, ()>("k1", 7).await.is_ok()
    })
    .await;
    let value: Option<i64> = client.get("k1").await.unwrap();
    assert_eq!(value, Some(7));
}

/// The shared connection, a blocking command's own and a subscriber's: each with
/// `TCP_NODELAY`, keepalive probes after 30 s quiet and a user timeout of 60 s (read from
/// the sockets), or each without when the connector says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_sets_tcp_nodelay_and_keepalive_unless_the_connector_says_not_to() {
    for defaults in [true, false] {
        let server = RedisServer::start();
        let connector = Connector::from_url(&server.url()).unwrap();
        let connector = if defaults {
            connector
        } else {
            connector.tcp_nodelay(false).tcp_keepalive(None)
        };
        let mut client = ResilientClient::builder_with_connector(connector)
            .connect()
            .await
            .unwrap();
        let () = client.set("k", "v").await.unwrap();
        let nothing: Option<(String, String)> = client.blpop("queue", 0.01).await.unwrap();
        assert_eq!(nothing, None);
        let (subscriber, _events) = client
            .subscriber(tower_redis_resilience::pubsub::SubscriberConfig::new())
            .unwrap();
        subscriber.subscribe("news").await.unwrap();
        let mut state = subscriber.state();
        state
            .wait_for(|state| *state == ConnectionState::Connected)
            .await
            .unwrap();
        let found = support::tcp_options_of_connections_to(server.port());
        assert_eq!(found.len(), 3, "{found:?}");
        let off = |socket: &support::TcpOptions| {
            !socket.nodelay && socket.keepalive.is_none() && socket.user_timeout_ms == 0
        };
        let expected = if defaults {
            support::TcpOptions::are_the_defaults
        } else {
            off
        };
        assert!(found.iter().all(expected), "{found:?}");
    }
}

/// A connection a NAT or load balancer dropped while the app was quiet (its packets
/// vanish, neither end is told) is found by the default client's own `PING` and
/// replaced before the app's next call, which is served at once. Without it, that call
/// would time out, and a write would be reported as one that may have run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_silently_while_idle_is_replaced_before_the_next_call() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let mut client = ResilientClient::builder(&proxy.url())
        .connect()
        .await
        .unwrap();
    let () = client.set("k", "v").await.unwrap();
    proxy.silence_open_connections();
    // One health-check interval (5 s), its PING's second, and the reconnect.
    let took = eventually(Duration::from_secs(8), async || {
        proxy.connections() == 2 && client.connection_state() == ConnectionState::Connected
    })
    .await;
    eprintln!("replaced {took:?} after the drop");
    let started = Instant::now();
    assert_eq!(client.incr::<_, _, u64>("n", 1).await.unwrap(), 1);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(client.metrics().unwrap().overall.count(Outcome::Timeout), 0);
}

/// A client made on one runtime and used on another, as a static client shared by
/// `#[tokio::test]`s is (each test has a runtime of its own): its calls are served after
/// a reconnect on the second, and its health check runs there too. Before, the health
/// check ended with the runtime that started it, and a connection dropped silently on
/// the second went unnoticed until calls timed out on it.
#[test]
fn a_client_used_on_a_second_runtime_is_health_checked_there() {
    let server = RedisServer::start();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let every = Duration::from_millis(50);
    let config = tower_redis_resilience::reconnect::ReconnectConfig::new()
        .health_check(every, Duration::from_secs(1));
    let client = runtime().block_on(async {
        ResilientClient::builder(&server.url())
            .reconnect(config)
            .connect()
            .await
            .unwrap()
    });
    // `cmdstat_ping:calls=N,...`, absent before the first.
    let pings = || -> u64 {
        let stats = server.raw_command(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    // The first runtime is gone, and the tasks it ran with it.
    runtime().block_on(async {
        let mut client = client.clone();
        let () = client.set("k", "v").await.unwrap();
        let before = pings();
        tokio::time::sleep(every * 10).await;
        let after = pings();
        assert!(
            after >= before + 5,
            "{} health-check PINGs in {:?}",
            after - before,
            every * 10
        );
    });
}

/// The same client's breaker, on the second runtime: after an outage there, it goes
/// half-open as soon as Redis is back and the connection is made again, as on the
/// runtime that made it, instead of waiting out `wait_in_open` (2 s). Before, the task
/// that follows the connection had ended with the first runtime.
#[test]
fn a_client_used_on_a_second_runtime_has_its_breaker_follow_the_connection_there() {
    let mut server = RedisServer::start();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let client = runtime().block_on(async {
        ResilientClient::builder(&server.url())
            .connect()
            .await
            .unwrap()
    });
    runtime().block_on(async {
        let mut client = client.clone();
        let () = client.set("k", "v").await.unwrap();
        server.kill();
        let breaker = client.circuit_breaker().unwrap().clone();
        let killed = Instant::now();
        while breaker.state() != BreakerState::Open {
            assert!(killed.elapsed() < Duration::from_secs(5), "never opened");
            let _ = client.set::<_, _, ()>("k", "v").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A rejection on this runtime, which starts the task there.
        assert!(client.set::<_, _, ()>("k", "v").await.is_err());
        server.restart();
        let restarted = Instant::now();
        while client.set::<_, _, ()>("k", "v").await.is_err() {
            assert!(restarted.elapsed() < Duration::from_secs(5), "never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let served_after = restarted.elapsed();
        assert!(
            served_after < Duration::from_secs(1),
            "served {served_after:?} after the restart: the breaker waited out its open period"
        );
    });
}

/// How long until a `SET` through `client` is served, trying every 10 ms; `None` if not
/// within `limit`.
async fn served_within(client: &ResilientClient, limit: Duration) -> Option<Duration> {
    let mut client = client.clone();
    let started = Instant::now();
    while started.elapsed() < limit {
        if client.set::<_, _, ()>("k", "v").await.is_ok() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn assert_served_on_a_new_runtime(client: &ResilientClient) {
    let served = current_thread_runtime().block_on(served_within(client, Duration::from_secs(5)));
    assert!(served.is_some(), "never served on the next runtime");
}

/// A client whose runtime shut down while it reconnected (a static client shared by
/// `#[tokio::test]`s, a runtime per job): the reconnect loop ended with that runtime, and
/// the next call, on another, starts it again. Before, the client said "reconnecting"
/// for ever there, with Redis back and nothing trying to reach it.
#[test]
fn a_client_whose_runtime_ended_while_it_reconnected_reconnects_on_the_next() {
    let mut server = RedisServer::start();
    let client = current_thread_runtime().block_on(async {
        let client = client(&server).await;
        server.kill();
        // The loop has tried once, and sleeps before the next try.
        let waited = eventually(Duration::from_secs(5), async || {
            matches!(
                client.connection_state(),
                ConnectionState::Reconnecting { attempt } if attempt >= 1
            )
        })
        .await;
        assert!(waited < Duration::from_secs(5), "never reconnecting");
        client
    });
    server.restart();
    assert_served_on_a_new_runtime(&client);
}

/// The same with the connection suspect (calls timed out on a Redis held up), its `PING`
/// pending when the runtime shut down: the connection is taken for lost, and the next
/// call, on another runtime, reconnects. Before, it stayed out of use for ever, and every
/// call was refused as "suspect".
#[test]
fn a_client_whose_runtime_ended_while_its_connection_was_suspect_reconnects_on_the_next() {
    let server = RedisServer::start();
    let client = current_thread_runtime().block_on(async {
        let mut client = client(&server).await;
        server.pause();
        let started = Instant::now();
        while client.connection_state() != ConnectionState::Suspect {
            assert!(started.elapsed() < Duration::from_secs(5), "never suspect");
            let _ = client.set::<_, _, ()>("k", "v").await;
        }
        // Its `PING` sent, and waiting.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.connection_state(), ConnectionState::Suspect);
        client
    });
    server.resume();
    assert_served_on_a_new_runtime(&client);
}

/// Calls made outside any runtime, as `futures`' `block_on` on a thread of the app's own
/// makes them: served while the multi-threaded runtime the client was made on runs (its
/// connection's task and its deadlines run there, as with redis-rs's own connection),
/// and refused with a clear error, never a panic, once it is gone. Before, they failed
/// with a configuration error that said a write that may have run had not, and a panic
/// once the runtime was gone.
#[test]
fn calls_made_outside_any_runtime_are_served_while_the_clients_runs_and_never_panic() {
    let server = RedisServer::start();
    let multi_thread = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    // `INCR`, then `GET` of what it wrote, from a thread outside the runtime.
    let outside = |client: &ResilientClient| {
        let mut client = client.clone();
        std::thread::spawn(move || {
            futures::executor::block_on(async move {
                let incr = client.incr::<_, _, i64>("n", 1).await.map_err(Error::from);
                let get = client.get::<_, Option<i64>>("n").await.map_err(Error::from);
                (incr, get)
            })
        })
        .join()
        .expect("no panic")
    };
    let first = multi_thread();
    let client = first.block_on(client(&server));
    let (incr, get) = outside(&client);
    assert_eq!((incr.unwrap(), get.unwrap()), (1, Some(1)));

    drop(first);
    for _ in 0..2 {
        let (incr, get) = outside(&client);
        let error = incr.unwrap_err();
        assert!(error.is_unavailable() && !error.may_have_run(), "{error}");
        // A read misses, as in any outage.
        assert_eq!(get.unwrap(), None);
    }
    assert_eq!(server.raw_command(&["GET", "n"]), "1", "nothing more ran");
    let health = std::thread::spawn({
        let client = client.clone();
        move || futures::executor::block_on(client.health())
    })
    .join()
    .expect("no panic");
    assert_eq!(health.status, HealthStatus::Down);

    // A runtime again: the next call there reconnects, and calls from outside are served.
    let second = multi_thread();
    let served = second.block_on(served_within(&client, Duration::from_secs(5)));
    assert!(served.is_some(), "never served on the second runtime");
    let (incr, get) = outside(&client);
    assert_eq!((incr.unwrap(), get.unwrap()), (2, Some(2)));
}

/// The app's runtime held up while calls are in flight (a blocking call in a task, the
/// pod throttled by its CPU limit, the process descheduled): Redis answered meanwhile,
/// and the replies, waiting unread in the socket, are taken, not thrown away as timeouts
/// (which would also have made the connection suspect).
#[tokio::test(flavor = "current_thread")]
async fn replies_that_came_while_the_runtime_was_held_up_are_taken_not_timed_out() {
    let server = RedisServer::start();
    let client = client(&server).await;
    let () = client.clone().set("k", "v").await.unwrap();
    // Redis holds the calls 50 ms, so they are sent and wait when the runtime stops.
    assert_eq!(server.raw_command(&["CLIENT", "PAUSE", "50", "ALL"]), "OK");
    let reads = futures::future::join_all((0..8).map(|_| {
        let mut client = client.clone();
        async move { client.get::<_, Option<String>>("k").await }
    }));
    let writes = futures::future::join_all((0..8).map(|_| {
        let mut client = client.clone();
        async move { client.incr::<_, _, u64>("n", 1).await }
    }));
    let mut calls = std::pin::pin!(futures::future::join(reads, writes));
    assert!(
        tokio::time::timeout(Duration::from_millis(5), calls.as_mut())
            .await
            .is_err()
    );
    // Past the 250 ms deadline, on the runtime's only thread.
    std::thread::sleep(Duration::from_millis(400));
    let (reads, writes) = calls.await;
    for read in reads {
        assert_eq!(read.unwrap().as_deref(), Some("v"));
    }
    // Writes Redis acknowledged are reported so, not as timeouts that may have run.
    let mut counts: Vec<u64> = writes.into_iter().map(Result::unwrap).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=8).collect::<Vec<_>>());
    let metrics = client.metrics().unwrap();
    for command in ["GET", "INCRBY"] {
        let counted = metrics.command(command).unwrap();
        assert_eq!(
            (counted.count(Outcome::Ok), counted.count(Outcome::Timeout)),
            (8, 0),
            "{command}"
        );
    }
    assert_eq!(client.health().await.connection, ConnectionState::Connected);
}

/// A short stall of Redis (a slow command, a fork) with many calls in flight: every
/// call it holds up is slow, and they all finish together when it ends, filling the
/// breaker's window (the last 100 calls) with slow calls at once. That says once that
/// Redis stalled, and the calls after it are fast: the breaker stays closed. (Before, it
/// opened on the slow-call rate and refused every call for its 2 s wait.)
#[tokio::test(flavor = "current_thread")]
async fn a_short_stall_under_many_callers_does_not_open_the_breaker() {
    let server = RedisServer::config()
        .arg("enable-debug-command", "yes")
        .start();
    let client = client(&server).await;
    let () = client.clone().set("k", "v").await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..256)
        .map(|_| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut missed = 0;
                while !stop.load(Ordering::Relaxed) {
                    let value: Option<String> = client.get("k").await.unwrap();
                    missed += usize::from(value.is_none());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                missed
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Over the slow-call duration (100 ms), within the deadline (250 ms).
    let mut other = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg("0.12")
        .query_async(&mut other)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut missed = 0;
    for caller in callers {
        missed += caller.await.unwrap();
    }
    let gets = client.metrics().unwrap().command("GET").unwrap().clone();
    assert!(
        gets.latency.max >= Duration::from_millis(100),
        "the stall held calls up past the slow-call duration: {:?}",
        gets.latency
    );
    assert_eq!(
        (missed, gets.count(Outcome::CircuitOpen)),
        (0, 0),
        "of {} reads",
        gets.calls()
    );
    assert_eq!(gets.count(Outcome::Ok), gets.calls());
    let breaker = client.health().await.breaker.unwrap();
    assert_eq!(breaker.state, BreakerState::Closed);
}

/// A large reply on a slow network (a 12 MiB value read at 8 MiB/s through a proxy)
/// holds up the calls behind it on the shared connection, as Redis answers one
/// connection's commands in order. They miss only for a moment: once the connection is
/// suspect (3 timeouts), reads go on a connection beside it, and at its `PING`'s time
/// every call moves to a new connection (reads miss while it opens), while the large
/// reply goes on arriving, whole, on the old one, which its call keeps open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_reply_on_a_slow_network_holds_up_the_calls_behind_it_only_for_a_moment() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port()).await;
    let client = ResilientClient::builder(&proxy.url())
        .connect()
        .await
        .unwrap();
    let large = vec![b'x'; 12 << 20];
    let () = client.clone().set("large", &large).await.unwrap();
    proxy.limit_replies_to(8 << 20);
    let read_large = async || {
        let mut reader = client.clone();
        let request = Request::from(redis::cmd("GET").arg("large").to_owned())
            .with_deadline(Duration::from_secs(20));
        let started = Instant::now();
        let value = reader.ready().await.unwrap().call(request).await;
        (value, started.elapsed())
    };
    let (calls, (value, took)) = through(&client, Duration::from_secs(3), read_large).await;
    let value = value.unwrap();
    assert_eq!(
        value,
        Value::BulkString(large),
        "the large reply arrived whole"
    );
    assert!(
        took > Duration::from_millis(1500),
        "slow enough to outlast the suspicion: {took:?}"
    );
    calls.assert_within_the_deadline();
    // Reads from 0.4 s after the large one was sent are served (beside it, then on the
    // new connection), but for the moment the connection is replaced (suspect at
    // ~0.25 s, replaced at the `PING`'s 1 s after), when reads miss while the new one
    // opens; writes from 1.7 s after it are acknowledged (on the new connection).
    let after = |at: &Duration| *at > Duration::from_millis(900);
    let reads: Vec<bool> = calls
        .reads
        .iter()
        .filter(|(at, ..)| after(at))
        .map(|(.., served)| *served)
        .collect();
    let missed = reads.iter().filter(|served| !**served).count();
    assert!(
        missed * 20 <= reads.len(),
        "{missed} of {} reads missed",
        reads.len()
    );
    let failed: Vec<_> = calls
        .writes
        .iter()
        .filter(|(at, _, result)| *at > Duration::from_millis(2200) && result.is_err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} writes failed, the first: {:?}",
        failed.len(),
        failed[0]
    );
    assert_eq!(client.reconnect_stats().attempts, 2, "replaced once");
}

/// The default client at `url`, its connections named `checkout-api`.
async fn named_client(url: &str) -> ResilientClient {
    let connector = Connector::from_url(url)
        .unwrap()
        .client_name("checkout-api")
        .unwrap();
    ResilientClient::builder_with_connector(connector)
        .connect()
        .await
        .unwrap()
}

/// The connections `server` knows by `name` (`CLIENT LIST`).
fn named(server: &RedisServer, name: &str) -> usize {
    let field = format!(" name={name} ");
    let list = server.raw_command(&["CLIENT", "LIST"]);
    list.lines().filter(|line| line.contains(&field)).count()
}

/// Operators see whose connections they are: the shared one, a blocking command's, and
/// the shared one that replaces it after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_connector_names_every_connection_it_opens() {
    let mut server = RedisServer::start();
    let mut client = named_client(&server.url()).await;
    assert_eq!(named(&server, "checkout-api"), 1);
    // On a connection of its own, kept for the next one.
    let popped: Option<(String, String)> = client.blpop("queue", 0.05).await.unwrap();
    assert_eq!(popped, None);
    assert_eq!(named(&server, "checkout-api"), 2);
    let unnamed = server.raw_command(&["CLIENT", "LIST"]).lines().count() - 2;
    assert_eq!(unnamed, 1, "only the harness's own");

    server.restart();
    // A write, which no fallback answers: served on the new shared connection.
    eventually(Duration::from_secs(5), async || {
        client.set::<_, _, ()>("k", "v").await.is_ok()
    })
    .await;
    assert_eq!(
        named(&server, "checkout-api"),
        1,
        "the new shared connection"
    );
}

/// A shared connection learns its id in the same round trip as it gives its name: the
/// id that lets `Reconnect` ask the server whether it holds the connection up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_shared_connection_knows_its_id() {
    let server = RedisServer::start();
    let connector = Connector::from_url(&server.url())
        .unwrap()
        .client_name("checkout-api")
        .unwrap();
    let connection = connector.connect().await.unwrap();
    let id = MakeConnection::client_id(&connector, &connection).expect("its id");
    let listed = server.raw_command(&["CLIENT", "LIST", "ID", &id.to_string()]);
    assert!(listed.contains(" name=checkout-api "), "{listed}");
}

/// A user that may not run `CLIENT` is refused the name; its connection serves unnamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_its_name_serves_unnamed() {
    let server = RedisServer::start();
    let reply = server.raw_command(&["ACL", "SETUSER", "app", "on", ">pw", "~*", "+get", "+set"]);
    assert_eq!(reply, "OK");
    let url = format!("redis://app:pw@127.0.0.1:{}", server.port());
    let mut client = named_client(&url).await;
    let () = client.set("k", "v").await.unwrap();
    let value: Option<String> = client.get("k").await.unwrap();
    assert_eq!(value.as_deref(), Some("v"));
    assert_eq!(named(&server, "checkout-api"), 0);
}

#[test]
fn a_client_name_redis_would_refuse_is_a_config_error() {
    let connector = || Connector::from_url("redis://127.0.0.1:6379").unwrap();
    for name in ["", "checkout api", "line\nbreak", "café"] {
        let err = connector().client_name(name).unwrap_err();
        assert!(err.is_config(), "{name:?}: {err}");
    }
    assert!(connector().client_name("checkout-api:v2").is_ok());
}
