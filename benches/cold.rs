//! What each layer costs on a cold call: one made after the CPU caches lost the stack's
//! code and state, as a call on a quiet connection finds them (between two GETs one at a
//! time, the kernel's network work and `redis-server` run on the same cores).
//!
//! `cargo bench --bench cold` (`-- 50` to evict 50 MiB, past the L3 cache, instead of
//! the default 4 MiB, past L2). A task on a `current_thread` runtime calls each variant
//! over the in-memory leaf that waits once; before each call it writes every cache line
//! of a buffer of that size, then times the call alone. It prints the median call and
//! its excess over the leaf's, warm (no eviction) and cold.
//!
//! What it shows: a layer's cold cost is several times its warm cost (cache lines it
//! touches, not instructions it runs), which is what the p50 overhead at one GET in
//! flight in `end_to_end` is made of.

mod stacks;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use redis::Value;
use stacks::{LeafConnector, Waiting, full_stack, get, reconnect_over};
use tower::{Layer, Service, ServiceExt};
use tower_redis_resilience::{
    Error, Request, circuit_breaker::CircuitBreakerLayer, fallback::FallbackLayer,
    metrics::MetricsLayer, retry::RetryLayer, timeout::TimeoutLayer, trace::TraceLayer,
};

const CALLS: usize = 3_000;
const WARM_UP: usize = 200;
const LINE: usize = 64;

/// Writes one byte in every cache line of `buffer`, so the caches hold it instead of
/// what the calls use.
fn evict(buffer: &mut [u8]) {
    for line in buffer.chunks_mut(LINE) {
        line[0] = line[0].wrapping_add(1);
    }
    black_box(&*buffer);
}

/// The median of `CALLS` calls through `service`, each after `evict` (when given).
async fn median_call<S>(mut service: S, mut evict_buffer: Option<&mut [u8]>) -> Duration
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let request = get();
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..WARM_UP + CALLS {
        if let Some(buffer) = evict_buffer.as_deref_mut() {
            evict(buffer);
        }
        let request = request.clone();
        let started = Instant::now();
        let reply = service
            .ready()
            .await
            .unwrap()
            .call(black_box(request))
            .await;
        let took = started.elapsed();
        assert!(black_box(reply).is_ok());
        if i >= WARM_UP {
            times.push(took);
        }
    }
    times.sort_unstable();
    times[times.len() / 2]
}

/// Each variant's median call, warm and cold.
async fn measure(evict_bytes: usize) -> Vec<(&'static str, Duration, Duration)> {
    let mut buffer = vec![0u8; evict_bytes];
    let reconnect = reconnect_over(LeafConnector(Waiting)).await;
    let mut rows = Vec::new();
    macro_rules! variant {
        ($name:expr, $service:expr) => {{
            let warm = median_call($service, None).await;
            let cold = median_call($service, Some(&mut buffer)).await;
            rows.push(($name, warm, cold));
        }};
    }
    variant!("leaf alone", Waiting);
    variant!("Reconnect", reconnect.clone());
    variant!("Retry", RetryLayer::default().layer(Waiting));
    variant!("Timeout", TimeoutLayer::default().layer(Waiting));
    variant!(
        "CircuitBreaker",
        CircuitBreakerLayer::default().layer(Waiting)
    );
    variant!("Metrics", MetricsLayer::new().layer(Waiting));
    variant!("Fallback", FallbackLayer::default().layer(Waiting));
    variant!("Trace (span disabled)", TraceLayer::new().layer(Waiting));
    variant!(
        "full stack",
        full_stack(reconnect.clone(), CircuitBreakerLayer::default())
    );
    variant!("leaf alone, again", Waiting);
    rows
}

fn main() {
    let mib: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(4);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = runtime.block_on(async move {
        tokio::spawn(async move {
            // The first pass settles code layout, allocator and timer; the second counts.
            measure(mib << 20).await;
            measure(mib << 20).await
        })
        .await
        .unwrap()
    });
    let (_, leaf_warm, leaf_cold) = rows[0];
    println!(
        "median call, in a runtime task over a leaf that waits once; cold: after writing \
         {mib} MiB"
    );
    println!(
        "  {:<24} {:>8} {:>10}   {:>8} {:>10}",
        "", "warm", "over leaf", "cold", "over leaf"
    );
    let ns = |d: Duration| d.as_nanos() as i64;
    for (name, warm, cold) in rows {
        println!(
            "  {name:<24} {:>6} ns {:>+7} ns   {:>6} ns {:>+7} ns",
            ns(warm),
            ns(warm) - ns(leaf_warm),
            ns(cold),
            ns(cold) - ns(leaf_cold),
        );
    }
}
