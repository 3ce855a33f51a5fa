//! What each layer costs on a cold call: one that finds the CPU caches cold when it is
//! made and again when its reply comes, as a call on a quiet connection does (between
//! sending a GET and its reply, the kernel's network work and `redis-server` run on the
//! same cores).
//!
//! `cargo bench --bench cold` (`-- 50` to evict 50 MiB, past the L3 cache, instead of
//! the default 4 MiB, past L2). A task on a `current_thread` runtime calls each variant
//! over an in-memory leaf that waits once. Cold, the caches are evicted (every cache line
//! of a buffer of that size written) before the call and again inside the leaf, before
//! it answers; the time the eviction takes is not counted. It prints the median call and
//! its excess over the leaf's, warm and cold.
//!
//! What it shows: a layer's cold cost is several times its warm cost (cache lines it
//! touches, and how many of those loads wait on one another, not instructions it runs),
//! which is what the p50 overhead at one GET in flight in `end_to_end` is made of.

mod stacks;

use std::{
    cell::{Cell, RefCell},
    future::Future,
    hint::black_box,
    pin::Pin,
    task::{Context, Poll},
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

thread_local! {
    /// What is written to evict the caches.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Time spent evicting inside the call being timed.
    static EVICTING: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Writes one byte in every cache line of the buffer, so the caches hold it instead of
/// what the calls use; answers how long that took.
fn evict() -> Duration {
    BUFFER.with_borrow_mut(|buffer| {
        let started = Instant::now();
        for line in buffer.chunks_mut(LINE) {
            line[0] = line[0].wrapping_add(1);
        }
        black_box(&*buffer);
        started.elapsed()
    })
}

/// A leaf that waits once, as a network call does, and evicts the caches meanwhile.
#[derive(Clone)]
struct ColdWait;

struct EvictOnce(bool);

impl Future for EvictOnce {
    type Output = Result<Value, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.0 {
            return Poll::Ready(Ok(Value::Okay));
        }
        self.0 = true;
        let spent = evict();
        EVICTING.set(EVICTING.get() + spent);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Service<Request> for ColdWait {
    type Response = Value;
    type Error = Error;
    type Future = EvictOnce;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> EvictOnce {
        EvictOnce(false)
    }
}

/// The median of `CALLS` calls through `service`, cold ones evicting before each call
/// (the leaf evicts again while the call waits).
async fn median_call<S>(mut service: S, cold: bool) -> Duration
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let request = get();
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..WARM_UP + CALLS {
        if cold {
            evict();
        }
        EVICTING.set(Duration::ZERO);
        let request = request.clone();
        let started = Instant::now();
        let reply = service
            .ready()
            .await
            .unwrap()
            .call(black_box(request))
            .await;
        let took = started.elapsed().saturating_sub(EVICTING.get());
        assert!(black_box(reply).is_ok());
        if i >= WARM_UP {
            times.push(took);
        }
    }
    times.sort_unstable();
    times[times.len() / 2]
}

/// Each variant's median call, warm (over `Waiting`) and cold (over `ColdWait`).
async fn measure(evict_bytes: usize) -> Vec<(&'static str, Duration, Duration)> {
    BUFFER.set(vec![0u8; evict_bytes]);
    let warm_reconnect = reconnect_over(LeafConnector(Waiting)).await;
    let cold_reconnect = reconnect_over(LeafConnector(ColdWait)).await;
    let mut rows = Vec::new();
    // Each variant built twice from the same closure text: over the warm leaf and
    // `Reconnect`, then over the cold ones.
    macro_rules! variant {
        ($name:expr, $build:expr) => {{
            let warm = median_call(($build)(Waiting, warm_reconnect.clone()), false).await;
            let cold = median_call(($build)(ColdWait, cold_reconnect.clone()), true).await;
            rows.push(($name, warm, cold));
        }};
    }
    variant!("leaf alone", |leaf, _| leaf);
    variant!("Reconnect", |_, reconnect| reconnect);
    variant!("Retry", |leaf, _| RetryLayer::default().layer(leaf));
    variant!("Timeout", |leaf, _| TimeoutLayer::default().layer(leaf));
    variant!("CircuitBreaker", |leaf, _| CircuitBreakerLayer::default()
        .layer(leaf));
    variant!("Metrics", |leaf, _| MetricsLayer::new().layer(leaf));
    variant!("Fallback", |leaf, _| FallbackLayer::default().layer(leaf));
    variant!("Trace (span disabled)", |leaf, _| TraceLayer::new()
        .layer(leaf));
    variant!("full stack", |_, reconnect| full_stack(
        reconnect,
        CircuitBreakerLayer::default()
    ));
    variant!("leaf alone, again", |leaf, _| leaf);
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
