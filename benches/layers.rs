//! What each layer costs per call on the healthy path, over an in-memory leaf that answers
//! at once: the layers' own overhead, with no network in the way.
//!
//! `cargo bench --bench layers`

mod stacks;

use std::{
    future::{Future, ready},
    hint::black_box,
    pin::{Pin, pin},
    sync::Barrier,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use redis::Value;
use stacks::{
    LeafConnector, Memory, Refusing, Waiting, built_stack, call_n, full_stack, get, reconnect_over,
};
use tokio::runtime::{Builder, Runtime};
use tower::{Layer, Service, ServiceExt, util::BoxCloneSyncService};
use tower_redis_resilience::{
    CommandInfo, Error, Request,
    circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer},
    fallback::FallbackLayer,
    metrics::MetricsLayer,
    retry::RetryLayer,
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

/// The least a layer with shared state can do: keep a reference count on it in each
/// call's future, as the breaker (and tower's `ConcurrencyLimit`) must.
#[derive(Clone)]
struct ArcPerCall<S> {
    inner: S,
    shared: std::sync::Arc<u64>,
}

impl<S: Service<Request>> Service<Request> for ArcPerCall<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = Holding<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        Holding(self.inner.call(request), self.shared.clone())
    }
}

#[pin_project::pin_project]
struct Holding<F>(#[pin] F, std::sync::Arc<u64>);

impl<F: Future> Future for Holding<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().0.poll(cx)
    }
}

fn runtime() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

/// Polls a future of the in-memory leaves to completion: no runtime in the measurement.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}

/// One call through `service`; `Ok` or the error's class, checked.
fn call_once<S>(service: &mut S, request: &Request, expect_ok: bool)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let reply = now(async {
        service
            .ready()
            .await
            .unwrap()
            .call(black_box(request.clone()))
            .await
    });
    assert_eq!(black_box(reply).is_ok(), expect_ok);
}

fn bench_one<S>(c: &mut Criterion, name: &str, mut service: S)
where
    S: Service<Request, Response = Value, Error = Error>,
{
    let request = get();
    c.bench_function(name, |b| b.iter(|| call_once(&mut service, &request, true)));
}

