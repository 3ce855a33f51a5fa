//! The metrics layer over the in-memory leaf, under a paused clock so latencies are exact.

use std::time::Duration;

use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::{
    testing::{Leaf, call, command},
    timeout::TimeoutLayer,
};

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn every_outcome_is_counted_per_command_with_its_latency() {
    let metrics = MetricsLayer::new();
    let mut service = metrics.layer(Leaf::default());
    for _ in 0..3 {
        call(&mut service, command("GET", "ok", 2)).await.unwrap();
    }
    call(&mut service, command("GET", "fail", 5))
        .await
        .unwrap_err();
    call(&mut service, command("GET", "timeout", 250))
        .await
        .unwrap_err();
    call(&mut service, command("SET", "server", 0))
        .await
        .unwrap_err();
    call(&mut service, command("SET", "ok", 0)).await.unwrap();

    let snapshot = metrics.snapshot();
    let get = snapshot.command("GET").unwrap();
    let counts: Vec<_> = get.counts().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        counts,
        [
            (Outcome::Ok, 3),
            (Outcome::Timeout, 1),
            (Outcome::Unavailable, 1)
        ]
    );
    assert_eq!(get.latency.max, 250 * MS);
    // Quantiles are bucket bounds: within an eighth above the true value.
    assert!(get.latency.p50 >= 2 * MS && get.latency.p50 <= 2 * MS + MS / 4);
    let set = snapshot.command("SET").unwrap();
    assert_eq!(
        (set.count(Outcome::Ok), set.count(Outcome::ServerError)),
        (1, 1)
    );
    assert_eq!(set.latency.max, Duration::ZERO);
    assert_eq!(snapshot.overall.calls(), 7);
    assert_eq!(snapshot.overall.latency.count, 7);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_by_an_outer_timeout_is_counted_as_cancelled_with_its_time() {
    let metrics = MetricsLayer::new();
    let mut service = metrics.layer(Leaf::default());
    for _ in 0..4 {
        let future = service
            .ready()
            .await
            .unwrap()
            .call(command("GET", "hang", 0));
        let outer = tokio::time::timeout(40 * MS, future).await;
        assert!(outer.is_err(), "the outer timeout fired");
    }
    // Dropped before its first poll: cancelled too, after no time.
    drop(service.ready().await.unwrap().call(command("GET", "ok", 0)));

    let get = metrics.snapshot().command("GET").cloned().unwrap();
    assert_eq!(get.count(Outcome::Cancelled), 5);
    assert_eq!(get.calls(), 5);
    assert_eq!(get.latency.max, 40 * MS);
}

#[tokio::test(start_paused = true)]
async fn latency_starts_where_the_deadline_does() {
    let metrics = MetricsLayer::new();
    let mut service = ServiceBuilder::new()
        .layer(metrics.clone())
        .layer(TimeoutLayer::new(100 * MS))
        .service(Leaf::default());
    let future = service
        .ready()
        .await
        .unwrap()
        .call(command("GET", "hang", 0));
    // Time passes between the call and its first poll: both layers count it.
    tokio::time::advance(30 * MS).await;
    assert!(future.await.unwrap_err().is_timeout());
    let get = metrics.snapshot().command("GET").cloned().unwrap();
    assert_eq!(get.count(Outcome::Timeout), 1);
    assert_eq!(get.latency.max, 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn every_service_and_clone_of_a_layer_shares_its_registry() {
    let metrics = MetricsLayer::new();
    for _ in 0..3 {
        // As a framework that builds the stack per request would.
        let mut service = metrics.layer(Leaf::default()).clone();
        call(&mut service, command("GET", "ok", 0)).await.unwrap();
    }
    let other = MetricsLayer::with_registry(metrics.registry().clone());
    call(&mut other.layer(Leaf::default()), command("GET", "ok", 0))
        .await
        .unwrap();
    assert_eq!(
        metrics
            .snapshot()
            .command("GET")
            .unwrap()
            .count(Outcome::Ok),
        4
    );
}

#[tokio::test(start_paused = true)]
async fn pipelines_and_unknown_commands_are_counted_under_bounded_names() {
    let metrics = MetricsLayer::new();
    let mut service = metrics.layer(Leaf::default());
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg("ok").arg(0).cmd("GET").arg("ok").arg(0);
    call(&mut service, Request::from(&pipe)).await.unwrap();
    pipe.atomic();
    call(&mut service, Request::from(&pipe)).await.unwrap();
    for i in 0..50 {
        let module_command = format!("MYMODULE.CMD{i}");
        call(&mut service, command(&module_command, "ok", 0))
            .await
            .unwrap();
    }
    let snapshot = metrics.snapshot();
    let names: Vec<_> = snapshot.commands.iter().map(|c| c.name).collect();
    assert_eq!(names, ["MULTI", "PIPELINE", "UNKNOWN"]);
    assert_eq!(snapshot.command("UNKNOWN").unwrap().calls(), 50);
}

/// Successes recorded from many threads land in per-thread histograms; a snapshot adds
/// them all up.
#[test]
fn successes_recorded_from_many_threads_are_all_counted() {
    let registry = Registry::new();
    let threads = 20;
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let registry = &registry;
            scope.spawn(move || {
                for _ in 0..100 {
                    registry.record("GET", Outcome::Ok, Duration::from_micros(10 + thread));
                }
                registry.record("GET", Outcome::Timeout, MS);
            });
        }
    });
    let snapshot = registry.snapshot();
    let get = snapshot.command("GET").unwrap();
    assert_eq!(get.count(Outcome::Ok), 100 * threads);
    assert_eq!(get.count(Outcome::Timeout), threads);
    assert_eq!(get.latency.count, 101 * threads);
    assert_eq!(get.latency.max, MS);
    let mean_ok = (10..10 + threads).sum::<u64>() * 1_000 / threads;
    let mean = (mean_ok * 100 + 1_000_000) / 101;
    assert_eq!(get.latency.mean, Duration::from_nanos(mean));
    assert_eq!(snapshot.overall.count(Outcome::Ok), 100 * threads);
}

#[tokio::test(start_paused = true)]
async fn a_layer_switched_off_records_nothing() {
    let metrics = MetricsLayer::off();
    let mut service = metrics.layer(Leaf::default());
    call(&mut service, command("GET", "ok", 5)).await.unwrap();
    call(&mut service, command("GET", "fail", 5))
        .await
        .unwrap_err();
    assert_eq!(metrics.snapshot().overall.calls(), 0);
    assert!(metrics.snapshot().command("GET").is_none());
}
