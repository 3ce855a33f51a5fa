//! The state machine, driven through the service with an in-memory leaf under a paused
//! clock.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use rand::{RngExt, SeedableRng, rngs::SmallRng};
use redis::Value;
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::{
    backoff::ExponentialBackoff,
    reconnect::ConnectionState,
    testing::{self, Leaf, get, send},
};

/// Lets spawned tasks (the breaker's timer) run after the clock moved.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

fn count_window(size: u32, minimum: u32) -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .sliding_window(SlidingWindow::Count(size))
        .minimum_calls(minimum)
}

fn breaker(config: CircuitBreakerConfig) -> (CircuitBreakerLayer, CircuitBreaker<Leaf>, Leaf) {
    let layer = CircuitBreakerLayer::new(config).unwrap();
    let leaf = Leaf::default();
    let service = layer.layer(leaf.clone());
    (layer, service, leaf)
}

async fn repeat<S>(service: &mut S, times: usize, behaviour: &str, millis: u64)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    for _ in 0..times {
        let _ = send(service, behaviour, millis).await;
    }
}

#[tokio::test(start_paused = true)]
async fn stays_closed_until_minimum_calls_are_in_the_window() {
    let (layer, mut service, _) = breaker(count_window(20, 10));
    repeat(&mut service, 9, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    let metrics = layer.metrics();
    assert_eq!((metrics.calls, metrics.failed_calls), (9, 9));
    assert_eq!(metrics.failure_rate, None);

    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn opens_exactly_at_the_failure_rate_threshold() {
    let (layer, mut service, _) = breaker(count_window(10, 10).failure_rate_threshold(50.0));
    repeat(&mut service, 6, "ok", 0).await;
    repeat(&mut service, 4, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed, "40 % < 50 %");
    assert_eq!(layer.metrics().failure_rate, Some(40.0));
    // The oldest success leaves the window as a fifth failure comes in: 50 %.
    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_success_that_completes_the_minimum_can_open_it() {
    let (layer, mut service, _) = breaker(count_window(20, 10));
    repeat(&mut service, 9, "fail", 0).await;
    repeat(&mut service, 1, "ok", 0).await;
    assert_eq!(layer.state(), BreakerState::Open, "9 of 10 failed");
}

#[tokio::test(start_paused = true)]
async fn timeouts_count_as_failures_and_server_errors_do_not() {
    let (layer, mut service, _) = breaker(count_window(10, 10));
    repeat(&mut service, 200, "server", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    assert_eq!(layer.metrics().failed_calls, 0);

    repeat(&mut service, 10, "timeout", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_server_refusing_writes_only_is_not_an_outage() {
    // A replica (after a failover), a master short of replicas, a master that cannot
    // persist: each is up and serves reads.
    for refusal in ["readonly", "noreplicas", "misconf"] {
        let (layer, mut service, _) = breaker(count_window(10, 10));
        repeat(&mut service, 200, refusal, 0).await;
        assert_eq!(layer.state(), BreakerState::Closed, "{refusal}");
        assert_eq!(layer.metrics().failed_calls, 0, "{refusal}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_cluster_redirect_is_not_an_outage() {
    let (layer, mut service, _) = breaker(count_window(10, 10));
    repeat(&mut service, 200, "moved", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    assert_eq!(layer.metrics().failed_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn calls_that_say_nothing_about_redis_are_ignored() {
    for (behaviour, why) in [
        ("refused", "a request the leaf refused to send"),
        (
            "no-connection-of-its-own",
            "a blocking command that found no connection of its own",
        ),
        ("own-timeout", "the caller's own deadline ran out"),
        // Loading its data, running a script: every call is refused at once, unrun, and
        // fails fast without the breaker; open, it would turn calls away until a probe
        // found Redis serving again, up to `wait_in_open` after it did.
        ("loading", "a live server refusing at once"),
        ("busy", "a live server refusing at once"),
    ] {
        let (layer, mut service, _) = breaker(count_window(10, 10));
        repeat(&mut service, 200, behaviour, 0).await;
        assert_eq!(layer.state(), BreakerState::Closed, "{why}");
        assert_eq!(layer.metrics().calls, 0, "{why}: ignored, not counted");
    }
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_it_at_their_own_threshold() {
    let (layer, mut service, _) = breaker(
        count_window(10, 4)
            .slow_call_duration(Duration::from_millis(100))
            .slow_call_rate_threshold(75.0),
    );
    repeat(&mut service, 1, "ok", 99).await;
    repeat(&mut service, 2, "ok", 100).await;
    assert_eq!(layer.metrics().slow_calls, 2);
    repeat(&mut service, 1, "ok", 150).await;
    assert_eq!(layer.metrics().slow_calls, 3);
    assert_eq!(layer.state(), BreakerState::Closed, "3 of 4 slow, just now");
    // 150 ms later, the rate still at its threshold (4 of 5).
    repeat(&mut service, 1, "ok", 150).await;
    assert_eq!(layer.state(), BreakerState::Open, "slow for 150 ms");
    assert_eq!(layer.metrics().failed_calls, 0);
}

/// `calls` calls at once, each answered after `millis`: they finish together.
async fn slow_together(service: &CircuitBreaker<Leaf>, calls: usize, millis: u64) {
    let calls = (0..calls).map(|_| {
        let mut service = service.clone();
        tokio::spawn(async move { send(&mut service, "ok", millis).await })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn slow_calls_that_finish_together_say_one_stall_and_do_not_open_it() {
    let (layer, service, _) = breaker(count_window(10, 4));
    // A short stall: 10 calls in flight, held up 150 ms, all finish as it ends.
    slow_together(&service, 10, 150).await;
    let metrics = layer.metrics();
    assert_eq!((metrics.calls, metrics.slow_calls), (10, 10));
    assert_eq!(
        layer.state(),
        BreakerState::Closed,
        "every call slow, just now"
    );
    // The calls after the stall are fast: the slow-call rate fell before it stood for
    // the slow-call duration.
    let mut service = service;
    repeat(&mut service, 1, "ok", 0).await;
    advance(Duration::from_millis(200)).await;
    repeat(&mut service, 1, "ok", 150).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    // Slow for as long as a slow call takes, every call: Redis is slow.
    slow_together(&service, 10, 150).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    repeat(&mut service, 1, "ok", 100).await;
    assert_eq!(
        layer.state(),
        BreakerState::Open,
        "every call slow for 100 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_slow_call_duration_is_never_slow() {
    let (layer, mut service, _) = breaker(
        count_window(10, 2)
            .slow_call_duration(Duration::MAX)
            .slow_call_rate_threshold(50.0),
    );
    repeat(&mut service, 4, "ok", 3_600_000).await;
    assert_eq!(layer.metrics().slow_calls, 0);
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn blocking_commands_are_never_slow() {
    let (layer, mut service, leaf) = breaker(
        count_window(10, 2)
            .slow_call_duration(Duration::from_millis(100))
            .slow_call_rate_threshold(50.0),
    );
    // The leaf ignores the BLPOP's own arguments' meaning; it waits 500 ms.
    for _ in 0..4 {
        let blpop = Request::from(redis::cmd("BLPOP").arg("ok").arg(500).arg(1).to_owned());
        let _ = service.ready().await.unwrap().call(blpop).await;
    }
    assert_eq!(leaf.calls(), 4);
    assert_eq!(layer.metrics().slow_calls, 0);
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn open_breaker_rejects_without_calling_redis() {
    let (layer, mut service, leaf) =
        breaker(count_window(10, 5).wait_in_open(Duration::from_secs(3)));
    repeat(&mut service, 5, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
    assert_eq!(leaf.calls(), 5);

    advance(Duration::from_secs(1)).await;
    let err = send(&mut service, "ok", 0).await.unwrap_err();
    assert!(err.is_circuit_open(), "{err}");
    assert!(!err.may_have_run());
    assert_eq!(err.command(), Some("GET"));
    assert_eq!(err.retry_in(), Some(Duration::from_secs(2)));
    assert_eq!(err.to_string(), "GET: circuit open, next probe in 2s");
    repeat(&mut service, 99, "ok", 0).await;
    assert_eq!(leaf.calls(), 5, "rejections never reach the inner service");
}

#[tokio::test(start_paused = true)]
async fn a_loop_of_rejected_calls_lets_the_runtime_run_its_other_tasks() {
    let (layer, mut service, _) =
        breaker(count_window(10, 5).wait_in_open(Duration::from_secs(3600)));
    repeat(&mut service, 5, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
    assert!(
        testing::others_run_while_failing(&mut service, 1000).await,
        "1000 rejections in a row never yielded"
    );
}

#[tokio::test(start_paused = true)]
async fn goes_half_open_when_the_wait_is_over() {
    let (layer, mut service, _) = breaker(count_window(10, 5).wait_in_open(Duration::from_secs(2)));
    let mut states = layer.subscribe();
    repeat(&mut service, 5, "fail", 0).await;
    assert_eq!(*states.borrow_and_update(), BreakerState::Open);

    advance(Duration::from_millis(1999)).await;
    settle().await;
    assert_eq!(layer.state(), BreakerState::Open);
    advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    assert!(states.has_changed().unwrap());
}

async fn open_then_half_open<S>(layer: &CircuitBreakerLayer, service: &mut S, failures: usize)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    repeat(service, failures, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
    tokio::time::sleep(layer.shared.config.wait_in_open).await;
    settle().await;
    assert_eq!(layer.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_the_permitted_calls_at_once() {
    let (layer, service, leaf) = breaker(count_window(10, 5).permitted_calls_in_half_open(3));
    let mut service = service;
    open_then_half_open(&layer, &mut service, 5).await;
    let before = leaf.calls();

    // 40 concurrent callers on 40 clones: three probes hang, the rest are rejected.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let mut service = service.clone();
        tasks.push(tokio::spawn(
            async move { send(&mut service, "hang", 0).await },
        ));
    }
    settle().await;
    assert_eq!(leaf.calls() - before, 3);
    let mut rejected = 0;
    for task in tasks.iter_mut() {
        if task.is_finished() {
            let err = task.await.unwrap().unwrap_err();
            assert!(err.is_circuit_open());
            assert_eq!(err.retry_in(), Some(Duration::ZERO), "probing now");
            rejected += 1;
        }
    }
    assert_eq!(rejected, 37);
    assert_eq!(layer.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn failed_probes_reopen_it_as_soon_as_the_rate_is_certain() {
    let (layer, mut service, _) = breaker(
        count_window(10, 5)
            .permitted_calls_in_half_open(4)
            .failure_rate_threshold(50.0),
    );
    open_then_half_open(&layer, &mut service, 5).await;
    repeat(&mut service, 1, "ok", 0).await;
    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(
        layer.state(),
        BreakerState::HalfOpen,
        "1 of 4 failed so far"
    );
    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(
        layer.state(),
        BreakerState::Open,
        "2 of 4 is 50 % whatever comes next"
    );
}

#[tokio::test(start_paused = true)]
async fn one_failed_probe_reopens_a_single_probe_breaker() {
    let (layer, mut service, _) = breaker(count_window(10, 5).permitted_calls_in_half_open(1));
    open_then_half_open(&layer, &mut service, 5).await;
    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn successful_probes_close_it_with_an_empty_window() {
    let (layer, mut service, _) = breaker(
        count_window(10, 5)
            .permitted_calls_in_half_open(4)
            .failure_rate_threshold(50.0),
    );
    open_then_half_open(&layer, &mut service, 5).await;
    repeat(&mut service, 2, "ok", 0).await;
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    repeat(&mut service, 1, "ok", 0).await;
    assert_eq!(
        layer.state(),
        BreakerState::Closed,
        "3 of 4 succeeded: at most 25 % can fail"
    );
    let metrics = layer.metrics();
    assert_eq!((metrics.calls, metrics.failed_calls), (0, 0));
    // Closed again, with fresh evidence needed.
    repeat(&mut service, 4, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn ignored_probes_give_their_permit_back() {
    let (layer, mut service, leaf) = breaker(
        count_window(10, 5)
            .permitted_calls_in_half_open(1)
            .classifier(|result| match result {
                Err(err) if err.is_timeout() => Outcome::Ignore,
                Err(_) => Outcome::Failure,
                Ok(_) => Outcome::Success,
            }),
    );
    open_then_half_open(&layer, &mut service, 5).await;
    repeat(&mut service, 3, "timeout", 0).await;
    assert_eq!(
        leaf.calls(),
        8,
        "each ignored probe let the next one through"
    );
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    repeat(&mut service, 1, "ok", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn calls_admitted_before_a_change_are_not_counted_after_it() {
    let (layer, service, _) = breaker(count_window(10, 5).permitted_calls_in_half_open(1));
    let mut service = service;
    // A slow call admitted while closed...
    let mut slow = service.clone();
    let late = tokio::spawn(async move { send(&mut slow, "fail", 5_000).await });
    settle().await;
    open_then_half_open(&layer, &mut service, 5).await;
    // ...fails during half-open: it is not a probe and decides nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(late.await.unwrap().is_err());
    assert_eq!(layer.state(), BreakerState::HalfOpen);
    repeat(&mut service, 1, "ok", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn time_window_buckets_expire() {
    let (layer, mut service, _) = breaker(
        CircuitBreakerConfig::new()
            .sliding_window(SlidingWindow::Time {
                length: Duration::from_secs(10),
                buckets: 10,
            })
            .minimum_calls(5),
    );
    repeat(&mut service, 4, "fail", 0).await;
    advance(Duration::from_millis(9_500)).await;
    assert_eq!(layer.metrics().calls, 4, "still inside the 10 s window");
    advance(Duration::from_millis(1_000)).await;
    assert_eq!(layer.metrics().calls, 0, "the first bucket expired");
    repeat(&mut service, 4, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed, "4 calls < minimum 5");
    advance(Duration::from_secs(3)).await;
    repeat(&mut service, 1, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn cancelled_calls_that_ran_long_count_as_failures() {
    let (layer, service, leaf) =
        breaker(count_window(10, 5).slow_call_duration(Duration::from_millis(100)));
    let mut service = service;
    // Dropped after 50 ms: says nothing about Redis.
    for _ in 0..5 {
        let call = send(&mut service, "hang", 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), call)
                .await
                .is_err()
        );
    }
    assert_eq!(layer.metrics().calls, 0);
    // Dropped after 200 ms by an outer timeout: an outage the breaker must see.
    for _ in 0..5 {
        let call = send(&mut service, "hang", 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), call)
                .await
                .is_err()
        );
    }
    assert_eq!(leaf.calls(), 10);
    let metrics = layer.metrics();
    assert_eq!((metrics.failed_calls, metrics.slow_calls), (5, 5));
    assert_eq!(layer.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn cancel_policy_ignore_records_nothing() {
    let (layer, mut service, _) = breaker(count_window(10, 5).on_cancel(CancelPolicy::Ignore));
    for _ in 0..10 {
        let call = send(&mut service, "hang", 0);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), call)
                .await
                .is_err()
        );
    }
    assert_eq!(layer.metrics().calls, 0);
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_stack_rebuilt_per_request_still_trips() {
    let layer = CircuitBreakerLayer::new(count_window(10, 5)).unwrap();
    let leaf = Leaf::default();
    for _ in 0..5 {
        // What axum does with a per-request stack.
        let mut fresh = layer.clone().layer(leaf.clone());
        let _ = send(&mut fresh, "fail", 0).await;
    }
    let mut fresh = layer.layer(leaf.clone());
    assert!(
        send(&mut fresh, "ok", 0)
            .await
            .unwrap_err()
            .is_circuit_open()
    );
    assert_eq!(leaf.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn manual_controls_override_the_window() {
    let (layer, mut service, leaf) = breaker(count_window(10, 5));
    layer.force_open();
    let err = send(&mut service, "ok", 0).await.unwrap_err();
    assert!(err.is_circuit_open());
    assert_eq!(err.retry_in(), None, "no probe until reset");
    advance(Duration::from_secs(3600)).await;
    settle().await;
    assert_eq!(layer.state(), BreakerState::ForcedOpen);

    layer.disable();
    repeat(&mut service, 50, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Disabled);
    assert_eq!(
        layer.metrics().calls,
        0,
        "a disabled breaker records nothing"
    );
    assert_eq!(leaf.calls(), 50);

    layer.reset();
    assert_eq!(layer.state(), BreakerState::Closed);
    repeat(&mut service, 5, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);
    layer.reset();
    assert_eq!(layer.state(), BreakerState::Closed);
    assert_eq!(layer.metrics().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn wait_in_open_grows_on_repeated_reopens_and_restarts_after_a_close() {
    let (layer, mut service, _) = breaker(
        count_window(10, 5)
            .permitted_calls_in_half_open(1)
            .wait_in_open_backoff(
                ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(8))
                    .jitter(crate::backoff::Jitter::None),
            ),
    );
    repeat(&mut service, 5, "fail", 0).await;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let err = send(&mut service, "ok", 0).await.unwrap_err();
        waits.push(err.retry_in().unwrap());
        let opened = Instant::now();
        while layer.state() != BreakerState::HalfOpen {
            advance(Duration::from_millis(100)).await;
            settle().await;
        }
        assert_eq!(opened.elapsed(), waits[waits.len() - 1]);
        repeat(&mut service, 1, "fail", 0).await;
    }
    let secs = |s| Duration::from_secs(s);
    assert_eq!(waits, [secs(1), secs(2), secs(4), secs(8), secs(8)]);

    advance(secs(8)).await;
    settle().await;
    repeat(&mut service, 1, "ok", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);
    repeat(&mut service, 5, "fail", 0).await;
    let err = send(&mut service, "ok", 0).await.unwrap_err();
    assert_eq!(
        err.retry_in(),
        Some(secs(1)),
        "a close starts the schedule over"
    );
}

#[tokio::test(start_paused = true)]
async fn state_changes_are_published_and_given_to_the_hook() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let (layer, mut service, _) = breaker(
        count_window(10, 5)
            .permitted_calls_in_half_open(1)
            .on_state_change(move |change| {
                hook_seen.lock().unwrap().push((change.from, change.to))
            }),
    );
    let mut states = layer.subscribe();
    open_then_half_open(&layer, &mut service, 5).await;
    repeat(&mut service, 1, "ok", 0).await;
    use BreakerState::*;
    assert_eq!(
        *seen.lock().unwrap(),
        [(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]
    );
    assert!(states.has_changed().unwrap());
    assert_eq!(*states.borrow_and_update(), Closed);
}

#[tokio::test(start_paused = true)]
async fn a_reconnect_ends_the_open_wait_at_once() {
    let (layer, mut service, _) =
        breaker(count_window(10, 5).wait_in_open(Duration::from_secs(30)));
    let (connection, state) = tokio::sync::watch::channel(ConnectionState::Connected);
    layer.half_open_on_reconnect(state).unwrap();
    connection.send_replace(ConnectionState::Reconnecting { attempt: 1 });
    repeat(&mut service, 5, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open);

    advance(Duration::from_millis(40)).await;
    connection.send_replace(ConnectionState::Connected);
    settle().await;
    assert_eq!(layer.state(), BreakerState::HalfOpen, "40 ms, not 30 s");
    repeat(&mut service, 5, "ok", 0).await;
    assert_eq!(layer.state(), BreakerState::Closed);

    // A reconnect while closed changes nothing.
    connection.send_replace(ConnectionState::Reconnecting { attempt: 1 });
    connection.send_replace(ConnectionState::Connected);
    settle().await;
    assert_eq!(layer.state(), BreakerState::Closed);
}

/// A closed breaker forgets the calls of a connection that was lost once a new one is
/// up: with few calls a second they would reach `minimum_calls` only after Redis is
/// back, and open it on an outage that has ended. A connection put back because it
/// answered a `PING` (Redis slow, not gone) keeps them.
#[tokio::test(start_paused = true)]
async fn a_new_connection_clears_the_lost_ones_calls_and_one_put_back_keeps_them() {
    use ConnectionState::{Connected, Reconnecting, Suspect};
    let (layer, mut service, _) = breaker(count_window(100, 20));
    let (connection, state) = tokio::sync::watch::channel(Connected);
    layer.half_open_on_reconnect(state).unwrap();
    connection.send_replace(Reconnecting { attempt: 1 });
    settle().await;
    repeat(&mut service, 12, "fail", 0).await;
    connection.send_replace(Connected);
    settle().await;
    assert_eq!(
        layer.metrics().calls,
        0,
        "the lost connection's calls are gone"
    );
    repeat(&mut service, 8, "ok", 0).await;
    assert_eq!(
        layer.state(),
        BreakerState::Closed,
        "12 failures in 20 calls would have opened it"
    );

    connection.send_replace(Suspect);
    settle().await;
    repeat(&mut service, 10, "fail", 0).await;
    connection.send_replace(Connected);
    settle().await;
    assert_eq!(layer.metrics().calls, 18, "kept");
    repeat(&mut service, 2, "fail", 0).await;
    assert_eq!(layer.state(), BreakerState::Open, "12 failures in 20 calls");
}

/// The calls in flight when a new connection comes (or a cluster's failing master is
/// fenced off: the same news, `Connected` again) were the lost connection's, or that
/// master's: their failures, which come after it (at their deadline), are not counted.
/// Before, 12 such timeouts opened the breaker just after a fence had cleared its window.
#[tokio::test(start_paused = true)]
async fn calls_in_flight_at_a_new_connection_are_not_counted_when_they_fail_after_it() {
    use ConnectionState::Connected;
    let (layer, service, _) = breaker(count_window(100, 20));
    let (connection, state) = tokio::sync::watch::channel(Connected);
    layer.half_open_on_reconnect(state).unwrap();
    let in_flight: Vec<_> = (0..12)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move { send(&mut service, "fail", 250).await })
        })
        .collect();
    settle().await;
    connection.send_modify(|_| {});
    settle().await;
    for call in in_flight {
        assert!(call.await.unwrap().is_err());
    }
    let mut service = service;
    repeat(&mut service, 8, "ok", 0).await;
    assert_eq!(layer.metrics().calls, 8, "{:?}", layer.metrics());
    assert_eq!(
        layer.state(),
        BreakerState::Closed,
        "12 failures in 20 calls would have opened it"
    );
}

#[test]
fn without_a_runtime_the_callers_end_the_open_wait() {
    let (layer, mut service, _) = breaker(
        count_window(10, 1)
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_millis(1)),
    );
    let ok = |service: &mut CircuitBreaker<Leaf>, behaviour| {
        futures_now(service.call(get(behaviour, 0)))
    };
    assert!(ok(&mut service, "fail").is_err());
    assert_eq!(layer.state(), BreakerState::Open);
    // The wait is a lower bound, so sleeping past it cannot be too short.
    std::thread::sleep(Duration::from_millis(5));
    assert!(ok(&mut service, "ok").is_ok(), "the probe went through");
    assert_eq!(layer.state(), BreakerState::Closed);
}

#[test]
fn callers_end_the_open_wait_when_the_runtime_that_timed_it_is_gone() {
    let (layer, mut service, _) = breaker(
        count_window(10, 1)
            .permitted_calls_in_half_open(1)
            .wait_in_open(Duration::from_millis(1)),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert!(send(&mut service, "fail", 0).await.is_err());
    });
    assert_eq!(layer.state(), BreakerState::Open);
    drop(runtime);
    std::thread::sleep(Duration::from_millis(5));
    assert!(futures_now(service.call(get("ok", 0))).is_ok());
    assert_eq!(layer.state(), BreakerState::Closed);
}

/// Polls a future that completes without waiting, with no runtime.
fn futures_now<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("expected an immediate answer"),
    }
}

#[test]
fn settings_out_of_range_are_configuration_errors() {
    let bad = [
        CircuitBreakerConfig::new().failure_rate_threshold(0.0),
        CircuitBreakerConfig::new().failure_rate_threshold(101.0),
        CircuitBreakerConfig::new().slow_call_rate_threshold(f32::NAN),
        CircuitBreakerConfig::new().sliding_window(SlidingWindow::Count(0)),
        CircuitBreakerConfig::new().sliding_window(SlidingWindow::Count(1 << 20)),
        CircuitBreakerConfig::new().sliding_window(SlidingWindow::Time {
            length: Duration::from_secs(10),
            buckets: 0,
        }),
        CircuitBreakerConfig::new().minimum_calls(0),
        CircuitBreakerConfig::new().permitted_calls_in_half_open(0),
    ];
    for config in bad {
        let err = CircuitBreakerLayer::new(config.clone()).unwrap_err();
        assert!(err.is_config(), "{config:?}: {err}");
        assert!(err.to_string().contains("circuit breaker"), "{err}");
    }
    assert!(CircuitBreakerLayer::new(CircuitBreakerConfig::new()).is_ok());
}

// ---------------------------------------------------------------------------------------
// Model-based test: the lock-free breaker against a plain reference state machine.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelState {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// The breaker as the documentation describes it, written the obvious way.
struct Model {
    window: Option<usize>,
    time_window: Option<(Duration, u32)>,
    origin: Instant,
    minimum: usize,
    failure_pct: f32,
    slow_pct: f32,
    slow_after: Duration,
    wait: Duration,
    permitted: usize,
    state: ModelState,
    /// (finished at, failed, slow)
    calls: VecDeque<(Instant, bool, bool)>,
    probes: Vec<(bool, bool)>,
    /// Since when the slow-call rate has stood at its threshold, at the calls recorded.
    slow_since: Option<Instant>,
}

impl Model {
    fn state(&mut self, now: Instant) -> BreakerState {
        if let ModelState::Open { until } = self.state
            && now >= until
        {
            self.state = ModelState::HalfOpen;
            self.probes.clear();
        }
        match self.state {
            ModelState::Closed => BreakerState::Closed,
            ModelState::Open { .. } => BreakerState::Open,
            ModelState::HalfOpen => BreakerState::HalfOpen,
        }
    }

    fn in_window(&self, now: Instant) -> Vec<(bool, bool)> {
        match (self.window, self.time_window) {
            (Some(size), _) => self
                .calls
                .iter()
                .rev()
                .take(size)
                .map(|&(_, failed, slow)| (failed, slow))
                .collect(),
            (None, Some((length, buckets))) => {
                let bucket = length / buckets;
                let period = |at: Instant| (at - self.origin).as_nanos() / bucket.as_nanos();
                let current = period(now);
                self.calls
                    .iter()
                    .filter(|&&(at, _, _)| period(at) + u128::from(buckets) > current)
                    .map(|&(_, failed, slow)| (failed, slow))
                    .collect()
            }
            _ => unreachable!(),
        }
    }

    fn reaches(&self, part: usize, of: usize, percent: f32) -> bool {
        part as f32 * 100.0 >= percent * of as f32
    }

    /// Whether a call is let through now.
    fn admits(&mut self, now: Instant) -> bool {
        matches!(
            self.state(now),
            BreakerState::Closed | BreakerState::HalfOpen
        )
    }

    fn record(&mut self, finished: Instant, failed: bool, slow: bool) {
        match self.state {
            ModelState::Closed => {
                self.calls.push_back((finished, failed, slow));
                let window = self.in_window(finished);
                let minimum = self
                    .window
                    .map_or(self.minimum, |size| self.minimum.min(size));
                let failures = window.iter().filter(|c| c.0).count();
                let slows = window.iter().filter(|c| c.1).count();
                let enough = window.len() >= minimum;
                let slow_rate = enough && self.reaches(slows, window.len(), self.slow_pct);
                // The slow-call rate opens it once it has stood at its threshold for the
                // slow-call duration.
                let since = *self.slow_since.get_or_insert(finished);
                if !slow_rate {
                    self.slow_since = None;
                }
                if enough && self.reaches(failures, window.len(), self.failure_pct)
                    || slow_rate && finished - since >= self.slow_after
                {
                    self.state = ModelState::Open {
                        until: finished + self.wait,
                    };
                    self.slow_since = None;
                }
            }
            ModelState::HalfOpen => {
                self.probes.push((failed, slow));
                let failures = self.probes.iter().filter(|c| c.0).count();
                let slows = self.probes.iter().filter(|c| c.1).count();
                let remaining = self.permitted - self.probes.len();
                // Sure to reach a threshold over the permitted calls: re-open. Sure not
                // to reach either: close.
                if self.reaches(failures, self.permitted, self.failure_pct)
                    || self.reaches(slows, self.permitted, self.slow_pct)
                {
                    self.state = ModelState::Open {
                        until: finished + self.wait,
                    };
                } else if !self.reaches(failures + remaining, self.permitted, self.failure_pct)
                    && !self.reaches(slows + remaining, self.permitted, self.slow_pct)
                {
                    self.state = ModelState::Closed;
                    self.calls.clear();
                }
            }
            ModelState::Open { .. } => unreachable!("an open breaker admits nothing"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn agrees_with_a_reference_model_on_random_histories() {
    let mut rng = SmallRng::seed_from_u64(0x5eed_b4ea);
    for history in 0..300 {
        let time_based = history % 3 == 0;
        let window = rng.random_range(1..=12u32);
        let minimum = rng.random_range(1..=10u32);
        let failure_pct = [10.0, 25.0, 50.0, 75.0, 100.0][rng.random_range(0..5)];
        let slow_pct = [20.0, 50.0, 100.0][rng.random_range(0..3)];
        let permitted = rng.random_range(1..=4u32);
        let wait = Duration::from_millis(rng.random_range(1..=50) * 100);
        let slow_after = Duration::from_millis(100);
        let window_setting = if time_based {
            SlidingWindow::Time {
                length: Duration::from_secs(u64::from(window)),
                buckets: window,
            }
        } else {
            SlidingWindow::Count(window)
        };
        let (layer, mut service, leaf) = breaker(
            CircuitBreakerConfig::new()
                .sliding_window(window_setting)
                .minimum_calls(minimum)
                .failure_rate_threshold(failure_pct)
                .slow_call_rate_threshold(slow_pct)
                .slow_call_duration(slow_after)
                .wait_in_open(wait)
                .permitted_calls_in_half_open(permitted),
        );
        let mut model = Model {
            window: (!time_based).then_some(window as usize),
            time_window: time_based.then_some((Duration::from_secs(u64::from(window)), window)),
            origin: Instant::now(),
            minimum: minimum as usize,
            failure_pct,
            slow_pct,
            slow_after,
            wait,
            permitted: permitted as usize,
            state: ModelState::Closed,
            calls: VecDeque::new(),
            probes: Vec::new(),
            slow_since: None,
        };
        let mut trace = Vec::new();
        for step in 0..120 {
            let now = Instant::now();
            let expected = model.state(now);
            assert_eq!(
                layer.state(),
                expected,
                "history {history} step {step}: {trace:?}"
            );
            if expected == BreakerState::Closed {
                let window = model.in_window(now);
                let metrics = layer.metrics();
                assert_eq!(
                    (metrics.calls, metrics.failed_calls, metrics.slow_calls),
                    (
                        window.len() as u64,
                        window.iter().filter(|c| c.0).count() as u64,
                        window.iter().filter(|c| c.1).count() as u64
                    ),
                    "history {history} step {step}: {trace:?}"
                );
            }
            if rng.random_bool(0.15) {
                let millis = rng.random_range(1..=40) * 100;
                trace.push(format!("advance {millis}ms"));
                advance(Duration::from_millis(millis)).await;
                settle().await;
                continue;
            }
            let behaviour = ["ok", "ok", "fail", "timeout", "server"][rng.random_range(0..5)];
            let millis = [0, 0, 0, 50, 200][rng.random_range(0..5)];
            trace.push(format!("{behaviour} {millis}ms"));
            let admitted = model.admits(now);
            let before = leaf.calls();
            let result = send(&mut service, behaviour, millis).await;
            assert_eq!(
                leaf.calls() - before,
                usize::from(admitted),
                "history {history} step {step}: {trace:?}"
            );
            if admitted {
                let failed = matches!(behaviour, "fail" | "timeout");
                let slow = Duration::from_millis(millis) >= model.slow_after;
                model.record(Instant::now(), failed, slow);
                assert_eq!(result.is_ok(), behaviour == "ok");
            } else {
                assert!(result.unwrap_err().is_circuit_open());
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_breaker_switched_off_lets_every_call_through_and_never_opens() {
    let layer = CircuitBreakerLayer::off();
    assert_eq!(*layer.subscribe().borrow(), BreakerState::Disabled);
    let leaf = Leaf::default();
    let mut service = layer.layer(leaf.clone());
    for _ in 0..100 {
        let error = send(&mut service, "fail", 0).await.unwrap_err();
        assert!(error.is_unavailable());
    }
    assert_eq!(leaf.calls(), 100);
    assert_eq!(layer.state(), BreakerState::Disabled);
}