/// Two threads calling clones of one service at once: the per-call time each thread
/// sees while the other contends for the same shared state.
fn bench_two_threads<S>(c: &mut Criterion, name: &str, service: S, expect_ok: bool)
where
    S: Service<Request, Response = Value, Error = Error> + Clone + Send,
{
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(2);
            std::thread::scope(|scope| {
                let threads: Vec<_> = (0..2)
                    .map(|_| {
                        let mut service = service.clone();
                        let barrier = &barrier;
                        scope.spawn(move || {
                            let request = get();
                            barrier.wait();
                            let start = Instant::now();
                            for _ in 0..iters {
                                call_once(&mut service, &request, expect_ok);
                            }
                            start.elapsed()
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|thread| thread.join().unwrap())
                    .max()
                    .unwrap_or(Duration::ZERO)
            })
        })
    });
}

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let reconnect = rt.block_on(reconnect_over(LeafConnector(Memory)));

    // Entered so layers that need a runtime find one; the measured calls never use it.
    let _guard = rt.enter();
    bench_one(c, "healthy/leaf alone", Memory);
    bench_one(c, "healthy/Reconnect", reconnect.clone());
    bench_one(c, "healthy/Retry", RetryLayer::default().layer(Memory));
    bench_one(
        c,
        "healthy/Retry+Reconnect",
        RetryLayer::default().layer(reconnect.clone()),
    );

    let breaker = CircuitBreakerLayer::default();
    bench_one(c, "healthy/CircuitBreaker", breaker.layer(Memory));
    bench_one(c, "waiting leaf/leaf alone", Waiting);
    bench_one(c, "waiting leaf/CircuitBreaker", breaker.layer(Waiting));
    let time_window = CircuitBreakerLayer::new(CircuitBreakerConfig::new().sliding_window(
        tower_redis_resilience::circuit_breaker::SlidingWindow::Time {
            length: Duration::from_secs(10),
            buckets: 10,
        },
    ))
    .unwrap();
    bench_one(
        c,
        "healthy/CircuitBreaker time window",
        time_window.layer(Memory),
    );

    bench_one(c, "healthy/Timeout", TimeoutLayer::default().layer(Memory));
    bench_one(
        c,
        "waiting leaf/Timeout",
        TimeoutLayer::default().layer(Waiting),
    );
    bench_one(c, "healthy/Metrics", MetricsLayer::new().layer(Memory));
    bench_one(
        c,
        "waiting leaf/Metrics",
        MetricsLayer::new().layer(Waiting),
    );
    bench_one(
        c,
        "healthy/Fallback",
        FallbackLayer::default().layer(Memory),
    );
    bench_one(
        c,
        "waiting leaf/Fallback",
        FallbackLayer::default().layer(Waiting),
    );
    // No subscriber listens: the span is disabled, as with `DEBUG` off.
    bench_one(
        c,
        "healthy/Trace (span disabled)",
        TraceLayer::new().layer(Memory),
    );
    bench_one(
        c,
        "healthy/Metrics+Timeout",
        MetricsLayer::new().layer(TimeoutLayer::default().layer(Memory)),
    );

    // The whole default stack, as the builder makes it (concrete), and boxed (as a
    // `BoxCloneSyncService` user holds it).
    let waiting_reconnect = rt.block_on(reconnect_over(LeafConnector(Waiting)));
    bench_one(
        c,
        "healthy/full stack",
        full_stack(reconnect.clone(), CircuitBreakerLayer::default()),
    );
    bench_one(
        c,
        "healthy/full stack boxed",
        BoxCloneSyncService::new(full_stack(
            reconnect.clone(),
            CircuitBreakerLayer::default(),
        )),
    );
    bench_one(
        c,
        "waiting leaf/full stack",
        full_stack(waiting_reconnect.clone(), CircuitBreakerLayer::default()),
    );
    bench_one(
        c,
        "waiting leaf/full stack boxed",
        BoxCloneSyncService::new(full_stack(
            waiting_reconnect,
            CircuitBreakerLayer::default(),
        )),
    );
    // Open: the breaker rejects, the metrics count it, the fallback answers a miss.
    bench_one(
        c,
        "open/full stack (rejected, falls back)",
        full_stack(reconnect.clone(), tripped()),
    );

    // The floor: a leaf that answers an error at once, for comparison.
    let request = get();
    let mut refusing = Refusing;
    c.bench_function("open/erroring leaf alone", |b| {
        b.iter(|| call_once(&mut refusing, &request, false))
    });
    let mut rejected = tripped().layer(Memory);
    let request = get();
    c.bench_function("open/CircuitBreaker rejection", |b| {
        b.iter(|| call_once(&mut rejected, &request, false))
    });
}

/// A breaker opened by failures, that stays open for the whole run.
fn tripped() -> CircuitBreakerLayer {
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new().wait_in_open(Duration::from_secs(3600)),
    )
    .unwrap();
    let mut failing = breaker.layer(tower::service_fn(|_: Request| {
        ready(Err::<Value, _>(Error::unavailable("down")))
    }));
    let request = get();
    for _ in 0..20 {
        call_once(&mut failing, &request, false);
    }
    assert_eq!(
        breaker.state(),
        tower_redis_resilience::circuit_breaker::BreakerState::Open
    );
    breaker
}

