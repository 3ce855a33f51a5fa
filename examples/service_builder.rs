//! The stack `ResilientClient::builder` assembles, built by hand with
//! `tower::ServiceBuilder` from the public layers, for when you want to add, drop or
//! reorder layers, or put tower's own (here a concurrency limit) in between.
//!
//! `cargo run --example service_builder` uses `REDIS_URL` if set, and otherwise starts a
//! throwaway `redis-server` on a free loopback port (it must be installed).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use redis::AsyncCommands;
use tower::ServiceBuilder;
use tower_redis_resilience::{
    Client, Connector,
    circuit_breaker::CircuitBreakerLayer,
    fallback::FallbackLayer,
    metrics::MetricsLayer,
    reconnect::{Reconnect, ReconnectConfig},
    retry::RetryLayer,
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (url, _server) = support::redis_url_or_throwaway_server();

    let connector = Connector::from_url(&url)?;
    let trace = TraceLayer::for_connector(&connector);
    // The bottom: one connection, one reconnect loop for every clone of the stack.
    let redis = Reconnect::connect(connector, ReconnectConfig::new()).await?;

    // The layers hold the shared state; keep handles to read it later.
    let breaker = CircuitBreakerLayer::default();
    let metrics = MetricsLayer::new();
    let fallback = FallbackLayer::default().record_to(metrics.registry().clone());
    // The two signals the builder wires for you: a reconnect lets the breaker probe at
    // once, and fallbacks show up in the metrics.
    breaker.half_open_on_reconnect(redis.state())?;

    // Outermost first. Why this order:
    // - Fallback on top answers for every failure below it, and
    // - Metrics and Trace under it still see each failure as it was (a timeout, an open
    //   circuit), not the miss the app gets.
    // - The breaker sits above Timeout so that timeouts count as failures, and above
    //   Retry so that one failed call is one failure, not three.
    // - Timeout sits above Retry: the deadline covers the retries.
    // - Reconnect is the bottom, where connections break.
    let stack = ServiceBuilder::new()
        .layer(fallback.clone())
        .layer(metrics.clone())
        .layer(trace)
        .layer(breaker.clone())
        // tower's own layers fit anywhere; here at most 64 calls reach Redis at once.
        .concurrency_limit(64)
        .layer(TimeoutLayer::new(Duration::from_millis(250)))
        .layer(RetryLayer::default())
        .service(redis.clone());
    let mut client = Client::new(stack);

    let () = client.set("service_builder:greeting", "hello").await?;
    let greeting: Option<String> = client.get("service_builder:greeting").await?;
    println!("GET -> {greeting:?}");

    let snapshot = metrics.snapshot();
    for command in &snapshot.commands {
        println!(
            "{:<4} calls {} (p50 {:?}); breaker {:?}; connection {:?}; fallbacks {}",
            command.name,
            command.calls(),
            command.latency.p50,
            breaker.state(),
            *redis.state().borrow(),
            fallback.fallbacks(),
        );
    }
    Ok(())
}