fn two_threads(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    bench_two_threads(c, "2 threads/leaf alone", Memory, true);
    let floor = ArcPerCall {
        inner: Memory,
        shared: std::sync::Arc::new(0),
    };
    bench_two_threads(c, "2 threads/Arc clone per call", floor, true);
    let breaker = CircuitBreakerLayer::default();
    bench_two_threads(c, "2 threads/CircuitBreaker", breaker.layer(Memory), true);
    bench_two_threads(
        c,
        "2 threads/Metrics",
        MetricsLayer::new().layer(Memory),
        true,
    );
    bench_two_threads(
        c,
        "2 threads/full stack",
        full_stack(Memory, CircuitBreakerLayer::default()),
        true,
    );
    bench_two_threads(c, "2 threads/erroring leaf alone", Refusing, false);
    bench_two_threads(
        c,
        "2 threads/CircuitBreaker rejection",
        tripped().layer(Memory),
        false,
    );
}

/// Calls made by a task on a running `current_thread` runtime, through a leaf that waits
/// once: what a layer costs where apps run it, with the runtime's timer driver awake
/// (outside a runtime, arming a timer also wakes the idle driver with a syscall).
fn bench_in_runtime<S>(c: &mut Criterion, rt: &Runtime, name: &str, service: S)
where
    S: Service<Request, Response = Value, Error = Error, Future: Send> + Clone + Send + 'static,
{
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut service = service.clone();
            rt.block_on(async move {
                tokio::spawn(async move {
                    let start = Instant::now();
                    call_n(&mut service, iters).await;
                    start.elapsed()
                })
                .await
                .unwrap()
            })
        })
    });
}

fn in_runtime(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    bench_in_runtime(c, &rt, "in runtime/leaf alone", Waiting);
    bench_in_runtime(
        c,
        &rt,
        "in runtime/Timeout",
        TimeoutLayer::default().layer(Waiting),
    );
    bench_in_runtime(
        c,
        &rt,
        "in runtime/Metrics",
        MetricsLayer::new().layer(Waiting),
    );
    bench_in_runtime(
        c,
        &rt,
        "in runtime/CircuitBreaker",
        CircuitBreakerLayer::default().layer(Waiting),
    );
    bench_in_runtime(
        c,
        &rt,
        "in runtime/Fallback",
        FallbackLayer::default().layer(Waiting),
    );
    let reconnect = rt.block_on(reconnect_over(LeafConnector(Waiting)));
    bench_in_runtime(
        c,
        &rt,
        "in runtime/full stack",
        full_stack(reconnect.clone(), CircuitBreakerLayer::default()),
    );
    bench_in_runtime(
        c,
        &rt,
        "in runtime/full stack, option_layer, boxed",
        built_stack(reconnect),
    );
}

/// What describing a request costs (`Request::from` a `Cmd` does it, for every call):
/// finding its command in the table, and its flags. One command over and over (the
/// branch predictor learns it), and a mix of eight in a shuffled order (it cannot).
fn describe(c: &mut Criterion) {
    let cmd = |words: &[&str]| {
        let mut cmd = redis::cmd(words[0]);
        for word in &words[1..] {
            cmd.arg(*word);
        }
        cmd
    };
    let get = cmd(&["GET", "k"]);
    c.bench_function("describe/GET", |b| {
        b.iter(|| CommandInfo::of_cmd(black_box(&get)))
    });
    let kinds = [
        cmd(&["GET", "k"]),
        cmd(&["set", "k", "v", "EX", "10"]),
        cmd(&["HGETALL", "h"]),
        cmd(&["ZRANGEBYSCORE", "z", "0", "1"]),
        cmd(&["EXPIRE", "k", "10"]),
        cmd(&["CLIENT", "SETNAME", "n"]),
        cmd(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"]),
        cmd(&["MGET", "a", "b"]),
    ];
    // A fixed pseudo-random order, the same in every run.
    let order: Vec<&redis::Cmd> = (0u64..1024)
        .map(|i| &kinds[(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize])
        .collect();
    let mut next = order.iter().cycle();
    c.bench_function("describe/mix of 8 commands", |b| {
        b.iter(|| CommandInfo::of_cmd(black_box(next.next().unwrap())))
    });
}

criterion_group!(benches, layers, two_threads, in_runtime, describe);
criterion_main!(benches);
